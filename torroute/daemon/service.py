"""The lookup daemon's service: listeners, the router, reload, signals, systemd, shutdown.

One asyncio process serves every listener (socketmap, tcp_table, Exim's line protocol, LMTP):
Postfix keeps its map connections open for a long time, so there is no process or thread per
connection.  The data path: a connection (:mod:`.lookup`) asks the router
(``Router.decide_now``, else ``aroute``) and writes the answer of its protocol
(:mod:`.answers`); LMTP sessions (:mod:`.lmtp`) relay mail through tor.

Fail closed: every failure that is not a definite "no route" answers TEMP / 400 / ``temp``, so
the MTA defers instead of using its default (clear-net) transport.
"""

from __future__ import annotations

import asyncio
import collections
import grp
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..endpoint import Endpoint
from ..errors import ConfigError, TorrouteError
from ..protocols import Lookup, sanitize_reason
from ..routing.decisions import Decision, Route
from ..routing.router import Router
from .answers import ANSWERS, MEMO_SIZE, Answers
from .lmtp import LmtpService, LmtpSession
from .lookup import WILDCARD_PROBE, LookupConnection
from .settings import ServeSettings

if TYPE_CHECKING:
    from .health import HealthService
    from .metrics import RelayCounters

log = logging.getLogger(__package__)  # one logger for all the daemon's lines: torroute.daemon


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
        # (proto, id(decision)) -> (decision, log text): the router returns the same decision
        # object for a pin or a cached SRV answer, so its text is formatted once
        self._log_prefix: dict[tuple[str, int], tuple[Decision, str]] = {}
        self.on_reload: list[Callable[[], None]] = [self._log_prefix.clear]
        self.log_decisions = self.settings.log_decisions and log.isEnabledFor(logging.INFO)
        self.write_line: Callable[[str], None] | None = None  # fast path for decision lines
        self.connections: set[LookupConnection | LmtpSession] = set()  # every kind counts
        self.servers: list[tuple[str, Endpoint, asyncio.base_events.Server]] = []
        self.stopping = False
        self.malformed = 0
        self._all_gone: asyncio.Event | None = None
        self.lmtp: LmtpService | None = None
        self.reload_state = ReloadState(True, time.time(), "started", len(self.router.pins))
        self.reload_failures = 0  # since start (torroute_reload_failures_total)
        self.started = time.time()
        #: answers by protocol and result (:func:`.lookup.count_table`): metrics and status
        self.lookups: dict[str, collections.defaultdict[str, int]] = {}
        self.health: HealthService | None = None  # set by health.make_service
        self.relay_counters: RelayCounters | None = None  # made by metrics.relay_counters
        #: side services (per-onion health, canaries and healing; metrics; the status socket),
        #: each with ``async start()`` / ``async stop()``, started after the listeners
        self.services: list[Any] = []

    # decisions
    def quick_decision(self, key: str) -> Decision | None:
        """The decision if it needs no I/O (static or cached), else None
        (:meth:`LookupConnection._handle` inlines this)."""
        return WILDCARD_PROBE if key == "*" else self.router.decide_now(key)

    def log_decision(self, proto: str, ev: Lookup | None, decision: Decision, started: float,
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
        if not any(self.settings.listeners.values()):
            raise ConfigError("no listeners: give --socketmap, --tcp-table, --exim or --lmtp "
                              "(or [serve] socketmap/tcp_table/exim/lmtp)")
        if self.settings.listeners.get("lmtp") and self.lmtp is None:
            self.lmtp = LmtpService(self)  # reads [deliver]: a mistake there binds nothing
        try:
            for kind, endpoints in self.settings.listeners.items():
                for ep in endpoints:
                    factory: Callable[[], asyncio.BaseProtocol]
                    if kind == "lmtp":
                        assert self.lmtp is not None
                        factory = self.lmtp.factory
                    else:
                        proto = ANSWERS[kind](self)

                        def factory(proto: Answers = proto) -> LookupConnection:
                            return LookupConnection(self, proto)

                    await self.listen(kind, ep, factory)
                    # the links of the listener lmtp_answer names (the first one)
                    if kind == "lmtp" and ep is endpoints[0] and ep.family == "unix" \
                            and self.lmtp is not None and self.settings.lmtp_per_onion:
                        from .lmtp_links import OnionLinks

                        self.lmtp.links = OnionLinks(ep.path).prepare()
            for make in side_services():
                service = make(self)
                if service is not None:
                    await service.start()
                    self.services.append(service)
        except BaseException:
            await self.stop(drain=False)
            raise

    async def listen(self, kind: str, ep: Endpoint,
                     factory: Callable[[], asyncio.BaseProtocol]) -> asyncio.base_events.Server:
        """Bind one listener of any kind (lookups, LMTP, and the side services' metrics and
        status sockets): a unix socket with the socket mode/group and the stale-socket check,
        or TCP as given.  It is kept in ``servers``: :meth:`stop` closes it and removes its
        socket file, and ``torroute status`` lists it."""
        loop = asyncio.get_running_loop()
        if ep.family == "unix":
            server = await self._unix_server(loop, factory, ep)
        else:
            server = await loop.create_server(factory, ep.host, ep.port, reuse_address=True,
                                              backlog=1024)
        self.servers.append((kind, ep, server))
        log.info("listening: %s on %s", kind, self.bound(kind, ep))
        return server

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
            self.reload_failures += 1
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
            server.close()  # first, before any await: nothing new is accepted from here on
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)
        self.services.clear()
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


def side_services() -> list[Callable[[LookupDaemon], Any]]:
    """Each ``make(daemon) -> service | None`` (None: not configured), in start order."""
    from . import health, metrics, status

    return [health.make_service, metrics.make_service, status.make_service]


async def run_daemon(daemon: LookupDaemon, ready: Callable[[], None] | None = None) -> None:
    """Start, serve until SIGTERM/SIGINT (SIGHUP reloads), drain, return.

    The handlers are in place before the first listener is bound: a SIGHUP that comes while
    the daemon starts (a client already sees its sockets) is held and carried out once it has
    started, instead of killing it (SIGHUP's default action)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    starting, held = [True], []  # a SIGHUP during start() is held

    def on_hup() -> None:
        if starting:
            held.append(True)
            return
        sd_notify("RELOADING=1")
        daemon.reload()
        sd_notify(f"READY=1\nSTATUS={daemon.reload_state.status()}")

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await daemon.start()
    except BaseException:
        for sig in signals:
            loop.remove_signal_handler(sig)
        raise
    starting.clear()
    sd_notify(f"READY=1\nSTATUS={daemon.reload_state.status()}")
    if held:
        on_hup()
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        sd_notify("STOPPING=1")
        log.warning("stopping: draining %d connections", len(daemon.connections))
        for sig in signals:
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
