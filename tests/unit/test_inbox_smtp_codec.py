"""The SMTP mode of the server codec (torroute.protocols.lmtp.SmtpServer), used by the sink:
EHLO/HELO, SIZE, one reply per DATA, STARTTLS, policy refusals; property tests for framing,
dot-unstuffing and hostile input (an error reply, never an exception)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from torroute.protocols import lmtp
from torroute.protocols.lmtp import (
    Close,
    LmtpServer,
    Policy,
    Send,
    SmtpServer,
    StartTls,
    Transaction,
)


def sent(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def codes(events) -> list[int]:
    return [int(line[:3]) for line in sent(events).split(b"\r\n") if line[:3].isdigit()
            and line[3:4] == b" "]


def smtp(**kwargs) -> SmtpServer:
    server = SmtpServer("mx.test", **kwargs)
    assert server.greeting() == b"220 mx.test ESMTP torroute sink\r\n"
    text = sent(server.feed(b"EHLO client.test\r\n"))
    assert text.startswith(b"250-mx.test\r\n") and text.endswith(b"\r\n")
    return server


def test_ehlo_advertises_size_and_data_gets_one_reply_for_many_recipients() -> None:
    server = SmtpServer("mx.test", max_size=10485760)
    text = sent(server.feed(b"EHLO client.test\r\n"))
    assert b"250-SIZE 10485760\r\n" in text and b"STARTTLS" not in text
    assert server.helo == "client.test"
    events = server.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@mx.test>\r\n"
                         b"RCPT TO:<c@mx.test>\r\nDATA\r\nSubject: s\r\n\r\nbody\r\n.\r\n")
    assert codes(events) == [250, 250, 250, 354]
    [txn] = [e for e in events if isinstance(e, Transaction)]
    assert txn.recipients == (b"b@mx.test", b"c@mx.test")
    assert server.data_reply_count == 1


def test_helo_is_accepted_lhlo_is_not() -> None:
    server = SmtpServer("mx.test")
    assert sent(server.feed(b"HELO old.test\r\n")) == b"250 mx.test\r\n"
    assert codes(server.feed(b"LHLO x\r\n")) == [500]
    assert codes(server.feed(b"MAIL FROM:<a@x.test>\r\n")) == [250]


def test_mail_before_ehlo_names_ehlo() -> None:
    server = SmtpServer("mx.test")
    assert sent(server.feed(b"MAIL FROM:<a@x.test>\r\n")) == b"503 5.5.1 EHLO first\r\n"


def test_declared_size_over_the_limit_is_552_at_mail() -> None:
    server = smtp(max_size=1000)
    assert sent(server.feed(b"MAIL FROM:<a@x.test> SIZE=1001\r\n")).startswith(b"552 5.3.4")
    assert codes(server.feed(b"MAIL FROM:<a@x.test> SIZE=1000\r\n")) == [250]
    assert server.declared_size == 1000


def test_actual_body_over_the_limit_is_one_552_and_no_transaction() -> None:
    server = smtp(max_size=2000)
    server.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@mx.test>\r\nRCPT TO:<c@mx.test>\r\n"
                b"DATA\r\n")
    events = server.feed(b"x" * 3000 + b"\r\n.\r\nNOOP\r\n")
    assert not [e for e in events if isinstance(e, Transaction)]
    assert sent(events) == b"552 5.3.4 message too big\r\n250 2.0.0 OK\r\n"


class Refuser(Policy):
    def __init__(self) -> None:
        self.mails: list[tuple[bytes, int | None]] = []

    def mail(self, sender, size):
        self.mails.append((sender, size))
        return lmtp.reply(451, "4.7.1", "slow down") if sender == b"fast@x.test" else None

    def rcpt(self, recipient, accepted):
        if not recipient.endswith(b"@mx.test"):
            return lmtp.reply(550, "5.7.1", "relay denied")
        return lmtp.reply(452, "4.2.2", "full") if recipient.startswith(b"full") else None


def test_policy_refusals_keep_the_session_in_its_state() -> None:
    policy = Refuser()
    server = smtp(policy=policy)
    assert sent(server.feed(b"MAIL FROM:<fast@x.test>\r\n")) == b"451 4.7.1 slow down\r\n"
    assert server.sender is None  # refused: no transaction
    server.feed(b"MAIL FROM:<a@x.test> SIZE=10\r\n")
    assert policy.mails[-1] == (b"a@x.test", 10)
    events = server.feed(b"RCPT TO:<v@foreign.test>\r\nRCPT TO:<full@mx.test>\r\n"
                         b"RCPT TO:<ok@mx.test>\r\nDATA\r\n")
    assert codes(events) == [550, 452, 250, 354]
    assert server.recipients == [b"ok@mx.test"]
    assert server.errors == 0  # a policy refusal is not a client error


def test_policy_421_at_mail_closes() -> None:
    class Closing(Policy):
        def mail(self, sender, size):
            return lmtp.reply(421, "4.7.0", "go away")

    server = smtp(policy=Closing())
    events = server.feed(b"MAIL FROM:<a@x.test>\r\nNOOP\r\n")
    assert isinstance(events[-1], Close) and server.closed and codes(events) == [421]


def test_starttls_drops_clear_input_and_needs_ehlo_again() -> None:
    server = SmtpServer("mx.test", starttls=True)
    assert b"250 STARTTLS\r\n" in sent(server.feed(b"EHLO c.test\r\n"))
    events = server.feed(b"STARTTLS\r\nMAIL FROM:<injected@x.test>\r\n")
    assert events == [Send(b"220 2.0.0 ready to start TLS\r\n"), StartTls()]
    assert server.feed(b"RCPT TO:<also@injected>\r\n") == []  # paused until the handshake
    server.tls_started()
    assert server.sender is None and server.tls
    assert codes(server.feed(b"MAIL FROM:<a@x.test>\r\n")) == [503]  # EHLO again
    text = sent(server.feed(b"EHLO c.test\r\n"))
    assert b"STARTTLS" not in text  # not twice
    assert codes(server.feed(b"STARTTLS\r\n")) == [502]


def test_starttls_not_offered() -> None:
    server = smtp()
    assert codes(server.feed(b"STARTTLS\r\n")) == [502]


def test_lmtp_keeps_its_dialect() -> None:
    server = LmtpServer()
    assert codes(server.feed(b"EHLO x\r\n")) == [500]
    assert sent(server.feed(b"HELO x\r\n")) == b"500 5.5.1 this is LMTP: LHLO expected\r\n"
    server.feed(b"LHLO x\r\n")
    assert sent(server.feed(b"STARTTLS\r\n")) == b"500 5.5.2 command not recognized\r\n"


# ---- properties

text_lines = st.lists(st.binary(max_size=120).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=30)


@given(text_lines, st.integers(min_value=1, max_value=50))
@settings(max_examples=200, deadline=None)
def test_any_body_round_trips_through_dot_stuffing_in_any_chunks(lines, chunk) -> None:
    server = smtp()
    server.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
    wire = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    wire += b".\r\n"
    events = []
    for i in range(0, len(wire), chunk):
        events += server.feed(wire[i:i + chunk])
    [txn] = [e for e in events if isinstance(e, Transaction)]
    assert txn.message == b"".join(ln + b"\n" for ln in lines)


@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=64))
@settings(max_examples=300, deadline=None)
def test_hostile_input_never_raises_and_replies_are_well_formed(data, chunk) -> None:
    server = SmtpServer("mx.test", max_size=5000, starttls=True, policy=Refuser())
    out = b""
    for i in range(0, len(data), chunk):
        for ev in server.feed(data[i:i + chunk]):
            if isinstance(ev, Send):
                out += ev.data
            elif isinstance(ev, StartTls):
                server.tls_started()
    for line in out.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-"), line
        assert all(0x20 <= c < 0x7F for c in line)


@given(st.lists(st.sampled_from([
    b"EHLO a.test", b"HELO a.test", b"MAIL FROM:<s@x.test>", b"MAIL FROM:<s@x.test> SIZE=99999",
    b"RCPT TO:<r@mx.test>", b"RCPT TO:<r@else.test>", b"RCPT TO:<full@mx.test>", b"DATA",
    b"RSET", b"NOOP", b"bogus", b"STARTTLS", b"VRFY x"]), max_size=40))
@settings(max_examples=300, deadline=None)
def test_one_reply_per_command_outside_data(commands) -> None:
    """Pipelining depends on it: every command line (outside DATA) gets exactly one reply."""
    server = SmtpServer("mx.test", max_size=1000, policy=Refuser())
    for cmd in commands:
        if server.closed:
            break
        if server.in_data:
            events = server.feed(b".\r\n")
            if not any(isinstance(e, Transaction) for e in events):
                assert len(codes(events)) == 1
            continue
        events = server.feed(cmd + b"\r\n")
        replies = codes(events)
        if StartTls() in events:
            server.tls_started()
        if server.closed:
            assert replies[-1] == 421
        else:
            assert len(replies) == 1, (cmd, events)


def test_spool_mode_streams_the_body_and_holds_pipelined_input() -> None:
    """With a spool the body never collects in memory, and the next message waits until the
    caller took the first (else its bytes would land in the first one's file)."""
    server = smtp()
    chunks: list[bytes] = []
    server.spool = chunks.append
    wire = (b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\nfirst\r\n..dot\r\n.\r\n"
            b"MAIL FROM:<c@x.test>\r\nRCPT TO:<d@mx.test>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n")
    events = server.feed(wire)
    [txn] = [e for e in events if isinstance(e, Transaction)]
    assert txn.message == b"" and b"".join(chunks) == b"first\n.dot\n"
    assert server.holding and codes(events) == [250, 250, 354]
    assert server.feed(b"NOOP\r\n") == []  # kept (after the QUIT already there) while holding
    chunks.clear()
    events = server.resume()
    [txn2] = [e for e in events if isinstance(e, Transaction)]
    assert txn2.sender == b"c@x.test" and b"".join(chunks) == b"second\n"
    assert server.holding
    events = server.resume()
    assert codes(events) == [221] and server.closed  # QUIT came first: NOOP never answered


def test_spool_mode_too_big_is_not_held() -> None:
    server = smtp(max_size=100)
    chunks: list[bytes] = []
    server.spool = chunks.append
    events = server.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n"
                         + b"y" * 300 + b"\r\n.\r\nNOOP\r\n")
    assert codes(events) == [250, 250, 354, 552, 250] and not server.holding


@given(st.lists(text_lines, min_size=1, max_size=4), st.integers(min_value=1, max_value=40))
@settings(max_examples=150, deadline=None)
def test_spooled_messages_split_exactly(messages, chunk) -> None:
    server = smtp()
    current: list[bytes] = []
    server.spool = current.append
    wire = b""
    for lines in messages:
        wire += b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n"
        wire += b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
        wire += b".\r\n"
    got: list[bytes] = []
    pending = [wire[i:i + chunk] for i in range(0, len(wire), chunk)]
    events = []
    while pending or events:
        if not events:
            events = server.feed(pending.pop(0))
        for ev in events:
            if isinstance(ev, Transaction):
                got.append(b"".join(current))
                current.clear()
        events = server.resume() if server.holding else []
    assert got == [b"".join(ln + b"\n" for ln in lines) for lines in messages]
