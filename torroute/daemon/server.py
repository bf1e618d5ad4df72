"""The lookup daemon: socketmap, tcp_table and Exim listeners in one asyncio process.

One event loop serves every connection (Postfix keeps its map connections open for a long
time), so there is no process or thread per connection.  Answers that need no I/O (pins, local
domains, cached SRV decisions) are written straight from ``data_received``; anything that needs
DNS or tor goes to one small task per connection, which keeps answers in request order.
Concurrent lookups of one domain share a single DNS query (``Router.aroute``).

Fail closed: every failure that is not a definite "no route" answers TEMP / 400 / ``temp``, so
the MTA defers instead of using its default (clear-net) transport.
"""

from __future__ import annotations

import asyncio
import collections
import grp
import logging
import os
import re
import signal
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config, normalize_domain
from ..endpoint import Endpoint
from ..errors import ConfigError, TorrouteError
from ..protocols import (
    DEFAULT_MAX_REQUEST,
    Lookup,
    Malformed,
    ProtocolError,
    check_template,
    eximline,
    lmtp,
    postfix_value,
    sanitize_reason,
    socketmap,
    tcptable,
)
from ..routing.router import (
    Decision,
    NoRoute,
    Reject,
    Route,
    Router,
    TempFail,
    decide_static,
    destination_domain,
)
from ..tor.automap import aresolve_automap

if TYPE_CHECKING:
    from ..delivery.pipe import DeliverSettings

log = logging.getLogger(__name__)

KINDS = ("socketmap", "tcp_table", "exim", "lmtp")

#: Bound of the per-daemon memo tables (static decisions, reply bytes); cleared when full.
MEMO_SIZE = 50_000
_NEEDS_DNS = object()

# -- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeSettings:
    """The ``[serve]`` table (see contrib/torroute.toml), with command-line overrides."""

    listeners: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    allow_remote: bool = False
    socket_mode: int = 0o660
    socket_group: str | None = None
    transport: str = "torroute"
    postfix_answer: str = "{transport}:[{onion}]:{port}"
    max_request: int = DEFAULT_MAX_REQUEST
    automap_timeout: float = 2.0
    drain_timeout: float = 10.0
    max_connections: int = 4096
    log_decisions: bool = True
    event_loop: str = "auto"  # "auto" (uvloop if installed), "uvloop", "asyncio"
    # LMTP relay mode (see docs/postfix.rst): with an lmtp listener, onion routes are
    # answered "{lmtp_transport}:<listener>" and the daemon relays what Postfix hands it
    lmtp_transport: str = "torroute-lmtp"
    lmtp_idle_timeout: float = 10.0  # keep relay connections to an onion this long unused
    lmtp_time_limit: float = 540.0  # per transaction; below Postfix's lmtp_data_done_timeout
    lmtp_max_size: int = 64 * 1024 * 1024
    # an LMTP session without a command this long gets 421 and is closed; above Postfix's
    # lmtp_connection_cache_time_limit (2 s), so a connection Postfix caches is never cut
    lmtp_session_idle_timeout: float = 10.0

    @classmethod
    def from_config(cls, config: Config, overrides: Mapping[str, Any] | None = None
                    ) -> ServeSettings:
        """Read ``[serve]``; ``overrides`` (the CLI's flags: listener kinds as lists of
        endpoint strings, ``allow_remote``, ``transport``, ``socket_group``, ``postfix_answer``,
        ``socket_mode`` as an octal string) win, a listener kind replacing the file's; an
        empty or false value counts as not given."""
        flags = dict(overrides or {})
        unknown_flags = set(flags) - {*KINDS, "allow_remote", "transport", "socket_group",
                                      "postfix_answer", "socket_mode"}
        if unknown_flags:
            raise ConfigError(f"unknown serve override(s) {', '.join(sorted(unknown_flags))}")
        table = dict(config.section("serve"))
        where = f"{config.path or 'config'}: serve"
        known = {
            "socketmap", "tcp_table", "exim", "allow_remote", "socket_mode", "socket_group",
            "transport", "postfix_answer", "max_request", "automap_timeout", "drain_timeout",
            "max_connections", "log_decisions", "event_loop", "lmtp", "lmtp_transport",
            "lmtp_idle_timeout", "lmtp_time_limit", "lmtp_max_size", "lmtp_session_idle_timeout",
        }  # fmt: skip
        unknown = set(table) - known
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
        listeners: dict[str, tuple[Endpoint, ...]] = {}
        for kind in KINDS:
            value = table.get(kind, [])
            value = [value] if isinstance(value, str) else value
            flag = flags.get(kind)
            if flag:  # command-line listeners of a kind replace the file's
                value = flag
            listeners[kind] = tuple(Endpoint.parse(v) for v in value)
        try:
            mode = table.get("socket_mode", "0660")
            mode = int(mode, 8) if isinstance(mode, str) else int(mode)
            settings = cls(
                listeners=listeners,
                allow_remote=_bool(table.get("allow_remote", False), "allow_remote"),
                socket_mode=mode,
                socket_group=table.get("socket_group") or None,
                transport=str(table.get("transport", "torroute")),
                postfix_answer=check_template(str(table.get("postfix_answer", "torroute"))),
                max_request=int(table.get("max_request", DEFAULT_MAX_REQUEST)),
                automap_timeout=float(table.get("automap_timeout", 2.0)),
                drain_timeout=float(table.get("drain_timeout", 10.0)),
                max_connections=int(table.get("max_connections", 4096)),
                log_decisions=_bool(table.get("log_decisions", True), "log_decisions"),
                event_loop=str(table.get("event_loop", "auto")),
                lmtp_transport=str(table.get("lmtp_transport", "torroute-lmtp")),
                lmtp_idle_timeout=float(table.get("lmtp_idle_timeout", 10.0)),
                lmtp_time_limit=float(table.get("lmtp_time_limit", 540.0)),
                lmtp_max_size=int(table.get("lmtp_max_size", 64 * 1024 * 1024)),
                lmtp_session_idle_timeout=float(table.get("lmtp_session_idle_timeout", 10.0)),
            )
        except (TypeError, ValueError, ProtocolError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        changes: dict[str, Any] = {}
        if flags.get("allow_remote"):  # a flag can only allow; false/None: the file decides
            changes["allow_remote"] = True
        for name in ("transport", "socket_group"):
            if flags.get(name):
                changes[name] = flags[name]
        if flags.get("postfix_answer"):
            try:
                changes["postfix_answer"] = check_template(flags["postfix_answer"])
            except ProtocolError as exc:
                raise ConfigError(f"--postfix-answer: {exc}") from None
        if flags.get("socket_mode"):
            try:
                changes["socket_mode"] = int(flags["socket_mode"], 8)
            except ValueError:
                raise ConfigError(f"--socket-mode {flags['socket_mode']!r}: not octal") from None
        settings = replace(settings, **changes)
        settings.check()
        return settings

    def check(self) -> None:
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(f"socket_mode {oct(self.socket_mode)} out of range")
        if not 64 <= self.max_request <= 1 << 20:
            raise ConfigError("max_request must be between 64 and 1048576")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ConfigError("event_loop must be 'auto', 'uvloop' or 'asyncio'")
        if self.automap_timeout <= 0 or self.drain_timeout < 0 or self.max_connections < 1:
            raise ConfigError("automap_timeout, drain_timeout and max_connections must be positive")
        try:
            postfix_value(self.postfix_answer, self.transport, "a" * 56 + ".onion", 25)
        except ProtocolError as exc:
            raise ConfigError(f"transport {self.transport!r}: {exc}") from None
        if self.lmtp_idle_timeout < 0 or self.lmtp_time_limit <= 0 or self.lmtp_max_size < 1024:
            raise ConfigError("lmtp_idle_timeout, lmtp_time_limit, lmtp_max_size out of range")
        if not self.lmtp_session_idle_timeout > 0:
            raise ConfigError("lmtp_session_idle_timeout must be positive")
        if self.lmtp_answer is not None and not _LMTP_ANSWER.fullmatch(self.lmtp_answer):
            raise ConfigError(f"lmtp_transport/listener give an unusable Postfix answer "
                              f"{self.lmtp_answer!r}")
        if not self.allow_remote:
            for kind, endpoints in self.listeners.items():
                for ep in endpoints:
                    if not ep.is_loopback():
                        raise ConfigError(
                            f"{kind} listener {ep} is not a loopback address: lookups are "
                            "unauthenticated; pass --allow-remote (allow_remote = true) if you "
                            "really mean it"
                        )


    @property
    def lmtp_answer(self) -> str | None:
        """The transport_maps answer for every onion route in LMTP mode, e.g.
        ``torroute-lmtp:unix:/run/torroute/lmtp.sock``; None without an lmtp listener."""
        endpoints = self.listeners.get("lmtp", ())
        if not endpoints:
            return None
        return f"{self.lmtp_transport}:{endpoints[0]}"


# A constant from the configuration, never request text; unlike route values it has a '/'.
_LMTP_ANSWER = re.compile(r"[A-Za-z0-9._-]{1,64}:(unix:/[A-Za-z0-9._/-]{1,500}|"
                                        r"inet:[A-Za-z0-9.:\[\]-]{1,300})")


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false")
    return value


# -- per-protocol answers --------------------------------------------------------------------
class _Protocol:
    """How one wire protocol turns decisions into reply bytes."""

    name = ""

    def __init__(self, daemon: LookupDaemon) -> None:
        self.daemon = daemon

    def parser(self, max_request: int):
        raise NotImplementedError

    def answer_now(self, decision: Decision) -> bytes | None:
        """Reply bytes if no I/O is needed, else None (then :meth:`answer` is awaited)."""
        raise NotImplementedError

    async def answer(self, decision: Decision) -> tuple[bytes, str]:
        reply = self.answer_now(decision)
        assert reply is not None
        return reply, ""

    def temp(self, reason: str) -> bytes:
        raise NotImplementedError


class _Postfix(_Protocol):
    codec: Any = None

    def __init__(self, daemon: LookupDaemon) -> None:
        super().__init__(daemon)
        self.found_cache: dict[tuple[str, int], bytes] = {}  # (onion, port) -> reply bytes
        daemon.on_reload.append(self.found_cache.clear)

    def answer_now(self, decision: Decision) -> bytes:
        codec = self.codec
        if decision.__class__ is Route:
            key = (decision.onion, decision.port)
            reply = self.found_cache.get(key)
            if reply is not None:
                return reply
            s = self.daemon.settings
            lmtp = s.lmtp_answer
            if lmtp is not None:  # validated at start-up; the relay routes each recipient
                reply = self.found_raw(lmtp.encode("ascii"))
            else:
                try:
                    value = postfix_value(s.postfix_answer, s.transport, decision.onion,
                                          decision.port)
                except ProtocolError as exc:  # cannot happen for validated routes: defer
                    return codec.temp(f"unusable route: {exc}")
                reply = codec.found(value)
            if len(self.found_cache) >= MEMO_SIZE:
                self.found_cache.clear()
            self.found_cache[key] = reply
            return reply
        if isinstance(decision, NoRoute):
            return codec.notfound()
        if isinstance(decision, Reject):
            return codec.reject()
        return codec.temp(decision.reason)

    def temp(self, reason: str) -> bytes:
        return self.codec.temp(reason)

    def found_raw(self, value: bytes) -> bytes:
        raise NotImplementedError


class _Socketmap(_Postfix):
    name = "socketmap"
    codec = socketmap

    def found_raw(self, value: bytes) -> bytes:
        return socketmap.encode_netstring(b"OK " + value)

    def parser(self, max_request: int) -> socketmap.SocketmapParser:
        return socketmap.SocketmapParser(max_request)


class _TcpTable(_Postfix):
    name = "tcp_table"
    codec = tcptable

    def found_raw(self, value: bytes) -> bytes:
        return b"200 " + tcptable.encode(value) + b"\n"

    def parser(self, max_request: int) -> tcptable.TcpTableParser:
        return tcptable.TcpTableParser(max_request)


class _Exim(_Protocol):
    name = "exim"

    def parser(self, max_request: int) -> eximline.EximLineParser:
        return eximline.EximLineParser(max_request)

    def answer_now(self, decision: Decision) -> bytes | None:
        if isinstance(decision, Route):
            return None  # the automap address must come fresh from tor's DNSPort
        if isinstance(decision, NoRoute):
            return eximline.notfound()
        if isinstance(decision, Reject):
            return eximline.fail(decision.reason)
        return eximline.temp(decision.reason)

    async def answer(self, decision: Decision) -> tuple[bytes, str]:
        if not isinstance(decision, Route):
            return await super().answer(decision)
        config = self.daemon.router.config
        try:
            ip = await aresolve_automap(
                decision.onion,
                config.tor_dns,
                self.daemon.settings.automap_timeout,
                config.virtual_network,
            )
        except TorrouteError as exc:  # tor down, automap off: defer
            return eximline.temp(f"automap: {exc}"), f"automap failed: {exc}"
        return eximline.found(ip, decision.port), f"via {ip}"

    def temp(self, reason: str) -> bytes:
        return eximline.temp(reason)


# -- connections -----------------------------------------------------------------------------
class _Connection(asyncio.Protocol):
    """One client connection; replies leave in request order."""

    def __init__(self, daemon: LookupDaemon, proto: _Protocol) -> None:
        self.daemon = daemon
        self.proto = proto
        self.parser = proto.parser(daemon.settings.max_request)
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
            try:
                decision = daemon.quick_decision(ev.key)
                reply = None if decision is None else self.proto.answer_now(decision)
            except Exception:  # the slow path turns any failure into a temp answer
                decision = reply = None
            if reply is None:
                self.backlog.append(ev)
                continue
            transport.write(reply)
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


# -- the LMTP relay -------------------------------------------------------------------------
#: Input a session keeps while it relays a transaction before it stops reading.  Postfix
#: sends nothing past the end of DATA until it has the replies; this bounds other clients.
LMTP_PENDING_LIMIT = 256 * 1024


class LmtpService:
    """What the LMTP sessions share: one :class:`torroute.delivery.relay.Relay` (its pool of tor
    connections) and the transactions being relayed."""

    def __init__(self, daemon: LookupDaemon) -> None:
        from ..delivery.pipe import DeliverSettings
        from ..delivery.relay import Relay

        self.daemon = daemon
        s = daemon.settings
        self.relay = Relay(daemon.router, DeliverSettings.from_config(daemon.router.config),
                           idle_timeout=s.lmtp_idle_timeout, time_limit=s.lmtp_time_limit)
        self.tasks: set[asyncio.Task] = set()  # relays in flight, one per busy session

    @staticmethod
    def check(config: Config) -> DeliverSettings:
        """The ``[deliver]`` settings of ``config`` (raises ConfigError): checked before a
        reload commits, so a broken section keeps the whole old configuration."""
        from ..delivery.pipe import DeliverSettings

        return DeliverSettings.from_config(config)

    def apply(self, deliver: DeliverSettings) -> None:
        self.relay.settings = deliver
        self.relay.time_limit = self.daemon.settings.lmtp_time_limit
        self.relay.pool.idle_timeout = self.daemon.settings.lmtp_idle_timeout

    def factory(self) -> _LmtpSession:
        return _LmtpSession(self)

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


class _LmtpSession(asyncio.Protocol):
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


# -- the daemon ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReloadState:
    """How the last (re)load of the configuration went: what ``torroute status`` and systemd's
    STATUS line tell an operator, who otherwise sees a failed SIGHUP only in the log."""

    ok: bool
    when: float  # time.time()
    message: str  # "started", "reloaded" or the error (one line, FILE:LINE for a map)
    pinned: int  # pinned domains served now (the old configuration's after a failure)

    def status(self) -> str:
        """The systemd STATUS= text (one line)."""
        if self.ok:
            return f"serving {self.pinned} pinned domains"
        return (f"serving {self.pinned} pinned domains; last reload failed: "
                f"{sanitize_reason(self.message, 300)}; old configuration kept")


def _one_line(exc: BaseException) -> str:
    """An error as one log line; an unexpected exception keeps its type name."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, TorrouteError) else f"{type(exc).__name__}: {text}"


class LookupDaemon:
    """Listeners + router.  ``await start()``, then ``reload()`` / ``await stop()``."""

    def __init__(
        self,
        config: Config,
        settings: ServeSettings | None = None,
        router: Router | None = None,
        reload_config: Callable[[], Config] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        """``overrides``: what ServeSettings.from_config got at start (the command line's
        listeners and answers); reload re-applies them, so SIGHUP keeps the flags winning."""
        self.settings = settings or ServeSettings.from_config(config)
        self.router = router or Router.from_config(config)
        self.reload_config = reload_config
        self.overrides = dict(overrides or {})
        self._inodes: dict[str, int] = {}
        # domain -> static decision, or (_NEEDS_DNS, normalized name); pure function of the
        # configuration and maps, so it is cleared on reload
        self._static: dict[str, Any] = {}
        self._log_prefix: dict[tuple[str, int], tuple[Decision, str]] = {}
        self.on_reload: list[Callable[[], None]] = [self._static.clear, self._log_prefix.clear]
        self.log_decisions = self.settings.log_decisions and log.isEnabledFor(logging.INFO)
        self.write_line: Callable[[str], None] | None = None  # fast path for decision lines
        self.connections: set[_Connection | _LmtpSession] = set()  # every kind counts
        self.servers: list[tuple[str, Endpoint, asyncio.base_events.Server]] = []
        self.stopping = False
        self.malformed = 0
        self._all_gone: asyncio.Event | None = None
        self.lmtp: LmtpService | None = None
        self.reload_state = ReloadState(True, time.time(), "started", len(self.router.pins))

    # decisions
    def quick_decision(self, key: str) -> Decision | None:
        """The decision if it needs no I/O (static or cached), else None."""
        if key == "*":  # Postfix probes transport_maps with '*' at start: never a default
            return NoRoute("*", "wildcard probe")
        router = self.router
        domain = destination_domain(key)
        memo = self._static.get(domain)
        if memo is None:
            static = decide_static(domain, router.config, router.pins)
            memo = static if static is not None else (_NEEDS_DNS, normalize_domain(domain))
            if len(self._static) >= MEMO_SIZE:
                self._static.clear()
            self._static[domain] = memo
        if memo.__class__ is not tuple:
            return memo
        hit = router.cache.get(memo[1])
        return hit[0] if hit is not None else None

    def log_decision(self, proto: str, ev: Lookup, decision: Decision, started: float,
                     note: str) -> None:
        ms = (time.perf_counter() - started) * 1000
        key = (proto, id(decision))
        cached = self._log_prefix.get(key)
        if cached is not None and cached[0] is decision:
            message = cached[1]
        else:
            message = self._log_message(proto, decision)
            if len(self._log_prefix) >= MEMO_SIZE:
                self._log_prefix.clear()
            self._log_prefix[key] = (decision, message)  # keeps the object: ids stay unique
        if note:
            message = f"{message}note={sanitize_reason(note)!r} "
        if self.write_line is not None:
            self.write_line(f"{message}ms={ms:.2f}")
        else:
            log.info("%sms=%.2f", message, ms)

    @staticmethod
    def _log_message(proto: str, decision: Decision) -> str:
        domain = decision.domain
        if not (domain.isascii() and domain.isprintable()) or " " in domain or "%" in domain:
            domain = sanitize_reason(domain, 260)
        if decision.__class__ is Route:
            detail = f"route={decision.onion}:{decision.port} source={decision.source!r}"
        else:
            detail = f"reason={sanitize_reason(decision.reason)!r}"
        return f"decision proto={proto} domain={domain} result={decision.kind} {detail} "

    # listeners
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        protos = {"socketmap": _Socketmap, "tcp_table": _TcpTable, "exim": _Exim}
        if not any(self.settings.listeners.values()):
            raise ConfigError("no listeners: give --socketmap, --tcp-table, --exim or --lmtp "
                              "(or [serve] socketmap/tcp_table/exim/lmtp)")
        try:
            for kind, endpoints in self.settings.listeners.items():
                for ep in endpoints:
                    factory: Callable[[], asyncio.BaseProtocol]
                    if kind == "lmtp":
                        if self.lmtp is None:
                            self.lmtp = LmtpService(self)
                        factory = self.lmtp.factory
                    else:
                        proto = protos[kind](self)

                        def factory(proto: _Protocol = proto) -> _Connection:
                            return _Connection(self, proto)

                    if ep.family == "unix":
                        server = await self._unix_server(loop, factory, ep)
                    else:
                        server = await loop.create_server(factory, ep.host, ep.port,
                                                          reuse_address=True, backlog=1024)
                    self.servers.append((kind, ep, server))
                    log.info("listening: %s on %s", kind, self.bound(kind, ep))
        except BaseException:
            await self.stop(drain=False)
            raise

    def bound(self, kind: str, ep: Endpoint) -> Endpoint:
        """The endpoint actually bound (the port chosen when 0 was asked for)."""
        for k, e, server in self.servers:
            if k == kind and e == ep and e.family == "inet" and server.sockets:
                host, port = server.sockets[0].getsockname()[:2]
                return Endpoint("inet", host=host, port=port)
        return ep

    async def _unix_server(self, loop, factory, ep: Endpoint):
        path = Path(ep.path)
        group = self.settings.socket_group
        gid = -1
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"socket_group {group!r}: no such group") from None
        self._socket_directory(path, gid)
        try:
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise ConfigError(f"{path} exists and is not a socket")
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(path))
                except OSError:
                    path.unlink()  # stale socket of a previous run
                else:
                    raise ConfigError(f"{path}: another daemon is listening there")
                finally:
                    probe.close()
            old = os.umask(0o177)  # never world-accessible, not even for an instant
            try:
                server = await loop.create_unix_server(factory, str(path), backlog=1024)
            finally:
                os.umask(old)
            if gid != -1:
                os.chown(path, -1, gid)
            os.chmod(path, self.settings.socket_mode)
            self._inodes[str(path)] = path.stat().st_ino
        except OSError as exc:  # the bare strerror does not say which of the listeners
            raise ConfigError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
        return server

    @staticmethod
    def _socket_directory(path: Path, gid: int) -> None:
        """Make the socket's directory if it is torroute's own (named ``torroute``, as
        /run/torroute, which systemd's RuntimeDirectory makes but a shell does not); any other
        missing directory is a mistake in the path, reported as such."""
        directory = path.parent
        if directory.is_dir():
            return
        if directory.name != "torroute" or not directory.parent.is_dir():
            raise ConfigError(f"cannot listen on unix:{path}: directory {directory} does not "
                              "exist (torroute creates only its own, a 'torroute' directory "
                              "in an existing one, such as /run/torroute)")
        try:
            directory.mkdir(mode=0o700)
            if gid != -1:  # the socket group must enter; others need not
                os.chown(directory, -1, gid)
            os.chmod(directory, 0o750 if gid != -1 else 0o755)
        except FileExistsError:
            return
        except OSError as exc:
            raise ConfigError(f"cannot create the socket directory {directory}: "
                              f"{exc.strerror or exc}") from None
        log.info("created the socket directory %s", directory)

    # lifecycle
    def reload(self) -> bool:
        """Re-read config and maps; on any error keep serving with the old ones, whole.

        A failure is one ERROR line naming it (a map's MapError says FILE:LINE), no traceback;
        the outcome is kept in ``reload_state`` (for ``torroute status`` and systemd's STATUS).
        """
        if self.reload_config is None:
            log.warning("reload requested, but no configuration source")
            return False
        try:
            config = self.reload_config()
            settings = ServeSettings.from_config(config, self.overrides)
            deliver = self.lmtp.check(config) if self.lmtp is not None else None
            self.router.reload(config)  # last: it swaps only once the maps loaded
        except Exception as exc:
            message = _one_line(exc)
            self.reload_state = ReloadState(False, time.time(), message, len(self.router.pins))
            log.error("reload failed, keeping the old configuration: %s", message)
            return False
        # listeners stay as they are (restart the daemon to change them)
        self.settings = replace(settings, listeners=self.settings.listeners)
        if self.lmtp is not None and deliver is not None:
            self.lmtp.apply(deliver)
        for hook in self.on_reload:
            hook()
        self.log_decisions = self.settings.log_decisions and log.isEnabledFor(logging.INFO)
        pinned = len(self.router.pins)
        self.reload_state = ReloadState(True, time.time(), "reloaded", pinned)
        log.warning("reloaded configuration: %d pinned domains", pinned)
        return True

    def _connection_gone(self) -> None:
        if self._all_gone is not None and not self.connections:
            self._all_gone.set()

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting, let in-flight lookups answer (up to drain_timeout), then close."""
        self.stopping = True
        for _kind, _ep, server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn._maybe_finish()  # idle connections close now, busy ones after their answer
        if drain and self.connections:
            self._all_gone = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_gone.wait(), self.settings.drain_timeout)
            except TimeoutError:
                log.warning("drain timeout: closing %d busy connections", len(self.connections))
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self.lmtp is not None:
            await self.lmtp.stop()
        for _kind, ep, server in self.servers:
            await server.wait_closed()
            if ep.family == "unix":  # only our own socket, not a successor's
                try:
                    if os.stat(ep.path).st_ino == self._inodes.get(ep.path):
                        os.unlink(ep.path)
                except FileNotFoundError:
                    pass
        self.servers.clear()


async def run_daemon(daemon: LookupDaemon, ready: Callable[[], None] | None = None) -> None:
    """Start, serve until SIGTERM/SIGINT (SIGHUP reloads), drain, return."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    await daemon.start()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def on_hup() -> None:
        sd_notify("RELOADING=1")
        daemon.reload()
        sd_notify(f"READY=1\nSTATUS={daemon.reload_state.status()}")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    sd_notify(f"READY=1\nSTATUS={daemon.reload_state.status()}")
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        sd_notify("STOPPING=1")
        log.warning("stopping: draining %d connections", len(daemon.connections))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await daemon.stop()


def serve(daemon: LookupDaemon, event_loop: str = "auto") -> None:
    """Run the daemon to completion on uvloop when available ("auto"), else asyncio's loop.

    uvloop roughly halves the per-request cost of the event loop; everything works without it.
    """
    factory = None
    if event_loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise ConfigError("event_loop = 'uvloop' but uvloop is not installed") from None
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run_daemon(daemon))


class DeferredFlushHandler(logging.StreamHandler):
    """A stream handler that writes to a buffer and flushes it at most every ``delay`` seconds.

    One log line per decision is wanted, but a write(2) per line costs more than the lookup
    itself.  Warnings and errors flush at once; without a running loop (start-up, shutdown)
    every record is flushed at once.
    """

    def __init__(self, stream, delay: float = 0.2) -> None:
        super().__init__(stream)
        self.delay = delay
        self._pending = False

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            super().flush()

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (any more): write everything now
            self._pending = False
            super().flush()
            return
        if self._pending:
            return
        self._pending = True
        loop.call_later(self.delay, self._flush_now)

    def _flush_now(self) -> None:
        self._pending = False
        super().flush()

    def line_writer(self, logger: logging.Logger) -> Callable[[str], None] | None:
        """A fast writer of INFO lines for ``logger`` formatted exactly as this handler would,
        or None if the format is not constant (e.g. it has a timestamp)."""
        fmt = self.formatter or logging.Formatter()
        if "asctime" in getattr(fmt, "_fmt", "") or "created" in getattr(fmt, "_fmt", ""):
            return None
        marker = "\x00message\x00"
        record = logging.LogRecord(logger.name, logging.INFO, "", 0, marker, None, None)
        text = fmt.format(record)
        if text.count(marker) != 1:
            return None
        prefix, suffix = text.split(marker)
        suffix += self.terminator
        write = self.stream.write

        def line(message: str) -> None:
            write(prefix + message + suffix)
            self.flush()

        return line


def install_fast_logging() -> DeferredFlushHandler | None:
    """Cheaper log records for the daemon (no caller/thread/process lookups per record) and a
    buffered stderr handler in place of the root's line-buffered one."""
    import sys

    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented switch: skip the stack walk that finds the caller
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
            stream = open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8",
                          errors="backslashreplace", closefd=False)
            fast = DeferredFlushHandler(stream)
            fast.setFormatter(handler.formatter)
            fast.setLevel(handler.level)
            root.removeHandler(handler)
            root.addHandler(fast)
            return fast
    return None


def decision_line_writer(handler: DeferredFlushHandler | None) -> Callable[[str], None] | None:
    """Bypass the logging machinery for decision lines when that changes nothing visible:
    the decision logger has no handlers or filters of its own and the root has only ``handler``.
    """
    if handler is None or not log.isEnabledFor(logging.INFO):
        return None
    chain = [log, *[logging.getLogger(n) for n in ("torroute",)]]
    if any(lg.handlers or lg.filters or not lg.propagate for lg in chain):
        return None
    root = logging.getLogger()
    if root.handlers != [handler] or handler.filters or handler.level > logging.INFO:
        return None
    return handler.line_writer(log)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
