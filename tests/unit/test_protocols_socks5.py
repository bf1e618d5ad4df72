"""SOCKS5 client machine for tor (pure): the bytes it sends, replies it parses, and hypothesis
for robustness (any server bytes, any chunking)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torroute.protocols import ProtocolError
from torroute.protocols.socks5 import (
    SOCKS_REPLIES,
    Socks5Client,
    Socks5RequestError,
    describe,
    socks_error,
)

CONNECT_AB = b"\x05\x01\x00\x03\x08ab.onion\x00\x19"


def run(client: Socks5Client, reply: bytes, chunks: list[int] | None = None) -> bytes:
    """Feed ``reply`` as a driver would (at most ``want`` bytes at a time, cut further by
    ``chunks``); returns everything the client asked to send after the initial write."""
    sent = b""
    sizes = iter(chunks or [])
    while reply and not client.done:
        size = min(client.want, next(sizes, client.want) or 1)
        sent += client.feed(reply[:size])
        reply = reply[size:]
    if reply:
        client.feed(reply)
    return sent


def test_request_bytes() -> None:
    assert Socks5Client("ab.onion", 25).initial() == b"\x05\x01\x00"
    assert Socks5Client("ab.onion", 25, b"u", b"p").initial() == b"\x05\x01\x02"
    client = Socks5Client("ab.onion", 25)
    assert client.feed(b"\x05\x00") == CONNECT_AB  # CONNECT by name: tor resolves it
    client = Socks5Client("ab.onion", 25, b"torroute:ab.onion", b"torroute")
    assert client.feed(b"\x05\x02") == b"\x01\x11torroute:ab.onion\x08torroute"
    assert client.feed(b"\x01\x00") == CONNECT_AB


def test_pipelined_request_is_one_write() -> None:
    """What the testnet probe sends: greeting + CONNECT together, nothing more later."""
    client = Socks5Client("ab.onion", 25, pipeline=True)
    assert client.initial() == b"\x05\x01\x00\x05\x01\x00\x03\x08ab.onion\x00\x19"
    assert client.feed(b"\x05\x00\x05\xf0\x00\x01") == b""
    assert client.failure is not None and client.failure.code == 0xF0
    client = Socks5Client("ab.onion", 25, pipeline=True)
    client.feed(b"\x05\x00\x05")
    assert not client.done  # incomplete: no code yet
    client = Socks5Client("ab.onion", 25, pipeline=True)
    client.feed(b"\x05\xff")
    assert client.failure is not None and client.failure.code is None  # method refused


@pytest.mark.parametrize("head,total", [
    (b"\x05\x00\x00\x01", 10), (b"\x05\x00\x00\x04", 22), (b"\x05\x00\x00\x03\x05", 12)])
def test_reply_size_by_address_type(head: bytes, total: int) -> None:
    client = Socks5Client("ab.onion", 25)
    client.feed(b"\x05\x00")
    client.feed(head)
    assert len(head) + client.want == total
    client.feed(b"\x00" * (client.want - 1))
    assert not client.done and client.want == 1
    client.feed(b"\x00" + b"early data")
    assert client.connected and client.extra == b"early data"
    assert len(client.bound) == total - 3


@pytest.mark.parametrize("reply,detail", [
    (b"\x04\x00", "method"), (b"\x05\xff", "method"), (b"\x05\x00\x04\x00\x00\x01", "not a SOCKS5"),
    (b"\x05\x00\x05\x00\x00\x07", "address type 7")])
def test_garbage_is_a_failure_without_code(reply: bytes, detail: str) -> None:
    client = Socks5Client("ab.onion", 25)
    client.feed(reply)
    assert client.done and not client.connected
    assert client.failure.code is None and detail in str(client.failure)
    assert client.failure.temporary  # garbage defers


def test_refusal_known_from_four_bytes_and_eof() -> None:
    client = Socks5Client("ab.onion", 25)
    client.feed(b"\x05\x00\x05\xf6\x00\x01")
    assert client.failure.code == 0xF6 and not client.failure.temporary
    client = Socks5Client("ab.onion", 25)
    client.feed(b"\x05\x00\x05")
    client.eof()
    assert client.failure.code is None and "closed" in str(client.failure)


def test_unencodable_requests_raise_the_codec_error() -> None:
    for host in ("", "x" * 256, "bücher.onion"):
        with pytest.raises(Socks5RequestError):
            Socks5Client(host, 25)
    with pytest.raises(Socks5RequestError):
        Socks5Client("ab.onion", 65536)
    assert issubclass(Socks5RequestError, ProtocolError)


def test_describe_uses_tors_table() -> None:
    assert describe(0xF6, "x.onion:25") == ("x.onion:25: invalid onion address (SOCKS reply 0xf6)",
                                            False)
    message, temporary = describe(0x99, "d")
    assert temporary and "unknown SOCKS reply code 0x99" in message
    assert describe(None, "d", "why") == ("SOCKS connect to d failed: why", True)
    assert {code for code, (_, temp) in SOCKS_REPLIES.items() if not temp} == {0xF4, 0xF5, 0xF6}
    assert socks_error(0xF0, "x:1").temporary and not socks_error(0xF4, "x:1").temporary


@given(st.binary(max_size=64), st.lists(st.integers(1, 8), max_size=20), st.booleans(),
       st.booleans())
def test_any_server_bytes_never_crash(reply: bytes, chunks: list[int], auth: bool,
                                      pipeline: bool) -> None:
    client = Socks5Client("ab.onion", 25, b"u" if auth else None, b"p", pipeline=pipeline)
    client.initial()
    sent = run(client, reply, chunks)
    assert not (pipeline and sent)
    if client.done:
        assert client.connected != (client.failure is not None) and client.want == 0
    else:
        assert client.want > 0
        client.eof()
        assert client.failure is not None and client.failure.code is None


addresses = st.one_of(
    st.binary(min_size=4, max_size=4).map(lambda a: b"\x01" + a),
    st.binary(min_size=16, max_size=16).map(lambda a: b"\x04" + a),
    st.binary(max_size=255).map(lambda a: b"\x03" + bytes([len(a)]) + a))


@given(addresses, st.binary(min_size=2, max_size=2), st.booleans(), st.booleans(),
       st.lists(st.integers(1, 8), max_size=20), st.binary(max_size=16))
def test_a_valid_reply_always_parses(address: bytes, bound_port: bytes, auth: bool,
                                     pipeline: bool, chunks: list[int], early: bytes) -> None:
    client = Socks5Client("ab.onion", 25, b"u" if auth else None, b"p", pipeline=pipeline)
    client.initial()
    reply = (b"\x05\x02\x01\x00" if auth else b"\x05\x00") + b"\x05\x00\x00" + address + \
        bound_port
    run(client, reply + early, chunks)
    assert client.connected and client.failure is None
    assert client.bound == address + bound_port and client.extra == early


@given(st.sampled_from(sorted(SOCKS_REPLIES) + [0x09, 0x99, 0xFF]), st.booleans())
def test_any_refusal_carries_its_code(code: int, auth: bool) -> None:
    client = Socks5Client("ab.onion", 25, b"u" if auth else None)
    run(client, (b"\x05\x02\x01\x00" if auth else b"\x05\x00") + bytes([5, code, 0, 1]))
    assert client.failure is not None and client.failure.code == code
    assert client.failure.temporary == SOCKS_REPLIES.get(code, ("", True))[1]
