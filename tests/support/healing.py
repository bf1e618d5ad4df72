"""The stuck-tor-client fault for the self-healing tests (tests/testnet/test_healing.py).

Why a fault: tor's client gets stuck on onions in the wild (and once in a long session of this
suite: the network's onions answered 0xF0 after 11-15 minutes, see scripts/test), but no state
of the private Tor network could be produced on demand that keeps a client failing until
NEWNYM -- tor's client retries a failed introduction on other intro points and refetches the
descriptor by itself (docs/operating/healing.inc).  So the stuck state is injected at the
SOCKS layer, and what lifts it is the real signal: tor's own SIGNAL NEWNYM event.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from pathlib import Path

from torroute.protocols.control import Reply
from torroute.testing.testnet import ControlConnection


class StuckTorClientFault:
    """A SOCKS5 proxy in front of tor's SocksPort that answers ``code`` (0xF2: introduction
    failed) for every CONNECT to an onion in ``stuck`` (``None``: every onion) until the real
    tor behind it reports ``SIGNAL NEWNYM`` on its control port (SETEVENTS SIGNAL), then
    passes everything through to tor until :meth:`stick` is called again.  ``newnyms`` are
    the times of tor's NEWNYM events (tor's count, not the daemon's)."""

    def __init__(self, upstream: tuple[str, int], control_port: int, cookie: Path,
                 code: int = 0xF2) -> None:
        self.upstream = upstream
        self.code = code
        self.stuck: set[str] | None = set()
        self.active = False
        self.newnyms: list[float] = []
        self.refused: list[tuple[float, str]] = []  # (time, onion) answered with ``code``
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = self._listener.getsockname()[:2]
        self._closing = False
        self._control = ControlConnection(control_port, cookie, on_event=self._on_event)
        self._control.command("SETEVENTS SIGNAL")
        self._thread = threading.Thread(target=self._accept, daemon=True, name="stuck-fault")
        self._thread.start()

    def stick(self, onions: set[str] | None = None) -> None:
        """From now on, refuse ``onions`` (None: all) until tor's next NEWNYM."""
        with self._lock:
            self.stuck = None if onions is None else set(onions)
            self.active = True

    def _on_event(self, reply: Reply) -> None:
        if reply.is_event and any(t.strip() == "SIGNAL NEWNYM" for t in reply.texts):
            with self._lock:
                self.newnyms.append(time.monotonic())
                self.active = False

    def _refuses(self, host: str) -> bool:
        with self._lock:
            return self.active and host.endswith(".onion") and (
                self.stuck is None or host in self.stuck)

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Read the greeting (answer it ourselves only when refusing) and the CONNECT."""
        conn.settimeout(30)
        try:
            head = self._read(conn, 2)
            head += self._read(conn, head[1])
            method = b"\x00" if 0 in head[2:] else b"\x02"
            conn.sendall(b"\x05" + method)
            auth = b""
            if method == b"\x02":  # username/password (IsolateSOCKSAuth)
                auth = self._read(conn, 2)
                auth += self._read(conn, auth[1])
                auth += self._read(conn, 1)
                auth += self._read(conn, auth[-1])
                conn.sendall(b"\x01\x00")
            request = self._read(conn, 4)
            if request[3] != 3:  # not a name: pass through (the daemon only sends names)
                host = ""
                rest = self._read(conn, {1: 6, 4: 18}.get(request[3], 0))
            else:
                length = self._read(conn, 1)
                name = self._read(conn, length[0])
                rest = length + name + self._read(conn, 2)
                host = name.decode("ascii", "replace").lower()
            if self._refuses(host):
                with self._lock:
                    self.refused.append((time.monotonic(), host))
                conn.sendall(bytes([5, self.code, 0, 1, 0, 0, 0, 0, 0, 0]))
                conn.close()
                return
            upstream = socket.create_connection(self.upstream, timeout=30)
            upstream.sendall(b"\x05\x01" + method)  # the method we chose for the client
            self._read(upstream, 2)
            if auth:
                upstream.sendall(auth)
                self._read(upstream, 2)
            upstream.sendall(request + rest)
            self._splice(conn, upstream)
        except (OSError, IndexError):
            conn.close()

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    @staticmethod
    def _splice(a: socket.socket, b: socket.socket) -> None:
        a.settimeout(None)
        b.settimeout(None)
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            pass
        finally:
            sel.close()
            a.close()
            b.close()

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        self._control.close()
