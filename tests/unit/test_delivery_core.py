"""torroute.delivery.session (the I/O steps of one SMTP session) and torroute.delivery.targets
(the SRV target plan): pure, no sockets."""

from __future__ import annotations

import pytest

from torroute.delivery.session import LAST_WORDS, Handshake, Read, TimedOut, Write, session_steps
from torroute.delivery.settings import DeliverSettings
from torroute.delivery.targets import TargetPlan
from torroute.protocols.smtp import (
    COMMAND,
    DATA,
    DEFERRED,
    DELIVERED,
    Options,
    Outcome,
    Send,
    SmtpClient,
    temporary,
)

EHLO = b"250-s\r\n250 PIPELINING\r\n"


def run(results: list, starttls: str = "no", **settings) -> tuple[Outcome, list, SmtpClient]:
    """Drive session_steps with canned I/O results; the outcome, the steps, the client."""
    client = SmtpClient(b"a@origin.test", [b"b@example.test"], b"hi\n",
                        Options(destination="o:25", starttls=starttls))
    steps = session_steps(client, DeliverSettings(command_timeout=7, data_timeout=9, **settings),
                          "o.onion", ["example.test"])
    seen, got = [], None
    try:
        while True:
            seen.append(steps.send(got))
            got = results.pop(0)
    except StopIteration as done:
        return done.value, seen, client


def test_deadlines_come_from_the_machine() -> None:
    assert Send(b"x").deadline == COMMAND and Send(b"x", bulk=True).deadline == DATA
    out, steps, _ = run([b"220 hi\r\n", None, EHLO, None, b"250 ok\r\n250 ok\r\n354 go\r\n",
                         None, b"250 2.0.0 stored\r\n", None])
    assert out.status == DELIVERED
    assert [(type(s).__name__, s.seconds) for s in steps] == [
        ("Read", 7), ("Write", 7), ("Read", 7), ("Write", 7), ("Read", 7),
        ("Write", 9), ("Read", 9), ("Write", 7)]  # the body and its final reply: data_timeout
    assert steps[-1].data == b"QUIT\r\n"


def test_timeout_eof_and_reset_defer() -> None:
    out, _, client = run([TimedOut(3)])
    assert (out.status, out.dsn) == (DEFERRED, "4.4.2") and "timeout after 3s" in out.text
    assert client.may_try_next and client.retryable
    out, _, _ = run([b""])
    assert "connection closed by the server" in out.text
    out, _, _ = run([ConnectionResetError(104, "Connection reset by peer")])
    assert out.dsn == "4.4.2" and "Connection reset by peer" in out.text


def test_after_a_failed_write_the_servers_last_words_decide() -> None:
    out, steps, _ = run([b"220 hi\r\n", BrokenPipeError(32, "Broken pipe"), b"421 4.3.2 bye\r\n"])
    assert steps[-2:] == [Write(b"EHLO localhost\r\n", 7), Read(LAST_WORDS)]
    assert out.dsn == "4.3.2" and "421 4.3.2 bye" in out.text
    out, _, _ = run([b"220 hi\r\n", BrokenPipeError(32, "Broken pipe"), b""])
    assert out.dsn == "4.4.2" and "Broken pipe" in out.text


def test_lost_after_the_message_is_not_retryable() -> None:
    out, _, client = run([b"220 hi\r\n", None, EHLO, None, b"250 ok\r\n250 ok\r\n354 go\r\n",
                          None, TimedOut(9)])
    assert out.status == DEFERRED and "delivery unknown" in out.text
    assert not client.retryable and not client.may_try_next


def test_a_4xx_to_mail_is_retryable_but_not_for_the_next_target() -> None:
    out, _, client = run([b"220 hi\r\n", None, EHLO, None,
                          b"421 4.4.2 idle\r\n550 x\r\n554 x\r\n", None])
    assert out.status == DEFERRED and client.retryable and not client.may_try_next


@pytest.mark.parametrize("result, dsn, text", [
    ({"subjectAltName": (("DNS", "other.test"),)}, "4.7.5", "certificate is for other.test"),
    (TimedOut(7), "4.4.2", "TLS handshake failed: timeout after 7s"),
])
def test_starttls_handshake_and_certificate(result, dsn: str, text: str) -> None:
    ehlo = b"250-s\r\n250-STARTTLS\r\n250 PIPELINING\r\n"
    out, steps, client = run([b"220 hi\r\n", None, ehlo, None, b"220 go\r\n", result],
                             starttls="required", tls_verify=True)
    assert isinstance(steps[-1], Handshake) and steps[-1].seconds == 7
    assert out.dsn == dsn and text in out.text and client.may_try_next


def test_starttls_verified_certificate_goes_on_with_ehlo() -> None:
    cert = {"subjectAltName": (("DNS", "mx.example.test"),)}
    _, steps, _ = run([b"220 hi\r\n", None, b"250-s\r\n250 STARTTLS\r\n", None, b"220 go\r\n",
                       cert, None, TimedOut(7)], starttls="required", tls_verify=True)
    assert isinstance(steps[-2], Write) and steps[-2].data == b"EHLO localhost\r\n"


# ---- the target plan


DOWN = temporary("4.4.1", "a down")


def test_plan_next_target_only_after_a_failure_before_mail() -> None:
    plan = TargetPlan([("a", 25), ("b", 25), ("c", 25)], recipients=2)
    assert plan.next() == ("a", 25)
    plan.record([DOWN, DOWN], may_try_next=True)
    assert plan.upcoming() == ("b", 25) and plan.next() == ("b", 25)
    plan.record([Outcome(DELIVERED, "2.0.0", "ok"), temporary("4.2.1", "full")], False)
    assert plan.next() is None
    first, second = plan.outcomes()
    assert first.text == "via backup: ok (after the earlier SRV target: a down)"
    assert second.dsn == "4.2.1" and second.text.startswith("via backup: full")


def test_plan_none_reached_and_time_limit() -> None:
    plan = TargetPlan([("a", 25), ("b", 25), ("c", 25)])
    plan.next()
    plan.record([DOWN], True)
    plan.next()
    plan.record([temporary("4.4.1", "b down")], True)
    assert plan.next(time_left=0) is None  # a further target only within the time limit
    assert plan.outcomes() == [Outcome(DEFERRED, "4.4.1",
                                       "none of 2 SRV targets reached: a down | b down")]
    one = TargetPlan([("a", 25)])
    assert one.next(time_left=0) == ("a", 25)  # the first is always tried
    one.record([DOWN], True)
    assert one.next() is None and one.outcomes() == [DOWN]


def test_plan_lazy_backups() -> None:
    plan = TargetPlan([("a", 25)], backups_known=False)
    plan.next()
    assert not plan.wants_backups()  # nothing failed yet
    plan.record([DOWN], True)
    assert plan.wants_backups() and not plan.wants_backups(time_left=0)
    plan.add_backups([("b", 25)])
    assert not plan.wants_backups() and plan.next() == ("b", 25)
    broken = TargetPlan([("a", 25)], backups_known=False)
    broken.next()
    broken.record([DOWN], True)
    broken.add_backups([], "routing failed: MapError: /etc/map.txt:3")
    assert broken.next() is None
    assert broken.outcomes()[0].text == (
        "a down (further SRV targets unknown: routing failed: MapError: /etc/map.txt:3)")
    delivered = TargetPlan([("a", 25)], backups_known=False)
    delivered.next()
    delivered.record([Outcome(DELIVERED, "2.0.0", "ok")], False)
    assert not delivered.wants_backups()  # the success path never loads the maps
