"""Real tor and dnsmasq processes for tests, loopback only.

The tor here never contacts anyone: ``UseBridges 1`` with one bridge on a closed loopback port.
It still answers on its SocksPort (address errors such as 0xF6 come at once) and its DNSPort
(automap works without bootstrap), and its control port works fully.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from torroute.testing.testnet import check_torrc

TOR = shutil.which("tor") or "/usr/sbin/tor"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free for both TCP and UDP on 127.0.0.1 right now."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, other) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def wait_tcp(port: int, timeout: float, proc: subprocess.Popen | None = None,
             what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what}: port {port} did not open within {timeout}s")


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
    """One real tor, loopback only (bridge mode), with SocksPort/DNSPort/ControlPort."""

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


@dataclass
class SrvRecord:
    name: str
    target: str
    port: int = 25
    priority: int = 0
    weight: int = 5


@dataclass
class Dnsmasq:
    """A real dnsmasq on 127.0.0.1 serving the given records; never reads resolv.conf."""

    srv: list[SrvRecord] = field(default_factory=list)
    local_domains: list[str] = field(default_factory=lambda: ["test"])
    extra: list[str] = field(default_factory=list)
    ttl: int = 300
    port: int = 0
    proc: subprocess.Popen | None = None

    def args(self) -> list[str]:
        args = [
            DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--no-poll", "--bind-interfaces", "--listen-address=127.0.0.1",
            f"--port={self.port}", f"--local-ttl={self.ttl}", "--user=root", "--group=root",
            "--log-facility=-", "--log-queries",
        ]
        args += [f"--local=/{d}/" for d in self.local_domains]
        args += [f"--srv-host={r.name},{r.target},{r.port},{r.priority},{r.weight}"
                 for r in self.srv]
        return args + self.extra

    def start(self) -> Dnsmasq:
        if not self.port:
            self.port = free_port()
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_tcp(self.port, 10, self.proc, "dnsmasq")
        return self

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None


class SilentUdpServer:
    """A UDP port that receives and never answers: a real DNS timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()


def shared_tmpdir(prefix: str) -> Path:
    """A 0755 directory (unlike pytest's tmp_path) that MTAs' unprivileged users can enter."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path
