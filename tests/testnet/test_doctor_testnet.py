"""torroute doctor's onion MX lines and --send-test, and torroute map check --probe, on the
private Tor network: a persistent onion service on the network's onion-service tor, in front
of a real SMTP sink that relays for anyone (then refuses), dialed through the client tor."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.daemon import wait_socket
from support.onions import ONION_A

from torroute import exitcodes
from torroute.testing.sink import MaildirSink
from torroute.tor.control import Tor
from torroute.tor.relay_probe import PROBE_RCPT

pytestmark = [pytest.mark.testnet,
              pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")]
REPO = Path(__file__).resolve().parents[2]


def torroute(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "torroute.cli", *args], capture_output=True,
                            text=True, timeout=300, cwd=REPO,
                            env={"PATH": "/nonexistent", "PYTHONPATH": str(REPO)})
    assert result.stderr == ""  # every finding is in the report
    return result


def doctor(config: Path, *args: str) -> tuple[int, dict[str, dict]]:
    result = torroute("doctor", "--config", str(config), "--json", "--timeout", "60",
                      "--skip", "daemon", "--skip", "postfix", "--skip", "exim", *args)
    data = json.loads(result.stdout)
    assert data["exit"] == result.returncode
    return result.returncode, {c["name"]: c for c in data["checks"]}


@pytest.fixture
def onion_mx(testnet):
    """(onion, sink, hs control) for a persistent service (HiddenServiceDir) on the hs tor:
    its ports are in tor's configuration, which is what the doctor reads.  The hs tor also
    runs the session's onion sink (port 25, in its torrc): the doctor probes it too, so for
    the test's duration it refuses the relay probe like a well set up MX."""
    testnet.sink.reject(PROBE_RCPT, "554 5.7.1 relay access denied")
    sink = MaildirSink(testnet.new_dir("doctorsink") / "Maildir").start()
    hs_control = f"inet:127.0.0.1:{testnet.net.node('hs').control_port}"
    directory = testnet.new_dir("doctorhs") / "hs"
    with Tor.connect(hs_control) as tor:
        service = tor.create_onion([f"25={sink.address[0]}:{sink.address[1]}"],
                                   directory=str(directory), save=False, force=True,
                                   timeout=90)
    testnet.net.wait_onion_reachable(service.address, 25, sink.address,
                                     deadline=time.monotonic() + 90)
    yield service.address, sink, hs_control
    testnet.sink.rcpt_replies.pop(PROBE_RCPT.lower(), None)
    with Tor.connect(hs_control) as tor:
        tor.remove_onion(service.address, save=False)
    sink.stop()


def write_config(path: Path, testnet, extra: str = "") -> Path:
    path.write_text(f"""[routing]
nameservers = []
[tor]
control = "inet:127.0.0.1:{testnet.control[1]}"
socks = "127.0.0.1:{testnet.socks_extended[1]}"
dns = "127.0.0.1:{testnet.dns[1]}"
{extra}""")
    return path


def test_onion_mx_canary_open_relay_then_closed_and_a_test_message(tmp_path, testnet,
                                                                  onion_mx) -> None:
    onion, sink, hs_control = onion_mx
    name = onion.removesuffix(".onion")[:16]
    cfg = write_config(tmp_path / "torroute.toml", testnet)
    code, lines = doctor(cfg, "--onion-control", hs_control)
    assert lines["tor-bootstrap"]["status"] == "ok"
    reach, relay = lines[f"onion-mx-reach {name}"], lines[f"onion-mx-relay {name}"]
    assert reach["status"] == "ok" and f"{onion}:25 answers 220 " in reach["why"]
    # the sink takes mail for any domain from 127.0.0.1: an open relay on Tor
    assert relay["status"] == "error" and ": open (" in relay["why"]
    assert "mynetworks" in relay["fix"]
    assert code == exitcodes.CONFIG

    sink.reject(PROBE_RCPT, "554 5.7.1 relay access denied")
    address = f"canary@{onion}"
    code, lines = doctor(cfg, "--onion-control", hs_control, "--send-test", address)
    assert lines[f"onion-mx-relay {name}"]["status"] == "ok"
    assert ": closed (" in lines[f"onion-mx-relay {name}"]["why"]
    assert lines["send-test"]["status"] == "ok", lines["send-test"]
    assert lines["send-test"]["why"].startswith(f"{address}: delivered (2.")
    assert code == exitcodes.OK, {n: c for n, c in lines.items() if c["status"] != "ok"}
    got = [m for m in sink.messages if address in m.rcpt_tos]
    assert len(got) == 1 and b"Subject: torroute doctor test" in got[0].data


def test_an_onion_mx_that_does_not_answer_is_temporary(tmp_path, testnet, onion_mx) -> None:
    onion, sink, hs_control = onion_mx
    sink.stop()  # published, but nothing listens behind port 25
    name = onion.removesuffix(".onion")[:16]
    cfg = write_config(tmp_path / "torroute.toml", testnet)
    code, lines = doctor(cfg, "--onion-control", hs_control)
    assert lines[f"onion-mx-reach {name}"]["status"] == "error"
    assert "not reachable through tor" in lines[f"onion-mx-reach {name}"]["why"]
    assert lines[f"onion-mx-relay {name}"]["status"] == "error"
    assert "no-listener" in lines[f"onion-mx-relay {name}"]["why"]
    assert code == exitcodes.TEMPFAIL


def test_map_check_probe_reads_each_onions_banner(tmp_path, testnet, onion_sink,
                                                  stopped_onion) -> None:
    path = tmp_path / "map.yml"
    path.write_text(f"""---
{onion_sink.onion}:
  - up.example
  - alias.example
{stopped_onion}:
  - stopped.example
""")
    cfg = write_config(tmp_path / "torroute.toml", testnet)
    result = torroute("map", "check", "--config", str(cfg), "--no-dns", "--probe",
                      "--timeout", "60", "--concurrency", "2", "--json", str(path))
    data = json.loads(result.stdout)
    got = {e["domain"]: (e["status"], e["probe"]) for e in data["entries"]}
    assert got["up.example"][0] == "ok" and got["up.example"][1].startswith("reachable: 220 ")
    assert got["alias.example"] == got["up.example"]  # the same onion, probed once
    assert got["stopped.example"][0] == "temporary"
    assert "unreachable now" in got["stopped.example"][1]
    assert result.returncode == exitcodes.TEMPFAIL
    ok_only = tmp_path / "ok.txt"
    ok_only.write_text(f"up.example {onion_sink.onion}\n")
    result = torroute("map", "check", "--config", str(cfg), "--no-dns", "--probe", "--all",
                      str(ok_only))
    assert result.returncode == exitcodes.OK
    assert f"ok {ok_only}:1: up.example -> {onion_sink.onion}:25: reachable: 220" in \
        result.stdout
    assert ONION_A not in result.stdout


def test_a_pinned_onion_failing_lately_is_named_from_the_status_socket(
        tmp_path, testnet, onion_sink, stopped_onion, dnsmasq_factory, daemon_factory,
        serve_dir) -> None:
    (serve_dir / "map.txt").write_text(f"live.test {onion_sink.onion}\n"
                                       f"dead.test {stopped_onion}\n")
    lmtp, status = serve_dir / "lmtp.sock", serve_dir / "status.sock"
    d = daemon_factory("--config", str(serve_dir / "torroute.toml"), "--lmtp", f"unix:{lmtp}",
                       start=False)
    write_config(serve_dir / "torroute.toml", testnet, extra=f"""
[serve]
socketmap = "unix:{d.socketmap}"
tcp_table = "inet:127.0.0.1:{d.tcp_port}"
exim = "unix:{d.exim}"
lmtp = "unix:{lmtp}"
status_socket = "unix:{status}"
""")
    cfg = serve_dir / "torroute.toml"
    text = cfg.read_text().replace(
        "nameservers = []",
        f'maps = ["{serve_dir / "map.txt"}"]\n'
        f'nameservers = ["127.0.0.1:{dnsmasq_factory([]).port}"]')
    cfg.write_text(text)
    d.start()
    wait_socket(str(lmtp), proc=d.proc)
    wait_socket(str(status), proc=d.proc)
    with smtplib.LMTP(str(lmtp)) as client:
        client.sendmail("a@origin.test", ["u@live.test"], b"Subject: 1\r\n\r\nbody\r\n")
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            client.sendmail("a@origin.test", ["u@dead.test"], b"Subject: 2\r\n\r\nbody\r\n")
    assert 400 <= deferred.value.smtp_code < 500  # deferred, never bounced
    assert len(onion_sink.sink.wait_for(1, timeout=60)) == 1

    result = torroute("doctor", "--config", str(cfg), "--json", "--timeout", "30",
                      "--skip", "postfix", "--skip", "exim", "--skip", "onion-mx")
    data = json.loads(result.stdout)
    lines = {c["name"]: c for c in data["checks"]}
    for name in ("daemon-socketmap", "daemon-tcp-table", "daemon-exim", "daemon-lmtp",
                 "daemon-reload", "tor-bootstrap", "pins-dns"):
        assert lines[name]["status"] == "ok", lines[name]
    lately = lines["onions-lately"]
    assert lately["status"] == "warn"
    assert lately["why"].startswith(f"1 onions not reachable lately: {stopped_onion}:25 "
                                    "(pinned for dead.test): 1 failures in a row")
    assert onion_sink.onion not in lately["why"]
    assert result.returncode == exitcodes.OK  # a warning: mail for it defers, others flow
    assert d.error_lines() == []
