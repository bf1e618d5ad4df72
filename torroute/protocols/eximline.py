"""torroute's Exim line protocol, made for ``${readsocket}``.

Request (one line, LF or CRLF)::

    route <domain-or-address>

Answer (exactly one line per request, LF-terminated; several requests per connection are fine,
Exim sends one and half-closes)::

    127.192.3.7::25     found: Tor's automap IPv4 for the onion, '::', the port
                        (manualroute ``route_data`` syntax, for a smtp transport with socks_proxy)
    <empty line>        no onion route: the router declines, the next router (dnslookup) runs
    temp <reason>       temporary failure: Exim must defer (never deliver in the clear)
    fail <reason>       the destination can never be routed (an invalid .onion): bounce
    error <reason>      malformed request: treated like temp by the documented router text

Why these forms: a readsocket expansion that fails (daemon down) defers, an empty value makes
manualroute decline, and the documented redirect router turns every other answer into
``:defer:``.  Anything unexpected therefore defers (fail closed).  See docs/daemon.rst.
"""

from __future__ import annotations

import ipaddress

from .lookup import (
    Event,
    LineParser,
    Lookup,
    Malformed,
    ProtocolError,
    sanitize_reason,
)

__all__ = [
    "EximLineError",
    "EximLineParser",
    "encode_request",
    "found",
    "notfound",
    "temp",
    "fail",
    "error",
    "parse_answer",
]


class EximLineError(ProtocolError):
    """Malformed Exim line request or answer, or an unusable found value."""


def encode_request(name: str) -> bytes:
    """The request line for ``name`` (what the router text sends)."""
    return b"route " + name.encode() + b"\n"


def found(ip: ipaddress.IPv4Address | str, port: int) -> bytes:
    """``<ip>::<port>``: only a real IPv4 address and a port 1..65535 can be answered."""
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise EximLineError(f"not an IPv4 address: {ip!r}") from None
    if type(port) is not int or not 0 < port < 65536:
        raise EximLineError(f"bad port {port!r}")
    return b"%s::%d\n" % (str(addr).encode(), port)


def notfound() -> bytes:
    """An empty line: the router declines."""
    return b"\n"


def temp(reason: object) -> bytes:
    """``temp <reason>``: the router defers with this text."""
    return b"temp " + sanitize_reason(reason).encode("ascii") + b"\n"


def fail(reason: object) -> bytes:
    """``fail <reason>``: an invalid .onion destination; the router text turns it into :fail:."""
    return b"fail " + sanitize_reason(reason).encode("ascii") + b"\n"


def error(reason: object) -> bytes:
    """``error <reason>``: a malformed request (defers too)."""
    return b"error " + sanitize_reason(reason).encode("ascii") + b"\n"


def parse_answer(line: bytes) -> tuple[str, str]:
    """(kind, text) for an answer line: found/notfound/temp/fail/error; for tests."""
    line = line.rstrip(b"\n")
    if not line:
        return "notfound", ""
    kind, sep, text = line.partition(b" ")
    if kind in (b"temp", b"error", b"fail") and sep:
        return kind.decode(), text.decode("ascii", "replace")
    host, sep, port = line.partition(b"::")
    try:
        ipaddress.IPv4Address(host.decode("ascii"))
        if sep and port.isdigit() and 0 < int(port) < 65536:
            return "found", line.decode("ascii")
    except (ValueError, UnicodeDecodeError):
        pass
    raise EximLineError("bad answer line")


class EximLineParser(LineParser):
    """Incremental request parser.  ``feed`` never raises; errors become events."""

    __slots__ = ()

    def _too_long(self) -> Event:
        return Malformed(error("request too long"), False, "too long")

    def eof(self) -> list[Event]:
        """The peer half-closed: a final unterminated line still counts as a request."""
        rest, self._buf = self._buf, b""
        if self._discarding or not rest.strip():
            self._discarding = False
            return []
        return [self._line(rest)]

    def _line(self, line: bytes) -> Event:
        if len(line) > self._max:
            return Malformed(error("request too long"), False, "too long")
        if line.endswith(b"\r"):
            line = line[:-1]
        verb, sep, arg = line.partition(b" ")
        arg = arg.strip(b" \t")
        if verb.lower() != b"route" or not sep or not arg:
            return Malformed(error("expected 'route <domain>'"), False, "verb")
        if any(c < 0x21 or c == 0x7F for c in arg):
            return Malformed(error("control or space characters in name"), False, "ctl")
        return Lookup(arg.decode("utf-8", "replace"))
