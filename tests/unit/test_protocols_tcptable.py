"""tcp_table(5) codec: %XX both ways, get/put lines, 200/400/500 replies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torroute.protocols import Lookup, Malformed
from torroute.protocols import tcptable as tt

ONION = "b" * 56 + ".onion"
keys = st.text(min_size=1, max_size=300).filter(lambda k: "\ufffd" not in k)


def test_encoding_matches_spec() -> None:
    assert tt.encode(b"a b%c\n\x7f\xff") == b"a%20b%25c%0A%7F%FF"
    assert tt.decode(b"a%20b%25c%0a%7F%fF") == b"a b%c\n\x7f\xff"
    assert tt.encode(b"user@example.org") == b"user@example.org"


@pytest.mark.parametrize("bad", [b"%", b"%4", b"%zz", b"a%g0", b"%%"])
def test_bad_escapes_raise_codec_error(bad: bytes) -> None:
    with pytest.raises(tt.TcpTableError):
        tt.decode(bad)


def test_get_parsed_replies_spec_forms() -> None:
    p = tt.TcpTableParser()
    assert p.feed(b"get user%40example.org\nget x@y\r\n") == [
        Lookup("user@example.org"),
        Lookup("x@y"),
    ]
    assert tt.found(f"torroute:[{ONION}]:25") == f"200 torroute:[{ONION}]:25\n".encode()
    assert tt.notfound() == b"500 not%20found\n"
    assert tt.temp("dns down") == b"400 dns%20down\n"
    assert tt.parse_reply(tt.temp("dns down")) == (400, "dns down")


def test_put_is_refused_with_400() -> None:
    (ev,) = tt.TcpTableParser().feed(tt.encode_put("a@b", "x"))
    assert isinstance(ev, Malformed) and ev.reply.startswith(b"400 ")


@pytest.mark.parametrize(
    "line", [b"GET a\n", b"get\n", b"get \n", b"get a b\n", b"get %4\n", b"\n", b"x\x00\n"]
)
def test_malformed_lines_get_400_and_stream_continues(line: bytes) -> None:
    p = tt.TcpTableParser()
    ev, ok = p.feed(line + b"get a@b\n")
    assert isinstance(ev, Malformed) and not ev.close and ev.reply.startswith(b"400 ")
    assert ok == Lookup("a@b")


def test_oversized_line_one_error_then_resync() -> None:
    p = tt.TcpTableParser(max_request=50)
    evs = p.feed(b"get " + b"a" * 100)
    evs += p.feed(b"a" * 100)
    evs += p.feed(b"aaa\nget x@y\n")
    assert len(evs) == 2
    assert isinstance(evs[0], Malformed) and evs[1] == Lookup("x@y")


@pytest.mark.parametrize("value", ["a b", "x\nstuff", "%0A", "", "ä", "200 x"])
def test_found_refuses_unsafe_values(value: str) -> None:
    with pytest.raises(tt.TcpTableError):
        tt.found(value)


@given(st.binary())
def test_encode_decode_round_trip(data: bytes) -> None:
    enc = tt.encode(data)
    assert all(0x21 <= b < 0x7F for b in enc)
    assert tt.decode(enc) == data


@given(keys)
def test_get_round_trip(key: str) -> None:
    assert tt.TcpTableParser(max_request=10000).feed(tt.encode_get(key)) == [Lookup(key)]


@given(st.text())
def test_replies_are_one_clean_line(reason: str) -> None:
    for line in (tt.temp(reason), tt.notfound(reason)):
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert all(0x21 <= b < 0x7F for b in line[4:-1])
        assert len(line) <= tt.MAX_REPLY


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_arbitrary_bytes_only_events(chunks: list[bytes]) -> None:
    p = tt.TcpTableParser(max_request=128)
    for chunk in chunks:
        for ev in p.feed(chunk):
            if isinstance(ev, Malformed):
                assert ev.reply.startswith(b"400 ") and ev.reply.count(b"\n") == 1
            else:
                assert isinstance(ev, Lookup) and ev.key
    assert p.eof() == []


@given(st.binary(max_size=100))
def test_parse_reply_raises_only_codec_error(data: bytes) -> None:
    try:
        tt.parse_reply(data)
    except tt.TcpTableError:
        pass
