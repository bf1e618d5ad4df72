"""The open-relay trap, against real Postfix smtpds on 127.0.0.1.

Onion connections reach the service's target from 127.0.0.1.  Debian's Postfix trusts
127.0.0.0/8 (mynetworks) and relays for it: publishing its port 25 as an onion would make it an
open relay for all of Tor.  ``create_onion`` probes the target like an onion client would and
refuses unless forced.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from torroute.errors import OpenRelayRisk
from torroute.testing.ports import free_port
from torroute.tor.control import Tor
from torroute.tor.relay_probe import probe_relay, relay_check
from torroute.tor.torrc import PortMapping

pytestmark = pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")


def test_probe_finds_debians_default_postfix_open(postfix_smtpds) -> None:
    smtpd = postfix_smtpds["open"]
    verdict = probe_relay(PortMapping(25, f"127.0.0.1:{smtpd.port}"))
    assert verdict.verdict == "open", verdict.detail
    assert verdict.refuse
    assert "RCPT TO:<relay-probe@relay-check.invalid>: 250" in verdict.detail


def test_probe_finds_the_recommended_onion_smtpd_closed(postfix_smtpds) -> None:
    """The master.cf line the docs recommend: -o mynetworks= ... reject_unauth_destination."""
    smtpd = postfix_smtpds["closed"]
    verdict = probe_relay(PortMapping(25, f"127.0.0.1:{smtpd.port}"))
    assert verdict.verdict == "closed", verdict.detail
    assert "Relay access denied" in verdict.detail and not verdict.refuse


def test_probe_sends_no_mail(postfix_smtpds) -> None:
    """Postfix opens a queue file at MAIL FROM and drops it after RSET (asynchronously, in
    cleanup): it must go away and never reach the queue manager."""
    smtpd = postfix_smtpds["open"]
    probe_relay(PortMapping(25, f"127.0.0.1:{smtpd.port}"))
    queue = smtpd.queue_dir

    def queued() -> list[Path]:
        return [p for d in ("incoming", "active", "deferred", "maildrop")
                if (queue / d).exists() for p in (queue / d).rglob("*") if p.is_file()]

    deadline = time.monotonic() + 10
    while queued() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queued() == []
    assert "qmgr" not in smtpd.log()  # no message ever entered the queue manager


def test_probe_without_listener_and_non_smtp() -> None:
    assert probe_relay(PortMapping(25, f"127.0.0.1:{free_port()}")).verdict == "no-listener"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        import threading

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        verdict = probe_relay(PortMapping(25, f"127.0.0.1:{server.getsockname()[1]}"))
        thread.join()
        assert verdict.verdict == "not-smtp" and not verdict.refuse
    finally:
        server.close()


def test_only_smtp_ports_are_probed(postfix_smtpds) -> None:
    port = postfix_smtpds["open"].port
    verdicts = relay_check([PortMapping(80, f"127.0.0.1:{port}"),
                            PortMapping(587, f"127.0.0.1:{port}")])
    assert [(v.mapping.virtual, v.verdict) for v in verdicts] == [(587, "open")]


def test_create_refuses_an_open_relay_target_unless_forced(postfix_smtpds, tor) -> None:
    open_port = postfix_smtpds["open"].port
    with Tor.connect(f"inet:127.0.0.1:{tor.control_port}") as ctl:
        before = ctl.list_onions()
        with pytest.raises(OpenRelayRisk) as info:
            ctl.create_onion([f"25=127.0.0.1:{open_port}"], wait=False)
        assert "mynetworks" in str(info.value) and "--force" in str(info.value)
        assert [v.verdict for v in info.value.verdicts] == ["open"]
        assert ctl.list_onions() == before  # nothing was published
        warnings: list[str] = []
        forced = ctl.create_onion([f"25=127.0.0.1:{open_port}"], wait=False, force=True,
                                  progress=warnings.append)
        try:
            assert forced.address and any("--force" in w for w in warnings)
        finally:
            ctl.remove_onion(forced.address)


def test_create_accepts_the_closed_smtpd(postfix_smtpds, tor) -> None:
    closed_port = postfix_smtpds["closed"].port
    with Tor.connect(f"inet:127.0.0.1:{tor.control_port}") as ctl:
        service = ctl.create_onion([f"25=127.0.0.1:{closed_port}"], wait=False)
        ctl.remove_onion(service.address)
