"""The two drivers of :mod:`torroute.protocols.socks5`: a connection to ``host:port`` through
tor's SocksPort, blocking (:func:`connect`) or asyncio (:func:`open_connection`).

They only move bytes and enforce one deadline over the whole handshake; every decision (what to
send, how much to read, what the reply means) is the codec's.  Why no asyncio import at module
level: ``torroute deliver`` is started once per message and dials with :func:`connect`; its cold
start must not pay for asyncio (~25 ms, ``-X importtime``).

Both raise ``OSError`` (the SocksPort is unreachable or the connection broke), ``TimeoutError``
(deadline), :class:`~torroute.protocols.socks5.SocksError` (tor refused: ``code``) and
:class:`~torroute.protocols.socks5.Socks5RequestError` (a host name that cannot be sent).
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from ..errors import SocksError
from ..protocols.socks5 import Socks5Client

if TYPE_CHECKING:
    import asyncio

__all__ = ["connect", "open_connection", "isolation", "SocksError"]


def isolation(host: str, isolate: bool | str) -> tuple[bytes | None, bytes]:
    """SOCKS username/password for ``IsolateSOCKSAuth`` (on by default in tor): a distinct
    username gets its own circuits; ``isolate`` a str names the isolation group itself."""
    if not isolate:
        return None, b""
    name = isolate if isinstance(isolate, str) else f"torroute:{host}"
    return name.encode("utf-8", "surrogateescape"), b"torroute"


def connect(host: str, port: int, proxy: tuple[str, int], timeout: float,
            isolate: bool | str = False, pipeline: bool = False) -> socket.socket:
    """A blocking socket connected to ``host:port`` through tor; ``timeout`` bounds connect and
    handshake together and is left set on the socket (``pipeline``: see the codec)."""
    client = Socks5Client(host, port, *isolation(host, isolate), pipeline=pipeline)
    deadline = time.monotonic() + timeout
    sock = socket.create_connection(proxy, timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(client.initial())
        while not client.done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("SOCKS handshake timed out")
            sock.settimeout(left)
            data = sock.recv(client.want)
            if not data:
                client.eof()
            elif out := client.feed(data):
                sock.sendall(out)
        if client.failure is not None:
            raise client.failure
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connection(host: str, port: int, proxy: tuple[str, int], timeout: float,
                          isolate: bool | str = False,
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams to ``host:port`` through tor; ``timeout`` bounds connect and handshake."""
    import asyncio

    client = Socks5Client(host, port, *isolation(host, isolate))
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(proxy[0], proxy[1])
        try:
            writer.write(client.initial())
            while not client.done:
                try:
                    data = await reader.readexactly(client.want)
                except asyncio.IncompleteReadError:
                    client.eof()
                else:
                    if out := client.feed(data):
                        writer.write(out)
            if client.failure is not None:
                raise client.failure
        except BaseException:
            writer.close()
            raise
    return reader, writer
