"""``torroute route``, ``resolve`` and ``dial``: ask where mail goes, and test the path."""

from __future__ import annotations

import argparse
import json
import sys

from .. import exitcodes
from .options import global_options, routing_options, tor_options


def register(subparsers) -> None:
    """route: global+routing+tor; resolve (DNSPort) and dial (SocksPort): global+tor."""
    routed = [global_options(), routing_options(), tor_options()]
    tor_only = [global_options(), tor_options()]
    p = subparsers.add_parser("route", parents=routed, help="where does mail for a domain go?",
                              description="Print the onion route for a domain or address: "
                              "<onion>:<port> and where it came from (map file:line or SRV+TTL).")
    p.add_argument("destination", metavar="DOMAIN_OR_ADDRESS")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=run_route)

    p = subparsers.add_parser("resolve", parents=tor_only,
                              help="the automap IPv4 tor gives an onion (DNSPort)")
    p.add_argument("onion")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(run=run_resolve)

    p = subparsers.add_parser("dial", parents=tor_only,
                              help="connect through tor and print the server's first line")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--isolate", action="store_true", help="stream isolation per destination")
    p.set_defaults(run=run_dial)


def decision_dict(decision) -> dict:
    data = {"result": decision.kind, "domain": decision.domain}
    if decision.kind == "route":
        data.update(onion=decision.onion, port=decision.port, source=decision.source,
                    ttl=decision.ttl, alternatives=[f"{o}:{p}" for o, p in decision.alternatives])
    else:
        data["reason"] = decision.reason
    return data


EXIT_FOR_KIND = {"route": exitcodes.OK, "noroute": exitcodes.NO_ROUTE,
                 "tempfail": exitcodes.TEMPFAIL, "reject": exitcodes.DATAERR}


def run_route(args: argparse.Namespace, config) -> int:
    from ..routing.router import Router

    if not args.destination.strip():
        print("torroute route: empty destination: give a domain or an address",
              file=sys.stderr)
        return exitcodes.USAGE
    router = Router.from_config(config)
    decision = router.route(args.destination)
    if args.json:
        print(json.dumps(decision_dict(decision)))
    elif decision.kind == "route":
        origin = decision.source
        if decision.ttl is not None:
            origin += f" (ttl {int(decision.ttl)}s)"
        print(f"{decision.onion}:{decision.port}\tfrom {origin}")
    elif decision.kind == "noroute":
        print(f"no onion route for {decision.domain}: {decision.reason}")
    else:
        label = "temporary failure" if decision.kind == "tempfail" else "invalid"
        print(f"{label} for {decision.domain}: {decision.reason}", file=sys.stderr)
    return EXIT_FOR_KIND[decision.kind]


def run_resolve(args: argparse.Namespace, config) -> int:
    from ..tor.automap import resolve_automap

    address = resolve_automap(args.onion, config.tor_dns, args.timeout, config.virtual_network)
    if args.json:
        print(json.dumps({"onion": args.onion.lower().rstrip("."), "address": str(address)}))
    else:
        print(address)
    return exitcodes.OK


def run_dial(args: argparse.Namespace, config) -> int:
    from ..tor.dial import dial

    with dial(args.host, args.port, proxy=config.tor_socks, timeout=args.timeout,
              isolate=args.isolate or config.isolate_streams) as sock:
        line = sock.makefile("rb").readline(4096)
    print(line.decode("utf-8", "replace").rstrip("\r\n"))
    return exitcodes.OK
