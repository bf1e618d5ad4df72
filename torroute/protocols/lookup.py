"""What the lookup daemon's codecs share: bytes in, requests and reply bytes out, no I/O.

Each codec (:mod:`.socketmap`, :mod:`.tcptable`, :mod:`.eximline`) has an incremental parser
(``feed(bytes) -> list[Lookup | Malformed]``) with a hard request size limit, and reply
formatters for the three outcomes the daemon knows: found, not found, temporary failure.

Why the rules below: the daemon's answers end up in an MTA's routing table.  A request byte
(CR, LF, NUL, space, a ``%`` escape) echoed into an answer could split one reply into two or
smuggle a different next hop, so answers are built only from validated route values and from
reasons passed through :func:`sanitize_reason`, never from request text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import ProtocolError

#: Default hard limit for one request (an RFC 5321 path is at most 256 octets; room to spare).
DEFAULT_MAX_REQUEST = 4096

#: Longest reason text put into any reply.
MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class Lookup:
    """One well-formed lookup request.

    ``key`` is the lookup key as text (UTF-8, undecodable bytes replaced by U+FFFD, so it is
    always printable-safe str); ``map_name`` is the socketmap name or ``""``.
    """

    key: str
    map_name: str = ""


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request the codec rejected: send ``reply`` (already encoded) and close if ``close``.

    ``close`` is true when the stream cannot be resynchronised (a broken netstring length).
    """

    reply: bytes
    close: bool
    reason: str


Event = Lookup | Malformed

_REASON_BAD = re.compile(r"[^\x20-\x7e]|%")


def sanitize_reason(reason: object, limit: int = MAX_REASON) -> str:
    """Printable ASCII only, no ``%``, single spaces, bounded length; never empty.

    Reasons can carry text that came from elsewhere (an exception message containing the
    looked-up name), so everything outside 0x20..0x7e and ``%`` becomes ``?``.
    """
    text = _REASON_BAD.sub("?", str(reason))
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or "unspecified"


# A route value is a next-hop such as ``torroute:[<56 chars>.onion]:25`` or ``127.192.0.7::25``.
_VALUE_RE = re.compile(r"[A-Za-z0-9._:\[\]-]{1,1000}")


def check_value(value: str) -> str:
    """Return ``value`` if it is a safe route value, else raise :class:`ProtocolError`.

    Only letters, digits and ``. _ : [ ] -``: no whitespace, ``%``, ``@``, NUL or line breaks
    can reach an MTA through a found answer.
    """
    if not isinstance(value, str) or not _VALUE_RE.fullmatch(value):
        raise ProtocolError(f"unsafe route value {value!r}")
    return value


#: Postfix's answer for an invalid ``.onion`` recipient: the error(8) transport bounces it.
#: A constant: it is never built from request text.
POSTFIX_REJECT = "error:5.1.2 invalid .onion address"

#: Named Postfix answer templates (``[serve] postfix_answer`` may name one or give a template).
POSTFIX_ANSWER_PRESETS = {
    # torroute's own transport (a pipe or smtp+SOCKS transport named by ``transport``).
    "torroute": "{transport}:[{onion}]:{port}",
    # The classic onionmx/onionrouter setup: an smtp transport ``smtptor`` behind torsocks or
    # a SOCKS-capable relay; port 25 implied, other ports appended.
    "onionmx": "smtptor:[{onion}]{colon_port_unless_25}",
}

_TEMPLATE_FIELD = re.compile(r"\{([^{}]*)\}")
_TEMPLATE_FIELDS = {"transport", "onion", "port", "colon_port_unless_25"}


def check_template(template: str) -> str:
    """Resolve a preset name or validate a template; raise :class:`ProtocolError` if unusable."""
    template = POSTFIX_ANSWER_PRESETS.get(template, template)
    fields = set(_TEMPLATE_FIELD.findall(template))
    unknown = fields - _TEMPLATE_FIELDS
    if unknown:
        raise ProtocolError(f"unknown field(s) in answer template: {sorted(unknown)}")
    if "onion" not in fields:
        raise ProtocolError("answer template must contain {onion}")
    check_value(postfix_value(template, "t", "x" * 56 + ".onion", 25))
    return template


def postfix_value(template: str, transport: str, onion: str, port: int) -> str:
    """Fill a Postfix answer template (``{transport}:[{onion}]:{port}``) and validate it."""
    template = POSTFIX_ANSWER_PRESETS.get(template, template)
    value = template.format(
        transport=transport,
        onion=onion,
        port=port,
        colon_port_unless_25="" if port == 25 else f":{port}",
    )
    return check_value(value)


class LineParser:
    """Incremental LF-terminated line framing shared by the line codecs.  ``feed`` never raises:
    each complete line becomes one event (``_line``), an over-long line one ``_too_long`` event
    while the rest of it is discarded up to its LF."""

    __slots__ = ("_buf", "_max", "_discarding")

    def __init__(self, max_request: int = DEFAULT_MAX_REQUEST) -> None:
        self._buf = b""
        self._max = max_request
        self._discarding = False

    def _line(self, line: bytes) -> Event:
        raise NotImplementedError

    def _too_long(self) -> Event:
        raise NotImplementedError

    def quick_domain(self, data: bytes) -> bytes | None:
        """The daemon's quick path: if ``data`` is exactly one complete, plain request and
        nothing is buffered, the bytes after its key's last ``@`` (or the whole key), which
        :meth:`feed` would then return as one :class:`Lookup` of that key; else None (then
        :meth:`feed` decides).  Never consumes anything.  Line protocols without one: None."""
        return None

    def feed(self, data: bytes) -> list[Event]:
        """Add bytes; one event per complete line (an oversized line: one error)."""
        buf = self._buf + data if self._buf else data
        events: list[Event] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if self._discarding:
                self._discarding = False
            else:
                events.append(self._line(buf[start:nl]))
            start = nl + 1
        rest = buf[start:]
        if len(rest) > self._max:
            if not self._discarding:
                events.append(self._too_long())
            self._discarding = True
            rest = b""
        self._buf = rest
        return events

