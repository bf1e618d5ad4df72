"""The shared-socket DNS demultiplexer (pure part) and the byte-bounded memo."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torroute.routing.dns_transport import QueryTable
from torroute.routing.memo import ENTRY_OVERHEAD, ByteMemo


def query(name: str) -> dns.message.Message:
    return dns.message.make_query(f"_onion-mx._tcp.{name}", dns.rdatatype.SRV)


def answer(q: dns.message.Message, rcode: int = dns.rcode.NOERROR, records: int = 1,
           tc: bool = False) -> bytes:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    qname = q.question[0].name
    if records:
        r.answer.append(dns.rrset.from_text(
            qname, 300, "IN", "SRV",
            *(f"0 5 25 mx{i}.example.onion." for i in range(records))))
    if tc:
        r.flags |= dns.flags.TC
    return r.to_wire()


def test_each_answer_resolves_its_own_question_whatever_the_order() -> None:
    table = QueryTable(randbits=random.Random(1).getrandbits)
    queries = {f"d{i}.test": query(f"d{i}.test") for i in range(200)}
    wires = {}
    for name, q in queries.items():
        qid, wire = table.add(q, name)
        assert q.id == qid and wire[:2] == qid.to_bytes(2, "big")
        wires[name] = answer(q)
    assert len({q.id for q in queries.values()}) == 200  # ids unique among those in flight
    order = list(queries)
    random.Random(2).shuffle(order)
    for name in order:
        waiter, response = table.receive(wires[name])
        assert waiter == name
        assert response.question[0].name == queries[name].question[0].name
    assert len(table) == 0 and table.ignored == 0


def test_duplicates_late_answers_and_unknown_ids_are_ignored() -> None:
    table = QueryTable()
    q = query("a.test")
    table.add(q, "a")
    wire = answer(q)
    assert table.receive(wire)[0] == "a"
    assert table.receive(wire) is None  # the second copy
    other = query("b.test")
    other.id = (q.id + 1) % 65536
    assert table.receive(answer(other)) is None
    assert table.ignored == 2


def test_an_answer_to_another_question_with_the_right_id_does_not_resolve() -> None:
    """A forgery (or a confused server) with a guessed id: ignored, the question still waits
    and its real answer still counts."""
    table = QueryTable()
    q = query("victim.test")
    table.add(q, "victim")
    forged = query("attacker.test")
    forged.id = q.id
    assert table.receive(answer(forged)) is None
    not_a_response = q.to_wire()  # QR bit clear: the query itself, reflected
    assert table.receive(not_a_response) is None
    assert len(table) == 1
    assert table.receive(answer(q))[0] == "victim"


def test_truncated_answers_reach_the_caller_even_when_cut_mid_record() -> None:
    table = QueryTable()
    q = query("big.test")
    table.add(q, "big")
    whole = answer(q, records=5, tc=True)
    waiter, response = table.receive(whole[:-7])  # cut inside the last record
    assert waiter == "big" and response.flags & dns.flags.TC
    q2 = query("bad.test")
    table.add(q2, "bad")
    assert table.receive(answer(q2, records=5)[:-7]) is None  # cut, no TC bit: garbage


def test_servfail_and_nxdomain_come_through() -> None:
    table = QueryTable()
    q1, q2 = query("sf.test"), query("nx.test")
    table.add(q1, 1)
    table.add(q2, 2)
    assert table.receive(answer(q1, dns.rcode.SERVFAIL, 0))[1].rcode() == dns.rcode.SERVFAIL
    assert table.receive(answer(q2, dns.rcode.NXDOMAIN, 0))[1].rcode() == dns.rcode.NXDOMAIN


def test_discard_take_all_and_capacity() -> None:
    table = QueryTable(capacity=3)
    ids = [table.add(query(f"{i}.test"), i)[0] for i in range(3)]
    assert table.full
    with pytest.raises(OverflowError):
        table.add(query("x.test"), "x")
    table.discard(ids[0])
    assert not table.full and sorted(table.take_all()) == [1, 2] and len(table) == 0


def test_a_colliding_random_id_is_drawn_again() -> None:
    draws = iter([7, 7, 7, 9])
    table = QueryTable(randbits=lambda _bits: next(draws))
    assert table.add(query("a.test"), "a")[0] == 7
    assert table.add(query("b.test"), "b")[0] == 9


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=600), max_size=20), st.integers(0, 65535))
def test_garbage_datagrams_never_crash_nor_resolve(datagrams: list[bytes], qid: int) -> None:
    table = QueryTable(randbits=lambda _bits: qid)
    q = query("target.test")
    table.add(q, "target")
    for data in datagrams:
        hit = table.receive(data)
        if hit is not None:  # only a real answer to this very question may resolve it
            assert hit[0] == "target" and q.is_response(hit[1])
            return
    assert len(table) == 1


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_answers_resolve_only_their_question(data) -> None:
    """Real answers with flipped bytes, truncated, duplicated: never the wrong question."""
    table = QueryTable()
    qs = {f"n{i}.test": query(f"n{i}.test") for i in range(4)}
    for name, q in qs.items():
        table.add(q, name)
    pending = set(qs)
    for _ in range(data.draw(st.integers(1, 12))):
        name = data.draw(st.sampled_from(sorted(qs)))
        wire = bytearray(answer(qs[name], records=data.draw(st.integers(0, 3))))
        for _flip in range(data.draw(st.integers(0, 3))):
            pos = data.draw(st.integers(0, len(wire) - 1))
            wire[pos] = data.draw(st.integers(0, 255))
        wire = bytes(wire[:data.draw(st.integers(0, len(wire)))])
        hit = table.receive(wire)
        if hit is not None:
            waiter, response = hit
            assert waiter in pending and qs[waiter].is_response(response)
            pending.discard(waiter)
    assert len(table) == len(pending)


# -- ByteMemo ---------------------------------------------------------------------------------
def test_memo_is_bounded_in_bytes_not_entries() -> None:
    memo = ByteMemo(limit=10_000, max_key=300)
    for i in range(1000):
        key = f"{i}.example.test" * 10
        memo.put(key, "v" * 50, len(key), 50)
        assert memo.charged <= 10_000
        assert memo.charged == sum(len(k) + 50 + ENTRY_OVERHEAD for k in memo)
    assert 0 < len(memo) < 1000


def test_memo_never_stores_long_keys_or_oversized_entries() -> None:
    memo = ByteMemo(limit=1000, max_key=300)
    assert not memo.put("k" * 301, 1, 301, 0)
    assert not memo.put("k", "v" * 2000, 1, 2000)
    assert memo.put("k" * 300, 1, 300, 0) and len(memo) == 1
    memo.clear()
    assert memo.charged == 0 and not memo


@settings(max_examples=200)
@given(st.lists(st.tuples(st.text(max_size=400), st.integers(0, 5000)), max_size=200))
def test_memo_bound_holds_for_any_sequence(entries: list[tuple[str, int]]) -> None:
    memo = ByteMemo(limit=20_000, max_key=256)
    for key, size in entries:
        memo.put(key, size, len(key), size)
        assert memo.charged <= 20_000 and all(len(k) <= 256 for k in memo)


def test_the_question_may_come_back_in_another_case_and_servfail_without_one() -> None:
    table = QueryTable()
    q = query("mixed.test")
    table.add(q, "mixed")
    r = dns.message.make_response(q)
    wire = bytearray(r.to_wire())
    wire[12:12 + 20] = bytes(wire[12:12 + 20]).upper()
    assert table.receive(bytes(wire))[0] == "mixed"
    q2 = query("sf.test")
    table.add(q2, "sf")
    bare = dns.message.Message(id=q2.id)
    bare.flags = dns.flags.QR | dns.flags.RD
    bare.set_rcode(dns.rcode.SERVFAIL)
    assert table.receive(bare.to_wire())[1].rcode() == dns.rcode.SERVFAIL


_LDH = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=63)


@settings(max_examples=300)
@given(st.lists(_LDH, min_size=1, max_size=5), st.booleans(), st.sampled_from(["SRV", "A", "MX"]))
def test_encode_query_renders_exactly_what_dnspython_renders(labels, dnssec, rdtype) -> None:
    from torroute.routing.dns_transport import encode_query

    name = ".".join(labels)
    flags = dns.flags.RD | dns.flags.AD
    ours = encode_query(name, dns.rdatatype.from_text(rdtype), flags, dnssec)
    if len(name) > 253:
        assert ours is None
        return
    q = dns.message.make_query(name, rdtype, want_dnssec=dnssec)
    q.flags |= dns.flags.AD
    q.id = 0
    assert ours == q.to_wire()


@given(st.text(max_size=80))
def test_encode_query_leaves_unusual_names_to_dnspython(name: str) -> None:
    from torroute.routing.dns_transport import encode_query

    wire = encode_query(name, dns.rdatatype.SRV, dns.flags.RD, False)
    if wire is not None:  # a plain name: dnspython parses it back to the same question
        parsed = dns.message.from_wire(wire)
        assert parsed.question[0].name == dns.name.from_text(name)


def test_router_sends_the_same_bytes_as_srv_query() -> None:
    from torroute.config import Config
    from torroute.routing.router import srv_query, srv_query_wire

    for dnssec in (False, True):
        config = Config(nameservers=[], require_dnssec=dnssec)
        for domain in ("example.org", "xn--bcher-kva.example", "a_b.test"):
            q = srv_query(domain, config)
            q.id = 0
            assert srv_query_wire(domain, config) == q.to_wire()


def test_wire_queries_resolve_and_fall_back_to_the_full_check() -> None:
    table = QueryTable()
    q = query("w.test")
    q.id = 0
    template = q.to_wire()
    qid, wire = table.add(template, "w")
    assert wire[2:] == template[2:] and wire[:2] == qid.to_bytes(2, "big")
    bare = dns.message.Message(id=qid)  # SERVFAIL, no question: only the full check passes it
    bare.flags = dns.flags.QR | dns.flags.RD
    bare.set_rcode(dns.rcode.SERVFAIL)
    assert table.receive(bare.to_wire())[0] == "w"
