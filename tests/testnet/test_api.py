"""The public Python API (``import torroute``): its names, ``load_config``'s overrides, and
``send_message`` / ``torroute.SMTP`` delivering on the private Tor network into a Maildir sink.

    pinned.test        pinned (text map) to the session sink's onion
    srv.test           _onion-mx._tcp SRV (real dnsmasq) to a second onion sink
    user@<onion>       the session sink's onion as is
    nosrv.test         NXDOMAIN: no onion route, never sent
"""

from __future__ import annotations

import argparse
import email
import importlib
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest
from support.e2e import SRV, UNPUBLISHED
from support.onions import ONION_A

import torroute
from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port
from torroute.testing.sink import Received

REPO = Path(__file__).resolve().parents[2]

PUBLIC = {
    "load_config", "Config", "Router", "Route", "NoRoute", "TempFail", "Reject", "parse_onion",
    "OnionAddress", "dial", "open_connection", "resolve_automap", "SMTP", "SendResult",
    "send_message", "TorrouteError", "TemporaryError", "PermanentError", "InvalidOnion",
    "ConfigError", "MapError", "DNSTemporaryError", "TorUnavailable", "AutomapError",
    "SocksError", "TemporarySocksError", "PermanentSocksError", "ProtocolError", "TlsRefused",
}


def test_all_is_exactly_the_public_names_and_each_resolves() -> None:
    assert set(torroute.__all__) == PUBLIC and len(torroute.__all__) == len(PUBLIC)
    for name in PUBLIC:
        assert getattr(torroute, name) is not None
    assert issubclass(torroute.InvalidOnion, torroute.PermanentError)
    assert issubclass(torroute.TorUnavailable, torroute.TemporaryError)
    assert torroute.Route is importlib.import_module("torroute.routing.router").Route
    with pytest.raises(AttributeError):
        torroute.deliver_settings  # noqa: B018 - not public
    assert set(torroute.__all__) <= set(dir(torroute))


def test_import_is_lazy() -> None:
    """``torroute deliver`` imports the package per message: no dnspython, asyncio, smtplib."""
    code = ("import sys, torroute; heavy = [m for m in ('dns', 'asyncio', 'smtplib', "
            "'torroute.routing.router', 'torroute.delivery.client') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_load_config_overrides_use_the_toml_coercion(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text('[tor]\nsocks = "127.0.0.1:9999"\n[routing]\ndns_timeout = 3\n')
    config = torroute.load_config(cfg, nameservers=["127.0.0.1:5353", "127.0.0.2"],
                                  tor_socks="127.0.0.1:9150", maps=["m.txt"],
                                  local_domains=["Example.ORG."], deliver={"time_limit": 9})
    assert config.nameservers == [("127.0.0.1", 5353), ("127.0.0.2", 53)]
    assert config.tor_socks == ("127.0.0.1", 9150)  # the keyword wins over the file
    assert config.dns_timeout == 3.0 and config.maps == [Path("m.txt")]
    assert config.local_domains == ["example.org"]
    assert config.section("deliver") == {"time_limit": 9}
    with pytest.raises(torroute.ConfigError, match="unknown setting 'socks'"):
        torroute.load_config(cfg, socks="127.0.0.1:9050")  # the TOML key, not the Config name
    with pytest.raises(torroute.ConfigError, match="unknown setting 'routing'"):
        torroute.load_config(cfg, routing={"maps": []})
    with pytest.raises(torroute.ConfigError, match=r"tor_socks=.*expected HOST:PORT"):
        torroute.load_config(cfg, tor_socks="localhost")
    with pytest.raises(torroute.ConfigError, match="dns_timeout.*positive"):
        torroute.load_config(cfg, dns_timeout=0)
    with pytest.raises(torroute.ConfigError, match="require_dnssec.*true or false"):
        torroute.load_config(cfg, require_dnssec="yes")


def test_load_config_default_path_honours_torroute_config(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "env.toml"
    cfg.write_text('[tor]\nsocks = "127.0.0.1:9111"\n')
    monkeypatch.setenv("TORROUTE_CONFIG", str(cfg))
    assert torroute.load_config().tor_socks == ("127.0.0.1", 9111)
    assert torroute.load_config().path == cfg
    monkeypatch.setenv("TORROUTE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(torroute.ConfigError, match="does not exist"):
        torroute.load_config()  # named explicitly: a missing file is an error, not defaults
    # the CLI's call keeps working: flags (an argparse Namespace, turned into overrides by the
    # CLI layer) win over the file
    from torroute.cli.options import load_cli_config

    args = argparse.Namespace(config=str(cfg), tor_socks="127.0.0.1:9222", maps=None)
    assert load_cli_config(args).tor_socks == ("127.0.0.1", 9222)


# ---- on the private Tor network


def message(to: str = "alice@pinned.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@origin.test>"
    msg["To"] = to
    msg["Subject"] = "torroute API test"
    msg.set_content("sent with torroute.send_message\n.leading dot\n")
    return msg


def stored(sink, received: Received) -> email.message.Message:
    """The message as the Maildir holds it (the sink's envelope header on top)."""
    path = sink.path_of(received)
    assert path.is_file(), path
    return email.message_from_bytes(path.read_bytes())


@pytest.fixture
def api_config(testnet, onion_sink, onion_sink_factory, dnsmasq_factory, tmp_path: Path):
    second = onion_sink_factory()
    dns = dnsmasq_factory([SrvRecord(SRV + "srv.test", second.onion, 25)])
    pins = tmp_path / "pins.txt"
    pins.write_text(f"pinned.test {onion_sink.onion}\n")
    config = torroute.load_config(Path("/dev/null"), maps=[str(pins)],
                                  nameservers=[f"127.0.0.1:{dns.port}"],
                                  tor_socks=f"{testnet.socks_extended[0]}:"
                                            f"{testnet.socks_extended[1]}",
                                  deliver={"time_limit": 90})
    return config, onion_sink, second


@pytest.mark.testnet
def test_send_message_routes_groups_and_delivers_per_recipient(api_config) -> None:
    config, first, second = api_config
    first.sink.reject("eve@pinned.test", "550 5.1.1 <eve@pinned.test>: no such user")
    raw_onion = f"bob@{first.onion}"
    rcpts = ["alice@pinned.test", "carol@srv.test", raw_onion, "dave@nosrv.test",
             "eve@pinned.test"]
    results = torroute.send_message(message(), to_addrs=rcpts, config=config)
    assert list(results) == rcpts
    for rcpt in ("alice@pinned.test", "carol@srv.test", raw_onion):
        assert results[rcpt].status == "delivered" and results[rcpt].dsn == "2.0.0", results
        assert not results[rcpt].temporary
    assert f"host {first.onion}:25 said: 250 " in results["alice@pinned.test"].text
    assert f"host {second.onion}:25 said: 250 " in results["carol@srv.test"].text
    # no onion route: not sent, and the result says why
    dave = results["dave@nosrv.test"]
    assert (dave.status, dave.dsn, dave.temporary) == ("bounced", "5.4.4", False)
    assert "no onion route for nosrv.test" in dave.text and "not sent" in dave.text
    # a refused RCPT fails that recipient only, with the remote's words
    eve = results["eve@pinned.test"]
    assert (eve.status, eve.dsn) == ("bounced", "5.1.1") and "no such user" in eve.text
    # the path: one transaction per onion, each in its sink's Maildir with the right envelope
    [got] = first.sink.wait_for(1)
    assert got.mail_from == "sender@origin.test"
    assert got.rcpt_tos == ["alice@pinned.test", raw_onion]
    on_disk = stored(first.sink, got)
    assert on_disk["X-Sink-Envelope-To"] == f"alice@pinned.test, {raw_onion}"
    assert on_disk["Subject"] == "torroute API test"
    # dot-stuffed on the wire (the sink un-stuffs), CRLF line ends
    assert got.data.endswith(b"send_message\r\n.leading dot\r\n")
    [got2] = second.sink.wait_for(1)
    assert got2.rcpt_tos == ["carol@srv.test"] and stored(second.sink, got2)["Subject"]
    assert all("dave" not in r for m in first.sink.messages + second.sink.messages
               for r in m.rcpt_tos)


@pytest.mark.testnet
def test_send_message_tries_the_backup_srv_target(testnet, onion_sink, dnsmasq_factory) -> None:
    """The priority-0 target is an onion nobody publishes (tor 0xF0, before MAIL): the
    priority-10 one gets the message, and the result says what the first answered."""
    dns = dnsmasq_factory([SrvRecord(SRV + "prio.test", UNPUBLISHED, 25, priority=0),
                           SrvRecord(SRV + "prio.test", onion_sink.onion, 25, priority=10)])
    config = torroute.load_config(Path("/dev/null"), nameservers=[f"127.0.0.1:{dns.port}"],
                                  tor_socks=f"127.0.0.1:{testnet.socks_extended[1]}")
    result = torroute.send_message(message("user@prio.test"), config=config)["user@prio.test"]
    assert (result.status, result.dsn) == ("delivered", "2.0.0"), result
    assert result.text.startswith(f"via backup: host {onion_sink.onion}:25 said: 250 ")
    assert UNPUBLISHED in result.text and "0xf0" in result.text.lower(), result
    [got] = onion_sink.sink.wait_for(1)
    assert got.rcpt_tos == ["user@prio.test"]
    assert stored(onion_sink.sink, got)["X-Sink-Envelope-To"] == "user@prio.test"


@pytest.mark.testnet
def test_send_message_invalid_onion_bounces_5_1_2_and_nothing_is_sent(api_config) -> None:
    config, first, _ = api_config
    bad = "x@" + ("b" if ONION_A[0] == "a" else "a") + ONION_A[1:]  # one typo
    results = torroute.send_message(message(bad), config=config)
    [(rcpt, result)] = results.items()
    assert rcpt == bad
    assert (result.status, result.dsn, result.temporary) == ("bounced", "5.1.2", False)
    assert "checksum" in result.text or "not a valid" in result.text
    assert first.sink.messages == []


@pytest.mark.testnet
def test_send_message_with_tor_down_defers(api_config) -> None:
    config, first, _ = api_config
    config.tor_socks = ("127.0.0.1", free_port())  # nothing listens: tor is down
    results = torroute.send_message(message(), config=config)
    result = results["alice@pinned.test"]
    assert result.status == "deferred" and result.temporary and result.dsn.startswith("4.")
    assert "unreachable" in result.text
    assert first.sink.messages == []


@pytest.mark.testnet
def test_torroute_smtp_delivers_to_an_onion(api_config) -> None:
    config, first, _ = api_config
    with torroute.SMTP(first.onion, 25, config=config) as smtp:
        code, ehlo = smtp.ehlo()
        assert code == 250 and smtp.local_hostname == "localhost"  # not this host's name
        refused = smtp.send_message(message(), to_addrs=["smtp@pinned.test"])
    assert refused == {}
    [got] = first.sink.wait_for(1)
    assert got.mail_from == "sender@origin.test" and got.rcpt_tos == ["smtp@pinned.test"]
    assert stored(first.sink, got)["X-Sink-Envelope-To"] == "smtp@pinned.test"


def test_torroute_smtp_refuses_a_clear_net_host() -> None:
    config = torroute.load_config(Path("/dev/null"), tor_socks=f"127.0.0.1:{free_port()}")
    with pytest.raises(torroute.InvalidOnion, match="not an .onion"):
        torroute.SMTP("mx.example.org", 25, config=config)


def test_router_defaults_to_load_config_and_routes_both_ways(tmp_path: Path,
                                                             monkeypatch) -> None:
    import asyncio

    (tmp_path / "pins.txt").write_text(f"pinned.test {ONION_A}:2525\n")
    cfg = tmp_path / "torroute.toml"
    cfg.write_text('[routing]\nmaps = ["pins.txt"]\nnameservers = []\n')
    monkeypatch.setenv("TORROUTE_CONFIG", str(cfg))
    router = torroute.Router()  # config=None: load_config(), i.e. $TORROUTE_CONFIG
    route = router.route("x@Pinned.Test")
    assert isinstance(route, torroute.Route) and (route.onion, route.port) == (ONION_A, 2525)
    assert asyncio.run(router.aroute("pinned.test")) == route
    assert isinstance(router.route("other.test"), torroute.TempFail)  # no nameserver: defer
    assert isinstance(router.route(f"u@{ONION_A}"), torroute.Route)
    assert isinstance(router.route("u@aaaa.onion"), torroute.Reject)
