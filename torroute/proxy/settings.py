"""The proxy's settings: the ``[proxy]`` table and the ``torroute proxy`` flags (plain overrides:
the CLI turns flags into a dict, this module never sees argparse)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ..config import Config, Section, boolean, checked, choice, seconds, text
from ..endpoint import HostPort, is_loopback_host, parse_hostport
from ..errors import ConfigError
from ..protocols.heloproxy import DEFER_AT, valid_name


def _listen(value: Any) -> HostPort:
    return parse_hostport(text(value))


def _name(value: Any) -> str:
    name = text(value)
    if not valid_name(name):
        raise ConfigError(f"{name!r} is not a host name")
    return name


def _sessions(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("expected a whole number of at least 1")
    return value


PROXY = Section("proxy", {
    "listen": _listen,
    "allow_remote": boolean,
    "max_sessions": _sessions,
    "helo_name": _name,
    "banner_name": _name,
    "command_timeout": seconds,
    "connect_timeout": seconds,
    "remote_timeout": seconds,
    "handshake_timeout": seconds,
    "idle_timeout": seconds,
    "isolate_streams": boolean,
    "defer_at": choice(*DEFER_AT),
})

#: override key -> the flag named in errors
FLAGS: dict[str, str] = {name: "--" + name.replace("_", "-") for name in PROXY.attributes}


@dataclass(frozen=True)
class ProxySettings:
    """What one proxy process does; every wait has its deadline.

    The defaults fit Exim's smtp transport (``command_timeout`` 5m): routing, dialing, the
    remote's greeting and its EHLO answer together take at most ``handshake_timeout`` (4 min),
    so the 421 with the reason arrives before the MTA gives up on its own.
    """

    listen: HostPort | None = None
    allow_remote: bool = False
    max_sessions: int = 20
    helo_name: str | None = None  # replaces the client's first EHLO word (the original's argv)
    banner_name: str = "localhost"
    command_timeout: float = 300.0  # the client's EHLO line (RFC 5321 4.5.3.2: 5 min)
    connect_timeout: float = 90.0  # one dial through tor (onion circuits are slow)
    remote_timeout: float = 60.0  # the remote's greeting, then its EHLO answer
    handshake_timeout: float = 240.0  # from the client's EHLO to the relayed answer
    idle_timeout: float = 600.0  # splice: no byte either way (RFC 5321: 10 min for DATA)
    isolate_streams: bool = False  # one tor circuit per destination (IsolateSOCKSAuth)
    #: a failed session: "ehlo" 421 to the EHLO (the FAQ's way), "rcpt" 451 to each RCPT
    #: (see HeloProxy: an MTA holds back the whole proxy host after a 421)
    defer_at: str = "ehlo"

    @classmethod
    def from_config(cls, config: Config, overrides: Mapping[str, Any] | None = None
                    ) -> ProxySettings:
        """``[proxy]`` of ``config``, then ``overrides`` (flag values by setting name) win."""
        values: dict[str, Any] = {"isolate_streams": config.isolate_streams}
        values.update(PROXY.read(config))
        for name, value in (overrides or {}).items():
            if name not in PROXY.attributes:
                raise ConfigError(f"unknown proxy setting {name!r}")
            values[name] = PROXY.coerce(name, value, FLAGS[name])
        settings = replace(cls(), **values)
        settings.check()
        return settings

    def check(self) -> None:
        """A listener on a non-loopback address only with ``allow_remote``: the proxy would
        carry anyone's mail into tor (it must never be reachable from outside)."""
        if self.listen is not None and not self.allow_remote \
                and not is_loopback_host(self.listen[0]):
            raise ConfigError(f"--listen {self.listen[0]}: not a loopback address; the proxy "
                              "must never be reachable by others (--allow-remote / "
                              "proxy.allow_remote = true to insist)")
        checked(_sessions, self.max_sessions, "--max-sessions")


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ProxySettings))
