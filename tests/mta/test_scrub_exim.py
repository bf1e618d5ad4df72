"""torroute's scrubber against the Exim plugin's ``TORROUTE_SCRUB_SENDER_DOMAINS``, same input.

A real Exim with the shipped plugin (``torroute serve --exim`` routing, tor's SocksPort)
delivers a message from an onion identity to the session's onion sink on the private Tor
network.  torroute.delivery.scrub's output for the same message must be byte-identical to
what Exim delivered, except the new Message-ID's hash: Exim hashes its own message id
(``$message_id``), torroute the original Message-ID (docs/scrub.rst says why).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from support.onions import ONION_C

from torroute.delivery.scrub import DEFAULT_HEADERS, scrub
from torroute.testing.dnsmasq import SrvRecord

pytestmark = [pytest.mark.exim, pytest.mark.testnet]

IDENTITY = f"me@{ONION_C}"
HEADERS = ("Message-ID:\n <20261122.1@clearnet-host.example.net>\n"
           "Date: Sun, 22 Nov 2026 10:00:00 +0000\nX-Mailer: Mutt 2.2\n"
           "received: from laptop.clearnet-host.example.net\n\tby the MUA; folded\n"
           "X-Custom: caf\u00e9\n\tfolded, kept\nUser-Agent: NeoMutt/20220429\n")
BODY = "body\n.leading dot\nReceived: a body line\n"
NEW_ID = re.compile(rb"^Message-ID: <([0-9a-f]{64})@" + re.escape(ONION_C.encode()) + rb">\r$",
                    re.M)


@pytest.fixture
def exim_routed(testnet, dnsmasq_factory, daemon_factory, serve_dir: Path):
    """`torroute serve --exim` with pinned.example pinned to the session's onion sink."""
    dns = dnsmasq_factory([SrvRecord("_onion-mx._tcp.none.example", testnet.onion, 25)],
                          local_domains=["example"])
    (serve_dir / "map.txt").write_text(f"pinned.example {testnet.onion}\n")
    return daemon_factory(
        "--map", str(serve_dir / "map.txt"), "--nameserver", f"127.0.0.1:{dns.port}",
        "--tor-dns", f"{testnet.dns[0]}:{testnet.dns[1]}", "--local-domain", "local.test",
        "--socket-group", "Debian-exim")


def test_same_bytes_as_the_exim_plugin_but_the_hash(testnet, onion_sink, exim_routed,
                                                    exim_plugin_factory) -> None:
    exim = exim_plugin_factory(exim_routed.exim, testnet.socks, perl=False,
                               macros={"TORROUTE_SCRUB_SENDER_DOMAINS": "*.onion"})
    rcpt = "ivy@pinned.example"
    msgid = exim.submit(rcpt, sender=IDENTITY, subject="compare", headers=HEADERS, body=BODY)
    [got] = onion_sink.sink.wait_for(1, timeout=90)
    assert got.mail_from == IDENTITY and got.rcpt_tos == [rcpt]
    # what exim.submit handed Exim (its text form), as SMTP carries it
    submitted = (f"From: {IDENTITY}\nTo: {rcpt}\nSubject: compare\n{HEADERS}\n{BODY}"
                 ).encode().replace(b"\n", b"\r\n")
    ours = scrub(submitted, DEFAULT_HEADERS, ONION_C)
    [exim_hash] = NEW_ID.findall(got.data)
    [our_hash] = NEW_ID.findall(ours)
    assert exim_hash.decode() == hashlib.sha256(msgid.encode()).hexdigest()  # Exim's input
    assert our_hash.decode() == hashlib.sha256(
        b"<20261122.1@clearnet-host.example.net>").hexdigest()  # ours
    assert got.data.replace(exim_hash, b"HASH") == ours.replace(our_hash, b"HASH"), (
        got.data, ours)
    assert exim.queue_count() == 0
