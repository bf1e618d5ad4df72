"""One host:port type for every address torroute reads or prints.

``HostPort`` (a plain ``(host, port)`` tuple, what ``socket`` takes) for the things torroute
dials (tor's SocksPort, DNSPort, nameservers, onion service targets), and :class:`Endpoint`
(``inet:HOST:PORT`` or ``unix:PATH``) for the things it listens on.  Standard library only: the
pipe program imports it on every message.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

HostPort = tuple[str, int]


def parse_hostport(text: str, default_port: int | None = None) -> HostPort:
    """``HOST:PORT``, ``[V6]:PORT`` or (with a default port) ``HOST``."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if text.startswith("[") and "]" in text:
        close = text.index("]")
        host, rest = text[1:close], text[close + 1 :]
        if rest.startswith(":"):
            port, sep = rest[1:], ":"
        else:
            port, sep = "", ""
    elif not sep or ":" in host:  # no port, or a bare IPv6 address
        host, port = text, ""
    if not port:
        if default_port is None:
            raise ConfigError(f"{text!r}: expected HOST:PORT")
        return host, default_port
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{text!r}: port {port!r} is not a number") from None
    if not (0 < number < 65536) or not host:
        raise ConfigError(f"{text!r}: expected HOST:PORT with a port in 1..65535")
    return host, number


def format_hostport(hp: HostPort) -> str:
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"



def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``; a host name that could resolve anywhere is not."""
    if host == "localhost":
        return True
    import ipaddress  # not at import: the pipe program never asks, and it costs ~1.4 ms

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoint:
    """``inet:HOST:PORT`` or ``unix:PATH``."""

    family: str  # "inet" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        kind, sep, rest = str(text).partition(":")
        if kind == "unix" and sep and rest.startswith("/"):
            return cls("unix", path=rest)
        if kind == "inet" and sep:
            try:
                host, port = parse_hostport(rest)
            except ConfigError:
                pass
            else:
                return cls("inet", host=host, port=port)
        raise ConfigError(f"listener {text!r}: expected inet:HOST:PORT or unix:/ABSOLUTE/PATH")

    def is_loopback(self) -> bool:
        if self.family == "unix":
            return True
        return is_loopback_host(self.host)

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return "inet:" + format_hostport((self.host, self.port))
