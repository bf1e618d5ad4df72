"""One Postfix LMTP destination per onion: a symlink per onion to the daemon's one LMTP socket.

Why: Postfix applies ``torroute-lmtp_destination_concurrency_limit`` per nexthop.  With every
onion answered ``torroute-lmtp:unix:/run/torroute/lmtp.sock`` all onions share one limit, so
the relay's per-onion gates must answer a burst beyond ``lmtp_max_per_onion`` +
``lmtp_max_waiting_per_onion`` "451 busy" (Postfix then backs off, 300 s by default) to keep a
slow onion from holding every agent.  Answering ``unix:/run/torroute/lmtp.d/<label>`` (a link
to the same socket) gives each onion its own Postfix destination: Postfix's own queue and
per-destination concurrency then share the agents between onions.

Fail safe: a link that cannot be made answers the shared socket (the behaviour before), with
one warning; nothing is refused or misrouted.  Labels are validated v3 onions (base32), so a
link name never leaves the directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: sun_path holds 108 bytes with the terminating NUL
_SUN_PATH_MAX = 107
_LABEL = 56


class OnionLinks:
    """``<socket dir>/<socket stem>.d/<onion label>`` -> the LMTP socket, made on first use."""

    def __init__(self, socket_path: str | Path) -> None:
        self.socket = str(socket_path)
        sock = Path(socket_path)
        self.directory = sock.parent / f"{sock.stem}.d"
        self.made: dict[str, str] = {}  # onion -> link path
        self.disabled: str | None = None  # why links are not used (None: they are)

    def prepare(self) -> OnionLinks:
        """Create the directory and drop stale links to our socket (from an earlier run)."""
        if len(f"{self.directory}/{'a' * _LABEL}".encode()) > _SUN_PATH_MAX:
            return self._disable(f"{self.directory}/<onion> would be longer than a unix "
                                 "socket path may be")
        try:
            self.directory.mkdir(mode=0o755, exist_ok=True)
            if self.directory.is_symlink() or not self.directory.is_dir():
                return self._disable(f"{self.directory} is not a directory")
            for entry in os.scandir(self.directory):
                if entry.is_symlink() and os.readlink(entry.path) == self.socket:
                    os.unlink(entry.path)
        except OSError as exc:
            return self._disable(f"{self.directory}: {exc.strerror or exc}")
        return self

    def path(self, onion: str) -> str | None:
        """The link for ``onion`` (``<56>.onion``, validated), made if need be; None: use the
        shared socket."""
        link = self.made.get(onion)
        if link is not None or self.disabled is not None:
            return link
        label = onion[:-len(".onion")] if onion.endswith(".onion") else onion
        if len(label) != _LABEL or not label.isalnum() or not label.islower():
            return None
        link = f"{self.directory}/{label}"
        try:
            os.symlink(self.socket, link)
        except FileExistsError:
            try:
                if os.readlink(link) != self.socket:
                    os.unlink(link)
                    os.symlink(self.socket, link)
            except OSError as exc:
                self._disable(f"{link}: {exc.strerror or exc}")
                return None
        except OSError as exc:
            self._disable(f"{link}: {exc.strerror or exc}")
            return None
        self.made[onion] = link
        return link

    def _disable(self, why: str) -> OnionLinks:
        self.disabled = why
        log.warning("lmtp: no per-onion Postfix destinations (%s); every onion is answered "
                    "the shared socket %s, and Postfix's concurrency limit then counts all "
                    "onions together", why, self.socket)
        return self
