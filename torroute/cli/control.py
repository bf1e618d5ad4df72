"""``torroute tor ...``, ``torroute onion ...`` and ``torroute torrc``: tor's control port.

Imports only the standard library at module level; stem and torroute.tor.control are imported
inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import exitcodes
from .options import global_options, tor_options

PORT_HELP = "VIRTPORT=TARGET, e.g. 25=127.0.0.1:2525 (repeatable; TARGET: PORT, IP:PORT or " \
            "unix:PATH)"


def register(subparsers) -> None:
    """tor/onion: global+tor and the control password; torrc: global + --tor-socks/--tor-dns
    (the ports its client lines name)."""
    auth = argparse.ArgumentParser(add_help=False)
    auth.add_argument_group("control options").add_argument(
        "--tor-control-password-file", metavar="FILE",
        help="read the control password from FILE (first line); "
        "default: [tor] control_password, else cookie authentication")
    parents = [global_options(), tor_options(), auth]

    # torroute tor ...
    tor = subparsers.add_parser("tor", help="check and fix tor's settings for torroute",
                                description="Talk to tor's control port ([tor] control, "
                                "--tor-control): status, ensure, reverse.")
    sub = tor.add_subparsers(dest="tor_command", metavar="ACTION")
    p = sub.add_parser("status", parents=parents, help="tor's version, bootstrap and settings",
                       description="Show tor's version, bootstrap progress, network liveness "
                       "and whether SocksPort (ExtendedErrors), DNSPort, AutomapHostsOnResolve "
                       "and AutomapHostsSuffixes are set as torroute needs: one line per "
                       "problem with its fix.  Exit 0 when ready, 75 when the settings are "
                       "fine but tor is not connected to the Tor network, 78 when a setting "
                       "is wrong.")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=run_status)

    p = sub.add_parser("ensure", parents=parents, help="set what torroute needs (SETCONF)",
                       description="SETCONF the missing DNSPort, AutomapHostsOnResolve, "
                       "AutomapHostsSuffixes (.onion) and SocksPort ExtendedErrors.  Existing "
                       "ports and options are kept.  --save makes tor rewrite its torrc "
                       "(SAVECONF: comments in torrc are lost).")
    p.add_argument("--save", action="store_true", help="SAVECONF after the change")
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="print the SETCONF it would send, change nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_ensure)

    p = sub.add_parser("reverse", parents=parents,
                       help="the .onion behind an automap virtual IP",
                       description="Look up which .onion tor's DNSPort mapped to a virtual "
                       "address (GETINFO address-mappings/all).  Exit 1 if none.")
    p.add_argument("ip")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_reverse)

    # torroute onion ...
    onion = subparsers.add_parser("onion", help="create, list, remove onion services",
                                  description="Run this machine's onion MX through tor's "
                                  "control port.")
    sub = onion.add_subparsers(dest="onion_command", metavar="ACTION")
    p = sub.add_parser(
        "create", parents=parents, help="publish an onion service and print its address",
        description="Create an onion service: persistent (--dir: HiddenServiceDir via SETCONF, "
        "every existing service kept, then SAVECONF) or ephemeral (--ephemeral: ADD_ONION; "
        "--key-file keeps the key, written 0600, so the same address comes back after a tor "
        "restart: run create again).  Waits until tor uploaded the descriptor, or --timeout "
        "(exit 75; the service stays).  Refuses when onion port 25/587 leads to an smtpd that "
        "relays for 127.0.0.1 (probed with RCPT TO a foreign domain) unless --force.")
    p.add_argument("--port", dest="onion_ports", action="append", required=True,
                   metavar="VIRT=TARGET", help=PORT_HELP)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", metavar="DIR", help="persistent: the HiddenServiceDir "
                       "(absolute; Debian: under /var/lib/tor/)")
    where.add_argument("--ephemeral", action="store_true", help="ephemeral (ADD_ONION)")
    p.add_argument("--key-file", metavar="FILE", help="ephemeral: the service key (created "
                   "0600 if missing, reused otherwise; tor's hs_ed25519_secret_key works too)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the descriptor upload (default 120)")
    p.add_argument("--no-wait", action="store_true",
                   help="return once tor accepted the service")
    p.add_argument("--force", action="store_true",
                   help="publish even if the SMTP target may relay for 127.0.0.1")
    p.add_argument("--no-save", action="store_true", help="persistent: no SAVECONF")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_create)

    p = sub.add_parser("list", parents=parents, help="the onion services tor runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_list)

    p = sub.add_parser("remove", parents=parents, help="stop an onion service",
                       description="Remove a service by address or HiddenServiceDir.  The "
                       "directory (its key) stays on disk.")
    p.add_argument("service", metavar="ADDRESS_OR_DIR")
    p.add_argument("--no-save", action="store_true", help="persistent: no SAVECONF")
    p.set_defaults(run=run_remove)

    p = sub.add_parser("address", parents=parents, help="print an onion service's address",
                       description="With --dir or --key-file read it from disk (no tor "
                       "needed); without, print the address of every service tor runs.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--dir", metavar="DIR")
    what.add_argument("--key-file", metavar="FILE")
    p.set_defaults(run=run_address)

    # torroute torrc
    p = subparsers.add_parser(
        "torrc", parents=[global_options(), tor_options(control=False)],
        help="print the torrc lines torroute needs",
        description="Render torrc lines for configuration management: the client side "
        "(SocksPort ExtendedErrors, DNSPort, automap; from [tor] socks/dns) and, with "
        "--onion-dir, this machine's onion MX (HiddenServiceDir/HiddenServicePort).")
    p.add_argument("--onion-dir", metavar="DIR", help="HiddenServiceDir of the onion MX")
    p.add_argument("--onion-port", dest="onion_ports", action="append", metavar="VIRT=TARGET",
                   help=PORT_HELP + "; default 25=127.0.0.1:2525")
    p.add_argument("--no-client", action="store_true", help="only the onion service lines")
    p.set_defaults(run=run_torrc)


def _connect(args: argparse.Namespace, config):
    import logging

    import stem.util.log  # noqa: F401  (it sets the level at import: set ours after)

    from ..errors import ConfigError
    from ..tor.control import Tor

    # stem sets its logger to TRACE, so its INFO chatter (e.g. after tor closed a connection)
    # would pass torroute's WARNING level: quiet it unless -vv
    logging.getLogger("stem").setLevel(
        logging.DEBUG if getattr(args, "verbose", 0) >= 2 else logging.WARNING)

    password = config.tor_control_password
    if getattr(args, "tor_control_password_file", None):
        try:
            text = Path(args.tor_control_password_file).read_text()
        except OSError as exc:
            raise ConfigError(f"--tor-control-password-file: {exc.strerror}") from None
        password = text.splitlines()[0] if text else ""
    return Tor.connect(config.tor_control, password)


def _err(message: str) -> None:
    print(f"torroute: {message}", file=sys.stderr)


def _progress(message: str) -> None:
    print(f"torroute: {message}", file=sys.stderr, flush=True)


def run_status(args: argparse.Namespace, config) -> int:
    with _connect(args, config) as tor:
        status = tor.status(config)
    code = exitcodes.OK if status.ready else exitcodes.TEMPFAIL if status.ok else exitcodes.CONFIG
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
        return code
    s, b = status.settings, status.bootstrap
    print(f"tor {status.version} at {status.control}")
    warn = f" ({b.warning})" if b.warning else ""
    print(f"bootstrap: {b.progress}% {b.summary}{warn}")
    print(f"network: {status.network_liveness}"
          f"{', DisableNetwork 1' if s.disable_network else ''}"
          f"{', circuits established' if status.circuit_established else ''}")
    print(f"SocksPort: {'; '.join(s.socks_ports) or '(default) ' + ' '.join(s.socks_listeners)}")
    print(f"DNSPort: {'; '.join(s.dns_ports) or 'none'}")
    print(f"AutomapHostsOnResolve: {int(s.automap)}, AutomapHostsSuffixes: "
          f"{','.join(s.suffixes)}, VirtualAddrNetworkIPv4: {s.virtual_network}")
    for problem in status.problems:
        print(problem.line())
    for note in status.runtime_notes():
        print(f"note: {note}")
    if status.ready:
        print("ok: tor is ready for torroute")
    elif status.ok:
        print("settings ok; tor is not connected to the Tor network yet")
    return code


def run_ensure(args: argparse.Namespace, config) -> int:
    from ..protocols.control import setconf_command

    with _connect(args, config) as tor:
        result = tor.ensure(config, save=args.save, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        if not result.changes:
            print("nothing to change: tor already has what torroute needs")
        elif args.dry_run:
            print("would send: " + setconf_command(result.changes))
        else:
            print("sent: " + setconf_command(result.changes))
        for option, values in result.changes:
            for value in values:
                print(f"  {option} {value}")
        if result.saved:
            print("saved: tor rewrote its torrc (SAVECONF)")
        elif result.applied:
            print("not saved: the change lasts until tor restarts (use --save, or put the "
                  "lines of 'torroute torrc' in torrc)")
        for problem in result.remaining:
            print(problem.line())
    return exitcodes.CONFIG if result.remaining else exitcodes.OK


def run_reverse(args: argparse.Namespace, config) -> int:
    with _connect(args, config) as tor:
        onion = tor.reverse(args.ip)
    if args.json:
        print(json.dumps({"address": args.ip, "onion": onion}))
    elif onion:
        print(onion)
    else:
        print(f"tor has no automap mapping for {args.ip}", file=sys.stderr)
    return exitcodes.OK if onion else exitcodes.NO_ROUTE


def _service_line(service) -> str:
    ports = " ".join(str(p) for p in service.ports)
    where = service.directory or (f"ephemeral, key {service.key_file}" if service.key_file
                                  else "ephemeral")
    text = f"{service.address or '(address unreadable)'}\t{where}"
    if ports:
        text += f"\t{ports}"
    return text


def run_create(args: argparse.Namespace, config) -> int:
    from ..errors import ConfigError, DescriptorTimeout

    if args.key_file and not args.ephemeral:
        raise ConfigError("--key-file goes with --ephemeral")
    progress = None if args.json else _progress
    with _connect(args, config) as tor:
        try:
            service = tor.create_onion(
                args.onion_ports, directory=args.dir,
                key_file=args.key_file if args.ephemeral else None,
                wait=not args.no_wait, timeout=args.timeout, force=args.force,
                save=not args.no_save, progress=progress)
        except DescriptorTimeout as exc:
            if exc.service is not None:
                print(json.dumps(exc.service.to_dict()) if args.json else exc.service.address)
            _err(str(exc))
            return exitcodes.TEMPFAIL
    if args.json:
        print(json.dumps(service.to_dict()))
    else:
        print(service.address or "")
        if not service.changed:
            _progress(f"already configured: {_service_line(service)}")
        if service.note:
            _progress(f"note: {service.note}")
    return exitcodes.OK if service.address else exitcodes.CONFIG


def run_list(args: argparse.Namespace, config) -> int:
    with _connect(args, config) as tor:
        services = tor.list_onions()
    if args.json:
        print(json.dumps([s.to_dict() for s in services], indent=2))
    else:
        for service in services:
            print(_service_line(service))
    return exitcodes.OK


def run_remove(args: argparse.Namespace, config) -> int:
    with _connect(args, config) as tor:
        service = tor.remove_onion(args.service, save=not args.no_save)
    print(f"removed {service.address or service.directory}")
    if service.directory:
        print(f"the key stays in {service.directory}: delete it to retire the address for good")
    return exitcodes.OK


def run_address(args: argparse.Namespace, config) -> int:
    from ..tor.onion_service import directory_address, key_file_address

    if args.dir:
        print(directory_address(Path(args.dir)))
        return exitcodes.OK
    if args.key_file:
        print(key_file_address(Path(args.key_file)))
        return exitcodes.OK
    with _connect(args, config) as tor:
        services = tor.list_onions()
    for service in services:
        if service.address:
            print(service.address)
    return exitcodes.OK if services else exitcodes.NO_ROUTE


def run_torrc(args: argparse.Namespace, config) -> int:
    from ..errors import ConfigError
    from ..tor.torrc import parse_port_mapping, render

    try:
        ports = [parse_port_mapping(p) for p in args.onion_ports or []]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if ports and not args.onion_dir:
        raise ConfigError("--onion-port needs --onion-dir")
    if args.no_client and not args.onion_dir:
        raise ConfigError("--no-client leaves nothing to print: give --onion-dir")
    try:
        text = render(socks=config.tor_socks, dns=config.tor_dns,
                      virtual_network=config.virtual_network, client=not args.no_client,
                      onion_dir=args.onion_dir, onion_ports=ports)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    sys.stdout.write(text)
    return exitcodes.OK
