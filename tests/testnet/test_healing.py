"""Self-healing of `torroute serve --lmtp` against the private Tor network, with tor's client
stuck by :class:`support.healing.StuckTorClientFault` (a named fault at the SOCKS layer: no
state of the private network could be produced on demand that keeps tor's client failing
until NEWNYM; see docs/operating/healing.inc).  The NEWNYMs are counted from tor's own SIGNAL
events, not from the daemon's counter."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest
from support.daemon import Daemon, wait_socket
from support.healing import StuckTorClientFault


def setup(testnet, serve_dir: Path, dns_port: int, fault: StuckTorClientFault,
          onions: dict[str, str], heal: bool) -> Path:
    (serve_dir / "map.txt").write_text("".join(f"{d} {o}\n" for d, o in onions.items()))
    cfg = serve_dir / "torroute.toml"
    cfg.write_text(f'[routing]\nmaps = ["{serve_dir / "map.txt"}"]\n'
                   f'nameservers = ["127.0.0.1:{dns_port}"]\ndns_timeout = 1.0\n'
                   f'[tor]\nsocks = "127.0.0.1:{fault.address[1]}"\n'
                   f'control = "inet:127.0.0.1:{testnet.control[1]}"\n'
                   f'[serve]\nheal = {"true" if heal else "false"}\nheal_interval = 600\n'
                   f'heal_window = 900\nlmtp_idle_timeout = 0\n')  # no pooled connections
    return cfg


def deliver(sock: Path, rcpt: str, n: int) -> int:
    """One LMTP transaction as Postfix's lmtp client makes it; the recipient's reply code."""
    with smtplib.LMTP(str(sock), timeout=120) as client:
        client.ehlo("postfix.test")
        client.mail("a@origin.test")
        code, _ = client.rcpt(rcpt)
        assert code == 250
        code, _ = client.data(f"Message-ID: <{n}@origin.test>\r\nSubject: {n}\r\n\r\n"
                              f"body {n}\r\n".encode())
        return code


@pytest.fixture
def two_onions(testnet, onion_sink, onion_sink_factory):
    """Two live onion sinks: the session's and a fresh one."""
    return {"a.test": onion_sink.onion, "b.test": onion_sink_factory().onion}


def start(daemon_factory, cfg: Path, serve_dir: Path) -> tuple[Daemon, Path]:
    sock = serve_dir / "lmtp.sock"
    daemon = daemon_factory("--config", str(cfg), "--lmtp", f"unix:{sock}")
    wait_socket(str(sock), proc=daemon.proc)
    return daemon, sock


@pytest.mark.testnet
def test_stuck_client_is_healed_by_exactly_one_newnym(testnet, two_onions, dnsmasq_factory,
                                                      daemon_factory, serve_dir) -> None:
    fault = StuckTorClientFault(testnet.socks_extended, testnet.control[1],
                                testnet.control_cookie)
    try:
        cfg = setup(testnet, serve_dir, dnsmasq_factory([]).port, fault, two_onions, heal=True)
        daemon, sock = start(daemon_factory, cfg, serve_dir)
        a, b = two_onions["a.test"], two_onions["b.test"]
        # both onions work: they "worked recently"
        assert deliver(sock, "u@a.test", 1) == 250
        assert deliver(sock, "u@b.test", 2) == 250
        # a single dead onion, however often it fails: never a NEWNYM
        fault.stick({a})
        assert [deliver(sock, "u@a.test", n) for n in (3, 4, 5)] == [451, 451, 451]
        assert deliver(sock, "u@b.test", 6) == 250
        assert len(fault.refused) == 3 and fault.newnyms == []
        assert "NEWNYM" not in daemon.log()
        # tor's client stuck for every onion: the second onion's failure is the evidence
        fault.stick(None)
        stalled = time.monotonic()
        assert deliver(sock, "u@a.test", 7) == 451
        assert deliver(sock, "u@b.test", 8) == 451
        evidence = time.monotonic()
        log = daemon.wait_log("health: NEWNYM sent (1 since start)", timeout=30)
        assert len(fault.newnyms) == 1, fault.newnyms  # tor's own count
        line = next(ln for ln in log.splitlines() if "looks stuck:" in ln)
        assert f"{a} introduction 0xF2" in line and f"{b} introduction 0xF2" in line, line
        # the next retry cycle delivers both (Postfix retries each deferred message)
        assert deliver(sock, "u@a.test", 7) == 250
        assert deliver(sock, "u@b.test", 8) == 250
        restored = time.monotonic()
        print(f"healing: evidence complete {evidence - stalled:.2f}s after the stall, tor's "
              f"NEWNYM {fault.newnyms[0] - evidence:.2f}s later, both delivered "
              f"{restored - fault.newnyms[0]:.2f}s after the NEWNYM; stall to restored "
              f"{restored - stalled:.2f}s; NEWNYMs: {len(fault.newnyms)}")
        # stuck again at once: the rate limit holds (one NEWNYM per heal_interval)
        fault.stick(None)
        assert deliver(sock, "u@a.test", 9) == 451
        assert deliver(sock, "u@b.test", 10) == 451
        log = daemon.wait_log("but no NEWNYM: rate limit: last NEWNYM")
        assert len(fault.newnyms) == 1 and log.count("health: NEWNYM sent") == 1
        received = {m.message["Message-ID"] for m in testnet.sink.messages}
        assert {"<1@origin.test>", "<7@origin.test>"} <= received
        assert "<3@origin.test>" not in received and "<9@origin.test>" not in received
        assert daemon.stop() == 0
        daemon.check_log()
    finally:
        fault.close()


@pytest.mark.testnet
def test_without_healing_messages_stay_deferred(testnet, two_onions, dnsmasq_factory,
                                                daemon_factory, serve_dir) -> None:
    fault = StuckTorClientFault(testnet.socks_extended, testnet.control[1],
                                testnet.control_cookie)
    try:
        cfg = setup(testnet, serve_dir, dnsmasq_factory([]).port, fault, two_onions,
                    heal=False)
        daemon, sock = start(daemon_factory, cfg, serve_dir)
        assert deliver(sock, "u@a.test", 1) == 250
        assert deliver(sock, "u@b.test", 2) == 250
        fault.stick(None)
        for _cycle in range(3):  # retry cycles: deferred every time
            assert deliver(sock, "u@a.test", 3) == 451
            assert deliver(sock, "u@b.test", 4) == 451
        log = daemon.wait_log("but no NEWNYM: heal = false")
        assert log.count("but no NEWNYM: heal = false") == 1  # once, not per attempt
        assert fault.newnyms == [] and "NEWNYM sent" not in log
        assert len(fault.refused) == 6
        assert daemon.stop() == 0
        daemon.check_log()
    finally:
        fault.close()


@pytest.mark.testnet
def test_own_canary_stuck_alone_heals_and_comes_back_up(testnet, onion_sink, dnsmasq_factory,
                                                        daemon_factory, serve_dir) -> None:
    """The canary (our own onion) failing with 0xF2 is evidence on its own: one NEWNYM (tor's
    count), and the canary is up again on its next check."""
    fault = StuckTorClientFault(testnet.socks_extended, testnet.control[1],
                                testnet.control_cookie)
    try:
        target = f"{onion_sink.onion}:25"
        cfg = setup(testnet, serve_dir, dnsmasq_factory([]).port, fault, {}, heal=True)
        cfg.write_text(cfg.read_text() + f'canary = ["{target}"]\ncanary_interval = 1\n'
                       'canary_timeout = 30\n')
        daemon, _sock = start(daemon_factory, cfg, serve_dir)
        daemon.wait_log(f"health: canary {target} up", timeout=60)
        fault.stick(None)
        log = daemon.wait_log("health: NEWNYM sent (1 since start)", timeout=60)
        assert f"health: canary {target} down (introduction, " in log
        assert f"canary {onion_sink.onion} introduction 0xF2" in log
        log = daemon.wait_log(f"health: canary {target} up", count=2, timeout=60)
        assert len(fault.newnyms) == 1 and log.count("health: NEWNYM sent") == 1
        assert daemon.stop() == 0
        daemon.check_log()
    finally:
        fault.close()
