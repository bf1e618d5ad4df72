"""The small response decoder (routing.dns_wire) and the decision on it, against dnspython.

Differential: for dnspython-built responses (SRV, CNAME chains, SOA, NS, A/AAAA, random
flags, opcodes and rcodes, compression, EDNS) and for arbitrary, truncated and mutated bytes,
``decode`` either declines (None: dnspython decides) or reads what ``dns.message.from_wire``
reads, and ``decide_srv_wire`` either declines or decides exactly what ``decide_srv`` decides.
"""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.onions import ONION_A, ONION_B, ONION_C

from torroute.config import Config
from torroute.routing import dns_wire, router
from torroute.routing.dns_transport import QueryTable
from torroute.routing.router import SrvLookup, decide_srv, decide_srv_wire

QNAME = "_onion-mx._tcp.example.test."
OWNERS = [QNAME, QNAME.upper(), "c1.example.test.", "C1.example.TEST.", "c2.example.test.",
          "other.test.", "example.test."]
TARGETS = [ONION_A + ".", ONION_B.upper() + ".", "mx." + ONION_C + ".", ONION_A + ".",
           "expyuzz4wqqyqhjn.onion.", "mx.example.org.", ".", "a\\032b.example.",
           "*.example.", "broken" + ONION_B[6:] + "."]
CONFIGS = [Config(nameservers=[("127.0.0.1", 53)]),
           Config(nameservers=[("127.0.0.1", 53)], require_dnssec=True, max_ttl=60,
                  negative_ttl=7)]
TTLS = st.sampled_from([0, 1, 30, 300, 86_400 * 3, 2**31 - 1])


def _rrset(name: str, ttl: int, rdtype: str, text: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", rdtype, text)


@st.composite
def responses(draw) -> bytes:
    """Wire bytes of a dnspython-rendered response to the SRV question (compressed)."""
    q = dns.message.make_query(QNAME, dns.rdatatype.SRV)
    r = dns.message.make_response(q)
    r.flags = dns.flags.Flag(draw(st.integers(0, 0xFFFF)) & 0xFFF0
                             | (dns.flags.QR if draw(st.integers(0, 9)) else 0))
    if draw(st.integers(0, 9)) == 0:
        r.set_opcode(draw(st.sampled_from([dns.opcode.IQUERY, dns.opcode.STATUS,
                                           dns.opcode.NOTIFY])))
    else:
        r.flags &= ~0x7800
    if draw(st.integers(0, 3)):
        r.flags &= ~dns.flags.TC
    r.set_rcode(draw(st.sampled_from([0, 0, 0, 3, 3, 2, 5, 1, 15])))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["SRV", "SRV", "SRV", "CNAME", "A"]))
        owner = draw(st.sampled_from(OWNERS))
        if kind == "SRV":
            text = (f"{draw(st.integers(0, 3))} {draw(st.integers(0, 3))} "
                    f"{draw(st.sampled_from([0, 25, 2525]))} {draw(st.sampled_from(TARGETS))}")
        elif kind == "CNAME":
            text = draw(st.sampled_from(OWNERS))
        else:
            text = "192.0.2.1"
        r.answer.append(_rrset(owner, draw(TTLS), kind, text))
    if draw(st.booleans()):  # a long CNAME chain: 15 to 17 links
        links = draw(st.integers(15, 17))
        names = [QNAME] + [f"l{i}.example.test." for i in range(links)]
        for a, b in zip(names, names[1:], strict=False):
            r.answer.append(_rrset(a, 60, "CNAME", b))
        r.answer.append(_rrset(names[-1], 60, "SRV", f"0 0 25 {ONION_A}."))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["SOA", "SOA", "NS"]))
        owner = draw(st.sampled_from(OWNERS))
        text = (f"ns.test. host.test. 1 2 3 4 {draw(TTLS)}" if kind == "SOA" else "ns.test.")
        r.authority.append(_rrset(owner, draw(TTLS), kind, text))
    if draw(st.booleans()):
        r.additional.append(_rrset(f"{ONION_A}.", 60, "AAAA", "2001:db8::1"))
    if draw(st.integers(0, 5)) == 0:
        r.use_edns(0, dns.flags.DO, 1232)
    return r.to_wire()


@st.composite
def mutated(draw) -> bytes:
    wire = bytearray(draw(responses()))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(wire) - 1))
        wire[pos] = draw(st.integers(0, 255))
    cut = len(wire) if draw(st.booleans()) else draw(st.integers(0, len(wire) + 2))
    return bytes(wire[:cut]) + (b"\x00" * (cut - len(wire)) if cut > len(wire) else b"")


def _grouped(records: list[tuple]) -> list[tuple]:
    """Our records grouped into rrsets the way dnspython groups them."""
    groups: dict[tuple, list] = {}
    for owner, rdtype, ttl, rdata in records:
        group = groups.get((owner, rdtype))
        if group is None:
            group = groups[owner, rdtype] = [ttl, []]
        group[0] = min(group[0], ttl)
        if rdtype == dns_wire.SRV:
            p, w, port, target = rdata
            same = (p, w, port, b"".join(bytes((len(x),)) + x for x in target).lower())
            if same not in group[1]:
                group[1].append(same)
        elif rdtype in (dns_wire.CNAME, dns_wire.SOA):
            group[1] = [rdata]  # singletons: the last one wins
    return [(owner + b"\x00", rdtype, ttl, rds) for (owner, rdtype), (ttl, rds) in groups.items()]


def _theirs(rrsets: list[dns.rrset.RRset]) -> list[tuple]:
    out = []
    for rrset in rrsets:
        if rrset.rdtype == dns.rdatatype.SRV:
            rds = [(r.priority, r.weight, r.port, r.target.canonicalize().to_wire()[:-1])
                   for r in rrset]
        elif rrset.rdtype == dns.rdatatype.CNAME:
            rds = [rrset[0].target.canonicalize().to_wire()[:-1]]
        elif rrset.rdtype == dns.rdatatype.SOA:
            rds = [rrset[0].minimum]
        else:
            rds = []
        out.append((rrset.name.canonicalize().to_wire(), rrset.rdtype, rrset.ttl, rds))
    return out


def _decisions(ours: dns_wire.Response, theirs: dns.message.Message) -> None:
    for config in CONFIGS:
        router._RNG.seed(7)  # RFC 2782's weighted pick: the same draws for both
        fast = decide_srv_wire("example.test", ours, config)
        if fast is None:
            continue
        router._RNG.seed(7)
        assert fast == decide_srv("example.test", None, theirs, config)


def _agree(wire: bytes) -> dns_wire.Response | None:
    """decode(wire) is None, or it read what dnspython reads and decides the same."""
    ours = dns_wire.decode(wire)
    if ours is None:
        return None
    theirs = dns.message.from_wire(wire)  # accepted by us: dnspython must accept it too
    assert (ours.id, ours.flags, ours.rcode()) == (theirs.id, int(theirs.flags), theirs.rcode())
    assert not theirs.opt and not theirs.tsig and not ours.flags & dns.flags.TC
    (question,) = theirs.question
    assert ours.qname + b"\x00" == question.name.canonicalize().to_wire()
    assert (ours.qtype, ours.qclass) == (question.rdtype, question.rdclass)
    assert _grouped(ours.answer) == _theirs(theirs.answer)
    assert _grouped(ours.authority) == _theirs(theirs.authority)
    _decisions(ours, theirs)
    return ours


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses())
def test_decoded_responses_agree_with_dnspython(wire: bytes) -> None:
    _agree(wire)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_and_truncated_responses_are_declined_or_agree(wire: bytes) -> None:
    _agree(wire)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    _agree(data)
    _agree(b"\x12\x34\x81\x80\x00\x01" + data)  # a plausible header in front


def _bare(rcode: int = 0) -> dns.message.Message:
    r = dns.message.make_response(dns.message.make_query(QNAME, dns.rdatatype.SRV))
    r.set_rcode(rcode)
    return r


def test_the_everyday_answers_are_read_not_declined() -> None:
    """dnsmasq's shapes (one SRV; a bare NXDOMAIN), and NXDOMAIN with an SOA, a CNAME to an
    SRV, NODATA, SERVFAIL: what the cold path sees must take the fast road."""
    srv = _bare()
    srv.answer.append(_rrset(QNAME, 300, "SRV", f"0 5 25 {ONION_A}."))
    nx_soa = _bare(dns.rcode.NXDOMAIN)
    nx_soa.authority.append(_rrset("example.test.", 600, "SOA", "ns.test. h.test. 1 2 3 4 90"))
    chained = _bare()
    chained.answer.append(_rrset(QNAME, 50, "CNAME", "c1.example.test."))
    chained.answer.append(_rrset("C1.example.test.", 300, "SRV", f"1 0 25 {ONION_B}."))
    cases = [(srv, router.Route, 300.0), (_bare(dns.rcode.NXDOMAIN), router.NoRoute, 300.0),
             (nx_soa, router.NoRoute, 90.0), (chained, router.Route, 50.0),
             (_bare(), router.NoRoute, 300.0), (_bare(dns.rcode.SERVFAIL), router.TempFail, 0.0)]
    for message, kind, ttl in cases:
        ours = _agree(message.to_wire())
        assert ours is not None
        decision, got = decide_srv_wire("example.test", ours, CONFIGS[0])
        assert decision.__class__ is kind and got == ttl


@pytest.mark.parametrize("shape", ["edns", "tc", "long-chain", "escaped-target"])
def test_the_unusual_goes_to_dnspython_and_the_lookup_decides_the_same(shape: str) -> None:
    r = _bare()
    if shape == "edns":
        r.use_edns(0, dns.flags.DO, 1232)
    elif shape == "tc":
        r.flags |= dns.flags.TC
    elif shape == "long-chain":
        names = [QNAME] + [f"l{i}.example.test." for i in range(16)]
        for a, b in zip(names, names[1:], strict=False):
            r.answer.append(_rrset(a, 60, "CNAME", b))
        r.answer.append(_rrset(names[-1], 60, "SRV", f"0 0 25 {ONION_A}."))
    else:
        r.answer.append(_rrset(QNAME, 60, "SRV", "0 0 25 a\\032b.onion."))
    wire = r.to_wire()
    ours = dns_wire.decode(wire)
    if shape in ("edns", "tc"):
        assert ours is None
        return
    assert ours is not None and decide_srv_wire("example.test", ours, CONFIGS[0]) is None
    fast = SrvLookup("example.test", CONFIGS[0], [("127.0.0.1", 53)])
    fast.answered(ours)
    slow = SrvLookup("example.test", CONFIGS[0], [("127.0.0.1", 53)])
    slow.answered(dns.message.from_wire(wire))
    assert fast.outcome == slow.outcome and fast.outcome is not None


def _query(name: str) -> dns.message.Message:
    return dns.message.make_query(f"_onion-mx._tcp.{name}", dns.rdatatype.SRV)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_fast_query_table_resolves_exactly_what_the_dnspython_one_does(data) -> None:
    """Same ids, same datagrams (real answers, mutated, cut, replayed): the same questions
    resolve, and what each gives decides the same."""
    seed = data.draw(st.integers(0, 2**32))
    tables = [QueryTable(randbits=random.Random(seed).getrandbits, fast=fast)
              for fast in (False, True)]
    qs = {f"n{i}.test": _query(f"n{i}.test") for i in range(4)}
    for name in qs:
        for table in tables:
            qid, wire = table.add(qs[name].to_wire(), name)
        qs[name].id = qid
    for _ in range(data.draw(st.integers(1, 10))):
        name = data.draw(st.sampled_from(sorted(qs)))
        r = dns.message.make_response(qs[name])
        r.set_rcode(data.draw(st.sampled_from([0, 3, 2])))
        if data.draw(st.booleans()):
            r.answer.append(_rrset(r.question[0].name.to_text(), 60, "SRV",
                                   f"0 0 25 {data.draw(st.sampled_from(TARGETS))}"))
        wire = bytearray(r.to_wire())
        for _flip in range(data.draw(st.integers(0, 2))):
            wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
        wire = bytes(wire[:data.draw(st.integers(len(wire) - 3, len(wire)))])
        slow, fast = (table.receive(wire) for table in tables)
        assert (slow is None) == (fast is None)
        if slow is None:
            continue
        assert slow[0] == fast[0]
        domain = slow[0]
        outcomes = []
        for response in (slow[1], fast[1]):
            lookup = SrvLookup(domain, CONFIGS[0], [("127.0.0.1", 53)])
            router._RNG.seed(3)
            lookup.answered(response)
            outcomes.append((lookup.outcome, lookup.tcp))
        assert outcomes[0] == outcomes[1]
    assert len(tables[0]) == len(tables[1])


def test_a_late_clean_up_never_drops_the_question_that_reused_the_id() -> None:
    """An answered question's id is free at once; the next question may draw it before the
    first asker's clean-up (discard) runs: that clean-up must leave the new question alone."""
    for fast in (False, True):
        draws = iter([7, 7])
        table = QueryTable(randbits=lambda _bits, d=draws: next(d), fast=fast)
        first, second = _query("first.test"), _query("second.test")
        table.add(first, "first")
        answered = dns.message.make_response(first).to_wire()
        assert table.receive(answered)[0] == "first"
        table.add(second, "second")  # draws 7 again: free since the answer
        table.discard(7, "first")  # the first asker's late clean-up
        assert table.receive(dns.message.make_response(second).to_wire())[0] == "second"
