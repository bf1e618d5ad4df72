"""``torroute status``: ask the running daemon (its status socket) how it is doing.

Imports only the standard library at module level; the client is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .options import global_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "status", parents=[global_options()],
        help="ask the running daemon: reload state, counts, per-onion health, canaries",
        description="Ask the running `torroute serve` over its status socket ([serve] "
        "status_socket or --status-socket) and print its reload state, listeners, lookup and "
        "relay counts, the per-onion table (worst first), canaries, self-healing and tor's "
        "bootstrap.  Exit 0 if it answered, 75 if nothing answers there, 78 if no status "
        "socket is configured or the configuration is unusable.",
    )
    p.add_argument("--status-socket", metavar="inet:HOST:PORT|unix:PATH",
                   help="where the daemon's status socket is (default: [serve] status_socket)")
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for the answer (default 5)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, config) -> int:
    from .. import exitcodes
    from ..daemon.settings import ServeSettings
    from ..daemon.status import query_status
    from ..errors import DaemonUnreachable

    if not args.timeout > 0:
        print("torroute status: --timeout must be positive", file=sys.stderr)
        return exitcodes.USAGE
    overrides = {"status_socket": args.status_socket} if args.status_socket else {}
    endpoint = ServeSettings.from_config(config, overrides).status_socket
    if endpoint is None:
        print("torroute status: no status socket: give --status-socket or set [serve] "
              "status_socket (and run torroute serve with it)", file=sys.stderr)
        return exitcodes.CONFIG
    try:
        answer = query_status(endpoint, args.timeout)
    except DaemonUnreachable as exc:
        print(f"torroute status: the daemon does not answer: {exc}", file=sys.stderr)
        return exitcodes.TEMPFAIL
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_status(answer))
    return exitcodes.OK


def _when(value: Any, now: float) -> str:
    if not isinstance(value, int | float):
        return "never"
    ago = max(0.0, now - value)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if ago < 120:
        return f"{stamp} ({ago:.0f} s ago)"
    if ago < 7200:
        return f"{stamp} ({ago / 60:.0f} min ago)"
    return f"{stamp} ({ago / 3600:.1f} h ago)"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _sortkey(row: dict[str, Any]) -> tuple[float, float]:
    cf = row.get("consecutive_failures")
    lf = row.get("last_failure")
    return (-(cf if isinstance(cf, int | float) else 0), -(lf if isinstance(lf, int | float)
                                                            else 0))


def format_status(s: dict[str, Any], now: float | None = None) -> str:
    """The human-readable status (what the daemon's JSON answer says, in tables)."""
    now = time.time() if now is None else now
    out: list[str] = []
    uptime = s.get("uptime")
    up = f", up {uptime / 3600:.1f} h" if isinstance(uptime, int | float) else ""
    out.append(f"torroute {s.get('version', '?')}, pid {s.get('pid', '?')}{up}")
    reload = s.get("reload") or {}
    when = _when(reload.get("when"), now)
    if reload.get("ok"):
        out.append(f"reload: ok ({reload.get('message', '?')}) at {when}")
    else:
        out.append(f"reload: FAILED at {when}, old configuration kept: "
                   f"{reload.get('message', '?')}")
    out.append(f"  {reload.get('pinned', '?')} pinned domains served, "
               f"{reload.get('failures', 0)} failed reloads since start")
    listeners = s.get("listeners") or []
    if listeners:
        out.append("listeners:")
        out.extend(_table([[str(x.get("kind")), str(x.get("endpoint"))] for x in listeners]))
    counts = s.get("counts") or {}
    lookups = counts.get("lookups") or {}
    out.append(f"connections: {counts.get('connections', 0)} open, "
               f"{counts.get('malformed', 0)} malformed requests since start")
    if lookups:
        results = sorted({r for c in lookups.values() for r in c})
        out.append("lookups:")
        out.extend(_table([["protocol", *results]] +
                          [[p, *(str(c.get(r, 0)) for r in results)]
                           for p, c in sorted(lookups.items())]))
    attempts = counts.get("attempts") or {}
    if attempts:
        out.append("relay attempts: " + ", ".join(f"{k} {v}" for k, v in
                                                  sorted(attempts.items(),
                                                         key=lambda kv: -kv[1])))
    onions = sorted((o for o in s.get("onions") or [] if isinstance(o, dict)), key=_sortkey)
    if onions:
        out.append("onions (worst first):")
        rows = [["onion", "ok", "failed", "in a row", "last success", "last reason"]]
        for o in onions:
            rows.append([f"{o.get('onion')}:{o.get('port')}", str(o.get("successes", 0)),
                         str(o.get("failures", 0)), str(o.get("consecutive_failures", 0)),
                         _when(o.get("last_success"), now),
                         str(o.get("last_reason_class") or "-")])
        out.extend(_table(rows))
    canaries = s.get("canaries") or []
    if canaries:
        out.append("canaries:")
        rows = [["target", "state", "last check", "checks", "failed", "reason"]]
        for c in canaries:
            up = c.get("up")
            state = "not checked yet" if up is None else "up" if up else "DOWN"
            rows.append([str(c.get("target")), state, _when(c.get("last_check"), now),
                         str(c.get("checks", 0)), str(c.get("failures", 0)),
                         str(c.get("reason") or "-")])
        out.extend(_table(rows))
    healing = s.get("healing") or {}
    if healing:
        enabled = "on" if healing.get("enabled") else "off"
        out.append(f"self-healing: {enabled}, {healing.get('newnym_total', 0)} NEWNYM sent "
                   f"(last at {_when(healing.get('last_newnym'), now)}), "
                   f"{healing.get('suppressed_total', 0)} held back")
        if healing.get("last_evidence"):
            out.append(f"  last evidence: {healing['last_evidence']}")
    tor = s.get("tor") or {}
    if tor:
        boot = tor.get("bootstrap")
        state = f"bootstrapped {boot}%" if boot is not None else "bootstrap unknown"
        error = f", error: {tor['error']}" if tor.get("error") else ""
        out.append(f"tor: {state} (checked {_when(tor.get('checked'), now)}){error}")
    return "\n".join(out) + "\n"
