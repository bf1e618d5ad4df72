"""SOCKS5 dialers through Tor's SocksPort (python-socks), sync and async.

Names are always sent to Tor (remote resolution): a ``.onion`` is never resolved locally.  Tor's
replies, including the extended onion-service codes of ``SocksPort ... ExtendedErrors``, become
exceptions that say whether retrying later can help.
"""

from __future__ import annotations

import asyncio
import re
import socket

from .config import HostPort, format_hostport
from .errors import PermanentError, TemporaryError, TorrouteError, TorUnavailable
from .onion import is_onion_name, parse_onion

# code -> (meaning, temporary?)
SOCKS_REPLIES: dict[int, tuple[str, bool]] = {
    0x01: ("general SOCKS server failure", True),
    0x02: ("connection not allowed by ruleset", True),
    0x03: ("network unreachable", True),
    0x04: ("host unreachable", True),
    0x05: ("connection refused by the destination", True),
    0x06: ("TTL expired (tor: connection attempt timed out)", True),
    0x07: ("command not supported (local tor configuration?)", True),
    0x08: ("address type not supported (local tor configuration?)", True),
    # tor's ExtendedErrors for onion services (tor 0.4.3+, proposal 304)
    0xF0: ("onion service descriptor not found (offline, or not yet published)", True),
    0xF1: ("onion service descriptor is invalid", True),
    0xF2: ("onion service introduction failed", True),
    0xF3: ("onion service rendezvous failed", True),
    0xF4: ("onion service requires client authorization, none configured", False),
    0xF5: ("onion service client authorization was rejected", False),
    0xF6: ("invalid onion address", False),
    0xF7: ("onion service introduction timed out", True),
}

_INVALID_REPLY = re.compile(r"reply code:?\s*0x([0-9a-f]{1,2})", re.IGNORECASE)


class SocksError(TorrouteError):
    """Tor refused or failed the connection; ``code`` is the SOCKS5 reply (None if none)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TemporarySocksError(SocksError, TemporaryError):
    pass


class PermanentSocksError(SocksError, PermanentError):
    pass


def socks_error(code: int | None, destination: str, detail: str = "") -> SocksError:
    """The exception for a SOCKS5 reply code (unknown codes are temporary: defer, don't bounce)."""
    if code is None:
        return TemporarySocksError(f"SOCKS connect to {destination} failed: {detail}", None)
    meaning, temporary = SOCKS_REPLIES.get(code, (f"unknown SOCKS reply code {code:#04x}", True))
    cls = TemporarySocksError if temporary else PermanentSocksError
    return cls(f"{destination}: {meaning} (SOCKS reply {code:#04x})", code)


def reply_code(exc: BaseException) -> int | None:
    """The SOCKS reply code in a python-socks error: ``error_code`` or, for codes python-socks
    does not know (tor's 0xF0..0xF7), parsed from 'Invalid reply code: 0XF0'."""
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


def _proxy_kwargs(host: str, proxy: HostPort, isolate: bool | str) -> dict:
    kwargs: dict = {"host": proxy[0], "port": proxy[1], "rdns": True}
    if isolate:
        # IsolateSOCKSAuth (on by default): a distinct username gets its own circuits
        kwargs["username"] = isolate if isinstance(isolate, str) else f"torroute:{host}"
        kwargs["password"] = "torroute"
    return kwargs


def _check_destination(host: str, validate: bool) -> str:
    if validate and is_onion_name(host):
        return parse_onion(host).host  # raises InvalidOnion (permanent) before asking tor
    return host


def _translate(
    exc: BaseException, destination: str, proxy: HostPort, timeout: float
) -> TorrouteError:
    from python_socks import ProxyConnectionError, ProxyTimeoutError

    if isinstance(exc, ProxyConnectionError):
        return TorUnavailable(f"tor SocksPort {format_hostport(proxy)} unreachable: "
                              f"{getattr(exc, 'strerror', None) or exc}")
    if isinstance(exc, ProxyTimeoutError | TimeoutError | socket.timeout):
        return TemporarySocksError(f"SOCKS connect to {destination} timed out after {timeout:g}s")
    code = reply_code(exc)
    return socks_error(code, destination, str(exc))


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
    from python_socks import ProxyType
    from python_socks.sync import Proxy

    host = _check_destination(host, validate)
    destination = f"{host}:{port}"
    proxy_client = Proxy(ProxyType.SOCKS5, **_proxy_kwargs(host, proxy, isolate))
    try:
        sock = proxy_client.connect(dest_host=host, dest_port=port, timeout=timeout)
    except Exception as exc:  # ProxyError, OSError, timeouts, and others for malformed replies
        raise _translate(exc, destination, proxy, timeout) from exc
    sock.settimeout(timeout)
    return sock


async def adial_socket(
    host: str,
    port: int,
    *,
    proxy: HostPort = ("127.0.0.1", 9050),
    timeout: float = 120.0,
    isolate: bool | str = False,
    validate: bool = True,
) -> socket.socket:
    """Async SOCKS connect; returns the connected (non-blocking) socket."""
    from python_socks import ProxyType
    from python_socks.async_.asyncio import Proxy

    host = _check_destination(host, validate)
    destination = f"{host}:{port}"
    proxy_client = Proxy(ProxyType.SOCKS5, **_proxy_kwargs(host, proxy, isolate))
    try:
        return await proxy_client.connect(dest_host=host, dest_port=port, timeout=timeout)
    except Exception as exc:  # CancelledError is a BaseException: it passes through
        raise _translate(exc, destination, proxy, timeout) from exc


async def adial(
    host: str,
    port: int,
    *,
    proxy: HostPort = ("127.0.0.1", 9050),
    timeout: float = 120.0,
    isolate: bool | str = False,
    validate: bool = True,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Async dial returning asyncio streams."""
    sock = await adial_socket(host, port, proxy=proxy, timeout=timeout, isolate=isolate,
                              validate=validate)
    return await asyncio.open_connection(sock=sock)
