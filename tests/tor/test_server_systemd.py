"""systemd's notify protocol, from the real daemon to a real AF_UNIX datagram socket standing
for systemd's NOTIFY_SOCKET: READY / RELOADING / STOPPING, and a STATUS line that says whether
the last reload failed (what `systemctl status torroute` shows an operator who never reads the
log)."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.onions import ONION_A, ONION_B, ONION_C


@pytest.fixture
def notify_socket(serve_dir: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = serve_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(15)
    yield path, sock
    sock.close()


def test_status_line_tells_a_failed_reload(daemon_factory, serve_dir, notify_socket) -> None:
    path, sock = notify_socket

    def notified() -> str:
        return sock.recv(4096).decode()

    (serve_dir / "map.txt").write_text(f"a.test {ONION_A}\nb.test {ONION_B}\n")
    cfg = serve_dir / "torroute.toml"
    good = f'[routing]\nmaps = ["{serve_dir / "map.txt"}"]\n'
    cfg.write_text(good)
    d = daemon_factory("--config", str(cfg), env={"NOTIFY_SOCKET": str(path)})
    assert notified() == "READY=1\nSTATUS=serving 2 pinned domains"
    (serve_dir / "map.txt").write_text(f"a.test {ONION_A}\nb.test {ONION_B}\nc.test {ONION_C}\n")
    d.signal(signal.SIGHUP)
    assert notified() == "RELOADING=1"
    assert notified() == "READY=1\nSTATUS=serving 3 pinned domains"
    d.expect_errors = True  # the one failed reload below, checked exactly
    cfg.write_text("[routing\nbroken")
    d.signal(signal.SIGHUP)
    assert notified() == "RELOADING=1"
    status = notified()
    reason = (f"config file {cfg}: Expected ']' at the end of a table declaration "
              "(at line 1, column 9)")
    assert status == (f"READY=1\nSTATUS=serving 3 pinned domains; last reload failed: "
                      f"{reason}; old configuration kept")
    log = d.wait_log("reload failed")
    assert d.error_lines() == ["torroute: ERROR torroute.daemon: reload failed, keeping the old "
                               f"configuration: {reason}"]
    assert "Traceback" not in log
    cfg.write_text(good)  # fixed: the next reload clears the failure
    d.signal(signal.SIGHUP)
    assert notified() == "RELOADING=1"
    assert notified() == "READY=1\nSTATUS=serving 3 pinned domains"
    assert d.stop() == 0
    assert notified() == "STOPPING=1"
