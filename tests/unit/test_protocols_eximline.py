"""torroute's Exim line protocol: `route <name>` -> one answer line."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torroute.protocols import (
    Lookup,
    Malformed,
    ProtocolError,
    check_template,
    postfix_value,
    sanitize_reason,
)
from torroute.protocols import eximline as ex

names = st.text(
    st.characters(min_codepoint=0x21, blacklist_characters="\x7f", blacklist_categories=["Cs"]),
    min_size=1,
    max_size=200,
).filter(lambda k: "\ufffd" not in k and k.strip() == k and all(c.isprintable() for c in k))


def test_request_and_answers() -> None:
    p = ex.EximLineParser()
    assert p.feed(b"route example.org\nroute u@x.test\r\n") == [
        Lookup("example.org"),
        Lookup("u@x.test"),
    ]
    assert ex.found(ipaddress.IPv4Address("127.192.0.7"), 25) == b"127.192.0.7::25\n"
    assert ex.notfound() == b"\n"
    assert ex.temp("tor down") == b"temp tor down\n"
    assert ex.parse_answer(b"127.192.0.7::25\n") == ("found", "127.192.0.7::25")
    assert ex.parse_answer(b"\n") == ("notfound", "")
    assert ex.parse_answer(b"temp tor down\n") == ("temp", "tor down")


def test_unterminated_last_line_at_eof_is_answered() -> None:
    p = ex.EximLineParser()
    assert p.feed(b"route example.org") == []
    assert p.eof() == [Lookup("example.org")]


@pytest.mark.parametrize(
    "line", [b"\n", b"route\n", b"route \n", b"lookup x\n", b"route a\x00b\n", b"route a b\n"]
)
def test_malformed_gives_error_line(line: bytes) -> None:
    p = ex.EximLineParser()
    ev, ok = p.feed(line + b"route ok.test\n")
    assert isinstance(ev, Malformed) and ev.reply.startswith(b"error ")
    assert ok == Lookup("ok.test")


@pytest.mark.parametrize(
    "ip,port", [("::1", 25), ("1.2.3", 25), ("127.0.0.1", 0), ("1.2.3.4", 70000)]
)
def test_found_refuses_bad_values(ip: str, port: int) -> None:
    with pytest.raises(ex.EximLineError):
        ex.found(ip, port)


@given(names)
def test_round_trip(name: str) -> None:
    assert ex.EximLineParser(max_request=10000).feed(ex.encode_request(name)) == [Lookup(name)]


@given(st.text())
def test_temp_is_one_safe_line(reason: str) -> None:
    line = ex.temp(reason)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert all(0x20 <= b < 0x7F and b != 0x25 for b in line[:-1])
    assert ex.parse_answer(line)[0] == "temp"


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_arbitrary_bytes_only_events(chunks: list[bytes]) -> None:
    p = ex.EximLineParser(max_request=128)
    events = []
    for chunk in chunks:
        events += p.feed(chunk)
    events += p.eof()
    for ev in events:
        if isinstance(ev, Malformed):
            assert ex.parse_answer(ev.reply)[0] == "error"
        else:
            assert isinstance(ev, Lookup)
            assert not any(c in ev.key for c in " \t\r\n\x00")


@given(st.binary(max_size=60))
def test_parse_answer_raises_only_codec_error(data: bytes) -> None:
    try:
        ex.parse_answer(data)
    except ex.EximLineError:
        pass


def test_postfix_templates() -> None:
    onion = "c" * 56 + ".onion"
    assert postfix_value("torroute", "torroute", onion, 25) == f"torroute:[{onion}]:25"
    assert postfix_value("onionmx", "x", onion, 25) == f"smtptor:[{onion}]"
    assert postfix_value("onionmx", "x", onion, 2525) == f"smtptor:[{onion}]:2525"
    assert check_template("relay:[{onion}]:{port}") == "relay:[{onion}]:{port}"
    for bad in ["x:{host}", "no-onion:{port}", "a b:[{onion}]", "{onion.__class__}"]:
        with pytest.raises(ProtocolError):
            check_template(bad)


@given(st.text())
def test_sanitize_reason(reason: str) -> None:
    out = sanitize_reason(reason)
    assert out and len(out) <= 200
    assert all(0x20 <= ord(c) < 0x7F and c != "%" for c in out)
