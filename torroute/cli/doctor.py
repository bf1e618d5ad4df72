"""``torroute doctor``: check the whole onion mail path, one line per check (thin door on
torroute.doctor).  Standard library only at import time."""

from __future__ import annotations

import argparse
import json
import sys

from .options import global_options

SKIPPABLE = ("dns", "tor", "daemon", "postfix", "exim", "onion-mx")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor", parents=[global_options()],
        help="check configuration, tor, the daemon, the MTA and the onion MX",
        description="Check everything onion mail passes through, in data-path order: the "
        "configuration and maps (pins vs DNS), tor (control port, bootstrap, SocksPort, "
        "DNSPort, automap), the daemon's sockets and reload state, Postfix/Exim, this "
        "machine's onion MX (a canary dial and the open-relay probe).  One line per check: "
        "ok, warn or error, why, and the fix.  Exit 0 (warnings allowed), 75 when only "
        "something temporary failed (tor not bootstrapped, the daemon down), 78 when "
        "something is misconfigured.")
    p.add_argument("--json", action="store_true",
                   help='print {"ok", "exit", "checks": [{"name", "status", "why", "fix"}]}')
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="deadline of each probe (default 10)")
    p.add_argument("--skip", action="append", default=[], choices=SKIPPABLE, metavar="AREA",
                   help=f"leave out an area ({', '.join(SKIPPABLE)}; repeatable)")
    p.add_argument("--send-test", metavar="ADDRESS",
                   help="also send a real test message to ADDRESS through the whole path")
    p.add_argument("--send-from", metavar="ADDRESS", default="torroute-doctor@localhost",
                   help="the test message's sender (default torroute-doctor@localhost)")
    p.add_argument("--postfix-config", metavar="DIR",
                   help="Postfix configuration directory (default /etc/postfix if present)")
    p.add_argument("--exim", metavar="PATH", help="the Exim binary (default exim4/exim)")
    p.add_argument("--exim-config", metavar="FILE", help="exim -C FILE")
    p.add_argument("--onion-control", metavar="unix:PATH|inet:HOST:PORT",
                   help="control port of the tor that runs this machine's onion MX, when it "
                   "is not [tor] control")
    # the doctor reads the configuration itself: a broken file is one of its lines
    p.set_defaults(run=run, uses_config=False)


def run(args: argparse.Namespace, config) -> int:
    from .. import exitcodes
    from ..doctor import Options, run_doctor

    if not args.timeout > 0:
        print("torroute doctor: --timeout must be positive", file=sys.stderr)
        return exitcodes.USAGE
    _quiet_stem(args.verbose)
    report = run_doctor(Options(
        config_path=args.config, timeout=args.timeout, skip=frozenset(args.skip),
        send_test=args.send_test, send_from=args.send_from,
        postfix_dir=args.postfix_config, exim=args.exim, exim_config=args.exim_config,
        onion_control=args.onion_control))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        sys.stdout.write(report.text())
    sys.stdout.flush()
    return report.exit_status


def _quiet_stem(verbose: int) -> None:
    """stem sets its logger to TRACE at import, so its INFO chatter (a closed control
    connection) would pass torroute's WARNING level: quiet it unless -vv (as `torroute tor`)."""
    import logging

    try:
        import stem.util.log  # noqa: F401  (it sets the level at import: set ours after)
    except ImportError:  # the tor lines say what is missing
        return
    logging.getLogger("stem").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
