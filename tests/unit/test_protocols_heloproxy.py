"""The pure HELO proxy machine (torroute.protocols.heloproxy): the handshake, fail-closed
routing answers, the remote side, and the splice that keeps STARTTLS out (property tests:
any split of the streams gives the same bytes; STARTTLS never reaches the remote; message
bodies pass untouched)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from support.onions import ONION_A, ONION_B

from torroute.protocols import heloproxy as hp
from torroute.protocols.heloproxy import (
    CLOSED,
    CONNECT,
    REMOTE,
    ROUTE,
    SPLICE,
    Close,
    Connect,
    HeloProxy,
    HeloRequest,
    RemoteFailed,
    Route,
    Splice,
    ToClient,
    ToRemote,
    parse_helo,
    strip_starttls,
)
from torroute.protocols.smtp import ReplyParser
from torroute.routing.decisions import NoRoute, Reject, TempFail
from torroute.routing.decisions import Route as RouteDecision

EHLO_ANSWER = (b"250-mx.onion.test hello\r\n250-PIPELINING\r\n250-STARTTLS\r\n"
               b"250-SIZE 10240000\r\n250 8BITMIME\r\n")


def to_client(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, ToClient))


def to_remote(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, ToRemote))


def spliced(answer: bytes = EHLO_ANSWER, verb: bytes = b"EHLO") -> tuple[HeloProxy, list]:
    """A machine through the handshake to ONION_A; returns it and what the client got."""
    m = HeloProxy(banner="proxy.test")
    got = m.start()
    assert to_client(got) == b"220 proxy.test ESMTP torroute proxy\r\n"
    actions = m.client_data(verb + b" me.onion.test " + ONION_A.encode() + b"\r\n")
    assert actions == [Route(HeloRequest(verb.decode(), "me.onion.test", ONION_A))]
    assert m.waiting == ROUTE
    assert m.routed(RouteDecision(ONION_A, ONION_A, 25, "onion")) == [Connect(((ONION_A, 25),))]
    assert m.waiting == CONNECT and m.connected() == [] and m.waiting == REMOTE
    assert to_remote(m.remote_data(b"220 mx ESMTP\r\n")) == verb + b" me.onion.test\r\n"
    actions = m.remote_data(answer)
    assert m.waiting == SPLICE
    return m, actions


# ---- the handshake


def test_ehlo_answer_relayed_without_starttls() -> None:
    m, actions = spliced()
    assert to_client(actions) == (b"250-mx.onion.test hello\r\n250-PIPELINING\r\n"
                                  b"250-SIZE 10240000\r\n250 8BITMIME\r\n")
    assert any(isinstance(a, hp.Spliced) for a in actions)


def test_starttls_as_last_line_moves_the_final_marker() -> None:
    _, actions = spliced(b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
    assert to_client(actions) == b"250-mx\r\n250 PIPELINING\r\n"


def test_helo_accepted_and_passed_on_as_helo() -> None:
    _, actions = spliced(b"250 mx hello\r\n", verb=b"HELO")
    assert to_client(actions) == b"250 mx hello\r\n"


def test_helo_name_replaces_the_clients_first_word() -> None:
    m = HeloProxy(helo_name="mine.onion.test")
    m.start()
    [route] = m.client_data(b"ehlo whatever " + ONION_A.encode() + b"\r\n")
    assert route.request == HeloRequest("EHLO", "mine.onion.test", ONION_A)


def test_noop_rset_quit_and_errors_before_ehlo() -> None:
    m = HeloProxy()
    m.start()
    assert to_client(m.client_data(b"NOOP\r\n")).startswith(b"250 ")
    assert to_client(m.client_data(b"EHLO onlyname\r\n")).startswith(b"501 5.5.4")
    assert to_client(m.client_data(b"MAIL FROM:<a@b>\r\n")).startswith(b"503 5.5.1")
    actions = m.client_data(b"EHLO bad!name " + ONION_A.encode() + b"\r\n")  # third error
    assert to_client(actions).endswith(b"421 4.7.0 torroute proxy: too many errors\r\n")
    assert isinstance(actions[-1], Close) and m.waiting == CLOSED
    m = HeloProxy()
    m.start()
    actions = m.client_data(b"QUIT\r\n")
    assert to_client(actions).startswith(b"221 ") and isinstance(actions[-1], Close)


def test_overlong_line_before_ehlo_is_refused() -> None:
    m = HeloProxy()
    m.start()
    actions = m.client_data(b"E" * (hp.MAX_LINE + 10))
    assert to_client(actions).startswith(b"421 ") and m.waiting == CLOSED


def test_pipelined_bytes_after_ehlo_wait_for_the_splice() -> None:
    m = HeloProxy()
    m.start()
    m.client_data(b"EHLO me " + ONION_A.encode() + b"\r\nMAIL FROM:<a@b>\r\n")
    m.routed(RouteDecision(ONION_A, ONION_A, 25, "onion"))
    m.connected()
    m.remote_data(b"220 mx\r\n")
    actions = m.remote_data(b"250 mx\r\n")
    assert to_client(actions) == b"250 mx\r\n"
    assert to_remote(actions) == b"MAIL FROM:<a@b>\r\n"


# ---- fail closed


def refused(decision) -> bytes:
    m = HeloProxy()
    m.start()
    m.client_data(b"EHLO me.onion.test plain.example\r\n")
    actions = m.routed(decision)
    assert isinstance(actions[-1], Close) and actions[-1].error and m.waiting == CLOSED
    assert not any(isinstance(a, Connect | ToRemote) for a in actions)
    return to_client(actions)


def test_no_onion_route_is_421_with_the_reason() -> None:
    text = refused(NoRoute("plain.example", "no SRV record (NXDOMAIN)"))
    assert text == (b"421 4.4.4 torroute proxy: plain.example: no onion route (no SRV record "
                    b"(NXDOMAIN)); the proxy never uses the clear net\r\n")


def test_tempfail_and_reject_are_421() -> None:
    assert refused(TempFail("plain.example", "DNS SERVFAIL for SRV")).startswith(b"421 4.4.3 ")
    assert refused(Reject("plain.example", "invalid onion")).startswith(b"421 4.1.2 ")


def test_remote_greeting_not_220() -> None:
    m = HeloProxy()
    m.start()
    m.client_data(b"EHLO me " + ONION_A.encode() + b"\r\n")
    m.routed(RouteDecision(ONION_A, ONION_A, 25, "srv", 60.0, ((ONION_B, 25),)))
    m.connected()
    [failed] = m.remote_data(b"554 5.3.2 go away\r\n")
    assert failed == RemoteFailed("remote greeting: 554 5.3.2 go away")
    assert m.connected() == []  # the driver dials the next target
    assert to_remote(m.remote_data(b"220 backup\r\n")) == b"EHLO me\r\n"
    actions = m.refuse("none reached", "4.4.1")
    assert to_client(actions) == b"421 4.4.1 torroute proxy: none reached\r\n"


def test_remote_eof_and_garbage_before_the_splice() -> None:
    for data, why in ((b"", "before greeting"), (b"HTTP/1.1 400\r\n", "not speaking SMTP")):
        m = HeloProxy()
        m.start()
        m.client_data(b"EHLO me " + ONION_A.encode() + b"\r\n")
        m.routed(RouteDecision(ONION_A, ONION_A, 25, "onion"))
        m.connected()
        [failed] = m.remote_data(data) if data else m.remote_eof()
        assert isinstance(failed, RemoteFailed) and why in failed.reason


def test_timeouts_answer_421_when_the_client_waits() -> None:
    m = HeloProxy()
    m.start()
    assert to_client(m.timed_out()).startswith(b"421 4.4.2 torroute proxy: no EHLO")
    m, _ = spliced()
    assert to_client(m.timed_out()) == b""  # idle splice: just close
    m, _ = spliced()
    m.client_data(b"MAIL FROM:<a@b>\r\n")
    assert to_client(m.timed_out()).startswith(b"421 4.4.2 torroute proxy: the remote did not")


def test_remote_closes_mid_transaction() -> None:
    m, _ = spliced()
    m.client_data(b"MAIL FROM:<a@b>\r\n")
    assert to_client(m.remote_eof()).startswith(b"421 4.4.2 ")
    m, _ = spliced()
    m.client_data(b"QUIT\r\n")
    m.remote_data(b"221 bye\r\n")
    assert m.remote_eof() == [Close("remote closed the connection")]


# ---- the splice


def test_starttls_is_answered_locally_in_pipelined_order() -> None:
    m, _ = spliced()
    actions = m.client_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nSTARTTLS\r\nNOOP\r\n")
    assert to_remote(actions) == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nNOOP\r\n"
    assert to_client(actions) == b""
    got = to_client(m.remote_data(b"250 ok\r\n250 ok\r\n250 noop\r\n"))
    assert got == b"250 ok\r\n250 ok\r\n" + hp.STARTTLS_REFUSED + b"250 noop\r\n"


def test_second_ehlo_answer_is_filtered_too() -> None:
    m, _ = spliced()
    m.client_data(b"EHLO again\r\n")
    assert to_client(m.remote_data(EHLO_ANSWER)).count(b"STARTTLS") == 0


def test_message_body_passes_untouched_and_data_refusal() -> None:
    m, _ = spliced()
    assert to_remote(m.client_data(b"DATA\r\nSTARTTLS\r\n")) == b"DATA\r\n"  # held
    assert to_remote(m.remote_data(b"354 go\r\n")) == b"STARTTLS\r\n"  # it is message text
    assert to_remote(m.client_data(b"x\r\n.\r\nSTARTTLS\r\n")) == b"x\r\n.\r\n"
    m, _ = spliced()
    m.client_data(b"DATA\r\nSTARTTLS\r\n")
    actions = m.remote_data(b"554 no valid recipients\r\n")
    assert to_client(actions).startswith(b"554 ") and hp.STARTTLS_REFUSED in to_client(actions)
    assert b"STARTTLS" not in to_remote(actions)


def test_bdat_chunks_and_auth_responses_are_not_commands() -> None:
    m, _ = spliced()
    sent = m.client_data(b"BDAT 10\r\nSTARTTLS\r\nBDAT 0 LAST\r\nSTARTTLS\r\n")
    assert to_remote(sent) == b"BDAT 10\r\nSTARTTLS\r\nBDAT 0 LAST\r\n"
    m, _ = spliced()
    m.client_data(b"AUTH LOGIN\r\n")
    m.remote_data(b"334 VXNlcm5hbWU6\r\n")
    assert to_remote(m.client_data(b"STARTTLS\r\n")) == b"STARTTLS\r\n"  # base64 'username'


# ---- properties


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return [c for c in out if c]


word = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
host = st.lists(word, min_size=1, max_size=4).map(".".join)


@given(verb=st.sampled_from(["EHLO", "HELO", "ehlo", "Helo"]), local=host, dest=host,
       spaces=st.sampled_from([" ", "  ", "\t"]))
def test_parse_helo_roundtrip(verb, local, dest, spaces) -> None:
    assert parse_helo(f"{verb}{spaces}{local}{spaces}{dest}".encode()) == \
        HeloRequest(verb.upper(), local, dest)


@given(st.binary(max_size=300))
def test_parse_helo_never_raises(line) -> None:
    result = parse_helo(line)
    assert isinstance(result, HeloRequest) or (
        isinstance(result, bytes) and result[:1] == b"5" and result.endswith(b"\r\n"))


extension = st.sampled_from(["PIPELINING", "STARTTLS", "starttls", "SIZE 1000", "8BITMIME",
                             "SMTPUTF8", "CHUNKING", "AUTH PLAIN LOGIN", "STARTTLSX"])


@given(st.lists(extension, max_size=8))
def test_strip_starttls_keeps_every_other_line(extensions) -> None:
    lines = ["mx hello", *extensions]
    raw = [f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n".encode()
           for i, text in enumerate(lines)]
    out = strip_starttls(raw)
    [reply] = ReplyParser().feed(b"".join(out))
    assert reply.code == 250
    assert list(reply.lines) == [t for i, t in enumerate(lines)
                                 if i == 0 or t.upper() != "STARTTLS"]
    kept = [r for r in raw if r[4:].strip().upper() != b"STARTTLS" or r is raw[0]]
    assert [o[4:] for o in out] == [k[4:] for k in kept]  # the text byte for byte


command = st.sampled_from([b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>", b"NOOP",
                           b"RSET", b"STARTTLS", b"starttls", b"VRFY x", b"STARTTLS now",
                           b"EHLO again"])
body_line = st.sampled_from([b"Subject: hi", b"", b"STARTTLS", b"..dot", b"x" * 70,
                             b"QUIT", b"DATA"])


@st.composite
def client_stream(draw) -> tuple[bytes, bytes, int]:
    """Client bytes, what must reach the remote, and how many local 454s are due."""
    sent, expected, refusals = bytearray(), bytearray(), 0
    for _ in range(draw(st.integers(0, 4))):
        for cmd in draw(st.lists(command, max_size=5)):
            sent += cmd + b"\r\n"
            if cmd.upper() == b"STARTTLS":
                refusals += 1
            else:
                expected += cmd + b"\r\n"
        if draw(st.booleans()):
            body = b"".join(line + b"\r\n" for line in draw(st.lists(body_line, max_size=6)))
            sent += b"DATA\r\n" + body + b".\r\n"
            expected += b"DATA\r\n" + body + b".\r\n"
    return bytes(sent), bytes(expected), refusals


def run_splice(stream: bytes, cuts: list[int]) -> tuple[bytes, bytes]:
    """Feed ``stream`` in pieces; the remote answers every command (354 to DATA)."""
    splice = Splice()
    remote, client = bytearray(), bytearray()
    answered = 0
    for piece in chunks(stream, cuts):
        for action in splice.from_client(piece):
            (remote if isinstance(action, ToRemote) else client).extend(action.data)
        # answer what the remote has been sent so far, in order
        commands = _commands(bytes(remote))
        while answered < len(commands):
            reply = b"354 go\r\n" if commands[answered] == "DATA" else b"250 ok\r\n"
            answered += 1
            for action in splice.from_remote(reply):
                (remote if isinstance(action, ToRemote) else client).extend(action.data)
            commands = _commands(bytes(remote))
    return bytes(remote), bytes(client)


def _commands(remote: bytes) -> list[str]:
    """The remote's view: one reply owed per command line and per finished message."""
    owed, in_data = [], False
    for line in remote.split(b"\r\n")[:-1]:
        if in_data:
            if line == b".":
                owed.append(".")
                in_data = False
            continue
        verb = line.split(b" ", 1)[0].upper().decode()
        owed.append(verb)
        in_data = verb == "DATA"
    return owed


@settings(max_examples=300)
@given(client_stream(), st.lists(st.integers(0, 10_000), max_size=12))
def test_splice_any_split_same_bytes_no_starttls(case, cuts) -> None:
    stream, expected, refusals = case
    remote, client = run_splice(stream, cuts)
    assert remote == expected
    assert client.count(hp.STARTTLS_REFUSED) == refusals
    assert (remote, client) == run_splice(stream, [])  # the split changes nothing


@settings(max_examples=200)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 3000), max_size=8))
def test_splice_never_raises_on_client_garbage(data, cuts) -> None:
    splice = Splice()
    for piece in chunks(data, cuts):
        splice.from_client(piece)  # no exception: garbage is the remote's to judge


@settings(max_examples=200)
@given(st.lists(extension, max_size=6), st.lists(st.integers(0, 400), max_size=6))
def test_handshake_any_split_of_the_remote_answer(extensions, cuts) -> None:
    lines = ["mx", *extensions]
    answer = b"".join(f"250{'-' if i < len(lines) - 1 else ' '}{t}\r\n".encode()
                      for i, t in enumerate(lines))
    whole = b"220 greeting\r\n" + answer
    m = HeloProxy()
    m.start()
    m.client_data(b"EHLO me " + ONION_A.encode() + b"\r\n")
    m.routed(RouteDecision(ONION_A, ONION_A, 25, "onion"))
    m.connected()
    got = bytearray()
    for piece in chunks(whole, cuts):
        got += to_client(m.remote_data(piece))
    assert m.waiting == SPLICE
    assert bytes(got) == b"".join(strip_starttls(answer.splitlines(keepends=True)))


# ---- defer_at="rcpt": the failed session answers itself


def deferring(decision=None) -> tuple[HeloProxy, bytes]:
    m = HeloProxy(defer_at="rcpt")
    m.start()
    m.client_data(b"EHLO me.onion.test plain.example\r\nMAIL FROM:<a@b>\r\n")  # pipelined
    actions = m.routed(decision or NoRoute("plain.example", "no SRV record (NXDOMAIN)"))
    assert not any(isinstance(a, Close | Connect | ToRemote) for a in actions)
    assert m.waiting == hp.DEFERRING
    return m, to_client(actions)


def test_defer_at_rcpt_answers_ehlo_then_451_per_rcpt() -> None:
    m, text = deferring()
    assert text == (b"250 localhost torroute proxy: every RCPT will be deferred\r\n"
                    b"250 2.0.0 ok\r\n")  # EHLO, then the pipelined MAIL
    reason = (b"torroute proxy: plain.example: no onion route (no SRV record (NXDOMAIN)); "
              b"the proxy never uses the clear net")
    got = to_client(m.client_data(b"RCPT TO:<x@plain.example>\r\nRCPT TO:<y@plain.example>\r\n"
                                  b"DATA\r\nSTARTTLS\r\nRSET\r\n"))
    assert got.split(b"\r\n")[:5] == [b"451 4.4.4 " + reason, b"451 4.4.4 " + reason,
                                      b"554 5.5.1 no valid recipients",
                                      b"502 5.5.1 not available: 4.4.4 " + reason,
                                      b"250 2.0.0 ok"]
    actions = m.client_data(b"QUIT\r\n")
    assert to_client(actions) == b"221 2.0.0 bye\r\n"
    assert actions[-1] == Close(m.failure, error=True) and m.waiting == CLOSED


def test_defer_at_rcpt_for_driver_failures_and_timeouts() -> None:
    m = HeloProxy(defer_at="rcpt")
    m.start()
    m.client_data(b"EHLO me " + ONION_A.encode() + b"\r\n")
    m.routed(RouteDecision(ONION_A, ONION_A, 25, "onion"))
    assert to_client(m.refuse("tor SocksPort 127.0.0.1:9 unreachable")).startswith(b"250 ")
    assert to_client(m.client_data(b"RCPT TO:<a@b>\r\n")).startswith(b"451 4.4.1 ")
    assert to_client(m.timed_out()).startswith(b"421 4.4.2 ") and m.waiting == CLOSED
    m = HeloProxy(defer_at="rcpt")  # before the EHLO nothing changes: 421
    m.start()
    assert to_client(m.timed_out()).startswith(b"421 ")


@given(st.lists(st.sampled_from([b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA", b"NOOP",
                                 b"STARTTLS", b"BDAT 5 LAST", b"HELP", b"RSET"]), max_size=12),
       st.lists(st.integers(0, 500), max_size=6))
def test_defer_at_rcpt_never_relays_and_never_accepts_a_recipient(lines, cuts) -> None:
    m, _ = deferring()
    stream = b"".join(line + b"\r\n" for line in lines)
    out = bytearray()
    for piece in chunks(stream, cuts):
        actions = m.client_data(piece)
        assert not any(isinstance(a, ToRemote | Connect) for a in actions)
        out += to_client(actions)
    replies = [r for r in bytes(out).split(b"\r\n") if r]
    assert len(replies) == len(lines)
    for line, reply in zip(lines, replies, strict=True):
        if line.startswith(b"RCPT"):
            assert reply.startswith(b"451 4.4.4 ")
        assert not reply.startswith(b"354")
