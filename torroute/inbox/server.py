"""The sink's asyncio driver: listeners, sessions, deadlines, delivery, the onion service.

The SMTP dialogue is :class:`torroute.protocols.lmtp.SmtpServer`'s (pure); the limits are
:mod:`torroute.inbox.quota`'s (pure); the Maildir is :mod:`torroute.inbox.maildir`'s.  This
module only moves bytes, keeps the clock (idle, command and data deadlines) and runs the
fsync in a worker thread so one slow disk write never stalls the other sessions.

Logging: one INFO line per session and per message; client misbehaviour (timeouts, floods,
bad commands) is INFO/WARNING, never ERROR.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import ssl
import sys
import time
from email.utils import formatdate
from pathlib import Path

from ..endpoint import Endpoint
from ..protocols import lmtp, sanitize_reason
from . import maildir, quota
from .settings import SinkSettings

log = logging.getLogger("torroute.inbox")

STOP_GRACE = 10.0  # seconds deliveries in flight get at shutdown


class SinkPolicy(lmtp.Policy):
    """One session's MAIL/RCPT decisions: rates, relaying, the Maildir quota."""

    def __init__(self, sink: Sink, session: Session) -> None:
        self.sink = sink
        self.session = session

    def mail(self, sender: bytes, size: int | None) -> bytes | None:
        refusal = self.sink.rates.mail(self.session.mails, time.monotonic())
        if refusal is None:
            self.session.mails += 1
        else:
            self.session.refused += 1
        return refusal

    def rcpt(self, recipient: bytes, accepted: int) -> bytes | None:
        if not self.sink.accepts(recipient):
            self.session.refused += 1
            return quota.RELAY_DENIED
        refusal = self.sink.reserve(self.session, self.session.codec.declared_size or 0)
        if refusal is not None:
            self.session.refused += 1
        return refusal


class Session:
    """One client connection: a codec, its deadlines and its counters."""

    def __init__(self, sink: Sink, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, peer: str) -> None:
        self.sink = sink
        self.reader = reader
        self.writer = writer
        self.peer = peer
        s = sink.settings
        self.codec = lmtp.SmtpServer(sink.hostname, s.max_message_size, s.max_recipients,
                                     SinkPolicy(sink, self), starttls=sink.tls is not None)
        self.started = self.last_byte = self.last_reply = time.monotonic()
        self.data_started: float | None = None
        self.mails = self.stored = self.refused = self.bytes = 0
        self.codec.spool = self._spool_write
        self.spool: maildir.Spool | None = None  # the message being received, in tmp/
        self.spool_error: OSError | None = None
        self.delivering = False
        self.counted = True  # in Sink.open and Sessions.open
        self.end = ""

    def deadline(self) -> tuple[float, str]:
        """The next moment this session is cut off, and why."""
        s = self.sink.settings
        idle = self.last_byte + s.idle_timeout
        if self.codec.in_data:
            if self.data_started is None:
                self.data_started = time.monotonic()
            return min((idle, "idle"), (self.data_started + s.data_timeout, "data"))
        self.data_started = None
        return min((idle, "idle"), (self.last_reply + s.command_timeout, "command"))

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.last_reply = time.monotonic()

    async def run(self) -> None:
        self.write(self.codec.greeting())
        while not self.codec.closed:
            when, why = self.deadline()
            try:
                async with asyncio.timeout(max(0.0, when - time.monotonic())):
                    data = await self.reader.read(65536)
            except TimeoutError:
                self.write(lmtp.reply(421, "4.4.2", f"{why} timeout, closing"))
                self.end = f"{why} timeout"
                break
            if not data:
                self.codec.eof()
                self.end = self.end or "client closed"
                break
            self.last_byte = time.monotonic()
            self.bytes += len(data)
            if not await self._process(self.codec.feed(data)):
                break
            try:  # a client that sends and never reads must not hold the session forever
                async with asyncio.timeout(self.sink.settings.idle_timeout):
                    await self.writer.drain()
            except TimeoutError:
                self.end = "client does not read our replies"
                self.writer.transport.abort()
                break

    async def _process(self, events: list[lmtp.Event]) -> bool:
        while True:
            if not await self._handle(events):
                return False
            if not self.codec.in_data:
                self.drop_spool()  # a message refused in DATA (too big) or never finished
            if self.codec.sender is None:  # no transaction open (RSET, error, done)
                self.sink.quota.release(self)
            if not self.codec.holding:
                return True
            events = self.codec.resume()

    def _spool_write(self, chunk: bytes) -> None:
        """The codec's spool: the first chunk opens tmp/NAME with the trace headers."""
        if self.spool is None:
            self.open_spool()
        if self.spool is not None:
            self.spool.write(chunk)

    def open_spool(self) -> None:
        if self.spool is not None or self.spool_error is not None:
            return
        try:
            self.spool = maildir.Spool(self.sink.maildir)
        except OSError as exc:
            self.spool_error = exc
            return
        trace = self.sink.trace(self, self.codec.sender or b"", tuple(self.codec.recipients))
        self.spool.write(trace)
        self.spool.header_size = len(trace)

    def take_spool(self) -> maildir.Spool | OSError:
        """At the end of DATA: the finished spool (opened now for an empty body)."""
        self.open_spool()
        spool, error = self.spool, self.spool_error
        self.spool = self.spool_error = None
        if spool is None:
            assert error is not None
            return error
        return spool

    def drop_spool(self) -> None:
        if self.spool is not None:
            self.spool.discard()
        self.spool = self.spool_error = None

    async def _handle(self, events: list[lmtp.Event]) -> bool:
        """Act on the codec's events in order; False once the session must end."""
        for ev in events:
            if isinstance(ev, lmtp.Send):
                self.write(ev.data)
            elif isinstance(ev, lmtp.Close):
                self.end = ev.reason
                return False
            elif isinstance(ev, lmtp.Transaction):
                self.write(await self.sink.store(self, ev))
            elif isinstance(ev, lmtp.StartTls):
                if not await self._start_tls():
                    return False
        return True

    async def _start_tls(self) -> bool:
        await self.writer.drain()
        # RFC 3207: what the client sent in clear after STARTTLS must not count as TLS input
        if getattr(self.reader, "_buffer", b""):
            self.end = "input after STARTTLS"
            return False
        try:
            async with asyncio.timeout(self.sink.settings.command_timeout):
                await self.writer.start_tls(self.sink.tls)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.end = f"TLS handshake failed: {sanitize_reason(str(exc) or type(exc).__name__)}"
            return False
        self.codec.tls_started()
        return True


class Sink:
    """The onion-only inbox: settings, shared accounting and the listening loop."""

    def __init__(self, settings: SinkSettings, *, onion: str = "",
                 print_line=None) -> None:
        self.settings = settings
        assert settings.maildir is not None
        self.maildir: Path = settings.maildir
        self.onion = onion
        self.hostname = settings.hostname or onion or next(iter(settings.domains), "localhost")
        self.domains: set[str] = set(settings.domains)
        if onion:
            self.domains.add(onion)
        self.quota = quota.Quota(settings.max_messages, settings.max_total_size,
                                 settings.max_message_size)
        self.sessions = quota.Sessions(settings.max_sessions, settings.client_sessions,
                                       settings.rate_window)
        self.rates = quota.MessageRates(settings.max_messages_per_session,
                                        settings.global_messages, settings.rate_window)
        self.open: set[Session] = set()
        self.tls: ssl.SSLContext | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.stopping: asyncio.Event | None = None
        self.print_line = print_line or (lambda line: print(line, flush=True))
        self.stored_total = 0

    # ---- decisions

    def set_onion(self, onion: str) -> None:
        self.onion = onion
        self.domains.add(onion)
        if not self.settings.hostname:
            self.hostname = onion
            for session in self.open:
                session.codec.hostname = onion

    def accepts(self, recipient: bytes) -> bool:
        """Only addresses at its own onion or its --domain names: never a relay."""
        domain = recipient.rpartition(b"@")[2].decode("utf-8", "replace").lower().rstrip(".")
        return domain in self.domains

    def _recount(self) -> None:
        self.quota.recount(maildir.usage(self.maildir), time.monotonic())

    def reserve(self, session: Session, size: int) -> bytes | None:
        now = time.monotonic()
        refusing = self.quota.would_refuse(session, size)
        if self.quota.needs_recount(now, refusing):
            self._recount()
        return self.quota.reserve(session, size)

    async def store(self, session: Session, ev: lmtp.Transaction) -> bytes:
        """Make the spooled message durable and answer for it (one reply: this is SMTP)."""
        sender = sanitize_reason(ev.sender.decode("utf-8", "replace"), 300)
        spool = session.take_spool()
        if isinstance(spool, OSError):
            return self._store_failed(session, sender, 0, spool)
        size, body = spool.size, spool.size - spool.header_size
        if self.quota.would_refuse(session, size):
            self._recount()
        refusal = self.quota.admit(session, size, body)
        if refusal is not None:
            spool.discard()
            self.quota.release(session)
            session.refused += 1
            log.info("refused from=<%s> rcpts=%d size=%d reply=%r", sender,
                     len(ev.recipients), size, refusal.decode().strip())
            return refusal
        self.quota.reserved[session] = size  # hold the bytes while writing
        session.delivering = True
        try:
            await asyncio.to_thread(spool.sync)
            path = spool.publish()  # in the loop: renamed and counted with no await between
            self.quota.stored(session, size)
            try:
                await asyncio.to_thread(spool.sync_dir)
            except OSError as exc:  # it is in new/ but maybe not durable: no 250, may repeat
                log.warning("stored %s but cannot fsync new/: %s", path.name, exc)
                return lmtp.reply(451, "4.3.0", "cannot store now")
        except OSError as exc:
            return self._store_failed(session, sender, size, exc)
        finally:
            session.delivering = False
        message_size = size
        session.stored += 1
        self.stored_total += 1
        log.info("stored %s from=<%s> rcpts=%d size=%d", path.name, sender, len(ev.recipients),
                 message_size)
        return lmtp.reply(250, "2.0.0", f"OK stored as {path.name.partition(',')[0]}")

    def _store_failed(self, session: Session, sender: str, size: int, exc: OSError) -> bytes:
        """The disk said no: 4xx (the sender keeps the message), a WARNING for the owner."""
        self.quota.release(session)
        session.refused += 1
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        log.warning("cannot store a message from=<%s> size=%d: %s", sender, size, exc)
        return quota.NO_SPACE if full else lmtp.reply(451, "4.3.0", "cannot store now")

    def trace(self, session: Session, sender_bytes: bytes, recipients: tuple[bytes, ...]
              ) -> bytes:
        """Return-Path and a Received line without the peer's address (it is tor's)."""
        sender = sender_bytes.decode("utf-8", "replace")
        helo = sanitize_reason(session.codec.helo, 255)
        proto = "ESMTPS" if session.codec.tls else "ESMTP"
        rcpt = (f"\n\tfor <{sanitize_reason(recipients[0].decode('utf-8', 'replace'), 300)}>"
                if len(recipients) == 1 else "")
        return (f"Return-Path: <{sanitize_reason(sender, 300)}>\n"
                f"Received: from {helo} by {self.hostname} (torroute sink) with {proto}{rcpt};"
                f"\n\t{formatdate(localtime=False)}\n").encode("utf-8", "replace")

    # ---- connections

    def _make_room(self, now: float) -> bool:
        """When full, close the session idle longest if it is idle over ``stress_idle`` (a
        slow client), so 200 idle connections cannot keep a real sender out."""
        idle = [s for s in self.open if not s.delivering
                and now - s.last_byte >= self.settings.stress_idle]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_byte)
        victim.end = "closed for a new session (idle while full)"
        with contextlib.suppress(Exception):
            victim.writer.write(lmtp.reply(421, "4.4.2", "idle too long while busy, closing"))
            victim.writer.transport.abort()
        self.open.discard(victim)
        self.sessions.closed()
        victim.counted = False
        return True

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) else "unix"
        now = time.monotonic()
        room = (self.sessions.open >= self.sessions.max_sessions and self._make_room(now))
        refusal = quota.reply(421, "4.3.2", "shutting down") if self.stopping and \
            self.stopping.is_set() else self.sessions.connect(peer, now, room)
        if refusal is not None:
            log.info("session peer=%s refused at connect: %s", peer, refusal.decode().strip())
            with contextlib.suppress(Exception):
                writer.write(refusal)
                await asyncio.wait_for(writer.drain(), 5)
            writer.close()
            return
        session = Session(self, reader, writer, peer)
        self.open.add(session)
        try:
            await session.run()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), 5)
        except (ConnectionError, OSError) as exc:
            session.end = session.end or f"connection lost: {type(exc).__name__}"
        except asyncio.CancelledError:
            session.end = session.end or "sink stopping"
            raise
        finally:
            session.drop_spool()
            self.quota.release(session)
            if session.counted:
                self.open.discard(session)
                self.sessions.closed()
            with contextlib.suppress(Exception):
                writer.close()
            log.info("session peer=%s helo=%s tls=%s mails=%d stored=%d refused=%d bytes=%d "
                     "seconds=%.1f end=%s", peer, sanitize_reason(session.codec.helo, 100) or "-",
                     "yes" if session.codec.tls else "no", session.mails, session.stored,
                     session.refused, session.bytes, time.monotonic() - session.started,
                     session.end or "QUIT")

    async def listen(self, endpoint: Endpoint) -> str:
        """Start a listener; returns its address (``127.0.0.1:PORT`` or ``unix:PATH``) as tor's
        HiddenServicePort target spells it."""
        if endpoint.family == "unix":
            path = Path(endpoint.path)
            if path.is_socket():
                path.unlink()
            server = await asyncio.start_unix_server(self.handle, path=str(path))
            os.chmod(path, 0o660)
            self.servers.append(server)
            return f"unix:{path}"
        server = await asyncio.start_server(self.handle, endpoint.host, endpoint.port,
                                            reuse_address=True)
        self.servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def prepare(self) -> None:
        """The Maildir (created 0700 if missing; old tmp/ leftovers removed), a first count,
        and the TLS context."""
        maildir.ensure(self.maildir)
        removed = maildir.clean_tmp(self.maildir)
        if removed:
            log.warning("removed %d stale file(s) from %s/tmp", removed, self.maildir)
        self._recount()
        if self.settings.starttls:
            from .tls import server_context

            assert self.settings.tls_key and self.settings.tls_cert
            self.tls = server_context(self.settings.tls_key, self.settings.tls_cert,
                                      self.hostname)

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for session in list(self.open):
            if not session.delivering:
                session.end = session.end or "sink stopping"
                with contextlib.suppress(Exception):
                    session.writer.write(lmtp.reply(421, "4.3.2", "shutting down"))
                    session.writer.transport.close()
        deadline = time.monotonic() + STOP_GRACE
        while any(s.delivering for s in self.open) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def run_sink(settings: SinkSettings, tor_control: str | None = None,
                   tor_password: str | None = None) -> int:
    """Listen, make or reuse the onion service, print the address, serve until SIGTERM."""
    from .. import exitcodes
    from ..errors import ConfigError

    sink = Sink(settings)
    try:
        sink.prepare()
    except OSError as exc:
        raise ConfigError(f"maildir {settings.maildir}: {exc.strerror or exc}") from None
    endpoint = settings.listen
    if endpoint is None:  # behind our own onion: a loopback port (fixed for --onion-dir)
        endpoint = Endpoint("inet", host="127.0.0.1", port=2525 if settings.onion_dir else 0)
    try:
        target = await sink.listen(endpoint)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None
    sink.print_line(f"torroute sink: listening on {target}")
    made_ephemeral: str | None = None
    if settings.onion:
        from ..tor.control import Tor
        from ..tor.torrc import PortMapping

        def publish() -> str:
            with Tor.connect(tor_control or "unix:/run/tor/control", tor_password) as tor:
                service = tor.create_onion(
                    [PortMapping(settings.onion_port, target)],
                    directory=str(settings.onion_dir) if settings.onion_dir else None,
                    key_file=settings.ephemeral_key, wait=True, timeout=120.0)
            if not service.address:
                raise ConfigError(f"tor made no onion address ({service.note})")
            return service.address

        address = await asyncio.to_thread(publish)
        sink.set_onion(address)
        if settings.ephemeral_key:
            made_ephemeral = address
        sink.print_line(f"torroute sink: onion {address} port {settings.onion_port} -> {target}")
    log.info("sink ready: maildir=%s domains=%s max_messages=%d max_total_size=%d "
             "max_message_size=%d", settings.maildir, ",".join(sorted(sink.domains)) or "-",
             settings.max_messages, settings.max_total_size, settings.max_message_size)
    if not sink.domains:
        log.warning("no --domain and no onion: every recipient is refused (550 5.7.1)")
    stopping = asyncio.Event()
    sink.stopping = stopping
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("sink stopping (%d session(s) open, %d message(s) stored)", len(sink.open),
             sink.stored_total)
    await sink.stop()
    if made_ephemeral:
        def unpublish() -> None:
            with Tor.connect(tor_control or "unix:/run/tor/control", tor_password) as tor:
                tor.remove_onion(made_ephemeral, save=False)

        try:
            await asyncio.wait_for(asyncio.to_thread(unpublish), 10)
        except Exception as exc:  # the service dies with tor anyway; say so, exit cleanly
            log.warning("could not remove the onion service %s: %s", made_ephemeral, exc)
    sys.stdout.flush()
    return exitcodes.OK
