"""socketmap_table(5) codec: netstrings, requests, replies; hypothesis for robustness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torroute.protocols import Lookup, Malformed, ProtocolError
from torroute.protocols import socketmap as sm

ONION = "a" * 56 + ".onion"
names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)
keys = st.text(min_size=1, max_size=300).filter(
    lambda k: not any(c in k for c in "\x00\r\n") and "\ufffd" not in k
)


def test_netstring_encoding_matches_spec() -> None:
    assert sm.encode_netstring(b"hello world!") == b"12:hello world!,"
    assert sm.encode_netstring(b"") == b"0:,"
    assert sm.decode_netstring(b"3:abc,rest") == (b"abc", b"rest")
    assert sm.decode_netstring(b"3:ab") is None
    assert sm.decode_netstring(b"12") is None


@pytest.mark.parametrize(
    "bad", [b"x:abc,", b"3:abcd", b"-1:,", b"03:abc,", b":abc,", b"99999999999", b"1a:b,"]
)
def test_malformed_netstrings_raise_codec_error(bad: bytes) -> None:
    with pytest.raises(sm.NetstringError):
        sm.decode_netstring(bad)


def test_request_parsed_and_replies_are_spec_forms() -> None:
    p = sm.SocketmapParser()
    assert p.feed(sm.encode_request("transport", "user@example.org")) == [
        Lookup("user@example.org", "transport")
    ]
    assert sm.found(f"torroute:[{ONION}]:25") == b"%d:OK torroute:[%s]:25," % (
        len(ONION) + 17,
        ONION.encode(),
    )
    assert sm.notfound() == b"9:NOTFOUND ,"
    assert sm.temp("dns timeout") == b"16:TEMP dns timeout,"


def test_key_with_spaces_kept_whole() -> None:
    # Quoted local parts may contain spaces; only the first space separates name and key.
    p = sm.SocketmapParser()
    assert p.feed(sm.encode_request("t", '"a b"@example.org')) == [Lookup('"a b"@example.org', "t")]


def test_oversized_request_is_perm_and_close() -> None:
    p = sm.SocketmapParser(max_request=100)
    (ev,) = p.feed(b"101:")
    assert isinstance(ev, Malformed) and ev.close
    assert sm.decode_netstring(ev.reply, 1000)[0].startswith(b"PERM ")
    assert p.feed(sm.encode_request("t", "a@b")) == []  # dead stream stays dead


def test_missing_key_is_perm_but_stream_continues() -> None:
    p = sm.SocketmapParser()
    evs = p.feed(sm.encode_netstring(b"transport") + sm.encode_request("t", "x@y"))
    assert isinstance(evs[0], Malformed) and not evs[0].close
    assert evs[1] == Lookup("x@y", "t")


@pytest.mark.parametrize("value", ["a b", "x\r\nOK y", "%41", "a,b", "", "x\x00", "[a]:25 x", "ä"])
def test_found_refuses_unsafe_values(value: str) -> None:
    with pytest.raises(sm.NetstringError):
        sm.found(value)


@given(st.text())
def test_temp_reason_never_leaks_control_chars(reason: str) -> None:
    payload, rest = sm.decode_netstring(sm.temp(reason), 1000)
    assert rest == b""
    assert payload.startswith(b"TEMP ")
    assert all(0x20 <= b < 0x7F and b != 0x25 for b in payload)
    assert b"  " not in payload[5:]


@given(names, keys)
def test_round_trip(name: str, key: str) -> None:
    p = sm.SocketmapParser(max_request=10000)
    assert p.feed(sm.encode_request(name, key)) == [Lookup(key, name)]


@given(st.lists(st.tuples(names, keys), min_size=1, max_size=5), st.data())
def test_round_trip_any_chunking(reqs: list[tuple[str, str]], data: st.DataObject) -> None:
    wire = b"".join(sm.encode_request(n, k) for n, k in reqs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    p = sm.SocketmapParser(max_request=10000)
    events = []
    prev = 0
    for c in [*cuts, len(wire)]:
        events += p.feed(wire[prev:c])
        prev = c
    assert events == [Lookup(k, n) for n, k in reqs]


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_arbitrary_bytes_only_events(chunks: list[bytes]) -> None:
    p = sm.SocketmapParser(max_request=256)
    for chunk in chunks:
        for ev in p.feed(chunk):
            assert isinstance(ev, Lookup | Malformed)
            if isinstance(ev, Malformed):
                payload, rest = sm.decode_netstring(ev.reply, 1000)
                assert payload.startswith(b"PERM ") and rest == b""
            else:
                assert len(ev.key.encode()) <= 256
    assert p.eof() == []


@given(st.binary(max_size=100))
def test_decode_netstring_raises_only_codec_error(data: bytes) -> None:
    try:
        sm.decode_netstring(data)
    except ProtocolError:
        pass


@given(st.binary(max_size=100))
def test_parse_reply_raises_only_codec_error(data: bytes) -> None:
    try:
        status, _ = sm.parse_reply(data)
    except sm.NetstringError:
        return
    assert status in {"OK", "NOTFOUND", "TEMP", "TIMEOUT", "PERM"}
