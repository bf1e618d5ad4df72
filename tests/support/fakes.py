"""Two named fakes, only for faults real parts cannot produce on demand.

``FakeSocksServer`` (tor's extended SOCKS errors 0xF0..0xF7, a silent SocksPort; otherwise a
loopback SOCKS5 relay that records what was asked) and ``FakeSmtpServer`` (a connection reset in
the middle of DATA, a server that never answers).
"""

from __future__ import annotations

import socket
import struct
import threading


class _LoopbackServer:
    """What both fakes share: a listener on 127.0.0.1, one thread per connection (``_serve``),
    and ``close()`` ending the listener and every connection it accepted."""

    backlog = 8

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(self.backlog)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass


# fake: tor's 0xF0..0xF7 replies and a silent SocksPort, on demand
class FakeSocksServer(_LoopbackServer):
    """A SOCKS5 server on 127.0.0.1.  ``reply`` = None forwards every CONNECT to ``target``
    (a loopback SMTP server) and records the requested host; an int answers with that SOCKS
    reply code; ``"silent"`` accepts and never answers."""

    backlog = 64

    def __init__(self, target: tuple[str, int] | None = None) -> None:
        self.target = target
        self.reply: int | str | None = None
        self.requests: list[tuple[int, str, int]] = []  # (atyp, host, port)
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = _recv_exact(conn, 2)
            _recv_exact(conn, head[1])
            conn.sendall(b"\x05\x00")
            ver, cmd, _, atyp = _recv_exact(conn, 4)
            if atyp == 3:
                host = _recv_exact(conn, _recv_exact(conn, 1)[0]).decode()
            elif atyp == 1:
                host = socket.inet_ntoa(_recv_exact(conn, 4))
            else:
                host = socket.inet_ntop(socket.AF_INET6, _recv_exact(conn, 16))
            (port,) = struct.unpack(">H", _recv_exact(conn, 2))
            self.requests.append((atyp, host, port))
            if self.reply == "silent":
                self._stop.wait(600)
                return
            if isinstance(self.reply, int):
                conn.sendall(bytes([5, self.reply, 0, 1, 0, 0, 0, 0, 0, 0]))
                return
            assert self.target is not None
            upstream = socket.create_connection(self.target, timeout=10)
            for sock in (conn, upstream):  # no Nagle: a relay must not add delayed-ACK waits
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(bytes([5, 0, 0, 1, 127, 0, 0, 1, 0, 0]))
            _relay(conn, upstream)
        except OSError:
            pass
        finally:
            conn.close()


# fake: resets the connection mid-DATA or never answers, on demand
class FakeSmtpServer(_LoopbackServer):
    """A scripted SMTP server: ``mode`` = "reset-in-data" (accepts up to DATA's 354, reads
    some of the message, then RSTs), "silent" (never sends the greeting), "garbage"."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.received = bytearray()
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.mode == "silent":
                self._stop.wait(600)
                return
            if self.mode == "garbage":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                conn.recv(1024)
                return
            conn.sendall(b"220 fake ESMTP\r\n")
            reader = conn.makefile("rb")
            while True:
                line = reader.readline()
                if not line:
                    return
                self.received += line
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-fake\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    self.received += reader.read(1000)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))  # close -> RST
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
        except OSError:
            pass
        finally:
            conn.close()


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("eof")
        data += chunk
    return data


def _relay(a: socket.socket, b: socket.socket) -> None:
    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join(30)
    b.close()
