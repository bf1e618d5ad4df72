"""One exception hierarchy: every failure says whether retrying later can help.

Temporary failures make mail defer (Postfix exit 75 / ``TEMP``, Exim defer); permanent ones may
bounce.  Nothing in torroute turns a temporary failure into a clear-net delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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


class DaemonUnreachable(TemporaryError):
    """The running daemon's status socket does not answer (not running, wrong path, or no
    valid answer): ``torroute status`` exits 75."""


class AutomapError(TemporaryError):
    """Tor's DNSPort answered, but not with a virtual address (automap off or misconfigured)."""


class ProtocolError(TorrouteError, ValueError):
    """The peer sent (or a caller asked to encode) something that is not the protocol: a
    malformed lookup request, an SMTP reply that is not one, an unencodable SOCKS request."""


class SocksError(TorrouteError):
    """Tor refused or failed a SOCKS5 CONNECT; ``code`` is its reply (None: no usable reply)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TemporarySocksError(SocksError, TemporaryError):
    """0xF0-0xF3, 0xF7, 0x01-0x08, no reply, a timeout: the onion may be reachable later."""


class PermanentSocksError(SocksError, PermanentError):
    """0xF4-0xF6: client authorization needed or refused, an invalid onion address."""


class TlsRefused(PermanentError):
    """The onion MX's certificate does not pass ``tls_verify`` (a wrong name, untrusted)."""


# ---- tor's control port


class ControlError(TorUnavailable):
    """Tor's control port cannot be reached or the connection broke (temporary: tor may be
    restarting)."""


class ControlAuthError(ConfigError):
    """Connected, but cannot authenticate: wrong or missing password, unreadable cookie,
    permission denied on the control socket.  Retrying will not help; the setup must change."""


class TorRefused(PermanentError):
    """Tor answered a command with an error (5xx): a bad value, a port it cannot bind..."""

    def __init__(self, message: str, code: str = "", command: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.command = command


class SaveConfError(ConfigError):
    """SAVECONF failed: the change is active now but is lost when tor restarts."""


class OnionNotFound(PermanentError):
    """No onion service of this tor matches the given address or directory."""


class OpenRelayRisk(ConfigError):
    """The onion's SMTP port leads to an smtpd that (may) relay for 127.0.0.1."""

    def __init__(self, message: str, verdicts: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.verdicts = list(verdicts)


class DescriptorTimeout(TemporaryError):
    """Tor accepted the onion service but did not upload its descriptor in time (not connected
    to the Tor network yet?).  The service exists; it is published once tor is online."""

    def __init__(self, message: str, service: Any = None) -> None:
        super().__init__(message)
        self.service = service


# ---- the private test network (torroute.testing)


class UnsafeTorrc(ConfigError, ValueError):
    """A torrc that could make tor talk to something outside 127.0.0.0/8."""


class TestnetError(TorrouteError, RuntimeError):
    """The network could not be booted or controlled."""

    __test__ = False  # not a pytest test class


class BootError(TestnetError):
    """A node failed during boot; says which node and the tail of its log."""

    def __init__(self, message: str, node: str | None = None, log_tail: str = "") -> None:
        full = message if not node else f"{node}: {message}"
        if log_tail:
            full += f"\n--- last lines of {node}'s log ---\n{log_tail}"
        super().__init__(full)
        self.node = node
        self.log_tail = log_tail
