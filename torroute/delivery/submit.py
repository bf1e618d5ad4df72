"""``torroute send``'s library side: a message submitted like ``sendmail(8)``, delivered over
tor with the one delivery core (:func:`torroute.delivery.client.send_message`), and the
per-recipient results turned into one sysexits status.

Pure parts (no I/O, property-tested): :func:`parse_address` / :func:`parse_recipient_args`
(sendmail's command-line recipients), :func:`read_message` (stdin with or without ``-i``),
:func:`split_headers` / :func:`prepare` (header edits on the bytes: Bcc removed, From added),
:func:`sendmail_o_option` (``-oi``, ``-oem``...), :func:`exit_status` (the precedence).
:func:`submit` routes, delivers, hands unroutable recipients to the fallback command (if one is
configured) and returns one :class:`RecipientResult` per recipient; the CLI prints them.

Why route here before :func:`send_message` routes again: the exit status must tell "no onion
route" (68), "invalid address" (65) and "the remote refused" (69) apart, and only the router's
decision says which; the recipients with a route then go to :func:`send_message` (which adds the
grouping per onion, the SRV backups and the header scrubbing of ``[deliver]``).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .. import exitcodes
from ..errors import PermanentError

__all__ = ["BadInput", "RecipientResult", "SubmitOptions", "exit_status", "parse_address",
           "parse_recipient_args", "prepare", "read_message", "sendmail_o_option",
           "split_headers", "submit"]

# per-recipient kinds (RecipientResult.kind) and their exit status
DELIVERED = "delivered"  # the onion MX said 250 (or the fallback command exited 0)
QUEUED = "queued"  # deferred, and fsynced into the --queue spool
DEFERRED = "deferred"  # temporary failure, not kept anywhere: the caller keeps the message
REFUSED = "refused"  # the remote refused it permanently (5xx), or tor said it cannot exist
BAD_ADDRESS = "bad-address"  # malformed address or invalid .onion name
NO_ROUTE = "no-route"  # no onion route (and no fallback): never sent in the clear
FALLBACK_FAILED = "fallback-failed"  # the fallback command exited with a permanent status

#: worst first: the one a caller must fix itself, then "no onion route", then the remote's no
PERMANENT_ORDER = (exitcodes.DATAERR, exitcodes.NOHOST, exitcodes.UNAVAILABLE)


class BadInput(PermanentError):
    """The submission itself is unusable (no recipient, a malformed address or message, an
    unreadable stdin); ``exit_code`` is its sysexits status.  Nothing was sent."""

    def __init__(self, message: str, exit_code: int = exitcodes.DATAERR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """One recipient's fate: ``kind`` (delivered, queued, deferred, refused, bad-address,
    no-route, fallback-failed), the RFC 3463 ``dsn`` and one line of ``text``; ``code`` is the
    exit status it stands for (a fallback command's own status for fallback-failed)."""

    recipient: str
    kind: str
    dsn: str
    text: str
    code: int

    def line(self) -> str:
        """The stderr line: ``<rcpt>: <kind> <dsn> <text>`` (one line whatever the text)."""
        return " ".join(f"{self.recipient}: {self.kind} {self.dsn} {self.text}".split())


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    """sendmail's options as plain values (the CLI builds this; the library never sees argparse).

    ``sender``: ``-f`` (None: the Sender/From header; ``""`` or ``<>``: the null sender);
    ``extract``: ``-t``; ``full_name``: ``-F`` (used for a From header added when there is
    none); ``fallback``: the ``--fallback`` command line (None: unroutable recipients are
    errors); ``recipients``: the command line's recipient arguments, unparsed."""

    sender: str | None = None
    extract: bool = False
    ignore_dots: bool = False
    full_name: str | None = None
    fallback: str | None = None
    recipients: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# addresses

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_SPECIAL_LOCAL = set(' <>()[]\\,;:@"')


def parse_address(text: str) -> str:
    """One recipient as sendmail takes it (``user@domain``, ``<user@domain>`` or
    ``Name <user@domain>``) -> ``user@domain``; raises :class:`BadInput` (65) otherwise.

    Why strict: torroute delivers nowhere locally, so a bare ``user`` has no destination, and
    an address that does not survive ``RCPT TO:<...>`` unchanged must not be sent.  The domain
    must be a host name (IDNA allowed) or an address literal; the local part may be UTF-8
    (SMTPUTF8) or a quoted string without CR/LF."""
    raw = text.strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise BadInput(f"bad address {text!r}: control characters")
    # ``Name <addr>`` or ``<addr>``: what is inside the last angle brackets; else all of it
    addr = raw[raw.rindex("<") + 1:-1].strip() if raw.endswith(">") and "<" in raw else raw
    if "@" not in addr:
        raise BadInput(f"bad address {text!r}: no @domain (torroute send delivers nothing "
                       "locally)")
    local, domain = addr.rsplit("@", 1)
    if not local or not domain:
        raise BadInput(f"bad address {text!r}: empty local part or domain")
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        pass  # a quoted string: anything printable (no CR/LF, checked above)
    elif any(c in _SPECIAL_LOCAL or c.isspace() for c in local) or local.startswith(".") \
            or local.endswith(".") or ".." in local:
        raise BadInput(f"bad address {text!r}: the local part {local!r} needs quoting")
    if domain.startswith("[") and domain.endswith("]"):
        return f"{local}@{domain}"  # an address literal: the router says no onion route
    name = domain[:-1] if domain.endswith(".") else domain
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise BadInput(f"bad address {text!r}: {domain!r} is not a domain name") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise BadInput(f"bad address {text!r}: {domain!r} is not a domain name")
    return f"{local}@{name}"


def parse_recipient_args(args: Iterable[str]) -> list[str]:
    """The command line's recipients: each argument may hold a comma-separated list (as
    sendmail allows); each address is checked by :func:`parse_address`; duplicates dropped."""
    from email.utils import getaddresses

    found: list[str] = []
    for arg in args:
        if "," in arg and '"' not in arg:
            parts = [p for p in (x.strip() for x in arg.split(",")) if p]
        elif "," in arg:
            parts = [f"{n} <{a}>" if n else a for n, a in getaddresses([arg])]
        else:
            parts = [arg]
        if not parts:
            raise BadInput(f"bad address {arg!r}: empty")
        found.extend(parse_address(p) for p in parts)
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------------------------------------
# the message

def read_message(data: bytes, ignore_dots: bool) -> bytes:
    """sendmail's end of input: without ``-i`` a line holding only ``.`` ends the message
    (what follows is not read into it); with ``-i`` (``-oi``) only the end of input does."""
    if ignore_dots:
        return data
    match = re.search(rb"(?:\A|\n)\.\r?(?:\n|\Z)", data)
    if match is None:
        return data
    return data[:match.start() + (1 if match.group().startswith(b"\n") else 0)]


_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")


def split_headers(message: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its continuation lines and line end) and the rest (the
    empty line and the body); raises :class:`BadInput` for a message that has no header
    block, a line that is neither a field nor a continuation, or is empty."""
    if not message.strip():
        raise BadInput("empty message")
    fields: list[bytes] = []
    pos = 0
    lineno = 0
    while pos < len(message):
        end = message.find(b"\n", pos)
        end = len(message) if end < 0 else end + 1
        line = message[pos:end]
        lineno += 1
        if line in (b"\n", b"\r\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise BadInput("message line 1 is a continuation line: no header field "
                               "before it")
            fields[-1] += line
        elif _FIELD.match(line):
            fields.append(line)
        else:
            raise BadInput(f"message line {lineno} is neither a header field nor the empty "
                           "line that ends the header (a message needs a header, then an "
                           "empty line, then the body)")
        pos = end
    if not fields:
        raise BadInput("message has no header fields")
    return fields, message[pos:]


def field_name(raw_field: bytes) -> str:
    return raw_field.split(b":", 1)[0].strip().decode("ascii").lower()


def header_addresses(fields: Sequence[bytes], names: Sequence[str]) -> list[str]:
    """The addresses of the named header fields (RFC 2047 words decoded), as
    :func:`parse_address` accepts them; a malformed one raises :class:`BadInput`."""
    from email.header import decode_header, make_header
    from email.utils import getaddresses

    values = []
    for raw in fields:
        if field_name(raw) in names:
            value = raw.split(b":", 1)[1].decode("utf-8", "replace")
            value = " ".join(value.split())
            try:
                value = str(make_header(decode_header(value)))
            except (ValueError, LookupError):
                pass
            values.append(value)
    return [parse_address(addr) for _, addr in getaddresses(values) if addr]


def _from_field(full_name: str | None, sender: str) -> bytes:
    """``From: NAME <sender>``: the name RFC 2047-encoded when it is not ASCII (UTF-8 as is
    only when the address itself needs SMTPUTF8)."""
    from email.headerregistry import Address
    from email.message import EmailMessage
    from email.policy import SMTPUTF8, default

    policy = default if sender.isascii() else SMTPUTF8
    msg = EmailMessage(policy=policy.clone(linesep="\n"))
    if full_name:
        local, _, domain = sender.rpartition("@")
        try:
            msg["From"] = Address(display_name=full_name, username=local, domain=domain)
        except (ValueError, IndexError):
            msg["From"] = sender
    else:
        msg["From"] = sender
    return msg.as_bytes().split(b"\n\n", 1)[0] + b"\n"


@dataclass
class Prepared:
    """The message as it goes out, its envelope sender and all its recipients."""

    data: bytes
    sender: str
    recipients: list[str] = field(default_factory=list)


def prepare(raw: bytes, options: SubmitOptions) -> Prepared:
    """Read the submission like sendmail: recipients from the command line, plus To/Cc/Bcc
    with ``-t``; Bcc and Resent-Bcc removed from the transmitted header (always: a Bcc header
    is never meant for the recipients); a From header added from the sender (and ``-F``)
    when there is none.  The sender: ``-f``, else the Sender header, else From."""
    message = read_message(raw, options.ignore_dots)
    fields, rest = split_headers(message)
    recipients = parse_recipient_args(options.recipients)
    if options.extract:
        recipients = list(dict.fromkeys(recipients + header_addresses(fields,
                                                                      ("to", "cc", "bcc"))))
    if not recipients:
        raise BadInput("no recipients (give them as arguments, or -t for To/Cc/Bcc)",
                       exitcodes.USAGE)
    if options.sender is not None:
        sender = options.sender.strip()
        if sender not in ("", "<>"):
            sender = parse_address(sender)
        else:
            sender = ""
    else:
        found = header_addresses(fields, ("sender",)) or header_addresses(fields, ("from",))
        if not found:
            raise BadInput("no sender: give -f ADDRESS or a From header", exitcodes.USAGE)
        sender = found[0]
    kept = [f for f in fields if field_name(f) not in ("bcc", "resent-bcc")]
    if not any(field_name(f) == "from" for f in kept):
        if not sender:
            raise BadInput("no From header and the null sender: give -f ADDRESS or a From "
                           "header", exitcodes.USAGE)
        kept.insert(0, _from_field(options.full_name, sender))
    if not rest:  # a header-only message: end the header
        rest = b"\n"
    return Prepared(b"".join(kept) + rest, sender, recipients)


# ---------------------------------------------------------------------------------------------
# command-line leftovers of sendmail

#: ``-o`` values mail clients pass that change nothing here (``-oi`` is ``-i``)
IGNORED_O = ("em", "ee", "ep", "eq", "ew", "m", "di", "db", "dq", "dd", "dbackground",
             "dinteractive")


def sendmail_o_option(value: str) -> str | None:
    """A ``-oX`` value -> ``"i"`` (ignore dots), None (harmless: ignored), or raises
    :class:`BadInput` (64) for one that would change what a sendmail does with the mail."""
    if value in ("i", "i=true", "i=True", "IgnoreDots", "IgnoreDots=true"):
        return "i"
    if value in IGNORED_O or value.startswith(("e", "d", "m", "Ctrue", "O")):
        return None
    raise BadInput(f"unsupported sendmail option -o{value}", exitcodes.USAGE)


# ---------------------------------------------------------------------------------------------
# the exit status

def exit_status(results: Iterable[RecipientResult]) -> int:
    """One status for all recipients.  Precedence: 75 if any recipient is deferred and not
    queued (the caller must keep the message: a permanent status would make it drop a message
    that one recipient has not got yet); else the worst permanent status (65 bad address, 68
    no onion route, 69 refused; a fallback command's own status after those); else 0."""
    codes = [r.code for r in results]
    if exitcodes.TEMPFAIL in codes:
        return exitcodes.TEMPFAIL
    for code in PERMANENT_ORDER:
        if code in codes:
            return code
    failed = [c for c in codes if c != exitcodes.OK]
    return failed[0] if failed else exitcodes.OK


# ---------------------------------------------------------------------------------------------
# delivery

def fallback_argv(command: str) -> list[str]:
    """The fallback command line, checked before anything is sent (an operator mistake must
    stop the submission, never send the mail elsewhere): split like a shell would, the
    program an executable path or on PATH."""
    from ..errors import ConfigError

    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"--fallback {command!r}: {exc}") from None
    if not argv:
        raise ConfigError("--fallback: empty command")
    if shutil.which(argv[0]) is None:
        raise ConfigError(f"--fallback {command!r}: {argv[0]} is not an executable")
    return argv


def run_fallback(argv: Sequence[str], sender: str, recipients: Sequence[str], data: bytes,
                 timeout: float = 600.0) -> list[RecipientResult]:
    """``CMD -i -f SENDER -- RCPT...`` with the message on stdin; its status counts for those
    recipients (0 handed over, 75 deferred, any other permanent)."""
    cmd = [*argv, "-i", "-f", sender or "<>", "--", *recipients]
    where = " ".join(shlex.quote(a) for a in argv)
    try:
        proc = subprocess.run(cmd, input=data, timeout=timeout, stdout=subprocess.DEVNULL)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        return [RecipientResult(r, DEFERRED, "4.4.7", f"no onion route; fallback {where} "
                                f"timed out after {timeout:g}s: try again later",
                                exitcodes.TEMPFAIL) for r in recipients]
    except OSError as exc:
        return [RecipientResult(r, DEFERRED, "4.3.0", f"no onion route; fallback {where} "
                                f"did not run: {exc}", exitcodes.TEMPFAIL) for r in recipients]
    if code == 0:
        kind, dsn, text, status = DELIVERED, "2.0.0", "handed over", exitcodes.OK
    elif code == exitcodes.TEMPFAIL:
        kind, dsn, text, status = DEFERRED, "4.0.0", "deferred", exitcodes.TEMPFAIL
    else:
        code = code if code > 0 else exitcodes.UNAVAILABLE  # killed by a signal
        kind, dsn, text, status = FALLBACK_FAILED, "5.0.0", "refused", code
    return [RecipientResult(r, kind, dsn, f"no onion route; fallback {where} {text} "
                            f"(exit {proc.returncode})", status) for r in recipients]


def _of_send_result(rcpt: str, result) -> RecipientResult:
    if result.delivered:
        return RecipientResult(rcpt, DELIVERED, result.dsn, result.text, exitcodes.OK)
    if result.temporary:
        return RecipientResult(rcpt, DEFERRED, result.dsn, result.text, exitcodes.TEMPFAIL)
    return RecipientResult(rcpt, REFUSED, result.dsn, result.text, exitcodes.UNAVAILABLE)


def submit(data: bytes, sender: str, recipients: Sequence[str], config, *,
           fallback: Sequence[str] | None = None) -> list[RecipientResult]:
    """Route each recipient and deliver ``data`` (LF or CRLF lines) over tor; one result per
    recipient, in order.  No onion route: an error (68, "never sent in the clear") or, with
    ``fallback`` (an argv from :func:`fallback_argv`), handed to that command."""
    from ..protocols.smtp import BOUNCED
    from ..routing.router import NoRoute, Reject, Route, Router, TempFail
    from .client import NOT_SENT, send_message

    router = Router(config)
    results: dict[str, RecipientResult] = {}
    routed: list[str] = []
    unrouted: list[str] = []
    for rcpt in recipients:
        decision = router.route(rcpt)
        if isinstance(decision, Route):
            routed.append(rcpt)
        elif isinstance(decision, Reject):
            results[rcpt] = RecipientResult(rcpt, BAD_ADDRESS, "5.1.2",
                                            f"{decision.domain}: {decision.reason}",
                                            exitcodes.DATAERR)
        elif isinstance(decision, TempFail):
            results[rcpt] = RecipientResult(rcpt, DEFERRED, "4.4.3",
                                            f"route for {decision.domain} unknown now: "
                                            f"{decision.reason}; not sent, try again later",
                                            exitcodes.TEMPFAIL)
        elif isinstance(decision, NoRoute) and fallback:
            unrouted.append(rcpt)
        else:
            results[rcpt] = RecipientResult(rcpt, NO_ROUTE, "5.4.4",
                                            f"no onion route for {decision.domain or '(none)'}"
                                            f": {decision.reason}; {NOT_SENT}",
                                            exitcodes.NOHOST)
    if routed:
        sent = send_message(data, sender, routed, config=config)
        for rcpt, result in sent.items():
            if result.status == BOUNCED and result.dsn == "5.4.4" and NOT_SENT in result.text:
                # the route went away between the two lookups: still never sent in the clear
                results[rcpt] = RecipientResult(rcpt, NO_ROUTE, result.dsn, result.text,
                                                exitcodes.NOHOST)
            else:
                results[rcpt] = _of_send_result(rcpt, result)
    if unrouted and fallback:
        for result in run_fallback(fallback, sender, unrouted, data):
            results[result.recipient] = result
    return [results[r] for r in recipients]


def stdin_bytes(stream) -> bytes:
    """All of stdin as bytes; an unreadable one is :class:`BadInput` 66 (EX_NOINPUT)."""
    if stream is None:  # Python sets sys.stdin to None when fd 0 is closed
        raise BadInput("cannot read the message from stdin: no stdin (fd 0 is closed)",
                       exitcodes.NOINPUT)
    try:
        return stream.read()
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read the message from stdin: {exc}", exitcodes.NOINPUT) from None
