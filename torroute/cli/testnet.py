"""``torroute testnet up|status|down``: a private Tor network on 127.0.0.1 for testing.

``up`` boots it (authorities, relays, an onion service, a client tor), waits until a real SOCKS
connect to the onion works, prints the client's ports and the onion, and returns while the
network keeps running in the background; ``down`` stops exactly its processes.
Not anonymous, not the real Tor: see docs/testnet.rst.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from .. import exitcodes


def default_dir() -> str:
    return os.environ.get("TORROUTE_TESTNET_DIR") or os.path.join(
        tempfile.gettempdir(), f"torroute-testnet-{os.getuid()}")


def register(subparsers) -> None:
    """Only its own options: it reads no configuration and talks to no configured tor."""
    p = subparsers.add_parser(
        "testnet", help="a private Tor network on 127.0.0.1 (for tests)",
        description="Boot, inspect or stop a private, loopback-only Tor network with one onion "
        "service. For testing MTA setups: it is not anonymous and is not the Tor network.")
    actions = p.add_subparsers(dest="testnet_action", metavar="ACTION")
    for name, helptext in (("up", "boot a network; return once the onion is reachable"),
                           ("status", "show a network's ports, onion and processes"),
                           ("down", "stop a network's processes and remove its directory")):
        sp = actions.add_parser(name, help=helptext)
        sp.add_argument("--dir", default=default_dir(),
                        help="the network's directory (default %(default)s; "
                        "$TORROUTE_TESTNET_DIR); one network per directory")
        sp.add_argument("--json", action="store_true", help="print a JSON object")
        if name == "up":
            sp.add_argument("--onion-port", action="append", default=[],
                            metavar="VPORT=127.0.0.1:PORT",
                            help="map a virtual port of the onion service to a loopback "
                            "target (repeatable; default 25=127.0.0.1:2525)")
            sp.add_argument("--timeout", type=float, default=120.0,
                            help="give up booting after this many seconds (default %(default)s)")
            sp.add_argument("--latency-ms", type=float, default=0.0, metavar="MS",
                            help="delay every relay hop by MS in each direction (a "
                            "torroute.testing.latency proxy in front of each ORPort; an onion "
                            "round trip grows by ~12*MS); default 0")
            sp.add_argument("--quiet", "-q", action="store_true", help="no progress output")
            sp.add_argument("--keep", action="store_true",
                            help="on failure, keep the directory (logs) for inspection")
        if name == "down":
            sp.add_argument("--keep", action="store_true",
                            help="keep the directory (logs, keys) after stopping")
    p.set_defaults(run=run, uses_config=False, testnet_parser=p)


def run(args: argparse.Namespace, config) -> int:
    action = getattr(args, "testnet_action", None)
    if action == "up":
        return _up(args)
    if action == "status":
        return _status(args)
    if action == "down":
        return _down(args)
    args.testnet_parser.print_help(sys.stderr)
    return exitcodes.USAGE


def _up(args: argparse.Namespace) -> int:
    from ..errors import TestnetError, UnsafeTorrc
    from ..testing.testnet import PrivateNetwork, parse_onion_port
    from ..testing.testnet_state import STATE_FILE, remove_directory

    ports: dict[int, tuple[str, int]] = {}
    try:
        for text in args.onion_port or ["25=127.0.0.1:2525"]:
            vport, target = parse_onion_port(text)
            ports[vport] = target
    except ValueError as exc:
        print(f"torroute testnet: --onion-port {exc}", file=sys.stderr)
        return exitcodes.USAGE
    directory = os.path.abspath(args.dir)
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.exists(
            os.path.join(directory, STATE_FILE)):
        print(f"torroute testnet: {directory} exists and is not a testnet directory",
              file=sys.stderr)
        return exitcodes.USAGE

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"testnet: {message}", file=sys.stderr, flush=True)

    if args.latency_ms < 0:
        print("torroute testnet: --latency-ms must not be negative", file=sys.stderr)
        return exitcodes.USAGE
    net = PrivateNetwork(directory, ports, progress=progress, latency_ms=args.latency_ms)
    try:
        net.check_directory()
    except TestnetError as exc:
        print(f"torroute testnet: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    net.start_keeper()  # owns the tors once this command has returned
    try:
        net.up(timeout=args.timeout)
    except UnsafeTorrc as exc:
        print(f"torroute testnet: refusing to start tor: {exc}", file=sys.stderr)
        remove_directory(directory)
        return exitcodes.CONFIG
    except TestnetError as exc:
        print(f"torroute testnet: boot failed: {exc}", file=sys.stderr)
        if args.keep:
            print(f"torroute testnet: logs kept in {directory}", file=sys.stderr)
        else:
            remove_directory(directory)
        return exitcodes.TEMPFAIL
    except KeyboardInterrupt:
        remove_directory(directory)
        raise
    finally:
        net.close_controllers()
    info = net.info()
    info["boot_seconds"] = round(net.timings.get("ready", 0.0), 1)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return exitcodes.OK


def _print_info(info: dict) -> None:
    print(f"onion            {info['onion']}")
    for vport, target in info.get("onion_ports", {}).items():
        print(f"  port {vport:<10} -> {target}")
    print(f"socks            {info['socks']}")
    print(f"socks_extended   {info['socks_extended']}   (ExtendedErrors: 0xF0..0xF7)")
    print(f"dns              {info['dns']}   (automaps .onion only)")
    print(f"control          {info['control']}   (cookie {info['control_cookie']})")
    print(f"dir              {info['dir']}")


def _status(args: argparse.Namespace) -> int:
    from ..testing.testnet_state import status

    try:
        data = status(args.dir)
    except FileNotFoundError:
        print(f"torroute testnet: no network in {os.path.abspath(args.dir)}", file=sys.stderr)
        return exitcodes.NO_ROUTE
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        state = "running" if data["running"] else "NOT running (some or all nodes are down)"
        print(f"network          {state}")
        if data.get("onion"):
            _print_info(data)
        for name, node in data["nodes"].items():
            mark = "up  " if node["running"] else "DOWN"
            print(f"  {mark} {name:<8} pid {node['pid']}  rss {node['rss_kib'] // 1024} MB")
    return exitcodes.OK if data["running"] else exitcodes.TEMPFAIL


def _down(args: argparse.Namespace) -> int:
    from ..testing.testnet_state import down

    try:
        stopped = down(args.dir, keep=args.keep)
    except FileNotFoundError:
        print(f"torroute testnet: no network in {os.path.abspath(args.dir)}", file=sys.stderr)
        return exitcodes.OK
    if args.json:
        print(json.dumps({"stopped": stopped, "dir": os.path.abspath(args.dir),
                          "kept": args.keep}))
    else:
        print(f"testnet: stopped {len(stopped)} processes"
              + (f", kept {os.path.abspath(args.dir)}" if args.keep else ""))
    return exitcodes.OK
