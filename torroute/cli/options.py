"""Option groups shared by the subcommands, and the one place flags become settings.

Each subcommand declares only the groups it uses (``parents=[GLOBAL, ROUTING, TOR]``), so
``--help`` lists what the command reads and a flag it would ignore is an unknown option.
Library classes never see the argparse Namespace: :func:`config_overrides` turns the routing
and tor flags into :func:`torroute.config.apply_overrides` keywords, and the serve/deliver
commands build their own plain dicts.  Standard library only at import time: the ``deliver``
fast path builds its parser from here once per message.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

#: routing flag dest -> Config attribute (the same name: they mirror the TOML keys)
ROUTING_DESTS: tuple[str, ...] = ("maps", "nameservers", "local_domains", "ignore_domains",
                                  "require_dnssec", "dns_timeout")
TOR_DESTS: tuple[str, ...] = ("tor_socks", "tor_dns", "tor_control")


def global_options() -> argparse.ArgumentParser:
    """``--config`` and ``-v``: every command that reads the configuration."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("global options")
    group.add_argument(
        "--config", metavar="FILE", default=os.environ.get("TORROUTE_CONFIG"),
        help="TOML configuration (default $TORROUTE_CONFIG, else /etc/torroute/torroute.toml "
        "if present)",
    )
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="more log output (-vv: debug)")
    return parent


def routing_options() -> argparse.ArgumentParser:
    """How a domain is routed: maps, DNS (SRV) and the domains never routed over Tor."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("routing options")
    group.add_argument("--map", dest="maps", action="append", metavar="FILE",
                       help="pinned map: onionmx map.yml, a directory of them, or a text map")
    group.add_argument("--nameserver", dest="nameservers", action="append",
                       metavar="HOST:PORT", help="DNS server for SRV lookups (repeatable)")
    group.add_argument("--local-domain", dest="local_domains", action="append", metavar="D",
                       help="a domain delivered locally: never routed over Tor (repeatable)")
    group.add_argument("--ignore-domain", dest="ignore_domains", action="append", metavar="D",
                       help="a domain never routed over Tor (repeatable)")
    group.add_argument("--require-dnssec", action="store_true", default=None,
                       help="accept SRV answers only with the AD bit from the resolver")
    group.add_argument("--dns-timeout", type=float, metavar="SECONDS")
    return parent


def tor_options(socks: bool = True, dns: bool = True, control: bool = True
                ) -> argparse.ArgumentParser:
    """tor's ports; a command that talks to only some of them takes only those flags."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("tor options")
    if socks:
        group.add_argument("--tor-socks", metavar="HOST:PORT",
                           help="tor SocksPort (default 9050)")
    if dns:
        group.add_argument("--tor-dns", metavar="HOST:PORT", help="tor DNSPort (default 9053)")
    if control:
        group.add_argument("--tor-control", metavar="unix:PATH|inet:HOST:PORT",
                           help="tor control port (default unix:/run/tor/control)")
    return parent


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The routing/tor flags given on the command line, as Config overrides (an absent flag,
    an empty list or an unset switch leaves the file's value)."""
    overrides: dict[str, Any] = {}
    for name in ROUTING_DESTS + TOR_DESTS:
        value = getattr(args, name, None)
        if value is None or value == [] or value is False:
            continue
        overrides[name] = value
    return overrides


def _flag_name(name: str) -> str:
    """The label an error names (as before the split: ``--tor-socks``, ``--nameservers``)."""
    return "--" + name.replace("_", "-")


def load_cli_config(args: argparse.Namespace):
    """``load_config(--config)`` with the command-line flags applied last (flags win); a bad
    flag value is reported by its flag name."""
    from ..config import apply_overrides, load_config

    config = load_config(getattr(args, "config", None))
    overrides = config_overrides(args)
    if overrides:
        apply_overrides(config, overrides, where=_flag_name)
    return config
