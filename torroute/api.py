"""The public entry points that need settings, each with ``config=`` (default: :func:`load_config`).

Why thin wrappers over :mod:`torroute.routing.router`, :mod:`torroute.tor.dial` and
:mod:`torroute.tor.automap` instead of new code: one implementation per job.  They only take the
proxy, DNSPort, timeouts and isolation from the :class:`~torroute.config.Config`, so a tool
author learns one convention: ``config=``.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

from .config import Config, load_config
from .routing.maps import PinMap
from .routing.router import Router as _CoreRouter

if TYPE_CHECKING:
    import asyncio

__all__ = ["Router", "dial", "open_connection", "resolve_automap"]


class Router(_CoreRouter):
    """Domain or address -> :class:`Route` | :class:`NoRoute` | :class:`TempFail` |
    :class:`Reject`: pins from ``config.maps``, then DNS SRV, ``.onion`` names as themselves.

    ``route(x)`` blocks, ``await aroute(x)`` does not; decisions are cached for their DNS TTL
    (one Router per program, not per message).  A DNS failure is a TempFail, never a NoRoute.
    """

    def __init__(self, config: Config | None = None, pins: PinMap | None = None) -> None:
        super().__init__(load_config() if config is None else config, pins)


def _config(config: Config | None) -> Config:
    return load_config() if config is None else config


def dial(host: str, port: int, *, config: Config | None = None, timeout: float | None = None,
         isolate: bool | str | None = None) -> socket.socket:
    """A blocking socket connected to ``host:port`` through tor's SocksPort (``tor_socks``).

    The name goes to tor as is (never resolved here); a ``.onion`` is validated first
    (:class:`InvalidOnion`).  ``timeout`` (default ``socks_timeout``) bounds the dial and stays
    set on the socket; ``isolate`` (default ``isolate_streams``) asks for circuits of its own.
    Raises a :class:`TemporaryError` (tor down, onion unreachable now) or a
    :class:`PermanentError` (tor's 0xF4..0xF6: a bad address or auth)."""
    from .tor.dial import dial as tor_dial

    cfg = _config(config)
    return tor_dial(host, port, proxy=cfg.tor_socks,
                      timeout=cfg.socks_timeout if timeout is None else timeout,
                      isolate=cfg.isolate_streams if isolate is None else isolate)


async def open_connection(host: str, port: int, *, config: Config | None = None,
                          timeout: float | None = None, isolate: bool | str | None = None,
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`dial` for asyncio: ``(reader, writer)`` like :func:`asyncio.open_connection`."""
    from .tor.dial import adial

    cfg = _config(config)
    return await adial(host, port, proxy=cfg.tor_socks,
                       timeout=cfg.socks_timeout if timeout is None else timeout,
                       isolate=cfg.isolate_streams if isolate is None else isolate)


def resolve_automap(onion: str, *, config: Config | None = None,
                    timeout: float = 2.0) -> ipaddress.IPv4Address:
    """Tor's virtual IPv4 for a v3 onion, from its DNSPort (``tor_dns``), checked against
    ``virtual_network`` -- for SOCKS clients that send only IPs (Exim).  Never cached: tor keeps
    the mapping in memory only.  Raises InvalidOnion, TorUnavailable or AutomapError."""
    from .tor.automap import resolve_automap as core

    cfg = _config(config)
    return core(onion, cfg.tor_dns, timeout, cfg.virtual_network)
