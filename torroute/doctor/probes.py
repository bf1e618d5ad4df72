"""The doctor's probes: one request to each of the daemon's listeners, an SMTP banner through
tor, and a deadline around anything that might hang.

Each probe moves bytes with the existing codecs (torroute.protocols) and a deadline; what a
reply means is the codec's.  They return ``(ok, detail)`` or raise ``OSError`` /
``TorrouteError``; the check functions turn either into a doctor line.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ..endpoint import Endpoint, HostPort
from ..errors import ProtocolError, TemporaryError

T = TypeVar("T")

#: the probe's lookup key: an address literal is answered "no route" without DNS or tor
PROBE_ADDRESS = "doctor@[127.0.0.1]"
PROBE_DOMAIN = "[127.0.0.1]"
MAX_REPLY = 65536


class ProbeTimeout(TemporaryError, TimeoutError):
    """A probe (or a whole check) did not finish within its deadline."""


def with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``fn()`` in a daemon thread, given up after ``timeout`` seconds (ProbeTimeout).

    Why a thread: stem's control connection, postconf and the DNS code have no single
    deadline of their own; the doctor must never hang, so a stuck call is abandoned (the
    thread dies with the process)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"doctor:{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ProbeTimeout(f"{what}: no answer within {timeout:g}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _connect(endpoint: Endpoint, timeout: float) -> socket.socket:
    if endpoint.family == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(endpoint.path)
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)


def _read_until(sock: socket.socket, done: Callable[[bytes], bool], deadline: float) -> bytes:
    data = b""
    while not done(data):
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProbeTimeout("no complete answer in time")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REPLY:
            raise ProtocolError("answer too long")
    return data


def probe_listener(kind: str, endpoint: Endpoint, timeout: float) -> str:
    """Send one lookup (``kind``: socketmap, tcp_table, exim) or an LMTP greeting/QUIT and
    return a short description of the answer; raises OSError, ProtocolError, ProbeTimeout."""
    from ..protocols import eximline, socketmap, tcptable

    deadline = time.monotonic() + timeout
    with _connect(endpoint, timeout) as sock:
        if kind == "socketmap":
            sock.sendall(socketmap.encode_request("transport", PROBE_ADDRESS))
            data = _read_until(sock, lambda d: socketmap.decode_netstring(
                d, socketmap.MAX_REPLY) is not None, deadline)
            split = socketmap.decode_netstring(data, socketmap.MAX_REPLY)
            if split is None:
                raise ProtocolError("connection closed before a whole socketmap reply")
            status, text = socketmap.parse_reply(split[0])
            return f"socketmap answered {status} {text}".strip()
        if kind == "tcp_table":
            sock.sendall(tcptable.encode_get(PROBE_ADDRESS))
            data = _read_until(sock, lambda d: b"\n" in d, deadline)
            code, text = tcptable.parse_reply(data.split(b"\n", 1)[0])
            return f"tcp_table answered {code} {text}".strip()
        if kind == "exim":
            sock.sendall(eximline.encode_request(PROBE_DOMAIN))
            data = _read_until(sock, lambda d: b"\n" in d, deadline)
            if b"\n" not in data:
                raise ProtocolError("connection closed before an answer line")
            answer, text = eximline.parse_answer(data.split(b"\n", 1)[0] + b"\n")
            return f"exim line protocol answered {answer} {text}".strip()
        if kind == "lmtp":
            reply = _smtp_reply(sock, deadline)
            try:
                sock.sendall(b"QUIT\r\n")
            except OSError:
                pass
            if reply.code != 220:
                raise ProtocolError(f"LMTP greeting {reply.text()}")
            return f"LMTP greeting {reply.text()}"
    raise ValueError(f"unknown listener kind {kind!r}")


def _smtp_reply(sock: socket.socket, deadline: float):
    from ..protocols.smtp import ReplyParser

    parser = ReplyParser()
    read = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProbeTimeout("no SMTP greeting in time")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            raise ProtocolError("connection closed before the SMTP greeting")
        read += len(chunk)
        if read > MAX_REPLY:
            raise ProtocolError("SMTP greeting too long")
        replies = parser.feed(chunk)
        if replies:
            return replies[0]


def banner_through_tor(onion: str, port: int, proxy: HostPort, timeout: float) -> str:
    """Dial ``onion:port`` through tor's SocksPort and read the SMTP banner (then QUIT): the
    canary of an onion MX.  Returns the banner text; raises torroute's SOCKS errors
    (TemporarySocksError with tor's code, TorUnavailable), ProtocolError (not a 220),
    ProbeTimeout."""
    from ..tor.dial import dial

    deadline = time.monotonic() + timeout
    sock = dial(onion, port, proxy=proxy, timeout=timeout)
    with sock:
        reply = _smtp_reply(sock, deadline)
        try:
            sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
    if reply.code != 220:
        raise ProtocolError(f"{onion}:{port} greeted {reply.text()}")
    return reply.text()
