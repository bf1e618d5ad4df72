"""SOCKS5 dialers through Tor's SocksPort, sync and async, raising torroute's errors.

Names are always sent to Tor (remote resolution): a ``.onion`` is never resolved locally.  Tor's
replies, including the extended onion-service codes of ``SocksPort ... ExtendedErrors``, become
exceptions that say whether retrying later can help.

Why on :mod:`torroute.tor.dial` and not python-socks (bench/socks_dial.py, loopback SOCKS
server, median of 5 x 1000 dials): the reply code comes from the codec instead of being parsed
out of python-socks' error text; per dial CPU is 88 vs 96 us (sync) and 211 vs 207 us
(asyncio); a fresh import costs 15 ms (tordial, most of it torroute's shared modules) vs 23 ms
(python_socks.sync) and 39 ms (python_socks.async_.asyncio).  python-socks is no longer a
runtime dependency; :func:`reply_code` stays for code that dials with python-socks itself
(its trio/anyio proxies).
"""

from __future__ import annotations

import asyncio
import re
import socket

from ..endpoint import HostPort, format_hostport
from ..errors import (
    PermanentSocksError,
    SocksError,
    TemporarySocksError,
    TorrouteError,
    TorUnavailable,
)
from ..protocols.socks5 import SOCKS_REPLIES, Socks5RequestError, socks_error
from ..routing.onion import is_onion_name, parse_onion
from . import dial as tordial

__all__ = ["SOCKS_REPLIES", "SocksError", "TemporarySocksError", "PermanentSocksError",
           "socks_error", "reply_code", "dial", "adial"]

_INVALID_REPLY = re.compile(r"reply code:?\s*0x([0-9a-f]{1,2})", re.IGNORECASE)


def reply_code(exc: BaseException) -> int | None:
    """The SOCKS reply code in a python-socks error (for callers dialing with python-socks):
    ``error_code`` or, for codes python-socks does not know (tor's 0xF0..0xF7), parsed from
    'Invalid reply code: 0XF0'."""
    code = getattr(exc, "error_code", None)
    if isinstance(code, int):
        return code
    for item in (exc, exc.__cause__, exc.__context__):
        if item is None:
            continue
        match = _INVALID_REPLY.search(str(item))
        if match:
            return int(match.group(1), 16)
        code = getattr(item, "error_code", None)
        if isinstance(code, int):
            return code
    return None


def _check_destination(host: str, validate: bool) -> str:
    if validate and is_onion_name(host):
        return parse_onion(host).host  # raises InvalidOnion (permanent) before asking tor
    return host


def _translate(
    exc: BaseException, destination: str, proxy: HostPort, timeout: float
) -> TorrouteError:
    if isinstance(exc, TimeoutError | socket.timeout):
        return TemporarySocksError(f"SOCKS connect to {destination} timed out after {timeout:g}s")
    if isinstance(exc, SocksError):
        return exc
    if isinstance(exc, Socks5RequestError):
        return socks_error(None, destination, str(exc))
    return TorUnavailable(f"tor SocksPort {format_hostport(proxy)} unreachable: "
                          f"{getattr(exc, 'strerror', None) or exc}")


def dial(
    host: str,
    port: int,
    *,
    proxy: HostPort = ("127.0.0.1", 9050),
    timeout: float = 120.0,
    isolate: bool | str = False,
    validate: bool = True,
) -> socket.socket:
    """A connected socket to ``host:port`` through Tor (blocking, ``timeout`` set on it)."""
    host = _check_destination(host, validate)
    try:
        return tordial.connect(host, port, proxy, timeout, isolate)
    except (OSError, SocksError, Socks5RequestError) as exc:
        raise _translate(exc, f"{host}:{port}", proxy, timeout) from exc


async def adial(
    host: str,
    port: int,
    *,
    proxy: HostPort = ("127.0.0.1", 9050),
    timeout: float = 120.0,
    isolate: bool | str = False,
    validate: bool = True,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Async dial returning asyncio streams (CancelledError passes through)."""
    host = _check_destination(host, validate)
    try:
        return await tordial.open_connection(host, port, proxy, timeout, isolate)
    except (OSError, SocksError, Socks5RequestError) as exc:
        raise _translate(exc, f"{host}:{port}", proxy, timeout) from exc
