"""Fixtures for the lookup daemon: a real `torroute serve` process, Postfix's postmap, real Exim."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from realparts import shared_tmpdir

REPO = Path(__file__).resolve().parent.parent
EXIM = Path("/opt/exim4-heavy/usr/sbin/exim4")
POSTMAP = shutil.which("postmap") or "/usr/sbin/postmap"
TRUSTED_CONFIGS = Path("/etc/exim4/trusted_configs")


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
            from realparts import free_port

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


@pytest.fixture
def serve_dir() -> Iterator[Path]:
    """A 0755 directory (Postfix/Exim users must reach the sockets), removed afterwards."""
    path = shared_tmpdir("torroute-serve-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon_factory(serve_dir: Path) -> Iterator:
    """``daemon_factory(*args)`` starts `torroute serve` with all three listeners plus args.

    At teardown every daemon is stopped and its log must have no ERROR/CRITICAL/Traceback
    line, unless the test set ``d.expect_errors = True`` (and asserted its own error)."""
    made: list[Daemon] = []

    def make(*args: str, start: bool = True, env: dict[str, str] | None = None,
             **paths: str) -> Daemon:
        """``paths``: socketmap= / exim= socket paths other than the defaults."""
        name = "daemon.log" if not made else f"daemon-{len(made) + 1}.log"
        d = Daemon(serve_dir, list(args), log_name=name, env=dict(env or {}), **paths)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.stop()
    for d in made:
        if not d.expect_errors:
            d.check_log()


@pytest.fixture
def daemon_records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """For a daemon (LookupDaemon, Relay) run in the test's own process: its log records, at
    INFO and above.  At teardown nothing may have logged ERROR or worse or a traceback, unless
    the test set ``daemon_records.expect_errors = True`` (and checked its own error)."""
    caplog.set_level(logging.INFO)
    caplog.expect_errors = False  # type: ignore[attr-defined]
    yield caplog
    if not caplog.expect_errors:  # type: ignore[attr-defined]
        records = caplog.get_records("setup") + caplog.get_records("call")
        bad = [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
        assert not bad, "in-process daemon logged errors:\n" + "\n".join(
            f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad)


@dataclass
class Postmap:
    """Postfix's own client: `postmap -c DIR -q KEY TABLE` (a minimal config directory)."""

    confdir: Path

    def query(self, key: str, table: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([POSTMAP, "-c", str(self.confdir), "-q", key, table],
                              capture_output=True, text=True, timeout=timeout)

    def stdin_session(self, table: str) -> subprocess.Popen:
        """`postmap -q - TABLE`: one Postfix client keeping its map connection open.

        SIGPIPE stays ignored (restore_signals=False), as in Postfix's daemons (trivial-rewrite
        ignores it): a write to a connection the daemon closed is then an error Postfix's map
        client recovers from by reconnecting, instead of killing the command.
        """
        return subprocess.Popen([POSTMAP, "-c", str(self.confdir), "-q", "-", table],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, bufsize=1,
                                restore_signals=False)


@pytest.fixture
def postmap(serve_dir: Path) -> Postmap:
    confdir = serve_dir / "postfix"
    confdir.mkdir()
    main_cf = confdir / "main.cf"
    main_cf.write_text("compatibility_level = 3.6\nmaillog_file = /dev/stderr\n"
                       "maillog_file_prefixes = /dev\n")
    old = time.time() - 3600  # a fresh main.cf makes every Postfix command stall ~2 s
    os.utime(main_cf, (old, old))
    return Postmap(confdir)


@dataclass
class Exim:
    """A real Exim (exim4-daemon-heavy unpacked in /opt/exim4-heavy) with a -C config."""

    workdir: Path
    conf: Path

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(EXIM), "-C", str(self.conf), *args], capture_output=True,
                              text=True, timeout=timeout)

    def expand(self, text: str) -> subprocess.CompletedProcess:
        return self.run("-be", text)

    def route(self, address: str) -> subprocess.CompletedProcess:
        return self.run("-bt", address)


@pytest.fixture
def exim_factory(serve_dir: Path) -> Iterator:
    """``exim_factory(routers_text)``: an Exim config with the given routers section."""
    if not EXIM.exists():
        pytest.fail("Exim is missing: run scripts/install-exim.sh (CI's install-deps runs it)")
    added: list[str] = []

    def make(routers: str, name: str = "exim") -> Exim:
        workdir = serve_dir / name
        for sub in ("spool", "log"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
            shutil.chown(workdir / sub, "Debian-exim", "Debian-exim")
        os.chmod(workdir, 0o755)
        conf = workdir / "exim.conf"
        conf.write_text(EXIM_CONF.format(exim=EXIM, dir=workdir, routers=routers))
        os.chmod(conf, 0o644)
        lines = TRUSTED_CONFIGS.read_text().splitlines() if TRUSTED_CONFIGS.exists() else []
        if str(conf) not in lines:
            with open(TRUSTED_CONFIGS, "a") as fh:
                fh.write(f"{conf}\n")
            added.append(str(conf))
        return Exim(workdir, conf)

    yield make
    if added and TRUSTED_CONFIGS.exists():
        keep = [ln for ln in TRUSTED_CONFIGS.read_text().splitlines() if ln not in added]
        TRUSTED_CONFIGS.write_text("".join(f"{ln}\n" for ln in keep))


EXIM_CONF = """\
exim_path = {exim}
primary_hostname = exim-test.localdomain
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
domainlist local_domains = local.test
begin routers
{routers}
begin transports
onion_smtp:
  driver = smtp
clear_smtp:
  driver = smtp
begin retry
*   *   F,2m,15s
"""
