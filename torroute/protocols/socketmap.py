"""Postfix socketmap_table(5): netstring requests ``name key``, netstring replies.

Replies: ``OK <data>`` | ``NOTFOUND `` | ``TEMP <reason>`` | ``PERM <reason>``.  A broken
netstring cannot be resynchronised, so the parser answers ``PERM`` once and asks to close.
"""

from __future__ import annotations

from .lookup import (
    DEFAULT_MAX_REQUEST,
    POSTFIX_REJECT,
    Event,
    Lookup,
    Malformed,
    ProtocolError,
    check_value,
    sanitize_reason,
)

__all__ = [
    "NetstringError",
    "SocketmapParser",
    "encode_netstring",
    "decode_netstring",
    "encode_request",
    "found",
    "notfound",
    "reject",
    "temp",
    "perm",
    "parse_reply",
]

#: Postfix's socketmap client refuses replies longer than this (socketmap_table(5)).
MAX_REPLY = 100000


class NetstringError(ProtocolError):
    """Malformed netstring or socketmap request/reply."""


def encode_netstring(payload: bytes) -> bytes:
    """``<len>:<payload>,``"""
    return b"%d:%s," % (len(payload), payload)


def decode_netstring(data: bytes, max_len: int = DEFAULT_MAX_REQUEST) -> tuple[bytes, bytes] | None:
    """Split one netstring off ``data``: ``(payload, rest)``, or None if more bytes are needed.

    Raises :class:`NetstringError` on anything that can never become a valid netstring.
    """
    colon = data.find(b":", 0, 12)
    if colon < 0:
        if not data:
            return None
        if not data[:12].isdigit():
            raise NetstringError("netstring length is not a number")
        if len(data) > 10:
            raise NetstringError("netstring length too long")
        return None
    digits = data[:colon]
    if not digits or not digits.isdigit() or (len(digits) > 1 and digits[:1] == b"0"):
        raise NetstringError("bad netstring length")
    length = int(digits)
    if length > max_len:
        raise NetstringError(f"request longer than {max_len} bytes")
    end = colon + 1 + length
    if len(data) <= end:
        return None
    if data[end : end + 1] != b",":
        raise NetstringError("netstring not terminated by ','")
    return data[colon + 1 : end], data[end + 1 :]


def encode_request(map_name: str, key: str) -> bytes:
    """What Postfix sends: a netstring ``name key`` (used by tests and the benchmark)."""
    return encode_netstring(map_name.encode() + b" " + key.encode())


def _reply(payload: bytes) -> bytes:
    if len(payload) > MAX_REPLY:
        raise NetstringError("reply too long")
    return encode_netstring(payload)


def found(value: str) -> bytes:
    """``OK <value>``; the value must pass :func:`check_value`."""
    try:
        return _reply(b"OK " + check_value(value).encode("ascii"))
    except ProtocolError as exc:
        raise NetstringError(str(exc)) from None


def reject() -> bytes:
    """``OK error:5.1.2 ...``: an invalid .onion recipient bounces (never the default route)."""
    return _reply(b"OK " + POSTFIX_REJECT.encode("ascii"))


def notfound() -> bytes:
    """``NOTFOUND `` (the trailing space is part of the protocol)."""
    return _reply(b"NOTFOUND ")


def temp(reason: object) -> bytes:
    """``TEMP <reason>``: Postfix defers the lookup (and the mail) and retries later."""
    return _reply(b"TEMP " + sanitize_reason(reason).encode("ascii"))


def perm(reason: object) -> bytes:
    """``PERM <reason>``: malformed request.  Postfix treats it as a lookup error (defer)."""
    return _reply(b"PERM " + sanitize_reason(reason).encode("ascii"))


def parse_reply(payload: bytes) -> tuple[str, str]:
    """Split a reply payload into (status, text); for tests and clients."""
    status, sep, text = payload.partition(b" ")
    if not sep or status not in (b"OK", b"NOTFOUND", b"TEMP", b"TIMEOUT", b"PERM"):
        raise NetstringError("bad socketmap reply")
    return status.decode(), text.decode("utf-8", "replace")


class SocketmapParser:
    """Incremental socketmap request parser.  ``feed`` never raises; errors become events."""

    __slots__ = ("_buf", "_max", "_dead")

    def __init__(self, max_request: int = DEFAULT_MAX_REQUEST) -> None:
        self._buf = b""
        self._max = max_request
        self._dead = False

    def feed(self, data: bytes) -> list[Event]:
        """Add bytes; return the complete requests (and at most one fatal error) so far."""
        if self._dead:
            return []
        buf = self._buf + data if self._buf else data
        events: list[Event] = []
        while buf:
            try:
                split = decode_netstring(buf, self._max)
            except NetstringError as exc:
                self._dead = True
                self._buf = b""
                events.append(Malformed(perm(f"malformed request: {exc}"), True, str(exc)))
                return events
            if split is None:
                break
            payload, buf = split
            events.append(self._request(payload))
        self._buf = buf
        return events

    def quick_domain(self, data: bytes) -> bytes | None:
        """The daemon's quick path: if ``data`` is exactly one complete, well-formed request
        (``<len>:<name> <key>,``) and nothing is buffered, the bytes after its key's last
        ``@`` (or the whole key), which :meth:`feed` would then return as one :class:`Lookup`
        of that key; else None (then :meth:`feed` decides).  Never consumes anything."""
        if self._buf or self._dead:
            return None
        try:
            split = decode_netstring(data, self._max)
        except NetstringError:
            return None
        if split is None or split[1]:  # incomplete, or more than one request
            return None
        payload = split[0]
        name, _, key = payload.partition(b" ")  # the checks of _request, as a yes/no
        if not name or not key or b"\x00" in payload or b"\n" in payload or b"\r" in payload:
            return None
        return key[key.rfind(b"@") + 1 :]

    def eof(self) -> list[Event]:
        """The peer closed: a partial netstring is dropped (there is nobody to answer)."""
        self._buf = b""
        return []

    @staticmethod
    def _request(payload: bytes) -> Event:
        name, sep, key = payload.partition(b" ")
        if not sep or not name or not key:
            return Malformed(perm("malformed request: expected 'name key'"), False, "no key")
        if b"\x00" in payload or b"\n" in payload or b"\r" in payload:
            return Malformed(perm("malformed request: control characters"), False, "ctl")
        return Lookup(key.decode("utf-8", "replace"), name.decode("utf-8", "replace"))
