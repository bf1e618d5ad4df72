"""The daemon's LMTP relay listener: sessions with Postfix's lmtp client, each transaction
relayed to the recipients' onion MX by one shared :class:`torroute.delivery.relay.Relay`.

The LMTP dialogue is :class:`torroute.protocols.lmtp.LmtpServer`'s (pure); a session only moves
its bytes, starts the relay of each transaction and enforces the idle timeout.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING

from ..protocols import lmtp, sanitize_reason

if TYPE_CHECKING:
    from ..config import Config
    from ..delivery.settings import DeliverSettings
    from .lmtp_links import OnionLinks
    from .service import LookupDaemon

log = logging.getLogger(__package__)  # one logger for all the daemon's lines: torroute.daemon

#: Input a session keeps while it relays a transaction before it stops reading.  Postfix
#: sends nothing past the end of DATA until it has the replies; this bounds other clients.
LMTP_PENDING_LIMIT = 256 * 1024


class LmtpService:
    """What the LMTP sessions share: one :class:`torroute.delivery.relay.Relay` (its pool of tor
    connections) and the transactions being relayed."""

    def __init__(self, daemon: LookupDaemon) -> None:
        from ..delivery.relay import Relay
        from ..delivery.settings import DeliverSettings

        self.daemon = daemon
        s = daemon.settings
        self.relay = Relay(daemon.router, DeliverSettings.from_config(daemon.router.config),
                           idle_timeout=s.lmtp_idle_timeout, time_limit=s.lmtp_time_limit,
                           max_per_onion=s.lmtp_max_per_onion,
                           max_waiting_per_onion=s.lmtp_max_waiting_per_onion)
        self.tasks: set[asyncio.Task] = set()  # relays in flight, one per busy session
        #: per-onion Postfix destinations (made once the unix listener is bound), or None
        self.links: OnionLinks | None = None

    @staticmethod
    def check(config: Config) -> DeliverSettings:
        """The ``[deliver]`` settings of ``config`` (raises ConfigError): checked before a
        reload commits, so a broken section keeps the whole old configuration."""
        from ..delivery.settings import DeliverSettings

        return DeliverSettings.from_config(config)

    def apply(self, deliver: DeliverSettings) -> None:
        self.relay.settings = deliver
        self.relay.time_limit = self.daemon.settings.lmtp_time_limit
        self.relay.pool.idle_timeout = self.daemon.settings.lmtp_idle_timeout
        self.relay.pool.max_idle = self.daemon.settings.lmtp_max_per_onion
        self.relay.gates.max_per_onion = self.daemon.settings.lmtp_max_per_onion
        self.relay.gates.max_waiting = self.daemon.settings.lmtp_max_waiting_per_onion

    def factory(self) -> LmtpSession:
        return LmtpSession(self)

    def log_transaction(self, ev: lmtp.Transaction, replies: list[bytes],
                        started: float) -> None:
        if not self.daemon.log_decisions:
            return
        ms = (time.perf_counter() - started) * 1000
        for rcpt, r in zip(ev.recipients, replies, strict=False):
            said = sanitize_reason(r.decode("ascii", "replace").strip())
            line = (f"lmtp rcpt={sanitize_reason(rcpt.decode('utf-8', 'replace'), 300)} "
                    f"size={len(ev.message)} reply={said!r} ms={ms:.0f}")
            if self.daemon.write_line is not None:
                self.daemon.write_line(line)
            else:
                log.info("%s", line)

    async def stop(self) -> None:
        """Once the daemon has closed every session (busy ones after ``drain_timeout``, which
        cancels their relays: that mail stays deferred in Postfix's queue), let the cancelled
        relays unwind and close the pooled tor connections."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)
        self.relay.close()
        stats = {**self.relay.stats, **self.relay.gates.stats}
        log.info("lmtp: relay stats %s", " ".join(f"{k}={v}" for k, v in stats.items()))


class LmtpSession(asyncio.Protocol):
    """One LMTP client connection.

    Why a protocol and not a stream coroutine: the transport is the only reader of the
    connection, at every moment.  Input goes to the codec as it arrives; while a transaction
    is relayed, the codec events after it (and later input, in ``pending``) wait in order for
    its replies, and the end of the connection cancels the relay.  So the client is watched
    during a relay without a second reader, pipelined input is never lost, and a session
    carries any number of transactions (Postfix caches it and sends RSET after each one).
    """

    def __init__(self, service: LmtpService) -> None:
        self.service = service
        self.daemon = service.daemon
        self.codec = lmtp.LmtpServer(max_size=self.daemon.settings.lmtp_max_size)
        self.transport: asyncio.Transport | None = None
        self.events: collections.deque[lmtp.Event] = collections.deque()  # not yet acted on
        self.pending = bytearray()  # input that arrived during a relay, not yet parsed
        self.relaying: asyncio.Task | None = None
        self.closing = False
        self.paused: set[str] = set()  # why reading is paused: "backlog", "writes"
        self.last_active = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        daemon = self.daemon
        if daemon.stopping or len(daemon.connections) >= daemon.settings.max_connections:
            log.warning("lmtp: refusing connection (%d open, stopping=%s)",
                        len(daemon.connections), daemon.stopping)
            why = "shutting down" if daemon.stopping else "too many connections, try again later"
            self.transport.write(lmtp.reply(421, "4.3.2", f"torroute: {why}"))
            self._close()
            return
        daemon.connections.add(self)
        log.debug("lmtp: connection opened (%d open)", len(daemon.connections))
        self.transport.write(self.codec.greeting())
        self._active()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._stop_idle_timer()
        if self.relaying is not None:
            self._cancel_relay("connection lost" if exc is None else f"connection lost: {exc}")
        log.debug("lmtp: connection closed")
        if self in self.daemon.connections:
            self.daemon.connections.discard(self)
            self.daemon._connection_gone()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.relaying is not None:  # parsed and answered after the relay's replies
            self.pending += data
            if len(self.pending) > LMTP_PENDING_LIMIT:
                self._pause("backlog")
            return
        self._process(self.codec.feed(data))

    def eof_received(self) -> bool:
        # Postfix never half-closes: the end of input means it gave up or was stopped.
        if self.relaying is not None:
            self._cancel_relay("the client closed the connection")
        elif not self.closing:
            self._process(self.codec.eof())
        self._close()
        return True  # _close() closes our side once the replies are written

    def pause_writing(self) -> None:  # the client does not read its replies
        self._pause("writes")

    def resume_writing(self) -> None:
        self._resume("writes")

    # work
    def _process(self, events: list[lmtp.Event] | tuple[()]) -> None:
        """Act on codec events in order; a transaction starts its relay and everything after
        it waits for the replies.  Then parse the input that waited."""
        self.events.extend(events)
        transport = self.transport
        assert transport is not None
        while not self.closing and self.relaying is None:
            if not self.events:
                if not self.pending:
                    break
                data = bytes(self.pending)
                self.pending.clear()
                self._resume("backlog")
                self.events.extend(self.codec.feed(data))
                continue
            ev = self.events.popleft()
            if isinstance(ev, lmtp.Send):
                transport.write(ev.data)
            elif isinstance(ev, lmtp.Transaction):
                task = asyncio.get_running_loop().create_task(self._relay(ev))
                self.relaying = task
                self.service.tasks.add(task)
                task.add_done_callback(self.service.tasks.discard)
            else:  # Close
                self._close()
        if not self.closing and self.relaying is None:
            self._active()

    async def _relay(self, ev: lmtp.Transaction) -> None:
        started = time.perf_counter()
        try:
            replies = await self.service.relay.relay(ev)
        except Exception:  # Relay.relay defers by itself; anything else defers as well
            log.exception("lmtp: relay failed")
            replies = []
        finally:
            self.relaying = None
        if self.closing:  # the client left while the relay finished
            return
        assert self.transport is not None
        self.transport.write(lmtp.data_replies(replies, len(ev.recipients)))
        self.service.log_transaction(ev, replies, started)
        if self.daemon.stopping:  # drained: this session takes no further transaction
            self.transport.write(lmtp.reply(421, "4.3.2", "torroute: shutting down"))
            self._close()
            return
        self._process(())

    def _cancel_relay(self, why: str) -> None:
        """The client is gone: nobody can take the replies.  Cancelled before the final '.'
        reached the MX, nothing is delivered, so Postfix's retry cannot duplicate it."""
        task = self.relaying
        if task is None or task.done():
            return
        if self.daemon.stopping:
            log.warning("lmtp: relay cancelled at shutdown (%s); Postfix keeps the message", why)
        else:
            log.warning("lmtp: client left during the relay; relay cancelled (%s)", why)
        task.cancel()

    def _maybe_finish(self) -> None:
        """The daemon stops: an idle session closes now (421), a relaying one after its
        replies."""
        # transactions still waiting for a connection to their onion are answered 4xx now
        self.service.relay.gates.close()
        if self.closing or self.relaying is not None:
            return
        if self.transport is not None:
            self.transport.write(lmtp.reply(421, "4.3.2", "torroute: shutting down"))
        self._close()

    def _close(self) -> None:
        self.closing = True
        self._stop_idle_timer()
        self.events.clear()
        self.pending.clear()
        if self.transport is not None:
            self.transport.close()  # after what is buffered has been written

    # flow control and the idle timeout
    def _pause(self, why: str) -> None:
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused.add(why)

    def _resume(self, why: str) -> None:
        if why not in self.paused:
            return
        self.paused.discard(why)
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _active(self) -> None:
        """Input was handled (or a reply written): the idle time starts again.  One timer per
        session that re-arms itself, instead of one timer per command."""
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        if self.idle_timer is None:
            self.idle_timer = loop.call_at(
                self.last_active + self.daemon.settings.lmtp_session_idle_timeout,
                self._idle_check)

    def _idle_check(self) -> None:
        self.idle_timer = None
        if self.closing or self.relaying is not None:
            return  # a relay is bounded by lmtp_time_limit; _active() follows its replies
        loop = asyncio.get_running_loop()
        timeout = self.daemon.settings.lmtp_session_idle_timeout
        due = self.last_active + timeout
        if loop.time() < due:
            self.idle_timer = loop.call_at(due, self._idle_check)
            return
        log.info("lmtp: closing a session idle for %gs", timeout)
        assert self.transport is not None
        self.transport.write(lmtp.reply(421, "4.4.2", f"torroute: idle timeout ({timeout:g}s), "
                                        "closing"))
        self._close()

    def _stop_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
