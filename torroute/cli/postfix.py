"""``torroute postfix setup|check|remove``: the documented Postfix configuration via postconf.

Imports only the standard library at module level; the library (torroute.mta.postfix) is
imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import sys

from .options import global_options

#: option dest -> SetupOptions field
OPTION_FIELDS = ("socket", "program", "user", "proxy")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "postfix",
        help="set up, check or remove torroute in a Postfix configuration (postconf)",
        description="Apply the documented torroute configuration (docs/postfix.rst) to a "
        "Postfix configuration directory with postconf(1), check it, or undo it.  Only "
        "transport_maps (torroute's socketmap first; existing tables kept), "
        "torroute_destination_recipient_limit (pipe mode) and one master.cf service are "
        "touched; default_transport, relayhost and the like never are.  --config FILE is "
        "passed to `torroute deliver` in the master.cf entry.",
    )
    p.set_defaults(uses_config=False, run=run)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    for name, helptext in (
            ("setup", "apply the configuration (idempotent; main.cf/master.cf backed up)"),
            ("check", "report drift from what setup applies (exit 0 clean, 78 drift)"),
            ("remove", "undo setup (byte-identical restore when nothing else changed)")):
        a = actions.add_parser(name, parents=[global_options()], help=helptext,
                               description=helptext)
        a.add_argument("-c", dest="config_dir", metavar="CONFIG_DIR",
                       help="Postfix configuration directory (default /etc/postfix); no "
                       "running instance needed")
        if name != "check":
            a.add_argument("--dry-run", action="store_true", help="print, change nothing")
        if name == "remove":
            continue
        a.add_argument("--lmtp", action="store_true", default=None,
                       help="LMTP relay mode (torroute serve --lmtp) instead of the pipe")
        a.add_argument("--socket", metavar="inet:HOST:PORT|unix:PATH",
                       help="the daemon's socketmap listener (default "
                       "unix:/run/torroute/socketmap.sock)")
        a.add_argument("--program", metavar="PATH",
                       help="the torroute program in master.cf (default /usr/bin/torroute)")
        a.add_argument("--user", metavar="USER",
                       help="pipe(8) user for torroute deliver (default _torroute, the Debian "
                       "package's; never root)")
        a.add_argument("--no-proxy", dest="proxy", action="store_false", default=None,
                       help="no proxy: prefix on the socketmap table (unchrooted "
                       "trivial-rewrite only)")


def setup_options(args: argparse.Namespace, recorded: dict | None):
    """Flags over what the state file recorded at setup, over the defaults."""
    from ..mta.postfix import SetupOptions

    values = dict(recorded or {})
    for name in OPTION_FIELDS:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if getattr(args, "lmtp", None):
        values["mode"] = "lmtp"
    if args.config:
        values["deliver_config"] = args.config
    return SetupOptions(**values)


def run(args: argparse.Namespace, config) -> int:
    from .. import exitcodes
    from ..errors import ConfigError
    from ..mta.postfix import DEFAULT_CONFIG_DIR, PostfixConfig, RemoveRefused

    if not args.action:
        print("torroute postfix: give setup, check or remove", file=sys.stderr)
        return exitcodes.USAGE
    try:
        pf = PostfixConfig(args.config_dir or DEFAULT_CONFIG_DIR)
        state = pf.load_state()
        if args.action == "remove":
            try:
                how, undone = pf.remove(dry_run=args.dry_run)
            except RemoveRefused as exc:
                print(f"torroute postfix remove: {exc}", file=sys.stderr, end="")
                return exitcodes.CONFIG
            if how == "not-set-up":
                print(f"{pf.directory}: not set up by torroute (no {pf.state_path.name})")
            for change in undone:
                print(change.line("would set" if how == "dry-run" else "set"))
            if how == "restored":
                print(f"{pf.directory}: main.cf and master.cf restored from the backups")
            return exitcodes.OK
        options = setup_options(args, state and state.get("options"))
        if args.action == "check":
            drift = pf.check(options)
            for line in drift:
                print(line)
            return exitcodes.CONFIG if drift else exitcodes.OK
        plan = pf.setup(options, dry_run=args.dry_run)
    except ConfigError as exc:
        print(f"torroute postfix {args.action}: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    if not plan:
        for name in plan.adopted:
            print(f"{name}: edited since setup, kept as it is now (remove will take back "
                  "only torroute's part)")
        print(f"{pf.directory}: already set up, nothing to change")
        return exitcodes.OK
    for change in plan.changes:
        print(change.line("would set" if args.dry_run else "set"))
    if not args.dry_run:
        print(f"now: postfix -c {pf.directory} reload  (and run torroute serve"
              f"{' --lmtp ...' if options.mode == 'lmtp' else ''})")
    return exitcodes.OK
