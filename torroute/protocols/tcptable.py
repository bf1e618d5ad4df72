"""Postfix tcp_table(5): ``get <key>\\n`` / ``put <key> <value>\\n`` lines, %XX-encoded.

Replies: ``200 <data>`` found, ``500 <text>`` not found, ``400 <text>`` temporary error (Postfix
defers).  Lines are self-delimiting, so a malformed or oversized line gets a ``400`` reply and
the parser resynchronises on the next newline instead of closing.
"""

from __future__ import annotations

import re

from .lookup import (
    POSTFIX_REJECT,
    Event,
    LineParser,
    Lookup,
    Malformed,
    ProtocolError,
    check_value,
    sanitize_reason,
)

__all__ = [
    "TcpTableError",
    "TcpTableParser",
    "encode",
    "decode",
    "encode_get",
    "encode_put",
    "found",
    "notfound",
    "reject",
    "temp",
    "parse_reply",
]

#: tcp_table(5): replies must be no longer than 4096 characters including the newline.
MAX_REPLY = 4096

_HEX = b"0123456789ABCDEF"
# Bytes that travel unencoded: printable ASCII except space and '%'.
_PLAIN = frozenset(range(0x21, 0x7F)) - {ord("%")}
_HEXVAL = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_NEEDS_ENCODING = re.compile(rb"[^\x21-\x24\x26-\x7e]")


class TcpTableError(ProtocolError):
    """Malformed tcp_table request, reply or %XX escape."""


def encode(data: bytes) -> bytes:
    """%XX-encode ``%``, whitespace and every non-printing byte (what Postfix does)."""
    if not _NEEDS_ENCODING.search(data):
        return data
    out = bytearray()
    for b in data:
        if b in _PLAIN:
            out.append(b)
        else:
            out += b"%" + _HEX[b >> 4 : (b >> 4) + 1] + _HEX[b & 15 : (b & 15) + 1]
    return bytes(out)


def decode(data: bytes) -> bytes:
    """Undo %XX (hex digits in any case); raise :class:`TcpTableError` on a broken escape."""
    if b"%" not in data:
        return data
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b != 0x25:
            out.append(b)
            i += 1
            continue
        hi = _HEXVAL.get(data[i + 1]) if i + 1 < n else None
        lo = _HEXVAL.get(data[i + 2]) if i + 2 < n else None
        if hi is None or lo is None:
            raise TcpTableError("bad %XX escape")
        out.append(hi * 16 + lo)
        i += 3
    return bytes(out)


def encode_get(key: str) -> bytes:
    """A ``get`` request line as Postfix's tcp client sends it."""
    return b"get " + encode(key.encode()) + b"\n"


def encode_put(key: str, value: str) -> bytes:
    """A ``put`` request line (Postfix never sends one; torroute refuses it)."""
    return b"put " + encode(key.encode()) + b" " + encode(value.encode()) + b"\n"


def _reply(code: bytes, text: bytes) -> bytes:
    line = code + b" " + encode(text) + b"\n"
    if len(line) > MAX_REPLY:
        raise TcpTableError("reply too long")
    return line


def found(value: str) -> bytes:
    """``200 <value>``; the value must pass :func:`check_value`."""
    try:
        return _reply(b"200", check_value(value).encode("ascii"))
    except ProtocolError as exc:
        raise TcpTableError(str(exc)) from None


def reject() -> bytes:
    """``200 error:5.1.2 ...``: an invalid .onion recipient bounces (never the default route)."""
    return _reply(b"200", POSTFIX_REJECT.encode("ascii"))


def notfound(text: object = "not found") -> bytes:
    """``500 <text>``: no route, Postfix uses its next table or its default transport."""
    return _reply(b"500", sanitize_reason(text).encode("ascii"))


def temp(reason: object) -> bytes:
    """``400 <reason>``: Postfix defers and retries; never a clear-net fallback."""
    return _reply(b"400", sanitize_reason(reason).encode("ascii"))


def parse_reply(line: bytes) -> tuple[int, str]:
    """Split a reply line into (code, decoded text); for tests and clients."""
    line = line.rstrip(b"\n")
    code, sep, text = line.partition(b" ")
    if not sep or code not in (b"200", b"400", b"500"):
        raise TcpTableError("bad tcp_table reply")
    return int(code), decode(text).decode("utf-8", "replace")


class TcpTableParser(LineParser):
    """Incremental tcp_table request parser.  ``feed`` never raises; errors become events."""

    __slots__ = ()

    def _too_long(self) -> Event:
        return Malformed(temp("request too long"), False, "too long")

    def quick_domain(self, data: bytes) -> bytes | None:
        """See :meth:`LineParser.quick_domain`: one ``get key`` line, the key without %XX
        escapes, spaces or CR, within the request limit."""
        if (self._buf or self._discarding or not data.startswith(b"get ")
                or data.find(b"\n") != len(data) - 1 or len(data) > self._max + 1):
            return None
        key = data[4:-1]
        if not key or b"%" in key or b" " in key or b"\r" in key:
            return None
        return key[key.rfind(b"@") + 1 :]

    def eof(self) -> list[Event]:
        """The peer closed: Postfix always ends its lines, so a partial line is dropped."""
        self._buf = b""
        self._discarding = False
        return []

    def _line(self, line: bytes) -> Event:
        if len(line) > self._max:
            return Malformed(temp("request too long"), False, "too long")
        if line.endswith(b"\r"):
            line = line[:-1]
        verb, sep, arg = line.partition(b" ")
        if verb == b"get" and sep:
            try:
                key = decode(arg)
            except TcpTableError:
                return Malformed(temp("malformed request: bad %XX escape"), False, "escape")
            if not key or b" " in arg:
                return Malformed(temp("malformed request: bad key"), False, "key")
            return Lookup(key.decode("utf-8", "replace"))
        if verb == b"put":
            return Malformed(temp("put is not supported: read-only map"), False, "put")
        return Malformed(temp("malformed request: expected 'get key'"), False, "verb")
