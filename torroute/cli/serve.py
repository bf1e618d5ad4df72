"""``torroute serve``: the lookup daemon for Postfix (socketmap, tcp_table) and Exim (readsocket).

Imports only the standard library at module level; the daemon is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import global_options, routing_options, tor_options

ENDPOINT = "inet:HOST:PORT|unix:PATH"


#: serve flag dest -> ServeSettings override (listener kinds: lists of endpoints)
SERVE_FLAGS: tuple[str, ...] = ("socketmap", "tcp_table", "exim", "lmtp", "allow_remote",
                                "transport", "socket_group", "postfix_answer", "socket_mode",
                                "status_socket", "metrics")


def register(subparsers) -> None:
    """global+routing+tor, and the daemon's own listener/answer flags."""
    p = subparsers.add_parser(
        "serve",
        parents=[global_options(), routing_options(), tor_options()],
        help="run the lookup daemon (Postfix socketmap/tcp_table, Exim readsocket, LMTP relay)",
        description="Answer route lookups from Postfix (socketmap_table(5), tcp_table(5)) and "
        "Exim (${readsocket}, torroute's line protocol) in one process, and relay what Postfix's "
        "lmtp client hands over (--lmtp).  SIGHUP reloads the configuration and maps without "
        "dropping connections (a broken file keeps the old ones; systemd's STATUS says so); "
        "SIGTERM drains and exits.  Listeners given here replace the [serve] listeners of the "
        "same kind; a missing socket directory named 'torroute' (/run/torroute) is created.",
    )
    g = p.add_argument_group("serve options")
    g.add_argument("--socketmap", action="append", metavar=ENDPOINT,
                   help="Postfix socketmap listener (repeatable)")
    g.add_argument("--tcp-table", dest="tcp_table", action="append", metavar=ENDPOINT,
                   help="Postfix tcp_table listener (repeatable)")
    g.add_argument("--exim", action="append", metavar=ENDPOINT,
                   help="Exim readsocket line-protocol listener (repeatable)")
    g.add_argument("--lmtp", action="append", metavar=ENDPOINT,
                   help="LMTP relay listener for Postfix's lmtp client (repeatable): onion "
                   "routes are then answered '<lmtp_transport>:<first listener>' and the daemon "
                   "relays each message to the onion MX through tor (see docs/postfix.rst)")
    g.add_argument("--allow-remote", action="store_true", default=None,
                   help="allow inet listeners on non-loopback addresses (lookups are "
                   "unauthenticated)")
    g.add_argument("--transport", metavar="NAME",
                   help="Postfix transport name in answers (default torroute)")
    g.add_argument("--postfix-answer", metavar="TEMPLATE",
                   help="Postfix answer: 'torroute' ({transport}:[{onion}]:{port}, default), "
                   "'onionmx' (smtptor:[{onion}]) or a template")
    g.add_argument("--socket-mode", metavar="OCTAL", help="unix socket mode (default 0660)")
    g.add_argument("--socket-group", metavar="GROUP", help="unix socket group")
    g.add_argument("--status-socket", metavar=ENDPOINT,
                   help="status socket that `torroute status` asks (default: [serve] "
                   "status_socket, else none)")
    g.add_argument("--metrics", metavar=ENDPOINT,
                   help="Prometheus metrics over HTTP (GET /metrics) on this loopback or unix "
                   "endpoint (default: [serve] metrics, else none)")
    p.set_defaults(run=run)


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The serve flags given, as ServeSettings.from_config overrides (a flag left out keeps
    the [serve] value; as before, an empty value counts as not given): the daemon re-applies
    the same dict on SIGHUP."""
    return {name: value for name in SERVE_FLAGS if (value := getattr(args, name, None))}


def run(args: argparse.Namespace, config) -> int:
    import logging
    import sys

    from .. import exitcodes
    from ..daemon.logs import decision_line_writer, install_fast_logging
    from ..daemon.service import LookupDaemon, serve
    from ..daemon.settings import ServeSettings
    from .options import load_cli_config

    overrides = serve_overrides(args)
    settings = ServeSettings.from_config(config, overrides=overrides)
    if not any(settings.listeners.values()):
        print("torroute serve: no listeners: give --socketmap, --tcp-table, --exim or "
              "--lmtp (or [serve] socketmap/tcp_table/exim/lmtp in the configuration)",
              file=sys.stderr)
        return exitcodes.USAGE
    if settings.log_decisions and not args.verbose:
        logging.getLogger("torroute.daemon").setLevel(logging.INFO)  # every daemon module
    handler = install_fast_logging()

    def reload_config():
        return load_cli_config(args)  # the same --config and flags as at start

    daemon = LookupDaemon(config, settings, reload_config=reload_config, overrides=overrides)
    daemon.write_line = decision_line_writer(handler)
    try:
        serve(daemon, settings.event_loop)
    except OSError as exc:
        print(f"torroute serve: cannot listen: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    return exitcodes.OK
