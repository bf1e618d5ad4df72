"""``torroute exim setup|remove``: install torroute's Exim plugin into Debian's exim4 config."""

from __future__ import annotations

import argparse
import sys

from .. import exitcodes


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "exim", help="set up (or remove) torroute in Debian's exim4 configuration",
        description="Install torroute's router, transport and macros into a Debian exim4 "
        "configuration (split conf.d or non-split exim4.conf.template) and run "
        "update-exim4.conf; remove restores it.  See docs/exim.rst.")
    sub = p.add_subparsers(dest="exim_command", metavar="SUBCOMMAND")
    for name, run, text in (
            ("setup", run_setup, "install (idempotent: a second run changes nothing)"),
            ("remove", run_remove, "restore what setup changed (refuses, with a diff, when "
             "the admin edited torroute's files)")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--confdir", metavar="DIR", default="/etc/exim4",
                       help="the exim4 configuration directory (default /etc/exim4)")
        s.add_argument("--perl-dir", metavar="DIR", default=None,
                       help="where torroute.pl goes (default /usr/local/share/torroute/exim, "
                       "the macros' TORROUTE_PERL_SCRIPT)")
        s.add_argument("--plugin-dir", metavar="DIR", default=None,
                       help="the plugin's files (default: the installed exim_perl directory)")
        layout = s.add_mutually_exclusive_group()
        layout.add_argument("--split", dest="split", action="store_true", default=None,
                            help="split config (default: dc_use_split_config)")
        layout.add_argument("--non-split", dest="split", action="store_false")
        s.add_argument("--update-exim4-conf", metavar="PROGRAM", default="update-exim4.conf",
                       help="the config generator to run afterwards (default update-exim4.conf)")
        s.add_argument("--output", metavar="FILE", default=None,
                       help="passed to update-exim4.conf --output (default: its own)")
        s.add_argument("--no-update", action="store_true",
                       help="do not run update-exim4.conf (run it yourself before reloading)")
        s.set_defaults(run=run, uses_config=False)
    p.set_defaults(run=lambda args, config: _help(p), uses_config=False)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return exitcodes.USAGE


def _setup(args: argparse.Namespace):
    from ..mta.exim import DEFAULT_PERL_DIR, EximSetup

    update = None if args.no_update else [args.update_exim4_conf] + (
        ["--output", args.output] if args.output else [])
    return EximSetup(confdir=args.confdir, plugin_dir=args.plugin_dir,
                     perl_dir=args.perl_dir or DEFAULT_PERL_DIR, split=args.split,
                     update_command=update)


def _report(result, after: str) -> int:
    for line in result.messages:
        print(line)
    if result.changed:
        print(after)
    return exitcodes.OK


def run_setup(args: argparse.Namespace, config) -> int:
    result = _setup(args).setup()
    first = "update-exim4.conf, then " if args.no_update else ""
    return _report(result, f"next: {first}exim -bt user@a-pinned.domain, then systemctl "
                   "reload exim4")


def run_remove(args: argparse.Namespace, config) -> int:
    result = _setup(args).remove()
    first = "update-exim4.conf, then " if args.no_update else ""
    return _report(result, f"next: {first}systemctl reload exim4 (mail deferred by torroute "
                   "now takes the usual route: check exim -bp first)")
