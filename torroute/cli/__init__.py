"""The ``torroute`` command: one argparse front end, one module per command in ``torroute/cli/``.

Every subcommand module imports only the standard library at import time, so building the parser
stays cheap; the real work is imported inside ``run``.  Exit statuses (torroute.exitcodes):
0 ok, 1 no route, 64 usage, 65 bad data, 75 temporary failure, 78 configuration.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__, exitcodes

COMMAND_MODULES = ["route", "testnet", "serve", "status", "doctor", "deliver", "send", "sink",
                   "proxy", "postfix", "exim", "map", "control"]


def build_parser() -> argparse.ArgumentParser:
    """Each command module's ``register(subparsers)`` picks its option groups from
    torroute.cli.options: a command lists (and accepts) only the flags it uses."""
    parser = argparse.ArgumentParser(
        prog="torroute",
        description="Deliver mail for ordinary domains over Tor onion services.",
        epilog="exit status: 0 ok, 1 no route, 64 usage, 65 bad data, "
        "75 temporary failure (defer), 78 configuration error",
    )
    parser.add_argument("--version", action="version", version=f"torroute {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"torroute.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"torroute.cli.{name}":
                raise
            continue  # a command not installed in this build
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["deliver"]:  # Postfix pipe(8): one process per message; must never exit
        from .deliver import main as deliver_main  # 64/78 (pipe bounces on those)

        return deliver_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on usage errors; we promise 64
        code = exc.code if isinstance(exc.code, int) else 1
        return exitcodes.USAGE if code == 2 else code
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    setup_logging(getattr(args, "verbose", 0))
    from ..errors import ConfigError, TorrouteError

    try:
        from .options import load_cli_config

        config = load_cli_config(args) if getattr(args, "uses_config", True) else None
        return args.run(args, config)
    except ConfigError as exc:
        print(f"torroute: configuration error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    except TorrouteError as exc:
        print(f"torroute: {exc}", file=sys.stderr)
        return exitcodes.TEMPFAIL if exc.temporary else exitcodes.DATAERR
    except KeyboardInterrupt:
        return 130


def setup_logging(verbosity: int) -> None:
    import logging

    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="torroute: %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
