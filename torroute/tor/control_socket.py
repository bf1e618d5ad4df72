"""A small blocking control-port client on a raw socket: cookie authentication, commands, and
asynchronous events delivered from a reader thread.  Replies are framed and read by the one
control-protocol codec, :mod:`torroute.protocols.control`.

Why not stem (:class:`torroute.tor.control.Tor` uses it, for admins' tors and every auth
method): the private test network needs a reader that blocks without a read timeout (an event
listener must survive quiet periods) and nothing else; stem 1.8 logged a stream of errors after
close there.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from ..endpoint import HostPort, format_hostport
from ..errors import ControlError, TorRefused
from ..protocols.control import Reply, ReplyParser, getinfo_value

__all__ = ["ControlSocket"]


class ControlSocket:
    """An authenticated control connection to ``address``; events (650) go to ``on_event``
    (called in the reader thread).  ``timeout`` bounds the connect and each command's reply.

    Raises :class:`~torroute.errors.ControlError` (no reply in time, connection lost) and
    :class:`~torroute.errors.TorRefused` (tor answered with an error), ``OSError`` when the
    port cannot be reached.
    """

    def __init__(self, address: HostPort, cookie: Path | str,
                 on_event: Callable[[Reply], None] | None = None, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self.on_event = on_event
        self._sock = socket.create_connection(address, timeout=timeout)
        self._sock.settimeout(None)  # the reader blocks; commands time out on the queue
        self._replies: queue.Queue[Reply | None] = queue.Queue()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"tor-control-{format_hostport(address)}")
        self._reader.start()
        try:
            self.command("AUTHENTICATE " + Path(cookie).read_bytes().hex())
        except BaseException:
            self.close()
            raise

    def _read_loop(self) -> None:
        parser = ReplyParser()
        try:
            while chunk := self._sock.recv(65536):
                for reply in parser.feed(chunk):
                    if not reply.is_event:
                        self._replies.put(reply)
                    elif self.on_event is not None:
                        self.on_event(reply)
        except OSError:
            pass
        self._replies.put(None)

    def command(self, line: str) -> Reply:
        """Send one command; its reply, or TorRefused unless tor answered 2xx."""
        name = line.split(" ", 1)[0]
        where = f"tor control port {format_hostport(self.address)}"
        with self._lock:
            try:
                self._sock.sendall(line.encode() + b"\r\n")
            except OSError as exc:
                raise ControlError(f"{where}: {name}: {exc}") from None
            try:
                reply = self._replies.get(timeout=self.timeout)
            except queue.Empty:
                raise ControlError(f"{where}: no reply to {name}") from None
        if reply is None:
            self._replies.put(None)  # every later command sees the closed connection too
            raise ControlError(f"{where}: connection closed")
        if not reply.ok:
            raise TorRefused(f"{where}: {name}: {reply.code} {reply.message}", reply.code, name)
        return reply

    def getinfo(self, key: str) -> str:
        """One GETINFO value ("" when tor's reply does not name it)."""
        reply = self.command(f"GETINFO {key}")
        value = getinfo_value([(line.divider, line.text) for line in reply.lines], key)
        return "" if value is None else value

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=2)
