"""Header scrubbing through a real Postfix, both delivery modes, on the private Tor network:

    smtplib -> Postfix smtpd (adds its Received) -> socketmap -> `torroute serve`
            -> pipe(8) + `torroute deliver`   or   lmtp(8) -> the daemon's LMTP relay
            -> tor -> onion service -> SMTP sink

The bytes the onion MX stored are checked against an oracle written out by hand (not computed
with the scrubber): mail from an onion identity arrives without Received / Message-ID /
X-Mailer / User-Agent, with ``Message-ID: <sha256(original id)@<sender's onion>>`` at the end of
its header section, and is otherwise byte-identical to what was submitted (folding, order, 8-bit
bytes, body); mail from an ordinary sender arrives as submitted plus Postfix's own Received.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest
from support.e2e import SRV, OnionMX, Setup, start_chain, start_lmtp_postfix, write_config
from support.onions import ONION_A
from support.paths import REPO

from torroute.delivery.scrub import header_fields
from torroute.testing.dnsmasq import SrvRecord

pytestmark = [pytest.mark.testnet, pytest.mark.postfix]

IDENTITY = f"me@{ONION_A}"  # an onion identity: its domain is a (valid) v3 onion
ORIGINAL_ID = b"<20261122100000.4ABC@clearnet-host.example.net>"
NEW_ID = f"<{hashlib.sha256(ORIGINAL_ID).hexdigest()}@{ONION_A}>".encode()
BODY = (b"hello from an onion identity\n.leading dot\nReceived: a body line, kept\n"
        b"Message-ID: <also@kept>\n8-bit \xc3\xa9\xff\n")


def submitted(sender: str, rcpt: str) -> bytes:
    """What the client submits (LF; Postfix.submit sends CRLF)."""
    return (f"From: Me <{sender}>\nTo: <{rcpt}>\n".encode()
            + b"Subject: scrub test caf\xc3\xa9\n"
            + b"Message-ID:\n " + ORIGINAL_ID + b"\n"
            + b"Date: Sun, 22 Nov 2026 10:00:00 +0000\n"
            + b"X-Mailer: Mutt 2.2.9\n"
            + b"Received: from laptop.clearnet-host.example.net by the MUA\n\tfolded; x\n"
            + b"user-agent: NeoMutt/20220429\n"
            + b"X-Custom: kept\n\tfolded and kept\n"
            + b"\n" + BODY)


def scrubbed_oracle(rcpt: str) -> bytes:
    """The same message as the onion MX must store it (CRLF, as SMTP carries it)."""
    return (f"From: Me <{IDENTITY}>\nTo: <{rcpt}>\n".encode()
            + b"Subject: scrub test caf\xc3\xa9\n"
            + b"Date: Sun, 22 Nov 2026 10:00:00 +0000\n"
            + b"X-Custom: kept\n\tfolded and kept\n"
            + b"Message-ID: " + NEW_ID + b"\n"
            + b"\n" + BODY).replace(b"\n", b"\r\n")


@pytest.fixture
def onion_mx(onion_sink) -> OnionMX:
    """The session's onion sink, which keeps a Maildir (the stored bytes are checked)."""
    return OnionMX(onion_sink.onion, onion_sink.sink)


@pytest.fixture(params=["pipe", "lmtp"])
def setup(request, testnet, onion_mx, dnsmasq_factory, daemon_factory, serve_dir,
          postfix_factory, clear_sink) -> Setup:
    return start_chain(onion_mx, testnet.socks_extended, lmtp=request.param == "lmtp",
                       dnsmasq_factory=dnsmasq_factory, daemon_factory=daemon_factory,
                       postfix_factory=postfix_factory, serve_dir=serve_dir,
                       clear_sink=clear_sink)


def test_onion_identity_scrubbed_others_untouched(setup: Setup) -> None:
    sent = {("user@example.test", IDENTITY): submitted(IDENTITY, "user@example.test"),
            ("someone@pinned.test", "alice@origin.test"):
                submitted("alice@origin.test", "someone@pinned.test")}
    for n, ((rcpt, sender), data) in enumerate(sent.items(), 1):
        setup.submitted(sender, [rcpt], data)
        setup.mx.sink.wait_for(n, timeout=90)
    setup.postfix.wait(lambda: setup.postfix.log().count("status=sent") >= 2, 60)
    setup.postfix.wait_empty(30)
    got = {m.mail_from: m for m in setup.mx.sink.messages}
    assert sorted(got) == ["alice@origin.test", IDENTITY]

    # the onion identity's message: exactly the oracle, on the wire and in the Maildir
    onion = got[IDENTITY]
    assert onion.rcpt_tos == ["user@example.test"]
    expected = scrubbed_oracle("user@example.test")
    assert onion.data == expected, (onion.data, expected)
    on_disk = setup.mx.sink.path_of(onion).read_bytes()
    assert on_disk.endswith(b"\r\n" + expected)  # below the sink's own envelope lines
    assert b"clearnet-host" not in on_disk and b"Mutt" not in on_disk

    # an ordinary sender's message: what was submitted, below Postfix's own Received only
    plain = got["alice@origin.test"]
    original = sent[("someone@pinned.test", "alice@origin.test")].replace(b"\n", b"\r\n")
    assert plain.data.endswith(original)
    added = plain.data[:-len(original)]
    fields, end = header_fields(added)
    assert added and end == len(added) and {name for name, _ in fields} == {b"received"}
    assert b"by " in added and b"Postfix" in added  # Postfix's, naming its host: kept

    log = setup.postfix.log()
    assert log.count("status=sent") == 2 and "status=bounced" not in log
    assert "status=deferred" not in log and setup.clear.messages == []


@pytest.mark.parametrize("mode", ["pipe", "lmtp"])
def test_scrub_settings_from_the_config_file(mode, testnet, onion_mx, dnsmasq_factory,
                                             daemon_factory, serve_dir, postfix_factory,
                                             clear_sink) -> None:
    """[deliver] scrub_*: another identity domain, other headers, no new Message-ID; read by
    the pipe (as the pipe user) and by the daemon's relay from the same file."""
    dns = dnsmasq_factory([SrvRecord(SRV + "example.test", onion_mx.onion, 25)])
    cfg = write_config(serve_dir, dns.port, onion_mx.onion, testnet.socks_extended, extra=(
        '[deliver]\nscrub_senders = [".identity.test"]\n'
        'scrub_headers = ["X-Custom", "X-Mailer*"]\nscrub_message_id = false\n'))
    if mode == "lmtp":
        _, pf, _ = start_lmtp_postfix(cfg, serve_dir, daemon_factory, postfix_factory)
    else:
        daemon = daemon_factory("--config", str(cfg), "--socket-group", "postfix")
        pf = postfix_factory(daemon.socketmap_table, deliver_config=cfg.read_text())
    data = submitted("me@mail.identity.test", "user@example.test")
    pf.submit("me@mail.identity.test", ["user@example.test"], data)
    pf.submit(IDENTITY, ["user@example.test"], data)  # not in scrub_senders now: untouched
    got = {m.mail_from: m for m in onion_mx.sink.wait_for(2, timeout=90)}
    pf.wait(lambda: pf.log().count("status=sent") >= 2, 60)
    scrubbed = got["me@mail.identity.test"].data
    kept = b"\r\n".join(line for line in data.split(b"\n")[:12]
                        if not line.startswith((b"X-Custom", b"\tfolded and", b"X-Mailer")))
    assert b"\r\n" + kept + b"\r\n" in scrubbed  # Message-ID, Received, User-Agent kept
    assert scrubbed.endswith(b"\r\n\r\n" + BODY.replace(b"\n", b"\r\n"))
    assert b"X-Custom" not in scrubbed.split(b"\r\n\r\n")[0] and b"X-Mailer" not in scrubbed
    assert got[IDENTITY].data.endswith(data.replace(b"\n", b"\r\n"))
    assert clear_sink.messages == [] and "status=bounced" not in pf.log()


def test_bad_scrub_settings_defer_and_the_relay_refuses_to_start(
        testnet, onion_mx, dnsmasq_factory, daemon_factory, serve_dir, postfix_factory,
        clear_sink) -> None:
    """An operator's mistake in scrub_* delays mail, never sends it unscrubbed: the pipe
    defers 4.3.5 naming the key; `torroute serve --lmtp` exits 78 on the same file."""
    dns = dnsmasq_factory([SrvRecord(SRV + "example.test", onion_mx.onion, 25)])
    cfg = write_config(serve_dir, dns.port, onion_mx.onion, testnet.socks_extended)
    bad = cfg.read_text() + '\n[deliver]\nscrub_senders = ["bad domain"]\n'
    daemon = daemon_factory("--config", str(cfg), "--socket-group", "postfix")
    pf = postfix_factory(daemon.socketmap_table, deliver_config=bad)
    pf.submit(IDENTITY, ["user@example.test"], submitted(IDENTITY, "user@example.test"))
    queued = pf.wait_queued(1)
    reason = queued[0]["recipients"][0]["delay_reason"]
    assert "configuration error" in reason and "deliver.scrub_senders" in reason, reason
    assert "dsn=4.3.5, status=deferred" in pf.log() and "status=bounced" not in pf.log()
    time.sleep(2)
    assert onion_mx.sink.messages == [] and clear_sink.messages == []
    bad_file = serve_dir / "bad.toml"
    bad_file.write_text(bad)
    r = subprocess.run([sys.executable, "-m", "torroute.cli", "serve", "--config", str(bad_file),
                        "--socketmap", f"unix:{serve_dir / 'bad-socketmap.sock'}",
                        "--lmtp", f"unix:{serve_dir / 'bad-lmtp.sock'}"],
                       capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert r.returncode == 78, r.stderr
    assert "configuration error" in r.stderr and "deliver.scrub_senders" in r.stderr
    assert "Traceback" not in r.stderr and not (serve_dir / "bad-lmtp.sock").exists()
