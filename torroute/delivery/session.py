"""One SMTP session over one connection: the I/O it needs (pure), and the blocking driver.

:mod:`torroute.protocols.smtp` decides what to send and what the replies mean.
:func:`session_steps` turns its actions into I/O requests, each with its deadline in seconds
(:class:`Write`, :class:`Read`, :class:`Handshake`), and what the I/O gave back (bytes, a
certificate, :class:`TimedOut`, an ``OSError``) into the client's outcome: the timeouts, the
server's last words after a failed write, STARTTLS and ``tls_verify``'s certificate check.  So a
driver only performs the requests: :func:`run_session` on a blocking socket (the pipe program,
``send_message``), ``Relay._drive`` (:mod:`torroute.delivery.relay`) on asyncio streams; both
classify every timeout, reset and certificate the same way.

No asyncio here: the pipe program imports this module once per message.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Generator, Sequence

from ..errors import SocksError
from ..protocols.smtp import COMMAND, DATA, Action, Close, Outcome, Send, SmtpClient, temporary
from ..tor import dial as tordial
from .settings import DeliverSettings
from .targets import Target, socks_may_try_next, socks_outcome
from .tls import tls_check_peer, tls_context, tls_untrusted

#: how long to wait for the server's last words after a write failed (a 421 or 5xx before the
#: reset says more than "broken pipe")
LAST_WORDS = 1.0


class _Step:
    """An I/O request (slotted, compared by value; no dataclass: see DeliverSettings)."""

    __slots__ = ("seconds",)

    def _values(self) -> tuple:
        return tuple(getattr(self, n) for n in ("data", "seconds") if hasattr(self, n))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values() == self._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in ("data", "seconds")
                           if hasattr(self, n))
        return f"{type(self).__name__}({fields})"


class Write(_Step):
    """Send all of ``data`` within ``seconds``; give back None, or the exception."""

    __slots__ = ("data",)

    def __init__(self, data: bytes, seconds: float) -> None:
        self.data = data
        self.seconds = seconds


class Read(_Step):
    """Read what arrives (up to 64 KiB) within ``seconds``; give back the bytes (``b""``: the
    server closed the connection), or the exception."""

    __slots__ = ()

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class Handshake(_Step):
    """STARTTLS: wrap the connection in TLS (``tls_context``, the onion as server name) within
    ``seconds``; give back the peer certificate (``getpeercert()``), or the exception."""

    __slots__ = ()

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class TimedOut:
    """What a driver gives back when a step's deadline passed (after ``seconds``)."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


Step = Write | Read | Handshake
Steps = Generator[Step, object, Outcome]


def session_steps(client: SmtpClient, settings: DeliverSettings, host: str,
                  domains: Sequence[str] = (), actions: Sequence[Action] = ()) -> Steps:
    """The I/O of ``client``'s session, one step at a time: send each step's result into the
    generator; its return value is the outcome.  ``actions``: where to begin (a fresh
    connection: nothing, read the greeting; a kept one: ``client.resume(...)``)."""
    seconds = {COMMAND: settings.command_timeout, DATA: settings.data_timeout}
    todo = list(actions)
    while True:
        if not todo:
            got = yield Read(seconds[client.reply_deadline])
            if isinstance(got, TimedOut):
                return client.timed_out(got.seconds)
            if isinstance(got, BaseException):
                return client.connection_lost(_why(got))
            if not got:
                return client.connection_lost("connection closed by the server")
            todo = client.receive(got)  # type: ignore[arg-type]
            continue
        action = todo.pop(0)
        if isinstance(action, Close):
            assert client.outcome is not None
            return client.outcome
        if isinstance(action, Send):
            got = yield Write(action.data, seconds[action.deadline])
            if isinstance(got, TimedOut):
                return client.timed_out(got.seconds)
            if isinstance(got, BaseException):
                last = yield Read(LAST_WORDS)  # the server may have said why it closed
                if isinstance(last, bytes) and last:
                    client.receive(last)
                if client.outcome is not None:
                    return client.outcome
                return client.connection_lost(_why(got))
            continue
        got = yield Handshake(seconds[COMMAND])  # StartTLS
        if isinstance(got, TimedOut):
            return client.tls_failed(f"timeout after {got.seconds:g}s")
        if isinstance(got, BaseException):
            untrusted = tls_untrusted(got)
            if untrusted is not None:
                return client.tls_refused(untrusted)
            return client.tls_failed(str(got) or type(got).__name__)
        if settings.tls_verify:
            problem = tls_check_peer(got, host, domains)  # type: ignore[arg-type]
            if problem is not None:
                return client.tls_refused(problem)
        todo = client.tls_started() + todo


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# ---- the blocking driver


class Clock:
    """The time limit of a whole blocking run (``time_limit``), across its targets."""

    __slots__ = ("limit", "deadline")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.deadline = time.monotonic() + limit

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def budget(self, wanted: float) -> float:
        """``wanted`` seconds, or what is left of the limit; TimeoutError when nothing is."""
        left = self.left()
        if left <= 0:
            raise TimeoutError("time limit")
        return min(wanted, left)


def run_session(sock: socket.socket, client: SmtpClient, settings: DeliverSettings,
                clock: Clock, host: str, domains: Sequence[str] = ()) -> Outcome:
    """Drive ``client`` over ``sock`` until it has an outcome; closes the socket.  Each step's
    deadline is cut to what is left of ``clock``."""
    steps = session_steps(client, settings, host, domains)
    got: object = None
    try:
        while True:
            step = steps.send(got)
            try:
                timeout = clock.budget(step.seconds)
            except TimeoutError:
                got = TimedOut(clock.limit)
                continue
            try:
                sock.settimeout(timeout)
                if isinstance(step, Read):
                    got = sock.recv(65536)
                elif isinstance(step, Write):
                    got = sock.sendall(step.data)
                else:
                    sock = tls_context(settings).wrap_socket(sock, server_hostname=host)
                    got = sock.getpeercert()
            except TimeoutError:
                got = TimedOut(timeout)
            except OSError as exc:
                got = exc
    except StopIteration as done:
        return done.value
    finally:
        sock.close()


def attempt_with(target: Target, client: SmtpClient, settings: DeliverSettings, clock: Clock,
                 domains: Sequence[str] = ()) -> tuple[Outcome, bool]:
    """One target, blocking: dial it through tor and run ``client``'s session.  The outcome,
    and whether another target may be tried (:func:`socks_may_try_next`,
    ``SmtpClient.may_try_next``)."""
    host, port = target
    destination = f"{host}:{port}"
    try:
        budget = clock.budget(settings.connect_timeout)
    except TimeoutError:
        return temporary("4.4.2", f"{destination}: not tried, time limit "
                         f"{settings.time_limit:g}s reached"), False
    try:
        sock = tordial.connect(host, port, settings.proxy, budget, settings.isolate)
    except (OSError, SocksError, ValueError) as exc:
        outcome = socks_outcome(exc, destination, settings.proxy, budget)
        return outcome, socks_may_try_next(exc, outcome)
    outcome = run_session(sock, client, settings, clock, host, domains)
    return outcome, client.may_try_next
