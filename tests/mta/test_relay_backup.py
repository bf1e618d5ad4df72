"""The LMTP relay tries the further SRV targets when the first fails before the message was
sent -- torroute.delivery.relay on the private Tor network, and `torroute serve --lmtp` below a real
Postfix.  Same targets as tests/test_deliver_backup.py:

    _onion-mx._tcp.prio.test  SRV 0 <dead>, SRV 10 <first live MX>, SRV 20 <second live MX>
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from support.e2e import (
    SRV,
    UNPUBLISHED,
    MxPair,
    lmtp_destination,
    message,
    prio_records,
    relay_from,
    srv_toml,
    start_lmtp_postfix,
)

from torroute.delivery.relay import Relay
from torroute.protocols.lmtp import Transaction
from torroute.testing.dnsmasq import SrvRecord

pytestmark = [pytest.mark.testnet]

BODY = b"From: a@origin.test\nSubject: relay backup\nMessage-ID: <rb@origin.test>\n\nbody\n"


def make_relay(cfg: Path, time_limit: float = 540.0) -> Relay:
    return relay_from(cfg, time_limit=time_limit)


def relay_one(relay: Relay, *rcpts: bytes) -> tuple[list[bytes], float]:
    async def go() -> list[bytes]:
        try:
            return await relay.relay(Transaction(b"a@origin.test", rcpts, BODY))
        finally:
            relay.close()

    started = time.monotonic()
    replies = asyncio.run(go())
    return replies, time.monotonic() - started


DEAD = {"unpublished": (b"0xf0", ""), "stopped": (b"0x01", ""),
        "silent": (b"timeout after 2s", "command_timeout = 2\n")}


@pytest.mark.parametrize("kind", sorted(DEAD))
def test_dead_first_target_falls_through_to_the_next_live_one(
        kind: str, request, mxs: MxPair, dnsmasq_factory, serve_dir: Path, testnet) -> None:
    dead = {"unpublished": UNPUBLISHED}.get(kind) or request.getfixturevalue(f"{kind}_onion")
    said, deliver = DEAD[kind]
    dns = dnsmasq_factory(prio_records(dead, mxs))
    relay = make_relay(srv_toml(serve_dir, dns.port, testnet.socks_extended, deliver=deliver))
    [reply], seconds = relay_one(relay, b"user@prio.test")
    print(f"relay {kind}: delivered via the backup after {seconds:.2f}s")
    assert reply.startswith(f"250 2.0.0 via backup: host {mxs.first.onion}:25 said: 250 "
                            .encode()), reply
    assert f"earlier SRV target: tor: {dead}:25".encode() in reply or \
        f"earlier SRV target: {dead}:25".encode() in reply, reply
    assert said in reply
    [got] = mxs.first.sink.wait_for(1)
    assert got.rcpt_tos == ["user@prio.test"] and got.data.endswith(b"\r\n\r\nbody\r\n")
    assert mxs.second.sink.ehlo_names == [] and not mxs.second.sink.messages
    assert relay.stats["dialed"] == 2 - (kind == "unpublished") - (kind == "stopped")


def test_every_target_dead_defers_naming_each(stopped_onion: str, dnsmasq_factory,
                                              serve_dir: Path, testnet) -> None:
    dns = dnsmasq_factory([SrvRecord(SRV + "prio.test", UNPUBLISHED, 25, priority=0),
                           SrvRecord(SRV + "prio.test", stopped_onion, 25, priority=10)])
    relay = make_relay(srv_toml(serve_dir, dns.port, testnet.socks_extended))
    [reply], _ = relay_one(relay, b"user@prio.test")
    assert reply.startswith(b"451 4.4.1 none of 2 SRV targets reached: "), reply
    assert UNPUBLISHED.encode() in reply and stopped_onion.encode() in reply
    assert b"0xf0" in reply and b"0x01" in reply


@pytest.mark.parametrize("answer", ["550 5.1.1 <user@prio.test>: no such user",
                                    "451 4.2.0 mailbox busy, try later"])
def test_a_reply_from_the_first_target_is_final(answer: str, mxs: MxPair, dnsmasq_factory,
                                                serve_dir: Path, testnet) -> None:
    dns = dnsmasq_factory([SrvRecord(SRV + "prio.test", mxs.first.onion, 25, priority=0),
                           SrvRecord(SRV + "prio.test", mxs.second.onion, 25, priority=10)])
    relay = make_relay(srv_toml(serve_dir, dns.port, testnet.socks_extended))
    mxs.first.sink.reject("user@prio.test", answer)
    [reply], _ = relay_one(relay, b"user@prio.test")
    code, dsn, words = answer.split(" ", 2)
    assert reply.startswith(f"{550 if code.startswith('5') else 451} {dsn} ".encode()), reply
    assert words.encode() in reply and b"backup" not in reply
    assert mxs.first.sink.ehlo_names == ["localhost"]
    assert mxs.second.sink.ehlo_names == [] and not mxs.second.sink.messages


def test_the_whole_relay_stays_within_time_limit(silent_onion: str, mxs: MxPair,
                                                 dnsmasq_factory, serve_dir: Path,
                                                 testnet) -> None:
    dns = dnsmasq_factory(prio_records(silent_onion, mxs))
    relay = make_relay(srv_toml(serve_dir, dns.port, testnet.socks_extended,
                                deliver="command_timeout = 30\n"), time_limit=3)
    [reply], seconds = relay_one(relay, b"user@prio.test")
    assert reply.startswith(b"451 4.4.2 ") and b"relay time limit 3s" in reply, reply
    assert 2.5 < seconds < 6, seconds
    assert mxs.first.sink.ehlo_names == [] and mxs.second.sink.ehlo_names == []


@pytest.mark.postfix
def test_postfix_lmtp_delivers_to_the_backup(mxs: MxPair, dnsmasq_factory, daemon_factory,
                                             serve_dir: Path, postfix_factory, clear_sink,
                                             testnet) -> None:
    """Postfix -> socketmap -> `torroute serve --lmtp` -> the dead priority-0 onion (0xF0) ->
    the priority-10 MX; Postfix's lmtp logs the backup's reply, the daemon its warning and no
    error."""
    dns = dnsmasq_factory(prio_records(UNPUBLISHED, mxs))
    cfg = srv_toml(serve_dir, dns.port, testnet.socks_extended)
    daemon, pf, sock = start_lmtp_postfix(cfg, serve_dir, daemon_factory, postfix_factory)
    pf.submit("alice@origin.test", ["user@prio.test"], message("lmtp backup"))
    [got] = mxs.first.sink.wait_for(1, timeout=60)
    pf.wait(lambda: "status=sent" in pf.log(), 30)
    pf.wait_empty(30)
    assert got.rcpt_tos == ["user@prio.test"] and b"Subject: lmtp backup" in got.data
    [sent] = [ln for ln in pf.log().splitlines() if "status=sent" in ln]
    # Postfix's destination is the first target's (the dead onion's link); the relay moved on
    assert f"[{lmtp_destination(sock, UNPUBLISHED)}]" in sent
    assert f"via backup: host {mxs.first.onion}:25 said: 250" in sent
    assert f"earlier SRV target: tor: {UNPUBLISHED}:25" in sent and "0xf0" in sent
    log = daemon.wait_log(f"trying the next SRV target {mxs.first.onion}:25")
    assert "WARNING" in log and " ERROR " not in log and "Traceback" not in log
    assert mxs.second.sink.ehlo_names == [] and clear_sink.messages == []
    assert "status=deferred" not in pf.log() and "status=bounced" not in pf.log()
