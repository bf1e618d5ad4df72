"""DNS over UDP for many questions at once: one socket per nameserver, answers matched by id.

dnspython's ``asyncquery.udp`` opens, connects and closes a socket (and an asyncio endpoint)
for every question; on a cold cache that, not the resolver, was the daemon's ceiling.  Here
every question in flight to one nameserver shares one connected UDP socket:

* :class:`QueryTable` (pure, no I/O): gives each question a random unused id, and takes
  datagrams in.  A datagram resolves a question only if it parses, has the QR bit, that id,
  the same opcode and the same question (dnspython's ``Message.is_response``); everything
  else -- garbage, unknown or reused ids, other questions, a second copy -- is counted and
  ignored, so a stray or forged datagram can at worst be dropped, never answer the wrong
  question.  A truncated answer that does not parse whole still counts when its header and
  question match: the caller retries that question over TCP.
* :class:`UdpNameserver` (the asyncio driver): the socket, the per-question deadline, and the
  socket's life.  The socket is connected, so the kernel drops datagrams from any other
  address and an ICMP "port unreachable" fails the questions at once (``ECONNREFUSED``)
  instead of after the timeout; the source address is checked again anyway.  The socket (and
  its source port) is replaced after :data:`ROTATE_AFTER` questions, and closed when it has
  been idle for :data:`LINGER` seconds or its event loop ends.

dnspython stays the message codec for anything unusual (``from_wire``; ``make_query``).
Only the one query shape the router sends for a plain letters-digits-hyphen name is rendered
here (:func:`encode_query`, tested byte for byte against dnspython's rendering), because
rendering was a third of the cost; and with ``QueryTable(fast=True)`` (the asyncio driver's)
plain answers are read by :mod:`torroute.routing.dns_wire`, which declines EDNS, DNSSEC
records, truncation and anything else unusual to dnspython: from_wire was the largest cost
left (75 us per SRV answer, 28 per NXDOMAIN; the small decoder: 8 and 4).
TCP (only after TC) and the nameserver order are the router's
(:class:`torroute.routing.router.SrvLookup`).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.flags
import dns.message

from .dns_wire import Response, decode

#: questions in flight on one socket before another one is opened (ids are 16 bits)
CAPACITY = 4096
#: questions sent from one socket (one source port) before it is replaced
ROTATE_AFTER = 20_000
#: seconds an idle socket stays open for the next question
LINGER = 5.0
#: seconds before an unanswered question is sent again (same id; then twice as long each
#: time, until the deadline): a lost datagram costs a second, not the whole timeout
RETRANSMIT = 1.0

_TC = dns.flags.TC  # in the second header byte: (flags >> 8) & 0x02 of the 16-bit flags field


_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
#: what dnspython's make_query(want_dnssec=True) adds: an OPT record, payload 1232, DO
_OPT_DO = b"\x00" + struct.pack("!HHIH", 41, 1232, 0x8000, 0)


def encode_query(name: str, rdtype: int, flags: int, dnssec: bool) -> bytes | None:
    """The wire bytes (id 0) of a one-question IN query, exactly as dnspython's ``make_query``
    (``want_dnssec=dnssec``) then ``to_wire`` renders them; None when the name is not plain
    ASCII letters, digits, ``-`` and ``_`` labels (then dnspython renders it)."""
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        return None
    out = bytearray(struct.pack("!HHHHHH", 0, flags, 1, 0, 0, 1 if dnssec else 0))
    for label in raw.rstrip(b".").split(b"."):
        if not 0 < len(label) < 64 or not _PLAIN.issuperset(label):
            return None
        out.append(len(label))
        out += label
    if len(out) - 12 + 1 > 255:
        return None
    out += b"\x00" + struct.pack("!HH", rdtype, 1)
    if dnssec:
        out += _OPT_DO
    return bytes(out)


class QueryTable:
    """The questions in flight on one socket (pure: bytes in, resolved questions out).

    ``add(query, waiter)`` gives the query a random free id and returns it with the wire bytes
    to send; ``receive(datagram)`` returns ``(waiter, response)`` for a datagram that answers
    a pending question (and forgets it), else None; ``discard(qid, waiter)`` forgets one question
    (timeout, cancelled); ``take_all()`` forgets them all (the socket failed).
    """

    def __init__(self, capacity: int = CAPACITY,
                 randbits: Callable[[int], int] = secrets.randbits, fast: bool = False) -> None:
        self.capacity = capacity
        self._randbits = randbits
        #: answers come as :class:`~torroute.routing.dns_wire.Response` when the small decoder
        #: reads them (the router's asyncio driver), dnspython messages otherwise
        self.fast = fast
        # id -> (the dnspython query, made on demand), waiter, question bytes, flags byte)
        self._pending: dict[int, tuple[Callable[[], dns.message.Message], Any, bytes, int]] = {}
        self.ignored = 0  # datagrams that answered nothing

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.capacity

    def add(self, query: dns.message.Message | bytes, waiter: Any,
            message: Callable[[], dns.message.Message] | None = None) -> tuple[int, bytes]:
        """Register a query under a fresh random id; returns the id and the bytes to send.

        ``query`` is a dnspython message (its id is set), or wire bytes whose id is replaced;
        then ``message()`` gives the dnspython message for the rare full check (default: the
        bytes parsed)."""
        if self.full:
            raise OverflowError("too many DNS questions in flight on one socket")
        pending = self._pending
        qid = self._randbits(16)
        while qid in pending:
            qid = self._randbits(16)
        if isinstance(query, dns.message.Message):
            query.id = qid
            wire = query.to_wire()
            message = _constant(query)
        else:
            wire = qid.to_bytes(2, "big") + query[2:]
            message = message or _parsed(wire)
        # the question section as sent, lower-cased (DNS names compare ASCII-case-insensitively;
        # label lengths are < 64, so lower() leaves them alone): what an answer must echo
        question = wire[12:12 + _question_length(wire)].lower()
        pending[qid] = (message, waiter, question, wire[2])
        return qid, wire

    def discard(self, qid: int, waiter: Any = None) -> None:
        """Forget question ``qid`` -- only if it is still ``waiter``'s (when given).  Once an
        answer came, its id is free and may be drawn for the next question before the asker's
        clean-up runs (a loop turn later); a blind discard then dropped that other question,
        which timed out (twice in some 40 000 cold lookups of bench/lookup.py)."""
        entry = self._pending.get(qid)
        if entry is not None and (waiter is None or entry[1] is waiter):
            del self._pending[qid]

    def take_all(self) -> list[Any]:
        waiters = [entry[1] for entry in self._pending.values()]
        self._pending.clear()
        return waiters

    def receive(self, data: bytes) -> tuple[Any, dns.message.Message | Response] | None:
        """The waiter and response a datagram answers, or None (ignored, counted)."""
        if len(data) < 12:
            self.ignored += 1
            return None
        qid = (data[0] << 8) | data[1]
        entry = self._pending.get(qid)
        if entry is None:  # unknown id, a late or duplicate answer
            self.ignored += 1
            return None
        message, waiter, question, flags = entry
        response = decode(data) if self.fast else None
        if response is None:
            response = _parse(data)
            if response is None:
                self.ignored += 1  # garbage: keep waiting
                return None
        # fast path: QR set, same opcode, the question echoed byte for byte (case aside) --
        # else dnspython's full check (e.g. a SERVFAIL without a question section)
        if not ((data[2] & 0xF8) == (0x80 | (flags & 0x78))
                and data[4:6] == b"\x00\x01"
                and data[12:12 + len(question)].lower() == question):
            if response.__class__ is Response:
                response = _parse(data)  # the full check is dnspython's
            if response is None or not _is_response(message(), qid, response):
                self.ignored += 1  # a forgery with the right id, another question: keep waiting
                return None
        del self._pending[qid]
        return waiter, response


def _constant(query: dns.message.Message) -> Callable[[], dns.message.Message]:
    return lambda: query


def _parsed(wire: bytes) -> Callable[[], dns.message.Message]:
    return lambda: dns.message.from_wire(wire)


def _is_response(query: dns.message.Message, qid: int, response: dns.message.Message) -> bool:
    query.id = qid
    return query.is_response(response)


def _question_length(wire: bytes) -> int:
    """Length of the first question (name + type + class) of a wire message we rendered."""
    pos = 12
    while wire[pos]:
        pos += wire[pos] + 1
    return pos + 1 + 4


def _parse(data: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(data)
    except Exception:  # noqa: BLE001 - dnspython raises many kinds for bad wire data
        pass
    if not data[2] & (_TC >> 8):
        return None
    try:  # truncated and cut mid-record: the header and question are enough to retry on TCP
        response = dns.message.from_wire(data, question_only=True)
    except Exception:  # noqa: BLE001
        return None
    return response if response.flags & _TC else None


class _Channel(asyncio.DatagramProtocol):
    """One connected UDP socket and its :class:`QueryTable`."""

    def __init__(self, owner: UdpNameserver) -> None:
        self.owner = owner
        self.table = QueryTable(fast=True)
        self.transport: asyncio.DatagramTransport | None = None
        self.sent = 0
        self.resent = 0  # retransmissions (a lost question or answer)
        self.closed = False
        self.peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if addr is not None and self.peer is not None and addr[:2] != self.peer[:2]:
            self.table.ignored += 1
            return
        hit = self.table.receive(data)
        if hit is not None:
            waiter, response = hit
            if not waiter.done():
                waiter.set_result(response)

    def error_received(self, exc: Exception) -> None:
        # on a connected socket: ICMP port/host unreachable for this nameserver; every
        # question to it fails now (the router asks the next nameserver)
        self._fail_all(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all(exc or ConnectionResetError("DNS socket closed"))
        self.owner._lost(self)

    def _fail_all(self, exc: BaseException) -> None:
        for waiter in self.table.take_all():
            if not waiter.done():
                waiter.set_exception(exc)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class UdpNameserver:
    """Asks one nameserver over UDP; every concurrent question shares one socket.

    ``await ask(query, timeout)`` (a dnspython query, or wire bytes as
    :meth:`QueryTable.add` takes them) returns the response or raises ``dns.exception.Timeout`` /
    ``OSError`` (as dnspython's ``asyncquery.udp`` does), so the router's failure handling is
    unchanged.  Bound to the event loop that first used it.
    """

    def __init__(self, host: str, port: int) -> None:
        self.peer = (host, port)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._current: _Channel | None = None
        self._opening: asyncio.Future[_Channel] | None = None
        self._channels: set[_Channel] = set()
        self._keeper: asyncio.Task | None = None
        self._last_used = 0.0
        self.retired = False

    async def ask(self, query: dns.message.Message | bytes, timeout: float,
                  message: Callable[[], dns.message.Message] | None = None
                  ) -> dns.message.Message:
        loop = asyncio.get_running_loop()
        self.loop = loop
        channel = self._current
        if channel is None or channel.closed or channel.table.full or \
                channel.sent >= ROTATE_AFTER:
            channel = await self._open()
        waiter: asyncio.Future[dns.message.Message] = loop.create_future()
        qid, wire = channel.table.add(query, waiter, message)
        channel.sent += 1
        # one timer per question: each retransmission (after RETRANSMIT, then twice as long
        # each time) or, at the deadline, the timeout (two timers per question cost a
        # call_later and a cancel more, on every cold lookup)
        deadline = loop.time() + timeout
        timers: list[asyncio.TimerHandle] = []  # the latest is pending
        _schedule(loop, channel, waiter, wire, RETRANSMIT, deadline, timers)
        try:
            channel.transport.sendto(wire)  # an OSError goes to error_received
            return await waiter
        finally:
            timers[-1].cancel()
            channel.table.discard(qid, waiter)
            self._last_used = loop.time()
            if channel is not self._current and not channel.table:
                channel.close()  # rotated away and drained

    async def _open(self) -> _Channel:
        if self._opening is not None:  # another question is opening it: share
            return await asyncio.shield(self._opening)
        loop = asyncio.get_running_loop()
        self._opening = loop.create_future()
        try:
            host, port = self.peer
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            _transport, channel = await loop.create_datagram_endpoint(
                lambda: _Channel(self), remote_addr=(host, port), family=family)
        except BaseException as exc:
            self._opening.set_exception(exc)
            self._opening.exception()  # retrieved: the sharers got it
            raise
        finally:
            opening, self._opening = self._opening, None
        old, self._current = self._current, channel
        self._channels.add(channel)
        if old is not None and not old.table:
            old.close()
        opening.set_result(channel)
        if self._keeper is None:
            self._keeper = loop.create_task(self._keep())
        return channel

    async def _keep(self) -> None:
        """Close idle sockets; and every socket when the event loop ends (this task is then
        cancelled), so no socket outlives its loop."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(LINGER)
                idle = all(not c.table for c in self._channels)
                if idle and (self.retired or loop.time() - self._last_used >= LINGER):
                    break
        except asyncio.CancelledError:
            pass
        finally:
            self._keeper = None
            self.close()

    def _lost(self, channel: _Channel) -> None:
        self._channels.discard(channel)
        if channel is self._current:
            self._current = None

    def retire(self) -> None:
        """No more questions (configuration reloaded): close the sockets once they drain."""
        self.retired = True
        for channel in list(self._channels):
            if not channel.table:
                channel.close()
        self._current = None

    def close(self) -> None:
        for channel in list(self._channels):
            channel.close()
        self._current = None


def _schedule(loop: asyncio.AbstractEventLoop, channel: _Channel, waiter: asyncio.Future,
              wire: bytes, interval: float, deadline: float,
              timers: list[asyncio.TimerHandle]) -> None:
    """The question's next timer: a retransmission after ``interval``, or the timeout when
    the deadline comes first."""
    delay = deadline - loop.time()
    if interval < delay:
        timers.append(loop.call_later(interval, _resend, loop, channel, waiter, wire, interval,
                                      deadline, timers))
    else:
        timers.append(loop.call_later(max(delay, 0.0), _expire, waiter))


def _resend(loop: asyncio.AbstractEventLoop, channel: _Channel, waiter: asyncio.Future,
            wire: bytes, interval: float, deadline: float,
            timers: list[asyncio.TimerHandle]) -> None:
    """Send an unanswered question again (same id: whichever copy is answered first counts,
    the other answer is a duplicate and ignored), and schedule the next time."""
    if waiter.done():
        return
    if not channel.closed:
        channel.transport.sendto(wire)
        channel.resent += 1
    _schedule(loop, channel, waiter, wire, interval * 2, deadline, timers)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(dns.exception.Timeout())
