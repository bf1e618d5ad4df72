"""torroute.protocols.smtp (pure SMTP client state machine) and deliver's pure helpers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.onions import ONION_A
from support.smtp_client import greet, make_client, sent

from torroute.delivery.envelope import envelope_sender
from torroute.delivery.pipe import parse_nexthop
from torroute.delivery.targets import socks_outcome
from torroute.protocols.smtp import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    Close,
    Options,
    ProtocolError,
    Reply,
    ReplyParser,
    Send,
    SmtpClient,
    StartTLS,
    dot_stuff,
    parse_ehlo,
    recipients_outcome,
)
from torroute.protocols.socks5 import socks_error

EHLO_FULL = (b"250-sink.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n"
             b"250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n")
EHLO_PLAIN = b"250-sink.test\r\n250 SIZE\r\n"


def client(rcpts=(b"bob@example.test",), message=b"Subject: x\n\nhello\n", **opts) -> SmtpClient:
    return make_client(b"alice@origin.test", rcpts, message, **opts)


def to_ehlo(c: SmtpClient, ehlo: bytes = EHLO_FULL) -> list:
    return greet(c, ehlo, b"220 sink ESMTP\r\n")


# ---- replies


def test_reply_parser_multiline_split_anywhere() -> None:
    data = b"250-first\r\n250-second\r\n250 last\r\n220 next\r\n"
    for cut in range(len(data) + 1):
        parser = ReplyParser()
        replies = parser.feed(data[:cut]) + parser.feed(data[cut:])
        assert replies == [Reply(250, ("first", "second", "last")), Reply(220, ("next",))]


@pytest.mark.parametrize("line", [b"HTTP/1.1 400 Bad\r\n", b"25\r\n", b"250x\r\n",
                                  b"650 what\r\n"])
def test_reply_parser_rejects_garbage(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(line)


def test_reply_parser_rejects_code_change_and_huge_lines() -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"250-a\r\n251 b\r\n")
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"2" * (2 << 20))


def test_enhanced_code_only_of_the_same_class() -> None:
    assert Reply(550, ("5.1.1 no such user",)).enhanced == "5.1.1"
    assert Reply(550, ("4.1.1 confused server",)).enhanced is None
    assert Reply(451, ("try later",)).enhanced is None
    assert Reply(250, ("2.0.0",)).enhanced == "2.0.0"


def test_parse_ehlo() -> None:
    ext = parse_ehlo(ReplyParser().feed(EHLO_FULL)[0])
    assert ext == {"PIPELINING": "", "SIZE": "1000000", "8BITMIME": "", "SMTPUTF8": "",
                   "ENHANCEDSTATUSCODES": ""}


# ---- dot stuffing


def test_dot_stuff() -> None:
    assert dot_stuff(b".a\n..b\nc.\n.\n") == b"..a\r\n...b\r\nc.\r\n..\r\n.\r\n"
    assert dot_stuff(b"no newline") == b"no newline\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"


@given(st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), max_size=20))
def test_dot_stuff_round_trip(lines: list[bytes]) -> None:
    """What a server un-stuffs is the message with CRLF line ends, and '.' ends it once."""
    message = b"".join(line + b"\n" for line in lines)
    wire = dot_stuff(message)
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[:-3] if wire != b".\r\n" else b""
    out_lines = body.split(b"\r\n")[:-1] if body else []
    assert b"." not in out_lines  # the terminator appears only at the end
    unstuffed = [ln[1:] if ln.startswith(b".") else ln for ln in out_lines]
    assert b"".join(ln + b"\r\n" for ln in unstuffed) == message.replace(b"\n", b"\r\n")


# ---- whole transactions


def test_pipelined_single_recipient_delivered() -> None:
    c = client()
    actions = to_ehlo(c)
    assert sent(actions) == (b"MAIL FROM:<alice@origin.test> SIZE=21\r\n"
                             b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert c.receive(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n") == []
    actions = c.receive(b"354 go\r\n")
    assert actions == [Send(b"Subject: x\r\n\r\nhello\r\n.\r\n", bulk=True)]
    assert c.phase == "data-end"
    actions = c.receive(b"250 2.0.0 queued as X\r\n")
    assert actions == [Send(b"QUIT\r\n"), Close()]
    assert c.outcome.status == DELIVERED and c.outcome.exit_code == 0
    assert "250 2.0.0 queued as X" in c.outcome.text


def test_without_pipelining_one_command_at_a_time_and_helo_fallback() -> None:
    c = client(rcpts=[b"a@x.test", b"b@x.test"])
    c.receive(b"220 old\r\n")
    assert sent(c.receive(b"502 what is EHLO\r\n")) == b"HELO localhost\r\n"
    assert sent(c.receive(b"250 hi\r\n")) == b"MAIL FROM:<alice@origin.test>\r\n"
    assert sent(c.receive(b"250 ok\r\n")) == b"RCPT TO:<a@x.test>\r\n"
    assert sent(c.receive(b"250 ok\r\n")) == b"RCPT TO:<b@x.test>\r\n"
    assert sent(c.receive(b"250 ok\r\n")) == b"DATA\r\n"
    assert c.receive(b"354 go\r\n")[0].bulk
    c.receive(b"250 ok\r\n")
    assert c.outcome.status == DELIVERED


def test_remote_5xx_rcpt_bounces_with_remote_text_and_drops_pipelined_data() -> None:
    c = client()
    to_ehlo(c)
    actions = c.receive(b"250 ok\r\n550 5.1.1 <bob@example.test>: no such user\r\n"
                        b"354 go ahead anyway\r\n")
    assert actions == [Close()]  # no '.': that would deliver an empty message
    assert c.outcome.status == BOUNCED and c.outcome.exit_code == 69
    assert c.outcome.dsn == "5.1.1"
    assert "550 5.1.1 <bob@example.test>: no such user" in c.outcome.line()
    assert c.outcome.line().startswith("5.1.1 ")


def test_remote_4xx_defers_and_quits() -> None:
    c = client()
    to_ehlo(c)
    actions = c.receive(b"250 ok\r\n451 4.3.0 try later\r\n503 no valid recipients\r\n")
    assert actions == [Send(b"QUIT\r\n"), Close()]
    assert (c.outcome.status, c.outcome.dsn, c.outcome.exit_code) == (DEFERRED, "4.3.0", 75)


def test_reply_without_enhanced_code_gets_a_class_default() -> None:
    c = client()
    to_ehlo(c, EHLO_PLAIN)
    c.receive(b"550 go away\r\n")
    assert c.outcome.line().startswith("5.0.0 ")
    c = client()
    to_ehlo(c, EHLO_PLAIN)
    c.receive(b"452 mailbox full\r\n")
    assert c.outcome.line().startswith("4.0.0 ") and c.outcome.exit_code == 75


def test_final_dot_reply_decides() -> None:
    for final, status in [(b"554 5.7.1 spam\r\n", BOUNCED), (b"451 4.7.1 later\r\n", DEFERRED)]:
        c = client()
        to_ehlo(c)
        c.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
        c.receive(final)
        assert c.outcome.status == status


def test_mail_from_rejected() -> None:
    c = client()
    to_ehlo(c)
    c.receive(b"553 5.1.8 bad sender\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need RCPT\r\n")
    assert c.outcome.dsn == "5.1.8" and "MAIL FROM" in c.outcome.text


def test_greeting_5xx_defers_like_postfix() -> None:
    c = client()
    c.receive(b"554 no service for you\r\n")
    assert c.outcome.status == DEFERRED and "554 no service" in c.outcome.text


def test_lost_connection_and_timeout_defer() -> None:
    c = client()
    to_ehlo(c)
    c.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
    out = c.connection_lost("Connection reset by peer")
    assert (out.status, out.dsn) == (DEFERRED, "4.4.2") and "reset" in out.text
    c = client()
    out = c.timed_out(300)
    assert out.status == DEFERRED and "timeout after 300s" in out.text


def test_protocol_garbage_defers() -> None:
    c = client()
    actions = c.receive(b"SSH-2.0-OpenSSH\r\n")
    assert actions == [Close()] and c.outcome.status == DEFERRED


def test_size_limit_bounces_before_mail() -> None:
    c = client(message=b"x" * 2000)
    actions = to_ehlo(c, b"250-s\r\n250 SIZE 1000\r\n")
    assert sent(actions) == b"QUIT\r\n"
    assert (c.outcome.status, c.outcome.dsn) == (BOUNCED, "5.3.4")


def test_8bit_and_smtputf8_parameters() -> None:
    c = SmtpClient("ålice@örigin.test".encode(), ["bøb@example.test".encode()],
                   "Subject: ünïcode\n\nbody ü\n".encode(), Options())
    mail = sent(to_ehlo(c)).split(b"\r\n")[0]
    assert mail.startswith("MAIL FROM:<ålice@örigin.test>".encode())
    assert b"BODY=8BITMIME" in mail and b"SMTPUTF8" in mail


def test_8bit_headers_request_smtputf8_when_offered_ascii_envelope() -> None:
    c = client(message="Subject: ü\n\nx\n".encode())
    mail = sent(to_ehlo(c)).split(b"\r\n")[0]
    assert b"SMTPUTF8" in mail and b"BODY=8BITMIME" in mail
    c = client(message="Subject: u\n\nbody ü\n".encode())
    mail = sent(to_ehlo(c)).split(b"\r\n")[0]
    assert b"SMTPUTF8" not in mail and b"BODY=8BITMIME" in mail


def test_utf8_address_without_smtputf8_bounces() -> None:
    c = client(rcpts=["bøb@example.test".encode()])
    to_ehlo(c, b"250-s\r\n250 8BITMIME\r\n")
    assert (c.outcome.status, c.outcome.dsn) == (BOUNCED, "5.6.7")


def test_null_sender() -> None:
    c = SmtpClient(b"", [b"bob@example.test"], b"x\n", Options())
    assert sent(to_ehlo(c)).startswith(b"MAIL FROM:<> SIZE=")


def test_starttls_modes() -> None:
    c = client(starttls="opportunistic")
    assert sent(to_ehlo(c, b"250-s\r\n250 STARTTLS\r\n")) == b"STARTTLS\r\n"
    assert c.receive(b"220 go ahead\r\n") == [StartTLS()]
    assert sent(c.tls_started()) == b"EHLO localhost\r\n"
    assert sent(c.receive(b"250-s\r\n250 PIPELINING\r\n")).startswith(b"MAIL FROM:")
    c = client(starttls="opportunistic")
    assert sent(to_ehlo(c, b"250 s\r\n")).startswith(b"MAIL FROM:")  # not offered: plain
    c = client(starttls="required")
    to_ehlo(c, b"250 s\r\n")
    assert (c.outcome.status, c.outcome.dsn) == (DEFERRED, "4.7.4")
    c = client()  # default: never STARTTLS over the onion
    assert sent(to_ehlo(c, b"250-s\r\n250 STARTTLS\r\n")).startswith(b"MAIL FROM:")


def test_ehlo_name_is_configurable() -> None:
    c = client(ehlo_name="abc.onion")
    assert sent(c.receive(b"220 s\r\n")) == b"EHLO abc.onion\r\n"


# ---- several recipients: all or nothing


RCPTS = [b"a@x.test", b"b@x.test", b"c@x.test"]


def multi(replies: bytes) -> SmtpClient:
    c = client(rcpts=RCPTS)
    actions = to_ehlo(c)
    assert sent(actions).endswith(b"RCPT TO:<c@x.test>\r\n")  # no DATA before the verdicts
    c.receive(b"250 ok\r\n" + replies)
    return c


def test_multi_all_accepted_then_data() -> None:
    c = multi(b"250 ok\r\n250 ok\r\n250 ok\r\n")
    assert c.outcome is None
    assert sent(c.receive(b"354 go\r\n")).endswith(b".\r\n")
    c.receive(b"250 2.0.0 ok\r\n")
    assert c.outcome.status == DELIVERED


def test_multi_partial_refusal_sends_nothing_and_defers() -> None:
    c = multi(b"250 ok\r\n550 5.1.1 no such user\r\n250 ok\r\n")
    assert c.outcome.status == DEFERRED and c.outcome.dsn == "4.5.3"
    assert "recipient_limit = 1" in c.outcome.text and "550 5.1.1" in c.outcome.text
    assert c._data is None  # DATA never sent


def test_multi_all_refused_permanently_bounces() -> None:
    c = multi(b"550 5.1.1 a\r\n550 5.1.1 b\r\n553 5.1.3 c\r\n")
    assert c.outcome.status == BOUNCED and c.outcome.dsn == "5.1.1"


def test_multi_all_refused_some_temporarily_defers() -> None:
    c = multi(b"550 5.1.1 a\r\n450 4.2.1 b\r\n550 5.1.1 c\r\n")
    assert c.outcome.status == DEFERRED and c.outcome.dsn == "4.2.1"


def test_recipients_outcome_none_when_all_accepted() -> None:
    assert recipients_outcome([Reply(250, ("ok",))] * 2, RCPTS[:2], "d") is None


# ---- pure helpers of the delivery program


@pytest.mark.parametrize("text,expect", [
    (f"[{ONION_A}]:2525", (ONION_A, 2525)),
    (f"{ONION_A}:26", (ONION_A, 26)),
    (f"[{ONION_A}]", (ONION_A, 25)),
    (ONION_A, (ONION_A, 25)),
    (f"torroute:[{ONION_A.upper()}]:25", (ONION_A, 25)),
])
def test_parse_nexthop(text: str, expect: tuple[str, int]) -> None:
    assert parse_nexthop(text) == expect


@pytest.mark.parametrize("text", ["", "[x.onion", "[x.onion]junk", "x.onion:0", "x.onion:99999",
                                  "x.onion:port", "[]:25", "a b.onion"])
def test_parse_nexthop_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nexthop(text)


def test_envelope_sender() -> None:
    assert envelope_sender("") == b"" and envelope_sender("MAILER-DAEMON") == b""
    assert envelope_sender("<>") == b""
    assert envelope_sender('"a b"@x.test') == b'"a b"@x.test'


@pytest.mark.parametrize("code,status,dsn", [
    (0xF6, BOUNCED, "5.1.2"), (0xF4, BOUNCED, "5.7.1"), (0xF5, BOUNCED, "5.7.1"),
    (0xF0, DEFERRED, "4.4.1"), (0xF2, DEFERRED, "4.4.1"), (0xF3, DEFERRED, "4.4.1"),
    (0xF7, DEFERRED, "4.4.1"), (0x01, DEFERRED, "4.4.1"), (0x06, DEFERRED, "4.4.1"),
    (0x99, DEFERRED, "4.4.1"), (None, DEFERRED, "4.4.1"),
])
def test_socks_outcome(code: int | None, status: str, dsn: str) -> None:
    destination = f"{ONION_A}:25"
    out = socks_outcome(socks_error(code, destination), destination, ("127.0.0.1", 9050), 120)
    assert (out.status, out.dsn) == (status, dsn)


def test_socks_outcome_tor_down_and_timeout() -> None:
    out = socks_outcome(ConnectionRefusedError(111, "Connection refused"), "x:25",
                        ("127.0.0.1", 9050), 120)
    assert out.status == DEFERRED and "SocksPort 127.0.0.1:9050 unreachable" in out.text
    out = socks_outcome(TimeoutError(), "x:25", ("127.0.0.1", 9050), 120)
    assert out.status == DEFERRED and "timed out after 120s" in out.text


# ---- may the next MX (a further SRV target) be tried?


def _greeted(reply: bytes, **opts) -> SmtpClient:
    c = client(**opts)
    c.receive(reply)
    return c


@pytest.mark.parametrize("case, expect", [
    ("421 greeting", True), ("554 greeting", True), ("lost before greeting", True),
    ("silent greeting", True), ("421 to EHLO", True), ("starttls not offered", True),
    ("certificate refused", True), ("lost after MAIL sent", True),
    ("451 to MAIL", False), ("550 to RCPT", False), ("450 to RCPT", False),
    ("554 to DATA", False), ("lost while sending", False), ("lost after the message", False),
    ("size bounce", False), ("delivered", False),
])
def test_may_try_next_only_before_the_server_judged_and_before_the_message(
        case: str, expect: bool) -> None:
    """What the backup-target logic of the pipe and the relay rests on."""
    c = client()
    if case == "421 greeting":
        c.receive(b"421 4.3.2 busy\r\n")
    elif case == "554 greeting":
        c.receive(b"554 no service\r\n")
    elif case == "lost before greeting":
        c.connection_lost("connection closed by the server")
    elif case == "silent greeting":
        c.timed_out(2)
    elif case == "421 to EHLO":
        c.receive(b"220 mx\r\n")
        c.receive(b"421 4.3.2 shutting down\r\n")
    elif case == "starttls not offered":
        c = _greeted(b"220 mx\r\n", starttls="required")
        c.receive(EHLO_PLAIN)
    elif case == "certificate refused":
        c = _greeted(b"220 mx\r\n", starttls="required")
        assert c.receive(EHLO_PLAIN.replace(b"250 SIZE", b"250-SIZE\r\n250 STARTTLS")) == [
            Send(b"STARTTLS\r\n")]
        assert c.receive(b"220 go ahead\r\n") == [StartTLS()]
        assert c.tls_refused("TLS certificate is for other.test").dsn == "4.7.5"
    elif case == "lost after MAIL sent":
        to_ehlo(c)
        c.connection_lost("reset")
    else:
        to_ehlo(c)
        replies = {"451 to MAIL": b"451 4.3.0 later\r\n550 x\r\n554 x\r\n",
                   "550 to RCPT": b"250 ok\r\n550 5.1.1 no\r\n554 x\r\n",
                   "450 to RCPT": b"250 ok\r\n450 4.2.1 busy\r\n554 x\r\n",
                   "554 to DATA": b"250 ok\r\n250 ok\r\n554 5.6.0 no\r\n",
                   "lost while sending": b"250 ok\r\n250 ok\r\n354 go\r\n",
                   "lost after the message": b"250 ok\r\n250 ok\r\n354 go\r\n",
                   "delivered": b"250 ok\r\n250 ok\r\n354 go\r\n"}
        if case == "size bounce":
            c = client(message=b"x" * 2_000_000)
            to_ehlo(c)
        else:
            c.receive(replies[case])
            if case == "lost while sending":
                c.connection_lost("reset")
            elif case == "lost after the message":
                c.timed_out(600)
            elif case == "delivered":
                c.receive(b"250 2.0.0 stored\r\n")
    assert c.outcome is not None, case
    assert c.may_try_next is expect, (case, c.outcome)
