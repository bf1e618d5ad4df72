"""Header scrubbing on the library's send path (``torroute.send_message``, which ``torroute
send`` builds on), delivering over the private Tor network into the session's onion sink.

The stored bytes are compared with an oracle written out by hand: an onion identity's message
loses Received / Message-ID / X-Mailer / User-Agent and gets ``Message-ID: <sha256(original
id)@<its onion>>`` at the end of its header section, once for every onion it goes to; an
ordinary sender's message is stored exactly as given.
"""

from __future__ import annotations

import hashlib
from email.message import EmailMessage
from pathlib import Path

import pytest
from support.onions import ONION_B

import torroute

pytestmark = [pytest.mark.testnet]

IDENTITY = f"me@{ONION_B}"
ORIGINAL_ID = b"<1.2.3@laptop.clearnet-host.example.net>"
HEAD = (b"Subject: send_message scrub\nMessage-Id: " + ORIGINAL_ID + b"\n"
        b"X-Mailer: a script\nReceived: from laptop.clearnet-host.example.net\n\tby itself\n"
        b"User-Agent: smtp-bot/1.0\nX-Custom: \xc3\xa9 kept\n")
BODY = b"\nbody\n.leading dot\nUser-Agent: a body line\n"


def raw(sender: str) -> bytes:
    return f"From: <{sender}>\nTo: <alice@pinned.test>\n".encode() + HEAD + BODY


@pytest.fixture
def config(testnet, onion_sink, tmp_path: Path):
    pins = tmp_path / "pins.txt"
    pins.write_text(f"pinned.test {onion_sink.onion}\n")
    return torroute.load_config(Path("/dev/null"), maps=[str(pins)],
                                tor_socks=f"{testnet.socks_extended[0]}:"
                                          f"{testnet.socks_extended[1]}",
                                deliver={"time_limit": 90})


def test_send_message_scrubs_an_onion_identity_exactly(config, onion_sink) -> None:
    rcpts = ["alice@pinned.test", f"bob@{onion_sink.onion}"]  # one onion: one transaction
    results = torroute.send_message(raw(IDENTITY), IDENTITY, rcpts, config=config)
    assert all(r.delivered for r in results.values()), results
    [got] = onion_sink.sink.wait_for(1, timeout=90)
    assert got.mail_from == IDENTITY and got.rcpt_tos == rcpts
    expected = (f"From: <{IDENTITY}>\nTo: <alice@pinned.test>\n".encode()
                + b"Subject: send_message scrub\nX-Custom: \xc3\xa9 kept\n"
                + b"Message-ID: <" + hashlib.sha256(ORIGINAL_ID).hexdigest().encode()
                + b"@" + ONION_B.encode() + b">\n" + BODY).replace(b"\n", b"\r\n")
    assert got.data == expected, got.data
    assert onion_sink.sink.path_of(got).read_bytes().endswith(b"\r\n" + expected)


def test_send_message_leaves_other_senders_alone(config, onion_sink) -> None:
    sender = "alice@origin.test"
    result = torroute.send_message(raw(sender), sender, "alice@pinned.test",
                                   config=config)["alice@pinned.test"]
    assert result.delivered, result
    [got] = onion_sink.sink.wait_for(1, timeout=90)
    assert got.data == raw(sender).replace(b"\n", b"\r\n")


def test_send_message_email_message_and_settings(config, onion_sink) -> None:
    """An EmailMessage from an onion identity's subdomain, with [deliver] scrub_* given by
    load_config: only the named headers go, no new Message-ID."""
    config.raw = {**config.raw, "deliver": {"time_limit": 90, "scrub_senders": [".onion"],
                                            "scrub_headers": ["X-Mailer", "Received"],
                                            "scrub_message_id": False}}
    msg = EmailMessage()
    msg["From"] = f"Me <me@mail.{ONION_B}>"
    msg["To"] = "alice@pinned.test"
    msg["Subject"] = "EmailMessage scrub"
    msg["Message-ID"] = ORIGINAL_ID.decode()
    msg["X-Mailer"] = "a script"
    msg["Received"] = "from laptop.clearnet-host.example.net"
    msg.set_content("hello\n")
    [result] = torroute.send_message(msg, config=config).values()
    assert result.delivered, result
    [got] = onion_sink.sink.wait_for(1, timeout=90)
    assert got.mail_from == f"me@mail.{ONION_B}"
    head = got.data.split(b"\r\n\r\n", 1)[0]
    assert b"X-Mailer" not in head and b"Received" not in head
    assert b"Message-ID: " + ORIGINAL_ID in head and b"Subject: EmailMessage scrub" in head
    assert got.data.endswith(b"\r\n\r\nhello\r\n")
