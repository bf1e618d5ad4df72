"""An SMTP sink on 127.0.0.1 that keeps what it receives: the "remote MX" of a test.

Why: end-to-end tests (and the demo) need a real SMTP server at the far end -- behind a test
onion service, or standing in for the clear net -- that keeps what it received and can be told
to refuse a recipient with 550 (permanent: the message must bounce) or 451 (temporary: the
message must stay queued).  aiosmtpd is real SMTP (SMTPUTF8 and PIPELINING on request); this
adds storage (in memory, and in a Maildir when given one) and per-recipient answers.  Needs
aiosmtpd (torroute's ``test`` or ``testnet`` extra); importing this module does not.
"""

from __future__ import annotations

import mailbox
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING

from .ports import free_port

if TYPE_CHECKING:
    import ssl


#: MaildirSink options for an MX like a modern Postfix: SMTPUTF8, PIPELINING, CHUNKING (BDAT,
#: Postfix >= 3.4 offers it by default), 64 MiB messages
#: (``MaildirSink(**ESMTP_FULL)``).  Off by default, as aiosmtpd: Exim's deliveries to a sink
#: offering both were deferred with "Remote host closed connection in response to end of data"
#: (tests/mta/test_exim_testnet.py), though the sink had stored the message.
ESMTP_FULL = {"smtputf8": True, "pipelining": True, "chunking": True,
              "data_size_limit": 64 * 1024 * 1024}


@dataclass
class Received:
    """One accepted message: envelope, raw data (as sent, CRLF line ends) and where it went."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str = ""
    key: str = ""  # the Maildir key ("" when the sink keeps no Maildir)
    mail_options: list[str] = field(default_factory=list)  # MAIL FROM parameters (SIZE=...)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def message(self) -> Message:
        return message_from_bytes(self.data)


class SinkHandler:
    """The aiosmtpd handler of a :class:`MaildirSink`; subclass it to add commands."""

    def __init__(self, sink: MaildirSink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802
        self.sink.ehlo_names.append(hostname)
        session.host_name = hostname
        if self.sink.pipelining:
            responses.insert(-1, "250-PIPELINING")
        if self.sink.chunking and hasattr(server, "smtp_BDAT"):  # served by ChunkingSMTP
            responses.insert(-1, "250-CHUNKING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        reply = self.sink.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.sink.data_delay > 0:  # a slow MX (bench/fairness.py): the reply comes late
            import asyncio

            await asyncio.sleep(self.sink.data_delay)
        if self.sink.data_reply:
            return self.sink.data_reply
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self.sink._store(envelope.mail_from, list(envelope.rcpt_tos), data, str(session.peer),
                         list(envelope.mail_options))
        return "250 2.0.0 stored"


def _chunking_server():
    """aiosmtpd's SMTP with BDAT (RFC 3030), which aiosmtpd lacks: chunks of exactly the size
    given, no dot-stuffing, the handler's DATA hook on ``BDAT n LAST`` (as Postfix's smtpd:
    ``554 5.5.1`` without a valid recipient, the chunk read and dropped).  Made on first use:
    importing this module does not need aiosmtpd."""
    import asyncio

    from aiosmtpd.smtp import MISSING, SMTP

    class ChunkingSMTP(SMTP):
        async def smtp_BDAT(self, arg: str) -> None:  # noqa: N802
            if await self.check_helo_needed("EHLO") or await self.check_auth_needed("BDAT"):
                return
            words = arg.split()
            if not (1 <= len(words) <= 2 and words[0].isdigit()
                    and (len(words) == 1 or words[1].upper() == "LAST")):
                # the chunk's end is unknowable now: no way to stay in step with the client
                await self.push("501 5.5.4 Syntax: BDAT size [LAST]; closing")
                self.transport.close()
                return
            size, last = int(words[0]), len(words) == 2
            try:
                chunk = await self._reader.readexactly(size) if size else b""
            except asyncio.IncompleteReadError:  # the client went away mid-chunk
                self.transport.close()
                return
            envelope = self.envelope
            chunks: list[bytes] = getattr(envelope, "bdat_chunks", None) or []
            if envelope.mail_from is None:
                await self.push("503 5.5.1 Error: need MAIL command")
                return
            if not envelope.rcpt_tos:
                self._set_post_data_state()
                await self.push("554 5.5.1 Error: no valid recipients")
                return
            chunks.append(chunk)
            envelope.bdat_chunks = chunks
            total = sum(map(len, chunks))
            if self.data_size_limit and total > self.data_size_limit:
                self._set_post_data_state()
                await self.push("552 5.3.4 Error: message too large")
                return
            if not last:
                await self.push(f"250 2.0.0 {size} bytes received")
                return
            envelope.original_content = envelope.content = b"".join(chunks)
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)

    return ChunkingSMTP


class MaildirSink:
    """An SMTP server on 127.0.0.1 storing every accepted message (and in ``maildir``, if given).

    ``sink.reject("x@example.test", "550 5.1.1 no such user")`` makes RCPT for that address
    fail; ``sink.reject_data("451 4.3.0 try later")`` (or setting ``data_reply``) fails every
    DATA.  ``sink.messages`` lists what arrived (:class:`Received`); ``sink.wait_for(n)`` blocks
    until n messages are there; ``sink.ehlo_names`` records each EHLO's name (what a client
    leaked about itself).  ``reset()`` accepts everything again and forgets what arrived.

    ``tls_context`` offers STARTTLS (``require_starttls`` insists on it); ``smtputf8``,
    ``pipelining`` and ``chunking`` say whether those are offered (default: not, as aiosmtpd;
    ``**ESMTP_FULL`` offers all three and takes 64 MiB).  ``data_delay`` (seconds) holds every
    reply to the end of the message that long: a slow MX, for fairness benches.  Also a
    context manager.
    """

    def __init__(self, maildir: Path | str | None = None, port: int = 0,
                 host: str = "127.0.0.1", hostname: str = "sink.testnet.invalid", *,
                 smtputf8: bool = False, pipelining: bool = False, chunking: bool = False,
                 tls_context: ssl.SSLContext | None = None, require_starttls: bool = False,
                 data_size_limit: int = 33554432, data_delay: float = 0.0) -> None:
        self.maildir_path = Path(maildir) if maildir is not None else None
        self.host = host
        self.port = port
        self.hostname = hostname
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.chunking = chunking
        self.tls_context = tls_context
        self.require_starttls = require_starttls
        self.data_size_limit = data_size_limit
        self.data_delay = data_delay
        self.messages: list[Received] = []
        self.ehlo_names: list[str] = []
        self.rcpt_replies: dict[str, str] = {}  # lowercased address -> SMTP reply
        self.data_reply: str | None = None
        self._cv = threading.Condition()
        self._controller = None
        self._mailbox: mailbox.Maildir | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def handler(self) -> SinkHandler:
        """The aiosmtpd handler (override to serve through a subclass of SinkHandler)."""
        return SinkHandler(self)

    def start(self) -> MaildirSink:
        from aiosmtpd.controller import Controller

        server_class = _chunking_server() if self.chunking else None

        class SinkController(Controller):
            def factory(self):
                if server_class is None:
                    return super().factory()
                return server_class(self.handler, **self.SMTP_kwargs)

        if self.maildir_path is not None:
            self.maildir_path.parent.mkdir(parents=True, exist_ok=True)
            self._mailbox = mailbox.Maildir(self.maildir_path, create=True)
        if not self.port:  # aiosmtpd needs a concrete port for its self-test
            self.port = free_port() if self.host == "127.0.0.1" else _free_port_on(self.host)
        self._controller = SinkController(
            self.handler(), hostname=self.host, port=self.port, server_hostname=self.hostname,
            enable_SMTPUTF8=self.smtputf8, data_size_limit=self.data_size_limit,
            tls_context=self.tls_context, require_starttls=self.require_starttls,
            ready_timeout=10)
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
        self.rcpt_replies[recipient.lower()] = reply

    def reject_data(self, reply: str | None) -> None:
        """Answer every DATA with ``reply`` (None: accept again)."""
        self.data_reply = reply

    def reset(self) -> None:
        """Accept everything again and forget (and delete) what was received."""
        with self._cv:
            self.rcpt_replies.clear()
            self.data_reply = None
            self.ehlo_names.clear()
            self.messages.clear()
            if self._mailbox is not None:
                self._mailbox.clear()

    # ---- received mail

    def _store(self, mail_from: str, rcpt_tos: list[str], data: bytes, peer: str = "",
               mail_options: list[str] | None = None) -> None:
        header = (f"Return-Path: <{mail_from}>\r\n"
                  f"X-Sink-Envelope-To: {', '.join(rcpt_tos)}\r\n").encode()
        with self._cv:
            key = self._mailbox.add(header + data) if self._mailbox is not None else ""
            self.messages.append(Received(mail_from, rcpt_tos, data, peer, key,
                                          list(mail_options or [])))
            self._cv.notify_all()

    def path_of(self, received: Received) -> Path:
        """The Maildir file holding ``received``."""
        if self.maildir_path is None:
            raise ValueError("this sink keeps no Maildir (MaildirSink(maildir=None))")
        return self.maildir_path / "new" / received.key

    def wait_for(self, count: int = 1, timeout: float = 30.0) -> list[Received]:
        """Block until at least ``count`` messages arrived; raises TimeoutError otherwise."""
        with self._cv:
            if not self._cv.wait_for(lambda: len(self.messages) >= count, timeout=timeout):
                raise TimeoutError(f"{len(self.messages)} of {count} messages arrived at "
                                   f"{self.maildir_path or 'the sink'} within {timeout:g}s")
            return list(self.messages)


def _free_port_on(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
