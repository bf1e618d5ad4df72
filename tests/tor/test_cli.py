"""The torroute CLI: exit statuses, output, config file + flags (run as a real subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.onions import ONION_A, ONION_B

from torroute.config import Config, ConfigError, load_config
from torroute.endpoint import parse_hostport
from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port

TORROUTE = [sys.executable, "-m", "torroute.cli"]


def run(*args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    cmd = TORROUTE + list(args)
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})


@pytest.fixture
def setup(tmp_path: Path, dnsmasq_factory):
    dns = dnsmasq_factory([SrvRecord("_onion-mx._tcp.example.test", ONION_A, 25)])
    (tmp_path / "map.yml").write_text(f"{ONION_B}:\n  - pinned.example\n")
    cfg = tmp_path / "torroute.toml"
    cfg.write_text(f"""
[routing]
maps = ["map.yml"]
nameservers = ["127.0.0.1:{dns.port}"]
local_domains = ["here.example"]
dns_timeout = 1.0
""")
    return cfg


def test_route_srv_and_pin(setup: Path) -> None:
    srv = run("route", "user@example.test", config=setup)
    assert srv.returncode == 0, srv.stderr
    assert srv.stdout.startswith(f"{ONION_A}:25\tfrom srv (ttl ")
    pin = run("route", "pinned.example", "--json", config=setup)
    data = json.loads(pin.stdout)
    assert data["result"] == "route" and data["onion"] == ONION_B
    assert data["source"].endswith("map.yml:2")


def test_route_exit_statuses(setup: Path) -> None:
    assert run("route", "nothing.test", config=setup).returncode == 1
    assert run("route", "x@here.example", config=setup).returncode == 1
    assert run("route", "x@bad.onion", config=setup).returncode == 65
    down = run("route", "example.org", "--nameserver", f"127.0.0.1:{free_port()}",
               "--dns-timeout", "0.3", config=setup)
    assert down.returncode == 75 and "temporary failure" in down.stderr
    assert run("route", config=setup).returncode == 64
    assert run("no-such-command").returncode == 64


def test_flags_override_the_file(setup: Path) -> None:
    result = run("route", "example.test", "--local-domain", "example.test", config=setup)
    assert result.returncode == 1 and "local domain" in result.stdout


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[routing]\nnameservers = [\"x:notaport\"]\n")
    result = run("route", "example.org", config=cfg)
    assert result.returncode == 78 and "notaport" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run("route", "example.org", config=tmp_path / "nope.toml")
    assert missing.returncode == 78 and "does not exist" in missing.stderr


def test_resolve_and_dial_against_real_tor(tor, setup: Path) -> None:
    dns = f"{tor.dns[0]}:{tor.dns[1]}"
    result = run("resolve", ONION_A, "--tor-dns", dns, config=setup)
    assert result.returncode == 0 and result.stdout.startswith("127.")
    down = run("resolve", ONION_A, "--tor-dns", f"127.0.0.1:{free_port()}", config=setup)
    assert down.returncode == 75 and "refused" in down.stderr
    socks = f"{tor.socks[0]}:{tor.socks[1]}"
    bad = run("dial", "expyuzz4wqqyqhjn.onion", "25", "--tor-socks", socks, config=setup)
    assert bad.returncode == 65 and "v2" in bad.stderr and "Traceback" not in bad.stderr
    slow = run("dial", ONION_A, "25", "--tor-socks", socks, "--timeout", "1", config=setup)
    assert slow.returncode == 75 and "timed out" in slow.stderr


def test_installed_entry_point_runs() -> None:
    exe = Path(sys.executable).parent / "torroute"
    assert exe.exists() or shutil.which("torroute"), "console script not installed"
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("torroute ")


def test_config_defaults_follow_debian_tor() -> None:
    config = load_config(Path("/dev/null"))
    assert config.tor_socks == ("127.0.0.1", 9050)
    assert config.tor_control == "unix:/run/tor/control"
    assert config.nameservers is None  # the system resolver, in production only


def test_unknown_setting_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text("[routing]\nnameserver = \"127.0.0.1\"\n")
    with pytest.raises(ConfigError, match="unknown setting routing.nameserver"):
        load_config(cfg)


def test_section_for_other_modules(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text("[serve]\nsocketmap = \"unix:/run/torroute/socketmap.sock\"\n")
    assert load_config(cfg).section("serve")["socketmap"].startswith("unix:")
    assert Config().section("deliver") == {}


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:53", ("127.0.0.1", 53)), ("[::1]:5353", ("::1", 5353)), ("ns", ("ns", 53)),
])
def test_parse_hostport(text: str, expected) -> None:
    assert parse_hostport(text, 53) == expected


@pytest.mark.parametrize("bad", ["x:0", "x:70000", ":53", "x:y"])
def test_parse_hostport_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_hostport(bad)


def test_shipped_example_configs_load() -> None:
    """contrib/torroute.toml and the plugin's toml are valid for every section they set."""
    from torroute.daemon.settings import ServeSettings

    repo = Path(__file__).resolve().parents[2]
    for path in (repo / "contrib/torroute.toml", repo / "plugins/postfix_pipe/torroute.toml"):
        config = load_config(path)
        assert config.path == path
        ServeSettings.from_config(config)
    assert load_config(repo / "contrib/torroute.toml").section("serve")["lmtp_transport"]
