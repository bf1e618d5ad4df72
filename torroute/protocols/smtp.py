"""SMTP client protocol for ``torroute deliver``, pure: bytes in, bytes and decisions out.

Why pure: the delivery program's correctness (what is sent, when to stop, whether the mail is
delivered, deferred or bounced) must be testable without sockets, and the program must start
fast (no smtplib, which pulls in ssl and email).  The caller owns the socket: it feeds what it
reads to :meth:`SmtpClient.receive` and performs the returned actions; the machine names the
deadline of each (``Send.deadline``, ``SmtpClient.reply_deadline``: :data:`COMMAND` or
:data:`DATA`, RFC 5321 4.5.3.2) and says whether a deferred transaction may run again
(``retryable``) or go to the next MX (``may_try_next``).  torroute.delivery.session turns the
actions into I/O requests for its two drivers.

Outcome rules (Postfix ``pipe(8)`` semantics: exit 0 delivered, 75 deferred, other bounced; a
leading enhanced status code in the output wins):

* every reply the remote gives keeps its class: 2xx delivered, 4xx deferred, 5xx bounced, with
  the remote's own enhanced code when it gives one of the right class;
* a lost connection, a timeout or garbage from the remote defers (4.4.2 / 4.5.0): the message
  may be retried, it is never bounced for a transport problem;
* several recipients in one run: all or nothing.  DATA is sent only when every RCPT was
  accepted; otherwise nothing is sent (no partial delivery that a retry would duplicate, no
  refused recipient silently dropped).  All refused with 5xx -> bounce; anything else -> defer
  with 4.5.3.  ``<transport>_destination_recipient_limit = 1`` makes every status exact.
"""

from __future__ import annotations

from ..errors import ProtocolError
from ..exitcodes import OK, TEMPFAIL, UNAVAILABLE

CRLF = b"\r\n"
MAX_REPLY_BYTES = 1 << 20  # a reply larger than this is garbage, not SMTP

DELIVERED, DEFERRED, BOUNCED = "delivered", "deferred", "bounced"
#: the deadline kinds: a command and its reply, or the message and the reply to its final '.'
COMMAND, DATA = "command", "data"
EXIT_CODES = {DELIVERED: OK, DEFERRED: TEMPFAIL, BOUNCED: UNAVAILABLE}


class _Record:
    """Value semantics for small slotted classes (dataclasses cost ~0.5 ms each at import,
    and this module is imported once per delivered message)."""

    __slots__ = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values() == self._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


def valid_dsn(code: str) -> bool:
    """``X.Y.Z`` with X in 2/4/5, Y and Z of 1-3 digits (RFC 3463)."""
    parts = code.split(".")
    return (len(parts) == 3 and parts[0] in ("2", "4", "5")
            and all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts[1:]))


class Reply(_Record):
    """One (possibly multi-line) SMTP reply."""

    __slots__ = ("code", "lines")

    def __init__(self, code: int, lines: tuple[str, ...]) -> None:
        self.code = code
        self.lines = lines

    @property
    def kind(self) -> int:
        return self.code // 100

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 code at the start of the text, if it has the reply's class."""
        words = self.lines[0].split(None, 1) if self.lines else []
        if words and valid_dsn(words[0]) and int(words[0][0]) == self.kind:
            return words[0]
        return None

    def text(self) -> str:
        """One line: ``550 5.1.1 <x@y>: unknown user`` (continuation lines joined)."""
        return f"{self.code} " + " ".join(line for line in self.lines if line).strip()


class ReplyParser:
    """Splits a byte stream into replies (``250-a`` ... ``250 z``)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._code: int | None = None

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_BYTES:
                    raise ProtocolError("reply line too long")
                return replies
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            reply = self._line(raw)
            if reply is not None:
                replies.append(reply)

    def _line(self, raw: bytes) -> Reply | None:
        if len(raw) < 3 or not raw[:3].isdigit() or raw[:1] not in b"2345" or (
                len(raw) > 3 and raw[3:4] not in b" -"):
            shown = raw[:80].decode("utf-8", "replace")
            raise ProtocolError(f"malformed reply line {shown!r}")
        code = int(raw[:3])
        if self._code is not None and code != self._code:
            raise ProtocolError(f"reply code changed from {self._code} to {code} mid-reply")
        self._code = code
        self._lines.append(raw[4:].decode("utf-8", "replace"))
        if raw[3:4] == b"-":
            if sum(map(len, self._lines)) > MAX_REPLY_BYTES:
                raise ProtocolError("reply too long")
            return None
        reply = Reply(code, tuple(self._lines))
        self._lines, self._code = [], None
        return reply

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished reply are buffered (a well-behaved server sends none)."""
        return bool(self._buffer or self._lines)


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> parameters, from every line after the greeting line."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def to_crlf(message: bytes) -> bytes:
    """Postfix hands pipe(8) one LF per record; SMTP wants CRLF (as Postfix's smtp client does:
    every record becomes a line + CRLF)."""
    return message.replace(b"\n", CRLF)


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload: CRLF lines, a leading '.' doubled, ending with ``CRLF.CRLF``."""
    data = to_crlf(message)
    if data and not data.endswith(CRLF):
        data += CRLF
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


def header_section(message: bytes) -> bytes:
    end = message.find(b"\n\n")
    if end < 0:
        end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end]


def is_8bit(data: bytes) -> bool:
    return not data.isascii()


def format_path(address: bytes) -> bytes:
    """``<address>`` for MAIL FROM / RCPT TO (the empty sender stays ``<>``)."""
    if address.startswith(b"<") and address.endswith(b">"):
        return address
    return b"<" + address + b">"


class Options(_Record):
    """Client behaviour ([deliver] settings); ``destination`` ("<onion>:25") is for messages."""

    __slots__ = ("ehlo_name", "starttls", "pipelining", "destination", "per_recipient",
                 "keep_alive", "chunking")

    def __init__(self, ehlo_name: str = "localhost", starttls: str = "no",
                 pipelining: bool = True, destination: str = "", per_recipient: bool = False,
                 keep_alive: bool = False, chunking: bool = True) -> None:
        self.ehlo_name = ehlo_name
        self.starttls = starttls  # "no" | "opportunistic" | "required"
        self.pipelining = pipelining
        # BDAT (RFC 3030) when the server offers CHUNKING: the message goes with its
        # envelope, without waiting for DATA's 354 -- one round trip less per message
        self.chunking = chunking
        self.destination = destination
        # LMTP relay: each recipient gets its own status (partial delivery, as Postfix's smtp
        # client does), instead of the pipe's all or nothing
        self.per_recipient = per_recipient
        # LMTP relay: after a finished transaction, leave the connection open for the next
        # one (no QUIT; see SmtpClient.reusable and SmtpClient.resume)
        self.keep_alive = keep_alive


class Outcome(_Record):
    """What happened: ``status`` (delivered/deferred/bounced), a DSN code and one line of text."""

    __slots__ = ("status", "dsn", "text")

    def __init__(self, status: str, dsn: str, text: str) -> None:
        self.status = status
        self.dsn = dsn
        self.text = text

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def line(self) -> str:
        """The pipe(8) output line: the enhanced status code first (it wins over the exit code)."""
        return f"{self.dsn} {self.text}"


def outcome_for_reply(reply: Reply, where: str, destination: str) -> Outcome:
    """A remote's final word on the transaction (2xx, 4xx or 5xx), with its own text."""
    kind = reply.kind
    status = {2: DELIVERED, 4: DEFERRED, 5: BOUNCED}.get(kind, DEFERRED)
    dsn = reply.enhanced or {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(kind, "4.5.0")
    if status == DEFERRED and not dsn.startswith("4"):
        dsn = "4.5.0"  # e.g. 354 where a final reply was due: a protocol error, retry
    said = f"host {destination} said: {reply.text()}" if destination else reply.text()
    return Outcome(status, dsn, f"{said} (in reply to {where})")


def temporary(dsn: str, text: str) -> Outcome:
    assert dsn.startswith("4.")
    return Outcome(DEFERRED, dsn, text)


def permanent(dsn: str, text: str) -> Outcome:
    assert dsn.startswith("5.")
    return Outcome(BOUNCED, dsn, text)


def recipients_outcome(replies: list[Reply], recipients: list[bytes],
                       destination: str) -> Outcome | None:
    """All-or-nothing for a multi-recipient run; None when every recipient was accepted."""
    refused = [(rcpt, r) for rcpt, r in zip(recipients, replies, strict=True) if r.kind != 2]
    if not refused:
        return None
    first_rcpt, first = refused[0]
    where = f"RCPT TO:<{first_rcpt.decode('utf-8', 'replace')}>"
    if len(refused) == len(recipients) and all(r.kind == 5 for _, r in refused):
        return outcome_for_reply(first, where, destination)  # refused outright: bounce
    if len(refused) == len(recipients):  # refused, some only for now: retry all later
        outcome = outcome_for_reply(next(r for _, r in refused if r.kind != 5), where,
                                    destination)
        return temporary(outcome.dsn if outcome.dsn.startswith("4") else "4.0.0", outcome.text)
    detail = outcome_for_reply(first, where, destination).text
    return temporary("4.5.3", f"{len(refused)} of {len(recipients)} recipients not accepted, "
                     f"message not sent to any (a pipe has one status for all; set "
                     f"torroute_destination_recipient_limit = 1): {detail}")


# ---- actions the caller performs


class Send(_Record):
    """Write ``data``; ``bulk`` marks the message body (the data timeout applies)."""

    __slots__ = ("data", "bulk")

    def __init__(self, data: bytes, bulk: bool = False) -> None:
        self.data = data
        self.bulk = bulk

    @property
    def deadline(self) -> str:
        """:data:`DATA` for the message body, :data:`COMMAND` for a command."""
        return DATA if self.bulk else COMMAND


class StartTLS(_Record):
    """Wrap the connection in TLS now, then call :meth:`SmtpClient.tls_started`."""

    __slots__ = ()


class Close(_Record):
    """Close the connection; :attr:`SmtpClient.outcome` is final."""

    __slots__ = ()


Action = Send | StartTLS | Close


class SmtpClient:
    """One SMTP transaction for one message, as a state machine.

    ``sender`` and ``recipients`` are the bytes Postfix gave (already RFC 5321 quoted by the
    pipe ``q`` flag); ``message`` is the raw message with LF line ends.
    """

    def __init__(self, sender: bytes, recipients: list[bytes], message: bytes,
                 options: Options | None = None) -> None:
        if not recipients:
            raise ValueError("no recipients")
        self.sender = sender
        self.recipients = recipients
        self.message = message
        self.options = options or Options()
        self.outcome: Outcome | None = None
        self.extensions: dict[str, str] = {}
        self.phase = "greeting"  # greeting | command | data-end | closed
        self._parser = ReplyParser()
        self._expect: list[str] = []  # what the replies in flight answer, in order
        self._esmtp = True
        self._tls = False
        self._mail: Reply | None = None
        self._rcpts: list[Reply] = []
        self._data: Reply | None = None
        self._body_sent = False
        self._last_reply: Reply | None = None
        self._resumed = False  # on a connection kept from an earlier transaction
        self._stale = False  # ... which was closed before it answered anything of this one
        self.reusable = False  # keep_alive: the connection may carry another transaction
        self.size = len(self.message) + self.message.count(b"\n")  # CRLF size, as SIZE wants
        self.eight_bit = is_8bit(self.message)
        envelope = [self.sender, *self.recipients]
        self.utf8_envelope = any(not a.isascii() for a in envelope)
        self.utf8_headers = is_8bit(header_section(self.message))

    # ---- input

    def receive(self, data: bytes) -> list[Action]:
        """Feed bytes read from the connection; returns what to do next."""
        if self.phase == "closed":
            return []
        try:
            replies = self._parser.feed(data)
        except ProtocolError as exc:
            return self._finish(temporary("4.5.0", self._said(f"protocol error: {exc}")),
                                quit=False)
        actions: list[Action] = []
        for reply in replies:
            actions += self._on_reply(reply)
            if self.phase == "closed":
                break
        return actions

    def connection_lost(self, detail: str = "connection closed") -> Outcome:
        """The connection ended (EOF, reset) before the transaction was decided."""
        if self.outcome is None and self._resumed and self._unanswered() \
                and not detail.startswith("timeout"):
            self._stale = True
        if self.outcome is None:
            where = self._stage()
            self.outcome = temporary("4.4.2", self._said(f"lost connection {where}: {detail}"))
        self.phase = "closed"
        return self.outcome

    def timed_out(self, seconds: float) -> Outcome:
        """No reply within the phase's time limit."""
        return self.connection_lost(f"timeout after {seconds:g}s")

    def tls_started(self) -> list[Action]:
        self._tls = True
        self.extensions = {}
        return [self._ehlo()]  # RFC 3207: forget what was said before TLS

    def tls_failed(self, detail: str) -> Outcome:
        return self.connection_lost(f"TLS handshake failed: {detail}")

    def tls_refused(self, detail: str) -> Outcome:
        """The server's certificate failed ``tls_verify`` (untrusted, or for another name):
        defer with 4.7.5, as Postfix's verify level does; nothing more is sent, not even QUIT."""
        if self.outcome is None:
            self.outcome = temporary("4.7.5", self._said(detail))
        self.phase = "closed"
        return self.outcome

    @property
    def reply_deadline(self) -> str:
        """The deadline the next reply is awaited under: :data:`DATA` for the reply to the
        message's final '.', :data:`COMMAND` for the greeting and every other reply."""
        return DATA if self.phase == "data-end" else COMMAND

    @property
    def answered(self) -> bool:
        """The server said something (a greeting at least): the destination is reachable,
        whatever it answered (what per-onion health counts as a success of tor)."""
        return self._last_reply is not None

    @property
    def retryable(self) -> bool:
        """Deferred before the message was sent, so nothing can have been delivered: the same
        transaction may run again on a fresh connection (the relay does so once when a kept
        connection turns out stale).  Looser than :attr:`may_try_next`: the server may have
        answered MAIL or RCPT (e.g. 421 from a server that dropped the idle session).

        With BDAT the message goes out with RSET/MAIL/RCPT on a kept connection, so a stale
        one has been "sent" the message: such a transaction is retryable too when the
        connection ended before a single reply to it came back, or its RSET was refused
        (the server dropped the session; it took nothing).  A server that died after taking
        the message but before saying anything is the one case where this sends it twice --
        and the alternative, a deferral, makes Postfix send it again as well."""
        out = self.outcome
        return out is not None and out.status == DEFERRED and (not self._body_sent
                                                               or self._stale)

    def _unanswered(self) -> bool:
        """No reply to this transaction yet (on a resumed connection RSET is the first)."""
        return self._mail is None and (not self._expect or self._expect[0] == "RSET")

    @property
    def may_try_next(self) -> bool:
        """Deferred before the server answered MAIL FROM and before the message was sent, so
        nothing can have been delivered and this server never judged the transaction: another
        MX of the destination may be tried (RFC 5321 5.1).  True for tor/connection failures
        that leave no outcome here, a lost or silent connection, a 4xx/5xx greeting (Postfix
        skips such servers too), a 4xx EHLO, STARTTLS or certificate trouble; False for any
        reply to MAIL/RCPT/DATA and for a bounce (SIZE, SMTPUTF8)."""
        out = self.outcome
        return (out is not None and out.status == DEFERRED and self._mail is None
                and not self._body_sent)

    # ---- the machine

    def _said(self, text: str) -> str:
        where = self.options.destination
        return f"{where}: {text}" if where else text

    def _stage(self) -> str:
        if self._body_sent:
            return "after sending the message (delivery unknown)"
        if self._data is not None and self._data.code == 354:
            return "while sending the message"
        if self.phase == "greeting":
            return "while waiting for the greeting"
        return f"after {self._expect[0]}" if self._expect else "during the session"

    def _finish(self, outcome: Outcome, quit: bool = True) -> list[Action]:
        if self.outcome is None:
            self.outcome = outcome
        self.phase = "closed"
        self._expect = []
        last = self._last_reply
        if (quit and self.options.keep_alive and self._mail is not None and last is not None
                and last.kind in (2, 4, 5) and last.code != 421 and not self._parser.pending):
            self.reusable = True  # the server answered the transaction and is still talking
            return [Close()]
        return [Send(b"QUIT" + CRLF), Close()] if quit else [Close()]

    def resume(self, extensions: dict[str, str]) -> list[Action]:
        """Begin on a connection kept from an earlier transaction (greeting and EHLO done):
        ``RSET`` first, pipelined with MAIL/RCPT(/DATA) when the server offers PIPELINING."""
        self.phase = "command"
        self._resumed = True
        self.extensions = dict(extensions)
        if not (self.options.pipelining and "PIPELINING" in self.extensions):
            self._expect = ["RSET"]
            return [Send(b"RSET" + CRLF)]
        actions = self._begin_transaction()
        first = actions[0]
        if self.phase == "closed" or not isinstance(first, Send):
            return actions
        self._expect.insert(0, "RSET")
        return [Send(b"RSET" + CRLF + first.data, first.bulk), *actions[1:]]

    def recipient_outcomes(self) -> list[Outcome]:
        """One outcome per recipient (``per_recipient``): its own RCPT refusal, else the
        transaction's outcome."""
        assert self.outcome is not None
        if self._mail is None or self._mail.kind != 2:
            return [self.outcome] * len(self.recipients)
        result = []
        for i, rcpt in enumerate(self.recipients):
            r = self._rcpts[i] if i < len(self._rcpts) else None
            if r is not None and r.kind != 2:
                where = f"RCPT TO:<{rcpt.decode('utf-8', 'replace')}>"
                out = outcome_for_reply(r, where, self.options.destination)
                result.append(out)
            else:
                result.append(self.outcome)
        return result

    def _on_reply(self, reply: Reply) -> list[Action]:
        self._last_reply = reply
        if self.phase == "greeting":
            self.phase = "command"
            if reply.kind != 2:  # 554 "no service": defer, as Postfix does for a 5xx greeting
                out = outcome_for_reply(reply, "initial server greeting", self.options.destination)
                return self._finish(temporary("4.0.0" if reply.kind == 5 else out.dsn, out.text))
            return [self._ehlo()]
        if not self._expect:
            return self._finish(temporary("4.5.0", self._said(
                f"unexpected reply {reply.text()!r}")), quit=False)
        what = self._expect.pop(0)
        if what == "RSET":
            if reply.kind != 2:
                self._stale = True  # the server dropped the session: it takes nothing more
                return self._finish(temporary("4.4.2", self._said(
                    f"reused connection: RSET answered {reply.text()!r}")), quit=False)
            return [] if self._expect else self._begin_transaction()
        if what in ("EHLO", "HELO"):
            return self._on_hello(what, reply)
        if what == "STARTTLS":
            if reply.kind == 2:
                return [StartTLS()]
            if self.options.starttls == "required":
                out = outcome_for_reply(reply, "STARTTLS", self.options.destination)
                return self._finish(temporary("4.7.0", out.text))
            return self._begin_transaction()
        if what == "MAIL":
            self._mail = reply
        elif what == "RCPT":
            self._rcpts.append(reply)
        elif what == "DATA":
            self._data = reply
        elif what == "END":
            where = "end of DATA command"
            return self._finish(outcome_for_reply(reply, where, self.options.destination))
        elif what == "BDAT":
            self._data = reply
            return self._next()
        if self._expect:
            return []  # more pipelined replies due
        return self._next()

    def _ehlo(self) -> Send:
        verb = "EHLO" if self._esmtp else "HELO"
        self._expect = [verb]
        return Send(verb.encode() + b" " + self.options.ehlo_name.encode("ascii") + CRLF)

    def _on_hello(self, verb: str, reply: Reply) -> list[Action]:
        if reply.kind == 5 and verb == "EHLO" and reply.code in (500, 501, 502, 504, 550):
            self._esmtp = False  # an old server: plain SMTP
            return [self._ehlo()]
        if reply.kind != 2:
            return self._finish(outcome_for_reply(reply, verb, self.options.destination))
        self.extensions = parse_ehlo(reply) if verb == "EHLO" else {}
        if self.options.starttls != "no" and not self._tls:
            if "STARTTLS" in self.extensions:
                self._expect = ["STARTTLS"]
                return [Send(b"STARTTLS" + CRLF)]
            if self.options.starttls == "required":
                return self._finish(temporary("4.7.4", self._said(
                    "STARTTLS is required by [deliver] starttls, but not offered")))
        return self._begin_transaction()

    def _begin_transaction(self) -> list[Action]:
        ext = self.extensions
        limit = ext.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < self.size:
            return self._finish(permanent("5.3.4", self._said(
                f"message size {self.size} exceeds the size limit {limit} of the server")))
        params = [f"SIZE={self.size}".encode()] if "SIZE" in ext else []
        if self.eight_bit and "8BITMIME" in ext:
            params.append(b"BODY=8BITMIME")
        if self.utf8_envelope and "SMTPUTF8" not in ext:
            return self._finish(permanent("5.6.7", self._said(
                "SMTPUTF8 is required for a non-ASCII address, but the server does not offer it")))
        if (self.utf8_envelope or self.utf8_headers) and "SMTPUTF8" in ext:
            params.append(b"SMTPUTF8")
        mail = b"MAIL FROM:" + format_path(self.sender) + b"".join(b" " + p for p in params)
        commands = [(b"MAIL", mail + CRLF)]
        pipelining = self.options.pipelining and "PIPELINING" in ext
        bdat = False
        if pipelining:
            commands += [(b"RCPT", b"RCPT TO:" + format_path(r) + CRLF) for r in self.recipients]
            # all or nothing needs the RCPT replies before the message goes (DATA's 354 still
            # lets it stop; BDAT would not); per recipient, refused ones are simply not sent to
            if len(self.recipients) == 1 or self.options.per_recipient:
                if self._chunking():
                    commands.append((b"BDAT", self._bdat()))
                    bdat = True
                elif len(self.recipients) == 1:
                    commands.append((b"DATA", b"DATA" + CRLF))
        self._pipelining = pipelining
        self._expect = [verb.decode() for verb, _ in commands]
        return [Send(b"".join(line for _, line in commands), bulk=bdat)]

    def _chunking(self) -> bool:
        return self.options.chunking and "CHUNKING" in self.extensions

    def _bdat(self) -> bytes:
        """``BDAT <n> LAST`` and the whole message as CRLF lines (no dot-stuffing, RFC 3030);
        from here on the message counts as sent and every reply is awaited under the data
        deadline (a server may hold the replies to MAIL and RCPT until it has read it)."""
        data = to_crlf(self.message)
        if data and not data.endswith(CRLF):
            data += CRLF
        self._body_sent = True
        self.phase = "data-end"
        return b"BDAT %d LAST" % len(data) + CRLF + data

    def _next(self) -> list[Action]:
        """All replies in flight are in: decide the next step."""
        dest = self.options.destination
        assert self._mail is not None
        if self._mail.kind != 2:
            return self._abort_or_finish(outcome_for_reply(self._mail, "MAIL FROM", dest))
        if len(self._rcpts) < len(self.recipients):  # only without pipelining
            rcpt = self.recipients[len(self._rcpts)]
            self._expect = ["RCPT"]
            return [Send(b"RCPT TO:" + format_path(rcpt) + CRLF)]
        if self.options.per_recipient:
            refusals = [(rcpt, r) for rcpt, r in zip(self.recipients, self._rcpts, strict=True)
                        if r.kind != 2]
            refused = None
            if len(refusals) == len(self.recipients):  # nobody to send to
                rcpt, r = refusals[0]
                refused = outcome_for_reply(r, f"RCPT TO:<{rcpt.decode('utf-8', 'replace')}>",
                                            dest)
        else:
            refused = recipients_outcome(self._rcpts, self.recipients, dest)
        if refused is not None:
            return self._abort_or_finish(refused)
        if self._data is None:
            if self._chunking():
                self._expect = ["BDAT"]
                return [Send(self._bdat(), bulk=True)]
            self._expect = ["DATA"]
            return [Send(b"DATA" + CRLF)]
        if self._body_sent:  # the reply to BDAT LAST: the server's word on the message
            return self._finish(outcome_for_reply(self._data, "BDAT", dest))
        if self._data.code != 354:
            return self._finish(outcome_for_reply(self._data, "DATA", dest))
        self._body_sent = True
        self.phase = "data-end"
        self._expect = ["END"]
        return [Send(dot_stuff(self.message), bulk=True)]

    def _abort_or_finish(self, outcome: Outcome) -> list[Action]:
        """Stop the transaction; if a pipelined DATA was already accepted (354), the only way
        out that delivers nothing is to drop the connection (RFC 5321: an unfinished DATA is
        discarded) -- sending '.' would deliver an empty message."""
        if self._data is not None and self._data.code == 354 and not self._body_sent:
            return self._finish(outcome, quit=False)
        return self._finish(outcome)

