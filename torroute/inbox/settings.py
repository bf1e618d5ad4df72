"""The sink's settings: the ``[sink]`` table and the ``torroute sink`` flags (plain overrides).

Read with the one settings schema helper (:class:`torroute.config.Section`): a mistake reads
``FILE: sink.max_messages: ...`` or names the flag.  Every limit has a default that never
bothers a normal sender (a client may open 10 sessions in 5 s and send 100 messages in one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import Config, Section, boolean, normalize_domain
from ..endpoint import Endpoint
from ..errors import ConfigError
from ..routing.onion import is_onion_name

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(value: Any) -> int:
    """Bytes: a number, or ``"10M"``/``"300MB"``/``"1G"`` (powers of 1024)."""
    if isinstance(value, bool):
        raise ConfigError("expected a size in bytes")
    if isinstance(value, int):
        number = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ConfigError(f"{value!r}: expected a size like 10485760, 10M or 1G")
        number = int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()]
    if number <= 0:
        raise ConfigError("must be positive")
    return number


def positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError("expected a whole number")
    number = int(value)
    if number <= 0:
        raise ConfigError("must be positive")
    return number


def timeout(value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError("expected seconds")
    number = float(value)
    if number <= 0:
        raise ConfigError("must be positive")
    return number


def _path(value: Any) -> Path:
    path = Path(str(value))
    if not str(value):
        raise ConfigError("expected a path")
    return path


def _domains(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value)
    return tuple(normalize_domain(str(v)) for v in items)


SINK = Section("sink", {
    "maildir": _path,
    "onion_dir": _path,
    "ephemeral_key": _path,
    "listen": Endpoint.parse,
    "allow_remote": boolean,
    "domains": _domains,
    "hostname": str,
    "onion_port": lambda v: _port(v),
    "max_messages": positive_int,
    "max_total_size": size,
    "max_message_size": size,
    "max_recipients": positive_int,
    "max_sessions": positive_int,
    "max_messages_per_session": positive_int,
    "client_sessions": positive_int,
    "global_messages": positive_int,
    "rate_window": timeout,
    "idle_timeout": timeout,
    "command_timeout": timeout,
    "data_timeout": timeout,
    "stress_idle": timeout,
    "starttls": boolean,
    "tls_key": _path,
    "tls_cert": _path,
})


def _port(value: Any) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise ConfigError("out of range")
    return number


@dataclass(frozen=True)
class SinkSettings:
    """The ``[sink]`` table (documented in docs/sink.rst), with command-line overrides."""

    maildir: Path | None = None
    onion_dir: Path | None = None  # persistent onion service (HiddenServiceDir, SAVECONF)
    ephemeral_key: Path | None = None  # ADD_ONION with this key file (made if missing)
    listen: Endpoint | None = None
    allow_remote: bool = False
    domains: tuple[str, ...] = ()  # besides its own onion
    hostname: str = ""  # the name in 220/EHLO; default: the onion, else "localhost"
    onion_port: int = 25
    # quotas: the Maildir (recounted from the directory) and one message
    max_messages: int = 10000
    max_total_size: int = 1 << 30
    max_message_size: int = 25 << 20
    max_recipients: int = 100
    # sessions and rates
    max_sessions: int = 300
    max_messages_per_session: int = 100
    client_sessions: int = 60  # new sessions per rate_window from one peer address -> 421
    global_messages: int = 300  # messages per rate_window, all sessions together -> 451
    rate_window: float = 10.0
    # deadlines against slow clients
    idle_timeout: float = 120.0  # no byte from the client this long -> 421
    command_timeout: float = 300.0  # a complete command after our last reply (RFC 5321 4.5.3.2)
    data_timeout: float = 600.0  # from 354 to the final dot
    stress_idle: float = 10.0  # when full: a session idle this long makes room for a new one
    starttls: bool = False
    tls_key: Path | None = None
    tls_cert: Path | None = None

    @classmethod
    def from_config(cls, config: Config, overrides: Mapping[str, Any] | None = None
                    ) -> SinkSettings:
        """Read ``[sink]``; ``overrides`` ({attribute: value} from the flags; None = not
        given) win; a bad flag value names the flag."""
        values = SINK.read(config)
        names = {f.name for f in fields(cls)}
        for name, value in (overrides or {}).items():
            if name not in names:
                raise ConfigError(f"unknown sink override {name}")
            if value is None or value == [] or value is False:
                continue
            values[name] = SINK.coerce(name, value, "--" + name.replace("_", "-"))
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse what would leak or lose mail: no Maildir, two onion kinds, a wide listener
        without --allow-remote, STARTTLS without key paths."""
        if self.maildir is None:
            raise ConfigError("no Maildir: give --maildir DIR (or [sink] maildir)")
        if self.onion_dir is not None and self.ephemeral_key is not None:
            raise ConfigError("give --onion-dir or --ephemeral-key, not both")
        if self.onion_dir is None and self.ephemeral_key is None and self.listen is None:
            raise ConfigError("give --onion-dir DIR, --ephemeral-key FILE or --listen HOST:PORT")
        if self.listen is not None and not self.listen.is_loopback() and not self.allow_remote:
            raise ConfigError(f"--listen {self.listen}: not loopback; a sink listens on "
                              "loopback or unix: behind tor (add --allow-remote to mean it)")
        if self.starttls and (self.tls_key is None or self.tls_cert is None):
            raise ConfigError("--starttls needs --tls-key and --tls-cert (made if missing)")
        for d in self.domains:
            if not d or "." not in d and not is_onion_name(d):
                raise ConfigError(f"--domain {d!r}: not a domain name")

    @property
    def onion(self) -> bool:
        """Whether the sink makes its onion service itself (through tor's control port)."""
        return self.onion_dir is not None or self.ephemeral_key is not None
