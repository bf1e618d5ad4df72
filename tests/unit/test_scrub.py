"""The header scrubber (torroute.delivery.scrub) and its policy in DeliverSettings ([deliver]):
exact bytes for well-formed messages, the decided behaviour for malformed ones, and properties
(never raises; the body and every kept field byte-identical; nothing named survives)."""

from __future__ import annotations

import hashlib
from email import message_from_bytes
from email.policy import compat32

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torroute.config import Config
from torroute.delivery.scrub import DEFAULT_HEADERS, header_fields, message_id_domain, scrub
from torroute.delivery.settings import DeliverSettings
from torroute.errors import ConfigError

ONION = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion"


def sha(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


MESSAGE = (b"Received: from client (clear-host.example [192.0.2.7])\n"
           b"\tby mx.clear.example (Postfix) with ESMTP id 4ABC\n"
           b"\tfor <u@pinned.test>; Sun, 22 Nov 2026 10:00:00 +0000 (UTC)\n"
           b"From: Me <me@" + ONION.encode() + b">\n"
           b"To: <u@pinned.test>\n"
           b"message-id:\n <20261122.4ABC@mx.clear.example>\n"
           b"Subject: caf\xc3\xa9 \xff raw 8-bit\n"
           b"X-Mailer: Mutt 2.2\n"
           b"RECEIVED: second\n"
           b"User-Agent : NeoMutt/20220429\n"
           b"X-Mailer-Extra: kept (not X-Mailer)\n"
           b"\n"
           b"Received: in the body, kept\n"
           b"Message-ID: body too\n\n\n.\n..\nend \xff")


def test_exact_bytes_lf() -> None:
    out = scrub(MESSAGE, DEFAULT_HEADERS, ONION)
    new = f"<{sha(b'<20261122.4ABC@mx.clear.example>')}@{ONION}>".encode()
    assert out == (b"From: Me <me@" + ONION.encode() + b">\n"
                   b"To: <u@pinned.test>\n"
                   b"Subject: caf\xc3\xa9 \xff raw 8-bit\n"
                   b"X-Mailer-Extra: kept (not X-Mailer)\n"
                   b"Message-ID: " + new + b"\n"
                   b"\n" + MESSAGE.split(b"\n\n", 1)[1])


def test_exact_bytes_crlf_and_the_same_id() -> None:
    crlf = MESSAGE.replace(b"\n", b"\r\n")
    out = scrub(crlf, DEFAULT_HEADERS, ONION)
    assert out == scrub(MESSAGE, DEFAULT_HEADERS, ONION).replace(b"\n", b"\r\n")
    assert b"\nMessage-ID: <" not in out.replace(b"\r\nMessage-ID: <", b"")  # CRLF everywhere


def test_without_message_id_option_only_names_are_removed() -> None:
    out = scrub(MESSAGE, ["Received"], None)
    assert b"eceived: from" not in out and b"RECEIVED" not in out
    assert b"message-id:\n <20261122.4ABC@mx.clear.example>\n" in out
    assert out.count(b"X-Mailer") == 3  # X-Mailer, X-Mailer-Extra and its text
    assert out.endswith(MESSAGE.split(b"\n\n", 1)[1])


def test_wildcard_names_as_exims_headers_remove() -> None:
    out = scrub(MESSAGE, ["X-Mailer*", "received"], None)
    assert b"X-Mailer" not in out.split(b"\n\n", 1)[0]
    assert b"Received: in the body, kept" in out


def test_message_id_is_replaced_even_when_not_listed() -> None:
    out = scrub(MESSAGE, [], ONION)
    head = out.split(b"\n\n", 1)[0]
    assert head.count(b"Message-ID:") == 1 and b"mx.clear.example>" not in head
    assert head.lower().count(b"received: ") == 2  # only Message-ID changed


def test_several_message_ids_hash_the_first_nonempty() -> None:
    msg = b"Message-ID:   \nMessage-Id: <a@x>\nMESSAGE-ID: <b@y>\nSubject: s\n\nbody\n"
    out = scrub(msg, DEFAULT_HEADERS, "q.onion")
    assert out == f"Subject: s\nMessage-ID: <{sha(b'<a@x>')}@q.onion>\n\nbody\n".encode()


def test_no_message_id_hashes_the_header_section() -> None:
    msg = b"Received: from clear.example\nSubject: s\n\nbody\n"
    out = scrub(msg, DEFAULT_HEADERS, "q.onion")
    digest = sha(b"Received: from clear.example\nSubject: s\n")
    assert out == f"Subject: s\nMessage-ID: <{digest}@q.onion>\n\nbody\n".encode()


@pytest.mark.parametrize("msg", [
    b"", b"\n", b"\r\n\r\n", b"no colon here\nReceived: x\n\nbody",
    b" leading continuation\nReceived: x\n\n", b"From me@host Sun Nov 22 2026\nReceived: x\n\n",
    b": empty name\nReceived: x\n", b"\xff\xfe: 8-bit name\n", b"Bad Name: x\nReceived: y\n\n",
    b"Received: x\rSubject: CR-only line ends\r\rbody\r", b"Received: x\r\r\n\n",
])
def test_no_header_section_is_returned_unchanged(msg: bytes) -> None:
    assert header_fields(msg) == ([], 0)
    assert scrub(msg, DEFAULT_HEADERS, "q.onion") is msg or scrub(msg, DEFAULT_HEADERS,
                                                                  "q.onion") == msg


def test_a_non_header_line_ends_the_section_without_separator() -> None:
    """The fields before it are certainly headers and scrubbed; the rest is body, untouched."""
    msg = b"Subject: s\nReceived: y\nthis is body text\nReceived: z\n"
    out = scrub(msg, DEFAULT_HEADERS, "q.onion")
    digest = sha(b"Subject: s\nReceived: y\n")
    assert out == (f"Subject: s\nMessage-ID: <{digest}@q.onion>\n".encode()
                   + b"this is body text\nReceived: z\n")


def test_no_body_and_no_final_line_end() -> None:
    assert scrub(b"Subject: s\r\nReceived: y", DEFAULT_HEADERS, None) == b"Subject: s\r\n"
    out = scrub(b"Subject: s", DEFAULT_HEADERS, "q.onion")
    assert out.startswith(b"Subject: s\nMessage-ID: <") and out.endswith(b"@q.onion>\n")
    assert scrub(b"Received: y", DEFAULT_HEADERS, None) == b""


def test_a_bare_cr_ends_the_section() -> None:
    msg = b"Subject: s\r\nReceived: a\r\n\tb\rc\r\nReceived: d\r\n\r\nbody\r\n"
    assert scrub(msg, ["Received"], None) == msg  # the Received it would continue stays
    assert header_fields(msg) == ([(b"subject", b"Subject: s\r\n")], 12)


def test_blank_continuation_line_belongs_to_its_field() -> None:
    msg = b"Received: a\n \n\tb\nSubject: s\n\nbody\n"
    assert scrub(msg, ["Received"], None) == b"Subject: s\n\nbody\n"


def test_never_raises_on_odd_arguments() -> None:
    assert scrub("text", DEFAULT_HEADERS, "q.onion") == "text"  # type: ignore[arg-type]
    assert scrub(None, DEFAULT_HEADERS, "q.onion") is None  # type: ignore[arg-type]
    assert scrub(b"Received: x\n\n", [None], None) == b"Received: x\n\n"  # type: ignore[list-item]
    assert scrub(bytearray(b"Received: x\nA: b\n\n"), [b"received"], None) == b"A: b\n\n"


def test_message_id_domain() -> None:
    assert message_id_domain(ONION.upper() + ".") == ONION
    assert message_id_domain("bücher.onion") == "xn--bcher-kva.onion"
    assert message_id_domain("a b>@c.onion") == "ab@c.onion".replace("@", "")
    assert message_id_domain("<>") == "invalid"


# -- the policy in DeliverSettings (what the pipe, the relay and send_message call) ----------

def test_default_policy_scrubs_onion_senders_only() -> None:
    s = DeliverSettings()
    assert s.scrub_domain(f"me@{ONION}") == ONION
    assert s.scrub_domain(f"me@{ONION.upper()}.".encode()) == ONION
    assert s.scrub_domain("me@sub." + ONION) == "sub." + ONION
    for sender in ("alice@origin.test", "", "MAILER-DAEMON", "x@onion", "x@notonion",
                   b"\xff@bad"):
        assert s.scrub_domain(sender) is None, sender
    assert s.scrubbed("alice@origin.test", MESSAGE) is MESSAGE
    assert s.scrubbed(f"me@{ONION}", MESSAGE) == scrub(MESSAGE, DEFAULT_HEADERS, ONION)


def config(toml: dict) -> Config:
    return Config(raw=toml)


def test_scrub_settings_in_the_deliver_table() -> None:
    cfg = config({"deliver": {"scrub_senders": ["identity.example", ".hidden.example"],
                              "scrub_headers": ["Received", "X-Originating-*"],
                              "scrub_message_id": False}})
    s = DeliverSettings.from_config(cfg)
    assert s.scrub_senders == ("identity.example", ".hidden.example")
    assert s.scrub_domain("a@identity.example") == "identity.example"
    assert s.scrub_domain("a@x.hidden.example") == "x.hidden.example"
    assert s.scrub_domain("a@hidden.example") is None and s.scrub_domain(f"a@{ONION}") is None
    idn = DeliverSettings.from_config(config({"deliver": {"scrub_senders": ["bücher.example"]}}))
    assert idn.scrub_senders == ("xn--bcher-kva.example",)
    assert idn.scrub_domain("a@BÜCHER.example") == "xn--bcher-kva.example"
    assert idn.scrub_domain("a@\udcff.example") is None  # undecodable: no match, no error
    msg = b"Received: r\nX-Originating-IP: 192.0.2.1\nMessage-ID: <m@h>\n\nb\n"
    assert s.scrubbed("a@identity.example", msg) == b"Message-ID: <m@h>\n\nb\n"
    off = DeliverSettings.from_config(config({"deliver": {"scrub_senders": []}}))
    assert off.scrubbed(f"me@{ONION}", MESSAGE) is MESSAGE


@pytest.mark.parametrize("table, word", [
    ({"scrub_senders": ".onion"}, "deliver.scrub_senders: expected a list"),
    ({"scrub_senders": ["bad domain"]}, "deliver.scrub_senders"),
    ({"scrub_headers": ["Bad Name"]}, "scrub_headers: 'Bad Name' is not a header field name"),
    ({"scrub_headers": ["Received:"]}, "is not a header field name"),
    ({"scrub_headers": ["X-*-Y"]}, "is not a header field name"),
    ({"scrub_headers": [3]}, "deliver.scrub_headers: expected a string"),
    ({"scrub_message_id": "yes"}, "deliver.scrub_message_id: expected true or false"),
    ({"scrub": 1}, "unknown setting deliver.scrub"),
])
def test_scrub_settings_mistakes(table: dict, word: str) -> None:
    with pytest.raises(ConfigError) as err:
        DeliverSettings.from_config(config({"deliver": table}))
    assert word in str(err.value)


# -- properties ---------------------------------------------------------------------------

NAMES = st.sampled_from(["Received", "received", "Message-ID", "MESSAGE-id", "X-Mailer",
                         "User-Agent", "Subject", "From", "To", "X-Custom", "Date", "X-Mailer2",
                         "Resent-Message-ID"])
VALUES = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
EOL = st.sampled_from([b"\n", b"\r\n"])


@st.composite
def fields(draw) -> tuple[str, bytes]:
    """One well-formed field: a name, maybe blanks before the colon, folded lines."""
    name = draw(NAMES)
    eol = draw(EOL)
    raw = name.encode() + draw(st.sampled_from([b"", b" ", b"\t"])) + b":" + draw(VALUES) + eol
    for value in draw(st.lists(VALUES, max_size=3)):
        raw += draw(st.sampled_from([b" ", b"\t"])) + value + eol
    return name, raw


@st.composite
def messages(draw) -> tuple[list[tuple[str, bytes]], bytes, bytes]:
    head = draw(st.lists(fields(), min_size=1, max_size=8))
    body = draw(EOL) + draw(st.binary(max_size=200))
    return head, body, b"".join(raw for _, raw in head) + body


REMOVE = st.lists(NAMES, max_size=4)


@settings(max_examples=400)
@given(st.binary(max_size=400), REMOVE, st.none() | st.sampled_from([ONION, "q.onion"]))
def test_property_never_raises_and_body_is_a_suffix(data, remove, domain) -> None:
    out = scrub(data, remove, domain)
    fields_, end = header_fields(data)
    assert b"".join(f for _, f in fields_) == data[:end]
    assert out.endswith(data[end:])
    if not fields_:
        assert out == data


@settings(max_examples=400)
@given(messages(), REMOVE, st.booleans())
def test_property_well_formed(message, remove, new_id) -> None:
    head, body, data = message
    domain = "q.onion" if new_id else None
    out = scrub(data, remove, domain)
    gone = {n.lower() for n in remove} | ({"message-id"} if new_id else set())
    kept = [raw for name, raw in head if name.lower() not in gone]
    new = out[len(b"".join(kept)):len(out) - len(body)]
    assert out.startswith(b"".join(kept)) and out.endswith(body)  # kept as is, in order
    if new_id:
        assert new.startswith(b"Message-ID: <") and new.rstrip(b"\r\n").endswith(b"@q.onion>")
        assert new.endswith(b"\r\n" if head[-1][1].endswith(b"\r\n") else b"\n")
    else:
        assert new == b""
    # the output's own header section: the kept fields, then the new Message-ID
    names = [n for n, _ in header_fields(out)[0]]
    assert names == [n.lower().encode() for n, raw in head if n.lower() not in gone] + (
        [b"message-id"] if new_id else [])
    # the same input always gives the same output (every copy of a message, every retry)
    assert scrub(data, remove, domain) == out
    if any(raw[len(name):len(name) + 1] != b":" for name, raw in head):
        return  # "Name :" is a field for Postfix and here, not for Python's email parser
    parsed = message_from_bytes(out.replace(b"\r\n", b"\n"), policy=compat32)
    for name in gone - {"message-id"}:
        assert parsed.get_all(name) is None
    ids = sum(n.lower() == "message-id" for n, _ in head) if "message-id" not in gone else 0
    assert len(parsed.get_all("Message-ID") or []) == (1 if new_id else ids)


def test_the_pipe_imports_the_scrubber_only_for_mail_it_scrubs() -> None:
    """Cold start: `torroute deliver` for an ordinary sender never loads the scrubber, and for
    an onion identity it loads no OpenSSL (hashlib's ~2.5 ms)."""
    import subprocess
    import sys

    code = ("import sys\nfrom torroute.delivery.pipe import deliver\n"
            "from torroute.delivery.settings import DeliverSettings\n"
            "s = DeliverSettings()\nm = b'Received: x\\n\\nbody\\n'\n"
            "assert s.scrubbed('alice@origin.test', m) is m\n"
            "assert 'torroute.delivery.scrub' not in sys.modules\n"
            f"assert s.scrubbed('me@{ONION}', m) != m\n"
            "assert 'torroute.delivery.scrub' in sys.modules\n"
            "assert '_hashlib' not in sys.modules  # CPython's SHA-256, not OpenSSL's\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
