"""``torroute map transport``: a static Postfix transport(5) / Exim lsearch table from maps;
``torroute map check``: every entry validated, compared with DNS, optionally probed."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import exitcodes
from .options import global_options, routing_options, tor_options

MAPS_LOGGER = "torroute.routing.maps"


def register(subparsers) -> None:
    p = subparsers.add_parser("map", help="static tables from onionmx maps (no daemon)",
                              description="Tables made from pinned maps, for MTAs that route "
                              "without the torroute daemon.")
    sub = p.add_subparsers(dest="map_command", metavar="SUBCOMMAND")
    t = sub.add_parser(
        "transport", parents=[global_options()],
        help="print a Postfix transport(5) file (or an Exim lsearch/cdbmake table)",
        description="Print a static routing table made from onionmx maps: sorted by onion, "
        "then domain.  Postfix: 'domain  smtptor:[onion]' (postmap it); Exim: 'domain: onion' "
        "for an lsearch lookup, or cdbmake records for cdbmake/`cdb -c`.  v2 and invalid "
        "entries are left out, one warning line each on stderr.  Without MAP, the maps of "
        "the configuration ([routing] maps).")
    t.add_argument("map_files", nargs="*", metavar="MAP",
                   help="onionmx map.yml, a directory of maps, or a text map")
    t.add_argument("--format", choices=("postfix", "exim", "cdbmake"), default="postfix",
                   help="postfix transport(5) (default), exim lsearch, or cdbmake input")
    t.add_argument("--transport", metavar="NAME", default=None,
                   help="the Postfix transport name (default smtptor; torroute for the "
                   "`torroute deliver` pipe)")
    t.add_argument("--port", type=int, metavar="N", default=None,
                   help="write the port on every line ([onion]:N); N for pins without one")
    t.set_defaults(run=run_transport, uses_config=True)
    c = sub.add_parser(
        "check", parents=[global_options(), routing_options(), tor_options(dns=False,
                                                                             control=False)],
        help="validate every map entry, compare it with DNS, optionally dial each onion",
        description="Check maps the way a map maintainer's CI would: every entry validated "
        "(a v3 onion with a valid checksum and key; v2 and mistyped onions, domains listed "
        "twice with different targets are invalid, each with FILE:LINE), each pinned domain's "
        "SRV record (_onion-mx._tcp) compared with its pin (warn when it points elsewhere or "
        "to a v2 onion), and with --probe each onion's SMTP banner read through tor.  Exit 0 "
        "(warnings allowed; --strict makes them fail), 65 when an entry is invalid, 66 when a "
        "map cannot be read, 75 when only DNS or probes failed for now.  Without MAP, the "
        "maps of the configuration ([routing] maps).")
    c.add_argument("map_files", nargs="*", metavar="MAP",
                   help="onionmx map.yml, a directory of maps, or a text map")
    c.add_argument("--no-dns", action="store_true", help="do not compare with SRV records")
    c.add_argument("--probe", action="store_true",
                   help="dial each onion through tor's SocksPort and read its SMTP banner")
    c.add_argument("--concurrency", type=int, default=8, metavar="N",
                   help="DNS questions and probes at a time (default 8)")
    c.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="deadline of each probe (default 60)")
    c.add_argument("--strict", action="store_true", help="warnings fail too (exit 65)")
    c.add_argument("--all", action="store_true", help="list the ok entries too")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(run=run_check, uses_config=True)
    p.set_defaults(run=lambda args, config: _help(p), uses_config=False)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return exitcodes.USAGE


def run_transport(args: argparse.Namespace, config) -> int:
    from ..errors import MapError
    from ..mta.transport import DEFAULT_TRANSPORT, left_out, render, valid_transport_name
    from ..routing.maps import load_maps

    transport = args.transport or DEFAULT_TRANSPORT
    if args.transport is not None and args.format != "postfix":
        return _usage("--transport applies to --format postfix only")
    if not valid_transport_name(transport):
        return _usage(f"--transport {transport!r}: not a master.cf service name")
    if args.port is not None and not 0 < args.port < 65536:
        return _usage(f"--port {args.port}: not a TCP port")
    paths = args.map_files or (config.maps if config is not None else [])
    if not paths:
        return _usage("no map: give MAP files or set [routing] maps in the configuration")
    records = _Collect()
    logger = logging.getLogger(MAPS_LOGGER)
    saved = (logger.propagate, logger.level)
    logger.addHandler(records)
    logger.propagate, logger.level = False, logging.WARNING
    try:
        default_port = args.port or (config.default_port if config is not None else 25)
        pinmap = load_maps(paths, default_port=default_port, v2_pins="unpinned")
    except MapError as exc:
        print(f"torroute map transport: {exc}", file=sys.stderr)
        return exitcodes.DATAERR
    finally:
        logger.removeHandler(records)
        logger.propagate, logger.level = saved
    try:
        table = render(pinmap, args.format, transport, show_port=args.port is not None)
    except ValueError as exc:  # invalid pins in a table that cannot defer them
        print(f"torroute map transport: {exc}", file=sys.stderr)
        return exitcodes.DATAERR
    for line in left_out(pinmap):
        print(f"torroute map transport: warning: {line}", file=sys.stderr)
    for record in records.others():  # e.g. "pinned twice, the later entry wins"
        print(f"torroute map transport: warning: {record.getMessage()}", file=sys.stderr)
    sys.stdout.write(table)
    sys.stdout.flush()
    return exitcodes.OK


def _usage(message: str) -> int:
    print(f"torroute map transport: {message}", file=sys.stderr)
    return exitcodes.USAGE


class _Collect(logging.Handler):
    """The loader's warnings, held back: its per-problem and per-load lines are replaced by
    one line per left-out entry (all of them, not the loader's first 20)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def others(self) -> list[logging.LogRecord]:
        told = ("map %s", "%s")  # problems (listed by left_out) and the load summary
        return [r for r in self.records
                if r.msg not in told and not str(r.msg).startswith("map: %d v2 onion")]


def run_check(args: argparse.Namespace, config) -> int:
    import json

    from ..errors import MapError
    from ..routing.mapcheck import OK, check_maps, tor_prober

    paths = args.map_files or (config.maps if config is not None else [])
    if not paths:
        print("torroute map check: no map: give MAP files or set [routing] maps",
              file=sys.stderr)
        return exitcodes.USAGE
    if args.concurrency < 1 or not args.timeout > 0:
        print("torroute map check: --concurrency and --timeout must be positive",
              file=sys.stderr)
        return exitcodes.USAGE
    try:
        report = check_maps(paths, config, dns=not args.no_dns,
                            probe=tor_prober(config, args.timeout) if args.probe else None,
                            concurrency=args.concurrency, strict=args.strict)
    except MapError as exc:
        print(f"torroute map check: {exc}", file=sys.stderr)
        text = str(exc)  # unreadable (66) or not parseable (65, with FILE:LINE)
        missing = text.startswith("map ") and ("does not exist" in text or "ermission" in text)
        return exitcodes.NOINPUT if missing else exitcodes.DATAERR
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return report.exit_status()
    for problem in report.problems:
        print(f"warn {problem}")
    for entry in report.entries:
        if entry.status == OK and not args.all:
            continue
        target = f" -> {entry.onion}:{entry.port}" if entry.onion else ""
        notes = "; ".join(entry.notes) or "; ".join(x for x in (entry.srv, entry.probe) if x)
        print(f"{entry.status} {entry.source}: {entry.domain}{target}: {notes or 'ok'}")
    counts = report.counts()
    print(f"{len(report.entries)} entries in {len(report.files)} files: "
          + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f": exit {report.exit_status()}")
    return report.exit_status()
