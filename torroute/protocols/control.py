"""Tor's control protocol (control-spec.txt), pure: quoting, reply framing and the parsers of the
replies and events torroute reads.  No I/O, no stem.

Why one codec: torroute talks to tor's control port twice, through stem
(:mod:`torroute.tor.control`, for admins' tors: every auth method) and through a raw socket
(:mod:`torroute.tor.control_socket`, for the private test network: a reader thread that survives
quiet periods).  Both read the same replies the same way here.

Nothing here raises on what tor (or anything else) sends: the parsers return what they can read
and :class:`ReplyParser` turns any byte stream into replies.  Only :func:`quote` raises, for a
value that cannot be sent (a line break would start a second command).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..endpoint import HostPort
from ..errors import ConfigError

__all__ = [
    "unquote", "quote", "parse_keywords", "parse_quoted_list", "parse_getconf",
    "setconf_command", "Bootstrap", "parse_bootstrap", "PortOption", "port_address",
    "same_address", "AddressMapping", "parse_address_mappings", "reverse_lookup",
    "HsDescEvent", "parse_hs_desc", "ReplyLine", "Reply", "ReplyParser", "getinfo_value",
]

# ---- quoting and keyword arguments

_TOKEN = re.compile(r'([A-Za-z_][\w-]*)=("(?:[^"\\]|\\.)*"|\S*)|("(?:[^"\\]|\\.)*"|\S+)')
_ESCAPE = re.compile(r"\\(.)")


def unquote(text: str) -> str:
    """Undo control-protocol quoting (``"a \\"b\\""`` -> ``a "b"``); unquoted text is kept."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return _ESCAPE.sub(r"\1", text[1:-1])
    return text


def quote(value: str) -> str:
    """Quote a value for SETCONF/ADD_ONION (control-spec QuotedString)."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise ConfigError(f"{value!r}: line breaks are not allowed in tor options")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_keywords(text: str) -> tuple[list[str], dict[str, str]]:
    """Split a control-protocol line into positional words and ``KEY=value`` pairs."""
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for match in _TOKEN.finditer(text):
        if match.group(1):
            keywords[match.group(1).upper()] = unquote(match.group(2))
        else:
            positional.append(unquote(match.group(3)))
    return positional, keywords


def parse_quoted_list(text: str) -> list[str]:
    """``"127.0.0.1:9050" "127.0.0.1:9051"`` (GETINFO net/listeners/*) -> the addresses."""
    return [unquote(m.group(0)) for m in re.finditer(r'"(?:[^"\\]|\\.)*"|\S+', text)]


def parse_getconf(lines: Iterable[str]) -> list[tuple[str, str | None]]:
    """GETCONF reply lines (``Key=value`` or a bare ``Key`` for an unset option) in order."""
    out: list[tuple[str, str | None]] = []
    for line in lines:
        key, sep, value = line.partition("=")
        out.append((key, unquote(value) if sep else None))
    return out


def setconf_command(changes: Sequence[tuple[str, Sequence[str | None]]],
                    verb: str = "SETCONF") -> str:
    """``SETCONF Key="v1" Key="v2" Other`` (a None value or an empty list unsets the option)."""
    words = [verb]
    for key, values in changes:
        if not values:
            words.append(key)
        for value in values:
            words.append(key if value is None else f"{key}={quote(value)}")
    return " ".join(words)


# ---- replies: framing (``250-a`` / ``250+key=`` data ``.`` / ``250 OK``)


@dataclass(frozen=True)
class ReplyLine:
    """One line of a reply: its status code, divider (``-`` more, ``+`` data, `` `` last) and
    text; a data line's text is ``key=`` and the data block after a newline."""

    code: str
    divider: str
    text: str


@dataclass(frozen=True)
class Reply:
    """A complete reply (or an asynchronous event: code 650)."""

    lines: tuple[ReplyLine, ...]

    @property
    def code(self) -> str:
        return self.lines[-1].code if self.lines else ""

    @property
    def ok(self) -> bool:
        return self.code.startswith("2")

    @property
    def is_event(self) -> bool:
        return self.code == "650"

    @property
    def texts(self) -> list[str]:
        return [line.text for line in self.lines]

    @property
    def message(self) -> str:
        """The text of the last line (tor's error message for a 5xx)."""
        return self.lines[-1].text if self.lines else ""


class ReplyParser:
    """Splits a control-port byte stream into :class:`Reply` objects (events included).

    Lines are ``CODE DIVIDER TEXT CRLF``; a ``+`` line is followed by a data block ending in a
    lone ``.`` (leading dots doubled).  A line that is not one (garbage, too short) becomes a
    reply line of code ``""``, ending its reply: the caller sees it fail (``not ok``).
    """

    MAX_LINE = 1 << 20

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[ReplyLine] = []
        self._data: list[str] | None = None  # inside a data block
        self._data_head: ReplyLine | None = None

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.MAX_LINE:  # a line this long is not tor's
                    raw, self._buffer = bytes(self._buffer), bytearray()
                    replies += self._line(raw)
                return replies
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            replies += self._line(raw)

    def _line(self, raw: bytes) -> list[Reply]:
        line = raw.decode("utf-8", "replace")
        if self._data is not None:
            if line != ".":
                self._data.append(line[1:] if line.startswith(".") else line)
                return []
            head = self._data_head
            assert head is not None
            self._lines.append(ReplyLine(head.code, "+", "\n".join([head.text, *self._data])))
            self._data = self._data_head = None
            return []
        code, divider, text = line[:3], line[3:4], line[4:]
        well_formed = len(code) == 3 and code.isascii() and code.isdigit()
        if not well_formed or divider not in ("", " ", "-", "+"):
            code, divider, text = "", " ", line
        if divider == "+":
            self._data, self._data_head = [], ReplyLine(code, "+", text)
            return []
        self._lines.append(ReplyLine(code, divider or " ", text))
        if divider == "-":
            return []
        reply, self._lines = Reply(tuple(self._lines)), []
        return [reply]


def getinfo_value(lines: Iterable[tuple[str, str]], key: str) -> str | None:
    """The value of ``key`` in a GETINFO reply's (divider, text) pairs; a data block (``+``)
    without its ``key=`` line head.  None when the reply does not name ``key``."""
    for divider, text in lines:
        name, _, value = text.partition("=")
        if name == key:
            if divider == "+":
                return value.split("\n", 1)[1] if "\n" in value else ""
            return value
    return None


# ---- GETINFO status/bootstrap-phase


@dataclass(frozen=True)
class Bootstrap:
    """``GETINFO status/bootstrap-phase``: how far tor is in connecting to the Tor network."""

    progress: int
    tag: str = ""
    summary: str = ""
    warning: str | None = None

    @property
    def done(self) -> bool:
        return self.progress >= 100


def parse_bootstrap(text: str) -> Bootstrap:
    """``NOTICE BOOTSTRAP PROGRESS=5 TAG=conn SUMMARY="Connecting to a relay" [WARNING=...]``."""
    _, kw = parse_keywords(text)
    try:
        progress = int(kw.get("PROGRESS", "0"))
    except ValueError:
        progress = 0
    return Bootstrap(progress, kw.get("TAG", ""), kw.get("SUMMARY", ""), kw.get("WARNING"))


# ---- SocksPort / DNSPort values


@dataclass(frozen=True)
class PortOption:
    """One ``SocksPort``/``DNSPort`` value: an address and its flags."""

    address: str
    flags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: str) -> PortOption:
        words = value.split()
        return cls(words[0] if words else "", tuple(words[1:]))

    def has_flag(self, flag: str) -> bool:
        return any(f.lower() == flag.lower() for f in self.flags)

    def with_flag(self, flag: str) -> PortOption:
        return self if self.has_flag(flag) else PortOption(self.address, self.flags + (flag,))

    def __str__(self) -> str:
        return " ".join((self.address,) + self.flags)


def port_address(address: str) -> HostPort | None:
    """Where a port option listens, as tor reads it (``9050`` -> 127.0.0.1:9050); None for
    ``0`` (off), ``auto`` or unix sockets.

    Not :func:`torroute.endpoint.parse_hostport`: tor's rules differ (a bare port means
    127.0.0.1, ``localhost`` is 127.0.0.1, ``auto`` and ``unix:`` are no address), and a value
    tor reports is never an error here."""
    address = address.strip()
    if address.isascii() and address.isdigit():
        return ("127.0.0.1", int(address)) if int(address) else None
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or address.startswith("unix:"):
        return None
    host = host.strip("[]")
    if host.lower() == "localhost":
        host = "127.0.0.1"
    return host, int(port)


def same_address(a: HostPort | None, b: HostPort) -> bool:
    """Do two listeners mean the same socket (``::1`` and ``0:0::1`` do)?"""
    if a is None or a[1] != b[1]:
        return False
    try:
        return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0])
    except ValueError:
        return a[0].lower() == b[0].lower()


# ---- GETINFO address-mappings/all


@dataclass(frozen=True)
class AddressMapping:
    """One line of ``GETINFO address-mappings/all``."""

    address: str
    target: str
    expires: str  # "NEVER" or a UTC time


def parse_address_mappings(text: str) -> list[AddressMapping]:
    """``127.192.1.2 abc...xyz.onion NEVER`` lines (times may be quoted)."""
    out: list[AddressMapping] = []
    for line in text.splitlines():
        words, _ = parse_keywords(line)
        if len(words) >= 3:
            out.append(AddressMapping(words[0], words[1], " ".join(words[2:])))
    return out


def reverse_lookup(mappings: Iterable[AddressMapping], ip: str) -> str | None:
    """The .onion name tor automapped to ``ip`` (a virtual address), or None; ConfigError when
    ``ip`` is not an IP address (it is the user's input, not tor's)."""
    try:
        wanted = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        raise ConfigError(f"{ip!r} is not an IP address") from None
    for m in mappings:
        try:
            if ipaddress.ip_address(m.address) == wanted and m.target.endswith(".onion"):
                return m.target.lower()
        except ValueError:
            continue
    return None


# ---- HS_DESC events


@dataclass(frozen=True)
class HsDescEvent:
    """One HS_DESC event (``650 HS_DESC ACTION ADDRESS AUTH HSDIR ...``)."""

    action: str
    address: str  # without ".onion"
    hsdir: str = ""
    reason: str | None = None


def parse_hs_desc(text: str) -> HsDescEvent | None:
    """An HS_DESC event line, with or without its ``650`` code; None for any other line."""
    words, kw = parse_keywords(text)
    if words and words[0] == "650":
        words = words[1:]
    if len(words) < 3 or words[0] != "HS_DESC":
        return None
    return HsDescEvent(words[1].upper(), words[2].lower().removesuffix(".onion"),
                       words[4] if len(words) > 4 else "", kw.get("REASON"))
