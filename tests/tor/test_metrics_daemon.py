"""A real `torroute serve` with --metrics and --status-socket: lookups counted by protocol and
result on the real listeners, the scrape checked by the real promtool, `torroute status`
(table and --json), a failed reload counted and shown, only GET /metrics answered, garbage
requests to both endpoints harmless.  tor is the session's bridge-mode tor (its control port:
the bootstrap gauge); relays through tor are tests/testnet/test_metrics_relay.py's."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.daemon import wait_socket
from support.onions import ONION_A, ONION_B
from support.paths import REPO

from torroute.daemon.status import query_status
from torroute.errors import DaemonUnreachable
from torroute.protocols import eximline, socketmap, tcptable
from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange with the stdlib socket (the endpoint closes after its answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body)
    return int(lines[0].split()[1]), headers, body


def scrape(port: int) -> str:
    code, headers, body = http(port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return body.decode()


def value(text: str, sample: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torroute.cli", "status", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def ask(address, request: bytes, done) -> bytes:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(10)
        s.connect(address)
        s.sendall(request)
        data = b""
        while not done(data) and (chunk := s.recv(65536)):
            data += chunk
        return data


@pytest.fixture
def served(daemon_factory, serve_dir: Path, dnsmasq_factory, tor):
    dns = dnsmasq_factory([SrvRecord("_onion-mx._tcp.srv.test", ONION_A)])
    (serve_dir / "map.txt").write_text(f"pinned.test {ONION_B}\n")
    cfg = serve_dir / "torroute.toml"
    cfg.write_text(f'[routing]\nmaps = ["map.txt"]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                   'ignore_domains = ["ignored.test"]\ndns_timeout = 1.0\n'
                   f'[tor]\ncontrol = "inet:127.0.0.1:{tor.control_port}"\n'
                   f'dns = "127.0.0.1:{tor.dns_port}"\nsocks = "127.0.0.1:{tor.socks_ext_port}"\n')
    port = free_port()
    sock = serve_dir / "status.sock"
    # an lmtp listener too: with relays to weigh, the health service polls tor's bootstrap
    d = daemon_factory("--config", str(cfg), "--metrics", f"inet:127.0.0.1:{port}",
                       "--status-socket", f"unix:{sock}", "--lmtp",
                       f"unix:{serve_dir / 'lmtp.sock'}")
    wait_socket(("127.0.0.1", port), proc=d.proc)
    wait_socket(str(sock), proc=d.proc)
    d.wait_log("listening: status on")
    return d, port, sock, cfg


def test_lookups_counted_scrape_valid_and_status(served) -> None:
    d, port, sock, cfg = served
    log = d.log()
    assert f"listening: metrics on inet:127.0.0.1:{port}" in log
    assert f"listening: status on unix:{sock}" in log
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660  # like the other unix listeners
    # real lookups over each protocol
    assert b"OK " in ask(d.socketmap, socketmap.encode_request("transport", "u@pinned.test"),
                         lambda b: b.endswith(b","))
    for key, expect in (("u@pinned.test", b"200 "), ("u@srv.test", b"200 "),
                        ("u@ignored.test", b"500 "), ("u@pinned.test", b"200 ")):
        assert ask(("127.0.0.1", d.tcp_port), tcptable.encode_get(key),
                   lambda b: b.endswith(b"\n")).startswith(expect)
    # Exim's answer is tor's automap address, or temp if tor's DNSPort does not give one
    exim = ask(d.exim, eximline.encode_request("pinned.test"), lambda b: b.endswith(b"\n"))
    exim_result = "route" if exim.startswith(b"127.") else "tempfail"
    assert exim_result == "route" or exim.startswith(b"temp "), exim
    text = scrape(port)
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr + text
    assert value(text, 'torroute_lookups_total{protocol="tcp_table",result="route"}') == 3
    assert value(text, 'torroute_lookups_total{protocol="tcp_table",result="noroute"}') == 1
    assert value(text, 'torroute_lookups_total{protocol="socketmap",result="route"}') == 1
    assert value(text, f'torroute_lookups_total{{protocol="exim",result="{exim_result}"}}') == 1
    assert sum(value(text, f'torroute_lookups_total{{protocol="exim",result="{r}"}}') or 0
               for r in ("route", "noroute", "tempfail", "reject")) == 1
    assert value(text, "torroute_reload_ok") == 1
    assert value(text, "torroute_reload_failures_total") == 0
    started = value(text, "torroute_start_time_seconds")
    assert started is not None and abs(started - time.time()) < 3600
    # the health service polls the bridge-mode tor's control port: a real bootstrap figure
    deadline = time.monotonic() + 30
    while (boot := value(text, "torroute_tor_bootstrap_percent")) is None:
        assert time.monotonic() < deadline, text
        time.sleep(0.5)
        text = scrape(port)
    assert 0 <= boot <= 100
    # the status socket: library client, the table, --json
    answer = query_status(f"unix:{sock}")
    assert answer["counts"]["lookups"]["tcp_table"]["route"] == 3
    assert answer["pid"] == d.proc.pid and answer["reload"]["ok"] is True
    kinds = {x["kind"]: x["endpoint"] for x in answer["listeners"]}
    assert kinds["metrics"] == f"inet:127.0.0.1:{port}" and kinds["status"] == f"unix:{sock}"
    assert kinds["tcp_table"] == f"inet:127.0.0.1:{d.tcp_port}" and "lmtp" in kinds
    assert answer["counts"]["attempts"] == {}  # no relay yet
    table = status("--status-socket", f"unix:{sock}")
    assert table.returncode == 0, table.stderr
    assert "reload: ok (started) at " in table.stdout
    assert "tcp_table" in table.stdout and "tor: bootstrapped" in table.stdout
    js = status("--config", str(cfg), "--status-socket", f"unix:{sock}", "--json")
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout)["counts"]["lookups"]["exim"][exim_result] == 1


def test_failed_reload_counted_and_shown(served) -> None:
    d, port, sock, cfg = served
    good = cfg.read_text()
    cfg.write_text(good + "[serve]\nno_such_setting = 1\n")
    d.expect_errors = True
    d.signal(signal.SIGHUP)
    d.wait_log("reload failed, keeping the old configuration")
    text = scrape(port)
    assert value(text, "torroute_reload_ok") == 0
    assert value(text, "torroute_reload_failures_total") == 1
    out = status("--status-socket", f"unix:{sock}")
    assert out.returncode == 0
    assert "reload: FAILED at " in out.stdout and "old configuration kept" in out.stdout
    assert "no_such_setting" in out.stdout and "1 failed reloads" in out.stdout
    cfg.write_text(good)
    d.signal(signal.SIGHUP)
    d.wait_log("reloaded configuration")
    text = scrape(port)
    assert value(text, "torroute_reload_ok") == 1
    assert value(text, "torroute_reload_failures_total") == 1  # a counter: never goes back
    bad = [ln for ln in d.error_lines() if "reload failed" not in ln]
    assert not bad, bad


def test_only_get_metrics_and_garbage_is_harmless(served) -> None:
    d, port, sock, _cfg = served
    assert http(port, b"GET / HTTP/1.1\r\n\r\n")[0] == 404
    assert http(port, b"GET /metricsx HTTP/1.0\r\n\r\n")[0] == 404
    for method in (b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"):
        code, headers, _ = http(port, method + b" /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert code == 405 and headers["Allow"] == "GET"
    # SMTP at the metrics port (what an open-relay probe sends): refused, never relayed
    assert http(port, b"EHLO probe\r\nMAIL FROM:<a@b>\r\n\r\n")[0] == 400
    assert http(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")[0] == 431
    rng = random.Random(13)
    for _ in range(200):
        junk = rng.randbytes(rng.randrange(1, 300)) + b"\r\n\r\n"
        try:
            ask(("127.0.0.1", port), junk, lambda b: False)
        except ConnectionResetError:
            pass  # we sent more than it read before it answered and closed
    for junk in (b"help\n", b"\xff\xfe\n", b"x" * 1000, b"status please\n"):
        reply = json.loads(ask(str(sock), junk, lambda b: b.endswith(b"\n")))
        assert set(reply) == {"error"}
    with socket.socket(socket.AF_UNIX) as s:  # says nothing, hangs up: no answer needed
        s.connect(str(sock))
    assert value(scrape(port), 'torroute_lookups_total{protocol="tcp_table",result="route"}') == 0
    assert query_status(f"unix:{sock}")["reload"]["ok"] is True  # still serving


def test_open_relay_probe_finds_no_smtp(served) -> None:
    """The probe torroute runs before publishing an onion port: it waits for a banner, gets
    the endpoint's 408 after its request deadline, and finds no smtpd (nothing to refuse)."""
    from torroute.tor.relay_probe import probe_relay
    from torroute.tor.torrc import PortMapping

    _d, port, _sock, _cfg = served
    verdict = probe_relay(PortMapping(25, f"127.0.0.1:{port}"), timeout=20)
    assert verdict.verdict == "not-smtp" and not verdict.refuse, verdict.line()


def test_status_without_a_daemon(serve_dir: Path) -> None:
    gone = serve_dir / "nothing.sock"
    out = status("--status-socket", f"unix:{gone}")
    assert out.returncode == 75 and "does not answer" in out.stderr
    with pytest.raises(DaemonUnreachable):
        query_status(f"inet:127.0.0.1:{free_port()}", timeout=2)
    assert status("--status-socket", f"unix:{gone}", "--timeout", "-1").returncode == 64
    out = status()  # no socket configured anywhere
    assert out.returncode == 78 and "no status socket" in out.stderr
    bad = serve_dir / "bad.toml"
    bad.write_text("[serve]\nstatus_socket = 'inet:192.0.2.1:9'\n")
    out = status("--config", str(bad))
    assert out.returncode == 78 and "loopback" in out.stderr
