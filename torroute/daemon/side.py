"""What the daemon's side listeners (the metrics endpoint, the status socket) share: one request
per connection, answered once within a deadline and closed; a bounded number of clients; bound
through :meth:`LookupDaemon.listen` like every listener, so ``stop()`` closes it and removes
its socket file."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..endpoint import Endpoint
    from .service import LookupDaemon

DEADLINE = 5.0  # seconds for a client to send its request (a scraper or `status` sends at once)
MAX_CLIENTS = 32  # concurrent connections per side listener


class OneRequestConnection(asyncio.Protocol):
    """One request in, one answer out.  Subclasses say what the bytes so far are worth:
    :meth:`on_data` returns the answer once the request is complete (None: read on)."""

    def __init__(self, service: SideListener) -> None:
        self.service = service
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    # what a subclass answers
    def on_data(self, buf: bytes) -> bytes | None:
        raise NotImplementedError

    def on_eof(self, buf: bytes) -> bytes:
        raise NotImplementedError

    def on_timeout(self) -> bytes:
        raise NotImplementedError

    def on_busy(self) -> bytes:
        raise NotImplementedError

    # the driver
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.service.clients) >= MAX_CLIENTS or self.service.stopping:
            self.finish(self.on_busy())
            return
        self.service.clients.add(self)
        self.timer = asyncio.get_running_loop().call_later(DEADLINE, self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        reply = self.on_data(self.buf)
        if reply is not None:
            self.finish(reply)

    def eof_received(self) -> bool:
        if not self.done:
            self.finish(self.on_eof(self.buf))
        return False

    def _timeout(self) -> None:
        self.timer = None
        if not self.done:
            self.finish(self.on_timeout())

    def finish(self, reply: bytes) -> None:
        self.done = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.service.clients.discard(self)


class SideListener:
    """A side service with one listener (``kind`` names it in the log and in the status)."""

    kind = ""
    connection: type[OneRequestConnection] = OneRequestConnection

    def __init__(self, daemon: LookupDaemon, endpoint: Endpoint | None) -> None:
        self.daemon = daemon
        self.endpoint = endpoint
        self.server: asyncio.base_events.Server | None = None
        self.clients: set[OneRequestConnection] = set()
        self.stopping = False

    async def start(self) -> None:
        assert self.endpoint is not None
        self.server = await self.daemon.listen(self.kind, self.endpoint,
                                               lambda: self.connection(self))

    async def stop(self) -> None:
        """Before the daemon closes the listener (and removes its socket): end the clients."""
        self.stopping = True
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()
