"""LMTP (RFC 2033) and SMTP (RFC 5321) server protocol, pure: bytes in, replies and
transactions out.

Why a codec of our own: the relay mode of ``torroute serve`` takes mail from Postfix's own
``lmtp`` client and must never accept responsibility for a message it has not handed on, so
the end of DATA is not answered here: the codec emits a :class:`Transaction` and the caller
answers it later with one reply per recipient (:func:`rcpt_reply`), carrying each onion MX's
own answer.  Everything the peer sends is bounded (command line, message size, recipients,
errors) and malformed input gets an SMTP error reply, never an exception.

:class:`SmtpServer` is the same machine speaking SMTP for ``torroute sink``: EHLO/HELO, SIZE
in the EHLO answer, one reply per DATA, an optional STARTTLS (the codec emits
:class:`StartTls`; the driver upgrades the connection and calls :meth:`SmtpServer.tls_started`)
and a :class:`Policy` that may refuse a MAIL or RCPT with its own reply (quotas, relaying).

The message handed out has LF line ends (one record per line, dot-unstuffing undone), the form
:class:`torroute.protocols.smtp.SmtpClient` takes from Postfix's pipe(8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .lookup import sanitize_reason

CRLF = b"\r\n"
MAX_LINE = 2048  # RFC 5321 says 512 for a command line; room for SMTPUTF8 and parameters
MAX_ADDRESS = 512
MAX_RECIPIENTS = 1000
MAX_ERRORS = 20  # bad commands before the session is closed
DEFAULT_MAX_SIZE = 64 * 1024 * 1024
MAX_TEXT = 400  # longest text in a per-recipient reply


@dataclass(frozen=True, slots=True)
class Send:
    """Write these reply bytes to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection (after writing what came before)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Transaction:
    """A complete message: relay it, then write :func:`data_replies` (one per recipient)."""

    sender: bytes  # without <>; b"" is the null sender
    recipients: tuple[bytes, ...]
    message: bytes  # LF line ends, dot-unstuffed
    smtputf8: bool = False
    body_8bit: bool = False


@dataclass(frozen=True, slots=True)
class StartTls:
    """Write nothing more in clear: upgrade the connection to TLS (server side), then call
    :meth:`SmtpServer.tls_started`.  The 220 before it is in the preceding :class:`Send`."""


Event = Send | Close | Transaction | StartTls


class Policy:
    """What a server may refuse beyond syntax (``torroute sink``: relaying, quotas, rates).

    Each hook returns ``None`` (accept) or the complete reply line to send instead; the codec
    stays pure because the hooks only read counters.  The default accepts everything.
    """

    def mail(self, sender: bytes, size: int | None) -> bytes | None:
        return None

    def rcpt(self, recipient: bytes, accepted: int) -> bytes | None:
        """``accepted``: recipients already accepted in this transaction."""
        return None


def reply(code: int, dsn: str, text: str) -> bytes:
    """One single-line reply; ``text`` is made printable ASCII and bounded."""
    return f"{code} {dsn} {sanitize_reason(text, MAX_TEXT)}".encode("ascii") + CRLF


def rcpt_reply(code: int, dsn: str, text: str) -> bytes:
    """A per-recipient end-of-DATA reply.  A code or DSN that is not 2xx/4xx/5xx of one class
    becomes a 451 4.3.0: a wrong answer must defer, never bounce or accept."""
    ok = 200 <= code < 600 and code // 100 in (2, 4, 5)
    parts = dsn.split(".")
    ok = ok and len(parts) == 3 and parts[0] == str(code // 100) and all(
        p.isascii() and p.isdigit() and len(p) <= 3 for p in parts)
    if not ok:
        return reply(451, "4.3.0", f"internal error: bad reply {code} {dsn} {text}")
    return reply(code, dsn, text)


def data_replies(replies: list[bytes], count: int) -> bytes:
    """The end-of-DATA answer: exactly ``count`` replies; missing ones defer."""
    replies = list(replies[:count])
    replies += [reply(451, "4.3.0", "internal error: no result")] * (count - len(replies))
    return b"".join(replies)


def parse_path(text: bytes) -> tuple[bytes, bytes] | None:
    """``<address> params`` -> (address, params); None if malformed.  Quoted local parts may
    contain ``>`` and spaces; nothing may contain control characters."""
    text = text.lstrip(b" ")
    if not text.startswith(b"<"):
        return None
    quoted = escaped = False
    for i in range(1, len(text)):
        c = text[i]
        if c < 0x20 or c == 0x7F or (c == 0x20 and not quoted):
            return None
        if escaped:
            escaped = False
        elif c == 0x5C and quoted:  # backslash
            escaped = True
        elif c == 0x22:  # "
            quoted = not quoted
        elif c == 0x3E and not quoted:  # >
            address = text[1:i]
            if len(address) > MAX_ADDRESS or address.startswith(b"@"):  # no source routes
                return None
            return address, text[i + 1 :]
    return None


def parse_params(raw: bytes) -> dict[bytes, bytes] | None:
    params: dict[bytes, bytes] = {}
    if raw and not raw.startswith(b" "):
        return None
    for word in raw.split():
        key, _, value = word.partition(b"=")
        if not key.isalnum() and not key.replace(b"-", b"").isalnum():
            return None
        params[key.upper()] = value
    return params


class LmtpServer:
    """One LMTP session as a state machine.  ``greeting()`` first, then ``feed(bytes)``."""

    #: the greeting command this dialect takes (SMTP: EHLO or HELO)
    HELLO = b"LHLO"

    def __init__(self, hostname: str = "torroute", max_size: int = DEFAULT_MAX_SIZE,
                 max_recipients: int = MAX_RECIPIENTS, policy: Policy | None = None) -> None:
        self.hostname = hostname
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.policy = policy or Policy()
        self.helo = ""  # the name the client gave in LHLO/EHLO/HELO
        self.declared_size: int | None = None
        self.closed = False
        self.errors = 0
        self._buffer = bytearray()
        self._lhlo = False
        self._discarding = False  # dropping the rest of an over-long command line
        self._paused = False  # after STARTTLS until the handshake (SmtpServer)
        self._holding = False  # after a spooled Transaction until resume() (SmtpServer)
        #: SmtpServer: where message bytes go as they arrive (LF lines, dot-unstuffed) instead
        #: of into Transaction.message; see SmtpServer.resume
        self.spool: Callable[[bytes], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.sender: bytes | None = None
        self.recipients: list[bytes] = []
        self.smtputf8 = False
        self.body_8bit = False
        self.declared_size = None
        self._data: bytearray | None = None  # set while receiving DATA
        self._data_size = 0
        self._too_big = False
        self._line_start = True

    DIALECT = "LMTP"

    def greeting(self) -> bytes:
        return f"220 {self.hostname} LMTP torroute relay ready".encode("ascii") + CRLF

    def extensions(self) -> list[str]:
        """The EHLO/LHLO keywords after the host name line."""
        return ["PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8",
                f"SIZE {self.max_size}"]

    @property
    def in_data(self) -> bool:
        return self._data is not None

    # ---- input

    def feed(self, data: bytes) -> list[Event]:
        if self.closed or self._paused:
            return []
        self._buffer += data
        events: list[Event] = []
        while not self.closed and not self._paused and not self._holding:
            if self._data is not None:
                if not self._take_data(events):
                    break
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    del self._buffer[:]
                    self._discarding = True
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding or len(line) > MAX_LINE:
                self._discarding = False
                self._error(events, 500, "5.5.2", "line too long")
                continue
            self._command(line.rstrip(b"\r"), events)
        return events

    def eof(self) -> list[Event]:
        """The client closed its side: an unfinished transaction is dropped, never relayed."""
        self.closed = True
        self._reset()
        return [Close("client closed the connection")]

    # ---- commands

    def _error(self, events: list[Event], code: int, dsn: str, text: str) -> None:
        self.errors += 1
        events.append(Send(reply(code, dsn, text)))
        if self.errors >= MAX_ERRORS:
            events.append(Send(reply(421, "4.7.0", "too many errors, closing")))
            events.append(Close("too many errors"))
            self.closed = True

    def _command(self, line: bytes, events: list[Event]) -> None:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb in (b"LHLO", b"EHLO", b"HELO"):
            if verb != self.HELLO and not (self.HELLO == b"EHLO" and verb == b"HELO"):
                expected = self.HELLO.decode()
                return self._error(events, 500, "5.5.1",
                                   f"this is {self.DIALECT}: {expected} expected")
            if not arg.strip() or any(c < 0x21 or c > 0x7E for c in arg.strip()):
                return self._error(events, 501, "5.5.4", f"{verb.decode()} needs a host name")
            self._reset()
            self._lhlo = True
            self.helo = arg.strip().decode("ascii")[:255]
            if verb == b"HELO":
                events.append(Send(f"250 {self.hostname}\r\n".encode("ascii")))
                return None
            lines = [self.hostname, *self.extensions()]
            text = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
            events.append(Send(text.encode("ascii")))
        elif verb == b"MAIL":
            self._mail(arg, events)
        elif verb == b"STARTTLS":
            self._starttls(arg, events)
        elif verb == b"RCPT":
            self._rcpt(arg, events)
        elif verb == b"DATA":
            if arg.strip():
                return self._error(events, 501, "5.5.4", "DATA takes no arguments")
            if self.sender is None:
                return self._error(events, 503, "5.5.1", "MAIL first")
            if not self.recipients:
                return self._error(events, 503, "5.5.1", "RCPT first")
            self._data = bytearray()
            self._line_start = True
            events.append(Send(b"354 End data with <CR><LF>.<CR><LF>" + CRLF))
        elif verb == b"RSET":
            self._reset()
            events.append(Send(reply(250, "2.0.0", "OK")))
        elif verb == b"NOOP":
            events.append(Send(reply(250, "2.0.0", "OK")))
        elif verb == b"VRFY":
            events.append(Send(reply(252, "2.5.0", "cannot VRFY, send mail")))
        elif verb == b"QUIT":
            events.append(Send(reply(221, "2.0.0", "bye")))
            events.append(Close("QUIT"))
            self.closed = True
        else:
            self._error(events, 500, "5.5.2", "command not recognized")

    def _mail(self, arg: bytes, events: list[Event]) -> None:
        if not self._lhlo:
            return self._error(events, 503, "5.5.1", f"{self.HELLO.decode()} first")
        if self.sender is not None:
            return self._error(events, 503, "5.5.1", "nested MAIL command")
        if arg[:5].upper() != b"FROM:":
            return self._error(events, 501, "5.5.4", "syntax: MAIL FROM:<address>")
        parsed = parse_path(arg[5:])
        params = parse_params(parsed[1]) if parsed else None
        if parsed is None or params is None:
            return self._error(events, 501, "5.1.7", "bad sender address syntax")
        for key, value in params.items():
            if key == b"SIZE":
                if not value.isdigit() or len(value) > 20:
                    return self._error(events, 501, "5.5.4", "bad SIZE parameter")
                if int(value) > self.max_size:
                    return self._error(events, 552, "5.3.4", "message too big")
                self.declared_size = int(value)
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    return self._error(events, 501, "5.5.4", "bad BODY parameter")
                self.body_8bit = value.upper() == b"8BITMIME"
            elif key == b"SMTPUTF8" and not value:
                self.smtputf8 = True
            else:
                self.declared_size = None
                return self._error(events, 555, "5.5.4", "unsupported MAIL parameter")
        refusal = self.policy.mail(parsed[0], self.declared_size)
        if refusal is not None:
            self.declared_size = None
            self.smtputf8 = self.body_8bit = False
            events.append(Send(refusal))
            if refusal.startswith(b"421"):
                events.append(Close("refused at MAIL"))
                self.closed = True
            return None
        self.sender = parsed[0]
        events.append(Send(reply(250, "2.1.0", "OK")))

    def _rcpt(self, arg: bytes, events: list[Event]) -> None:
        if self.sender is None:
            return self._error(events, 503, "5.5.1", "MAIL first")
        if arg[:3].upper() != b"TO:":
            return self._error(events, 501, "5.5.4", "syntax: RCPT TO:<address>")
        parsed = parse_path(arg[3:])
        params = parse_params(parsed[1]) if parsed else None
        if parsed is None or params is None or b"@" not in parsed[0][1:]:
            return self._error(events, 501, "5.1.3", "bad recipient address syntax")
        if params:
            return self._error(events, 555, "5.5.4", "unsupported RCPT parameter")
        if len(self.recipients) >= self.max_recipients:
            events.append(Send(reply(452, "4.5.3", "too many recipients")))
            return None
        refusal = self.policy.rcpt(parsed[0], len(self.recipients))
        if refusal is not None:
            events.append(Send(refusal))
            return None
        self.recipients.append(parsed[0])
        events.append(Send(reply(250, "2.1.5", "OK")))

    def _starttls(self, arg: bytes, events: list[Event]) -> None:
        self._error(events, 500, "5.5.2", "command not recognized")  # LMTP: not a command

    @property
    def data_reply_count(self) -> int:
        """Replies the end of DATA takes: LMTP one per recipient."""
        return len(self.recipients)

    # ---- DATA

    def _take_data(self, events: list[Event]) -> bool:
        """Consume message lines; False when more input is needed."""
        assert self._data is not None
        buf = self._buffer
        end = buf.find(b"\n")
        if end < 0:
            # a long line without LF: keep its start only while a '.' there is undecided
            if len(buf) > MAX_LINE:  # keep the last byte: it may be the CR of a CRLF
                start = 1 if self._line_start and buf[:1] == b"." else 0  # a stuffed dot
                self._append(bytes(buf[start:-1]), line_end=False)
                del buf[:-1]
            return False
        line = bytes(buf[:end])
        del buf[: end + 1]
        body = line[:-1] if line.endswith(b"\r") else line
        if self._line_start and body == b".":
            self._finish_data(events)
            return True
        if self._line_start and body.startswith(b"."):
            body = body[1:]
        self._append(body, line_end=True)
        return True

    def _append(self, chunk: bytes, line_end: bool) -> None:
        assert self._data is not None
        self._data_size += len(chunk) + (2 if line_end else 0)
        if self._data_size > self.max_size:
            self._too_big = True
            self._data.clear()
        if not self._too_big:
            if self.spool is not None:
                self.spool(chunk + b"\n" if line_end else chunk)
            else:
                self._data += chunk
                if line_end:
                    self._data += b"\n"
        self._line_start = line_end

    def _finish_data(self, events: list[Event]) -> None:
        assert self._data is not None and self.sender is not None
        count = self.data_reply_count
        if self._too_big:
            events.append(Send(reply(552, "5.3.4", "message too big") * count))
        else:
            events.append(Transaction(self.sender, tuple(self.recipients), bytes(self._data),
                                      self.smtputf8, self.body_8bit))
        lhlo = self._lhlo
        self._reset()
        self._lhlo = lhlo


class SmtpServer(LmtpServer):
    """The same machine speaking SMTP (``torroute sink``): EHLO/HELO, one reply per DATA
    (the caller answers a :class:`Transaction` with one reply, e.g. from :func:`rcpt_reply`),
    optional STARTTLS.  After :class:`StartTls` the driver upgrades the connection and calls
    :meth:`tls_started`; input the client sent in clear after the STARTTLS line is dropped
    (RFC 3207: a man in the middle must not inject commands into the TLS session)."""

    HELLO = b"EHLO"
    DIALECT = "SMTP"

    def __init__(self, hostname: str = "torroute", max_size: int = DEFAULT_MAX_SIZE,
                 max_recipients: int = MAX_RECIPIENTS, policy: Policy | None = None,
                 starttls: bool = False) -> None:
        super().__init__(hostname, max_size, max_recipients, policy)
        self.starttls = starttls
        self.tls = False

    def greeting(self) -> bytes:
        return f"220 {self.hostname} ESMTP torroute sink".encode("ascii") + CRLF

    def extensions(self) -> list[str]:
        tls = ["STARTTLS"] if self.starttls and not self.tls else []
        return ["PIPELINING", f"SIZE {self.max_size}", "8BITMIME", "ENHANCEDSTATUSCODES",
                "SMTPUTF8", *tls]

    @property
    def data_reply_count(self) -> int:
        return 1

    @property
    def holding(self) -> bool:
        """A spooled Transaction was emitted: input after it waits for :meth:`resume`."""
        return self._holding

    def _finish_data(self, events: list[Event]) -> None:
        spooled = self.spool is not None and not self._too_big
        super()._finish_data(events)
        if spooled:
            # the body went to the spool: the next message must not start there before the
            # caller has taken this one, so parsing stops here until resume()
            self._holding = True

    def resume(self) -> list[Event]:
        """After a spooled Transaction is answered: parse the input that followed it."""
        self._holding = False
        return self.feed(b"")

    def _starttls(self, arg: bytes, events: list[Event]) -> None:
        if not self.starttls or self.tls:
            return self._error(events, 502, "5.5.1", "STARTTLS not offered")
        if arg.strip():
            return self._error(events, 501, "5.5.4", "STARTTLS takes no arguments")
        if not self._lhlo:
            return self._error(events, 503, "5.5.1", "EHLO first")
        events.append(Send(reply(220, "2.0.0", "ready to start TLS")))
        events.append(StartTls())
        del self._buffer[:]
        self._paused = True  # nothing more is parsed until tls_started()
        return None

    def tls_started(self) -> None:
        """The connection is TLS now: forget everything said before (RFC 3207 4.2)."""
        self.tls = True
        self._paused = False
        del self._buffer[:]
        self._reset()
        self._lhlo = False
        self.helo = ""
