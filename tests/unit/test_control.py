"""The pure parts of torroute.tor: control-protocol parsing (protocols.control), settings
planning (tor.settings), onion keys (tor.onion_service), the SMTP probe (tor.relay_probe),
torrc rendering (tor.torrc)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torroute.config import Config
from torroute.errors import ConfigError
from torroute.protocols.control import (
    AddressMapping,
    PortOption,
    parse_address_mappings,
    parse_bootstrap,
    parse_getconf,
    parse_hs_desc,
    parse_quoted_list,
    port_address,
    quote,
    reverse_lookup,
    setconf_command,
    unquote,
)
from torroute.protocols.smtp import Reply, ReplyParser
from torroute.routing.onion import parse_onion
from torroute.tor.control import ControlEndpoint
from torroute.tor.onion_service import (
    HsBlock,
    address_from_expanded_key,
    decode_key_file,
    encode_key_file,
    flatten_hidden_services,
    group_hidden_services,
    new_expanded_key,
    read_key_file,
    write_key_file,
)
from torroute.tor.relay_probe import RelayVerdict, classify_rcpt_reply, relay_refusal
from torroute.tor.settings import (
    TorSettings,
    check_settings,
    plan_ensure,
    suffixes_cover_onion,
)
from torroute.tor.torrc import (
    PortMapping,
    client_lines,
    onion_service_lines,
    parse_hidden_service_port,
    parse_port_mapping,
    render,
    torrc_quote,
)

CFG = Config(tor_socks=("127.0.0.1", 9050), tor_dns=("127.0.0.1", 9053))


# -- endpoints and control-protocol syntax --------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("unix:/run/tor/control", ControlEndpoint(path="/run/tor/control")),
    ("/run/tor/control", ControlEndpoint(path="/run/tor/control")),
    ("inet:127.0.0.1:9051", ControlEndpoint(host="127.0.0.1", port=9051)),
    ("127.0.0.1:9051", ControlEndpoint(host="127.0.0.1", port=9051)),
    ("9051", ControlEndpoint(host="127.0.0.1", port=9051)),
    ("inet:[::1]:9051", ControlEndpoint(host="::1", port=9051)),
])
def test_control_endpoints(text: str, expected: ControlEndpoint) -> None:
    assert ControlEndpoint.parse(text) == expected
    assert ControlEndpoint.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["unix:relative", "inet:host", "inet:127.0.0.1:99999"])
def test_bad_control_endpoints(text: str) -> None:
    with pytest.raises(ConfigError):
        ControlEndpoint.parse(text)


def test_bootstrap_phase_as_tor_0_4_9_reports_it() -> None:
    text = ('WARN BOOTSTRAP PROGRESS=5 TAG=conn SUMMARY="Connecting to a relay" '
            'WARNING="Connection refused" REASON=CONNECTREFUSED COUNT=1 RECOMMENDATION=warn '
            'HOSTID="0000000000000000000000000000000000000000" HOSTADDR="127.0.0.1:60613"')
    boot = parse_bootstrap(text)
    assert (boot.progress, boot.tag, boot.summary, boot.warning) == (
        5, "conn", "Connecting to a relay", "Connection refused")
    assert not boot.done
    done = parse_bootstrap('NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"')
    assert done.done and done.warning is None
    assert parse_bootstrap("").progress == 0


def test_listeners_getconf_and_quoting() -> None:
    assert parse_quoted_list('"127.0.0.1:9050" "127.0.0.1:9051"') == [
        "127.0.0.1:9050", "127.0.0.1:9051"]
    assert parse_quoted_list("") == []
    lines = ["SocksPort=127.0.0.1:9050 ExtendedErrors", "DNSPort",
             'HiddenServiceDir="/var/lib/tor/a \\"b\\""']
    assert parse_getconf(lines) == [("SocksPort", "127.0.0.1:9050 ExtendedErrors"),
                                    ("DNSPort", None),
                                    ("HiddenServiceDir", '/var/lib/tor/a "b"')]


@given(st.text(alphabet=st.characters(blacklist_characters="\r\n\0",
                                      blacklist_categories=("Cs",))))
def test_quote_roundtrip(value: str) -> None:
    assert unquote(quote(value)) == value


def test_quote_refuses_line_breaks() -> None:
    with pytest.raises(ConfigError):
        quote("a\r\nSETCONF DisableNetwork=1")


def test_setconf_command_resends_every_value() -> None:
    cmd = setconf_command([("SocksPort", ["127.0.0.1:9050", "127.0.0.1:9150 ExtendedErrors"]),
                           ("DNSPort", []), ("AutomapHostsOnResolve", ["1"])])
    assert cmd == ('SETCONF SocksPort="127.0.0.1:9050" SocksPort="127.0.0.1:9150 '
                   'ExtendedErrors" DNSPort AutomapHostsOnResolve="1"')


@pytest.mark.parametrize("value,expected", [
    ("9050", ("127.0.0.1", 9050)), ("127.0.0.1:9050", ("127.0.0.1", 9050)),
    ("localhost:9050", ("127.0.0.1", 9050)), ("[::1]:9050", ("::1", 9050)),
    ("0", None), ("auto", None), ("unix:/run/tor/socks", None),
])
def test_port_address(value: str, expected) -> None:
    assert port_address(value) == expected


def test_port_option_flags() -> None:
    opt = PortOption.parse("127.0.0.1:9050 IsolateDestAddr")
    assert not opt.has_flag("extendederrors")
    assert str(opt.with_flag("ExtendedErrors")) == "127.0.0.1:9050 IsolateDestAddr ExtendedErrors"
    same = opt.with_flag("ExtendedErrors")
    assert same.with_flag("ExtendedErrors") == same


@pytest.mark.parametrize("suffixes,covered", [
    ([".onion", ".exit"], True), ([".exit"], False), (["."], True), (["onion"], True),
    ([], False), ([".ONION"], True),
])
def test_automap_suffixes(suffixes: list[str], covered: bool) -> None:
    assert suffixes_cover_onion(suffixes) is covered


# -- status problems and the ensure plan ------------------------------------------------------

GOOD = TorSettings(socks_ports=["127.0.0.1:9050 ExtendedErrors"], dns_ports=["127.0.0.1:9053"],
                   socks_listeners=["127.0.0.1:9050"], dns_listeners=["127.0.0.1:9053"],
                   automap=True, suffixes=[".onion"])


def test_good_settings_have_no_problem_and_no_plan() -> None:
    assert check_settings(GOOD, CFG) == []
    assert plan_ensure(GOOD, CFG) == []


def test_debian_default_torrc_problems_and_plan() -> None:
    """Debian's tor: SocksPort unset (the default 9050 listens), no DNSPort, no automap."""
    debian = TorSettings(socks_ports=[], dns_ports=[], socks_listeners=["127.0.0.1:9050"],
                         dns_listeners=[], automap=False, suffixes=[".onion", ".exit"])
    problems = {p.option: p for p in check_settings(debian, CFG)}
    assert set(problems) == {"DNSPort", "AutomapHostsOnResolve", "SocksPort"}
    assert problems["SocksPort"].severity == "warning"  # works, but without ExtendedErrors
    assert "DNSPort 127.0.0.1:9053" in problems["DNSPort"].fix
    assert all(p.line().startswith(f"{p.severity}: {p.option}: ") and "fix: " in p.line()
               for p in problems.values())
    assert plan_ensure(debian, CFG) == [
        ("SocksPort", ["127.0.0.1:9050 ExtendedErrors"]),
        ("DNSPort", ["127.0.0.1:9053"]),
        ("AutomapHostsOnResolve", ["1"]),
    ]


def test_plan_keeps_every_admin_port_and_flag() -> None:
    admin = TorSettings(
        socks_ports=["127.0.0.1:9050 IsolateDestAddr", "unix:/run/tor/socks WorldWritable"],
        dns_ports=["127.0.0.1:5353"], socks_listeners=["127.0.0.1:9050"],
        dns_listeners=["127.0.0.1:5353"], automap=True, suffixes=[".exit"])
    plan = dict(plan_ensure(admin, CFG))
    assert plan["SocksPort"] == ["127.0.0.1:9050 IsolateDestAddr ExtendedErrors",
                                 "unix:/run/tor/socks WorldWritable"]
    assert plan["DNSPort"] == ["127.0.0.1:5353", "127.0.0.1:9053"]
    assert plan["AutomapHostsSuffixes"] == [".exit,.onion"]
    assert "AutomapHostsOnResolve" not in plan


def test_plan_keeps_the_implicit_default_socksport() -> None:
    """torroute on another port than 9050: adding it must not kill tor's default 9050, which
    vanishes as soon as any SocksPort is set."""
    cfg = Config(tor_socks=("127.0.0.1", 9150), tor_dns=("127.0.0.1", 9053))
    default = TorSettings(socks_ports=[], dns_ports=["127.0.0.1:9053"],
                          socks_listeners=["127.0.0.1:9050"],
                          dns_listeners=["127.0.0.1:9053"], automap=True)
    assert plan_ensure(default, cfg) == [
        ("SocksPort", ["127.0.0.1:9050", "127.0.0.1:9150 ExtendedErrors"])]


def test_plan_replaces_port_zero() -> None:
    off = TorSettings(socks_ports=["0"], dns_ports=["0"], automap=True)
    plan = dict(plan_ensure(off, CFG))
    assert plan["SocksPort"] == ["127.0.0.1:9050 ExtendedErrors"]
    assert plan["DNSPort"] == ["127.0.0.1:9053"]


def test_port_only_values_count_as_loopback() -> None:
    short = TorSettings(socks_ports=["9050 ExtendedErrors"], dns_ports=["9053"], automap=True)
    assert check_settings(short, CFG) == []


def test_virtual_network_mismatch_is_reported_not_fixed() -> None:
    other = TorSettings(**{**GOOD.__dict__, "virtual_network": "10.192.0.0/10"})
    (problem,) = check_settings(other, CFG)
    assert problem.option == "VirtualAddrNetworkIPv4" and not problem.fixable
    assert "10.192.0.0/10" in problem.fix
    assert plan_ensure(other, CFG) == []


# -- onion services -----------------------------------------------------------------------------

HS_LINES = [("HiddenServiceDir", "/var/lib/tor/web"), ("HiddenServicePort", "80 127.0.0.1:8080"),
            ("HiddenServiceMaxStreams", "5"), ("HiddenServiceDir", "/var/lib/tor/mx"),
            ("HiddenServicePort", "25 127.0.0.1:2525"), ("HiddenServicePort", "587")]


def test_hidden_service_blocks_roundtrip() -> None:
    blocks = group_hidden_services(HS_LINES)
    assert [b.directory for b in blocks] == ["/var/lib/tor/web", "/var/lib/tor/mx"]
    assert blocks[0].options == [("HiddenServiceMaxStreams", "5")]
    assert blocks[1].ports == [PortMapping(25, "127.0.0.1:2525"), PortMapping(587, "127.0.0.1:587")]
    flat = [(k, v[0]) for k, v in flatten_hidden_services(blocks)]
    assert flat == HS_LINES
    blocks.append(HsBlock("/var/lib/tor/new", [("HiddenServicePort", "25 127.0.0.1:2526")]))
    cmd = setconf_command(flatten_hidden_services(blocks))
    assert cmd.count("HiddenServiceDir=") == 3 and 'HiddenServiceMaxStreams="5"' in cmd


@pytest.mark.parametrize("text,expected", [
    ("25=127.0.0.1:2525", PortMapping(25, "127.0.0.1:2525")),
    ("25,127.0.0.1:2525", PortMapping(25, "127.0.0.1:2525")),
    ("25 2525", PortMapping(25, "127.0.0.1:2525")),
    ("25", PortMapping(25, "127.0.0.1:25")),
    ("25=unix:/run/onion-smtpd.sock", PortMapping(25, "unix:/run/onion-smtpd.sock")),
    ("25=[::1]:2525", PortMapping(25, "[::1]:2525")),
])
def test_port_mappings(text: str, expected: PortMapping) -> None:
    mapping = parse_port_mapping(text)
    assert mapping == expected
    assert parse_hidden_service_port(mapping.torrc_value) == mapping
    assert mapping.add_onion_value == f"{expected.virtual},{expected.target}"


@pytest.mark.parametrize("text", ["0=127.0.0.1:25", "25=localhost:2525", "25=unix:rel",
                                  "x=1", "25=127.0.0.1:70000", "25=[::1"])
def test_bad_port_mappings(text: str) -> None:
    with pytest.raises(ValueError):
        parse_port_mapping(text)


def test_tcp_target() -> None:
    assert PortMapping(25, "127.0.0.1:2525").tcp_target == ("127.0.0.1", 2525)
    assert PortMapping(25, "[::1]:2525").tcp_target == ("::1", 2525)
    assert PortMapping(25, "unix:/x").tcp_target is None


def test_address_mappings_and_reverse() -> None:
    text = ('127.240.57.104 epzjqfgowrf25ktlh7owum5qfh5lbaxekmm2oioxoi3bh2kfqvlbk6qd.onion NEVER\n'
            'example.com 10.0.0.1 "2026-01-01 00:00:00"')
    mappings = parse_address_mappings(text)
    assert mappings[0] == AddressMapping(
        "127.240.57.104", "epzjqfgowrf25ktlh7owum5qfh5lbaxekmm2oioxoi3bh2kfqvlbk6qd.onion", "NEVER")
    assert mappings[1].expires == "2026-01-01 00:00:00"
    assert reverse_lookup(mappings, "127.240.57.104") == mappings[0].target
    assert reverse_lookup(mappings, "127.240.57.105") is None
    with pytest.raises(ConfigError):
        reverse_lookup(mappings, "not-an-ip")


def test_hs_desc_events() -> None:
    e = parse_hs_desc("HS_DESC UPLOADED abcdef UNKNOWN $AAAA~relay1 HSDIR_INDEX=12")
    assert (e.action, e.address, e.hsdir) == ("UPLOADED", "abcdef", "$AAAA~relay1")
    f = parse_hs_desc("650 HS_DESC FAILED abcdef UNKNOWN $BB REASON=UPLOAD_REJECTED")
    assert (f.action, f.reason) == ("FAILED", "UPLOAD_REJECTED")
    assert parse_hs_desc("CIRC 1 BUILT") is None


# -- ephemeral keys ---------------------------------------------------------------------------

def test_locally_made_keys_give_valid_addresses() -> None:
    key = new_expanded_key()
    address = address_from_expanded_key(key)
    assert parse_onion(address).host == address  # checksum and ed25519 point both valid
    assert decode_key_file(encode_key_file(key)) == key
    assert address in encode_key_file(key).decode()  # the comment names the address


def test_tor_secret_key_files_are_accepted() -> None:
    """tor's hs_ed25519_secret_key (32-byte header + 64-byte expanded key)."""
    key = new_expanded_key()
    tor_file = b"== ed25519v1-secret: type0 ==\x00\x00\x00" + key
    assert decode_key_file(tor_file) == key


def test_the_key_of_a_known_service() -> None:
    """A key tor itself returned from ADD_ONION NEW:ED25519-V3 (ServiceID 6jymew...)."""
    blob = ("EDacvMjn8fhMyna1+150GxCTeozXR/EljgCSgCFMXGStqD6GF/wXKLYyCQYFUBRwYBFAaRXbY4a"
            "WAvQCnnGxtw==")
    key = decode_key_file(f"ED25519-V3:{blob}\n".encode())
    assert key == base64.b64decode(blob)
    assert address_from_expanded_key(key) == \
        "6jymewcfskxvxnt3tdg5qwkdnilt65ayxkf2uxdj7462izugdhdzqtyd.onion"


@pytest.mark.parametrize("data", [b"", b"ED25519-V3:AAAA", b"RSA1024:abc", b"\xff" * 96])
def test_bad_key_files(data: bytes) -> None:
    with pytest.raises(ConfigError, match="not an onion key"):
        decode_key_file(data)


def test_key_file_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "mx.key"
    key = new_expanded_key()
    write_key_file(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path) == key
    with pytest.raises(FileExistsError):
        write_key_file(path, new_expanded_key())
    assert read_key_file(path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["mx.key"]  # no temporary left behind


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mx.key"
    write_key_file(path, new_expanded_key())
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_key_file(path)


# -- SMTP relay probe -------------------------------------------------------------------------

def test_smtp_replies_multiline_and_partial() -> None:
    """The probe reads replies with the one SMTP reply parser (protocols.smtp.ReplyParser)."""
    parser = ReplyParser()
    (reply,) = parser.feed(b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n354")
    assert reply == Reply(250, ("mx.example", "PIPELINING", "8BITMIME"))
    assert parser.pending  # b"354" is kept for the next reply
    assert ReplyParser().feed(b"220-partial\r\n") == []
    assert ReplyParser().feed(b"554\r\n") == [Reply(554, ("",))]
    with pytest.raises(ValueError):
        ReplyParser().feed(b"HTTP/1.0 400 Bad Request\r\n")


@pytest.mark.parametrize("code,text,verdict", [
    (250, "2.1.5 Ok", "open"),
    (251, "User not local; will forward", "open"),
    (554, "5.7.1 <relay-probe@relay-check.invalid>: Relay access denied", "closed"),
    (454, "4.7.1 <relay-probe@relay-check.invalid>: Relay access denied", "closed"),
    (550, "relay not permitted", "closed"),  # Exim's default ACL, no enhanced code
    (450, "4.1.2 <relay-probe@relay-check.invalid>: Recipient address rejected: Domain not found",
     "inconclusive"),
    (550, "5.1.1 User unknown", "inconclusive"),
])
def test_rcpt_classification(code: int, text: str, verdict: str) -> None:
    assert classify_rcpt_reply(Reply(code, (text,))) == verdict


def test_relay_refusal_explains_the_trap() -> None:
    mapping = PortMapping(25, "127.0.0.1:25")
    assert relay_refusal([RelayVerdict(mapping, "closed", "554 ...")]) is None
    assert relay_refusal([RelayVerdict(mapping, "no-listener", "refused")]) is None
    text = relay_refusal([RelayVerdict(mapping, "open", "RCPT: 250 2.1.5 Ok")])
    assert text is not None
    assert "127.0.0.1" in text and "mynetworks" in text and "--force" in text
    assert "inconclusive" in relay_refusal([RelayVerdict(mapping, "inconclusive", "450")])


# -- torrc rendering --------------------------------------------------------------------------

def test_client_lines() -> None:
    assert client_lines() == ["SocksPort 127.0.0.1:9050 ExtendedErrors", "DNSPort 127.0.0.1:9053",
                              "AutomapHostsOnResolve 1", "AutomapHostsSuffixes .onion"]
    assert client_lines(virtual_network="10.192.0.0/10")[-1] == \
        "VirtualAddrNetworkIPv4 10.192.0.0/10"


def test_onion_service_lines() -> None:
    assert onion_service_lines("/var/lib/tor/mx", [PortMapping(25, "127.0.0.1:2525")]) == [
        "HiddenServiceDir /var/lib/tor/mx", "HiddenServicePort 25 127.0.0.1:2525"]
    assert onion_service_lines("/var/lib/tor/my mx", [PortMapping(25, "127.0.0.1:25")])[0] == \
        'HiddenServiceDir "/var/lib/tor/my mx"'
    with pytest.raises(ValueError):
        onion_service_lines("relative", [PortMapping(25, "127.0.0.1:25")])
    with pytest.raises(ValueError):
        onion_service_lines("/x", [])


def test_render_is_valid_torrc() -> None:
    text = render(onion_dir="/var/lib/tor/mx")
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines == client_lines() + ["HiddenServiceDir /var/lib/tor/mx",
                                      "HiddenServicePort 25 127.0.0.1:2525"]
    assert "mynetworks" in text
    assert render(client=False) == ""
    assert torrc_quote('a"b') == '"a\\"b"' and torrc_quote("plain") == "plain"
