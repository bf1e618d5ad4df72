"""``torroute tor|onion|torrc`` as real subprocesses against real tors: output and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.onions import ONION_A
from support.paths import shared_tmpdir

from torroute.testing.ports import free_port
from torroute.tor.automap import resolve_automap

TORROUTE = [sys.executable, "-m", "torroute.cli"]
REPO = Path(__file__).resolve().parents[2]


def torroute(*args: str, config: Path | None = None, user: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = TORROUTE + list(args)
    if config is not None:
        cmd += ["--config", str(config)]
    if user is not None:  # a real unprivileged user, as on a Debian box outside debian-tor
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin"})


def write_config(t, directory: Path, control: str | None = None, **extra: str) -> Path:
    path = directory / "torroute.toml"
    lines = ["[tor]", f'socks = "127.0.0.1:{t.socks_port}"', f'dns = "127.0.0.1:{t.dns_port}"',
             f'control = "{control or f"inet:127.0.0.1:{t.control_port}"}"']
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_status_ensure_status(control_tor_factory, tmp_path: Path) -> None:
    t = control_tor_factory(bare=True, control_socket=True)
    cfg = write_config(t, tmp_path, control=f"unix:{t.control_socket_path}")

    before = torroute("tor", "status", "--json", config=cfg)
    assert before.returncode == 78, before.stderr
    data = json.loads(before.stdout)
    assert data["version"].startswith("0.4.") and data["bootstrap"]["progress"] < 100
    assert data["network_liveness"] == "down" and not data["ok"] and not data["ready"]
    assert {p["option"] for p in data["problems"]} == {"SocksPort", "DNSPort",
                                                      "AutomapHostsOnResolve"}

    text = torroute("tor", "status", config=cfg)
    assert text.returncode == 78
    problem_lines = [ln for ln in text.stdout.splitlines() if ln.startswith(("error:", "warning:"))]
    assert len(problem_lines) == 3 and all("; fix: " in ln for ln in problem_lines)
    assert "error: DNSPort: tor has no DNSPort" in text.stdout

    dry = torroute("tor", "ensure", "--dry-run", config=cfg)
    assert dry.returncode == 0 and dry.stdout.startswith("would send: SETCONF ")
    assert f'DNSPort="127.0.0.1:{t.dns_port}"' in dry.stdout
    assert torroute("tor", "status", config=cfg).returncode == 78  # unchanged

    done = torroute("tor", "ensure", config=cfg)
    assert done.returncode == 0 and done.stdout.startswith("sent: SETCONF ")
    assert "not saved" in done.stdout

    after = torroute("tor", "status", config=cfg)
    assert after.returncode == 75, after.stdout  # fine settings, but no Tor network here
    assert "settings ok; tor is not connected" in after.stdout
    assert "error:" not in after.stdout and "warning:" not in after.stdout
    again = torroute("tor", "ensure", "--json", config=cfg)
    assert json.loads(again.stdout)["changes"] == []


def test_onion_lifecycle_ephemeral(control_tor_factory, tmp_path: Path) -> None:
    t = control_tor_factory()
    cfg = write_config(t, tmp_path)
    key = tmp_path / "mx.key"
    port = f"25=127.0.0.1:{free_port()}"
    made = torroute("onion", "create", "--ephemeral", "--key-file", str(key), "--port", port,
                    "--no-wait", config=cfg)
    assert made.returncode == 0, made.stderr
    address = made.stdout.strip()
    assert address.endswith(".onion") and "nothing answers" in made.stderr
    assert torroute("onion", "address", "--key-file", str(key)).stdout.strip() == address
    assert torroute("onion", "address", config=cfg).stdout.split() == [address]
    listed = json.loads(torroute("onion", "list", "--json", config=cfg).stdout)
    assert [(s["address"], s["ephemeral"]) for s in listed] == [(address, True)]
    gone = torroute("onion", "remove", address, config=cfg)
    assert gone.returncode == 0 and "removed" in gone.stdout
    assert torroute("onion", "list", config=cfg).stdout == ""
    assert torroute("onion", "remove", address, config=cfg).returncode == 65


def test_onion_create_persistent_and_wait_timeout(control_tor_factory, tmp_path: Path) -> None:
    t = control_tor_factory()
    cfg = write_config(t, tmp_path)
    hs = t.workdir / "mx"
    made = torroute("onion", "create", "--dir", str(hs), "--port", "25=127.0.0.1:2525",
                    "--timeout", "1", config=cfg)
    assert made.returncode == 75  # created, but a bridge-mode tor never uploads
    address = made.stdout.strip()
    assert address == (hs / "hostname").read_text().strip()
    assert "waiting up to 1s" in made.stderr and "did not upload the descriptor" in made.stderr
    assert torroute("onion", "address", "--dir", str(hs)).stdout.strip() == address
    line = torroute("onion", "list", config=cfg).stdout.strip()
    assert line == f"{address}\t{hs}\t25=127.0.0.1:2525"
    assert f"HiddenServiceDir {hs}" in t.torrc_path.read_text()  # saved
    removed = torroute("onion", "remove", str(hs), config=cfg)
    assert removed.returncode == 0 and "the key stays in" in removed.stdout
    assert f"HiddenServiceDir {hs}" not in t.torrc_path.read_text()


def test_onion_create_refuses_open_relay(control_tor_factory, postfix_smtpds,
                                         tmp_path: Path) -> None:
    t = control_tor_factory()
    cfg = write_config(t, tmp_path)
    port = postfix_smtpds["open"].port
    refused = torroute("onion", "create", "--ephemeral", "--port", f"25=127.0.0.1:{port}",
                       "--no-wait", config=cfg)
    assert refused.returncode == 78 and refused.stdout == ""
    assert "refusing to publish" in refused.stderr and "mynetworks" in refused.stderr
    assert torroute("onion", "list", config=cfg).stdout == ""


def test_reverse(tor, tmp_path: Path) -> None:
    cfg = write_config(tor, tmp_path)
    ip = str(resolve_automap(ONION_A, tor.dns, 2.0))
    found = torroute("tor", "reverse", ip, config=cfg)
    assert found.returncode == 0 and found.stdout.strip() == ONION_A
    missing = torroute("tor", "reverse", "127.0.0.254", "--json", config=cfg)
    assert missing.returncode == 1 and json.loads(missing.stdout)["onion"] is None


def test_control_errors_and_password(control_tor_factory, control_password,
                                     tmp_path: Path) -> None:
    password, hashed = control_password
    t = control_tor_factory(cookie=False, control_password_hash=hashed)
    cfg = write_config(t, tmp_path)
    pwfile = tmp_path / "pw"
    pwfile.write_text(password + "\n")
    ok = torroute("tor", "status", "--tor-control-password-file", str(pwfile), config=cfg)
    assert ok.returncode == 75, ok.stderr  # authenticated; tor just is not bootstrapped
    missing = torroute("tor", "status", config=cfg)
    assert missing.returncode == 78 and "wants a control password" in missing.stderr
    wrong_cfg = write_config(t, tmp_path, control_password="nope")
    wrong = torroute("tor", "status", config=wrong_cfg)
    assert wrong.returncode == 78 and "rejected the control password" in wrong.stderr
    down = torroute("tor", "status", "--tor-control", f"inet:127.0.0.1:{free_port()}")
    assert down.returncode == 75 and "nothing listens on tor's control port" in down.stderr


def test_permission_denied_as_an_unprivileged_user(control_tor_factory) -> None:
    """What a Debian admin sees when the user is not in debian-tor: the cookie and the control
    socket are tor's.  Runs torroute as 'nobody'."""
    shared = shared_tmpdir("torroute-cookie-")
    try:
        cookie = shared / "control.authcookie"
        t = control_tor_factory(control_socket=True, extra=[f"CookieAuthFile {cookie}"])
        assert oct(os.stat(cookie).st_mode & 0o777) == "0o600"
        over_tcp = torroute("tor", "status", "--tor-control", f"inet:127.0.0.1:{t.control_port}",
                            user="nobody")
        assert over_tcp.returncode == 78, over_tcp.stderr
        assert f"cannot read tor's control cookie {cookie} (permission denied)" in over_tcp.stderr
        assert "group root" in over_tcp.stderr  # names the group to join
        over_unix = torroute("tor", "status", "--tor-control", f"unix:{t.control_socket_path}",
                             user="nobody")
        assert over_unix.returncode == 78
        assert "permission denied on tor's control socket" in over_unix.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_torrc_command(tmp_path: Path) -> None:
    cfg = tmp_path / "torroute.toml"
    cfg.write_text('[tor]\nsocks = "127.0.0.1:9150"\ndns = "127.0.0.1:5353"\n')
    out = torroute("torrc", "--onion-dir", "/var/lib/tor/mx", "--onion-port",
                   "25=127.0.0.1:2526", config=cfg)
    assert out.returncode == 0
    lines = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith("#")]
    assert lines == ["SocksPort 127.0.0.1:9150 ExtendedErrors", "DNSPort 127.0.0.1:5353",
                     "AutomapHostsOnResolve 1", "AutomapHostsSuffixes .onion",
                     "HiddenServiceDir /var/lib/tor/mx", "HiddenServicePort 25 127.0.0.1:2526"]
    server_only = torroute("torrc", "--no-client", "--onion-dir", "/var/lib/tor/mx", config=cfg)
    assert "SocksPort" not in server_only.stdout and "HiddenServicePort 25 127.0.0.1:2525" in \
        server_only.stdout
    assert torroute("torrc", "--onion-port", "25", config=cfg).returncode == 78
    assert torroute("torrc", "--onion-dir", "rel", config=cfg).returncode == 78


@pytest.mark.parametrize("args", [["onion", "create", "--ephemeral"],
                                  ["onion", "create", "--port", "25"],
                                  ["onion", "create", "--port", "25", "--dir", "/x",
                                   "--ephemeral"],
                                  ["tor"], ["tor", "reverse"]])
def test_usage_errors(args: list[str]) -> None:
    assert torroute(*args).returncode == 64
