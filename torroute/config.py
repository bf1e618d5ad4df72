"""Configuration: one TOML file plus command-line flags (flags win).

Defaults follow Debian's tor package: SocksPort 9050, ControlSocket /run/tor/control.  Debian's
torrc has no DNSPort; torroute expects ``DNSPort 127.0.0.1:9053`` (``torroute torrc`` prints it).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .endpoint import HostPort, parse_hostport
from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/torroute/torroute.toml")


@dataclass
class Config:
    """Everything the routing core and the tor clients need; other modules read their own tables
    through :meth:`section`."""

    maps: list[Path] = field(default_factory=list)
    #: None = the system resolver (/etc/resolv.conf); tests always pass loopback nameservers.
    nameservers: list[HostPort] | None = None
    local_domains: list[str] = field(default_factory=list)
    ignore_domains: list[str] = field(default_factory=list)
    require_dnssec: bool = False
    dns_timeout: float = 5.0
    srv_service: str = "_onion-mx._tcp"
    cache_size: int = 10_000
    negative_ttl: int = 300  # when a negative answer carries no SOA
    max_ttl: int = 86_400
    default_port: int = 25
    #: a v2 pin (a dead service): "unpinned" ignores it (warning once per load), "defer" defers
    v2_pins: str = "unpinned"
    tor_socks: HostPort = ("127.0.0.1", 9050)
    tor_dns: HostPort = ("127.0.0.1", 9053)
    tor_control: str = "unix:/run/tor/control"
    tor_control_password: str | None = None
    virtual_network: str = "127.192.0.0/10"  # tor's VirtualAddrNetworkIPv4
    socks_timeout: float = 120.0
    isolate_streams: bool = False
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """The raw TOML table ``[name]`` (empty if absent), for modules with their own settings."""
        value = self.raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.path}: [{name}] must be a table")
        return value


# -- settings tables: one schema helper for Config, [serve] and [deliver] ---------------------
#: A setting's check: the TOML value -> the value to use.  It raises ConfigError, ValueError or
#: TypeError saying only what is wrong with the value; :class:`Section` names file and key.
Coercer = Callable[[Any], Any]


class Section:
    """The schema of one TOML table: key -> coercer, or key -> (attribute, coercer) when the
    attribute it sets has another name (``[tor] socks`` -> ``tor_socks``).

    Why one helper: every table is read the same way, so every mistake reads the same:
    ``FILE: unknown setting serve.nonsense``, ``FILE: routing.dns_timeout: must be positive``.
    Defaults stay with the class the values go to (a dataclass's fields); :meth:`read`
    returns only the keys the file sets.
    """

    def __init__(self, name: str, keys: dict[str, Coercer | tuple[str, Coercer]]) -> None:
        self.name = name
        self.keys: dict[str, tuple[str, Coercer]] = {
            key: spec if isinstance(spec, tuple) else (key, spec) for key, spec in keys.items()
        }
        self.attributes: dict[str, Coercer] = dict(self.keys.values())

    def read(self, config: Config, source: str | None = None) -> dict[str, Any]:
        """{attribute: checked value} for each key ``[name]`` of ``config`` sets; ``source``
        names the file in errors (default ``config.path``)."""
        where = source or str(config.path or "config")
        table = config.raw.get(self.name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{self.name}] must be a table")
        unknown = sorted(set(table) - set(self.keys))
        if unknown:
            names = ", ".join(f"{self.name}.{key}" for key in unknown)
            raise ConfigError(f"{where}: unknown setting{'s' if len(unknown) > 1 else ''} {names}")
        values: dict[str, Any] = {}
        for key, value in table.items():
            attr, coerce = self.keys[key]
            values[attr] = checked(coerce, value, f"{where}: {self.name}.{key}")
        return values

    def coerce(self, attr: str, value: Any, label: str) -> Any:
        """One value for attribute ``attr`` from elsewhere (a keyword, a flag named ``label``)."""
        return checked(self.attributes[attr], value, label)


def checked(coerce: Coercer, value: Any, label: str) -> Any:
    try:
        return coerce(value)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc}") from None


# the coercers the tables share
def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError("expected true or false")
    return value


def positive(value: Any) -> float:
    number = float(value)
    if number <= 0:
        raise ConfigError("must be positive")
    return number


def seconds(value: Any) -> float:
    """A strict positive number (no strings, no booleans)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError("expected a positive number of seconds")
    return float(value)


def text(value: Any) -> str:
    """A strict string (``str`` converts anything, ``text`` refuses what is not one)."""
    if not isinstance(value, str):
        raise ConfigError("expected a string")
    return value


def count(value: Any) -> int:
    number = int(value)
    if number < 0:
        raise ConfigError("out of range")
    return number


def port(value: Any) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise ConfigError("out of range")
    return number


def choice(*options: str) -> Coercer:
    def check(value: Any) -> str:
        if value not in options:
            raise ConfigError("expected " + " or ".join(f'"{o}"' for o in options))
        return value

    return check


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _paths(value: Any) -> list[Path]:
    return [Path(v) for v in _as_list(value)]


def _nameservers(value: Any) -> list[HostPort]:
    return [parse_hostport(str(v), 53) for v in _as_list(value)]


def _domain_patterns(value: Any) -> list[str]:
    return [domain_pattern(str(v)) for v in _as_list(value)]


def _hostport(value: Any) -> HostPort:
    return parse_hostport(str(value))


ROUTING = Section("routing", {
    "maps": _paths,
    "nameservers": _nameservers,
    "local_domains": _domain_patterns,
    "ignore_domains": _domain_patterns,
    "require_dnssec": boolean,
    "dns_timeout": positive,
    "srv_service": str,
    "cache_size": count,
    "negative_ttl": count,
    "max_ttl": count,
    "default_port": port,
    "v2_pins": choice("unpinned", "defer"),
})
TOR = Section("tor", {
    "socks": ("tor_socks", _hostport),
    "dns": ("tor_dns", _hostport),
    "control": ("tor_control", str),
    "control_password": ("tor_control_password", str),
    "virtual_network": str,
    "socks_timeout": positive,
    "isolate_streams": boolean,
})
#: the tables Config itself reads
CONFIG_SECTIONS: tuple[Section, ...] = (ROUTING, TOR)
_CONFIG_ATTRIBUTES: dict[str, Section] = {
    attr: section for section in CONFIG_SECTIONS for attr in section.attributes
}


def normalize_domain(domain: str) -> str:
    """Lowercase ASCII (IDNA A-label) form without a trailing dot; raises ValueError."""
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        raise ValueError("empty domain")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"{domain!r} is not a valid internationalized domain: {exc}") from None
    if len(domain) > 253:
        raise ValueError("domain longer than 253 characters")
    for label in domain.split("."):
        if not label or len(label) > 63:
            raise ValueError(f"{domain!r}: empty or over-long label")
        if label.startswith("-") or label.endswith("-"):
            raise ValueError(f"{domain!r}: a label starts or ends with '-'")
        if not all(c.isalnum() or c in "-_" for c in label):
            raise ValueError(f"{domain!r}: invalid character in a label")
    return domain


def domain_matches(domain: str, patterns: list[str]) -> bool:
    """Exact match, or a pattern with a leading dot matching subdomains (Postfix style): the one
    rule for local_domains, ignore_domains and [deliver] scrub_senders."""
    for pattern in patterns:
        if domain == pattern or (pattern.startswith(".") and domain.endswith(pattern)):
            return True
    return False


def domain_pattern(text: str) -> str:
    """A domain, or ``.domain`` for its subdomains (Postfix style), normalised."""
    text = text.strip()
    if text.startswith("."):
        return "." + normalize_domain(text[1:])
    return normalize_domain(text)


def default_config_path() -> tuple[Path, bool]:
    """The configuration file to read and whether it must exist: ``TORROUTE_CONFIG`` (it must),
    else /etc/torroute/torroute.toml (if present), as the CLI's ``--config`` default."""
    env = os.environ.get("TORROUTE_CONFIG")
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


#: load_config's keyword overrides: the Config attributes a TOML key sets
OVERRIDE_KEYS: frozenset[str] = frozenset(_CONFIG_ATTRIBUTES)
#: the tables other modules read through Config.section (given whole, checked by their reader)
OTHER_TABLES: tuple[str, ...] = ("deliver", "serve", "sink", "proxy")


def load_config(path: Path | str | None = None, **overrides: Any) -> Config:
    """Read the TOML file and apply overrides: the library's one way to get a :class:`Config`.

    ``path`` None means ``TORROUTE_CONFIG`` (which must exist), else
    /etc/torroute/torroute.toml if present, else the defaults.  ``overrides`` are the TOML
    settings by their :class:`Config` name (``maps=[...]``, ``nameservers=["127.0.0.1:53"]``,
    ``tor_socks="127.0.0.1:9050"``), checked with the file's coercion, or a whole other table
    by name (``deliver={"time_limit": 60}``); they replace the file's values.  Unknown names
    and bad values raise :class:`~torroute.errors.ConfigError`.  (The CLI applies its flags
    with :func:`apply_overrides` afterwards: torroute.cli.options.)
    """
    explicit = path is not None
    if path is None:
        cfg_path, explicit = default_config_path()
    else:
        cfg_path = Path(path)
    config = Config()
    data: dict[str, Any] = {}
    if explicit or cfg_path.exists():
        try:
            with open(cfg_path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {cfg_path} does not exist") from None
        except PermissionError:
            raise ConfigError(f"config file {cfg_path}: permission denied") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {cfg_path}: {exc}") from None
        config.path = cfg_path
    config.raw = data
    for section in CONFIG_SECTIONS:
        for attr, value in section.read(config, str(cfg_path)).items():
            setattr(config, attr, value)
    if config.path is not None:  # relative map paths are relative to the config file
        config.maps = [config.path.parent / p for p in config.maps]
    if overrides:
        apply_overrides(config, overrides)
    return config


def _keyword_label(name: str) -> str:
    return f"load_config({name}=...)"


def apply_overrides(config: Config, overrides: dict[str, Any],
                    where: Callable[[str], str] = _keyword_label) -> None:
    """``load_config``'s keywords: a setting by its Config name (map paths stay as given:
    relative to the working directory, like the CLI's ``--map``), or another table whole.
    ``where`` names a setting in error messages (the CLI: its flag)."""
    for name, value in overrides.items():
        if name in OVERRIDE_KEYS:
            setattr(config, name, _CONFIG_ATTRIBUTES[name].coerce(name, value, where(name)))
        elif name in OTHER_TABLES and isinstance(value, dict):
            # a table other modules read and check through Config.section
            config.raw = {**config.raw, name: dict(value)}
        else:
            raise ConfigError(f"load_config: unknown setting {name!r} (expected one of "
                              f"{', '.join(sorted(OVERRIDE_KEYS))}, or a table: "
                              f"{', '.join(f'{t}={{...}}' for t in OTHER_TABLES)})")
