"""The daemon's settings: the ``[serve]`` table (see contrib/torroute.toml) and the serve flags.

Read with the one settings schema helper (:class:`torroute.config.Section`), so a mistake reads
as everywhere else: ``FILE: unknown setting serve.x``, ``FILE: serve.max_request: ...``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, Section, boolean
from ..endpoint import Endpoint
from ..errors import ConfigError
from ..protocols import DEFAULT_MAX_REQUEST, ProtocolError, check_template, postfix_value

#: The listener kinds, in the order the daemon starts them.
KINDS = ("socketmap", "tcp_table", "exim", "lmtp")


def _endpoints(value: Any) -> tuple[Endpoint, ...]:
    """One endpoint string or a list of them."""
    return tuple(Endpoint.parse(v) for v in ([value] if isinstance(value, str) else value))


def _socket_mode(value: Any) -> int:
    """An octal string ("0660") or a number."""
    if not isinstance(value, str):
        return int(value)
    try:
        return int(value, 8)
    except ValueError:
        raise ConfigError(f"{value!r}: not octal") from None


SERVE = Section("serve", {
    **{kind: _endpoints for kind in KINDS},
    "allow_remote": boolean,
    "socket_mode": _socket_mode,
    "socket_group": lambda value: value or None,
    "transport": str,
    "postfix_answer": lambda value: check_template(str(value)),
    "max_request": int,
    "automap_timeout": float,
    "drain_timeout": float,
    "max_connections": int,
    "log_decisions": boolean,
    "event_loop": str,
    "lmtp_transport": str,
    "lmtp_idle_timeout": float,
    "lmtp_time_limit": float,
    "lmtp_max_size": int,
    "lmtp_session_idle_timeout": float,
    "lmtp_max_per_onion": int,
    "lmtp_max_waiting_per_onion": int,
    "lmtp_per_onion": boolean,
    # operating (docs/operating.rst): status socket, metrics, canaries, self-healing
    "status_socket": lambda value: Endpoint.parse(value) if value else None,
    "metrics": lambda value: Endpoint.parse(value) if value else None,
    "canary": lambda value: tuple([value] if isinstance(value, str) else value),
    "canary_interval": float,
    "canary_timeout": float,
    "heal": boolean,
    "heal_interval": float,
    "heal_window": float,
})

#: ServeSettings.from_config overrides (the serve flags) -> the flag named in errors
OVERRIDES: dict[str, str] = {
    **{kind: f"--{kind.replace('_', '-')}" for kind in KINDS},
    "allow_remote": "--allow-remote",
    "transport": "--transport",
    "socket_group": "--socket-group",
    "postfix_answer": "--postfix-answer",
    "socket_mode": "--socket-mode",
    "status_socket": "--status-socket",
    "metrics": "--metrics",
}


@dataclass(frozen=True)
class ServeSettings:
    """The ``[serve]`` table (see contrib/torroute.toml), with command-line overrides."""

    listeners: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    allow_remote: bool = False
    socket_mode: int = 0o660
    socket_group: str | None = None
    transport: str = "torroute"
    postfix_answer: str = "{transport}:[{onion}]:{port}"
    max_request: int = DEFAULT_MAX_REQUEST
    automap_timeout: float = 2.0
    drain_timeout: float = 10.0
    max_connections: int = 4096
    log_decisions: bool = True
    event_loop: str = "auto"  # "auto" (uvloop if installed), "uvloop", "asyncio"
    # LMTP relay mode (see docs/postfix.rst): with an lmtp listener, onion routes are
    # answered "{lmtp_transport}:<listener>" and the daemon relays what Postfix hands it
    lmtp_transport: str = "torroute-lmtp"
    lmtp_idle_timeout: float = 10.0  # keep relay connections to an onion this long unused
    lmtp_time_limit: float = 540.0  # per transaction; below Postfix's lmtp_data_done_timeout
    lmtp_max_size: int = 64 * 1024 * 1024
    # an LMTP session without a command this long gets 421 and is closed; above Postfix's
    # lmtp_connection_cache_time_limit (2 s), so a connection Postfix caches is never cut
    lmtp_session_idle_timeout: float = 10.0
    # fairness (docs/postfix.rst): connections in use per onion at once, and transactions
    # queued per onion beyond that (more are answered 4xx at once: a slow onion holds at most
    # the sum of Postfix's lmtp agents)
    lmtp_max_per_onion: int = 48
    lmtp_max_waiting_per_onion: int = 16
    # one Postfix destination per onion (a symlink per onion to the unix LMTP socket, see
    # daemon/lmtp_links.py): Postfix's per-destination concurrency then applies per onion
    lmtp_per_onion: bool = True
    # operating (docs/operating.rst)
    status_socket: Endpoint | None = None  # where `torroute status` asks the running daemon
    metrics: Endpoint | None = None  # Prometheus /metrics over HTTP
    canary: tuple[str, ...] = ()  # onion[:port] targets dialed every canary_interval
    canary_interval: float = 300.0
    canary_timeout: float = 60.0
    heal: bool = True  # NEWNYM when tor's client is stuck (evidence: several onions)
    heal_interval: float = 600.0  # at most one NEWNYM this often
    heal_window: float = 900.0  # how far back the evidence counts

    @classmethod
    def from_config(cls, config: Config, overrides: Mapping[str, Any] | None = None
                    ) -> ServeSettings:
        """Read ``[serve]``; ``overrides`` (the CLI's flags: listener kinds as lists of
        endpoint strings, ``allow_remote``, ``transport``, ``socket_group``, ``postfix_answer``,
        ``socket_mode`` as an octal string) win, a listener kind replacing the file's; an
        empty or false value counts as not given (so a flag can only allow remote
        listeners, never forbid them: false leaves it to the file)."""
        flags = {name: value for name, value in (overrides or {}).items() if value}
        unknown_flags = set(overrides or {}) - set(OVERRIDES)
        if unknown_flags:
            raise ConfigError(f"unknown serve override(s) {', '.join(sorted(unknown_flags))}")
        values = SERVE.read(config)
        for name, value in flags.items():
            values[name] = SERVE.coerce(name, value, OVERRIDES[name])
        listeners = {kind: values.pop(kind, ()) for kind in KINDS}
        settings = cls(listeners=listeners, **values)
        settings.check()
        return settings

    def check(self) -> None:
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(f"socket_mode {oct(self.socket_mode)} out of range")
        if not 64 <= self.max_request <= 1 << 20:
            raise ConfigError("max_request must be between 64 and 1048576")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ConfigError("event_loop must be 'auto', 'uvloop' or 'asyncio'")
        if self.automap_timeout <= 0 or self.drain_timeout < 0 or self.max_connections < 1:
            raise ConfigError("automap_timeout, drain_timeout and max_connections must be positive")
        try:
            postfix_value(self.postfix_answer, self.transport, "a" * 56 + ".onion", 25)
        except ProtocolError as exc:
            raise ConfigError(f"transport {self.transport!r}: {exc}") from None
        if self.lmtp_idle_timeout < 0 or self.lmtp_time_limit <= 0 or self.lmtp_max_size < 1024:
            raise ConfigError("lmtp_idle_timeout, lmtp_time_limit, lmtp_max_size out of range")
        if not self.lmtp_session_idle_timeout > 0:
            raise ConfigError("lmtp_session_idle_timeout must be positive")
        if self.lmtp_max_per_onion < 1 or self.lmtp_max_waiting_per_onion < 0:
            raise ConfigError("lmtp_max_per_onion must be >= 1, lmtp_max_waiting_per_onion "
                              ">= 0")
        if self.lmtp_answer is not None and not _LMTP_ANSWER.fullmatch(self.lmtp_answer):
            raise ConfigError(f"lmtp_transport/listener give an unusable Postfix answer "
                              f"{self.lmtp_answer!r}")
        if self.canary_interval < 1 or self.canary_timeout <= 0:
            raise ConfigError("canary_interval must be at least 1 s, canary_timeout positive")
        if self.heal_interval <= 0 or self.heal_window <= 0:
            raise ConfigError("heal_interval and heal_window must be positive")
        from .health import check_canaries  # ONION.onion[:PORT], v3 only

        try:
            check_canaries(self.canary)
        except ConfigError as exc:
            raise ConfigError(f"serve.canary: {exc}") from None
        if not self.allow_remote:
            extra = {name: (ep,) for name, ep in (("status_socket", self.status_socket),
                                                   ("metrics", self.metrics)) if ep}
            for kind, endpoints in {**self.listeners, **extra}.items():
                for ep in endpoints:
                    if not ep.is_loopback():
                        raise ConfigError(
                            f"{kind} listener {ep} is not a loopback address: lookups are "
                            "unauthenticated; pass --allow-remote (allow_remote = true) if you "
                            "really mean it"
                        )

    @property
    def lmtp_answer(self) -> str | None:
        """The transport_maps answer for every onion route in LMTP mode, e.g.
        ``torroute-lmtp:unix:/run/torroute/lmtp.sock``; None without an lmtp listener."""
        endpoints = self.listeners.get("lmtp", ())
        if not endpoints:
            return None
        return f"{self.lmtp_transport}:{endpoints[0]}"


# A constant from the configuration, never request text; unlike route values it has a '/'.
_LMTP_ANSWER = re.compile(r"[A-Za-z0-9._-]{1,64}:(unix:/[A-Za-z0-9._/-]{1,500}|"
                                        r"inet:[A-Za-z0-9.:\[\]-]{1,300})")
