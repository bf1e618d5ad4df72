"""torroute doctor's MTA lines against real Postfix configurations (postconf, postmap) and a
real Exim with the plugin: configured right, and wrong in the ways that leak or lose mail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.exim import EXIM_BIN
from support.onions import ONION_A
from support.pipe import TORROUTE
from support.postfix import MASTER_CF

from torroute import exitcodes
from torroute.mta.postfix import POSTCONF
from torroute.testing.ports import free_port

pytestmark = pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")
REPO = Path(__file__).resolve().parents[2]
SITE_MAIN_CF = """\
compatibility_level = 3.6
myhostname = mx.site.test
relayhost = [127.0.0.1]:2525
transport_maps = texthash:{dir}/transport
"""


def doctor(config: Path, *args: str) -> tuple[int, dict[str, dict]]:
    result = subprocess.run(
        [sys.executable, "-m", "torroute.cli", "doctor", "--config", str(config), "--json",
         "--timeout", "10", "--skip", "dns", "--skip", "tor", "--skip", "onion-mx", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": str(REPO)})
    assert result.stderr == ""  # every finding is in the report
    data = json.loads(result.stdout)
    assert data["exit"] == result.returncode
    return result.returncode, {c["name"]: c for c in data["checks"]}


def config(tmp_path: Path, socketmap: str, exim: str = "", map_file: Path | None = None,
           nameserver: int | None = None, tor_dns: tuple[str, int] | None = None) -> Path:
    maps = f'maps = ["{map_file}"]\n' if map_file else ""
    path = tmp_path / "torroute.toml"
    path.write_text(f"""[routing]
{maps}nameservers = ["127.0.0.1:{nameserver or free_port()}"]
[tor]
control = "inet:127.0.0.1:{free_port()}"
dns = "127.0.0.1:{(tor_dns or ('', free_port()))[1]}"
[serve]
socketmap = "{socketmap}"
{f'exim = "{exim}"' if exim else ''}
""")
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    confdir = tmp_path / "postfix"
    confdir.mkdir()
    (confdir / "main.cf").write_text(SITE_MAIN_CF.format(dir=confdir))
    (confdir / "master.cf").write_text(MASTER_CF.format(
        host="127.0.0.1", port=25, smtpd_args="", torroute_service="", extra=""))
    (confdir / "transport").write_text("partner.example smtp:[127.0.0.1]:2526\n")
    return confdir


def setup(site: Path, socket: str) -> None:
    result = subprocess.run([TORROUTE, "postfix", "setup", "-c", str(site), "--socket", socket,
                             "--program", "/usr/bin/torroute", "--user", "nobody"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def postconf(site: Path, *args: str) -> None:
    subprocess.run([POSTCONF, "-c", str(site), *args], check=True, capture_output=True,
                   timeout=60)


def test_postfix_set_up_right_then_wrong_three_ways(tmp_path: Path, site: Path,
                                                    daemon_factory) -> None:
    d = daemon_factory()
    socket = f"unix:{d.socketmap}"
    setup(site, socket)
    cfg = config(tmp_path, socket)
    code, lines = doctor(cfg, "--postfix-config", str(site), "--skip", "exim")
    assert code == exitcodes.OK, lines
    assert lines["postfix-transport"]["status"] == "ok"
    assert lines["postfix-transport"]["why"] == f"transport_maps asks the daemon at {socket}"
    assert lines["postfix-setup"]["status"] == "ok"
    assert lines["postfix-onion"]["status"] == "ok"
    assert lines["daemon-socketmap"]["status"] == "ok"

    # 1. the daemon listens elsewhere than Postfix asks
    moved = config(tmp_path, f"unix:{tmp_path}/other.sock")
    code, lines = doctor(moved, "--postfix-config", str(site), "--skip", "exim",
                         "--skip", "daemon")
    assert code == exitcodes.CONFIG
    assert lines["postfix-transport"]["status"] == "error"
    assert f"the daemon listens on unix:{tmp_path}/other.sock" in lines["postfix-transport"][
        "why"]

    # 2. a table before torroute's sends .onion to the clear net
    (site / "onion_transport").write_text(".onion smtp:[127.0.0.1]:2527\n")
    postconf(site, "-e", f"transport_maps = texthash:{site}/onion_transport, "
             f"proxy:socketmap:{socket}:transport, texthash:{site}/transport")
    code, lines = doctor(cfg, "--postfix-config", str(site), "--skip", "exim")
    assert code == exitcodes.CONFIG
    assert lines["postfix-onion"]["status"] == "error"
    assert f"texthash:{site}/onion_transport answers" in lines["postfix-onion"]["why"]
    assert lines["postfix-setup"]["status"] == "error"  # transport_maps drifted
    assert "transport_maps" in lines["postfix-setup"]["why"]

    # 3. the pipe service is gone from master.cf
    setup(site, socket)
    postconf(site, "-MX", "torroute/unix")
    code, lines = doctor(cfg, "--postfix-config", str(site), "--skip", "exim")
    assert code == exitcodes.CONFIG
    assert lines["postfix-setup"]["status"] == "error"
    assert "torroute/unix" in lines["postfix-setup"]["why"]
    assert "torroute postfix setup" in lines["postfix-setup"]["fix"]


def test_postfix_without_torroute_is_an_error_with_the_fix(tmp_path: Path, site: Path) -> None:
    cfg = config(tmp_path, f"unix:{tmp_path}/socketmap.sock")
    code, lines = doctor(cfg, "--postfix-config", str(site), "--skip", "exim",
                         "--skip", "daemon")
    assert code == exitcodes.CONFIG
    assert lines["postfix-transport"]["status"] == "error"
    assert "Postfix never asks torroute" in lines["postfix-transport"]["why"]
    assert lines["postfix-transport"]["fix"] == f"torroute postfix setup -c {site}"


def test_exim_with_the_plugin_and_without(tmp_path: Path, serve_dir: Path, tor,
                                          daemon_factory, dnsmasq_factory,
                                          exim_plugin_factory, exim_factory) -> None:
    dns = dnsmasq_factory([], local_domains=["example"])
    map_file = serve_dir / "map.txt"
    map_file.write_text(f"pinned.example {ONION_A}\n")
    d = daemon_factory("--map", str(map_file), "--nameserver", f"127.0.0.1:{dns.port}",
                       "--tor-dns", f"127.0.0.1:{tor.dns[1]}", "--socket-group", "Debian-exim")
    exim = exim_plugin_factory(d.exim, tor.socks_plain, perl=False)
    cfg = config(tmp_path, f"unix:{d.socketmap}", exim=f"unix:{d.exim}", map_file=map_file,
                 nameserver=dns.port, tor_dns=tor.dns)
    code, lines = doctor(cfg, "--skip", "postfix", "--exim", str(EXIM_BIN),
                         "--exim-config", str(exim.conf))
    assert code == exitcodes.OK, lines
    assert lines["exim-routers"]["status"] == "ok"
    assert lines["exim-transport"]["status"] == "ok"
    assert f"socks_proxy 127.0.0.1 port={tor.socks_plain[1]}" in lines["exim-transport"]["why"]
    assert lines["exim-route"]["status"] == "ok"
    assert "postmaster@pinned.example: router torroute" in lines["exim-route"]["why"]

    plain = exim_factory("dnslookup:\n  driver = dnslookup\n  transport = clear_smtp\n",
                         name="plain")
    code, lines = doctor(cfg, "--skip", "postfix", "--skip", "daemon", "--exim", str(EXIM_BIN),
                         "--exim-config", str(plain.conf))
    assert code == exitcodes.CONFIG
    assert lines["exim-routers"]["status"] == "error"
    assert "torroute exim setup" in lines["exim-routers"]["fix"]
    assert lines["exim-transport"]["status"] == "error"
    assert lines["exim-route"]["status"] == "error"
