"""An SMTP sink that stores mail in a Maildir: the "remote MX" behind a test onion service.

Why: end-to-end tests (and the demo) need a real SMTP server at the far end of the onion that
keeps what it received, and that can be told to refuse a recipient with 550 (permanent: the
message must bounce) or 451 (temporary: the message must stay queued).  aiosmtpd is real SMTP;
this only adds storage and per-recipient answers.  Needs aiosmtpd (torroute's ``test`` extra).
"""

from __future__ import annotations

import mailbox
import socket
import threading
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path


@dataclass
class Received:
    """One accepted message: envelope, raw data and where it was stored."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str
    key: str  # the Maildir key

    @property
    def message(self) -> Message:
        return message_from_bytes(self.data)


@dataclass
class _Rules:
    rcpt: dict[str, str] = field(default_factory=dict)  # lowercased address -> SMTP reply
    data: str | None = None


class _Handler:
    def __init__(self, sink: MaildirSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        reply = self.sink._rules.rcpt.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.sink._rules.data:
            return self.sink._rules.data
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self.sink._store(envelope.mail_from, list(envelope.rcpt_tos), data,
                         str(session.peer))
        return "250 2.0.0 stored"


class MaildirSink:
    """An SMTP server on 127.0.0.1 storing every accepted message in ``maildir``.

    ``sink.reject("x@example.test", "550 5.1.1 no such user")`` makes RCPT for that address
    fail; ``sink.reject_data("451 4.3.0 try later")`` fails every DATA.  ``sink.messages``
    lists what arrived; ``sink.wait_for(n)`` blocks until n messages are there.
    """

    def __init__(self, maildir: Path | str, port: int = 0, host: str = "127.0.0.1",
                 hostname: str = "sink.testnet.invalid") -> None:
        self.maildir_path = Path(maildir)
        self.host = host
        self.port = port
        self.hostname = hostname
        self.messages: list[Received] = []
        self._rules = _Rules()
        self._cv = threading.Condition()
        self._controller = None
        self._mailbox: mailbox.Maildir | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> MaildirSink:
        from aiosmtpd.controller import Controller

        self.maildir_path.parent.mkdir(parents=True, exist_ok=True)
        self._mailbox = mailbox.Maildir(self.maildir_path, create=True)
        if not self.port:
            with socket.socket() as probe:  # aiosmtpd needs a concrete port for its self-test
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        self._controller = Controller(_Handler(self), hostname=self.host, port=self.port,
                                      server_hostname=self.hostname, ready_timeout=10)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> MaildirSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- behaviour switches

    def reject(self, recipient: str, reply: str = "550 5.1.1 no such user here") -> None:
        """Answer RCPT TO:<recipient> with ``reply`` (e.g. ``451 4.2.0 try later``)."""
        self._rules.rcpt[recipient.lower()] = reply

    def reject_data(self, reply: str | None) -> None:
        """Answer every DATA with ``reply`` (None: accept again)."""
        self._rules.data = reply

    def reset(self) -> None:
        """Accept everything again and forget (and delete) what was received."""
        self._rules = _Rules()
        with self._cv:
            self.messages.clear()
            if self._mailbox is not None:
                self._mailbox.clear()

    # ---- received mail

    def _store(self, mail_from: str, rcpt_tos: list[str], data: bytes, peer: str) -> None:
        header = (f"Return-Path: <{mail_from}>\r\n"
                  f"X-Sink-Envelope-To: {', '.join(rcpt_tos)}\r\n").encode()
        with self._cv:
            key = self._mailbox.add(header + data) if self._mailbox is not None else ""
            self.messages.append(Received(mail_from, rcpt_tos, data, peer, key))
            self._cv.notify_all()

    def path_of(self, received: Received) -> Path:
        """The Maildir file holding ``received``."""
        return self.maildir_path / "new" / received.key

    def wait_for(self, count: int = 1, timeout: float = 30.0) -> list[Received]:
        """Block until at least ``count`` messages arrived; raises TimeoutError otherwise."""
        with self._cv:
            if not self._cv.wait_for(lambda: len(self.messages) >= count, timeout=timeout):
                raise TimeoutError(f"{len(self.messages)} of {count} messages arrived at "
                                   f"{self.maildir_path} within {timeout:g}s")
            return list(self.messages)
