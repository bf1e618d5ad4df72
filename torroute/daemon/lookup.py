"""One lookup connection (socketmap, tcp_table or Exim's line protocol) of the daemon.

Answers that need no I/O (pins, local domains, cached SRV decisions: ``Router.decide_now``) are
written straight from ``data_received``; one plain request of such a domain does not even go
through the parser (``quick_domain`` + ``Router.decide_now_wire``: the part after the key's
last ``@``, still as wire bytes, is the memo key).  Anything that needs DNS or tor
goes to one small task per connection, which keeps answers in request order.  Concurrent
lookups of one domain share a single DNS query (``Router.aroute``).  A failure of a lookup
answers TEMP, never closes the connection (Postfix keeps map connections open for a long time).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING

from ..protocols import Lookup, Malformed
from ..routing.decisions import NoRoute, TempFail

if TYPE_CHECKING:
    from .answers import Answers
    from .service import LookupDaemon

log = logging.getLogger(__package__)  # one logger for all the daemon's lines: torroute.daemon

#: Postfix probes transport_maps with '*' at start: never a default route.
WILDCARD_PROBE = NoRoute("*", "wildcard probe")
#: the results (Decision.kind) every protocol's lookup counter starts with
RESULTS = ("route", "noroute", "tempfail", "reject")


def count_table(daemon: LookupDaemon, proto: str) -> collections.defaultdict[str, int]:
    """``daemon.lookups[proto]``: answers by result, what the metrics and ``torroute status``
    show.  Made on first use; the hot path does one increment per answer on it."""
    table = daemon.lookups
    counts = table.get(proto)
    if counts is None:
        counts = table[proto] = collections.defaultdict(int, dict.fromkeys(RESULTS, 0))
    return counts


class LookupConnection(asyncio.Protocol):
    """One client connection; replies leave in request order."""

    def __init__(self, daemon: LookupDaemon, proto: Answers) -> None:
        self.daemon = daemon
        self.proto = proto
        self.parser = proto.parser(daemon.settings.max_request)
        self.counts = count_table(daemon, proto.name)
        self.transport: asyncio.Transport | None = None
        self.backlog: collections.deque[Lookup | Malformed] = collections.deque()
        self.worker: asyncio.Task | None = None
        self.eof = False
        self.closing = False
        self.paused = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        daemon = self.daemon
        if len(daemon.connections) >= daemon.settings.max_connections or daemon.stopping:
            log.warning("%s: refusing connection (%d open, stopping=%s)", self.proto.name,
                        len(daemon.connections), daemon.stopping)
            transport.close()
            self.closing = True
            return
        daemon.connections.add(self)
        log.debug("%s: connection opened (%d open)", self.proto.name, len(daemon.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.daemon.connections.discard(self)
        log.debug("%s: connection closed", self.proto.name)
        # A running lookup is not cancelled: other connections may be waiting on the same
        # shared DNS query.  The worker sees ``closing`` and drops its answer.
        self.daemon._connection_gone()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.backlog:  # the quick path: one plain request, decided without I/O
            domain = self.parser.quick_domain(data)
            if domain is not None:
                started = time.perf_counter()
                decision = self.daemon.router.decide_now_wire(domain)
                if decision is not None:
                    try:
                        reply = self.proto.answer_now(decision)
                    except Exception:  # the slow path turns any failure into a temp answer
                        reply = None
                    if reply is not None:
                        self.transport.write(reply)
                        self.counts[decision.kind] += 1
                        if self.daemon.log_decisions:
                            self.daemon.log_decision(self.proto.name, None, decision, started,
                                                     "")
                        return
        self._handle(self.parser.feed(data))

    def eof_received(self) -> bool:
        self.eof = True
        events = self.parser.eof()
        if events:
            self._handle(events)
        self._maybe_finish()
        return True  # keep our side open until the answers are written

    def pause_writing(self) -> None:  # the client does not read: stop reading its requests
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    # work
    def _handle(self, events: list) -> None:
        daemon = self.daemon
        transport = self.transport
        counts = self.counts
        for ev in events:
            if self.closing:
                return
            if self.backlog:
                self.backlog.append(ev)
                continue
            if ev.__class__ is Malformed:
                self._malformed(ev)
                continue
            started = time.perf_counter()
            try:  # LookupDaemon.quick_decision, inlined: this is the hot path
                key = ev.key
                decision = WILDCARD_PROBE if key == "*" else daemon.router.decide_now(key)
                reply = None if decision is None else self.proto.answer_now(decision)
            except Exception:  # the slow path turns any failure into a temp answer
                decision = reply = None
            if reply is None:
                self.backlog.append(ev)
                continue
            transport.write(reply)
            counts[decision.kind] += 1
            if daemon.log_decisions:
                daemon.log_decision(self.proto.name, ev, decision, started, "")
        if self.backlog and self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._work())

    def _malformed(self, ev: Malformed) -> None:
        self.daemon.malformed += 1
        log.debug("%s: malformed request (%s)", self.proto.name, ev.reason)
        self.transport.write(ev.reply)
        if ev.close:
            self.closing = True
            self.transport.close()

    async def _work(self) -> None:
        try:
            while self.backlog and not self.closing:
                if len(self.backlog) > 64 and not self.paused:
                    self.transport.pause_reading()
                ev = self.backlog.popleft()
                if ev.__class__ is Malformed:
                    self._malformed(ev)
                    continue
                started = time.perf_counter()
                try:
                    decision = await self.daemon.router.aroute(ev.key)
                    reply, note = await self.proto.answer(decision)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # we are being cancelled (shutdown)
                    # another asker of a shared lookup was cancelled: defer, never hang
                    decision = TempFail(ev.key[:300], "lookup cancelled")
                    reply, note = self.proto.temp(decision.reason), ""
                except Exception as exc:  # never crash a connection: defer this lookup
                    log.exception("%s: lookup of %r failed", self.proto.name, ev.key[:300])
                    decision = TempFail(ev.key[:300], f"internal error: {type(exc).__name__}")
                    reply, note = self.proto.temp(decision.reason), ""
                if self.closing:
                    return
                self.transport.write(reply)
                self.counts[decision.kind] += 1
                if self.daemon.log_decisions:
                    self.daemon.log_decision(self.proto.name, ev, decision, started, note)
            if not self.paused and self.transport is not None and not self.closing:
                self.transport.resume_reading()
        finally:
            self.worker = None
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Close after the last answer once the client half-closed or the daemon stops."""
        if self.closing or self.backlog or self.worker is not None:
            return
        if self.eof or self.daemon.stopping:
            self.closing = True
            if self.transport is not None:
                self.transport.close()

    def idle(self) -> bool:
        return not self.backlog and self.worker is None

