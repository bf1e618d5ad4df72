"""``torroute proxy``: the tor-smtp HELO proxy for MTAs that can set a per-destination HELO.

Imports only the standard library at module level; the proxy is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import global_options, routing_options, tor_options

#: proxy flag dest -> ProxySettings override
PROXY_FLAGS: tuple[str, ...] = ("listen", "allow_remote", "max_sessions", "helo_name",
                                "banner_name", "command_timeout", "connect_timeout",
                                "remote_timeout", "handshake_timeout", "idle_timeout", "defer_at")


def register(subparsers) -> None:
    """global+routing+tor (SocksPort only: the proxy never asks tor's DNSPort or control
    port), and the proxy's own flags."""
    p = subparsers.add_parser(
        "proxy",
        parents=[global_options(), routing_options(), tor_options(dns=False, control=False)],
        help="tor-smtp HELO proxy: 'EHLO <local-name> <destination>' -> the onion MX over tor",
        description="The tor-smtp proxy of the Exim FAQ, for any MTA that can set a "
        "per-destination HELO string and a fixed relay port: it answers 220, reads 'EHLO "
        "<local-name> <destination>', routes the destination (an .onion as is, a domain by "
        "torroute's pins and SRV records), connects through tor, answers 421 when there is no "
        "onion route, tor fails or the remote's greeting is not 220, else sends EHLO "
        "<local-name> itself and splices the two connections.  STARTTLS never passes "
        "through.  Bind it to loopback only: it carries anyone's mail into tor.",
    )
    g = p.add_argument_group("proxy options")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--inetd", action="store_true",
                      help="one session on stdin/stdout (inetd, xinetd, systemd socket "
                      "activation with Accept=yes)")
    mode.add_argument("--listen", metavar="HOST:PORT",
                      help="listen for sessions (loopback only unless --allow-remote)")
    g.add_argument("--allow-remote", action="store_true", default=None,
                   help="allow --listen on a non-loopback address (never expose the proxy)")
    g.add_argument("--max-sessions", type=int, metavar="N",
                   help="concurrent sessions in --listen mode (default 20; more get 421)")
    g.add_argument("--helo-name", metavar="NAME",
                   help="present NAME in EHLO instead of the client's first word (the "
                   "original tor-smtp's first argument)")
    g.add_argument("--banner-name", metavar="NAME",
                   help="the name in the proxy's own 220 greeting (default localhost)")
    g.add_argument("--defer-at", choices=("ehlo", "rcpt"),
                   help="refuse a session that cannot be set up with 421 to the EHLO (ehlo, "
                   "default, as the original) or with 451 to every RCPT (rcpt: the MTA then "
                   "defers that address only, not every message for the proxy's host:port)")
    for flag, default, what in (("command", 300, "the client's EHLO line"),
                                ("connect", 90, "one dial through tor"),
                                ("remote", 60, "each remote reply before the splice"),
                                ("handshake", 240, "routing + dialing + remote greeting and "
                                 "EHLO answer together"),
                                ("idle", 600, "the splice without a byte either way")):
        g.add_argument(f"--{flag}-timeout", type=float, metavar="SECONDS",
                       help=f"{what} (default {default})")
    p.set_defaults(run=run)


def proxy_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The proxy flags given, as ProxySettings.from_config overrides (absent: [proxy] wins)."""
    return {name: value for name in PROXY_FLAGS
            if (value := getattr(args, name, None)) is not None}


def run(args: argparse.Namespace, config) -> int:
    import asyncio
    import logging
    import sys

    from .. import exitcodes
    from ..proxy.session import serve_listen, serve_stdio
    from ..proxy.settings import ProxySettings
    from ..routing.router import Router

    settings = ProxySettings.from_config(config, overrides=proxy_overrides(args))
    if not args.inetd and settings.listen is None:
        print("torroute proxy: give --inetd or --listen HOST:PORT (or proxy.listen in the "
              "configuration)", file=sys.stderr)
        return exitcodes.USAGE
    if args.inetd:
        protect_stdio()
    if not args.verbose:
        logging.getLogger("torroute.proxy").setLevel(logging.INFO)  # one line per session
    router = Router.from_config(config)  # a broken map: ConfigError -> 78 before any session
    try:
        if args.inetd:
            asyncio.run(serve_stdio(config, settings, router))
        else:
            asyncio.run(serve_listen(config, settings, router))
    except OSError as exc:
        print(f"torroute proxy: {exc}", file=sys.stderr)
        return exitcodes.CONFIG if not args.inetd else exitcodes.TEMPFAIL
    return exitcodes.OK


def protect_stdio() -> None:
    """inetd and xinetd hand the connection over as fds 0, 1 *and* 2: a log line or a
    traceback on stderr would go into the SMTP session.  Then logging goes to syslog and
    fd 2 to /dev/null.  (systemd: the unit sets StandardError=journal.)"""
    import logging
    import logging.handlers
    import os

    try:
        err, inp = os.fstat(2), os.fstat(0)
    except OSError:
        return
    if (err.st_dev, err.st_ino) != (inp.st_dev, inp.st_ino):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    try:
        handler: logging.Handler = logging.handlers.SysLogHandler(
            "/dev/log", logging.handlers.SysLogHandler.LOG_MAIL)
    except OSError:  # no syslog here: no log (the session matters more)
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("torroute-proxy[%(process)d]: %(levelname)s "
                                           "%(message)s"))
    root.addHandler(handler)
