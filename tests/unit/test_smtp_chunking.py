"""The SMTP client's BDAT (RFC 3030 CHUNKING): what is sent when, what each reply decides, and
when a transaction on a kept connection may run again -- pure, no sockets (the real servers:
tests/testnet/test_chunking.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.smtp_client import greet, make_client, sent

from torroute.protocols.smtp import (
    BOUNCED,
    DATA,
    DEFERRED,
    DELIVERED,
    Close,
    Send,
    SmtpClient,
)

EHLO_CHUNKING = (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-CHUNKING\r\n"
                 b"250 ENHANCEDSTATUSCODES\r\n")
EHLO_CHUNKING_ONLY = b"250-mx.test\r\n250 CHUNKING\r\n"
MESSAGE = b"Subject: x\n\n.leading dot\nhello\n"
PAYLOAD = b"Subject: x\r\n\r\n.leading dot\r\nhello\r\n"  # CRLF, no dot-stuffing
BDAT = b"BDAT %d LAST\r\n" % len(PAYLOAD) + PAYLOAD
RCPTS = [b"a@x.test", b"b@x.test"]


def client(rcpts=(b"a@x.test",), message=MESSAGE, **opts) -> SmtpClient:
    return make_client(b"s@o.test", rcpts, message, **opts)


def greeted(c: SmtpClient, ehlo: bytes = EHLO_CHUNKING) -> list:
    return greet(c, ehlo)


def test_one_recipient_envelope_and_message_in_one_write() -> None:
    c = client()
    actions = greeted(c)
    size = len(MESSAGE) + MESSAGE.count(b"\n")
    assert actions == [Send(b"MAIL FROM:<s@o.test> SIZE=%d\r\nRCPT TO:<a@x.test>\r\n" % size
                            + BDAT, bulk=True)]
    assert c.reply_deadline == DATA  # a server may hold MAIL's reply until it read the chunk
    assert c.receive(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n") == []
    assert c.receive(b"250 2.0.0 queued as Q\r\n") == [Send(b"QUIT\r\n"), Close()]
    assert c.outcome.status == DELIVERED and "(in reply to BDAT)" in c.outcome.text
    assert not c.retryable and not c.may_try_next  # the message went


def test_refused_recipient_keeps_its_own_reply_not_the_no_valid_recipients_one() -> None:
    for rcpt, status, dsn in ((b"451 4.2.0 later", DEFERRED, "4.2.0"),
                              (b"550 5.1.1 unknown", BOUNCED, "5.1.1")):
        c = client()
        greeted(c)
        c.receive(b"250 ok\r\n" + rcpt + b"\r\n")
        c.receive(b"554 5.5.1 Error: no valid recipients\r\n")
        assert (c.outcome.status, c.outcome.dsn) == (status, dsn)
        assert "RCPT TO:<a@x.test>" in c.outcome.text


def test_mail_refused_decides() -> None:
    c = client()
    greeted(c)
    c.receive(b"452 4.3.1 full\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    assert (c.outcome.status, c.outcome.dsn) == (DEFERRED, "4.3.1")
    assert "MAIL FROM" in c.outcome.text


def test_per_recipient_partial_goes_to_the_accepted_ones() -> None:
    c = client(RCPTS, per_recipient=True)
    assert sent(greeted(c)).endswith(b"RCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n" + BDAT)
    c.receive(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 2.0.0 queued\r\n")
    assert [o.status for o in c.recipient_outcomes()] == [DELIVERED, BOUNCED]


def test_all_or_nothing_waits_for_every_rcpt_before_the_message() -> None:
    c = client(RCPTS)
    assert BDAT not in sent(greeted(c))  # the pipe: one status for all
    assert sent(c.receive(b"250 ok\r\n250 ok\r\n250 ok\r\n")) == BDAT
    c.receive(b"250 2.0.0 queued\r\n")
    assert c.outcome.status == DELIVERED
    c = client(RCPTS)
    greeted(c)
    assert sent(c.receive(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n")) == b"QUIT\r\n"  # nothing sent
    assert c.outcome.dsn == "4.5.3"


def test_chunking_without_pipelining_one_step_at_a_time() -> None:
    c = client()
    assert sent(greeted(c, EHLO_CHUNKING_ONLY)) == b"MAIL FROM:<s@o.test>\r\n"
    assert sent(c.receive(b"250 ok\r\n")) == b"RCPT TO:<a@x.test>\r\n"
    assert sent(c.receive(b"250 ok\r\n")) == BDAT
    c.receive(b"250 2.0.0 ok\r\n")
    assert c.outcome.status == DELIVERED


def test_chunking_off_or_not_offered_uses_data() -> None:
    for c, ehlo in ((client(chunking=False), EHLO_CHUNKING),
                    (client(), EHLO_CHUNKING.replace(b"250-CHUNKING\r\n", b""))):
        assert sent(greeted(c, ehlo)).endswith(b"DATA\r\n")


def test_empty_message_is_bdat_zero_last() -> None:
    c = client(message=b"")
    assert sent(greeted(c)).endswith(b"RCPT TO:<a@x.test>\r\nBDAT 0 LAST\r\n")


def test_no_final_newline_gets_crlf() -> None:
    c = client(message=b"Subject: x\n\nno newline")
    assert sent(greeted(c)).endswith(b"BDAT 26 LAST\r\nSubject: x\r\n\r\nno newline\r\n")


def test_lost_after_the_chunk_is_delivery_unknown_and_not_retried() -> None:
    c = client()
    greeted(c)
    c.receive(b"250 ok\r\n250 ok\r\n")
    out = c.connection_lost("reset")
    assert out.status == DEFERRED and "delivery unknown" in out.text
    assert not c.retryable and not c.may_try_next


# ---- a kept connection (the LMTP relay's pool): RSET + the whole transaction in one write


def resumed(rcpts=(b"a@x.test",)) -> tuple[SmtpClient, list]:
    c = client(rcpts, per_recipient=True, keep_alive=True)
    return c, c.resume({"PIPELINING": "", "CHUNKING": ""})


def test_resume_sends_rset_envelope_and_message_together_and_stays_reusable() -> None:
    c, actions = resumed()
    assert actions == [Send(b"RSET\r\nMAIL FROM:<s@o.test>\r\nRCPT TO:<a@x.test>\r\n" + BDAT,
                            bulk=True)]
    assert c.receive(b"250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n") == [Close()]
    assert c.outcome.status == DELIVERED and c.reusable


@pytest.mark.parametrize("how, retryable", [
    ("closed before any reply", True),     # the server had dropped the idle session
    ("RSET refused", True),                # 421: it says so, and takes nothing
    ("timeout before any reply", False),   # silent: it may be working on the message
    ("closed after RSET's 250", False),    # it took the commands: delivery unknown
    ("closed after MAIL's 250", False),
])
def test_stale_kept_connection_is_retryable_only_if_nothing_was_answered(
        how: str, retryable: bool) -> None:
    c, _ = resumed()
    if how == "closed before any reply":
        c.connection_lost("connection closed")
    elif how == "RSET refused":
        assert c.receive(b"421 4.4.2 idle timeout\r\n") == [Close()]
    elif how == "timeout before any reply":
        c.timed_out(600)
    elif how == "closed after RSET's 250":
        c.receive(b"250 ok\r\n")
        c.connection_lost("connection closed")
    else:
        c.receive(b"250 ok\r\n250 ok\r\n")
        c.connection_lost("connection closed")
    assert c.outcome.status == DEFERRED
    assert c.retryable is retryable, how
    assert not c.may_try_next or how == "closed before any reply"


def test_fresh_connection_lost_before_any_reply_after_the_chunk_is_not_retryable() -> None:
    c = client()
    greeted(c)
    c.connection_lost("connection closed")  # MAIL, RCPT and the message went, no reply
    assert not c.retryable


# ---- any replies: the outcome per recipient is what the replies say, never a crash

CODES = st.sampled_from([250, 251, 421, 450, 451, 452, 500, 503, 550, 551, 552, 554])


@given(st.integers(1, 4), CODES, st.lists(CODES, min_size=4, max_size=4), CODES,
       st.booleans(), st.integers(0, 3))
def test_any_replies_give_the_modelled_outcome_per_recipient(
        n: int, mail: int, rcpts: list[int], bdat: int, per_recipient: bool,
        cut: int) -> None:
    rcpt_codes = rcpts[:n]
    c = client([b"r%d@x.test" % i for i in range(n)], per_recipient=per_recipient)
    wire = sent(greeted(c))
    replies = [mail, *rcpt_codes]
    chunk_now = n == 1 or per_recipient
    assert (BDAT in wire) is chunk_now
    feed = b"".join(b"%d %d.0.0 r\r\n" % (code, code // 100) for code in replies)
    actions = c.receive(feed)
    if not chunk_now and c.outcome is None:  # all or nothing: the message after the RCPTs
        assert sent(actions) == BDAT
    if c.outcome is None:
        c.receive(b"%d %d.0.0 final\r\n" % (bdat, bdat // 100))
    assert c.outcome is not None and c.phase == "closed"
    cls = {2: DELIVERED, 4: DEFERRED, 5: BOUNCED}
    if mail // 100 != 2:
        want = [cls[mail // 100]] * n
    elif per_recipient:
        accepted = [code // 100 == 2 for code in rcpt_codes]
        if not any(accepted):
            want = [cls[code // 100] for code in rcpt_codes]
        else:
            want = [cls[bdat // 100] if ok else cls[code // 100]
                    for ok, code in zip(accepted, rcpt_codes, strict=True)]
    else:
        refused = [code for code in rcpt_codes if code // 100 != 2]
        if not refused:
            want = [cls[bdat // 100]] * n
        elif len(refused) == n and all(code // 100 == 5 for code in refused):
            want = [BOUNCED] * n
        else:
            want = [DEFERRED] * n
    got = [o.status for o in c.recipient_outcomes()] if per_recipient else [c.outcome.status] * n
    assert got == want
    # the message went at most once, whole, and only in a BDAT of its exact size
    assert (wire + sent(actions)).count(PAYLOAD) <= 1
