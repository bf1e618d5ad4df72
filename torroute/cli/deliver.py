"""``torroute deliver``: the Postfix pipe(8) delivery program (see torroute.delivery.pipe).

Postfix bounces mail on any exit status but 0 and 75, so this command must never exit 64 (usage),
78 (configuration) or 1 (a traceback): every failure of its own is printed as ``4.3.x ...`` and
exits 75 (defer).  Its exit statuses: 0 delivered (and ``--help``), 75 deferred, 69 bounced.
:func:`main` is a fast path that skips the other subcommands' modules (``cli.main`` can call it
for ``argv[0] == "deliver"``); on the success path it imports only the standard library,
torroute.cli.options and torroute.exitcodes (both tiny, standard library only),
torroute.config, torroute.delivery (pipe, settings, session, targets, envelope, tls: no
asyncio, no dnspython, no ssl without STARTTLS), torroute.protocols.smtp and socks5,
torroute.tor.dial and torroute.routing.onion (the nexthop check).

Its option groups: global (``--config``, ``-v``), routing (a failed SRV target is routed again
for the backups: torroute.delivery.pipe.backup_targets), ``--tor-socks`` (the proxy) and its own.
"""

from __future__ import annotations

import argparse
import sys

from ..exitcodes import TEMPFAIL
from .options import global_options, routing_options, tor_options

DESCRIPTION = (
    "Deliver one message (stdin) over SMTP to an onion MX through tor's SocksPort.  Meant for "
    "a Postfix pipe(8) service: argv=/opt/torroute/bin/torroute deliver --sender=${sender} "
    "--nexthop=${nexthop} -- ${recipient}.  Exit 0 delivered, 75 deferred, 69 bounced; stdout "
    "starts with an enhanced status code (X.Y.Z) which Postfix prefers over the exit status."
)


def _defer_on_usage_error(parser: argparse.ArgumentParser) -> None:
    """argparse exits 2 on a bad command line; for a pipe(8) program that would bounce mail."""

    def error(message: str):
        _report(f"4.3.5 {parser.prog}: {message} (check the master.cf argv)")
        raise SystemExit(TEMPFAIL)  # cli.main passes any status but 2 through

    parser.error = error  # type: ignore[method-assign]
    # as a subcommand, unknown options would reach the top-level parser (exit 2 -> 64): catch
    # them here; the fast path (main) uses parse_args, which reports them through error()
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = parse_known(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def parents() -> list[argparse.ArgumentParser]:
    """What deliver reads: the config, the routing flags (backup routing) and the SocksPort."""
    return [global_options(), routing_options(), tor_options(dns=False, control=False)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("deliver options")
    p.add_argument("--sender", required=True, metavar="ADDRESS",
                   help="envelope sender, ${sender} (empty or MAILER-DAEMON: the null sender)")
    p.add_argument("--nexthop", required=True, metavar="[ONION]:PORT",
                   help="${nexthop}: [onion]:port, onion:port or onion (port 25)")
    p.add_argument("--ehlo-name", dest="ehlo_name", metavar="NAME",
                   help="EHLO name (default [deliver] ehlo_name, else 'localhost')")
    p.add_argument("--starttls", choices=("no", "opportunistic", "required"),
                   help="STARTTLS over the onion (default no)")
    p.add_argument("--tls-verify", dest="tls_verify", action=argparse.BooleanOptionalAction,
                   default=None, help="require STARTTLS and a CA-verified certificate for the "
                   "recipient domain (or a host under it) or the onion (default: no)")
    p.add_argument("--tls-ca-file", dest="tls_ca_file", metavar="FILE",
                   help="CA certificates (PEM) for --tls-verify (default: the system's)")
    for flag, what in (("pipelining", "use PIPELINING when offered (default: yes)"),
                       ("chunking", "send the message with BDAT when CHUNKING is offered "
                        "(default: yes)"),
                       ("isolate", "own tor circuits per destination onion (default: no)"),
                       ("require-onion", "defer a nexthop that is not a .onion (default: yes)")):
        p.add_argument(f"--{flag}", dest=flag.replace("-", "_"),
                       action=argparse.BooleanOptionalAction, default=None, help=what)
    for flag, what in (("connect-timeout", "SOCKS connect through tor"),
                       ("command-timeout", "each SMTP command reply"),
                       ("data-timeout", "sending the message and its final reply"),
                       ("time-limit", "the whole delivery")):
        p.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=float, metavar="SECONDS",
                       help=f"time limit for {what}")
    p.add_argument("recipients", nargs="+", metavar="RECIPIENT", help="${recipient} (after --)")


def register(subparsers) -> None:
    p = subparsers.add_parser("deliver", parents=parents(),
                              help="Postfix pipe(8) delivery over tor", description=DESCRIPTION)
    add_arguments(p)
    _defer_on_usage_error(p)
    p.set_defaults(run=run, uses_config=False)  # run() loads it: a bad config must defer


def run(args: argparse.Namespace, config=None) -> int:
    """Entry from cli.main (config is loaded here, so its errors defer instead of exiting 78)."""
    return execute(args)


def _report(line: str) -> None:
    """One line on stdout, as UTF-8 bytes whatever the locale (pipe(8) gives none): an
    encoding error here would turn a bounce into an 'internal error' deferral."""
    data = (" ".join(line.split()) + "\n").encode("utf-8", "backslashreplace")
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def execute(args: argparse.Namespace) -> int:
    """Read the message, deliver it, print the status line; never raises, never exits 1."""
    try:
        message = sys.stdin.buffer.read()  # first: Postfix must not see a broken pipe
        from ..delivery.pipe import Delivery, deliver
        from ..delivery.settings import OVERRIDABLE, DeliverSettings
        from ..errors import ConfigError
        from .options import load_cli_config

        try:
            config = load_cli_config(args)
            flags = {key: getattr(args, key, None) for key in OVERRIDABLE}
            settings = DeliverSettings.from_config(config, flags)
        except ConfigError as exc:
            _report(f"4.3.5 torroute deliver: configuration error: {exc}")
            return TEMPFAIL
        outcome = deliver(Delivery(args.sender, args.nexthop, list(args.recipients)), message,
                          settings, config)
        _report(outcome.line())
        return outcome.exit_code
    except BaseException as exc:  # noqa: BLE001 - anything at all must defer, not bounce
        try:
            _report(f"4.3.0 torroute deliver: internal error: {type(exc).__name__}: {exc}")
        except BaseException:  # noqa: BLE001 - stdout gone: the exit status still defers
            pass
        return TEMPFAIL


def main(argv: list[str] | None = None) -> int:
    """``torroute deliver ARGS`` without building the other subcommands' parsers."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        import warnings

        warnings.simplefilter("ignore")  # stderr is merged into the status line Postfix reads
        parser = argparse.ArgumentParser(prog="torroute deliver", parents=parents(),
                                         description=DESCRIPTION)
        add_arguments(parser)
        _defer_on_usage_error(parser)
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (75, already reported)
        return exc.code if isinstance(exc.code, int) else 0
    except BaseException as exc:  # noqa: BLE001
        _report(f"4.3.0 torroute deliver: internal error: {type(exc).__name__}: {exc}")
        return TEMPFAIL
    return execute(args)


if __name__ == "__main__":
    sys.exit(main())
