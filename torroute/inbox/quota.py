"""The sink's accounting, pure: Maildir usage, reservations, sessions and rates.

Why pure: every limit is a decision on numbers (what is stored, what is promised, what
arrived in the last window), so it is tested without sockets or a clock.  The caller gives
``now`` (monotonic seconds) and the Maildir usage it counted (:func:`torroute.inbox.maildir.usage`);
:class:`Quota` never trusts its own counters for long: :meth:`Quota.needs_recount` asks for a
fresh count before any refusal, so mail fetched from the Maildir frees room at once.

Every refusal is a reply the sender understands as "later" (4xx) unless the request can never
succeed (552 for a message above the size limit): a flood is refused, never fatal.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from ..protocols.lmtp import reply

#: replies (RFC 3463 codes)
OVER_QUOTA = reply(452, "4.2.2", "mailbox full, try again later")
TOO_BIG = reply(552, "5.3.4", "message too big")
RELAY_DENIED = reply(550, "5.7.1", "relay denied: this host takes mail only for its own domains")
SESSION_RATE = reply(421, "4.7.0", "too many connections from you, try again later")
TOO_MANY_SESSIONS = reply(421, "4.3.2", "too many sessions, try again later")
SESSION_MESSAGES = reply(451, "4.7.1", "too many messages in this session, reconnect later")
GLOBAL_RATE = reply(451, "4.7.1", "receiving too fast, try again later")
NO_SPACE = reply(452, "4.3.1", "insufficient system storage, try again later")

RECOUNT_AFTER = 1.0  # seconds a Maildir count is trusted while nothing is refused


@dataclass
class Usage:
    """What the Maildir holds (new/ and cur/): message files and their bytes."""

    messages: int = 0
    size: int = 0


class RateWindow:
    """Events in the last ``window`` seconds (a sliding log: exact, bounded by ``limit``)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.times: collections.deque[float] = collections.deque()

    def _expire(self, now: float) -> None:
        while self.times and self.times[0] <= now - self.window:
            self.times.popleft()

    def allow(self, now: float) -> bool:
        """Record one event at ``now`` if it stays within the limit; False (not recorded) if not."""
        self._expire(now)
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True

    def __len__(self) -> int:
        return len(self.times)


class Quota:
    """The Maildir limits with reservations: a transaction with an accepted recipient holds
    one message (and its declared SIZE) until it is stored or dropped, so concurrent sessions
    never promise more than fits; :meth:`admit` is the final check before the file is written."""

    def __init__(self, max_messages: int, max_total_size: int, max_message_size: int) -> None:
        self.max_messages = max_messages
        self.max_total_size = max_total_size
        self.max_message_size = max_message_size
        self.usage = Usage()
        self.counted_at: float | None = None
        self.reserved: dict[object, int] = {}  # holder -> reserved bytes

    def recount(self, usage: Usage, now: float) -> None:
        self.usage = usage
        self.counted_at = now

    def needs_recount(self, now: float, refusing: bool) -> bool:
        """Count the directory again before refusing (mail may have been fetched), or when
        the count is older than :data:`RECOUNT_AFTER`."""
        return (self.counted_at is None or refusing
                or now - self.counted_at >= RECOUNT_AFTER)

    def _fits(self, messages: int, size: int, holder: object) -> bool:
        others = {h: s for h, s in self.reserved.items() if h is not holder}
        return (self.usage.messages + len(others) + messages <= self.max_messages
                and self.usage.size + sum(others.values()) + size <= self.max_total_size)

    def would_refuse(self, holder: object, size: int = 0) -> bool:
        """Whether one more message of ``size`` bytes from ``holder`` is over the quota."""
        return not self._fits(1, size, holder)

    def reserve(self, holder: object, size: int = 0) -> bytes | None:
        """At RCPT: ``None`` (reserved, or already held) or the 452 reply."""
        if holder in self.reserved:
            return None
        if not self._fits(1, size, holder):
            return OVER_QUOTA
        self.reserved[holder] = size
        return None

    def release(self, holder: object) -> None:
        self.reserved.pop(holder, None)

    def admit(self, holder: object, size: int, body: int | None = None) -> bytes | None:
        """At the end of DATA, before it is made durable: ``None`` or the refusal (552/452).
        ``body``: the client's bytes (what SIZE promised), without our trace headers."""
        if (size if body is None else body) > self.max_message_size:
            return TOO_BIG
        if not self._fits(1, size, holder):
            return OVER_QUOTA
        return None

    def stored(self, holder: object, size: int) -> None:
        """The file is in new/: count it (until the next recount) and free the reservation."""
        self.release(holder)
        self.usage.messages += 1
        self.usage.size += size


class Sessions:
    """Concurrent sessions and the per-peer session rate (421 at connect)."""

    def __init__(self, max_sessions: int, per_peer: int, window: float) -> None:
        self.max_sessions = max_sessions
        self.per_peer = per_peer
        self.window = window
        self.open = 0
        self.rates: dict[str, RateWindow] = {}

    def connect(self, peer: str, now: float, room: bool = False) -> bytes | None:
        """``None`` (counted as open) or the 421 reply; ``room``: the caller made room by
        closing an idle session (so being full is no reason to refuse)."""
        if self.open >= self.max_sessions and not room:
            return TOO_MANY_SESSIONS
        rate = self.rates.get(peer)
        if rate is None:
            if len(self.rates) > 4 * self.max_sessions:  # forget quiet peers: bounded memory
                for key in [k for k, r in self.rates.items() if (r._expire(now), len(r))[1] == 0]:
                    del self.rates[key]
            rate = self.rates[peer] = RateWindow(self.per_peer, self.window)
        if not rate.allow(now):
            return SESSION_RATE
        self.open += 1
        return None

    def closed(self) -> None:
        self.open = max(0, self.open - 1)


class MessageRates:
    """Messages per session (total) and for all sessions per window (451 at MAIL)."""

    def __init__(self, per_session: int, global_limit: int, window: float) -> None:
        self.per_session = per_session
        self.global_rate = RateWindow(global_limit, window)

    def mail(self, sent_in_session: int, now: float) -> bytes | None:
        if sent_in_session >= self.per_session:
            return SESSION_MESSAGES
        if not self.global_rate.allow(now):
            return GLOBAL_RATE
        return None
