"""torroute send's pure parts (torroute.delivery.submit): addresses, the message on stdin, the
header edits, sendmail's -o leftovers, the command line, and the exit-status precedence."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torroute import exitcodes
from torroute.cli import build_parser
from torroute.delivery.submit import (
    BadInput,
    RecipientResult,
    SubmitOptions,
    exit_status,
    parse_address,
    parse_recipient_args,
    prepare,
    read_message,
    sendmail_o_option,
    split_headers,
)

# ---- addresses

LABEL = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
DOMAIN = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
LOCAL = st.text(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~", min_size=1,
                max_size=20)


@given(LOCAL, DOMAIN)
def test_plain_addresses_come_back_as_given(local: str, domain: str) -> None:
    addr = f"{local}@{domain}"
    assert parse_address(addr) == addr
    assert parse_address(f"<{addr}>") == addr
    assert parse_address(f"Some One <{addr}>") == addr
    assert parse_recipient_args([f"{addr}, x@{domain}"]) == list(dict.fromkeys(
        [addr, f"x@{domain}"]))


@given(st.text(max_size=60))
def test_any_text_is_an_address_or_bad_input(text: str) -> None:
    """Never another exception; what comes out survives RCPT TO:<...> unchanged."""
    try:
        addr = parse_address(text)
    except BadInput as exc:
        assert exc.exit_code == exitcodes.DATAERR
        return
    assert "@" in addr and not any(c in addr for c in "\r\n\0<>")
    assert addr == addr.strip()


@pytest.mark.parametrize("bad", ["bob", "@example.org", "bob@", "bob@exa mple.org",
                                 "bob@-bad.org", "bo b@example.org", "a..b@example.org",
                                 "bob@example.org\nRCPT TO:<x@y.z>", "bob@exam_ple.org", ""])
def test_malformed_addresses_are_bad_input_65(bad: str) -> None:
    with pytest.raises(BadInput) as info:
        parse_address(bad)
    assert info.value.exit_code == exitcodes.DATAERR


def test_onion_idn_and_literal_addresses_are_accepted() -> None:
    onion = "x" * 56 + ".onion"
    assert parse_address(f"bob@{onion}") == f"bob@{onion}"
    assert parse_address("bob@bücher.example") == "bob@bücher.example"
    assert parse_address("jörg@example.org") == "jörg@example.org"
    assert parse_address("bob@[127.0.0.1]") == "bob@[127.0.0.1]"
    assert parse_address('"john doe"@example.org') == '"john doe"@example.org'
    assert parse_recipient_args(["a@x.org", "A <a@x.org>", '"Doe, J" <j@x.org>']) == \
        ["a@x.org", "j@x.org"]


# ---- the message on stdin

LINES = st.lists(st.sampled_from([b".", b"..", b".x", b"x", b"", b" .", b".\r"]), max_size=8)


@given(LINES)
def test_dot_line_ends_the_message_unless_i(lines: list[bytes]) -> None:
    data = b"Subject: s\n\n" + b"\n".join(lines)
    assert read_message(data, ignore_dots=True) == data
    got = read_message(data, ignore_dots=False)
    assert data.startswith(got)
    body_lines = got.split(b"\n")
    assert b"." not in body_lines and b".\r" not in body_lines
    if b"." not in lines and b".\r" not in lines:
        assert got == data


def test_dot_line_examples() -> None:
    assert read_message(b"A: b\n\nx\n.\nafter\n", False) == b"A: b\n\nx\n"
    assert read_message(b"A: b\r\n\r\nx\r\n.\r\nafter", False) == b"A: b\r\n\r\nx\r\n"
    assert read_message(b"A: b\n\n..\n.x\n", False) == b"A: b\n\n..\n.x\n"
    assert read_message(b".\n", False) == b""


FIELD = st.tuples(st.text(string.ascii_letters + "-", min_size=1, max_size=10),
                  st.text(string.printable.replace("\n", "").replace("\r", ""), max_size=20),
                  st.lists(st.text(string.ascii_letters, max_size=5), max_size=2))


@given(st.lists(FIELD, min_size=1, max_size=6), st.binary(max_size=40), st.booleans())
def test_split_headers_keeps_every_byte(fields, body: bytes, crlf: bool) -> None:
    eol = b"\r\n" if crlf else b"\n"
    raw = [f"{n}: {v}".encode() + eol + b"".join(b"\t" + c.encode() + eol for c in conts)
           for n, v, conts in fields]
    message = b"".join(raw) + eol + body
    got, rest = split_headers(message)
    assert got == raw and rest == eol + body


@pytest.mark.parametrize("message", [b"", b"\n\n", b"just a body line\n", b"\nbody\n",
                                     b" continued: x\n\nbody", b"Subject: x\nno colon here\n"])
def test_messages_without_a_header_are_bad_input(message: bytes) -> None:
    with pytest.raises(BadInput) as info:
        split_headers(message)
    assert info.value.exit_code == exitcodes.DATAERR


MSG = (b"From: Alice <alice@origin.test>\nTo: bob@one.test, Carol <carol@two.test>\n"
       b"Cc: dave@three.test\nBcc: eve@four.test,\n frank@five.test\nSubject: s\n\nbody\n")


def test_t_collects_to_cc_bcc_and_bcc_is_never_transmitted() -> None:
    got = prepare(MSG, SubmitOptions(extract=True, recipients=("zed@six.test",)))
    assert got.recipients == ["zed@six.test", "bob@one.test", "carol@two.test",
                              "dave@three.test", "eve@four.test", "frank@five.test"]
    assert got.sender == "alice@origin.test"
    assert b"Bcc" not in got.data and b"frank" not in got.data and b"eve" not in got.data
    assert got.data == MSG.replace(b"Bcc: eve@four.test,\n frank@five.test\n", b"")
    # without -t: only the arguments, and Bcc is still removed
    plain = prepare(MSG, SubmitOptions(sender="s@x.test", recipients=("bob@one.test",)))
    assert plain.recipients == ["bob@one.test"] and plain.sender == "s@x.test"
    assert b"Bcc" not in plain.data


def test_from_is_added_when_missing_with_the_full_name() -> None:
    got = prepare(b"Subject: s\n\nbody\n", SubmitOptions(sender="alice@origin.test",
                                                        full_name="Alice Liddell",
                                                        recipients=("b@x.test",)))
    assert got.data == b"From: Alice Liddell <alice@origin.test>\nSubject: s\n\nbody\n"
    got = prepare(b"Subject: s\n\nbody\n", SubmitOptions(sender="a@o.test", full_name="Jörg",
                                                        recipients=("b@x.test",)))
    assert got.data.startswith(b"From: =?utf-8?") and got.data.endswith(b"Subject: s\n\nbody\n")
    got = prepare(b"Subject: s\n", SubmitOptions(sender="a@o.test", recipients=("b@x.test",)))
    assert got.data == b"From: a@o.test\nSubject: s\n\n"
    kept = prepare(MSG, SubmitOptions(sender="x@y.test", full_name="N", recipients=("b@x.t",)))
    assert kept.data.count(b"From:") == 1 and kept.data.startswith(b"From: Alice")


@pytest.mark.parametrize(("options", "code", "words"), [
    (SubmitOptions(sender="a@o.test"), exitcodes.USAGE, "no recipients"),
    (SubmitOptions(recipients=("b@x.test",)), exitcodes.USAGE, "no sender"),
    (SubmitOptions(sender="<>", recipients=("b@x.test",)), exitcodes.USAGE, "null sender"),
    (SubmitOptions(sender="bad sender", recipients=("b@x.test",)), exitcodes.DATAERR,
     "bad address"),
    (SubmitOptions(sender="a@o.test", recipients=("b",)), exitcodes.DATAERR, "no @domain"),
])
def test_unusable_submissions(options: SubmitOptions, code: int, words: str) -> None:
    with pytest.raises(BadInput, match=words) as info:
        prepare(b"Subject: s\n\nbody\n", options)
    assert info.value.exit_code == code


def test_null_sender_with_a_from_header() -> None:
    got = prepare(MSG, SubmitOptions(sender="<>", recipients=("b@x.test",)))
    assert got.sender == ""


def test_bad_address_in_a_header_with_t() -> None:
    with pytest.raises(BadInput, match="bad address"):
        prepare(b"From: a@o.test\nTo: nobody\n\nx\n", SubmitOptions(extract=True))


# ---- sendmail's options as mail clients pass them

def test_o_options() -> None:
    assert sendmail_o_option("i") == "i"
    for ignored in ("em", "ee", "di", "db", "m"):
        assert sendmail_o_option(ignored) is None
    with pytest.raises(BadInput) as info:
        sendmail_o_option("QDIR")
    assert info.value.exit_code == exitcodes.USAGE


@given(st.text(max_size=12))
def test_any_o_option_is_i_ignored_or_usage(value: str) -> None:
    try:
        assert sendmail_o_option(value) in ("i", None)
    except BadInput as exc:
        assert exc.exit_code == exitcodes.USAGE


def parse(*argv: str):
    return build_parser().parse_args(["send", *argv])


def test_the_command_lines_mail_clients_pass() -> None:
    from torroute.cli.send import submit_options

    # neomutt: -B8BITMIME, -f with use_envelope_from, DSN flags, --
    args = parse("-B8BITMIME", "-f", "me@origin.test", "-N", "never", "-R", "hdrs", "-V", "x1",
                 "--", "a@b.test", "-dash@c.test")
    opts = submit_options(args)
    assert opts == SubmitOptions(sender="me@origin.test", recipients=("a@b.test",
                                                                        "-dash@c.test"))
    # git send-email / msmtp style: -i, -f attached, -t
    opts = submit_options(parse("-i", "-fme@o.test", "-t"))
    assert (opts.ignore_dots, opts.sender, opts.extract, opts.recipients) == \
        (True, "me@o.test", True, ())
    opts = submit_options(parse("-oi", "-oem", "-odi", "-ti", "-F", "Me", "x@y.test"))
    assert (opts.ignore_dots, opts.extract, opts.full_name) == (True, True, "Me")
    assert submit_options(parse("-bm", "-G", "-U", "x@y.test")).recipients == ("x@y.test",)
    args = parse("--config", "/c.toml", "--tor-socks", "127.0.0.1:1", "--queue", "/q",
                 "--fallback", "/usr/sbin/sendmail -oem", "x@y.test")
    assert (args.config, args.tor_socks, args.queue, args.fallback) == \
        ("/c.toml", "127.0.0.1:1", "/q", "/usr/sbin/sendmail -oem")
    with pytest.raises(BadInput, match="-bs"):
        submit_options(parse("-bs"))


# ---- the exit status

def result(code: int) -> RecipientResult:
    return RecipientResult("r@x.test", "k", "0.0.0", "t", code)


@pytest.mark.parametrize(("codes", "expected"), [
    ([0, 0], 0), ([], 0), ([0, 75], 75), ([75, 69], 75), ([69, 68, 65, 75], 75),
    ([0, 69], 69), ([69, 68], 68), ([68, 65, 69], 65), ([1, 69], 69), ([0, 67], 67),
])
def test_exit_status_precedence(codes: list[int], expected: int) -> None:
    assert exit_status([result(c) for c in codes]) == expected


@given(st.lists(st.sampled_from([0, 65, 67, 68, 69, 75, 1]), max_size=6))
def test_exit_status_properties(codes: list[int]) -> None:
    status = exit_status([result(c) for c in codes])
    if 75 in codes:
        assert status == 75
    elif any(codes):
        assert status in codes and status != 0
        ranked = [c for c in (65, 68, 69) if c in codes]
        if ranked:
            assert status == ranked[0]
    else:
        assert status == 0


def test_the_line_is_one_line() -> None:
    line = RecipientResult("r@x.test", "refused", "5.1.1", "host h said:\n550 no", 69).line()
    assert line == "r@x.test: refused 5.1.1 host h said: 550 no"


@given(st.lists(st.tuples(st.sampled_from(["To", "Cc", "Bcc", "Resent-Bcc", "X-A", "Subject"]),
                          st.lists(st.sampled_from(["a@x.test", "b@y.test", "c@z.test"]),
                                   min_size=1, max_size=3)), max_size=6),
       st.booleans())
def test_prepare_removes_only_bcc_and_collects_every_header_recipient(fields, extract) -> None:
    raw = [f"{name}: {', '.join(addrs)}\n".encode() for name, addrs in fields]
    message = b"From: s@o.test\n" + b"".join(raw) + b"\nbody\n"
    options = SubmitOptions(extract=extract, recipients=("r@arg.test",))
    got = prepare(message, options)
    kept = [f for f, (name, _) in zip(raw, fields, strict=True)
            if name not in ("Bcc", "Resent-Bcc")]
    assert got.data == b"From: s@o.test\n" + b"".join(kept) + b"\nbody\n"
    expected = ["r@arg.test"]
    if extract:
        expected += [a for name, addrs in fields if name in ("To", "Cc", "Bcc") for a in addrs]
    assert got.recipients == list(dict.fromkeys(expected))
    assert got.sender == "s@o.test"
