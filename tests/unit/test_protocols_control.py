"""torroute.protocols.control, the pure control-protocol codec: examples and properties (it never
raises on what a peer sends; quoting, keyword lines and reply framing round-trip)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torroute.errors import ConfigError
from torroute.protocols.control import (
    PortOption,
    Reply,
    ReplyLine,
    ReplyParser,
    getinfo_value,
    parse_address_mappings,
    parse_bootstrap,
    parse_getconf,
    parse_hs_desc,
    parse_keywords,
    parse_quoted_list,
    port_address,
    quote,
    reverse_lookup,
    same_address,
    setconf_command,
    unquote,
)

# text that can be sent in a control command: no line breaks, no NUL, no lone surrogates
SENDABLE = st.text(alphabet=st.characters(blacklist_characters="\r\n\0",
                                          blacklist_categories=("Cs",)))
KEYS = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_-]{0,15}\Z")
CODES = st.from_regex(r"\A[2-6][0-9][0-9]\Z")
LINE_TEXT = st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                           blacklist_categories=("Cs",)), max_size=40)


# ---- quoting and keywords


@given(SENDABLE)
def test_quote_unquote_round_trip(value: str) -> None:
    quoted = quote(value)
    assert quoted.startswith('"') and quoted.endswith('"')
    assert unquote(quoted) == value


@given(st.text())
def test_unquote_never_raises_and_keeps_unquoted_text(text: str) -> None:
    result = unquote(text)
    if not (len(text) >= 2 and text[0] == text[-1] == '"'):
        assert result == text


@pytest.mark.parametrize("value", ["a\r\nSETCONF DisableNetwork=1", "a\nb", "a\0b", "\r"])
def test_quote_refuses_what_would_end_the_command(value: str) -> None:
    with pytest.raises(ConfigError):
        quote(value)


@given(st.dictionaries(KEYS, SENDABLE, max_size=6))
def test_keyword_line_round_trip(pairs: dict[str, str]) -> None:
    unique = {k.upper(): v for k, v in pairs.items()}
    line = "NOTICE BOOTSTRAP " + " ".join(f"{k}={quote(v)}" for k, v in unique.items())
    positional, keywords = parse_keywords(line)
    assert positional == ["NOTICE", "BOOTSTRAP"]
    assert keywords == unique


@given(st.lists(st.tuples(KEYS, st.lists(SENDABLE, min_size=1, max_size=3)), max_size=5))
def test_setconf_command_parses_back(changes: list[tuple[str, list[str]]]) -> None:
    command = setconf_command(changes)
    assert "\r" not in command and "\n" not in command
    positional, keywords = parse_keywords(command)
    assert positional[0] == "SETCONF"
    last = {}
    for key, values in changes:
        last[key.upper()] = values[-1]
    assert keywords == last  # parse_keywords keeps the last value of a repeated key


@given(st.lists(SENDABLE, max_size=5))
def test_quoted_list_round_trip(values: list[str]) -> None:
    assert parse_quoted_list(" ".join(quote(v) for v in values)) == values


def test_setconf_command_unsets_with_none_or_empty() -> None:
    assert setconf_command([("DNSPort", []), ("SocksPort", [None])]) == "SETCONF DNSPort SocksPort"
    assert setconf_command([("A", ["1"])], verb="RESETCONF") == 'RESETCONF A="1"'


# ---- the parsers never raise on what tor (or anything) sends


@given(st.text())
def test_line_parsers_never_raise(text: str) -> None:
    parse_keywords(text)
    parse_quoted_list(text)
    parse_bootstrap(text)
    parse_address_mappings(text)
    parse_hs_desc(text)
    port_address(text)
    str(PortOption.parse(text))
    parse_getconf(text.splitlines())
    getinfo_value([("-", text), ("+", text)], "version")


@given(st.text(), st.text())
def test_reverse_lookup_raises_only_config_error(table: str, ip: str) -> None:
    try:
        reverse_lookup(parse_address_mappings(table), ip)
    except ConfigError:
        pass


@given(st.integers(0, 100), st.from_regex(r"\A[a-z_]{1,12}\Z"), SENDABLE)
def test_bootstrap_round_trip(progress: int, tag: str, summary: str) -> None:
    boot = parse_bootstrap(f"NOTICE BOOTSTRAP PROGRESS={progress} TAG={tag} "
                           f"SUMMARY={quote(summary)}")
    assert (boot.progress, boot.tag, boot.summary, boot.warning) == (progress, tag, summary, None)
    assert boot.done is (progress == 100)


@given(st.tuples(st.sampled_from(["127.0.0.1", "::1", "10.1.2.3", "localhost"]),
                 st.integers(1, 65535)))
def test_same_address_is_reflexive(address: tuple[str, int]) -> None:
    assert same_address(port_address(f"{address[0]}:{address[1]}".replace("::1:", "[::1]:")),
                        ("127.0.0.1" if address[0] == "localhost" else address[0], address[1]))


# ---- reply framing


def encode(reply: Reply) -> bytes:
    """A reply as tor writes it (a data block dot-stuffed, ending in a lone '.')."""
    out = b""
    for line in reply.lines:
        if line.divider == "+":
            head, _, data = line.text.partition("\n")
            out += f"{line.code}+{head}\r\n".encode()
            for row in data.split("\n"):
                out += (("." + row) if row.startswith(".") else row).encode() + b"\r\n"
            out += b".\r\n"
        else:
            out += f"{line.code}{line.divider}{line.text}\r\n".encode()
    return out


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(CODES)
    middle = draw(st.lists(st.one_of(
        st.builds(lambda t: ReplyLine(code, "-", t), LINE_TEXT),
        st.builds(lambda k, rows: ReplyLine(code, "+", f"{k}=\n" + "\n".join(rows)),
                  KEYS, st.lists(LINE_TEXT, min_size=1, max_size=3))), max_size=3))
    last = ReplyLine(code, " ", draw(LINE_TEXT))
    return Reply(tuple(middle) + (last,))


@given(st.lists(replies(), min_size=1, max_size=4), st.data())
def test_replies_round_trip_in_any_chunking(sent: list[Reply], data: st.DataObject) -> None:
    wire = b"".join(encode(r) for r in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    parser, got, start = ReplyParser(), [], 0
    for cut in [*cuts, len(wire)]:
        got += parser.feed(wire[start:cut])
        start = cut
    assert got == sent


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=6))
def test_reply_parser_never_raises(wire: bytes, cuts: list[int]) -> None:
    parser, start = ReplyParser(), 0
    for cut in [*sorted(c for c in cuts if c <= len(wire)), len(wire)]:
        for reply in parser.feed(wire[start:cut]):
            assert reply.lines  # every reply has a last line
            _ = (reply.ok, reply.is_event, reply.message, reply.texts)
        start = cut


def test_reply_examples() -> None:
    parser = ReplyParser()
    wire = (b"250-version=0.4.9.1\r\n250+config-text=\r\nSocksPort 9050\r\n..dot\r\n.\r\n"
            b"250 OK\r\n650 HS_DESC UPLOADED abc UNKNOWN $AA~r\r\n552 Unrecognized key\r\n")
    info, event, refused = parser.feed(wire)
    assert info.ok and not info.is_event and info.code == "250"
    assert getinfo_value([(ln.divider, ln.text) for ln in info.lines], "version") == "0.4.9.1"
    assert getinfo_value([(ln.divider, ln.text) for ln in info.lines],
                         "config-text") == "SocksPort 9050\n.dot"
    assert getinfo_value([(ln.divider, ln.text) for ln in info.lines], "other") is None
    assert event.is_event and parse_hs_desc(event.lines[0].text).action == "UPLOADED"
    assert not refused.ok and refused.message == "Unrecognized key"
    assert parser.feed(b"250-partial\r\n") == []
    (garbage,) = parser.feed(b"HTTP/1.0 400 Bad Request\r\n")
    assert not garbage.ok  # ends the reply: a command waiting for it fails
