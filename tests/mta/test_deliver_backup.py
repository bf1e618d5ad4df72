"""`torroute deliver` tries the further SRV targets when the first fails before the message was
sent -- on the private Tor network, by itself and below a real Postfix.

    _onion-mx._tcp.prio.test  SRV 0 <dead>, SRV 10 <first live MX>, SRV 20 <second live MX>

Dead: an onion nobody publishes (tor 0xF0), a published onion whose server stopped (0x01), a
server that never greets (timeout).  A reply to the transaction (5xx, 4xx) or a failure after
the message went out is final: the next target is never contacted, so nothing is duplicated.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from support.e2e import SRV, UNPUBLISHED, MxPair, message, prio_records, srv_toml
from support.pipe import CLEAN_ENV, MESSAGE, TORROUTE, status

from torroute.delivery.targets import next_targets
from torroute.testing.dnsmasq import SrvRecord

pytestmark = [pytest.mark.testnet]


def run(cfg: Path, nexthop: str, *extra: str, rcpts: tuple[str, ...] = ("user@prio.test",),
        stdin: bytes = MESSAGE) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    r = subprocess.run([TORROUTE, "deliver", f"--config={cfg}", "--sender=alice@origin.test",
                        f"--nexthop=[{nexthop}]:25", *extra, "--", *rcpts],
                       input=stdin, capture_output=True, env=CLEAN_ENV, cwd="/", timeout=120)
    return r, time.monotonic() - started


DEAD = {"unpublished": (b"0xf0", ()), "stopped": (b"0x01", ()),
        "silent": (b"timeout after 2s", ("--command-timeout=2",))}


@pytest.mark.parametrize("kind", sorted(DEAD))
def test_dead_first_target_falls_through_to_the_next_live_one(
        kind: str, request, mxs: MxPair, dnsmasq_factory, serve_dir: Path, testnet) -> None:
    dead = {"unpublished": UNPUBLISHED}.get(kind) or request.getfixturevalue(f"{kind}_onion")
    said, extra = DEAD[kind]
    dns = dnsmasq_factory(prio_records(dead, mxs))
    cfg = srv_toml(serve_dir, dns.port, testnet.socks_extended)
    r, seconds = run(cfg, dead, *extra)
    print(f"{kind}: delivered via the backup after {seconds:.2f}s")
    assert status(r) == (0, "2.0.0"), r
    out = r.stdout.decode()
    # the path: the dead one failed for its own reason, then the priority-10 MX said 250
    assert out.startswith(f"2.0.0 via backup: host {mxs.first.onion}:25 said: 250 ")
    assert f"(after the earlier SRV target: {dead}:25" in out or \
        f"(after the earlier SRV target: tor: {dead}:25" in out, out
    assert said in r.stdout, out
    [got] = mxs.first.sink.wait_for(1)
    assert got.rcpt_tos == ["user@prio.test"] and got.data == MESSAGE.replace(b"\n", b"\r\n")
    assert mxs.second.sink.ehlo_names == [] and not mxs.second.sink.messages
    assert seconds < 30


@pytest.mark.parametrize("answer", ["550 5.1.1 <user@prio.test>: no such user",
                                    "451 4.2.0 mailbox busy, try later"])
def test_a_reply_from_the_first_target_is_final(answer: str, mxs: MxPair, dnsmasq_factory,
                                                serve_dir: Path, testnet) -> None:
    """The first MX was reached and judged the recipient: bounce / defer with its words, the
    second MX (priority 10) is never contacted."""
    dns = dnsmasq_factory([SrvRecord(SRV + "prio.test", mxs.first.onion, 25, priority=0),
                           SrvRecord(SRV + "prio.test", mxs.second.onion, 25, priority=10)])
    cfg = srv_toml(serve_dir, dns.port, testnet.socks_extended)
    mxs.first.sink.reject("user@prio.test", answer)
    r, _ = run(cfg, mxs.first.onion)
    code = answer.split()[1]
    assert status(r) == (69 if answer.startswith("5") else 75, code), r
    assert answer.split(" ", 2)[2].encode() in r.stdout and b"earlier SRV" not in r.stdout
    assert mxs.first.sink.ehlo_names == ["localhost"]
    assert mxs.second.sink.ehlo_names == [] and not mxs.second.sink.messages


def test_5xx_after_data_is_final(mxs: MxPair, dnsmasq_factory, serve_dir: Path,
                                 testnet) -> None:
    dns = dnsmasq_factory([SrvRecord(SRV + "prio.test", mxs.first.onion, 25, priority=0),
                           SrvRecord(SRV + "prio.test", mxs.second.onion, 25, priority=10)])
    cfg = srv_toml(serve_dir, dns.port, testnet.socks_extended)
    mxs.first.sink.data_reply = "554 5.6.0 content refused"
    r, _ = run(cfg, mxs.first.onion)
    assert status(r) == (69, "5.6.0"), r
    assert mxs.second.sink.ehlo_names == []


def test_a_connection_lost_while_sending_the_message_is_final(
        mxs: MxPair, dnsmasq_factory, serve_dir: Path, testnet, fake_smtp_factory) -> None:
    """The message was on its way when the connection broke: it may have arrived, so the
    backup must not get a second copy; deferred (4.4.2), Postfix retries (RFC 1047)."""
    resetting = fake_smtp_factory("reset-in-data")  # fake: a reset in the middle of DATA
    onion = testnet.net.add_onion({25: resetting.address})
    try:
        dns = dnsmasq_factory([SrvRecord(SRV + "prio.test", onion, 25, priority=0),
                               SrvRecord(SRV + "prio.test", mxs.first.onion, 25, priority=10)])
        cfg = srv_toml(serve_dir, dns.port, testnet.socks_extended)
        r, _ = run(cfg, onion, stdin=b"Subject: x\n\n" + b"y" * 200_000 + b"\n")
        assert status(r) == (75, "4.4.2"), r
        assert b"DATA" in resetting.received and b"earlier SRV" not in r.stdout
        assert mxs.first.sink.ehlo_names == [] and not mxs.first.sink.messages
    finally:
        testnet.net.remove_onion(onion)


def test_the_whole_run_stays_within_time_limit(silent_onion: str, mxs: MxPair, dnsmasq_factory,
                                               serve_dir: Path, testnet) -> None:
    """A first target that eats the budget (its greeting would be waited for 30 s): the run
    ends at --time-limit, deferred, and the backup is not started late."""
    dns = dnsmasq_factory(prio_records(silent_onion, mxs))
    cfg = srv_toml(serve_dir, dns.port, testnet.socks_extended)
    r, seconds = run(cfg, silent_onion, "--command-timeout=30", "--time-limit=3")
    assert status(r) == (75, "4.4.2"), r
    assert 2.5 < seconds < 6, seconds
    assert mxs.first.sink.ehlo_names == [] and mxs.second.sink.ehlo_names == []


def test_several_recipients_fall_through_together(mxs: MxPair, dnsmasq_factory,
                                                  serve_dir: Path, testnet) -> None:
    """Two domains with the same SRV targets in one run (recipient limit > 1): one copy, to
    the first live target both list."""
    dns = dnsmasq_factory(prio_records(UNPUBLISHED, mxs) + prio_records(UNPUBLISHED, mxs,
                                                                        "prio2.test"))
    cfg = srv_toml(serve_dir, dns.port, testnet.socks_extended)
    r, _ = run(cfg, UNPUBLISHED, rcpts=("a@prio.test", "b@prio2.test"))
    assert status(r) == (0, "2.0.0"), r
    [got] = mxs.first.sink.wait_for(1)
    assert got.rcpt_tos == ["a@prio.test", "b@prio2.test"]


def test_no_fall_through_where_routing_lists_no_other_target(mxs: MxPair, dnsmasq_factory,
                                                             serve_dir: Path, testnet) -> None:
    """A pinned domain has one target; a nexthop the domain's SRV records do not list (the
    operator's own transport table, or the records changed) is not second-guessed: both
    defer with the first failure and no other MX is contacted."""
    dns = dnsmasq_factory([SrvRecord(SRV + "moved.test", mxs.first.onion, 25, priority=0)])
    cfg = srv_toml(serve_dir, dns.port, testnet.socks_extended,
                   pins=f"pinned.test {UNPUBLISHED}\n")
    for rcpt in ("user@pinned.test", "user@moved.test"):
        r, _ = run(cfg, UNPUBLISHED, rcpts=(rcpt,))
        assert status(r) == (75, "4.4.1") and b"0xf0" in r.stdout, r
        assert b"earlier SRV" not in r.stdout
    assert mxs.first.sink.ehlo_names == []


def test_dns_failure_at_fall_through_defers_with_the_first_failure(serve_dir: Path,
                                                                    testnet) -> None:
    """The further targets cannot be known (the pipe's resolver is down): deferred with the
    first target's reason and why no other was tried; never a bounce."""
    from torroute.testing.ports import free_port

    cfg = srv_toml(serve_dir, free_port(), testnet.socks_extended)  # nothing answers DNS there
    r, seconds = run(cfg, UNPUBLISHED)
    assert status(r) == (75, "4.4.1"), r
    assert b"0xf0" in r.stdout and b"(further SRV targets unknown: prio.test: DNS" in r.stdout
    assert seconds < 10


def test_next_targets_is_the_common_rest_in_order() -> None:
    a, b, c, d = (("a.onion", 25), ("b.onion", 25), ("c.onion", 25), ("c.onion", 2525))
    assert next_targets([[a, b, c]], a) == [b, c]
    assert next_targets([[b, a, c]], a) == [b, c]  # the nexthop was not first here
    assert next_targets([[a, b, c], [a, c, b]], a) == [b, c]  # the first recipient's order
    assert next_targets([[a, b, c], [a, c]], a) == [c]  # only targets every route lists
    assert next_targets([[a, b], [b, c]], a) == []  # a route without the nexthop: none
    assert next_targets([[a, c]], a) == [c] and next_targets([[a, d]], a) == [d]
    assert next_targets([], a) == []


# ---- through a real Postfix: socketmap daemon -> pipe -> deliver -> tor


@pytest.mark.postfix
def test_postfix_delivers_to_the_backup_when_the_first_onion_is_dead(
        mxs: MxPair, dnsmasq_factory, daemon_factory, serve_dir: Path, postfix_factory,
        clear_sink, testnet) -> None:
    """Postfix asks the daemon (answer: torroute:[<dead>]:25, the priority-0 target), the pipe
    finds the dead onion (0xF0), routes prio.test itself with the same configuration and
    delivers to the priority-10 MX; Postfix logs the whole path."""
    dns = dnsmasq_factory(prio_records(UNPUBLISHED, mxs))
    cfg = srv_toml(serve_dir, dns.port, testnet.socks_extended)
    daemon = daemon_factory("--config", str(cfg), "--socket-group", "postfix")
    pf = postfix_factory(daemon.socketmap_table, deliver_config=cfg.read_text())
    pf.submit("alice@origin.test", ["user@prio.test"], message("backup mx"))
    [got] = mxs.first.sink.wait_for(1, timeout=60)
    pf.wait_empty(30)
    assert got.rcpt_tos == ["user@prio.test"] and b"Subject: backup mx" in got.data
    log = pf.log()
    sent = [ln for ln in log.splitlines() if "status=sent" in ln]
    assert len(sent) == 1 and "relay=torroute" in sent[0], log[-3000:]
    # pipe(8) logs the first 100 characters of a delivery's output: enough for the path
    assert f"(2.0.0 via backup: host {mxs.first.onion}:25 said: 250" in sent[0], sent
    assert "status=deferred" not in log and "status=bounced" not in log
    assert mxs.second.sink.ehlo_names == [] and clear_sink.messages == []
    assert "Traceback" not in daemon.log() and " ERROR " not in daemon.log()


@pytest.mark.postfix
def test_postfix_bounce_from_the_first_mx_does_not_reach_the_second(
        mxs: MxPair, dnsmasq_factory, daemon_factory, serve_dir: Path, postfix_factory,
        clear_sink, testnet) -> None:
    dns = dnsmasq_factory([SrvRecord(SRV + "prio.test", mxs.first.onion, 25, priority=0),
                           SrvRecord(SRV + "prio.test", mxs.second.onion, 25, priority=10)])
    cfg = srv_toml(serve_dir, dns.port, testnet.socks_extended)
    daemon = daemon_factory("--config", str(cfg), "--socket-group", "postfix")
    pf = postfix_factory(daemon.socketmap_table, deliver_config=cfg.read_text())
    mxs.first.sink.reject("gone@prio.test", "550 5.1.1 <gone@prio.test>: no such user")
    pf.submit("alice@origin.test", ["gone@prio.test"], message("bounce at first"))
    pf.wait_log("status=bounced")
    [dsn] = clear_sink.wait_for(1, timeout=30)
    assert dsn.rcpt_tos == ["alice@origin.test"] and b"no such user" in dsn.data
    pf.wait_empty(30)
    assert mxs.first.sink.ehlo_names == ["localhost"]
    assert mxs.second.sink.ehlo_names == [] and not mxs.second.sink.messages
    assert "Traceback" not in daemon.log() and " ERROR " not in daemon.log()
