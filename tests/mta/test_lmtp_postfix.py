"""LMTP relay mode end to end, through a real Postfix and the real private Tor network:

    smtplib -> Postfix smtpd -> transport_maps = socketmap -> `torroute serve --lmtp` (answers
    torroute-lmtp:unix:<lmtp.sock>) -> qmgr -> Postfix's own lmtp(8) -> the daemon's LMTP
    listener -> tor SocksPort -> onion service -> SMTP sink.

The master.cf service is the shipped plugins/postfix_pipe/master-lmtp.cf.  Postfix's
default_transport points at a second sink standing for the clear net: nothing routed to an
onion may ever arrive there.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from support.daemon import wait_socket
from support.e2e import (
    Setup,
    extra_socks_port,
    headers,
    lmtp_destination,
    message,
    start_chain,
)

from torroute.testing.ports import free_port

pytestmark = [pytest.mark.testnet, pytest.mark.postfix]


@pytest.fixture
def make_setup(testnet, onion_mx, dnsmasq_factory, daemon_factory, serve_dir, postfix_factory,
               clear_sink):
    def make(socks: tuple[str, int] | None = None) -> Setup:
        return start_chain(onion_mx, socks or testnet.socks_extended, lmtp=True,
                           dnsmasq_factory=dnsmasq_factory, daemon_factory=daemon_factory,
                           postfix_factory=postfix_factory, serve_dir=serve_dir,
                           clear_sink=clear_sink)

    return make


@pytest.fixture
def setup(make_setup) -> Setup:
    return make_setup()


def test_delivery_headers_intact_and_connection_reused(setup: Setup) -> None:
    sent = {"user@example.test": message("lmtp srv"),
            "someone@pinned.test": message("lmtp pin", "someone@pinned.test"),
            "third@example.test": message("lmtp third", "third@example.test")}
    for n, (rcpt, data) in enumerate(sent.items(), 1):  # one after another: the pool is used
        setup.postfix.submit("alice@origin.test", [rcpt], data)
        setup.mx.sink.wait_for(n, timeout=60)
        # the MX stores before the relay has its reply: wait until Postfix has it too
        setup.postfix.wait(lambda n=n: setup.postfix.log().count("status=sent") >= n, 30)
    got = setup.mx.sink.messages
    setup.postfix.wait_empty(30)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(sent)
    for m in got:
        original = sent[m.rcpt_tos[0]]
        assert headers(m.data) == headers(original)  # every header kept, in order
        assert m.data.endswith(b"\r\n\r\nhello\r\n")
        assert m.mail_from == "alice@origin.test"
    # one SMTP session through tor carried all three (RSET between), EHLO name not leaked
    assert setup.mx.sink.ehlo_names == ["localhost"], setup.daemon.log()[-3000:]
    log = setup.postfix.log()
    # Postfix saw the onion's own destination: a link to the daemon's one socket
    link = lmtp_destination(setup.lmtp_sock, setup.mx.onion)
    assert os.readlink(link) == str(setup.lmtp_sock)
    assert log.count(f"[{link}], ") == 3 and log.count("status=sent") == 3
    assert log.count("said: 250 2.0.0 stored (in reply to BDAT)") == 3
    assert setup.postfix.queue() == [] and setup.clear.messages == []
    assert setup.daemon.wait_log("lmtp rcpt=", count=3)


def test_one_transaction_gets_exact_status_per_recipient(setup: Setup) -> None:
    """No recipient limit: Postfix's lmtp sends all three in one transaction, the relay
    answers each with its onion's own reply."""
    setup.mx.sink.reject("gone@example.test", "550 5.1.1 <gone@example.test>: no mailbox "
                         "by that name at the onion")
    setup.postfix.submit("alice@origin.test", ["user@example.test", "gone@example.test",
                                               "x@pinned.test"], message("three"))
    [got] = setup.mx.sink.wait_for(1, timeout=60)  # one copy to the MX, two recipients
    assert sorted(got.rcpt_tos) == ["user@example.test", "x@pinned.test"]
    [dsn] = setup.clear.wait_for(1, timeout=30)  # the bounce goes back to alice (clear net)
    assert dsn.rcpt_tos == ["alice@origin.test"] and dsn.mail_from == "<>"
    assert b"Final-Recipient: rfc822; gone@example.test" in dsn.data
    assert b"no mailbox by that name at the onion" in dsn.data and b"5.1.1" in dsn.data
    assert b"Final-Recipient: rfc822; user@example.test" not in dsn.data
    setup.postfix.wait_empty(30)
    lmtp = [ln for ln in setup.postfix.log().splitlines() if "postfix/lmtp[" in ln]
    assert sum("status=sent" in ln for ln in lmtp) == 2
    assert sum("status=bounced" in ln for ln in lmtp) == 1


def test_remote_451_defers_then_delivers(setup: Setup) -> None:
    setup.mx.sink.reject("busy@example.test", "451 4.2.0 mailbox busy, try later")
    setup.postfix.submit("alice@origin.test", ["busy@example.test"], message("defer me"))
    queued = setup.postfix.wait_queued(1)
    reason = queued[0]["recipients"][0]["delay_reason"]
    assert "mailbox busy" in reason and "dsn=4.2.0, status=deferred" in setup.postfix.log()
    assert setup.clear.messages == [] and setup.mx.sink.messages == []
    assert "status=bounced" not in setup.postfix.log()
    setup.mx.sink.reset()
    setup.postfix.flush()
    setup.mx.sink.wait_for(1, timeout=60)
    setup.postfix.wait_empty(30)
    time.sleep(2)
    assert len(setup.mx.sink.messages) == 1


def test_socksport_down_defers_then_delivers_exactly_once(make_setup, testnet) -> None:
    """The daemon's SocksPort is closed (tor not there): mail waits; tor opens it; flush."""
    port = free_port()
    setup = make_setup(socks=("127.0.0.1", port))
    setup.postfix.submit("alice@origin.test", ["user@example.test"], message("tor down"))
    queued = setup.postfix.wait_queued(1)
    reason = queued[0]["recipients"][0]["delay_reason"]
    assert f"tor SocksPort 127.0.0.1:{port} unreachable" in reason
    log = setup.postfix.log()
    assert "dsn=4.4.1, status=deferred" in log and "status=bounced" not in log
    time.sleep(3)  # a retry or two while tor is away: still deferred, nothing elsewhere
    assert setup.mx.sink.messages == [] and setup.clear.messages == []
    with extra_socks_port(testnet, port):
        setup.postfix.flush()
        setup.mx.sink.wait_for(1, timeout=60)
        setup.postfix.wait_empty(30)
        time.sleep(3)
    assert len(setup.mx.sink.messages) == 1 and setup.clear.messages == []
    assert setup.postfix.log().count("status=sent") == 1


def test_daemon_down_defers_then_delivers_exactly_once(setup: Setup, daemon_factory) -> None:
    setup.daemon.stop()
    assert not setup.lmtp_sock.exists()
    subprocess.run(["/usr/sbin/sendmail", "-C", str(setup.postfix.confdir), "-f",
                    "alice@origin.test", "user@example.test"], input=message("daemon down"),
                   check=True, timeout=30)
    setup.postfix.wait_queued(1)
    time.sleep(3)
    log = setup.postfix.log()
    assert "status=bounced" not in log and "status=sent" not in log
    assert setup.mx.sink.messages == [] and setup.clear.messages == []
    again = daemon_factory(*setup.daemon.args)
    wait_socket(str(setup.lmtp_sock), proc=again.proc)
    setup.postfix.flush()
    setup.mx.sink.wait_for(1, timeout=60)
    setup.postfix.wait_empty(30)
    time.sleep(2)
    assert len(setup.mx.sink.messages) == 1 and setup.clear.messages == []


def test_lmtp_sessions_are_reused_under_a_backlog(setup: Setup) -> None:
    """40 messages handed to Postfix at once: its lmtp(8) caches the LMTP connection (on demand,
    with a backlog; RSET after each transaction tells it the session is still good) and sends
    further messages over it (``conn_use=`` > 1 in its log).  No traceback in the daemon."""
    import re
    import smtplib

    count = 40
    with smtplib.SMTP("127.0.0.1", setup.postfix.port, local_hostname="client.test",
                      timeout=60) as client:  # one SMTP session: the backlog builds at once
        for n in range(count):
            rcpt = f"r{n}@pinned.test" if n % 2 else f"r{n}@example.test"
            client.sendmail("alice@origin.test", [rcpt],
                            message(f"backlog {n}", rcpt).replace(b"\n", b"\r\n"))
    setup.mx.sink.wait_for(count, timeout=120)
    setup.postfix.wait(lambda: setup.postfix.log().count("status=sent") >= count, 60)
    setup.postfix.wait_empty(30)
    lmtp = [ln for ln in setup.postfix.log().splitlines()
            if "postfix/torroute-lmtp/lmtp[" in ln or "postfix/lmtp[" in ln]
    sent = [ln for ln in lmtp if "status=sent" in ln]
    link = lmtp_destination(setup.lmtp_sock, setup.mx.onion)
    assert len(sent) == count and all(f"[{link}]," in ln for ln in sent)
    uses = [int(m.group(1)) for ln in sent if (m := re.search(r", conn_use=(\d+),", ln))]
    print(f"lmtp deliveries: {len(sent)}, over a reused connection: {len(uses)}, "
          f"conn_use max {max(uses, default=1)}")
    assert uses and max(uses) > 1, "\n".join(sent)
    assert not any("lost connection" in ln or "Connection reset" in ln for ln in lmtp), lmtp
    # each message once at the onion, none on the clear net
    ids = sorted(m.data.split(b"Message-ID: <", 1)[1].split(b">", 1)[0] for m in
                 setup.mx.sink.messages)
    assert ids == sorted(f"backlog-{n}@origin.test".encode() for n in range(count))
    assert setup.clear.messages == []
    log = setup.daemon.wait_log("lmtp rcpt=", count=count)
    assert setup.daemon.error_lines() == [], log[-3000:]
    assert "Traceback" not in log and "read() called while another coroutine" not in log
