"""Loopback ports for test servers: pick a free one, wait until something listens on it.

Everything here binds or connects to 127.0.0.1 only (the project's network rule)."""

from __future__ import annotations

import socket
import subprocess
import time


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free for both TCP and UDP on 127.0.0.1 right now.

    Both: dnsmasq and tor's DNSPort listen on UDP (and dnsmasq on TCP too) at the same number."""
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
    """Wait until 127.0.0.1:``port`` accepts a TCP connection.

    Raises RuntimeError at once if ``proc`` exits first (its start failed), TimeoutError after
    ``timeout`` seconds."""
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
