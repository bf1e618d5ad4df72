"""``torroute sink``: an onion-only inbox (SMTP -> Maildir) with quotas that refuse instead of
dying.  Imports only the standard library at module level; the sink is imported in :func:`run`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import global_options, tor_options

#: flag dest -> SinkSettings attribute (the same names as the [sink] keys)
SINK_FLAGS: tuple[str, ...] = (
    "maildir", "onion_dir", "ephemeral_key", "listen", "allow_remote", "domains", "hostname",
    "onion_port", "max_messages", "max_total_size", "max_message_size", "max_recipients",
    "max_sessions", "max_messages_per_session", "client_sessions", "global_messages",
    "rate_window", "idle_timeout", "command_timeout", "data_timeout", "stress_idle",
    "starttls", "tls_key", "tls_cert")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sink",
        parents=[global_options(), tor_options(socks=False, dns=False)],
        help="an onion-only inbox: SMTP into a Maildir, with quotas (see docs/sink.rst)",
        description="Take mail for its own onion (and --domain names) into a Maildir, fsynced "
        "before the 250; never relay.  With --onion-dir or --ephemeral-key it makes (or reuses) "
        "its onion service through tor's control port and prints the address; with --listen "
        "it sits behind an existing HiddenServicePort.  Over a quota it refuses (452/552/421/"
        "451) and keeps running.  Every flag is also a [sink] key.",
    )
    g = p.add_argument_group("sink options")
    g.add_argument("--maildir", metavar="DIR", help="the Maildir (made 0700 if missing)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--onion-dir", dest="onion_dir", metavar="DIR",
                       help="persistent onion service (HiddenServiceDir, saved in torrc)")
    where.add_argument("--ephemeral-key", dest="ephemeral_key", metavar="FILE",
                       help="ephemeral onion service (ADD_ONION) with this key (made if missing)")
    g.add_argument("--listen", metavar="inet:HOST:PORT|unix:PATH|HOST:PORT",
                   help="listen here (loopback or unix: unless --allow-remote); without "
                   "--onion-dir/--ephemeral-key: behind your own HiddenServicePort")
    g.add_argument("--allow-remote", action="store_true", default=None,
                   help="allow a non-loopback --listen address")
    g.add_argument("--domain", dest="domains", action="append", metavar="D",
                   help="a domain it is the MX for besides its onion (repeatable)")
    g.add_argument("--hostname", metavar="NAME", help="name in 220/EHLO (default: the onion)")
    g.add_argument("--onion-port", dest="onion_port", type=int, metavar="PORT",
                   help="the onion's virtual port (default 25)")
    q = p.add_argument_group("limits (sizes take K/M/G suffixes)")
    q.add_argument("--max-messages", type=int, metavar="N",
                   help="messages in the Maildir (new/+cur/) before 452 (default 10000)")
    q.add_argument("--max-total-size", metavar="SIZE",
                   help="bytes in the Maildir before 452 (default 1G)")
    q.add_argument("--max-message-size", metavar="SIZE",
                   help="one message (SIZE in EHLO; 552; default 25M)")
    q.add_argument("--max-recipients", type=int, metavar="N",
                   help="recipients per message (default 100)")
    q.add_argument("--max-sessions", type=int, metavar="N",
                   help="concurrent sessions before 421 at connect (default 300)")
    q.add_argument("--max-messages-per-session", type=int, metavar="N",
                   help="messages in one session before 451 (default 100)")
    q.add_argument("--client-sessions", type=int, metavar="N",
                   help="new sessions per --rate-window from one address before 421 "
                   "(default 60; over an onion every client is tor's address)")
    q.add_argument("--global-messages", type=int, metavar="N",
                   help="messages per --rate-window for all sessions before 451 (default 300)")
    q.add_argument("--rate-window", type=float, metavar="SECONDS", help="default 10")
    q.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                   help="no byte from the client this long: 421 (default 120)")
    q.add_argument("--command-timeout", type=float, metavar="SECONDS",
                   help="a complete command after our reply (default 300)")
    q.add_argument("--data-timeout", type=float, metavar="SECONDS",
                   help="the whole DATA phase (default 600)")
    q.add_argument("--stress-idle", type=float, metavar="SECONDS",
                   help="when full, a session idle this long is closed for a new one "
                   "(default 10)")
    t = p.add_argument_group("STARTTLS")
    t.add_argument("--starttls", action="store_true", default=None,
                   help="offer STARTTLS (a self-signed key is made if --tls-key is missing)")
    t.add_argument("--tls-key", metavar="FILE")
    t.add_argument("--tls-cert", metavar="FILE")
    p.set_defaults(run=run)


def _listen(value: str | None) -> str | None:
    """``HOST:PORT`` is accepted as ``inet:HOST:PORT``."""
    if value and not value.startswith(("inet:", "unix:")):
        return "inet:" + value
    return value


def sink_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sink flags given, as SinkSettings.from_config overrides (None: not given)."""
    values = {name: getattr(args, name, None) for name in SINK_FLAGS}
    values["listen"] = _listen(values["listen"])
    return values


def run(args: argparse.Namespace, config) -> int:
    import asyncio
    import logging

    from ..inbox.server import run_sink
    from ..inbox.settings import SinkSettings

    settings = SinkSettings.from_config(config, overrides=sink_overrides(args))
    logging.getLogger("torroute.inbox").setLevel(logging.DEBUG if args.verbose > 1
                                                 else logging.INFO)
    return asyncio.run(run_sink(settings, config.tor_control,
                                getattr(config, "tor_control_password", None)))
