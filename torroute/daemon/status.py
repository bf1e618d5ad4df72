"""The daemon's status socket, which ``torroute status`` and ``torroute doctor`` ask.

Protocol (unix socket or loopback TCP): the client sends ``status\\n``; the daemon answers one
JSON object and ``\\n`` and closes.  An unknown command gets ``{"error": "..."}\\n``.  The
object (see :func:`snapshot`): version, pid, start time, the reload state, the listeners, the
counts (lookups by protocol and result, relay attempts by reason class, connections,
malformed requests) and the health service's per-onion table, canaries, healing and tor state.
:func:`query_status` is the blocking client (standard library only).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from ..endpoint import Endpoint
from ..errors import DaemonUnreachable
from .metrics import health_snapshot, lookup_counts, relay_counters
from .side import OneRequestConnection, SideListener

if TYPE_CHECKING:
    from .service import LookupDaemon

log = logging.getLogger(__package__)

MAX_COMMAND = 256  # bytes: a command line longer than this is refused
MAX_ANSWER = 16 << 20  # what the client reads at most


def snapshot(daemon: LookupDaemon) -> dict[str, Any]:
    """The status object (JSON-able) of a running daemon."""
    from .. import __version__

    now = time.time()
    state = daemon.reload_state
    counters = relay_counters(daemon)
    health = health_snapshot(daemon)
    started = daemon.started
    return {
        "version": __version__,
        "pid": os.getpid(),
        "started": started,
        "uptime": max(0.0, now - started),
        "reload": {"ok": state.ok, "when": state.when, "message": state.message,
                   "pinned": state.pinned, "failures": daemon.reload_failures},
        "listeners": [{"kind": kind, "endpoint": str(daemon.bound(kind, ep))}
                      for kind, ep, _server in daemon.servers],
        "counts": {"lookups": lookup_counts(daemon), "attempts": counters.by_reason(),
                   "connections": len(daemon.connections), "malformed": daemon.malformed},
        "onions": health.get("onions", []),
        "canaries": health.get("canaries", []),
        "healing": health.get("healing", {}),
        "tor": health.get("tor", {}),
    }


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True).encode() + b"\n"


class _StatusConnection(OneRequestConnection):
    service: StatusService

    def on_data(self, buf: bytes) -> bytes | None:
        end = buf.find(b"\n")
        if end == -1:
            return _line({"error": "command too long"}) if len(buf) > MAX_COMMAND else None
        return _line(self.service.command(buf[:end]))

    def on_eof(self, buf: bytes) -> bytes:  # a command without its newline still counts
        return _line(self.service.command(buf) if buf else {"error": "no command"})

    def on_timeout(self) -> bytes:
        return _line({"error": "timeout: send 'status' and a newline"})

    def on_busy(self) -> bytes:
        return _line({"error": "busy: too many status clients"})


class StatusService(SideListener):
    """The status socket of one daemon (``settings.status_socket``)."""

    kind = "status"
    connection = _StatusConnection

    def __init__(self, daemon: LookupDaemon) -> None:
        super().__init__(daemon, daemon.settings.status_socket)
        relay_counters(daemon)

    def command(self, line: bytes) -> dict[str, Any]:
        word = line.strip()
        if word != b"status":
            return {"error": f"unknown command {word[:40].decode('ascii', 'replace')!r}: "
                             "the only command is 'status'"}
        try:
            return snapshot(self.daemon)
        except Exception as exc:  # never take the socket (or the daemon) down
            log.exception("status snapshot failed")
            return {"error": f"status failed: {type(exc).__name__}"}


def make_service(daemon: LookupDaemon) -> StatusService | None:
    """The status socket if ``[serve] status_socket`` / ``--status-socket`` asks for one."""
    if daemon.settings.status_socket is None:
        return None
    return StatusService(daemon)


def query_status(endpoint: Endpoint | str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the running daemon at ``endpoint`` for its status (blocking).

    DaemonUnreachable when nothing listens there, it does not answer within ``timeout``, or
    the answer is not a JSON object; an ``{"error"}`` answer is raised the same way.  A
    socket the caller may not open raises it ``from`` the PermissionError (``__cause__``)."""
    ep = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
    deadline = time.monotonic() + timeout
    try:
        if ep.family == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = ep.path
        else:
            infos = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
            family, _type, _proto, _name, address = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise DaemonUnreachable(f"status socket {ep}: {exc.strerror or exc}") from None
    chunks: list[bytes] = []
    size = 0
    with sock:
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(b"status\n")
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise DaemonUnreachable(f"status socket {ep}: answer too long")
        except TimeoutError:
            raise DaemonUnreachable(f"status socket {ep}: no answer within {timeout:g} s"
                                    ) from None
        except PermissionError as exc:
            raise DaemonUnreachable(f"status socket {ep}: {exc.strerror or exc} (run as root "
                                    "or as a member of the daemon's socket_group)") from exc
        except OSError as exc:
            raise DaemonUnreachable(f"status socket {ep}: {exc.strerror or exc} (is torroute "
                                    "serve running with this status_socket?)") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise DaemonUnreachable(f"status socket {ep}: the answer is not JSON") from None
    if not isinstance(answer, dict):
        raise DaemonUnreachable(f"status socket {ep}: the answer is not a JSON object")
    if "error" in answer:
        raise DaemonUnreachable(f"status socket {ep}: {answer['error']}")
    return answer
