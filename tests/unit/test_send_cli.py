"""``torroute send`` as a program (this checkout's, support.pipe.TORROUTE) where no server is
needed: tor's SocksPort and the DNS server are closed loopback ports, so every routed recipient
defers; the exit statuses, the stderr lines, bad input, --queue/--flush bookkeeping and the
--fallback command's argv (a real script that records what it got)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support.onions import ONION_A
from support.pipe import TORROUTE

from torroute.delivery.spool import Spool
from torroute.testing.ports import free_port

MESSAGE = b"From: Alice <alice@origin.test>\nTo: x@pinned.test\nSubject: hi\n\nbody\n.\nafter\n"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    (tmp_path / "map.txt").write_text(f"pinned.test {ONION_A}\n")
    path = tmp_path / "torroute.toml"
    path.write_text(f'[routing]\nmaps = ["{tmp_path / "map.txt"}"]\n'
                    f'nameservers = ["127.0.0.1:{free_port()}"]\ndns_timeout = 0.5\n'
                    f'local_domains = ["local.test"]\n'
                    f'[tor]\nsocks = "127.0.0.1:{free_port()}"\n[deliver]\ntime_limit = 5\n')
    return path


def send(*args: str, stdin: bytes | int = MESSAGE, env: dict | None = None
         ) -> subprocess.CompletedProcess:
    kwargs = {"input": stdin} if isinstance(stdin, bytes) else {"stdin": stdin}
    return subprocess.run([TORROUTE, "send", *args], capture_output=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **(env or {})}, **kwargs)


def lines(proc: subprocess.CompletedProcess) -> list[str]:
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("torroute send: ")]


def test_routed_but_tor_down_defers_75(cfg: Path) -> None:
    proc = send("--config", str(cfg), "-f", "a@o.test", "--", "x@pinned.test")
    assert proc.returncode == 75, proc.stderr
    [line] = lines(proc)
    assert line.startswith("torroute send: x@pinned.test: deferred 4.")
    assert "tor" in line.lower()


def test_no_onion_route_is_68_and_never_the_clear_net(cfg: Path) -> None:
    proc = send("--config", str(cfg), "-f", "a@o.test", "x@local.test")
    assert proc.returncode == 68, proc.stderr
    [line] = lines(proc)
    assert "x@local.test: no-route 5.4.4 no onion route for local.test" in line
    assert "not sent (torroute never uses the clear net)" in line


@pytest.mark.parametrize(("args", "stdin", "code", "words"), [
    (["bob"], MESSAGE, 65, "no @domain"),
    ([f"bob@{'b' + ONION_A[1:]}"], MESSAGE, 65, "bad-address 5.1.2"),
    ([], MESSAGE, 64, "no recipients"),
    (["-t"], b"From: a@o.test\nSubject: s\n\nx\n", 64, "no recipients"),
    (["x@pinned.test"], b"", 65, "empty message"),
    (["x@pinned.test"], b"hello, just a body\n", 65, "neither a header field"),
    (["x@pinned.test"], b".\nFrom: a@o.test\n\n", 65, "empty message"),
    (["-bs"], MESSAGE, 64, "only -bm"),
    (["-oQ/var/spool", "x@pinned.test"], MESSAGE, 64, "unsupported sendmail option"),
    (["--now", "x@pinned.test"], MESSAGE, 64, "--now only goes with --flush"),
    (["--fallback", "/nonexistent/sendmail", "x@pinned.test"], MESSAGE, 78,
     "is not an executable"),
])
def test_bad_input_is_a_clear_error_and_nothing_sent(cfg: Path, args, stdin, code,
                                                     words) -> None:
    proc = send("--config", str(cfg), *args, stdin=stdin)
    assert proc.returncode == code, proc.stderr
    assert words in proc.stderr.decode(), proc.stderr
    assert "deferred" not in proc.stderr.decode()  # nothing was tried


def test_unreadable_stdin_is_66(cfg: Path, tmp_path: Path) -> None:
    target = tmp_path / "write-only"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)  # read() fails: EBADF
    try:
        proc = send("--config", str(cfg), "x@pinned.test", stdin=fd)
    finally:
        os.close(fd)
    assert proc.returncode == 66, proc.stderr
    assert "cannot read the message from stdin" in proc.stderr.decode()
    closed = subprocess.run([TORROUTE, "send", "--config", str(cfg), "x@pinned.test"],
                            capture_output=False, stderr=subprocess.PIPE, timeout=60,
                            preexec_fn=lambda: os.close(0))
    assert closed.returncode == 66, closed.stderr
    assert b"no stdin" in closed.stderr


def test_usage_and_config_errors(cfg: Path, tmp_path: Path) -> None:
    assert send("--config", str(cfg), "--no-such-flag", "x@pinned.test").returncode == 64
    bad = tmp_path / "bad.toml"
    bad.write_text("[tor]\nsocks = 'nonsense'\n")
    proc = send("--config", str(bad), "x@pinned.test")
    assert proc.returncode == 78 and "configuration error" in proc.stderr.decode()
    # TORROUTE_CONFIG, as every command
    proc = send("-f", "a@o.test", "x@local.test", env={"TORROUTE_CONFIG": str(cfg)})
    assert proc.returncode == 68, proc.stderr


def test_mixed_results_deferred_wins(cfg: Path) -> None:
    proc = send("--config", str(cfg), "-f", "a@o.test", "x@pinned.test", "y@local.test")
    assert proc.returncode == 75, proc.stderr
    assert [ln.split()[2:4] for ln in lines(proc)] == [["x@pinned.test:", "deferred"],
                                                       ["y@local.test:", "no-route"]]


def test_queue_keeps_the_deferred_and_flush_retries(cfg: Path, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    proc = send("--config", str(cfg), "-i", "-f", "a@o.test", "--queue", str(queue),
                "x@pinned.test", "y@local.test")
    # queued counts as done: what is left is the no-route recipient (68)
    assert proc.returncode == 68, proc.stderr
    queued, noroute = lines(proc)
    assert "x@pinned.test: queued 4." in queued and f"queued in {queue}/new/" in queued
    assert "y@local.test: no-route" in noroute
    spool = Spool(queue)
    [name] = spool.names()
    entry = spool.load(name)
    assert entry.pending() == ["x@pinned.test"] and entry.sender == "a@o.test"
    assert entry.data == MESSAGE  # -i: the dot line is part of the message
    # not due yet: reported, not tried
    proc = subprocess.run([TORROUTE, "send", "--config", str(cfg), "--flush", str(queue)],
                          capture_output=True, timeout=60)
    assert proc.returncode == 75
    assert f"{name}: x@pinned.test: queued" in proc.stderr.decode() and "next try" in \
        proc.stderr.decode()
    assert spool.load(name).attempts == 1
    proc = subprocess.run([TORROUTE, "send", "--config", str(cfg), "--flush", str(queue),
                           "--now"], capture_output=True, timeout=60)
    assert proc.returncode == 75, proc.stderr
    assert spool.load(name).attempts == 2 and spool.names() == [name]
    # a flush with recipients is a usage error; a missing spool too
    assert subprocess.run([TORROUTE, "send", "--config", str(cfg), "--flush", str(queue),
                           "x@y.test"], capture_output=True).returncode == 64
    assert subprocess.run([TORROUTE, "send", "--config", str(cfg), "--flush",
                           str(tmp_path / "none")], capture_output=True).returncode == 64


def test_queue_all_deferred_exits_0(cfg: Path, tmp_path: Path) -> None:
    proc = send("--config", str(cfg), "--queue", str(tmp_path / "q"), "x@pinned.test")
    assert proc.returncode == 0, proc.stderr
    assert len(Spool(tmp_path / "q").names()) == 1


def test_queue_that_cannot_be_written_is_75(cfg: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = send("--config", str(cfg), "--queue", str(blocker / "q"), "x@pinned.test")
    assert proc.returncode == 75, proc.stderr
    assert "cannot queue in" in proc.stderr.decode()


def fallback_script(tmp_path: Path, status: int) -> Path:
    """A real program standing where /usr/sbin/sendmail would: records argv and stdin."""
    script = tmp_path / "fake-sendmail"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\n'
                      f'cat > {tmp_path}/stdin\nexit {status}\n')
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(("status", "code", "kind"), [(0, 0, "delivered"), (75, 75, "deferred"),
                                                      (67, 67, "fallback-failed")])
def test_fallback_gets_exactly_the_unroutable_recipients(cfg: Path, tmp_path: Path, status,
                                                         code, kind) -> None:
    script = fallback_script(tmp_path, status)
    proc = send("--config", str(cfg), "--fallback", str(script), "-t", "-f", "a@o.test",
                "y@local.test", "z@local.test",
                stdin=b"From: a@o.test\nBcc: z@local.test\nSubject: s\n\nbody\n")
    assert proc.returncode == code, proc.stderr
    assert (tmp_path / "argv").read_text().split("\n")[:-1] == \
        ["-i", "-f", "a@o.test", "--", "y@local.test", "z@local.test"]
    assert (tmp_path / "stdin").read_bytes() == b"From: a@o.test\nSubject: s\n\nbody\n"
    for line in lines(proc):
        assert f": {kind} " in line and f"fallback {script}" in line


def test_fallback_is_not_used_for_routed_recipients(cfg: Path, tmp_path: Path) -> None:
    script = fallback_script(tmp_path, 0)
    proc = send("--config", str(cfg), "--fallback", str(script), "x@pinned.test")
    assert proc.returncode == 75 and not (tmp_path / "argv").exists()
