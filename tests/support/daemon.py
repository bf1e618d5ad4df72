"""A real `torroute serve` process for tests, and the log check every daemon test gets."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from support.paths import REPO
from torroute.testing.ports import free_port


def wait_socket(address: str | tuple[str, int], timeout: float = 15.0,
                proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        with socket.socket(family) as s:
            try:
                s.connect(address)
                return
            except OSError:
                time.sleep(0.02)
    raise TimeoutError(f"{address} did not accept within {timeout}s")


#: Log lines that no daemon may write unless its test provokes them (then it sets
#: ``expect_errors`` and asserts the exact line itself).
BAD_LOG_LINE = re.compile(r"^torroute: (ERROR|CRITICAL) |Traceback \(most recent call last\)",
                          re.MULTILINE)


def bad_log_lines(text: str) -> list[str]:
    """The ERROR / CRITICAL / Traceback lines of a daemon log."""
    return [ln for ln in text.splitlines() if BAD_LOG_LINE.search(ln)]


@dataclass
class Daemon:
    """A real `torroute serve` subprocess with its sockets in a 0755 directory.

    Its log is its own file (``log_name``), appended to across restarts; at teardown
    ``daemon_factory`` fails the test if it has an ERROR, CRITICAL or Traceback line, unless the
    test set ``expect_errors`` (and then checks the error it provoked itself)."""

    workdir: Path
    args: list[str]
    socketmap: str = ""
    exim: str = ""
    tcp_port: int = 0
    proc: subprocess.Popen | None = None
    log_name: str = "daemon.log"
    expect_errors: bool = False
    env: dict[str, str] = field(default_factory=dict)  # added to the minimal environment
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / self.log_name
        self.socketmap = self.socketmap or str(self.workdir / "socketmap.sock")
        self.exim = self.exim or str(self.workdir / "exim.sock")
        if not self.tcp_port:
            self.tcp_port = free_port()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "torroute.cli", "serve",
                "--socketmap", f"unix:{self.socketmap}",
                "--tcp-table", f"inet:127.0.0.1:{self.tcp_port}",
                "--exim", f"unix:{self.exim}", *self.args]

    def start(self) -> Daemon:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.command(), cwd=REPO, stdout=log, stderr=log,
                                     env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                          **self.env})
        log.close()
        try:
            for address in (self.socketmap, self.exim, ("127.0.0.1", self.tcp_port)):
                wait_socket(address, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; daemon log:\n{self.log()}") from None
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc, self.proc = self.proc.returncode, None
        return rc

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:  # never started
            return ""

    def error_lines(self) -> list[str]:
        """The ERROR / CRITICAL / Traceback lines of this daemon's log so far."""
        return bad_log_lines(self.log())

    def check_log(self) -> None:
        """Fail if the log has an ERROR, CRITICAL or Traceback line (see ``expect_errors``)."""
        bad = self.error_lines()
        assert not bad, (f"daemon log {self.log_path} has {len(bad)} ERROR/Traceback "
                         f"line(s):\n" + "\n".join(bad[:20]) + f"\n--- log ---\n"
                         f"{self.log()[-4000:]}")

    def wait_log(self, text: str, count: int = 1, timeout: float = 10) -> str:
        """Wait until ``text`` is in the log ``count`` times (lines are flushed within 0.2 s)."""
        deadline = time.monotonic() + timeout
        while (log := self.log()).count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the daemon log:\n{log}")
            time.sleep(0.02)
        return log

    @property
    def socketmap_table(self) -> str:
        return f"socketmap:unix:{self.socketmap}:transport"

    @property
    def tcp_table(self) -> str:
        return f"tcp:127.0.0.1:{self.tcp_port}"
