"""The LMTP relay of ``torroute serve``: each transaction Postfix hands over is relayed to the
recipients' onion MXs through tor, and answered per recipient only after the MX answered.

Why here and not in Postfix's queue: the relay keeps no queue.  A recipient is answered 2xx only
when the onion MX accepted the message, 5xx only when the MX refused it (or the onion address is
invalid), and 4xx for everything else (tor/SOCKS down, timeouts, no route any more, DNS, any
internal error), so Postfix stays the only queue and nothing is lost if the daemon dies.

Routing: LMTP carries no nexthop, so every recipient is routed again with the daemon's own
:class:`~torroute.routing.router.Router` (the decision Postfix just asked for is cached).  A
recipient that no longer has an onion route is deferred: Postfix resolves it anew on the next
attempt.

Speed: SMTP connections through tor are kept per onion for a short idle time and reused
(``RSET`` pipelined before the next ``MAIL``), which saves the SOCKS/circuit set-up, greeting and
EHLO round trips.  Any error drops the connection.

Fairness: at most ``max_per_onion`` connections per onion are in use at once; further
transactions for that onion wait in its own FIFO queue (at most ``max_waiting_per_onion``), and
beyond that are answered 4xx at once ("busy").  So one slow onion holds at most
cap + queue of Postfix's lmtp delivery agents (all onions share Postfix's one LMTP nexthop, so
its destination concurrency cannot tell onions apart) and mail to the others keeps flowing; the
busy 4xx is the truth (nothing was sent), so per-recipient replies stay exact.

Backup MXs: when an onion fails before the message was sent (tor cannot reach it, no or a bad
greeting, TLS trouble), the route's further SRV targets are tried in RFC 2782 order within the
same ``time_limit``; a reply to the transaction (4xx/5xx) or a permanent tor refusal is final.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SocksError
from ..protocols.lmtp import Transaction, rcpt_reply
from ..protocols.smtp import BOUNCED, DELIVERED, Action, Outcome, SmtpClient, temporary
from ..routing.router import NoRoute, Reject, Route, Router
from ..tor import dial as tordial
from .envelope import envelope_sender, recipient_domains
from .session import Read, TimedOut, Write, session_steps
from .settings import DeliverSettings
from .targets import TargetPlan, next_targets, socks_may_try_next, socks_outcome
from .tls import tls_check_peer, tls_context

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (onion, port)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of one target, as the relay saw it: what per-onion health, the self-healing
    evidence and the metrics learn from real traffic (``Relay.on_attempt`` observers)."""

    onion: str
    port: int
    reached: bool  # the MX said something: tor reached the onion (whatever the MX answered)
    status: str  # the first recipient's outcome: "delivered" | "deferred" | "bounced"
    socks_code: int | None  # tor's SOCKS5 reply (0xF0 descriptor not found...) if the dial failed
    timed_out: bool  # the dial or the session ran into a deadline
    reason: str  # one line
    seconds: float  # dial + session
    reused: bool  # a pooled connection

    @property
    def reason_class(self) -> str:
        """What kind of result this was, for metrics labels and the healing evidence:
        ``delivered``, ``bounced``, ``mx_deferred`` (the MX answered 4xx), or why tor did not
        get through: ``descriptor`` (0xF0/0xF1), ``introduction`` (0xF2/0xF7), ``rendezvous``
        (0xF3), ``auth`` (0xF4/0xF5), ``address`` (0xF6), ``refused`` (0x05: the onion is up,
        its port closed), ``timeout``, ``tor_down`` (no SOCKS answer at all), ``other``."""
        if self.reached:
            return {"delivered": "delivered", "bounced": "bounced"}.get(self.status,
                                                                        "mx_deferred")
        if self.socks_code is not None:
            return _SOCKS_CLASS.get(self.socks_code, "other")
        if self.timed_out:
            return "timeout"
        return "tor_down" if "SocksPort" in self.reason else "other"


_SOCKS_CLASS = {0xF0: "descriptor", 0xF1: "descriptor", 0xF2: "introduction",
                0xF7: "introduction", 0xF3: "rendezvous", 0xF4: "auth", 0xF5: "auth",
                0xF6: "address", 0x05: "refused", 0x06: "timeout", 0x04: "other"}
#: the classes that say tor's client could not build a working path to a (probably alive)
#: onion: the self-healing evidence (a bounce, a 4xx or a closed port is the remote's doing)
TOR_PATH_FAILURES = frozenset({"descriptor", "introduction", "rendezvous", "timeout"})


class _Conn:
    """An SMTP connection through tor that has done greeting and EHLO."""

    __slots__ = ("reader", "writer", "extensions", "idle_handle", "uses", "peer_cert")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.extensions: dict[str, str] = {}
        self.idle_handle: asyncio.TimerHandle | None = None
        self.uses = 0
        self.peer_cert: dict | None = None  # after STARTTLS (checked again on reuse)

    def close(self, quit: bool = False) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        try:
            if quit and not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
            self.writer.close()
        except (OSError, RuntimeError):
            pass


class ConnectionPool:
    """Idle SMTP connections per onion, each closed (QUIT) after ``idle_timeout`` unused."""

    def __init__(self, idle_timeout: float, max_idle: int = 16) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.idle: dict[Key, list[_Conn]] = {}

    def take(self, key: Key) -> _Conn | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            if conn.reader.at_eof() or conn.writer.is_closing():
                conn.close()
                continue
            return conn
        return None

    def give(self, key: Key, conn: _Conn) -> None:
        conns = self.idle.setdefault(key, [])
        if self.idle_timeout <= 0 or len(conns) >= self.max_idle:
            conn.close(quit=True)
            return
        conns.append(conn)
        loop = asyncio.get_running_loop()
        conn.idle_handle = loop.call_later(self.idle_timeout, self._expire, key, conn)

    def _expire(self, key: Key, conn: _Conn) -> None:
        conns = self.idle.get(key, [])
        if conn in conns:
            conns.remove(conn)
        conn.idle_handle = None
        conn.close(quit=True)

    def close_all(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close(quit=True)
        self.idle.clear()

    def __len__(self) -> int:
        return sum(map(len, self.idle.values()))


class _Gate:
    """The connections in use to one onion and the transactions waiting for one (FIFO)."""

    __slots__ = ("busy", "waiters")

    def __init__(self) -> None:
        self.busy = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()


class OnionGates:
    """Per-onion connection cap with a bounded FIFO queue per onion: what keeps a slow onion
    from taking every connection (and every Postfix delivery agent)."""

    def __init__(self, max_per_onion: int, max_waiting: int) -> None:
        self.max_per_onion = max_per_onion
        self.max_waiting = max_waiting
        self.gates: dict[Key, _Gate] = {}
        self.stats = {"queued": 0, "busy_refused": 0, "max_waiting": 0}
        self.closed = False  # shutting down: nothing waits any more, nothing new starts

    def close(self) -> None:
        """The daemon stops: every waiting transaction (nothing of it sent yet) and every
        later one is refused (-> 4xx) at once; connections in use finish their transaction."""
        self.closed = True
        for gate in self.gates.values():
            for waiter in gate.waiters:
                if not waiter.done():
                    waiter.set_result(False)
            gate.waiters.clear()

    async def acquire(self, key: Key) -> bool:
        """Take a slot for ``key`` (waiting in its queue if need be); False: the queue is
        full, take no slot and defer."""
        if self.closed:
            return False
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = _Gate()
        if gate.busy < self.max_per_onion and not gate.waiters:
            gate.busy += 1
            return True
        if len(gate.waiters) >= self.max_waiting:
            self.stats["busy_refused"] += 1
            return False
        waiter = asyncio.get_running_loop().create_future()
        gate.waiters.append(waiter)
        self.stats["queued"] += 1
        self.stats["max_waiting"] = max(self.stats["max_waiting"], len(gate.waiters))
        try:
            # release() hands its slot over (True: busy stays counted); close() says False
            got = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release(key)  # handed a slot just as we were cancelled: pass it on
            elif waiter in gate.waiters:
                gate.waiters.remove(waiter)
                self._forget(key, gate)
            raise
        if not got:
            self._forget(key, gate)
        return got

    def release(self, key: Key) -> None:
        gate = self.gates[key]
        while gate.waiters:
            waiter = gate.waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        gate.busy -= 1
        self._forget(key, gate)

    def _forget(self, key: Key, gate: _Gate) -> None:
        if gate.busy <= 0 and not gate.waiters and self.gates.get(key) is gate:
            del self.gates[key]

    def waiting(self, key: Key) -> int:
        gate = self.gates.get(key)
        return len(gate.waiters) if gate is not None else 0


def outcome_reply(outcome: Outcome) -> bytes:
    """An Outcome as the LMTP reply for one recipient."""
    code = 250 if outcome.status == DELIVERED else 550 if outcome.status == BOUNCED else 451
    return rcpt_reply(code, outcome.dsn, outcome.text)


class Relay:
    """Relays LMTP transactions; ``settings`` are the ``[deliver]`` settings (EHLO name,
    SocksPort, timeouts, STARTTLS, isolation), ``time_limit`` bounds one transaction (below
    Postfix's lmtp_data_done_timeout, 600 s, so Postfix never gives up on an answer it would
    then get).  ``max_per_onion`` connections per onion at once, ``max_waiting_per_onion``
    transactions queued per onion beyond that (more: 4xx at once)."""

    def __init__(self, router: Router, settings: DeliverSettings, idle_timeout: float = 10.0,
                 time_limit: float = 540.0,
                 clock: Callable[[], float] = time.monotonic, max_per_onion: int = 48,
                 max_waiting_per_onion: int = 16) -> None:
        self.router = router
        self.settings = settings
        self.time_limit = time_limit
        # idle connections kept per onion: as many as may be in use at once
        self.pool = ConnectionPool(idle_timeout, max_idle=max(max_per_onion, 1))
        self.gates = OnionGates(max_per_onion, max_waiting_per_onion)
        self.clock = clock
        self.stats = {"dialed": 0, "reused": 0, "transactions": 0}
        #: called with every :class:`Attempt` (must not raise or block: the hot path); a
        #: transaction refused by the per-onion gates (busy, shutting down) tried no target
        #: and is no attempt
        self.on_attempt: list[Callable[[Attempt], None]] = []

    def _report(self, key: Key, reached: bool, outcome: Outcome, socks_code: int | None,
                timed_out: bool, started: float, reused: bool) -> None:
        if not self.on_attempt:
            return
        attempt = Attempt(key[0], key[1], reached, outcome.status, socks_code, timed_out,
                          outcome.text, self.clock() - started, reused)
        for observer in self.on_attempt:
            try:
                observer(attempt)
            except Exception:  # an observer's bug must not defer mail
                log.exception("lmtp: attempt observer failed")

    async def relay(self, txn: Transaction) -> list[bytes]:
        """One reply per recipient, in order.  Never raises (except cancellation)."""
        self.stats["transactions"] += 1
        replies: list[bytes | None] = [None] * len(txn.recipients)
        # one SMTP transaction per onion; with tls_verify per onion and domain, so that a
        # certificate is judged for each domain alone (one recipient cannot hold back another)
        groups: dict[tuple[Key, str], list[int]] = {}
        targets: dict[tuple[Key, str], list[list[Key]]] = {}  # each recipient's SRV targets
        verify = self.settings.tls_verify
        for i, rcpt in enumerate(txn.recipients):
            address = rcpt.decode("utf-8", "replace")
            try:
                decision = await self.router.aroute(address)
            except Exception as exc:  # fail closed
                log.exception("lmtp: routing %r failed", address[:300])
                replies[i] = rcpt_reply(451, "4.3.0", f"routing failed: {type(exc).__name__}")
                continue
            if isinstance(decision, Route):
                key = (decision.onion, decision.port)
                group = (key, decision.domain if verify else "")
                groups.setdefault(group, []).append(i)
                targets.setdefault(group, []).append([key, *decision.alternatives])
            elif isinstance(decision, Reject):
                replies[i] = rcpt_reply(550, "5.1.2", decision.reason)
            elif isinstance(decision, NoRoute):
                replies[i] = rcpt_reply(451, "4.3.0", f"no onion route for {decision.domain} "
                                        "(any more); Postfix routes it again on retry")
            else:
                replies[i] = rcpt_reply(451, "4.4.3", f"{decision.domain}: {decision.reason}")
        sender = envelope_sender(txn.sender.decode("utf-8", "surrogateescape"))
        # [deliver] scrub_*: once per transaction, on the dot-unstuffed LF message, before the
        # client's CRLF and dot-stuffing -- as the pipe and send_message (docs/scrub.rst)
        message = self.settings.scrubbed(txn.sender, txn.message) if groups else txn.message

        async def one(group: tuple[Key, str], indexes: list[int]) -> None:
            key = group[0]
            rcpts = [txn.recipients[i] for i in indexes]
            order = [key, *next_targets(targets[group], key)]
            try:
                async with asyncio.timeout(self.time_limit):  # for all targets together
                    outcomes = await self._deliver(order, sender, rcpts, message)
            except TimeoutError:
                outcomes = [temporary("4.4.2", f"{key[0]}:{key[1]}: relay time limit "
                                      f"{self.time_limit:g}s reached")] * len(rcpts)
            except Exception as exc:  # any internal error defers
                log.exception("lmtp: relay to %s failed", key[0])
                outcomes = [temporary("4.3.0", f"internal error: {type(exc).__name__}")
                            ] * len(rcpts)
            for i, outcome in zip(indexes, outcomes, strict=True):
                replies[i] = outcome_reply(outcome)

        await asyncio.gather(*(one(k, v) for k, v in groups.items()))
        return [r if r is not None else rcpt_reply(451, "4.3.0", "internal error: no result")
                for r in replies]

    async def _deliver(self, order: list[Key], sender: bytes, rcpts: list[bytes],
                       message: bytes) -> list[Outcome]:
        """Deliver to the first target of ``order`` that does not fail before the message was
        sent; one outcome per recipient (the time limit is the caller's asyncio.timeout)."""
        domains = recipient_domains(rcpts) if self.settings.tls_verify else []
        plan = TargetPlan(order, len(rcpts))
        while (key := plan.next()) is not None:
            outcomes, may_try_next = await self._deliver_to(key, sender, rcpts, message, domains)
            plan.record(outcomes, may_try_next)
            nxt = plan.upcoming()
            if nxt is not None:
                log.warning("lmtp: %s:%d failed before the message was sent (%s); trying the "
                            "next SRV target %s:%d", key[0], key[1], outcomes[0].text,
                            nxt[0], nxt[1])
        return plan.outcomes()

    async def _deliver_to(self, key: Key, sender: bytes, rcpts: list[bytes], message: bytes,
                          domains: list[str]) -> tuple[list[Outcome], bool]:
        """One target: per-recipient outcomes, and whether it failed before the message was
        sent in a way the next target may not (then nothing was delivered here).  ``key`` is a
        route of the Router, so a validated v3 onion (pins, SRV targets and onion names are
        checked by parse_onion there)."""
        host, port = key
        destination = f"{host}:{port}"
        if not await self.gates.acquire(key):
            g = self.gates
            if g.closed:
                return [temporary("4.3.2", f"{destination}: not sent, torroute is shutting "
                                  "down")] * len(rcpts), False
            return [temporary("4.4.5", f"{destination}: busy ({g.max_per_onion} connections "
                              f"in use, {g.max_waiting} transactions waiting); try again later")
                    ] * len(rcpts), False
        try:
            return await self._deliver_now(key, sender, rcpts, message, domains)
        finally:
            self.gates.release(key)

    async def _deliver_now(self, key: Key, sender: bytes, rcpts: list[bytes], message: bytes,
                           domains: list[str]) -> tuple[list[Outcome], bool]:
        """:meth:`_deliver_to` once a connection slot for ``key`` is held."""
        host, port = key
        s = self.settings
        destination = f"{host}:{port}"
        for attempt in (0, 1):
            started = self.clock()
            conn = self.pool.take(key) if attempt == 0 else None
            if conn is not None and s.tls_verify and \
                    tls_check_peer(conn.peer_cert, host, domains) is not None:
                conn.close(quit=True)  # verified for other domains: a fresh one checks anew
                conn = None
            reused = conn is not None
            if conn is None:
                try:
                    reader, writer = await tordial.open_connection(
                        host, port, s.proxy, s.connect_timeout, s.isolate)
                except (OSError, SocksError, ValueError, TimeoutError) as exc:
                    outcome = socks_outcome(exc, destination, s.proxy, s.connect_timeout)
                    code = exc.code if isinstance(exc, SocksError) else None
                    self._report(key, False, outcome, code,
                                 isinstance(exc, TimeoutError), started, False)
                    return [outcome] * len(rcpts), socks_may_try_next(exc, outcome)
                conn = _Conn(reader, writer)
                self.stats["dialed"] += 1
            else:
                self.stats["reused"] += 1
            options = s.client_options(destination, per_recipient=True, keep_alive=True)
            client = SmtpClient(sender, rcpts, message, options)
            actions = client.resume(conn.extensions) if reused else []
            try:
                outcome = await self._drive(conn, client, actions, host, domains)
            except BaseException:
                conn.close()
                raise
            conn.uses += 1
            if client.reusable:
                conn.extensions = client.extensions
                self.pool.give(key, conn)
            else:
                conn.close()
            if reused and client.retryable:
                log.warning("lmtp: reused connection to %s failed (%s); dialing anew",
                            destination, outcome.text)
                continue  # a kept connection went stale: nothing was sent, try a fresh one
            outcomes = client.recipient_outcomes()
            self._report(key, client.answered, outcomes[0], None,
                         "timeout after" in outcome.text,
                         started, reused)
            return outcomes, client.may_try_next
        raise AssertionError("unreachable")

    async def _drive(self, conn: _Conn, client: SmtpClient, actions: list[Action], host: str,
                     domains: list[str]) -> Outcome:
        """Run ``client`` over ``conn`` until it has an outcome: the asyncio driver of
        :func:`~torroute.delivery.session.session_steps` (``run_session`` is the blocking one);
        it only performs each step within its deadline."""
        steps = session_steps(client, self.settings, host, domains, actions)
        got: object = None
        while True:
            try:
                step = steps.send(got)
            except StopIteration as done:
                return done.value
            try:
                async with asyncio.timeout(step.seconds):
                    if isinstance(step, Read):
                        got = await conn.reader.read(65536)
                    elif isinstance(step, Write):
                        conn.writer.write(step.data)
                        got = await conn.writer.drain()
                    else:
                        await conn.writer.start_tls(tls_context(self.settings),
                                                    server_hostname=host)
                        got = conn.peer_cert = conn.writer.get_extra_info("peercert")
            except TimeoutError:
                got = TimedOut(step.seconds)
            except OSError as exc:
                got = exc

    def close(self) -> None:
        self.pool.close_all()
