"""The onion round trip on the private Tor network: real tor client, real onion service, real
SMTP sink; the dialers, the automap path and tor's extended errors, measured for real."""

from __future__ import annotations

import asyncio
import ipaddress
import smtplib
import socket
import subprocess
import sys
import time

import pytest
from support.onions import make_onion

from torroute.errors import InvalidOnion, PermanentSocksError, TemporarySocksError
from torroute.tor.automap import aresolve_automap, resolve_automap
from torroute.tor.dial import adial, dial

pytestmark = pytest.mark.testnet

VIRTUAL = ipaddress.ip_network("127.192.0.0/10")
UNKNOWN_ONION = make_onion(4242)  # well formed, valid key, never published here


def bad_checksum(onion: str) -> str:
    """Same key, one checksum character changed: tor answers 0xF6 (invalid address)."""
    body = onion.removesuffix(".onion")
    swapped = "a" if body[53] != "a" else "b"
    return body[:53] + swapped + body[54:] + ".onion"


class TorSMTP(smtplib.SMTP):
    """smtplib over a torroute.tor.dial connection (what a Python MTA-side user would write)."""

    def __init__(self, proxy: tuple[str, int], **kwargs) -> None:
        self.proxy = proxy
        super().__init__(**kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return dial(host, port, proxy=self.proxy, timeout=timeout)


MESSAGE = (b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: over tor\r\n"
           b"Message-ID: <%s@sender.test>\r\n\r\nhello through the onion\r\n")


def test_torroute_dial_cli_reads_the_banner(testnet, onion_sink) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torroute.cli", "dial", onion_sink.onion, "25",
         "--tor-socks", "{}:{}".format(*testnet.socks_extended), "--timeout", "30"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("220 sink.testnet.invalid")


@pytest.mark.parametrize("case", ["unknown", "bad-checksum"])
def test_torroute_dial_cli_failures_exit_codes(testnet, case) -> None:
    target = UNKNOWN_ONION if case == "unknown" else bad_checksum(testnet.onion)
    proc = subprocess.run(
        [sys.executable, "-m", "torroute.cli", "dial", target, "25",
         "--tor-socks", "{}:{}".format(*testnet.socks_extended), "--timeout", "30"],
        capture_output=True, text=True, timeout=60)
    # unknown onion: defer (75); bad checksum: bad data (65), refused before asking tor
    assert proc.returncode == (75 if case == "unknown" else 65), proc.stderr


def test_sync_dial_smtp_transaction(testnet, onion_sink) -> None:
    with TorSMTP(testnet.socks, timeout=30) as smtp:
        code, banner = smtp.connect(onion_sink.onion, 25)
        assert code == 220 and banner.startswith(b"sink.testnet.invalid")
        smtp.ehlo("sender.test")
        refused = smtp.sendmail("alice@sender.test", ["bob@example.test"], MESSAGE % b"sync")
        assert refused == {}
    (received,) = onion_sink.sink.wait_for(1)
    assert received.mail_from == "alice@sender.test"
    assert received.rcpt_tos == ["bob@example.test"]
    assert received.message["Subject"] == "over tor"
    stored = onion_sink.sink.path_of(received).read_bytes()
    assert b"hello through the onion" in stored and b"Return-Path: <alice@sender.test>" in stored


async def smtp_transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           tag: bytes) -> list[bytes]:
    """EHLO/MAIL/RCPT/DATA/QUIT by hand; returns the reply lines' first lines."""
    replies = []

    async def reply() -> bytes:
        first = line = await reader.readline()
        while line[3:4] == b"-":
            line = await reader.readline()
        replies.append(first)
        return first

    await reply()
    for command in (b"EHLO sender.test", b"MAIL FROM:<alice@sender.test>",
                    b"RCPT TO:<carol@example.test>", b"DATA"):
        writer.write(command + b"\r\n")
        await writer.drain()
        await reply()
    writer.write(MESSAGE % tag + b".\r\n")
    await reply()
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()
    await writer.wait_closed()
    return replies


def test_async_dial_smtp_transaction(testnet, onion_sink) -> None:
    async def main() -> list[bytes]:
        reader, writer = await adial(onion_sink.onion, 25, proxy=testnet.socks_extended,
                                     timeout=30)
        return await smtp_transaction(reader, writer, b"async")

    replies = asyncio.run(main())
    assert [r[:3] for r in replies] == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    (received,) = onion_sink.sink.wait_for(1)
    assert received.rcpt_tos == ["carol@example.test"]
    assert b"<async@sender.test>" in received.data


def test_automap_then_socks_to_the_virtual_ip(testnet, onion_sink) -> None:
    """The Exim path: DNSPort gives the onion a 127.192/10 address; SOCKS to that IP."""
    address = resolve_automap(onion_sink.onion, testnet.dns)
    assert address in VIRTUAL
    assert asyncio.run(aresolve_automap(onion_sink.onion, testnet.dns)) == address
    with dial(str(address), 25, proxy=testnet.socks, timeout=30) as sock:
        sock.settimeout(30)
        assert sock.makefile("rb").readline().startswith(b"220 sink.testnet.invalid")

    async def main() -> list[bytes]:
        reader, writer = await adial(str(address), 25, proxy=testnet.socks_extended,
                                     timeout=30)
        return await smtp_transaction(reader, writer, b"automap")

    replies = asyncio.run(main())
    assert replies[-2][:3] == b"250"
    (received,) = onion_sink.sink.wait_for(1)
    assert b"<automap@sender.test>" in received.data


def test_unknown_onion_is_0xf0_temporary(testnet) -> None:
    started = time.monotonic()
    with pytest.raises(TemporarySocksError) as info:
        dial(UNKNOWN_ONION, 25, proxy=testnet.socks_extended, timeout=30)
    assert info.value.code == 0xF0 and info.value.temporary
    assert time.monotonic() - started < 20  # tor answers; no hang until our timeout
    # the plain SocksPort says only "host unreachable": still temporary
    with pytest.raises(TemporarySocksError) as plain:
        dial(UNKNOWN_ONION, 25, proxy=testnet.socks, timeout=30)
    assert plain.value.code == 0x04


def test_unknown_onion_async_is_0xf0_temporary(testnet) -> None:
    with pytest.raises(TemporarySocksError) as info:
        asyncio.run(adial(UNKNOWN_ONION, 25, proxy=testnet.socks_extended, timeout=30))
    assert info.value.code == 0xF0


def test_bad_checksum_is_0xf6_permanent(testnet) -> None:
    bad = bad_checksum(testnet.onion)
    with pytest.raises(InvalidOnion):  # validated before asking tor
        dial(bad, 25, proxy=testnet.socks_extended, timeout=30)
    with pytest.raises(PermanentSocksError) as info:  # what tor itself answers
        dial(bad, 25, proxy=testnet.socks_extended, timeout=30, validate=False)
    assert info.value.code == 0xF6 and not info.value.temporary
    with pytest.raises(PermanentSocksError) as ainfo:
        asyncio.run(adial(bad, 25, proxy=testnet.socks_extended, timeout=30, validate=False))
    assert ainfo.value.code == 0xF6
    # without ExtendedErrors tor says "general failure": all a client can do is defer
    with pytest.raises(TemporarySocksError) as plain:
        dial(bad, 25, proxy=testnet.socks, timeout=30, validate=False)
    assert plain.value.code == 0x01


def test_sink_refusals_travel_through_the_onion(testnet, onion_sink) -> None:
    onion_sink.sink.reject("gone@example.test", "550 5.1.1 no such user")
    onion_sink.sink.reject("later@example.test", "451 4.3.0 try again later")
    with TorSMTP(testnet.socks, timeout=30) as smtp:
        smtp.connect(onion_sink.onion, 25)
        smtp.ehlo("sender.test")
        refused = smtp.sendmail("alice@sender.test",
                                ["gone@example.test", "later@example.test", "ok@example.test"],
                                MESSAGE % b"mixed")
    assert refused == {"gone@example.test": (550, b"5.1.1 no such user"),
                       "later@example.test": (451, b"4.3.0 try again later")}
    (received,) = onion_sink.sink.wait_for(1)
    assert received.rcpt_tos == ["ok@example.test"]


def test_isolated_dials_work(testnet, onion_sink) -> None:
    """IsolateSOCKSAuth: a per-destination username gets its own circuit; still reaches."""
    for proxy in (testnet.socks, testnet.socks_extended):
        with dial(onion_sink.onion, 25, proxy=proxy, timeout=30, isolate=True) as sock:
            assert sock.makefile("rb").readline().startswith(b"220 ")
