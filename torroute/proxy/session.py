"""The driver of the HELO proxy: one asyncio loop for both ways a connection arrives.

:class:`ProxySession` performs :class:`~torroute.protocols.heloproxy.HeloProxy`'s actions: it
moves bytes, asks the one :class:`~torroute.routing.router.Router`, dials through
:mod:`torroute.tor.dial` (SRV targets in order with the one :class:`TargetPlan` rule) and
enforces a deadline at every step (``ProxySettings``: the client's EHLO line, the whole
handshake, each dial, each remote reply, the splice's idle time).  :func:`serve_stdio` is the
inetd / xinetd / systemd ``Accept=yes`` mode (the connection is stdin/stdout: a socket or two
pipes); :func:`serve_listen` the listener, with its bound on concurrent sessions.

Why asyncio for one connection too: the splice waits on two streams and a timer at once; one
driver for both modes means one behaviour to test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable

from ..config import Config
from ..delivery.targets import TargetPlan, socks_may_try_next, socks_outcome
from ..endpoint import format_hostport
from ..errors import SocksError
from ..protocols.heloproxy import (
    CLIENT,
    CLOSED,
    DEFERRING,
    REMOTE,
    ROUTE,
    SPLICE,
    Close,
    Connect,
    HeloProxy,
    RemoteFailed,
    Spliced,
    ToClient,
    ToRemote,
)
from ..protocols.smtp import temporary
from ..routing.router import Router
from ..tor import dial as tordial
from .settings import ProxySettings

log = logging.getLogger("torroute.proxy")

READ_SIZE = 65536
TOO_MANY = b"421 4.3.2 torroute proxy: too many sessions, try again later\r\n"


class ProxySession:
    """One MTA connection, from the proxy's 220 to the last byte of the splice."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 router: Router, config: Config, settings: ProxySettings,
                 peer: str = "-") -> None:
        self.client = (reader, writer)
        self.remote: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.router = router
        self.config = config
        self.settings = settings
        self.peer = peer
        self.machine = HeloProxy(settings.banner_name, settings.helo_name,
                                 settings.defer_at)
        self.target: tuple[str, int] | None = None
        self.decision = None  # the router's answer for the destination
        self.result = ""
        self.failed = False

    async def run(self) -> None:
        try:
            await self._act(self.machine.start())
            await self._read_helo()
            if self.machine.waiting == ROUTE:
                try:
                    async with asyncio.timeout(self.settings.handshake_timeout):
                        await self._route_and_connect()
                except TimeoutError:
                    await self._act(self.machine.timed_out())
            if self.machine.waiting == SPLICE:
                await self._splice()
            elif self.machine.waiting == DEFERRING:
                await self._read_client(DEFERRING)
        except (ConnectionError, OSError) as exc:  # a side went away mid-write
            self._finish(f"connection lost: {exc}", error=False)
        except Exception:
            log.exception("proxy %s: internal error", self.peer)
            self.result = self.result or "internal error"
            try:
                await self._act(self.machine.refuse("internal error", "4.3.0"))
            except Exception:  # noqa: S110 - the client may be gone as well
                pass
        finally:
            self._close_all()
            self._log()

    # -- the steps
    async def _read_helo(self) -> None:
        await self._read_client(CLIENT)

    async def _read_client(self, phase: str) -> None:
        """Feed the client's lines while the machine is in ``phase`` (its EHLO line, or the
        failed session's own dialogue), each within ``command_timeout``."""
        reader = self.client[0]
        while self.machine.waiting == phase:
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE),
                                              self.settings.command_timeout)
            except TimeoutError:
                await self._act(self.machine.timed_out())
                return
            await self._act(self.machine.client_data(data) if data
                            else self.machine.client_eof())

    async def _route_and_connect(self) -> None:
        request = self.machine.request
        try:
            decision = await self.router.aroute(request.destination)
        except Exception as exc:  # a resolver bug must defer, never pass
            log.exception("proxy %s: routing %s failed", self.peer, request.destination)
            await self._act(self.machine.refuse(f"routing failed: {exc}", "4.4.3"))
            return
        self.decision = decision
        controls = await self._act(self.machine.routed(decision))
        connect = next((c for c in controls if isinstance(c, Connect)), None)
        if connect is None:
            return
        plan = TargetPlan(connect.targets)
        s, proxy = self.settings, self.config.tor_socks
        while (target := plan.next()) is not None:
            host, port = target
            destination = f"{host}:{port}"
            isolate = s.isolate_streams
            try:
                self.remote = await tordial.open_connection(host, port, proxy,
                                                            s.connect_timeout, isolate)
            except (OSError, SocksError, ValueError) as exc:
                outcome = socks_outcome(exc, destination, proxy, s.connect_timeout)
                log.info("proxy %s: %s: %s", self.peer, destination, outcome.text)
                plan.record([outcome], socks_may_try_next(exc, outcome))
                continue
            self.target = target
            await self._act(self.machine.connected())
            failure = await self._remote_handshake()
            if failure is None:
                return  # spliced (or closed by the client)
            log.info("proxy %s: %s: %s", self.peer, destination, failure)
            self._close_remote()
            plan.record([temporary("4.4.2", f"{destination}: {failure}")], True)
        outcome = plan.outcomes()[0]
        dsn = outcome.dsn if outcome.dsn.startswith("4.") else "4.4.1"
        await self._act(self.machine.refuse(outcome.text, dsn))

    async def _remote_handshake(self) -> str | None:
        """The remote's greeting and EHLO answer: None when spliced, else why it failed."""
        reader = self.remote[0]
        while self.machine.waiting == REMOTE:
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE),
                                              self.settings.remote_timeout)
            except TimeoutError:
                return f"no answer within {self.settings.remote_timeout:g}s"
            except OSError as exc:
                return f"connection lost: {exc}"
            controls = await self._act(self.machine.remote_data(data) if data
                                       else self.machine.remote_eof())
            for control in controls:
                if isinstance(control, RemoteFailed):
                    return control.reason
        return None

    async def _splice(self) -> None:
        last = [time.monotonic()]

        async def pump(reader: asyncio.StreamReader, feed: Callable, eof: Callable) -> None:
            while self.machine.waiting == SPLICE:
                try:
                    data = await reader.read(READ_SIZE)
                except OSError:
                    data = b""
                last[0] = time.monotonic()
                await self._act(feed(data) if data else eof())

        async def watchdog() -> None:
            idle = self.settings.idle_timeout
            while self.machine.waiting == SPLICE:
                left = last[0] + idle - time.monotonic()
                if left <= 0:
                    await self._act(self.machine.timed_out())
                    return
                await asyncio.sleep(left)

        m = self.machine
        tasks = [asyncio.ensure_future(pump(self.client[0], m.client_data, m.client_eof)),
                 asyncio.ensure_future(pump(self.remote[0], m.remote_data, m.remote_eof)),
                 asyncio.ensure_future(watchdog())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # an exception of a pump is the session's
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- actions
    async def _act(self, actions: list) -> list:
        """Write what is to be written; return the other actions for the caller."""
        controls = []
        for action in actions:
            if isinstance(action, ToClient):
                await self._write(self.client[1], action.data)
            elif isinstance(action, ToRemote):
                if self.remote is not None:
                    await self._write(self.remote[1], action.data)
            elif isinstance(action, Close):
                self._finish(action.reason, action.error)
                controls.append(action)
            elif isinstance(action, Spliced):
                self.result = f"spliced: {action.reply.text()[:120]}"
                controls.append(action)
            else:
                controls.append(action)
        return controls

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.settings.idle_timeout)

    def _finish(self, reason: str, error: bool) -> None:
        if self.machine.waiting != CLOSED:
            self.machine.waiting = CLOSED
        if self.result.startswith("spliced") and not error:
            self.result += f"; {reason}"
        else:
            self.result = reason
        self.failed = self.failed or error

    def _close_remote(self) -> None:
        if self.remote is not None:
            try:
                self.remote[1].close()
            except (OSError, RuntimeError):
                pass
            self.remote = None

    def _close_all(self) -> None:
        self._close_remote()
        try:
            self.client[1].close()
        except (OSError, RuntimeError):
            pass

    def _log(self) -> None:
        request = self.machine.request
        what = (f"{request.verb} {request.local_name} -> {request.destination}"
                if request else "no EHLO")
        via = ""
        if self.target is not None:
            via = f" via {format_hostport(self.target)}"
        result = self.result or "closed"
        if self.machine.failure and self.machine.defer_at == "rcpt":
            result = f"deferred at RCPT: {self.machine.failure}"
        log.log(logging.WARNING if self.failed else logging.INFO, "proxy %s: %s%s: %s",
                self.peer, what, via, result)


# ---- the two modes


async def serve_stdio(config: Config, settings: ProxySettings,
                      router: Router | None = None) -> None:
    """One session on stdin/stdout: a socket (inetd, xinetd, systemd ``Accept=yes``, socat's
    socketpair) or two pipes."""
    router = router or Router.from_config(config)
    loop = asyncio.get_running_loop()
    mode = os.fstat(0).st_mode
    peer = "stdin"
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(0))
        sock.setblocking(False)
        try:
            name = sock.getpeername()
            peer = format_hostport(name[:2]) if isinstance(name, tuple) else "unix"
        except OSError:
            pass
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        await loop.connect_read_pipe(lambda: protocol, os.fdopen(os.dup(0), "rb", 0))
        transport, wproto = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(os.dup(1), "wb", 0))
        writer = asyncio.StreamWriter(transport, wproto, reader, loop)
    await ProxySession(reader, writer, router=router, config=config, settings=settings,
                       peer=peer).run()


async def serve_listen(config: Config, settings: ProxySettings, router: Router | None = None,
                       stop: asyncio.Event | None = None) -> None:
    """Accept on ``settings.listen`` until SIGTERM/SIGINT (or ``stop``); at most
    ``max_sessions`` at once, the next one gets ``421 4.3.2`` at once."""
    settings.check()
    router = router or Router.from_config(config)
    stop = stop or asyncio.Event()
    active: set[asyncio.Task] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = format_hostport(peername[:2]) if isinstance(peername, tuple) else "-"
        if len(active) >= settings.max_sessions:
            log.warning("proxy %s: refused: %d sessions already", peer, len(active))
            try:
                writer.write(TOO_MANY)
                await asyncio.wait_for(writer.drain(), 5)
            except (OSError, TimeoutError):
                pass
            writer.close()
            return
        task = asyncio.current_task()
        active.add(task)
        try:
            await ProxySession(reader, writer, router=router, config=config,
                               settings=settings, peer=peer).run()
        finally:
            active.discard(task)

    host, port = settings.listen
    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    bound = server.sockets[0].getsockname()
    log.info("proxy: listening on %s (max %d sessions)", format_hostport(bound[:2]),
                settings.max_sessions)
    async with server:
        await stop.wait()
        server.close()
        for task in list(active):
            task.cancel()
        await asyncio.gather(*active, return_exceptions=True)
