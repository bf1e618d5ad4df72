"""Header scrubbing for mail sent from an onion identity: bytes in, bytes out, never raises.

Why: a message whose sender is ``someone@<onion>.onion`` should not carry the clear-net names
and programs its path wrote into it -- the ``Received`` lines of the MTAs it passed, a
``Message-ID`` naming the host, ``X-Mailer`` / ``User-Agent``.  The Exim FAQ's router strips
those four and adds a Message-ID that names no host; torroute's Exim plugin does the same
(``TORROUTE_SCRUB_SENDER_DOMAINS``), and this module is that policy for the Postfix pipe, the
LMTP relay and :func:`torroute.send_message` (see docs/scrub.rst).

What counts as the header section (decided so, and tested): the fields from the first byte up
to the first empty line.  A field starts with a name (printable US-ASCII but ``:``, optional
spaces/tabs before the colon, as Postfix and RFC 5322's obsolete syntax allow) and owns the
continuation lines after it (starting with a space or tab).  The first line that is neither
ends the header section without being one (Postfix treats it so too): what comes before it is
"certainly a header" and is scrubbed, the rest is body.  A line with a bare CR (not that of
its CRLF) is no header line either, nor is the field it would continue: with CR-only line ends
the whole message would otherwise look like one field.  A message that does not start with a
field (garbage, an mbox ``From`` line, a continuation line first) is returned unchanged.

Everything kept is kept byte for byte: the fields' order, their folding, their line ends (CRLF
or LF, as given), 8-bit bytes, the separator and the body.  Like Exim's ``headers_add``, the
new Message-ID goes at the end of the header section, with that section's line end.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["DEFAULT_HEADERS", "header_fields", "message_id_domain", "new_message_id", "scrub"]

#: the Exim FAQ's list (and the Exim plugin's ``headers_remove``)
DEFAULT_HEADERS = ("Received", "Message-ID", "X-Mailer", "User-Agent")

_WSP = b" \t"


def _field_name(line: bytes) -> bytes | None:
    """The lower-cased name if ``line`` starts a header field, else None."""
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(_WSP)
    if not name or any(c <= 32 or c >= 127 for c in name):
        return None
    return name.lower()


def header_fields(message: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """``([(lower-cased name, raw field bytes with its continuations and line ends)], end)``:
    the header section's fields, and the offset where the rest (the empty separator line, or
    the first line that is no header, then the body) begins.  ``end == 0``: no header section.
    The fields concatenated are exactly ``message[:end]``."""
    fields: list[tuple[bytes, bytes]] = []
    pos = 0
    size = len(message)
    start = 0
    name: bytes | None = None
    while pos < size:
        nl = message.find(b"\n", pos)
        stop = size if nl < 0 else nl + 1
        line = message[pos:stop]
        cr = line.find(b"\r")
        if cr >= 0 and not (cr == len(line) - 2 and line.endswith(b"\r\n")):
            # a bare CR: no header line (RFC 5322 has none), and the field it would continue
            # is not certainly one either (kept whole, nothing could look continued)
            if line[:1] in (b" ", b"\t"):
                pos, name = start, None
            break
        if line[:1] in (b" ", b"\t") and name is not None:
            pos = stop  # a continuation line (even a blank one): part of the current field
            continue
        new = _field_name(line)
        if new is None:
            break  # the empty separator line, or the first line that is not a header
        if name is not None:
            fields.append((name, message[start:pos]))
        name, start, pos = new, pos, stop
    if name is not None:
        fields.append((name, message[start:pos]))
    return fields, pos if fields else 0


def _value(field: bytes) -> bytes:
    """A field's value unfolded (line breaks removed, RFC 5322 2.2.3), outer blanks stripped."""
    value = field.split(b":", 1)[1]
    return value.replace(b"\r\n", b"").replace(b"\n", b"").strip(_WSP + b"\r")


def new_message_id(fields: list[tuple[bytes, bytes]], domain: str) -> bytes:
    """``<sha256 hex>@domain``: the hash of the first non-empty Message-ID's value (the FAQ's
    ``sha1(message_id)``, with the Exim plugin's sha256), so every copy of one message -- each
    onion, each retry, pipe, relay or send -- gets the same new id; without one, the hash of
    the whole original header section (which names no host once hashed)."""
    try:  # CPython's own SHA-256: hashlib would load OpenSSL first (~2.5 ms of a cold start)
        from _sha256 import sha256  # type: ignore[import-not-found]  # 3.11 (3.12: _sha2)
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore[import-not-found]
        except ImportError:
            from hashlib import sha256

    source = next((v for n, f in fields if n == b"message-id" and (v := _value(f))), None)
    if source is None:
        source = b"".join(f for _, f in fields)
    return f"<{sha256(source).hexdigest()}@{domain}>".encode("ascii", "replace")


def message_id_domain(domain: str) -> str:
    """``domain`` as the right side of a msg-id (a dot-atom): lower case, IDNA for a
    non-ASCII one, any other character dropped ("invalid" if nothing is left)."""
    try:
        domain = domain.strip().rstrip(".").lower()
        if not domain.isascii():
            domain = domain.encode("idna").decode("ascii")
    except (UnicodeError, ValueError):
        pass
    kept = "".join(c for c in domain if c.isascii() and (c.isalnum() or c in "-._"))
    return kept.strip(".") or "invalid"


def _matcher(names: Iterable[str | bytes]) -> tuple[frozenset[bytes], tuple[bytes, ...]]:
    """Exact names, and prefixes (a name ending in ``*``, as Exim's headers_remove)."""
    exact: set[bytes] = set()
    prefixes: list[bytes] = []
    for name in names:
        raw = (name.encode("ascii", "replace") if isinstance(name, str) else bytes(name))
        raw = raw.strip().lower()
        if raw.endswith(b"*"):
            prefixes.append(raw[:-1])
        elif raw:
            exact.add(raw)
    return frozenset(exact), tuple(prefixes)


def scrub(message: bytes, remove: Iterable[str | bytes] = DEFAULT_HEADERS,
          message_id_domain: str | None = None) -> bytes:
    """The message without the header fields named in ``remove`` (case-insensitive; ``X-*``
    removes every name starting ``x-``) and, when ``message_id_domain`` is given, with every
    old Message-ID replaced by one new one at the end of the header section
    (:func:`new_message_id`).  Only the header section changes; see the module docstring for
    malformed input.  Never raises: anything unexpected returns ``message`` unchanged."""
    try:
        return _scrub(bytes(message), remove, message_id_domain)
    except Exception:  # noqa: BLE001 - a scrubber must never cost a message
        return message


def _line_end(fields: list[tuple[bytes, bytes]]) -> bytes:
    """The header section's line end: the last field's, else the first field's, else LF."""
    for field in (fields[-1][1], fields[0][1]):
        if field.endswith(b"\n"):
            return b"\r\n" if field.endswith(b"\r\n") else b"\n"
    first = fields[0][1]
    nl = first.find(b"\n")
    return b"\r\n" if nl > 0 and first[nl - 1:nl] == b"\r" else b"\n"


def _scrub(message: bytes, remove: Iterable[str | bytes], domain: str | None) -> bytes:
    fields, end = header_fields(message)
    if not fields:
        return message
    exact, prefixes = _matcher(remove)
    if domain is not None:
        exact |= {b"message-id"}
    kept = [f for n, f in fields if n not in exact and not n.startswith(prefixes)]
    if domain is not None:
        eol = _line_end(fields)
        if kept and not kept[-1].endswith(b"\n"):
            kept[-1] += eol  # a last header line without a line end gets one
        kept.append(b"Message-ID: " + new_message_id(fields, domain) + eol)
    return b"".join(kept) + message[end:]
