"""Real `torroute proxy` processes for tests: the listener (``--listen``, as the CLI) and the
inetd mode behind a small test-side acceptor that does what inetd does (accept, then start one
``torroute proxy --inetd`` per connection with the socket as its stdin and stdout).  Every
process logs into one file; :meth:`ProxyRun.check_log` fails on ERROR/Traceback lines."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from support.daemon import bad_log_lines, wait_socket
from support.paths import REPO
from torroute.testing.ports import free_port

ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}


def proxy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torroute.cli", "proxy", *args]


class ProxyRun:
    """A proxy (either mode) on ``127.0.0.1:port`` with its log in ``log_path``."""

    serial = 0

    def __init__(self, workdir: Path, args: list[str], *, inetd: bool, port: int = 0) -> None:
        self.workdir = workdir
        self.args = list(args)
        self.inetd = inetd
        self.port = port or free_port()
        ProxyRun.serial += 1
        self.log_path = workdir / f"proxy-{'inetd' if inetd else 'listen'}-{self.serial}.log"
        self.proc: subprocess.Popen | None = None
        self.children: list[subprocess.Popen] = []
        self.expect_errors = False
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- start/stop
    def start(self) -> ProxyRun:
        if self.inetd:
            self._listener = socket.create_server(("127.0.0.1", self.port))
            self._listener.settimeout(0.2)
            self._thread = threading.Thread(target=self._accept, daemon=True)
            self._thread.start()
            return self
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                proxy_command("--listen", f"127.0.0.1:{self.port}", *self.args), cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=ENV)
        try:
            wait_socket(("127.0.0.1", self.port), proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; proxy log:\n{self.log()}") from None
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, open(self.log_path, "a") as log:
                self.children.append(subprocess.Popen(
                    proxy_command("--inetd", *self.args), cwd=REPO, stdin=conn.fileno(),
                    stdout=conn.fileno(), stderr=log, env=ENV))

    def stop(self) -> int | None:
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            rc, self.proc = self.proc.returncode, None
        if self._listener is not None:
            self._stop.set()
            self._thread.join(5)
            self._listener.close()
            self._listener = None
        for child in self.children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return rc

    def wait_children(self, timeout: float = 60) -> list[int]:
        """inetd mode: every session process's exit status, once all have ended."""
        deadline = time.monotonic() + timeout
        return [c.wait(max(0.1, deadline - time.monotonic())) for c in self.children]

    # -- the log
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 30, count: int = 1) -> str:
        """Wait until ``text`` is in the log ``count`` times (a session logs when it ends)."""
        deadline = time.monotonic() + timeout
        while (log := self.log()).count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the proxy log:\n{log}")
            time.sleep(0.05)
        return log

    def check_log(self) -> None:
        bad = bad_log_lines(self.log())
        assert not bad, f"proxy log {self.log_path} has ERROR/Traceback lines:\n" + \
            "\n".join(bad[:20]) + f"\n--- log ---\n{self.log()[-4000:]}"
