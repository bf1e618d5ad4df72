"""The SRV targets of one transaction, tried in RFC 2782 order (pure).

One rule for the pipe program, the LMTP relay and ``send_message``: the next target only after
a failure before the server judged the transaction (``SmtpClient.may_try_next``,
:func:`socks_may_try_next`), within the time limit; the outcome then says what the earlier
targets answered (:func:`after_earlier`) or that none was reached (:func:`none_reached`).
:class:`TargetPlan` holds that rule; its callers only perform the attempts (blocking:
``torroute.delivery.pipe.deliver`` and ``torroute.delivery.client``; asyncio:
``torroute.delivery.relay.Relay``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import SocksError
from ..protocols.smtp import DEFERRED, Outcome, permanent, temporary

Target = tuple[str, int]  # (onion, port)


def next_targets(target_lists: Sequence[Sequence[Target]], failed: Target) -> list[Target]:
    """The targets to try after ``failed``: those every recipient's route lists (their SRV
    targets in RFC 2782 order, the first recipient's order), ``failed`` left out.  None when a
    route does not list ``failed``: the routing changed since Postfix asked, or the nexthop came
    from the operator's own table, and neither is ours to second-guess."""
    if not target_lists or any(failed not in targets for targets in target_lists):
        return []
    first, others = target_lists[0], target_lists[1:]
    return [t for t in first if t != failed and all(t in o for o in others)]


def after_earlier(outcome: Outcome, earlier: Sequence[Outcome]) -> Outcome:
    """``outcome`` of a later SRV target, saying what the earlier ones answered.

    "via backup:" comes first because pipe(8) logs only the first 100 characters of a
    delivery's output (``status=sent (delivered via torroute service (%.100s))``); a deferral
    or bounce keeps the whole line."""
    if not earlier:
        return outcome
    said = " | ".join(o.text for o in earlier)
    plural = "s" if len(earlier) > 1 else ""
    return Outcome(outcome.status, outcome.dsn,
                   f"via backup: {outcome.text} (after the earlier SRV target{plural}: {said})")


def none_reached(failures: Sequence[Outcome]) -> Outcome:
    """Every target failed before the message was sent: the last one's code, all the reasons."""
    if len(failures) == 1:
        return failures[0]
    said = " | ".join(o.text for o in failures)
    return Outcome(failures[-1].status, failures[-1].dsn,
                   f"none of {len(failures)} SRV targets reached: {said}")


class TargetPlan:
    """Which target to try next and, at the end, the outcome per recipient.

    ``targets`` in RFC 2782 order.  ``backups_known=False``: only the first is known (the pipe's
    ``${nexthop}``); after it fails so that another may be tried, :attr:`wants_backups` asks
    the caller to route the recipients and hand the further targets to :meth:`add_backups`
    (the pipe imports the router, dnspython, only then).  Use::

        plan = TargetPlan(targets, len(recipients))
        while (target := plan.next(time_left)) is not None:
            outcomes, may_try_next = attempt(target)  # one outcome per recipient
            plan.record(outcomes, may_try_next)
        return plan.outcomes()
    """

    __slots__ = ("recipients", "failures", "_todo", "_final", "_backups_known")

    def __init__(self, targets: Sequence[Target], recipients: int = 1,
                 backups_known: bool = True) -> None:
        self.recipients = recipients
        self.failures: list[Outcome] = []  # the targets' failures before the message was sent
        self._todo = list(targets)
        self._final: list[Outcome] | None = None
        self._backups_known = backups_known

    def next(self, time_left: float = math.inf) -> Target | None:
        """The target to try now; None when the outcome is decided.  The first target is
        always tried (its attempt reports a spent time limit itself); a further one only while
        ``time_left`` (seconds) is positive."""
        if self._final is not None or not self._todo or (self.failures and time_left <= 0):
            return None
        return self._todo.pop(0)

    def upcoming(self) -> Target | None:
        """The target :meth:`next` would give (for a log line), if any."""
        return self._todo[0] if self._final is None and self._todo else None

    def record(self, outcomes: Sequence[Outcome], may_try_next: bool) -> None:
        """The last target's outcomes (one per recipient) and whether another target may be
        tried (then the transaction's outcome is ``outcomes[0]``, the same for all)."""
        if may_try_next:
            self.failures.append(outcomes[0])
        else:
            self._final = [after_earlier(o, self.failures) for o in outcomes]

    def wants_backups(self, time_left: float = math.inf) -> bool:
        """The first target failed before the message was sent, time is left, and the further
        targets are not known yet: route the recipients and call :meth:`add_backups`."""
        return (not self._backups_known and self._final is None and bool(self.failures)
                and not self._todo and time_left > 0)

    def add_backups(self, targets: Sequence[Target], problem: str = "") -> None:
        """The further targets; ``problem``: routing them failed (DNS, a broken map), which
        decides: defer with the first failure and why there is no backup."""
        self._backups_known = True
        if problem:
            first = self.failures[0]
            self._final = [Outcome(first.status, first.dsn,
                                   f"{first.text} (further SRV targets unknown: {problem})")
                           ] * self.recipients
        else:
            self._todo.extend(targets)

    def outcomes(self) -> list[Outcome]:
        """The final outcome per recipient: the last target's (after the earlier failures), or
        :func:`none_reached` when every target tried failed before the message was sent."""
        if self._final is not None:
            return self._final
        assert self.failures, "no target was tried"
        return [none_reached(self.failures)] * self.recipients


# ---- what a failed dial through tor means (the attempt's outcome)


def socks_may_try_next(exc: BaseException, outcome: Outcome) -> bool:
    """Did this dial fail for this destination only, so another SRV target may work?  A
    timeout or a temporary tor reply (0xF0 no descriptor, 0xF2/0xF7 introduction, 0xF3
    rendezvous, 0x01 the service's port closed, ...): yes.  tor's SocksPort unreachable or
    speaking garbage (every target goes through it) or a permanent reply (0xF4..0xF6): no."""
    if isinstance(exc, TimeoutError):
        return True
    return isinstance(exc, SocksError) and exc.code is not None and \
        outcome.status == DEFERRED


def socks_outcome(exc: BaseException, destination: str, proxy: tuple[str, int],
                  timeout: float) -> Outcome:
    """Classify a failed dial: tor down / temporary refusals defer, a bad address bounces."""
    where = f"{proxy[0]}:{proxy[1]}"
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return temporary("4.4.1", f"{destination}: connect through tor timed out after "
                         f"{timeout:g}s")
    if isinstance(exc, SocksError):
        message = str(exc)
        if exc.temporary:
            return temporary("4.4.1", f"tor: {message}")
        dsn = "5.1.2" if exc.code == 0xF6 else "5.7.1" if exc.code in (0xF4, 0xF5) else "5.4.4"
        return permanent(dsn, f"tor: {message}")
    if isinstance(exc, ValueError):
        return temporary("4.4.1", f"{destination}: SOCKS5 with tor failed: {exc}")
    return temporary("4.4.1", f"tor SocksPort {where} unreachable: "
                     f"{getattr(exc, 'strerror', None) or exc}")
