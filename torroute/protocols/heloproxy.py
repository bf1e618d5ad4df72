"""The tor-smtp HELO proxy (``torroute proxy``), pure: bytes in, actions out.

The 2006 tor-smtp (Exim FAQ) let any MTA that can set a per-destination HELO string deliver to
onions: the MTA connects to a local port and says ``EHLO <local-name> <destination>``; the proxy
routes the destination, connects through tor, checks the remote greeting (421 unless 220), sends
``EHLO <local-name>`` itself and from then on copies bytes both ways, so the remote's answer to
that EHLO is the answer the MTA gets.  :class:`HeloProxy` is that handshake and the splice; the
drivers (:mod:`torroute.proxy.session`) only move bytes, route, dial and enforce deadlines.

What it does better than the original:

* the destination may be an ordinary domain, routed by torroute (pins, SRV); the driver
  reports the :mod:`~torroute.routing.decisions` answer to :meth:`HeloProxy.routed` and every
  answer but a route is ``421`` with the reason: the proxy has no clear-net path at all (or,
  ``defer_at="rcpt"``, ``451`` to each RCPT: an MTA files that under the address, not the
  proxy's host -- see :class:`HeloProxy`);
* ``EHLO`` and ``HELO`` are both accepted (the remote gets the same verb);
* **STARTTLS never passes through.**  The proxy's handshake is a one-off: it reads one EHLO
  from the MTA, sends one to the remote, and then only copies.  After STARTTLS the MTA would
  start TLS and send EHLO again *inside* TLS -- with its own name only, without the destination
  word, through a stream the proxy can no longer read -- and the remote would see a TLS session
  set up by the MTA for a host name it never connected to (``localhost``).  So the keyword is
  taken out of the relayed EHLO answers (the remote's other lines pass byte for byte), and a
  STARTTLS the MTA sends anyway is answered ``454`` by the proxy itself, in order with the
  pipelined replies, and never reaches the remote.  Onion services are end-to-end encrypted
  and authenticated by their address already.
* every wait has a deadline (:attr:`HeloProxy.waiting` names it for the driver).

To filter STARTTLS only where it is a command, the splice follows the client's side of the
dialogue: command lines (each owes one reply), the message after a ``354`` (until
``CRLF.CRLF``), ``BDAT`` chunks (by their size) and the line after a ``334`` (an AUTH
response); replies are paired with their commands in order (RFC 2920 pipelining keeps it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..errors import ProtocolError
from .smtp import Reply, ReplyParser

CRLF = b"\r\n"
#: a command line longer than this (without its CRLF) is not SMTP; in the handshake it is an
#: error, in the splice it is passed on (it cannot be STARTTLS)
MAX_LINE = 4096
#: bytes the client may send before the splice (pipelined after its EHLO) before it is refused
MAX_EARLY = 65536
MAX_ERRORS = 3  # bad commands before the EHLO ... -> 421

# what the machine waits for (the driver's deadline for it); DEFERRING: the session failed
# and the proxy answers the client itself, 451 to every RCPT (``defer_at="rcpt"``)
CLIENT, ROUTE, CONNECT, REMOTE, SPLICE, DEFERRING, CLOSED = (
    "client", "route", "connect", "remote", "splice", "deferring", "closed")
#: where a failed session is refused: 421 to the EHLO (the FAQ's way) or 451 to each RCPT
DEFER_AT = ("ehlo", "rcpt")


# ---- actions for the driver


@dataclass(frozen=True, slots=True)
class ToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class ToRemote:
    data: bytes


@dataclass(frozen=True, slots=True)
class Route:
    """Route ``request.destination``, then call :meth:`HeloProxy.routed` with the decision."""

    request: HeloRequest


@dataclass(frozen=True, slots=True)
class Connect:
    """Dial the targets in order through tor (SRV order; the first is the route's own); call
    :meth:`HeloProxy.connected` once one is connected, :meth:`HeloProxy.refuse` if none is."""

    targets: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class RemoteFailed:
    """The connected remote is unusable before the splice (greeting not 220, closed, garbage):
    close it; dial the next target and call :meth:`HeloProxy.connected` again, or call
    :meth:`HeloProxy.refuse` with this reason."""

    reason: str


@dataclass(frozen=True, slots=True)
class Spliced:
    """The handshake is done: from now on bytes flow both ways (for the log)."""

    reply: Reply  # the remote's answer to the proxy's EHLO, as relayed


@dataclass(frozen=True, slots=True)
class Close:
    """Flush what was sent, then close both connections."""

    reason: str
    error: bool = False  # True: the session failed (the 421 cases), for the log level


Action = ToClient | ToRemote | Route | Connect | RemoteFailed | Spliced | Close


# ---- the client's EHLO line


@dataclass(frozen=True, slots=True)
class HeloRequest:
    verb: str  # "EHLO" | "HELO"
    local_name: str  # the name to present to the remote
    destination: str  # the domain (or onion) to route


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def valid_name(name: str) -> bool:
    """A host name or onion to put into EHLO / route: letters, digits, ``.-_``, at most 255
    characters, labels of at most 63, or an address literal ``[...]``."""
    if not name or len(name) > 255:
        return False
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        return bool(inner) and all(c.isalnum() or c in ".:" for c in inner) and inner.isascii()
    if not set(name) <= _NAME_CHARS:
        return False
    labels = name.rstrip(".").split(".")
    return all(0 < len(label) <= 63 for label in labels)


def parse_helo(line: bytes) -> HeloRequest | bytes:
    """One command line (without CRLF) before the handshake: the request, or the reply to
    send (bytes, with CRLF) when it is not ``EHLO|HELO <local-name> <destination>``."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return b"500 5.5.2 command line is not ASCII\r\n"
    words = text.split()
    verb = words[0].upper() if words else ""
    if verb not in ("EHLO", "HELO"):
        return b"503 5.5.1 EHLO <local-name> <destination> first\r\n"
    if len(words) != 3:
        return (b"501 5.5.4 expected " + verb.encode() +
                b" <local-name> <destination>: this is a tor-smtp proxy, the destination "
                b"comes after the name\r\n")
    local, destination = words[1], words[2]
    if not valid_name(local):
        return b"501 5.5.4 local name is not a host name\r\n"
    if not valid_name(destination.rsplit("@", 1)[-1]):
        return b"501 5.5.4 destination is not a domain\r\n"
    return HeloRequest(verb, local, destination)


# ---- replies, raw


class RawReplies:
    """Splits the remote's stream into whole replies, keeping each one's exact bytes (to relay
    them unchanged); the one :class:`~torroute.protocols.smtp.ReplyParser` checks them."""

    def __init__(self) -> None:
        self._parser = ReplyParser()
        self._buffer = bytearray()
        self._raw: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[Reply, list[bytes]]]:
        """Complete replies with their raw lines (each ending in its LF); raises ProtocolError
        on what is not SMTP."""
        self._buffer += data
        out: list[tuple[Reply, list[bytes]]] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._raw.append(line)
            replies = self._parser.feed(line)
            if replies:
                out.append((replies[0], self._raw))
                self._raw = []
        if len(self._buffer) > MAX_LINE * 16:
            raise ProtocolError("reply line too long")
        return out

    @property
    def pending(self) -> bool:
        return bool(self._buffer or self._raw)


def strip_starttls(raw_lines: list[bytes]) -> list[bytes]:
    """An EHLO answer without its STARTTLS line; every other line byte for byte, except that
    the new last line ends the reply (``250-X`` -> ``250 X``) when the old last one went."""
    kept = [raw_lines[0]] + [ln for ln in raw_lines[1:] if _keyword(ln) != b"STARTTLS"]
    if len(kept) == len(raw_lines):
        return raw_lines
    last = kept[-1]
    if last[3:4] == b"-":
        kept[-1] = last[:3] + b" " + last[4:]
    return kept


def _keyword(raw_line: bytes) -> bytes:
    words = raw_line[4:].split(None, 1)
    return words[0].upper() if words else b""


STARTTLS_REFUSED = (b"454 4.7.0 STARTTLS is not available through the torroute proxy "
                    b"(set hosts_avoid_tls = * for it)\r\n")


class Splice:
    """The bytes between the MTA and the remote after the handshake, followed just enough to
    keep STARTTLS out (see the module docstring).  ``from_client``/``from_remote`` return the
    actions: mostly the same bytes, the other way."""

    def __init__(self) -> None:
        self._mode = "command"  # command | data_wait | data | bdat | auth
        self._line = bytearray()  # a command line being read
        self._long = False  # inside an over-long line (passed on as it comes)
        self._held = bytearray()  # client bytes waiting for the reply to DATA
        self._tail = b""  # the last bytes of message data (to find CRLF.CRLF across reads)
        self._bdat_left = 0
        self._owed: deque[str | bytes] = deque()  # per reply owed: the verb, or a local reply
        self._replies = RawReplies()
        self.quit_sent = False

    # -- client -> remote
    def from_client(self, data: bytes) -> list[Action]:
        actions: list[Action] = []
        out = bytearray()
        view = memoryview(data)
        while view:
            if self._mode == "data_wait":
                self._held += view
                break
            if self._mode == "data":
                view = self._data(view, out)
            elif self._mode == "bdat":
                n = min(self._bdat_left, len(view))
                out += view[:n]
                self._bdat_left -= n
                view = view[n:]
                if not self._bdat_left:
                    self._mode = "command"
            else:
                view = self._command_bytes(view, out, actions)
        if len(self._held) > MAX_EARLY:
            raise ProtocolError("client sent too much before the reply to DATA")
        if out:
            actions.append(ToRemote(bytes(out)))
        return _merge(actions)

    def _data(self, view: memoryview, out: bytearray) -> memoryview:
        window = self._tail + bytes(view[:8192])
        end = window.find(b"\r\n.\r\n")
        if end < 0:
            n = min(len(view), 8192)
            out += view[:n]
            self._tail = (self._tail + bytes(view[:n]))[-4:]
            return view[n:]
        cut = end + 5 - len(self._tail)  # bytes of ``view`` up to and with the final CRLF
        out += view[:cut]
        self._owed.append(".")
        self._mode, self._tail = "command", b""
        return view[cut:]

    def _command_bytes(self, view: memoryview, out: bytearray,
                       actions: list[Action]) -> memoryview:
        end = bytes(view[: MAX_LINE + 2]).find(b"\n")
        if self._long:  # the rest of an over-long line: pass it on
            if end < 0:
                out += view
                return view[len(view):]
            out += view[: end + 1]
            self._long = False
            self._owed.append("?")
            return view[end + 1:]
        if end < 0:
            self._line += view
            if len(self._line) > MAX_LINE:
                out += self._line
                self._line.clear()
                self._long = True
            return view[len(view):]
        self._line += view[: end + 1]
        line, self._line = bytes(self._line), bytearray()
        rest = view[end + 1:]
        if self._mode == "auth":  # the answer to a 334: not a command
            self._mode = "command"
            out += line
            self._owed.append("AUTH")
            return rest
        words = line.split(None, 2)
        verb = words[0].upper().decode("ascii", "replace") if words else ""
        if verb == "STARTTLS" and len(words) == 1:
            if out:  # keep the order: what came before goes first
                actions.append(ToRemote(bytes(out)))
                out.clear()
            if self._owed:
                self._owed.append(STARTTLS_REFUSED)
            else:
                actions.append(ToClient(STARTTLS_REFUSED))
            return rest
        out += line
        self._owed.append(verb)
        if verb == "DATA":
            self._mode = "data_wait"
        elif verb == "BDAT" and len(words) > 1 and words[1].isdigit():
            self._bdat_left = int(words[1])
            self._mode = "bdat" if self._bdat_left else "command"
        elif verb == "QUIT":
            self.quit_sent = True
        return rest

    # -- remote -> client
    def from_remote(self, data: bytes) -> list[Action]:
        actions: list[Action] = []
        for reply, raw in self._replies.feed(data):
            verb = self._owed.popleft() if self._owed else ""
            if verb in ("EHLO", "HELO") and reply.code == 250:
                raw = strip_starttls(raw)
            actions.append(ToClient(b"".join(raw)))
            while self._owed and isinstance(self._owed[0], bytes):
                actions.append(ToClient(self._owed.popleft()))  # type: ignore[arg-type]
            if reply.code == 334:
                self._mode = "auth"
            if verb == "DATA" and self._mode == "data_wait":
                held, self._held = bytes(self._held), bytearray()
                if reply.code == 354:
                    self._mode, self._tail = "data", CRLF  # DATA's own CRLF ends a line
                else:
                    self._mode = "command"
                actions.extend(self.from_client(held) if held else [])
        return _merge(actions)

    @property
    def replies_owed(self) -> bool:
        """The client waits for a reply from the remote (a timeout then is the remote's)."""
        return any(isinstance(item, str) for item in self._owed) or self._mode == "data_wait"


def _merge(actions: list[Action]) -> list[Action]:
    """Adjacent writes to the same side as one write."""
    merged: list[Action] = []
    for action in actions:
        if merged and type(action) is type(merged[-1]) and isinstance(action,
                                                                       ToClient | ToRemote):
            merged[-1] = type(action)(merged[-1].data + action.data)
        else:
            merged.append(action)
    return merged


# ---- the whole session


class HeloProxy:
    """One MTA connection: greeting, the client's EHLO line, routing, the remote's greeting and
    EHLO, then :class:`Splice`.

    ``helo_name`` (the original's first program argument) replaces the client's first word;
    ``banner`` is the name in the proxy's own 220 (the MTA sees only that).

    ``defer_at``: how a session that cannot be spliced (no onion route, tor failed, remote
    greeting not 220, a deadline) is refused.  ``"ehlo"``: ``421`` to the client's EHLO and
    close, as the original did.  ``"rcpt"``: the proxy answers the EHLO itself (``250``) and
    every ``RCPT`` with ``451`` and the same reason.  Why: an MTA files a 421 to EHLO under the
    *host* -- Exim then holds back every message for the proxy's host:port, for every
    destination, until the host's retry time ("retry time not reached for any host") -- while
    a 451 to RCPT is filed under that address only.
    """

    def __init__(self, banner: str = "localhost", helo_name: str | None = None,
                 defer_at: str = "ehlo") -> None:
        if defer_at not in DEFER_AT:
            raise ValueError(f"defer_at: expected one of {DEFER_AT}")
        self.banner = banner
        self.helo_name = helo_name
        self.defer_at = defer_at
        self.failure: str | None = None  # why the session was refused (for the log)
        self.waiting = CLIENT
        self.request: HeloRequest | None = None
        self.splice: Splice | None = None
        self._line = bytearray()
        self._early = bytearray()  # client bytes after its EHLO line, before the splice
        self._errors = 0
        self._remote: RawReplies | None = None
        self._greeted = False
        self._deferral = b""

    def start(self) -> list[Action]:
        return [ToClient(f"220 {self.banner} ESMTP torroute proxy\r\n".encode())]

    # -- the client
    def client_data(self, data: bytes) -> list[Action]:
        if self.waiting == CLOSED:
            return []
        if self.waiting == SPLICE:
            return self._splice_call(self.splice.from_client, data)
        if self.waiting == DEFERRING:
            return self._deferring(data)
        if self.waiting != CLIENT:
            self._early += data
            if len(self._early) > MAX_EARLY:
                return self._refuse("4.5.0", "client sent too much before the handshake was "
                                    "done")
            return []
        self._line += data
        actions: list[Action] = []
        while self.waiting == CLIENT and (end := self._line.find(b"\n")) >= 0:
            line = bytes(self._line[:end]).rstrip(b"\r")
            del self._line[: end + 1]
            actions += self._command(line)
        if self.waiting == CLIENT and len(self._line) > MAX_LINE:
            actions += self._refuse("5.5.2", "command line too long")  # 421 all the same
        elif self.waiting not in (CLIENT, CLOSED):
            self._early += self._line
            self._line.clear()
        return actions

    def _command(self, line: bytes) -> list[Action]:
        verb = line.split(None, 1)[0].upper() if line.strip() else b""
        if verb == b"QUIT":
            self.waiting = CLOSED
            return [ToClient(b"221 2.0.0 bye\r\n"), Close("client quit before EHLO")]
        if verb in (b"NOOP", b"RSET"):
            return [ToClient(b"250 2.0.0 ok\r\n")]
        parsed = parse_helo(line)
        if isinstance(parsed, bytes):
            self._errors += 1
            if self._errors >= MAX_ERRORS:
                return [ToClient(parsed)] + self._refuse("4.7.0", "too many errors")
            return [ToClient(parsed)]
        if self.helo_name:
            parsed = HeloRequest(parsed.verb, self.helo_name, parsed.destination)
        self.request = parsed
        self.waiting = ROUTE
        return [Route(parsed)]

    def client_eof(self) -> list[Action]:
        if self.waiting == CLOSED:
            return []
        failed = self.waiting == DEFERRING
        self.waiting = CLOSED
        return [Close(self.failure if failed else "client closed the connection", failed)]

    # -- routing and dialing
    def routed(self, decision) -> list[Action]:
        """The router's answer for the destination (a routing.decisions object)."""
        if self.waiting != ROUTE:
            return []
        destination = self.request.destination
        kind = getattr(decision, "kind", "")
        if kind == "route":
            self.waiting = CONNECT
            targets = ((decision.onion, decision.port), *decision.alternatives)
            return [Connect(tuple(targets))]
        reason = getattr(decision, "reason", "no decision")
        if kind == "noroute":
            return self._refuse("4.4.4", f"{destination}: no onion route ({reason}); the "
                                "proxy never uses the clear net")
        if kind == "reject":
            return self._refuse("4.1.2", f"{destination}: {reason}")
        return self._refuse("4.4.3", f"{destination}: route unknown now ({reason})")

    def connected(self) -> list[Action]:
        """A target is connected (again, after a :class:`RemoteFailed`): read its greeting."""
        if self.waiting not in (CONNECT, REMOTE):
            return []
        self.waiting = REMOTE
        self._remote = RawReplies()
        self._greeted = False
        return []

    def refuse(self, reason: str, dsn: str = "4.4.1") -> list[Action]:
        """The driver gives up (tor failed, no target reached, a deadline): 421 and close.
        In the splice the 421 goes only to a client that waits for a reply."""
        if self.waiting == CLOSED:
            return []
        if self.waiting == SPLICE and not self.splice.replies_owed:
            self.waiting = CLOSED
            return [Close(reason)]
        return self._refuse(dsn, reason)

    def _refuse(self, dsn: str, reason: str) -> list[Action]:
        reason = reason.replace("\r", " ").replace("\n", " ")
        self.failure = reason
        if self.defer_at == "rcpt" and self.waiting in (ROUTE, CONNECT, REMOTE):
            self.waiting = DEFERRING
            self._deferral = f"451 {dsn} torroute proxy: {reason}".encode("utf-8", "replace")
            early, self._early = bytes(self._early), bytearray()
            greeting = ToClient(f"250 {self.banner} torroute proxy: every RCPT will be "
                                f"deferred\r\n".encode())
            return _merge([greeting, *self._deferring(early)])
        self.waiting = CLOSED
        text = f"421 {dsn} torroute proxy: {reason}"
        return [ToClient(text.encode("utf-8", "replace") + CRLF), Close(reason, error=True)]

    def _deferring(self, data: bytes) -> list[Action]:
        """The failed session's own answers: 451 to each RCPT, nothing ever relayed."""
        self._line += data
        actions: list[Action] = []
        while self.waiting == DEFERRING and (end := self._line.find(b"\n")) >= 0:
            line = bytes(self._line[:end]).rstrip(b"\r")
            del self._line[: end + 1]
            verb = line.split(None, 1)[0].upper() if line.strip() else b""
            if verb == b"QUIT":
                self.waiting = CLOSED
                actions += [ToClient(b"221 2.0.0 bye\r\n"), Close(self.failure, error=True)]
            elif verb == b"RCPT":
                actions.append(ToClient(self._deferral + CRLF))
            elif verb in (b"MAIL", b"RSET", b"NOOP", b"EHLO", b"HELO"):
                actions.append(ToClient(b"250 2.0.0 ok\r\n"))
            elif verb in (b"DATA", b"BDAT"):
                actions.append(ToClient(b"554 5.5.1 no valid recipients\r\n"))
            else:
                actions.append(ToClient(b"502 5.5.1 not available: " + self._deferral[4:]
                                        + CRLF))
        if self.waiting == DEFERRING and len(self._line) > MAX_LINE:
            self.waiting = CLOSED
            actions += [ToClient(b"421 4.5.0 torroute proxy: line too long\r\n"),
                        Close(self.failure, error=True)]
        return _merge(actions)

    # -- the remote
    def remote_data(self, data: bytes) -> list[Action]:
        if self.waiting == SPLICE:
            return self._splice_call(self.splice.from_remote, data)
        if self.waiting != REMOTE:
            return []
        try:
            replies = self._remote.feed(data)
        except ProtocolError as exc:
            return [RemoteFailed(f"remote is not speaking SMTP: {exc}")]
        actions: list[Action] = []
        for index, (reply, raw) in enumerate(replies):
            if not self._greeted:
                if reply.code != 220:
                    return [RemoteFailed(f"remote greeting: {reply.text()}")]
                self._greeted = True
                actions.append(ToRemote(f"{self.request.verb} {self.request.local_name}"
                                        .encode() + CRLF))
                continue
            if self.request.verb == "EHLO" and reply.code == 250:
                raw = strip_starttls(raw)
            self.waiting = SPLICE
            self.splice = Splice()
            actions += [ToClient(b"".join(raw)), Spliced(reply)]
            extra = b"".join(b"".join(r) for _, r in replies[index + 1:])
            if extra:
                actions += self.remote_data(extra)
            early, self._early = bytes(self._early), bytearray()
            if early:
                actions += self.client_data(early)
            return _merge(actions)
        return actions

    def remote_eof(self) -> list[Action]:
        if self.waiting == REMOTE:
            return [RemoteFailed("remote closed the connection before "
                                 + ("its EHLO answer" if self._greeted else "greeting"))]
        if self.waiting == SPLICE:
            if self.splice.replies_owed and not self.splice.quit_sent:
                return self._refuse("4.4.2", "remote closed the connection")
            self.waiting = CLOSED
            return [Close("remote closed the connection")]
        return []

    def timed_out(self) -> list[Action]:
        """The deadline of :attr:`waiting` passed."""
        if self.waiting == DEFERRING:
            self.waiting = CLOSED
            return [ToClient(b"421 4.4.2 torroute proxy: timeout\r\n"),
                    Close(self.failure, error=True)]
        what = {CLIENT: "no EHLO from the client", ROUTE: "routing timed out",
                CONNECT: "connect through tor timed out",
                REMOTE: "the remote did not answer in time",
                SPLICE: "the remote did not answer in time" if self.splice and
                self.splice.replies_owed else "idle timeout"}.get(self.waiting, "")
        if self.waiting == CLOSED:
            return []
        return self.refuse(what, "4.4.2")

    def _splice_call(self, method, data: bytes) -> list[Action]:
        try:
            return method(data)
        except ProtocolError as exc:
            return self._refuse("4.5.0", f"protocol error in the relayed session: {exc}")
