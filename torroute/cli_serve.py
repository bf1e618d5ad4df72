"""``torroute serve``: the lookup daemon for Postfix (socketmap, tcp_table) and Exim (readsocket).

Imports only the standard library at module level; the daemon is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse

ENDPOINT = "inet:HOST:PORT|unix:PATH"


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "serve",
        parents=common,
        help="run the lookup daemon (Postfix socketmap/tcp_table, Exim readsocket, LMTP relay)",
        description="Answer route lookups from Postfix (socketmap_table(5), tcp_table(5)) and "
        "Exim (${readsocket}, torroute's line protocol) in one process, and relay what Postfix's "
        "lmtp client hands over (--lmtp).  SIGHUP reloads the configuration and maps without "
        "dropping connections (a broken file keeps the old ones; systemd's STATUS says so); "
        "SIGTERM drains and exits.  Listeners given here replace the [serve] listeners of the "
        "same kind; a missing socket directory named 'torroute' (/run/torroute) is created.",
    )
    p.add_argument("--socketmap", action="append", metavar=ENDPOINT,
                   help="Postfix socketmap listener (repeatable)")
    p.add_argument("--tcp-table", dest="tcp_table", action="append", metavar=ENDPOINT,
                   help="Postfix tcp_table listener (repeatable)")
    p.add_argument("--exim", action="append", metavar=ENDPOINT,
                   help="Exim readsocket line-protocol listener (repeatable)")
    p.add_argument("--lmtp", action="append", metavar=ENDPOINT,
                   help="LMTP relay listener for Postfix's lmtp client (repeatable): onion "
                   "routes are then answered '<lmtp_transport>:<first listener>' and the daemon "
                   "relays each message to the onion MX through tor (see docs/postfix.rst)")
    p.add_argument("--allow-remote", action="store_true", default=None,
                   help="allow inet listeners on non-loopback addresses (lookups are "
                   "unauthenticated)")
    p.add_argument("--transport", metavar="NAME",
                   help="Postfix transport name in answers (default torroute)")
    p.add_argument("--postfix-answer", metavar="TEMPLATE",
                   help="Postfix answer: 'torroute' ({transport}:[{onion}]:{port}, default), "
                   "'onionmx' (smtptor:[{onion}]) or a template")
    p.add_argument("--socket-mode", metavar="OCTAL", help="unix socket mode (default 0660)")
    p.add_argument("--socket-group", metavar="GROUP", help="unix socket group")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, config) -> int:
    import logging
    import sys

    from . import exitcodes
    from .config import load_config
    from .server import (
        LookupDaemon,
        ServeSettings,
        decision_line_writer,
        install_fast_logging,
        serve,
    )

    settings = ServeSettings.from_config(config, args)
    if not any(settings.listeners.values()):
        print("torroute serve: no listeners: give --socketmap, --tcp-table, --exim or "
              "--lmtp (or [serve] socketmap/tcp_table/exim/lmtp in the configuration)",
              file=sys.stderr)
        return exitcodes.USAGE
    if settings.log_decisions and not args.verbose:
        logging.getLogger("torroute.server").setLevel(logging.INFO)
    handler = install_fast_logging()

    def reload_config():
        return load_config(args.config, args)

    daemon = LookupDaemon(config, settings, reload_config=reload_config, args=args)
    daemon.write_line = decision_line_writer(handler)
    try:
        serve(daemon, settings.event_loop)
    except OSError as exc:
        print(f"torroute serve: cannot listen: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    return exitcodes.OK
