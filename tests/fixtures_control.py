"""Fixtures for torroute.tor.control: real loopback-only tors with chosen control/auth settings, a
hashed control password from ``tor --hash-password``, and a real Postfix smtpd for the
open-relay probe."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from realparts import TOR, TorProcess, assert_loopback_only, free_port, shared_tmpdir, wait_tcp

CLIENT_KEYS = ("DNSPort", "AutomapHostsOnResolve", "AutomapHostsSuffixes")


@dataclass
class ControlTor(TorProcess):
    """A TorProcess whose torrc can lack the client settings torroute needs (``bare``), and
    can have a unix ControlSocket.  Still bridge mode with a closed loopback bridge; the torrc is
    checked by realparts.assert_loopback_only in ``start``."""

    bare: bool = False
    control_socket: bool = False
    drop: tuple[str, ...] = field(default_factory=tuple)
    defaults: list[str] = field(default_factory=list)

    @property
    def control_socket_path(self) -> Path:
        return self.workdir / "control.sock"

    def torrc(self) -> str:
        extra, self.extra = self.extra, []  # filter the base lines only, never the extras
        try:
            lines = super().torrc().splitlines()
        finally:
            self.extra = extra
        drop = tuple(k.lower() for k in self.drop + (CLIENT_KEYS if self.bare else ()))
        kept = [ln for ln in lines if ln.split(" ", 1)[0].lower() not in drop] + list(extra)
        if self.control_socket:
            kept.append(f"ControlSocket unix:{self.control_socket_path}")
        return "\n".join(kept) + "\n"

    @property
    def defaults_path(self) -> Path:
        return self.workdir / "defaults-torrc"

    def start(self, timeout: float = 30.0) -> ControlTor:
        """Start from ``torrc_path``, written only when missing: SAVECONF rewrites it and a
        restart must use tor's rewritten file.  ``defaults`` go to a --defaults-torrc file, as
        Debian's tor-service-defaults-torrc does."""
        if not self.torrc_path.exists():
            self.torrc_path.write_text(self.torrc())
        self.defaults_path.write_text("".join(f"{ln}\n" for ln in self.defaults))
        assert_loopback_only(self.defaults_path.read_text() + self.torrc_path.read_text())
        self.proc = subprocess.Popen(
            # the owner on the command line too: SAVECONF drops it from a rewritten torrc, and
            # a restarted tor must still exit if this test process dies
            [TOR, "--defaults-torrc", str(self.defaults_path), "-f", str(self.torrc_path),
             "__OwningControllerProcess", str(os.getpid())],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_tcp(self.control_port, timeout, self.proc, "tor")
            deadline = time.monotonic() + timeout
            while self.control_socket and not self.control_socket_path.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("tor made no control socket")
                time.sleep(0.02)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"tor failed to start: {exc}\n{self.log_tail()}") from exc
        return self


@pytest.fixture
def control_tor_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """``control_tor_factory(bare=True, control_socket=True, cookie=..., extra=[...],
    control_password_hash=...)`` -> a started ControlTor, stopped after the test."""
    made: list[ControlTor] = []

    def make(start: bool = True, **kwargs) -> ControlTor:
        proc = ControlTor(Path(tmp_path_factory.mktemp("ctltor")), **kwargs)
        made.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in made:
        proc.stop()


def hash_password(password: str) -> str:
    """tor's own S2K hash of a control password (``tor --hash-password``)."""
    out = subprocess.run([TOR, "--hash-password", password, "--quiet"], capture_output=True,
                         text=True, check=True, timeout=30).stdout.strip().splitlines()
    return out[-1]


@pytest.fixture(scope="session")
def control_password() -> tuple[str, str]:
    """(password, hash) for HashedControlPassword."""
    password = "torroute-test-password"
    return password, hash_password(password)


# ---------------------------------------------------------------------------------------------
# A real Postfix smtpd on 127.0.0.1 for the open-relay probe

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"

_MASTER_CF = """\
{listen} inet n - n - - smtpd {smtpd_args}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixSmtpd:
    """A private Postfix instance whose only listener is an smtpd on 127.0.0.1:port.

    ``relay_for_loopback``: Debian's default (mynetworks includes 127.0.0.0/8, so clients on
    127.0.0.1 may relay) - the open-relay trap.  Otherwise the smtpd is run the way torroute's
    docs recommend for onion mail: ``-o mynetworks= -o
    smtpd_relay_restrictions=reject_unauth_destination``.
    """

    workdir: Path
    relay_for_loopback: bool
    port: int = 0

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.workdir / "data"

    def start(self) -> PostfixSmtpd:
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        main = f"""\
compatibility_level = 3.6
config_directory = {self.config_dir}
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = postfix
setgid_group = postdrop
myhostname = relaytest.torroute.invalid
mydomain = torroute.invalid
mydestination = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
biff = no
alias_maps =
alias_database =
maillog_file = {self.workdir}/maillog
maillog_file_prefixes = {self.workdir}
mynetworks_style = host
mynetworks = 127.0.0.0/8
"""
        (self.config_dir / "main.cf").write_text(main)
        args = "" if self.relay_for_loopback else \
            "-o mynetworks= -o smtpd_relay_restrictions=reject_unauth_destination"
        (self.config_dir / "master.cf").write_text(
            _MASTER_CF.format(listen=f"127.0.0.1:{self.port}", smtpd_args=args))
        past = time.time() - 10  # a fresh main.cf stalls postfix commands ~2s (recipe)
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))
        subprocess.run([POSTFIX, "-c", str(self.config_dir), "check"], check=True,
                       capture_output=True, timeout=60)
        subprocess.run([POSTFIX, "-c", str(self.config_dir), "start"], check=True,
                       capture_output=True, timeout=60)
        wait_tcp(self.port, 20, None, "postfix smtpd")
        return self

    def stop(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self.config_dir), "stop"], capture_output=True,
                       timeout=60)

    def log(self) -> str:
        try:
            return (self.workdir / "maillog").read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture(scope="session")
def postfix_smtpds() -> Iterator[dict[str, PostfixSmtpd]]:
    """Two real Postfix smtpds: ``open`` (Debian defaults: relays for 127.0.0.1) and ``closed``
    (the recommended dedicated onion smtpd)."""
    if not Path(POSTFIX).exists():
        pytest.fail("postfix is not installed: run scripts/install-deps.sh (CI installs it)")
    base = shared_tmpdir("torroute-relaycheck-")
    servers = {
        "open": PostfixSmtpd(base / "open", relay_for_loopback=True),
        "closed": PostfixSmtpd(base / "closed", relay_for_loopback=False),
    }
    started: list[PostfixSmtpd] = []
    try:
        for server in servers.values():
            started.append(server.start())
        yield servers
    finally:
        for server in started:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
