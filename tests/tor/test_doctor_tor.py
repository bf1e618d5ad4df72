"""torroute doctor and torroute map check against real parts: a bridge-mode tor (it never
bootstraps: the temporary case), a tor without torroute's settings, a real daemon with its
status socket (and a reload that fails), and dnsmasq serving the SRV records pins are
compared with."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.onions import ONION_A, ONION_B, ONION_C

from torroute import exitcodes
from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port

pytestmark = pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")

SRV = "_onion-mx._tcp."
V2 = "expyuzz4wqqyqhjn.onion"
REPO = Path(__file__).resolve().parents[2]


def torroute(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torroute.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO,
                          env={"PATH": "/nonexistent", "PYTHONPATH": str(REPO)})


def doctor(config: Path, *args: str) -> tuple[int, dict[str, dict]]:
    """Run the program; its stderr must hold no traceback; the JSON's exit is the status."""
    result = torroute("doctor", "--config", str(config), "--json", "--timeout", "5", *args)
    assert result.stderr == ""  # every finding is a line of the report, nothing else
    data = json.loads(result.stdout)
    assert data["exit"] == result.returncode
    return result.returncode, {c["name"]: c for c in data["checks"]}


def write_map(path: Path) -> Path:
    path.write_text(f"""---
{ONION_A}:
  - agrees.test
  - nosrv.test
{ONION_B}:
  - moved.test
  - old.test
""")
    return path


def config_text(tmp_path: Path, t, *, nameserver: tuple[str, int] | None, serve: str = "",
                socks: tuple[str, int] | None = None) -> str:
    ns = f'"127.0.0.1:{nameserver[1]}"' if nameserver else f'"127.0.0.1:{free_port()}"'
    socks = socks or t.socks
    return f"""[routing]
maps = ["{tmp_path / 'map.yml'}"]
nameservers = [{ns}]
dns_timeout = 2
[tor]
control = "inet:127.0.0.1:{t.control_port}"
socks = "127.0.0.1:{socks[1]}"
dns = "127.0.0.1:{t.dns[1]}"
[serve]
{serve}
"""


def srv_records() -> list[SrvRecord]:
    return [SrvRecord(SRV + "agrees.test", ONION_A), SrvRecord(SRV + "moved.test", ONION_C),
            SrvRecord(SRV + "old.test", V2)]


def test_bridge_tor_and_a_running_daemon_exit_75_only_bootstrap_fails(
        tmp_path: Path, tor, daemon_factory, serve_dir: Path, dnsmasq_factory) -> None:
    dns = dnsmasq_factory(srv_records())
    write_map(tmp_path / "map.yml")
    status = serve_dir / "status.sock"
    lmtp = serve_dir / "lmtp.sock"
    d = daemon_factory("--status-socket", f"unix:{status}", "--lmtp", f"unix:{lmtp}",
                       "--config", str(tmp_path / "daemon.toml"), start=False)
    serve = (f'socketmap = "unix:{d.socketmap}"\ntcp_table = "inet:127.0.0.1:{d.tcp_port}"\n'
             f'exim = "unix:{d.exim}"\nlmtp = "unix:{lmtp}"\nstatus_socket = "unix:{status}"\n')
    (tmp_path / "daemon.toml").write_text(config_text(tmp_path, tor, nameserver=dns.address))
    cfg = tmp_path / "torroute.toml"
    cfg.write_text(config_text(tmp_path, tor, nameserver=dns.address, serve=serve))
    d.start()
    deadline = time.monotonic() + 30
    while not (status.exists() and lmtp.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    code, lines = doctor(cfg)
    failing = {n: c for n, c in lines.items() if c["status"] == "error"}
    assert code == exitcodes.TEMPFAIL, lines
    assert set(failing) == {"tor-bootstrap"}, failing  # bridge mode: never bootstraps
    assert "defers until tor is connected" in failing["tor-bootstrap"]["why"]
    for name in ("config", "maps", "tor-control", "tor-socks", "tor-dns", "tor-automap",
                 "daemon-socketmap", "daemon-tcp-table", "daemon-exim", "daemon-lmtp",
                 "daemon-reload",
                 "onions-lately"):
        assert lines[name]["status"] == "ok", (name, lines[name])
    assert lines["tor-control"]["why"].startswith("tor 0.4.")
    assert "socketmap answered NOTFOUND" in lines["daemon-socketmap"]["why"]
    assert "tcp_table answered 500" in lines["daemon-tcp-table"]["why"]
    assert "exim line protocol answered notfound" in lines["daemon-exim"]["why"]
    assert "LMTP greeting 220 " in lines["daemon-lmtp"]["why"]
    pins = lines["pins-dns"]
    assert pins["status"] == "warn" and "2 of 4 pins disagree" in pins["why"]
    assert f"moved.test ({tmp_path / 'map.yml'}:6): SRV points elsewhere: {ONION_C}:25" \
        in pins["why"]
    assert "old.test" in pins["why"] and "v2 onion" in pins["why"]
    assert "agrees.test" not in pins["why"] and "nosrv.test" not in pins["why"]

    # the operator breaks the map and reloads: the daemon keeps the old maps, doctor says 78
    (tmp_path / "map.yml").write_text(f"{ONION_A}:\n  - agrees.test\n  - [broken\n")
    d.expect_errors = True
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "reload failed" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    code, lines = doctor(cfg, "--skip", "dns")
    assert code == exitcodes.CONFIG
    assert lines["daemon-reload"]["status"] == "error"
    assert "the last reload failed" in lines["daemon-reload"]["why"]
    assert f"{tmp_path / 'map.yml'}:4: YAML syntax error" in lines["daemon-reload"]["why"]
    assert lines["maps"]["status"] == "error"  # the file itself, read by the doctor
    assert [ln for ln in d.error_lines() if "reload failed" not in ln] == []


def test_a_listener_that_speaks_another_protocol_is_a_misconfiguration(
        tmp_path: Path, tor, daemon_factory) -> None:
    d = daemon_factory()
    write_map(tmp_path / "map.yml")
    cfg = tmp_path / "torroute.toml"
    # [serve] exim points at the daemon's tcp_table port: it answers, but not Exim's protocol
    cfg.write_text(config_text(tmp_path, tor, nameserver=None,
                               serve=f'exim = "inet:127.0.0.1:{d.tcp_port}"\n'))
    code, lines = doctor(cfg, "--skip", "dns", "--skip", "tor", "--skip", "onion-mx")
    assert code == exitcodes.CONFIG
    assert lines["daemon-exim"]["status"] == "error"
    assert "answers, but not as a torroute exim listener" in lines["daemon-exim"]["why"]
    assert lines["daemon-status"]["status"] == "warn"  # no status_socket configured


def test_tor_without_torroutes_settings_is_78_with_the_fix(tmp_path: Path,
                                                          control_tor_factory) -> None:
    t = control_tor_factory(bare=True)
    write_map(tmp_path / "map.yml")
    cfg = tmp_path / "torroute.toml"
    cfg.write_text(config_text(tmp_path, t, nameserver=None, socks=t.socks_plain))
    code, lines = doctor(cfg, "--skip", "dns", "--skip", "daemon", "--skip", "onion-mx")
    assert code == exitcodes.CONFIG
    assert lines["tor-control"]["status"] == "ok"
    for name, status in (("tor-dns", "error"), ("tor-automap", "error"),
                         ("tor-socks", "warn")):  # no ExtendedErrors: mail still defers
        assert lines[name]["status"] == status, lines[name]
        assert "torroute tor ensure" in lines[name]["fix"]
    assert lines["tor-bootstrap"]["status"] == "error"


def test_tor_down_is_75_and_says_so(tmp_path: Path) -> None:
    class Down:
        control_port = free_port()
        socks = dns = ("127.0.0.1", free_port())

    write_map(tmp_path / "map.yml")
    cfg = tmp_path / "torroute.toml"
    cfg.write_text(config_text(tmp_path, Down, nameserver=None))
    code, lines = doctor(cfg, "--skip", "dns", "--skip", "daemon")
    assert code == exitcodes.TEMPFAIL
    assert lines["tor-control"]["status"] == "error"
    assert "start tor" in lines["tor-control"]["fix"]
    assert lines["onion-mx"]["status"] == "warn"


def test_map_check_compares_every_pin_with_srv(tmp_path: Path, dnsmasq_factory) -> None:
    dns = dnsmasq_factory(srv_records())
    path = write_map(tmp_path / "map.yml")
    result = torroute("map", "check", "--json", "--nameserver", f"127.0.0.1:{dns.address[1]}",
                      str(path))
    assert result.returncode == exitcodes.OK, result.stderr  # warnings do not fail...
    data = json.loads(result.stdout)
    got = {e["domain"]: (e["status"], e["srv"]) for e in data["entries"]}
    assert got["agrees.test"] == ("ok", "SRV agrees with the pin")
    assert got["nosrv.test"] == ("ok", "no SRV record: the pin is the only route")
    assert got["moved.test"][0] == "warn" and ONION_C in got["moved.test"][1]
    assert got["old.test"][0] == "warn" and "v2 onion" in got["old.test"][1]
    strict = torroute("map", "check", "--strict", "--nameserver",
                      f"127.0.0.1:{dns.address[1]}", str(path))
    assert strict.returncode == exitcodes.DATAERR  # ...unless --strict
    assert f"warn {path}:6: moved.test -> {ONION_B}:25: SRV points elsewhere" in strict.stdout
    down = torroute("map", "check", "--nameserver", f"127.0.0.1:{free_port()}",
                    "--dns-timeout", "1", str(path))
    assert down.returncode == exitcodes.TEMPFAIL  # nothing could be compared: try later
    assert "temporary" in down.stdout and "SRV lookup failed" in down.stdout
