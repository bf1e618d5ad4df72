"""Connections through tor's SocksPort: the two drivers of :mod:`torroute.protocols.socks5`
(blocking :func:`connect`, asyncio :func:`open_connection`) and the dialers that raise torroute's
errors (:func:`dial`, :func:`adial`; ``torroute.dial`` / ``torroute.open_connection`` are them
with the proxy and timeouts from a ``Config``).

The drivers only move bytes and enforce one deadline over the whole handshake; every decision
(what to send, how much to read, what the reply means) is the codec's.  They raise ``OSError``
(the SocksPort is unreachable or the connection broke), ``TimeoutError`` (deadline),
:class:`~torroute.errors.SocksError` (tor refused: ``code``) and
:class:`~torroute.protocols.socks5.Socks5RequestError` (a host name that cannot be sent): the
pipe program and the LMTP relay classify those themselves (a backup target or not).
:func:`translate_error` is the one translation into the error hierarchy (``TorUnavailable``,
``TemporarySocksError``, ...), used by :func:`dial` and :func:`adial`.

Why no asyncio import at module level: ``torroute deliver`` is started once per message and
dials with :func:`connect`; its cold start must not pay for asyncio (~25 ms, ``-X importtime``).

Why our codec and not python-socks (bench/socks_dial.py, loopback SOCKS server, median of
5 x 1000 dials): the reply code comes from the codec instead of being parsed out of
python-socks' error text; per dial CPU is 88 vs 96 us (sync) and 211 vs 207 us (asyncio); a fresh
import costs 15 ms (this module, most of it torroute's shared modules) vs 23 ms
(python_socks.sync) and 39 ms (python_socks.async_.asyncio).  python-socks is no runtime
dependency; :func:`reply_code` stays for code that dials with python-socks itself (its
trio/anyio proxies).
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from ..endpoint import HostPort, format_hostport
from ..errors import SocksError, TemporarySocksError, TorrouteError, TorUnavailable
from ..protocols.socks5 import Socks5Client, Socks5RequestError, socks_error

if TYPE_CHECKING:
    import asyncio

__all__ = ["connect", "open_connection", "isolation", "translate_error", "dial", "adial",
           "reply_code", "SocksError"]


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


# ---- the dialers: the drivers' failures as torroute's errors


def translate_error(exc: BaseException, destination: str, proxy: HostPort,
                    timeout: float) -> TorrouteError:
    """What a driver's failure means: a timeout or a refusal is about the destination
    (:class:`~torroute.errors.TemporarySocksError` / ``PermanentSocksError``), any other
    ``OSError`` about tor (:class:`~torroute.errors.TorUnavailable`)."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return TemporarySocksError(f"SOCKS connect to {destination} timed out after {timeout:g}s")
    if isinstance(exc, SocksError):
        return exc
    if isinstance(exc, Socks5RequestError):
        return socks_error(None, destination, str(exc))
    return TorUnavailable(f"tor SocksPort {format_hostport(proxy)} unreachable: "
                          f"{getattr(exc, 'strerror', None) or exc}")


def _check_destination(host: str, validate: bool) -> str:
    from ..routing.onion import is_onion_name, parse_onion

    if validate and is_onion_name(host):
        return parse_onion(host).host  # raises InvalidOnion (permanent) before asking tor
    return host


def dial(host: str, port: int, *, proxy: HostPort = ("127.0.0.1", 9050),
         timeout: float = 120.0, isolate: bool | str = False,
         validate: bool = True) -> socket.socket:
    """A connected socket to ``host:port`` through Tor (blocking, ``timeout`` set on it).

    Names are always sent to Tor (remote resolution): a ``.onion`` is never resolved locally,
    and (``validate``) an invalid one is :class:`~torroute.errors.InvalidOnion` before tor is
    asked.  Failures are torroute's errors (:func:`translate_error`)."""
    host = _check_destination(host, validate)
    try:
        return connect(host, port, proxy, timeout, isolate)
    except (OSError, SocksError, Socks5RequestError) as exc:
        raise translate_error(exc, f"{host}:{port}", proxy, timeout) from exc


async def adial(host: str, port: int, *, proxy: HostPort = ("127.0.0.1", 9050),
                timeout: float = 120.0, isolate: bool | str = False, validate: bool = True,
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`dial` for asyncio: ``(reader, writer)`` (CancelledError passes through)."""
    host = _check_destination(host, validate)
    try:
        return await open_connection(host, port, proxy, timeout, isolate)
    except (OSError, SocksError, Socks5RequestError) as exc:
        raise translate_error(exc, f"{host}:{port}", proxy, timeout) from exc


def reply_code(exc: BaseException) -> int | None:
    """The SOCKS reply code in a python-socks error (for callers dialing with python-socks):
    ``error_code`` or, for codes python-socks does not know (tor's 0xF0..0xF7), parsed from
    'Invalid reply code: 0XF0'."""
    import re

    invalid_reply = re.compile(r"reply code:?\s*0x([0-9a-f]{1,2})", re.IGNORECASE)
    code = getattr(exc, "error_code", None)
    if isinstance(code, int):
        return code
    for item in (exc, exc.__cause__, exc.__context__):
        if item is None:
            continue
        match = invalid_reply.search(str(item))
        if match:
            return int(match.group(1), 16)
        code = getattr(item, "error_code", None)
        if isinstance(code, int):
            return code
    return None
