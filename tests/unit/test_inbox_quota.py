"""The sink's pure accounting (torroute.inbox.quota): Maildir quota with reservations, rates,
sessions; a property test that concurrent transactions never store more than the quota."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from torroute.inbox import quota
from torroute.inbox.quota import MessageRates, Quota, RateWindow, Sessions, Usage


def test_rate_window_slides() -> None:
    rate = RateWindow(3, 5.0)
    assert [rate.allow(t) for t in (0, 1, 2, 3)] == [True, True, True, False]
    assert rate.allow(5.0)  # the event at 0 left the window
    assert not rate.allow(5.5)


def test_ten_sessions_in_five_seconds_from_one_client_pass_the_defaults() -> None:
    from torroute.inbox.settings import SinkSettings

    s = SinkSettings(maildir="/x", listen=None, ephemeral_key="/k")  # type: ignore[arg-type]
    sessions = Sessions(s.max_sessions, s.client_sessions, s.rate_window)
    for i in range(10):
        assert sessions.connect("127.0.0.1", i * 0.5) is None
        sessions.closed()
    rates = MessageRates(s.max_messages_per_session, s.global_messages, s.rate_window)
    assert all(rates.mail(n, n * 0.01) is None for n in range(100))


def test_sessions_limit_and_peer_rate() -> None:
    sessions = Sessions(2, 3, 10.0)
    assert sessions.connect("a", 0) is None and sessions.connect("b", 0) is None
    assert sessions.connect("c", 0) == quota.TOO_MANY_SESSIONS
    assert sessions.connect("c", 0, room=True) is None  # the caller closed an idle one
    sessions.closed()
    sessions.closed()
    sessions.closed()
    assert sessions.connect("a", 1) is None and sessions.connect("a", 2) is None
    sessions.closed()
    sessions.closed()
    assert sessions.connect("a", 3) == quota.SESSION_RATE
    assert sessions.connect("a", 10.5) is None


def test_message_rates() -> None:
    rates = MessageRates(per_session=2, global_limit=3, window=10.0)
    assert rates.mail(0, 0) is None and rates.mail(1, 0) is None
    assert rates.mail(2, 0) == quota.SESSION_MESSAGES
    assert rates.mail(0, 1) is None
    assert rates.mail(0, 2) == quota.GLOBAL_RATE
    assert rates.mail(0, 10.5) is None


def test_reservations_and_admit() -> None:
    q = Quota(max_messages=2, max_total_size=1000, max_message_size=600)
    q.recount(Usage(1, 100), 0.0)
    a, b = object(), object()
    assert q.reserve(a) is None
    assert q.reserve(a) is None  # held already
    assert q.reserve(b) == quota.OVER_QUOTA  # one stored + a's promise = 2
    assert q.admit(a, 700) == quota.TOO_BIG
    assert q.admit(a, 500) is None
    q.stored(a, 500)
    assert q.usage == Usage(2, 600) and not q.reserved
    q.recount(Usage(0, 0), 1.0)  # the owner fetched everything
    assert q.reserve(b, 950) is None
    assert q.admit(object(), 100) == quota.OVER_QUOTA  # bytes: 950 promised


def test_recount_before_refusing_and_when_stale() -> None:
    q = Quota(1, 10**9, 10**6)
    assert q.needs_recount(0.0, refusing=False)  # never counted
    q.recount(Usage(0, 0), 0.0)
    assert not q.needs_recount(0.5, refusing=False)
    assert q.needs_recount(0.5, refusing=True)
    assert q.needs_recount(quota.RECOUNT_AFTER, refusing=False)


@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["rcpt", "store", "drop"]),
                          st.integers(0, 300)), max_size=80),
       st.integers(1, 6), st.integers(100, 2000))
@settings(max_examples=300, deadline=None)
def test_concurrent_transactions_never_exceed_the_quota(steps, max_messages, max_total) -> None:
    q = Quota(max_messages, max_total, 10**6)
    q.recount(Usage(), 0.0)
    holders = [object() for _ in range(6)]
    for who, action, size in steps:
        h = holders[who]
        if action == "rcpt":
            q.reserve(h)
        elif action == "store" and h in q.reserved and q.admit(h, size) is None:
            q.stored(h, size)
        else:
            q.release(h)
        assert q.usage.messages <= max_messages
        assert q.usage.size <= max_total
        assert q.usage.messages + len(q.reserved) <= max_messages
