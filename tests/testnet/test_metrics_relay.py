"""Relay metrics of `torroute serve --lmtp` after real relays through the private Tor network:
attempts by outcome and reason class, the latency histogram, the per-onion gauges and tor's
bootstrap, in the scrape (checked by promtool) and in `torroute status`."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemon import wait_socket
from support.paths import REPO

from torroute.testing.ports import free_port

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def lmtp_send(path: Path, rcpt: str, n: int) -> bytes:
    """One LMTP transaction (LHLO, MAIL, RCPT, DATA, QUIT); the reply to the message."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(120)
        s.connect(str(path))
        buf = b""

        def reply() -> bytes:
            nonlocal buf
            while True:
                while b"\r\n" not in buf:
                    chunk = s.recv(65536)
                    assert chunk, f"connection closed after {buf!r}"
                    buf += chunk
                line, buf = buf.split(b"\r\n", 1)
                if line[3:4] != b"-":
                    return line

        assert reply().startswith(b"220 ")
        for command, expect in ((b"LHLO t", b"250 "), (b"MAIL FROM:<a@origin.test>", b"250 "),
                                (f"RCPT TO:<{rcpt}>".encode(), b"250 "), (b"DATA", b"354 ")):
            s.sendall(command + b"\r\n")
            assert reply().startswith(expect)
        s.sendall(f"Subject: {n}\r\nMessage-ID: <{n}@origin.test>\r\n\r\nbody\r\n.\r\n"
                  .encode())
        answer = reply()
        s.sendall(b"QUIT\r\n")
        return answer


def samples(text: str, name: str) -> dict[str, float]:
    """{label text: value} of one metric name."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"{name}(\{{.*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def scrape(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body.decode()


@pytest.mark.testnet
def test_relay_attempts_and_latency_after_real_relays(testnet, onion_sink, stopped_onion,
                                                       dnsmasq_factory, daemon_factory,
                                                       serve_dir) -> None:
    live, dead = onion_sink.onion, stopped_onion
    (serve_dir / "map.txt").write_text(f"live.test {live}\ndead.test {dead}\n")
    cfg = serve_dir / "torroute.toml"
    cfg.write_text(f'[routing]\nmaps = ["{serve_dir / "map.txt"}"]\n'
                   f'nameservers = ["127.0.0.1:{dnsmasq_factory([]).port}"]\n'
                   f'[tor]\nsocks = "127.0.0.1:{testnet.socks_extended[1]}"\n'
                   f'control = "inet:127.0.0.1:{testnet.control[1]}"\n')
    lmtp, status_sock, port = serve_dir / "lmtp.sock", serve_dir / "status.sock", free_port()
    daemon = daemon_factory("--config", str(cfg), "--lmtp", f"unix:{lmtp}",
                            "--metrics", f"inet:127.0.0.1:{port}",
                            "--status-socket", f"unix:{status_sock}")
    for address in (str(lmtp), str(status_sock), ("127.0.0.1", port)):
        wait_socket(address, proc=daemon.proc)
    assert lmtp_send(lmtp, "u1@live.test", 1).startswith(b"250 ")
    assert lmtp_send(lmtp, "u2@live.test", 2).startswith(b"250 ")
    assert lmtp_send(lmtp, "u3@dead.test", 3).startswith(b"4")  # deferred, never bounced
    assert len(onion_sink.sink.wait_for(2, timeout=60)) == 2

    text = scrape(port)
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    attempts = samples(text, "torroute_relay_attempts_total")
    assert attempts.pop('{outcome="delivered",reason="delivered"}') == 2
    # the dead onion's one attempt, with the reason class its health row also names
    status = subprocess.run([sys.executable, "-m", "torroute.cli", "status", "--json",
                             "--status-socket", f"unix:{status_sock}"], capture_output=True,
                            text=True, cwd=REPO, env={"PATH": "/usr/bin:/bin",
                                                      "PYTHONPATH": str(REPO)}, timeout=30)
    assert status.returncode == 0, status.stderr
    snap = json.loads(status.stdout)
    rows = {row["onion"]: row for row in snap["onions"]}
    reason = rows[dead]["last_reason_class"]
    assert reason not in ("delivered", "bounced", None)
    assert attempts == {f'{{outcome="deferred",reason="{reason}"}}': 1}
    assert snap["counts"]["attempts"] == {"delivered": 2, reason: 1}
    # the histogram: cumulative buckets, +Inf == count, a positive sum per outcome
    buckets = samples(text, "torroute_relay_seconds_bucket")
    for outcome, count in (("delivered", 2), ("deferred", 1)):
        series = [v for k, v in buckets.items() if k.startswith(f'{{outcome="{outcome}",')]
        assert series == sorted(series) and series[-1] == count
        assert buckets[f'{{outcome="{outcome}",le="+Inf"}}'] == count
        assert samples(text, "torroute_relay_seconds_count")[f'{{outcome="{outcome}"}}'] == count
        assert samples(text, "torroute_relay_seconds_sum")[f'{{outcome="{outcome}"}}'] > 0
    failures = samples(text, "torroute_onion_consecutive_failures")
    assert failures[f'{{onion="{dead}",port="25"}}'] == 1
    assert failures[f'{{onion="{live}",port="25"}}'] == 0
    assert f'{{onion="{live}",port="25"}}' in samples(
        text, "torroute_onion_last_success_timestamp_seconds")
    assert samples(text, "torroute_tor_bootstrap_percent") == {"": 100}
    # the relay's own counters: 3 transactions, 2 SMTP sessions (the dead onion's dial failed)
    assert samples(text, "torroute_relay_transactions_total") == {"": 3}
    sessions = samples(text, "torroute_relay_connections_total")
    assert sessions['{how="dialed"}'] >= 1 and sum(sessions.values()) == 2
    # the table, worst first
    table = subprocess.run([sys.executable, "-m", "torroute.cli", "status",
                            "--status-socket", f"unix:{status_sock}"], capture_output=True,
                           text=True, cwd=REPO, env={"PATH": "/usr/bin:/bin",
                                                     "PYTHONPATH": str(REPO)}, timeout=30)
    lines = table.stdout.splitlines()
    first = lines.index("onions (worst first):")
    assert lines[first + 2].strip().startswith(f"{dead}:25"), table.stdout
    assert lines[first + 3].strip().startswith(f"{live}:25"), table.stdout
