"""Tor's client settings as torroute needs them: what is wrong (:func:`check_settings`), what
``torroute tor ensure`` changes (:func:`plan_ensure`), and the reports of ``tor status`` /
``tor ensure``.  Pure: :class:`~torroute.tor.control.Tor` reads the settings and applies the plan.

The plan only adds: a SETCONF of a multi-value option such as ``SocksPort`` replaces all of its
values, so every existing value is sent again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..endpoint import HostPort, format_hostport
from ..protocols.control import (
    Bootstrap,
    PortOption,
    port_address,
    same_address,
    setconf_command,
)
from .torrc import DEFAULT_VIRTUAL_NETWORK, ONION_SUFFIX

__all__ = ["TorSettings", "Problem", "suffixes_cover_onion", "check_settings", "plan_ensure",
           "Status", "EnsureResult"]


@dataclass
class TorSettings:
    """What torroute needs to know of tor's client configuration."""

    socks_ports: list[str] = field(default_factory=list)  # GETCONF SocksPort values
    dns_ports: list[str] = field(default_factory=list)
    socks_listeners: list[str] = field(default_factory=list)  # GETINFO net/listeners/socks
    dns_listeners: list[str] = field(default_factory=list)
    automap: bool = False
    suffixes: list[str] = field(default_factory=lambda: [".onion", ".exit"])
    virtual_network: str = DEFAULT_VIRTUAL_NETWORK
    disable_network: bool = False


@dataclass(frozen=True)
class Problem:
    """Something in tor's setup that stops (``error``) or hampers (``warning``) torroute."""

    option: str
    problem: str
    fix: str
    severity: str = "error"
    fixable: bool = True  # ``torroute tor ensure`` fixes it

    def line(self) -> str:
        return f"{self.severity}: {self.option}: {self.problem}; fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        return {"option": self.option, "severity": self.severity, "problem": self.problem,
                "fix": self.fix, "fixable": self.fixable}


def suffixes_cover_onion(suffixes: Iterable[str]) -> bool:
    """Does ``AutomapHostsSuffixes`` automap ``.onion`` names (tor matches by string suffix;
    ``.`` means every name)?"""
    return any(s == "." or (s and "x.onion".endswith(s.lower())) for s in suffixes)


def _listens(values: Sequence[str], listeners: Sequence[str], address: HostPort) -> bool:
    return any(same_address(port_address(v), address)
               for v in list(values) + list(listeners))


def _find_port(values: Sequence[str], address: HostPort) -> int | None:
    for i, value in enumerate(values):
        if same_address(port_address(PortOption.parse(value).address), address):
            return i
    return None


def _socks_values(settings: TorSettings) -> list[str]:
    """The SocksPort values in force; an unset SocksPort means tor's default (9050), which
    listens although GETCONF shows nothing: keep it when adding ours."""
    if settings.socks_ports:
        return list(settings.socks_ports)
    return list(settings.socks_listeners)


def check_settings(settings: TorSettings, config: Config) -> list[Problem]:
    """Every way tor's client settings fail torroute, each with its fix."""
    problems: list[Problem] = []
    socks, dns = config.tor_socks, config.tor_dns
    socks_s, dns_s = format_hostport(socks), format_hostport(dns)
    socks_values = _socks_values(settings)
    index = _find_port(socks_values, socks)
    if index is None and not _listens([], settings.socks_listeners, socks):
        have = ", ".join(settings.socks_listeners) or "none"
        problems.append(Problem(
            "SocksPort", f"tor has no SocksPort at {socks_s} (it listens on: {have})",
            f"torroute tor ensure, or add 'SocksPort {socks_s} ExtendedErrors' to torrc "
            "(or point [tor] socks at one of tor's SocksPorts)"))
    elif index is not None and not PortOption.parse(socks_values[index]).has_flag(
            "ExtendedErrors"):
        problems.append(Problem(
            "SocksPort", f"SocksPort {socks_s} lacks ExtendedErrors: onion failures all look "
            "like 'general failure' (mail still defers, but the reason is lost)",
            f"torroute tor ensure, or add the ExtendedErrors flag to 'SocksPort {socks_s}'",
            severity="warning"))
    if not _listens(settings.dns_ports, settings.dns_listeners, dns):
        have = ", ".join(settings.dns_listeners) or "none"
        problems.append(Problem(
            "DNSPort", f"tor has no DNSPort at {dns_s} (it listens on: {have}); the automap "
            "lookups (Exim, tor resolve) fail",
            f"torroute tor ensure, or add 'DNSPort {dns_s}' to torrc"))
    if not settings.automap:
        problems.append(Problem(
            "AutomapHostsOnResolve", "is 0: tor's DNSPort answers .onion names with an error "
            "instead of a virtual address",
            "torroute tor ensure, or add 'AutomapHostsOnResolve 1' to torrc"))
    if not suffixes_cover_onion(settings.suffixes):
        problems.append(Problem(
            "AutomapHostsSuffixes", f"{','.join(settings.suffixes) or '(empty)'} does not "
            "include .onion", "torroute tor ensure, or add .onion to AutomapHostsSuffixes"))
    if settings.virtual_network.strip() != config.virtual_network.strip():
        problems.append(Problem(
            "VirtualAddrNetworkIPv4", f"tor maps onions into {settings.virtual_network}, "
            f"torroute expects {config.virtual_network}",
            f"set virtual_network = \"{settings.virtual_network}\" in torroute's [tor] table",
            fixable=False))
    return problems


def plan_ensure(settings: TorSettings, config: Config) -> list[tuple[str, list[str]]]:
    """The SETCONF changes (option -> complete new value list) that make tor fit torroute.

    Only adds: every existing SocksPort/DNSPort value is kept (SETCONF replaces the whole list),
    an existing SocksPort at torroute's address only gains the ExtendedErrors flag.
    """
    changes: list[tuple[str, list[str]]] = []
    socks = config.tor_socks
    values = _socks_values(settings)
    index = _find_port(values, socks)
    if index is None and not _listens([], settings.socks_listeners, socks):
        new = [v for v in values if v.strip() != "0"]
        changes.append(("SocksPort", new + [f"{format_hostport(socks)} ExtendedErrors"]))
    elif index is not None:
        option = PortOption.parse(values[index])
        if not option.has_flag("ExtendedErrors"):
            new = list(values)
            new[index] = str(option.with_flag("ExtendedErrors"))
            changes.append(("SocksPort", new))
    if not _listens(settings.dns_ports, settings.dns_listeners, config.tor_dns):
        new = [v for v in settings.dns_ports if v.strip() != "0"]
        changes.append(("DNSPort", new + [format_hostport(config.tor_dns)]))
    if not settings.automap:
        changes.append(("AutomapHostsOnResolve", ["1"]))
    if not suffixes_cover_onion(settings.suffixes):
        changes.append(("AutomapHostsSuffixes", [",".join(settings.suffixes + [ONION_SUFFIX])]))
    return changes



# ---- the reports of torroute tor status / ensure


@dataclass
class Status:
    """``torroute tor status``: tor's state and whether its settings suit torroute."""

    control: str
    version: str
    bootstrap: Bootstrap
    network_liveness: str
    circuit_established: bool
    settings: TorSettings
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        """No setting problem that breaks torroute (warnings allowed)."""
        return not any(p.severity == "error" for p in self.problems)

    @property
    def ready(self) -> bool:
        """Onion mail can flow now: settings fine and tor connected to the network."""
        return self.ok and self.bootstrap.done and not self.settings.disable_network

    def runtime_notes(self) -> list[str]:
        notes = []
        if self.settings.disable_network:
            notes.append("DisableNetwork is 1: tor does not connect to the Tor network "
                         "(fix: SETCONF DisableNetwork=0 or remove it from torrc)")
        elif not self.bootstrap.done:
            why = f"; {self.bootstrap.warning}" if self.bootstrap.warning else ""
            notes.append(f"tor is not connected to the Tor network yet ({self.bootstrap.progress}%"
                         f": {self.bootstrap.summary}{why}): onion mail defers until it is")
        return notes

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "control": self.control, "version": self.version,
            "bootstrap": {"progress": self.bootstrap.progress, "tag": self.bootstrap.tag,
                          "summary": self.bootstrap.summary, "warning": self.bootstrap.warning},
            "network_liveness": self.network_liveness,
            "circuit_established": self.circuit_established,
            "disable_network": s.disable_network,
            "socks_ports": s.socks_ports, "socks_listeners": s.socks_listeners,
            "dns_ports": s.dns_ports, "dns_listeners": s.dns_listeners,
            "automap_hosts_on_resolve": s.automap, "automap_hosts_suffixes": s.suffixes,
            "virtual_network": s.virtual_network,
            "problems": [p.to_dict() for p in self.problems],
            "notes": self.runtime_notes(), "ok": self.ok, "ready": self.ready,
        }


@dataclass
class EnsureResult:
    changes: list[tuple[str, list[str]]]
    applied: bool
    saved: bool
    remaining: list[Problem]  # problems ensure cannot fix

    def to_dict(self) -> dict[str, Any]:
        return {"changes": [{"option": k, "values": v} for k, v in self.changes],
                "command": setconf_command(self.changes) if self.changes else None,
                "applied": self.applied, "saved": self.saved,
                "remaining": [p.to_dict() for p in self.remaining]}

