"""A real dnsmasq on 127.0.0.1 serving SRV records, and a UDP port that never answers.

Why dnsmasq: torroute's SRV routing (``_onion-mx._tcp.<domain>``) is best tested against a real
resolver on the wire.  This one answers only what it is given: it never reads
``/etc/resolv.conf`` or ``/etc/hosts`` and forwards nothing (``--no-resolv``), and names under
``local_domains`` that it has no record for get NXDOMAIN instead of a forward.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass, field

from .ports import free_port, wait_tcp

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


@dataclass
class SrvRecord:
    """One SRV record: ``SrvRecord("_onion-mx._tcp.example.org", "<56 chars>.onion", 25)``."""

    name: str
    target: str
    port: int = 25
    priority: int = 0
    weight: int = 5


@dataclass
class Dnsmasq:
    """A real dnsmasq on 127.0.0.1 serving the given records; never reads resolv.conf.

    ``Dnsmasq(srv=[SrvRecord(...)]).start()``; ``.address`` is ("127.0.0.1", port) for
    torroute's ``nameservers``; ``.stop()`` ends it.  ``extra`` are more dnsmasq arguments."""

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
            "--log-facility=-",
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

    def __enter__(self) -> Dnsmasq:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SilentUdpServer:
    """A UDP port on 127.0.0.1 that receives and never answers: a real DNS timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()
