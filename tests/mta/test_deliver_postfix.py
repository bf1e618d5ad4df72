"""End to end through a real Postfix and a real private Tor network:

    smtplib -> Postfix smtpd -> transport_maps = socketmap -> `torroute serve` (SRV from dnsmasq,
    pinned map) -> qmgr -> pipe(8) as nobody -> `torroute deliver` -> tor SocksPort -> onion
    service -> SMTP sink.

Postfix's default_transport points at a second sink standing for the clear net: nothing routed
to an onion may ever arrive there.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from support.e2e import SRV, Setup, extra_socks_port, headers, message, start_chain, write_config

from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port

pytestmark = [pytest.mark.testnet, pytest.mark.postfix]

ROOT_ANCHOR = ("--trust-anchor=.,20326,8,2,"
               "E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D")


@pytest.fixture
def setup(testnet, onion_mx, dnsmasq_factory, daemon_factory, serve_dir, postfix_factory,
          clear_sink) -> Setup:
    return start_chain(onion_mx, testnet.socks_extended, lmtp=False,
                       dnsmasq_factory=dnsmasq_factory, daemon_factory=daemon_factory,
                       postfix_factory=postfix_factory, serve_dir=serve_dir,
                       clear_sink=clear_sink)


def test_srv_and_pinned_domains_arrive_at_the_onion(setup: Setup) -> None:
    sent = {"user@example.test": message("via srv"),
            "someone@pinned.test": message("via pin", "someone@pinned.test")}
    for rcpt, data in sent.items():
        setup.submitted("alice@origin.test", [rcpt], data)
    got = setup.mx.sink.wait_for(2, timeout=60)
    setup.postfix.wait_empty(30)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(sent)
    for m in got:
        original = sent[m.rcpt_tos[0]]
        assert headers(m.data) == headers(original)  # every header kept, in order
        assert m.data.endswith(b"\r\n\r\nhello\r\n")
        assert m.mail_from == "alice@origin.test"
    assert setup.mx.sink.ehlo_names == ["localhost", "localhost"]
    log = setup.postfix.log()
    assert log.count("relay=torroute") == 2 and log.count("status=sent") == 2
    assert setup.postfix.queue() == [] and setup.clear.messages == []


def test_socksport_down_defers_then_delivers_exactly_once(setup: Setup, testnet) -> None:
    """Deliver's SocksPort is closed (tor not there); mail waits; tor opens it; flush."""
    port = free_port()
    cfg = setup.postfix.config_path
    cfg.write_text(cfg.read_text().replace(f'socks = "{testnet.socks_extended[0]}:'
                                           f'{testnet.socks_extended[1]}"',
                                           f'socks = "127.0.0.1:{port}"'))
    setup.submitted("alice@origin.test", ["user@example.test"], message("tor down"))
    queued = setup.postfix.wait_queued(1)
    reason = queued[0]["recipients"][0]["delay_reason"]
    assert reason.startswith(f"tor SocksPort 127.0.0.1:{port} unreachable")
    # Postfix takes the leading enhanced status code as the DSN status (and strips it)
    assert "dsn=4.4.1, status=deferred (tor SocksPort" in setup.postfix.log()
    assert "status=bounced" not in setup.postfix.log()
    time.sleep(3)  # a retry or two while tor is away: still deferred, nothing elsewhere
    assert setup.mx.sink.messages == [] and setup.clear.messages == []
    assert "relay=127.0.0.1" not in setup.postfix.log()
    with extra_socks_port(testnet, port):
        setup.postfix.flush()
        setup.mx.sink.wait_for(1, timeout=60)
        setup.postfix.wait_empty(30)
        time.sleep(3)
    assert len(setup.mx.sink.messages) == 1 and setup.clear.messages == []
    assert setup.postfix.log().count("status=sent") == 1


def test_dns_servfail_defers_never_relays(testnet, onion_mx, dnsmasq_factory, daemon_factory,
                                          serve_dir, postfix_factory, clear_sink) -> None:
    upstream = dnsmasq_factory([SrvRecord(SRV + "example.test", onion_mx.onion, 25)])
    validating = dnsmasq_factory(local_domains=[], extra=[
        "--dnssec", ROOT_ANCHOR, f"--server=127.0.0.1#{upstream.port}"])  # real SERVFAIL
    cfg = write_config(serve_dir, validating.port, onion_mx.onion, testnet.socks_extended)
    daemon = daemon_factory("--config", str(cfg), "--socket-group", "postfix")
    pf = postfix_factory(daemon.socketmap_table, deliver_config=cfg.read_text())
    import smtplib

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:  # smtpd asks at RCPT
        pf.submit("alice@origin.test", ["user@example.test"], message("servfail"))
    code, text = refused.value.recipients["user@example.test"]
    assert code == 451 and b"4.3.0" in text
    # mail already in the queue (local submission) waits too
    subprocess.run(["/usr/sbin/sendmail", "-C", str(pf.confdir), "-f", "alice@origin.test",
                    "user@example.test"], input=message("servfail 2"), check=True, timeout=30)
    queued = pf.wait_queued(1)
    assert queued[0]["recipients"][0]["delay_reason"] == "address resolver failure"
    time.sleep(3)
    assert clear_sink.messages == [] and "relay=127.0.0.1" not in pf.log()
    assert "status=bounced" not in pf.log()


def test_remote_550_bounces_with_remote_text(setup: Setup) -> None:
    setup.mx.sink.reject("nobody@example.test", "550 5.1.1 <nobody@example.test>: no mailbox "
                         "by that name at the onion")
    setup.submitted("alice@origin.test", ["nobody@example.test"], message("bounce me"))
    setup.postfix.wait_log("status=bounced")
    [dsn] = setup.clear.wait_for(1, timeout=30)  # the bounce goes back to alice (clear net)
    assert dsn.rcpt_tos == ["alice@origin.test"] and dsn.mail_from == "<>"
    assert b"no mailbox by that name at the onion" in dsn.data
    assert b"5.1.1" in dsn.data
    assert setup.mx.sink.messages == []
    setup.postfix.wait_empty(30)


def test_remote_451_defers(setup: Setup) -> None:
    setup.mx.sink.reject("busy@example.test", "451 4.2.0 mailbox busy, try later")
    setup.submitted("alice@origin.test", ["busy@example.test"], message("defer me"))
    queued = setup.postfix.wait_queued(1)
    reason = queued[0]["recipients"][0]["delay_reason"]
    assert "mailbox busy" in reason and "dsn=4.2.0, status=deferred" in setup.postfix.log()
    assert setup.clear.messages == [] and setup.mx.sink.messages == []
    setup.mx.sink.reset()
    setup.postfix.flush()
    setup.mx.sink.wait_for(1, timeout=60)
    setup.postfix.wait_empty(30)


def test_recipient_limit_one_gives_exact_per_recipient_status(setup: Setup) -> None:
    setup.mx.sink.reject("gone@example.test", "550 5.1.1 gone")
    setup.submitted("alice@origin.test", ["user@example.test", "gone@example.test",
                                          "x@pinned.test"], message("three"))
    got = setup.mx.sink.wait_for(2, timeout=60)
    setup.postfix.wait_empty(30)
    assert sorted(m.rcpt_tos[0] for m in got) == ["user@example.test", "x@pinned.test"]
    [dsn] = setup.clear.wait_for(1, timeout=30)
    assert b"Final-Recipient: rfc822; gone@example.test" in dsn.data
    assert b"Final-Recipient: rfc822; user@example.test" not in dsn.data
    assert b"Final-Recipient: rfc822; x@pinned.test" not in dsn.data


def test_ten_megabytes_and_smtputf8_arrive_intact(setup: Setup) -> None:
    big = message("big", body="".join(f"{i:07d} " + "x" * 70 + "\n" for i in range(134000)))
    assert len(big) > 10_000_000
    utf8 = ("From: Ålice <ålice@örigin.test>\nTo: <bøb@exämple.test>\nSubject: grüße ✓\n"
            "Message-ID: <utf8@örigin.test>\n\nbody: ü ✓ 日本\n").encode()
    setup.submitted("alice@origin.test", ["user@example.test"], big)
    setup.submitted("ålice@örigin.test", ["bøb@example.test"], utf8,
                    options=("SMTPUTF8", "BODY=8BITMIME"))
    got = setup.mx.sink.wait_for(2, timeout=120)
    setup.postfix.wait_empty(30)
    by_rcpt = {m.rcpt_tos[0]: m for m in got}
    received_big = by_rcpt["user@example.test"].data
    assert received_big.split(b"\r\n\r\n", 1)[1] == big.split(b"\n\n", 1)[1].replace(
        b"\n", b"\r\n")
    assert headers(received_big) == headers(big)
    u = by_rcpt["bøb@example.test"]
    assert u.mail_from == "ålice@örigin.test" and "SMTPUTF8" in u.mail_options
    assert u.data.split(b"\r\n\r\n", 1)[1] == "body: ü ✓ 日本\r\n".encode()
    assert "Subject: grüße ✓".encode() in u.data


def test_through_proxymap_as_on_a_chrooted_debian(testnet, onion_mx, dnsmasq_factory,
                                                 daemon_factory, serve_dir, postfix_factory,
                                                 clear_sink) -> None:
    """Debian chroots trivial-rewrite: the documented table is proxy:socketmap:... (proxymap
    runs outside the chroot and $transport_maps is in proxy_read_maps by default)."""
    onion_mx.sink.reset()
    dns = dnsmasq_factory([SrvRecord(SRV + "example.test", onion_mx.onion, 25)])
    cfg = write_config(serve_dir, dns.port, onion_mx.onion, testnet.socks_extended)
    daemon = daemon_factory("--config", str(cfg), "--socket-group", "postfix")
    pf = postfix_factory("proxy:" + daemon.socketmap_table, deliver_config=cfg.read_text())
    pf.submit("alice@origin.test", ["user@example.test"], message("proxymap"))
    [got] = onion_mx.sink.wait_for(1, timeout=60)
    pf.wait_empty(30)
    assert got.rcpt_tos == ["user@example.test"] and clear_sink.messages == []
    assert "relay=torroute" in pf.log()


def test_bounce_to_an_onion_sender_travels_with_the_null_sender(setup: Setup) -> None:
    """pipe's null_sender= and --sender=${sender}: Postfix's own bounce, routed over tor to an
    onion-routed sender, leaves as MAIL FROM:<> (not MAILER-DAEMON)."""
    setup.mx.sink.reject("nobody@example.test", "550 5.1.1 no such user at the onion")
    setup.submitted("alice@pinned.test", ["nobody@example.test"], message("bounce to onion"))
    [dsn] = setup.mx.sink.wait_for(1, timeout=60)
    setup.postfix.wait_empty(30)
    assert dsn.mail_from == "<>" and dsn.rcpt_tos == ["alice@pinned.test"]
    assert b"no such user at the onion" in dsn.data
    assert setup.clear.messages == []


def test_invalid_onion_nexthop_bounces_and_clear_name_defers(postfix_factory, postfix_dir: Path,
                                                             clear_sink) -> None:
    """An operator's own transport table (texthash) hands the pipe a mistyped onion and a
    clear-net name: the first bounces at once with 5.1.2 (as `torroute route` judges it), the
    second is a configuration error of the operator and waits (4.3.5); neither reaches tor."""
    from support.onions import ONION_A

    bad = ONION_A[:10] + ("a" if ONION_A[10] != "a" else "b") + ONION_A[11:]
    table = postfix_dir / "transport"
    table.write_text(f"bad.test torroute:[{bad}]:25\nclear.test torroute:[mail.example.com]:25\n")
    socks = free_port()  # nothing listens: a dial would defer with 4.4.1, not what is asserted
    pf = postfix_factory(f"texthash:{table}",
                         deliver_config=f'[tor]\nsocks = "127.0.0.1:{socks}"\n')
    pf.submit("alice@origin.test", ["user@bad.test"], message("mistyped onion"))
    pf.wait_log("status=bounced")
    [dsn] = clear_sink.wait_for(1, timeout=30)
    assert dsn.rcpt_tos == ["alice@origin.test"] and b"5.1.2" in dsn.data
    assert b"onion checksum mismatch" in b" ".join(dsn.data.split())  # unfolded
    assert "dsn=5.1.2, status=bounced" in pf.log() and "relay=torroute" in pf.log()
    pf.submit("alice@origin.test", ["user@clear.test"], message("clear name"))
    queued = pf.wait_queued(1)
    reason = queued[0]["recipients"][0]["delay_reason"]
    assert "is not a v3 .onion address" in reason and "require_onion" in reason
    assert "dsn=4.3.5, status=deferred" in pf.log()
    assert pf.log().count("status=bounced") == 1 and f"127.0.0.1:{socks}" not in pf.log()
