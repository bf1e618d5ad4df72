"""One real tor on loopback that never contacts anyone: bridge mode with a closed bridge.

``UseBridges 1`` with one bridge on a loopback port where nothing listens: tor never bootstraps
and never sends a packet past 127.0.0.1.  It still answers on its SocksPort (address errors
such as 0xF6 come at once; an onion waits for a circuit that never comes), on its DNSPort
(``AutomapHostsOnResolve``: automap works without bootstrap), and its control port works fully
(ADD_ONION, GETINFO, SAVECONF).  Every torrc is checked by :func:`assert_loopback_only` before
tor sees it; tor is never started with a default torrc (``--defaults-torrc /dev/null``).

For a tor that does reach onion services, use the private network
(:mod:`torroute.testing.testnet`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .ports import free_port, wait_tcp
from .torrc_safety import check_torrc  # the private network's rule: one copy

TOR = shutil.which("tor") or "/usr/sbin/tor"


def assert_loopback_only(torrc: str) -> None:
    """Refuse any torrc that could reach past 127.0.0.0/8 (the project's network rule).

    ``%include FILE`` lines are checked with the included file's lines in their place."""
    lines = []
    for line in torrc.splitlines():
        if line.strip().lower().startswith("%include"):
            lines += Path(line.split(None, 1)[1].strip()).read_text().splitlines()
        else:
            lines.append(line)
    check_torrc("\n".join(lines) + "\n")


@dataclass
class TorProcess:
    """One real tor, loopback only (bridge mode), with SocksPort/DNSPort/ControlPort.

    ``TorProcess(workdir).start()``; ports are picked free unless given.  ``socks`` is the
    ExtendedErrors SocksPort (tor's 0xF0..0xF7 replies), ``socks_plain`` the plain one, ``dns``
    the DNSPort (automaps ``.onion``), ``control`` the ControlPort (cookie authentication in
    ``cookie_path`` unless ``cookie=False``; ``control_password_hash`` adds a password).
    ``extra`` torrc lines are appended (and checked like the rest)."""

    workdir: Path
    extra: list[str] = field(default_factory=list)
    control_password_hash: str | None = None
    cookie: bool = True
    socks_port: int = 0
    socks_ext_port: int = 0
    dns_port: int = 0
    control_port: int = 0
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        self.bridge_port = free_port()  # nothing listens there: tor never bootstraps
        for name in ("socks_port", "socks_ext_port", "dns_port", "control_port"):
            if not getattr(self, name):
                setattr(self, name, free_port())

    @property
    def socks(self) -> tuple[str, int]:
        return ("127.0.0.1", self.socks_ext_port)  # the ExtendedErrors port

    @property
    def socks_plain(self) -> tuple[str, int]:
        return ("127.0.0.1", self.socks_port)

    @property
    def dns(self) -> tuple[str, int]:
        return ("127.0.0.1", self.dns_port)

    @property
    def control(self) -> tuple[str, int]:
        return ("127.0.0.1", self.control_port)

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def cookie_path(self) -> Path:
        return self.datadir / "control_auth_cookie"

    @property
    def log_path(self) -> Path:
        return self.workdir / "notice.log"

    @property
    def torrc_path(self) -> Path:
        return self.workdir / "torrc"

    def torrc(self) -> str:
        lines = [
            f"DataDirectory {self.datadir}",
            "RunAsDaemon 0",
            "Sandbox 0",
            "UseBridges 1",
            f"Bridge 127.0.0.1:{self.bridge_port}",
            "ClientUseIPv4 1",
            "ClientUseIPv6 0",
            "UseDefaultFallbackDirs 0",
            "Address 127.0.0.1",
            "GeoIPFile /dev/null",
            "GeoIPv6File /dev/null",
            f"SocksPort 127.0.0.1:{self.socks_port}",
            f"SocksPort 127.0.0.1:{self.socks_ext_port} ExtendedErrors",
            f"DNSPort 127.0.0.1:{self.dns_port}",
            "AutomapHostsOnResolve 1",
            "AutomapHostsSuffixes .onion",
            f"ControlPort 127.0.0.1:{self.control_port}",
            f"CookieAuthentication {1 if self.cookie else 0}",
            f"Log notice file {self.log_path}",
            f"PidFile {self.workdir / 'tor.pid'}",
            "ShutdownWaitLength 0",
            "SafeLogging 0",
            f"__OwningControllerProcess {os.getpid()}",
        ]
        if self.control_password_hash:
            lines.append(f"HashedControlPassword {self.control_password_hash}")
        return "\n".join(lines + self.extra) + "\n"

    def start(self, timeout: float = 30.0) -> TorProcess:
        text = self.torrc()
        assert_loopback_only(text)
        self.torrc_path.write_text(text)
        self.proc = subprocess.Popen(
            [TOR, "-f", str(self.torrc_path), "--defaults-torrc", "/dev/null"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            for port in (self.control_port, self.socks_port, self.socks_ext_port):
                wait_tcp(port, timeout, self.proc, "tor")
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"tor failed to start: {exc}\n{self.log_tail()}") from exc
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> TorProcess:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no tor log)"
