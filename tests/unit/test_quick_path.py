"""The daemon's quick path: one plain lookup decided without I/O skips the parser.

``quick_domain`` (tcp_table, socketmap) must only ever answer for input that ``feed`` would
parse as exactly one Lookup of a key ending in that domain part, and
``Router.decide_now_wire`` must only ever give the decision ``decide_now`` gives for such a
key (static or cached).  Both are checked against the full path on generated, mutated and
arbitrary input; then a real daemon on loopback answers the same bytes, counts and log lines
either way.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from support.onions import ONION_A, ONION_B

from torroute.config import Config
from torroute.daemon.service import LookupDaemon
from torroute.daemon.settings import ServeSettings
from torroute.endpoint import Endpoint
from torroute.protocols import Lookup, socketmap, tcptable
from torroute.routing.decisions import Route
from torroute.routing.router import Router
from torroute.testing.ports import free_port

PLAIN = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]*")

# domain parts that exercise every branch of destination_domain and decide_static
DOMAINS = ["pinned.test", "PINNED.test", "pinned.test.", "sub.wild.test", "local.test",
           "ignored.test", "unknown.test", "srv.test", "SRV.test.", ONION_A, ONION_A.upper(),
           "x" * 56 + ".onion",
           "[127.0.0.1]", " pinned.test", "pinned.test ", "\x1fpinned.test", "pin ned.test",
           "pinned.test\u0085", "", "*", ".", "-a.test", "a..test", "é.test", "a" * 260]
users = st.text(max_size=12)
domains = st.one_of(st.sampled_from(DOMAINS), st.text(max_size=20),
                    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True))
keys = st.builds(lambda u, at, d: f"{u}{at}{d}", users, st.sampled_from(["@", "", "@@"]), domains)


def tcp_lines() -> st.SearchStrategy[bytes]:
    raw = st.builds(lambda k: b"get " + k.encode("utf-8", "surrogatepass") + b"\n", keys)
    encoded = keys.map(lambda k: tcptable.encode_get(k) if k else b"get \n")
    mutated = st.builds(lambda line, cut, extra: line[:cut] + extra + line[cut:],
                        st.one_of(raw, encoded), st.integers(0, 40),
                        st.sampled_from([b"", b"\r", b"%", b"%4", b" ", b"\n", b"get ", b"\x00"]))
    return st.one_of(raw, encoded, mutated, st.binary(max_size=40))


def socketmap_requests() -> st.SearchStrategy[bytes]:
    names = st.sampled_from(["transport", "t", "", "a b"])
    good = st.builds(lambda n, k: socketmap.encode_netstring(
        n.encode() + b" " + k.encode("utf-8", "surrogatepass")), names, keys)
    mutated = st.builds(lambda req, cut, extra: req[:cut] + extra + req[cut:], good,
                        st.integers(0, 40),
                        st.sampled_from([b"", b",", b"0", b":", b" ", b"\r", b"\x00", b"1"]))
    return st.one_of(good, mutated, st.binary(max_size=40))


def check_quick(parser, data: bytes) -> None:
    """Whatever quick_domain says, feed agrees (and quick_domain consumed nothing)."""
    domain = parser.quick_domain(data)
    events = parser.feed(data)
    if domain is None:
        return
    assert len(events) == 1 and isinstance(events[0], Lookup), (data, events)
    assert b"@" not in domain
    key = events[0].key
    assert key.rpartition("@")[2] == domain.decode("utf-8", "replace")
    assert parser.feed(b"") == []  # nothing was left buffered


@settings(max_examples=600)
@given(tcp_lines())
def test_tcp_table_quick_domain_agrees_with_the_parser(data: bytes) -> None:
    check_quick(tcptable.TcpTableParser(200), data)


@settings(max_examples=600)
@given(socketmap_requests())
def test_socketmap_quick_domain_agrees_with_the_parser(data: bytes) -> None:
    check_quick(socketmap.SocketmapParser(200), data)


def test_quick_domain_takes_the_plain_forms_and_declines_the_rest() -> None:
    tp = tcptable.TcpTableParser(100)
    assert tp.quick_domain(b"get user@Pinned.test\n") == b"Pinned.test"
    assert tp.quick_domain(b"get pinned.test\n") == b"pinned.test"
    assert tp.quick_domain(b"get a@b@c.test\n") == b"c.test"
    for declined in (b"get user%40x.test\n", b"get x.test\r\n", b"get x.test\nget y\n",
                     b"get x.test", b"put x.test\n", b"get \n", b"get " + b"a" * 100 + b"\n"):
        assert tp.quick_domain(declined) is None, declined
    tp.feed(b"get partial")  # something buffered: the parser decides
    assert tp.quick_domain(b"@x.test\n") is None
    sp = socketmap.SocketmapParser(100)
    assert sp.quick_domain(socketmap.encode_request("transport", "u@x.test")) == b"x.test"
    for declined in (b"10:transport,", b"05:t x.t,", b"3:t x,,", b"4:t x,", b"3:t x",
                     b"6:t x\ry,", b"3:t x,3:t y,"):
        assert sp.quick_domain(declined) is None, declined
    sp.feed(b"3:t")
    assert sp.quick_domain(b" x,") is None


def make_router(tmp_path: Path, onion: str = ONION_A) -> Router:
    tmp_path.mkdir(exist_ok=True)
    map_yml = tmp_path / "map.yml"
    map_yml.write_text(f"---\n{onion}:\n  - pinned.test\n  - sub.wild.test\n")
    bad = tmp_path / "bad.yml"
    bad.write_text("---\nnot-an-onion.onion:\n  - badpin.test\n")
    router = Router.from_config(Config(maps=[map_yml, bad], nameservers=[("127.0.0.1", 1)],
                                       local_domains=["local.test"],
                                       ignore_domains=["ignored.test"]))
    router.cache.put("srv.test", Route("srv.test", ONION_B, 2525, "srv"), 3600)  # as DNS gave
    return router


ROUTERS: dict[str, Router] = {}


@settings(max_examples=600, deadline=None)
@given(keys)
def test_decide_now_wire_agrees_with_decide_now(tmp_path_factory, key: str) -> None:
    if "r" not in ROUTERS:
        ROUTERS["r"] = make_router(tmp_path_factory.mktemp("maps"))
    router = ROUTERS["r"]
    raw = key.encode("utf-8", "surrogatepass")
    domain = raw[raw.rfind(b"@") + 1 :]
    quick = router.decide_now_wire(domain)
    if quick is not None:
        assert PLAIN.fullmatch(domain)
        assert quick == router.decide_now(key)
    elif PLAIN.fullmatch(domain):  # a plain name is only declined when it needs DNS
        assert router.decide_now(key) is None


def test_decide_now_wire_answers_pins_and_forgets_them_with_the_pins(tmp_path: Path) -> None:
    router = make_router(tmp_path)
    route = router.decide_now_wire(b"PINNED.test.")
    assert route is not None and route.onion == ONION_A
    assert router.decide_now_wire(b"sub.wild.test").onion == ONION_A
    assert router.decide_now_wire(b"local.test").kind == "noroute"
    assert router.decide_now_wire(b"badpin.test").kind == "tempfail"  # never SRV
    assert router.decide_now_wire(b"unknown.test") is None  # DNS decides
    assert router.decide_now_wire(b"unknown.test") is None  # ... every time
    assert router.decide_now_wire(b"SRV.test.").port == 2525  # a cached SRV decision
    router.cache.clear()  # expired or dropped: DNS decides again
    assert router.decide_now_wire(b"srv.test") is None
    router.reload(make_router(tmp_path / "b", ONION_B).config)
    assert router.decide_now_wire(b"PINNED.test.").onion == ONION_B
    router.pins = make_router(tmp_path, ONION_A).pins
    assert router.decide_now_wire(b"pinned.test").onion == ONION_A


def test_daemon_answers_the_same_through_either_path(tmp_path: Path, daemon_records) -> None:
    """One request per write takes the quick path; the same requests in one write take the
    parser's: same replies, same counts, one decision line each; a reload re-routes both."""
    router = make_router(tmp_path)
    tport = free_port()
    sock = tmp_path / "socketmap.sock"
    settings_ = ServeSettings(listeners={
        "tcp_table": (Endpoint("inet", "127.0.0.1", tport),),
        "socketmap": (Endpoint("unix", path=str(sock)),)})
    daemon = LookupDaemon(router.config, settings_, router=router,
                          reload_config=lambda: make_router(tmp_path / "b", ONION_B).config)
    keys_ = ["u1@pinned.test", "u2@PINNED.test", "pinned.test", "u3@sub.wild.test",
             "u4@local.test", f"u5@{ONION_A}", "u6@badpin.test", "*", "u%7@pinned.test",
             "u 8@pinned.test", "u9@srv.test"]
    tcp = [tcptable.encode_get(k) for k in keys_]
    smap = [socketmap.encode_request("transport", k) for k in keys_]

    async def exchange(reader, writer, requests: list[bytes], together: bool,
                       read) -> list[bytes]:
        if together:
            writer.write(b"".join(requests))
        answers = []
        for req in requests:
            if not together:
                writer.write(req)
            answers.append(await read(reader))
        return answers

    async def read_netstring(reader) -> bytes:
        head = await reader.readuntil(b":")
        return head + await reader.readexactly(int(head[:-1]) + 1)

    async def main() -> dict:
        await daemon.start()
        try:
            out = {}
            tr, tw = await asyncio.open_connection("127.0.0.1", tport)
            sr, sw = await asyncio.open_unix_connection(str(sock))
            for together in (False, True, False):
                out["tcp", together] = await exchange(tr, tw, tcp, together,
                                                      lambda r: r.readline())
                out["smap", together] = await exchange(sr, sw, smap, together, read_netstring)
            assert daemon.reload()
            out["tcp", "reloaded"] = await exchange(tr, tw, tcp[:1], False,
                                                    lambda r: r.readline())
            out["smap", "reloaded"] = await exchange(sr, sw, smap[:1], True, read_netstring)
            tw.close()
            sw.close()
            return out
        finally:
            await daemon.stop()

    out = asyncio.run(main())
    assert any(isinstance(k, bytes) for k in router._static)  # the quick path was taken
    assert out["tcp", False] == out["tcp", True]
    assert out["smap", False] == out["smap", True]
    first = out["tcp", False]
    assert first[0] == f"200 torroute:[{ONION_A}]:25\n".encode()
    assert first[1] == first[2] == first[3] == first[0]
    assert first[4].startswith(b"500 ") and first[7].startswith(b"500 ")
    assert first[6].startswith(b"400 ")  # the broken pin defers, never SRV
    assert first[10] == f"200 torroute:[{ONION_B}]:2525\n".encode()  # the cached SRV answer
    assert out["tcp", "reloaded"] == [f"200 torroute:[{ONION_B}]:25\n".encode()]
    assert out["smap", "reloaded"][0].endswith(f"OK torroute:[{ONION_B}]:25,".encode())
    # 3 rounds of 11 keys per protocol (8 routes, 5 of them to pinned.test), one after the
    # reload
    lines = [r.getMessage() for r in daemon_records.records if "decision proto=" in
             r.getMessage()]
    tcp_lines = [m for m in lines if "proto=tcp_table" in m]
    assert len([m for m in tcp_lines if "domain=pinned.test result=route" in m]) == 3 * 5 + 1
    counts = daemon.lookups["tcp_table"]
    assert counts["route"] == 3 * 8 + 1 and counts["tempfail"] == 3
    assert daemon.lookups["socketmap"]["route"] == counts["route"]
