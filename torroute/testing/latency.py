"""A delaying TCP proxy on loopback: what gives the private Tor network the latency of the real
one (``PrivateNetwork(latency_ms=...)``, ``torroute testnet up --latency-ms``).

Why: the private network runs at loopback speed, which flatters every design that pays a round
trip per message.  There is no ``netem`` here (no privileges, no qdisc in a netns of ours), so
each relay's advertised ORPort is this proxy, which forwards to the relay's real ORPort and
holds every chunk ``delay`` seconds in each direction: a link's round trip grows by twice the
delay, an onion circuit's (six links) by twelve times.

Each direction keeps its order (one FIFO per direction, each chunk released at its arrival
time + delay, so a stream of chunks is shifted, not serialised by the delay), buffers at most
``max_buffer`` bytes (then reading pauses: bounded memory) and forwards the end of input
(half-close) after the data before it; a reset on one side closes both.

    python -m torroute.testing.latency --delay-ms 50 [--owner PID] [--dir DIR] LISTEN=TARGET...

(LISTEN and TARGET are ``127.0.0.1:PORT``; the process prints ``ready`` once every listener
is bound, its counters on stderr when they change, and exits when ``--owner`` is gone or
``--dir`` disappears.)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import sys
from pathlib import Path

from ..endpoint import HostPort, format_hostport, parse_hostport
from ..errors import ConfigError
from .torrc_safety import is_loopback_ipv4

CHUNK = 65536


class _Direction:
    """One direction of one proxied connection: a FIFO of (release time, bytes)."""

    def __init__(self, proxy: LatencyProxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.reader = reader
        self.writer = writer  # the other side's writer
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.changed = asyncio.Event()  # something queued, or the end of input
        self.room = asyncio.Event()  # buffered below max_buffer again
        self.room.set()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(CHUNK)
                if not data:
                    break
                self.queue.append((loop.time() + self.proxy.delay, data))
                self.buffered += len(data)
                self.proxy.bytes_delayed += len(data)
                if self.buffered >= self.proxy.max_buffer:
                    self.room.clear()
                self.changed.set()
        finally:
            self.eof = True
            self.changed.set()

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                if self.eof:
                    if self.writer.can_write_eof():
                        with contextlib.suppress(OSError, RuntimeError):
                            self.writer.write_eof()
                    return
                self.changed.clear()
                await self.changed.wait()
            due, data = self.queue[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.queue.popleft()
            self.writer.write(data)
            await self.writer.drain()
            self.buffered -= len(data)
            if self.buffered < self.proxy.max_buffer:
                self.room.set()


class LatencyProxy:
    """Accepts on ``listen`` and forwards to ``target`` (both loopback), each chunk delayed by
    ``delay`` seconds in each direction.  ``connections`` and ``bytes_delayed`` count what it
    saw (the testnet's latency test checks them)."""

    def __init__(self, listen: HostPort, target: HostPort, delay: float,
                 max_buffer: int = 1 << 20) -> None:
        for host in (listen[0], target[0]):
            if not is_loopback_ipv4(host):
                raise ValueError(f"{host}: the latency proxy is loopback-only")
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.listen = listen
        self.target = target
        self.delay = delay
        self.max_buffer = max_buffer
        self.connections = 0
        self.bytes_delayed = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> LatencyProxy:
        self.server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1])
        if not self.listen[1]:
            self.listen = (self.listen[0], self.server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks))

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self._proxy(reader, writer)
        finally:
            self.tasks.discard(task)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        there = _Direction(self, reader, up_writer)
        back = _Direction(self, up_reader, writer)
        pumps = [asyncio.ensure_future(c) for c in
                 (there.read(), there.write(), back.read(), back.write())]
        try:
            # done when both writers finished (each end's EOF forwarded) or anything failed
            pending = set(pumps)
            while pending and not (pumps[1].done() and pumps[3].done()):
                done, pending = await asyncio.wait(pending,
                                                   return_when=asyncio.FIRST_COMPLETED)
                if any(not p.cancelled() and p.exception() is not None for p in done):
                    break  # a reset or a write to a closed side: close both
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                with contextlib.suppress(OSError, RuntimeError):
                    w.close()


def _mapping(value: str) -> tuple[HostPort, HostPort]:
    listen, sep, target = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{value!r}: want LISTEN=TARGET")
    try:
        return parse_hostport(listen), parse_hostport(target)
    except (ValueError, ConfigError) as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _serve(mappings: list[tuple[HostPort, HostPort]], delay: float, owner: int | None,
                 directory: Path | None) -> None:
    proxies = [await LatencyProxy(listen, target, delay).start() for listen, target in mappings]
    print("ready " + " ".join(f"{format_hostport(p.listen)}={format_hostport(p.target)}"
                              for p in proxies), flush=True)
    said = (0, 0)
    try:
        while (owner is None or _alive(owner)) and (directory is None or directory.is_dir()):
            await asyncio.sleep(1)
            now = (sum(p.connections for p in proxies), sum(p.bytes_delayed for p in proxies))
            if now != said:  # what it saw, for tests and the curious (latency.log)
                print(f"connections={now[0]} bytes_delayed={now[1]}", file=sys.stderr,
                      flush=True)
                said = now
    finally:
        for proxy in proxies:
            await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torroute.testing.latency",
                                     description="a delaying loopback TCP proxy")
    parser.add_argument("--delay-ms", type=float, required=True,
                        help="added to each chunk, each direction")
    parser.add_argument("--owner", type=int, help="exit once this process is gone")
    parser.add_argument("--dir", type=Path, help="exit once this directory is gone")
    parser.add_argument("mappings", nargs="+", type=_mapping, metavar="LISTEN=TARGET")
    opts = parser.parse_args(argv)
    try:
        asyncio.run(_serve(opts.mappings, opts.delay_ms / 1000, opts.owner, opts.dir))
    except (ValueError, OSError) as exc:
        print(f"latency proxy: {exc}", file=sys.stderr)
        return 69
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
