"""The pure LMTP server codec (torroute.protocols.lmtp): replies, transactions, limits, and
malformed input (an error reply, never an exception)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from torroute.protocols import lmtp
from torroute.protocols.lmtp import Close, LmtpServer, Send, Transaction


def sent(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def codes(events) -> list[int]:
    return [int(line[:3]) for line in sent(events).split(b"\r\n") if line[:3].isdigit()
            and line[3:4] == b" "]


def session(max_size: int = lmtp.DEFAULT_MAX_SIZE) -> LmtpServer:
    server = LmtpServer(max_size=max_size)
    assert server.greeting().startswith(b"220 ")
    events = server.feed(b"LHLO postfix.test\r\n")
    text = sent(events)
    assert text.startswith(b"250-") and b"250-PIPELINING\r\n" in text
    assert b"250-ENHANCEDSTATUSCODES" in text and text.endswith(b"\r\n")
    return server


def test_pipelined_transaction_then_more_commands() -> None:
    server = session()
    events = server.feed(b"MAIL FROM:<a@origin.test> SIZE=20 BODY=8BITMIME\r\n"
                         b"RCPT TO:<u@example.test>\r\nRCPT TO:<\"odd >name\"@pinned.test>\r\n"
                         b"DATA\r\n")
    assert codes(events) == [250, 250, 250, 354]
    events = server.feed(b"Subject: x\r\n\r\n..leading dot\r\nline\r\n.\r\nRSET\r\nQUIT\r\n")
    txn = [e for e in events if isinstance(e, Transaction)]
    assert txn == [Transaction(b"a@origin.test", (b"u@example.test", b'"odd >name"@pinned.test'),
                               b"Subject: x\n\n.leading dot\nline\n", False, True)]
    # replies after the transaction come after it, in order
    assert [type(e) for e in events] == [Transaction, Send, Send, Close]
    assert server.closed


def test_message_split_across_reads_and_null_sender() -> None:
    server = session()
    server.feed(b"MAIL FROM:<> SMTPUTF8\r\nRCPT TO:<b\xc3\xb8b@example.test>\r\nDATA\r\n")
    data = b"A: b\r\n\r\n" + b"x" * 5000 + b"\r\n.\r\n"
    events = []
    for i in range(0, len(data), 7):
        events += server.feed(data[i:i + 7])
    [txn] = [e for e in events if isinstance(e, Transaction)]
    assert txn.sender == b"" and txn.smtputf8 and txn.recipients == ("bøb@example.test".encode(),)
    assert txn.message == b"A: b\n\n" + b"x" * 5000 + b"\n"


def test_too_big_message_gets_552_per_recipient_and_no_transaction() -> None:
    server = session(max_size=2000)
    assert codes(server.feed(b"MAIL FROM:<a@o.test> SIZE=5000\r\n")) == [552]
    server.feed(b"MAIL FROM:<a@o.test>\r\nRCPT TO:<x@e.test>\r\nRCPT TO:<y@e.test>\r\nDATA\r\n")
    events = server.feed(b"y" * 3000 + b"\r\n.\r\n")
    assert not any(isinstance(e, Transaction) for e in events)
    assert codes(events) == [552, 552]
    assert codes(server.feed(b"NOOP\r\n")) == [250]  # the session goes on


def test_sequence_errors_and_bad_syntax() -> None:
    server = LmtpServer()
    assert codes(server.feed(b"EHLO x\r\n")) == [500]  # LMTP needs LHLO
    assert codes(server.feed(b"MAIL FROM:<a@b.test>\r\n")) == [503]
    server.feed(b"LHLO x\r\n")
    assert codes(server.feed(b"RCPT TO:<a@b.test>\r\n")) == [503]
    assert codes(server.feed(b"DATA\r\n")) == [503]
    assert codes(server.feed(b"MAIL FROM:a@b.test\r\n")) == [501]
    assert codes(server.feed(b"MAIL FROM:<a@b.test> FOO=1\r\n")) == [555]
    server.feed(b"MAIL FROM:<a@b.test>\r\n")
    assert codes(server.feed(b"RCPT TO:<nodomain>\r\n")) == [501]
    assert codes(server.feed(b"RCPT TO:<@route:a@b.test>\r\n")) == [501]
    assert codes(server.feed(b"RCPT TO:<a\x00@b.test>\r\n")) == [501]
    assert codes(server.feed(b"DATA\r\n")) == [503]
    assert codes(server.feed(b"X" * 5000 + b"\r\n")) == [500]
    assert codes(server.feed(b"NOOP\r\n")) == [250]


def test_too_many_errors_close_the_session() -> None:
    server = LmtpServer()
    events = server.feed(b"BOGUS\r\n" * 30)
    assert codes(events)[-1] == 421 and isinstance(events[-1], Close) and server.closed
    assert server.feed(b"NOOP\r\n") == []


def test_recipient_limit_is_a_temporary_refusal() -> None:
    server = LmtpServer(max_recipients=2)
    server.feed(b"LHLO x\r\nMAIL FROM:<a@b.test>\r\n")
    events = server.feed(b"".join(b"RCPT TO:<r%d@e.test>\r\n" % i for i in range(3)))
    assert codes(events) == [250, 250, 452]


def test_eof_in_data_drops_the_transaction() -> None:
    server = session()
    server.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@e.test>\r\nDATA\r\nhalf a message\r\n")
    events = server.eof()
    assert events == [Close("client closed the connection")]


def test_rcpt_reply_keeps_classes_and_sanitises() -> None:
    assert lmtp.rcpt_reply(550, "5.1.1", "host x said: 550 no\r\nINJECT") == \
        b"550 5.1.1 host x said: 550 no??INJECT\r\n"  # no reply splitting
    assert lmtp.rcpt_reply(250, "4.0.0", "mismatch").startswith(b"451 4.3.0 ")
    assert lmtp.rcpt_reply(999, "5.0.0", "bad").startswith(b"451 4.3.0 ")
    assert lmtp.data_replies([lmtp.rcpt_reply(250, "2.0.0", "ok")], 2).count(b"451 4.3.0") == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8), st.integers(1000, 5000))
def test_garbage_never_crashes_and_stays_bounded(chunks: list[bytes], max_size: int) -> None:
    server = LmtpServer(max_size=max_size)
    for chunk in [b"LHLO x\r\n", *chunks]:
        for ev in server.feed(chunk):
            if isinstance(ev, Send):
                for line in ev.data.split(b"\r\n")[:-1]:
                    assert line[:1] in b"2345" and line[:3].isdigit() and line.isascii()
            elif isinstance(ev, Transaction):
                assert len(ev.message) <= max_size and ev.recipients
    assert len(server._buffer) <= lmtp.MAX_LINE + 1 or server.in_data or server.closed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200).filter(lambda b: b"\n" not in b and b"\r" not in b),
                max_size=20), st.integers(1, 50))
def test_any_body_round_trips_through_dot_stuffing(lines: list[bytes], step: int) -> None:
    from torroute.protocols.smtp import dot_stuff

    body = b"".join(line + b"\n" for line in lines)
    server = session()
    server.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@e.test>\r\nDATA\r\n")
    wire = dot_stuff(body)  # what an SMTP/LMTP client sends
    events = []
    for i in range(0, len(wire), step):
        events += server.feed(wire[i:i + step])
    [txn] = [e for e in events if isinstance(e, Transaction)]
    assert txn.message == body
