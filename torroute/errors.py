"""One exception hierarchy: every failure says whether retrying later can help.

Temporary failures make mail defer (Postfix exit 75 / ``TEMP``, Exim defer); permanent ones may
bounce.  Nothing in torroute turns a temporary failure into a clear-net delivery.
"""

from __future__ import annotations


class TorrouteError(Exception):
    """Base of every error torroute raises on purpose."""

    temporary: bool = True  # unknown failures defer: losing no mail beats bouncing it


class TemporaryError(TorrouteError):
    """Retrying later may succeed (DNS timeout, tor down, onion unreachable now)."""

    temporary = True


class PermanentError(TorrouteError):
    """Retrying will not help (invalid onion address, remote 5xx)."""

    temporary = False


class InvalidOnion(PermanentError, ValueError):
    """A name that is not a valid v3 onion address."""


class ConfigError(PermanentError):
    """The configuration or a command-line option is unusable."""


class MapError(ConfigError):
    """A map file cannot be read at all (a bad single entry is only skipped and logged)."""


class DNSTemporaryError(TemporaryError):
    """SERVFAIL, REFUSED, timeout or unreachable resolver: the route is unknown, so defer."""


class TorUnavailable(TemporaryError):
    """Tor's SocksPort, DNSPort or ControlPort cannot be reached."""


class AutomapError(TemporaryError):
    """Tor's DNSPort answered, but not with a virtual address (automap off or misconfigured)."""
