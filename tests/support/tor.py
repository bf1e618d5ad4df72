"""A tor for the control-port tests: torroute.testing's bridge-mode TorProcess whose torrc can
lack what torroute needs, with a unix ControlSocket and a --defaults-torrc."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from torroute.testing.ports import wait_tcp
from torroute.testing.tor import TOR, TorProcess, assert_loopback_only

CLIENT_KEYS = ("DNSPort", "AutomapHostsOnResolve", "AutomapHostsSuffixes")


@dataclass
class ControlTor(TorProcess):
    """A TorProcess whose torrc can lack the client settings torroute needs (``bare``), and
    can have a unix ControlSocket.  Still bridge mode with a closed loopback bridge; the torrc is
    checked by torroute.testing.tor.assert_loopback_only in ``start``."""

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


def hash_password(password: str) -> str:
    """tor's own S2K hash of a control password (``tor --hash-password``)."""
    out = subprocess.run([TOR, "--hash-password", password, "--quiet"], capture_output=True,
                         text=True, check=True, timeout=30).stdout.strip().splitlines()
    return out[-1]
