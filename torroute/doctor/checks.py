"""The doctor's checks, one function per area, in data-path order: configuration and maps,
tor, the daemon, the MTA (Postfix, Exim), this machine's onion MX, a test message.

Every function returns Check lines and never raises: a missing binary, a permission, a
timeout, a half-configured machine each become the line of the check that met it
(:func:`guarded`).  What an area learns that a later one needs (the config, tor's status and
onion services, the daemon's status) travels in :class:`Facts`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import (
    ConfigError,
    ControlAuthError,
    MapError,
    PermanentError,
    ProtocolError,
    TemporaryError,
    TorrouteError,
)
from .probes import ProbeTimeout, banner_through_tor, probe_listener, with_deadline
from .report import Check, error, ok, warn

#: a valid v3 onion nobody runs: what "does anything route .onion elsewhere" asks about
SAMPLE_ONION = "a" * 55 + "d.onion"
#: the areas --skip can leave out (the configuration is always read: all others need it)
AREAS = ("dns", "tor", "daemon", "postfix", "exim", "onion-mx", "send-test")
SHOWN = 5  # names listed in one line before "and N more"


@dataclass
class Options:
    """What to check and where (plain values: the CLI turns flags into these)."""

    config_path: str | None = None
    timeout: float = 10.0  # per probe
    skip: frozenset[str] = frozenset()
    send_test: str | None = None
    send_from: str = "torroute-doctor@localhost"
    postfix_dir: str | None = None  # None: /etc/postfix if it has a main.cf
    postconf: str | None = None  # None: postconf on PATH, else /usr/sbin/postconf
    exim: str | None = None  # None: exim4 or exim on PATH
    exim_config: str | None = None  # exim -C FILE
    onion_control: str | None = None  # the tor running the onion MX, if not [tor] control
    concurrency: int = 8


@dataclass
class Facts:
    config: Config | None = None
    serve: Any = None  # ServeSettings
    pins: Any = None  # PinMap
    tor_status: Any = None  # torroute.tor.settings.Status
    onions: list[Any] = field(default_factory=list)  # OnionService
    daemon_status: dict | None = None


def guarded(name: str, fn: Callable[[], Iterable[Check] | Check], timeout: float
            ) -> list[Check]:
    """Run one check under a deadline; whatever escapes it becomes its error line."""
    try:
        result = with_deadline(fn, timeout, name)
    except ProbeTimeout as exc:
        return [error(name, f"{exc}", "find out what hangs (the service it talks to)",
                      temporary=True)]
    except ConfigError as exc:
        return [error(name, str(exc), "fix the setting named above")]
    except Exception as exc:  # the doctor never raises: an unexpected failure is a line too
        return [error(name, f"the check failed: {type(exc).__name__}: {exc}",
                      "run with -vv and report this", temporary=True)]
    return [result] if isinstance(result, Check) else list(result)


def _more(items: Sequence[str]) -> str:
    shown = "; ".join(items[:SHOWN])
    return shown + (f"; and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


# ---- config and maps ------------------------------------------------------------------------

def check_config(opts: Options, facts: Facts) -> list[Check]:
    from ..config import load_config
    from ..daemon.settings import ServeSettings

    out: list[Check] = []
    try:
        facts.config = load_config(opts.config_path)
    except ConfigError as exc:
        return [error("config", str(exc), "fix the file at the place named (torroute.toml(5))")]
    except OSError as exc:  # a directory, an I/O error: load_config names only the usual ones
        return [error("config", f"config file {opts.config_path}: {exc.strerror or exc}",
                      "give --config a readable TOML file")]
    where = str(facts.config.path) if facts.config.path else "no file: the defaults"
    out.append(ok("config", f"loaded {where}"))
    try:
        facts.serve = ServeSettings.from_config(facts.config)
    except ConfigError as exc:
        out.append(error("serve", str(exc), "fix the [serve] table (torroute.toml(5))"))
    out.extend(check_maps(facts))
    return out


def check_maps(facts: Facts) -> list[Check]:
    import logging

    from ..routing.router import load_pins

    config = facts.config
    assert config is not None
    if not config.maps:
        return [ok("maps", "no [routing] maps: routes come from SRV records only")]
    quiet = logging.getLogger("torroute.routing.maps")
    saved, quiet.disabled = quiet.disabled, True
    try:
        facts.pins = pins = load_pins(config)
    except MapError as exc:
        return [error("maps", f"{exc} (the daemon refuses to start, or keeps its old maps on "
                      "reload)", "fix the map at FILE:LINE, then torroute map check")]
    finally:
        quiet.disabled = saved
    out = [ok("maps", f"{len(pins.pins)} pinned domains from {len(pins.files)} map files")]
    if pins.invalid:
        bad = [f"{b.source}: {b.domain}: {b.message}" for b in pins.invalid.values()]
        out.append(error("pins-invalid", f"{len(bad)} invalid pins (mail for them defers): "
                         f"{_more(bad)}", "correct the onion at FILE:LINE (torroute map check)"))
    if pins.v2:
        out.append(warn("pins-v2", f"{len(pins.v2)} v2 pins ignored (dead since 2021; routed "
                        f"as if unpinned): {_more([str(p) for p in pins.v2])}",
                        "delete those entries or replace them with the domains' v3 onions"))
    clash = [f"{d}: {a} overridden by {b}" for d, a, b, same in pins.duplicates if not same]
    if clash:
        out.append(warn("pins-duplicate", f"{len(clash)} domains pinned twice to different "
                        f"onions (the later wins): {_more(clash)}", "keep one entry each"))
    return out


def check_pins_dns(opts: Options, facts: Facts) -> list[Check]:
    """Pins vs DNS: a pinned domain whose SRV points elsewhere or to a v2 onion."""
    from concurrent.futures import ThreadPoolExecutor

    from ..routing.mapcheck import OK, TEMPORARY, _nameservers, compare_srv, srv_answer

    pins = facts.pins
    if pins is None or not pins.pins:
        return []
    config = facts.config
    servers = _nameservers(config)
    items = sorted(pins.pins.values(), key=lambda p: p.domain)
    first = srv_answer(items[0].domain, config, servers)
    if first.error is not None:  # the resolver is down: one line, not a timeout per pin
        return [warn("pins-dns-lookup", f"SRV of {items[0].domain} not checked: {first.error}; "
                     f"the other {len(items) - 1} pins not asked", "check [routing] nameservers")]
    with ThreadPoolExecutor(max(1, opts.concurrency), thread_name_prefix="doctor-srv") as pool:
        answers = list(pool.map(lambda p: srv_answer(p.domain, config, servers), items))
    stale, failed = [], []
    for pin, answer in zip(items, answers, strict=True):
        verdict, why = compare_srv(pin.onion, pin.port, answer)
        if verdict == TEMPORARY:
            failed.append(f"{pin.domain}: {why}")
        elif verdict != OK:
            stale.append(f"{pin.domain} ({pin.source}): {why}")
    out = []
    if stale:
        out.append(warn("pins-dns", f"{len(stale)} of {len(items)} pins disagree with DNS: "
                        f"{_more(stale)}", "ask the domain which onion is current, then "
                        "update or drop the pin (torroute map check shows all)"))
    if failed:
        out.append(warn("pins-dns-lookup", f"SRV of {len(failed)} pinned domains not "
                        f"checked: {_more(failed)}", "check [routing] nameservers"))
    if not out:
        out.append(ok("pins-dns", f"{len(items)} pins: SRV absent or agreeing"))
    return out


# ---- tor --------------------------------------------------------------------------------------

def check_tor(opts: Options, facts: Facts) -> list[Check]:
    from ..errors import ControlError, TorUnavailable
    from ..tor.control import Tor

    config = facts.config
    assert config is not None

    def read() -> tuple[Any, list[Any]]:
        with Tor.connect(config.tor_control, config.tor_control_password) as tor:
            status = tor.status(config)
            try:
                onions = tor.list_onions()
            except TorrouteError:
                onions = []
            return status, onions

    try:
        facts.tor_status, facts.onions = with_deadline(read, opts.timeout, "tor control port")
    except ControlAuthError as exc:
        return [error("tor-control", str(exc), "give torroute's user access to tor's control "
                      "port ([tor] control, control_password; Debian: group debian-tor)")]
    except (ControlError, TorUnavailable, ProbeTimeout) as exc:
        return [error("tor-control", str(exc),
                      "start tor (systemctl start tor@default) or point [tor] control at it",
                      temporary=True)]
    except ConfigError as exc:
        return [error("tor-control", str(exc), "fix [tor] control")]
    return tor_lines(facts.tor_status)


#: tor.settings Problem.option -> the doctor line it belongs to
TOR_LINES = {"SocksPort": "tor-socks", "DNSPort": "tor-dns",
             "AutomapHostsOnResolve": "tor-automap", "AutomapHostsSuffixes": "tor-automap",
             "VirtualAddrNetworkIPv4": "tor-automap"}


EXTENDED_ERRORS_SINCE = (0, 4, 3)  # SocksPort ExtendedErrors (proposal 304)


def tor_version(text: str) -> tuple[int, ...] | None:
    """``0.4.8.10`` / ``0.4.9.1-alpha`` -> (0, 4, 8, 10); None when it is no version (pure)."""
    head = str(text).split("-", 1)[0].split()
    parts = head[0].split(".") if head else []
    if not 2 <= len(parts) <= 5 or not all(p.isdigit() and len(p) < 6 for p in parts):
        return None
    return tuple(int(p) for p in parts)


def tor_lines(status: Any) -> list[Check]:
    """The lines for one ``tor status`` (pure: tests feed it made-up states)."""
    version = tor_version(status.version)
    if version is not None and version < EXTENDED_ERRORS_SINCE:
        out = [warn("tor-control", f"tor {status.version} at {status.control}: older than "
                    "0.4.3, which has no ExtendedErrors (every onion failure looks alike)",
                    "upgrade tor (Debian: the Tor Project's repository)")]
    else:
        out = [ok("tor-control", f"tor {status.version} at {status.control}")]
    b, s = status.bootstrap, status.settings
    if s.disable_network:
        out.append(error("tor-bootstrap", "DisableNetwork is 1: tor does not connect to the "
                         "Tor network, onion mail defers", "SETCONF DisableNetwork=0 or remove "
                         "DisableNetwork from torrc"))
    elif b.done:
        out.append(ok("tor-bootstrap", f"{b.progress}% {b.summary}"))
    else:
        extra = f" ({b.warning})" if b.warning else ""
        out.append(error("tor-bootstrap", f"{b.progress}% {b.summary}{extra}: onion mail "
                         "defers until tor is connected", "wait, or read tor's log (network, "
                         "bridges, clock)", temporary=True))
    by_line: dict[str, list[Any]] = {}
    for p in status.problems:
        by_line.setdefault(TOR_LINES.get(p.option, "tor-settings"), []).append(p)
    good = {"tor-socks": f"SocksPort {'; '.join(s.socks_ports or s.socks_listeners)}",
            "tor-dns": f"DNSPort {'; '.join(s.dns_ports or s.dns_listeners)}",
            "tor-automap": f"AutomapHostsOnResolve 1 for {','.join(s.suffixes)} into "
                           f"{s.virtual_network}"}
    for name in ("tor-socks", "tor-dns", "tor-automap", "tor-settings"):
        problems = by_line.get(name, [])
        if not problems:
            if name in good:
                out.append(ok(name, good[name]))
            continue
        why = "; ".join(f"{p.option}: {p.problem}" for p in problems)
        fix = "; ".join(dict.fromkeys(p.fix for p in problems))
        if any(p.severity == "error" for p in problems):
            out.append(error(name, why, fix))
        else:
            out.append(warn(name, why, fix))
    text = (b.warning or "").lower()
    if "clock" in text or "skew" in text:
        out.append(warn("tor-clock", f"tor reports clock skew: {b.warning}",
                        "set the system clock right (systemd-timesyncd, chrony)"))
    return out


# ---- the daemon -------------------------------------------------------------------------------

def check_daemon(opts: Options, facts: Facts) -> list[Check]:
    serve = facts.serve
    if serve is None:
        return [warn("daemon", "the [serve] table did not load: its sockets are not probed",
                     "fix [serve] (see the serve line)")]
    out: list[Check] = []
    listeners = [(kind, ep) for kind, eps in serve.listeners.items() for ep in eps]
    if not listeners:
        out.append(warn("daemon", "no [serve] listeners configured: nothing to probe",
                        "set [serve] socketmap (Postfix) or exim (Exim), see torroute.toml(5); "
                        "ignore if only static tables (torroute map transport) are used"))
    for kind, ep in listeners:
        out.append(listener_line(kind, ep, opts.timeout))
    out.extend(check_status_socket(opts, facts))
    return out


def listener_line(kind: str, endpoint: Any, timeout: float) -> Check:
    name = f"daemon-{kind.replace('_', '-')}"
    try:
        answer = with_deadline(lambda: probe_listener(kind, endpoint, timeout), timeout + 1,
                               f"{kind} {endpoint}")
    except PermissionError as exc:
        return error(name, f"{endpoint}: {exc.strerror or exc}", "run the doctor as a user of "
                     "the socket's group ([serve] socket_group) or as root")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        return error(name, f"nothing listens at {endpoint} ({exc.strerror or exc}): lookups "
                     "fail and mail defers", "start the daemon (systemctl start torroute)",
                     temporary=True)
    except (ProtocolError, ValueError) as exc:
        return error(name, f"{endpoint} answers, but not as a torroute {kind} listener: {exc}",
                     "another program on that address? fix [serve] or the other program")
    except (OSError, TemporaryError) as exc:
        return error(name, f"{endpoint}: {exc}", "check the daemon's log", temporary=True)
    return ok(name, f"{endpoint}: {answer}")


def check_status_socket(opts: Options, facts: Facts) -> list[Check]:
    serve = facts.serve
    if serve.status_socket is None:
        return [warn("daemon-status", "[serve] status_socket not set: the reload state and "
                     "per-onion health are unknown", "set [serve] status_socket = "
                     "\"unix:/run/torroute/status.sock\" and reload")]
    try:
        from ..daemon.status import query_status
    except ImportError:
        return [warn("daemon-status", "this torroute has no status client",
                     "upgrade torroute")]
    try:
        status = with_deadline(lambda: query_status(serve.status_socket, opts.timeout),
                               opts.timeout + 1, "status socket")
    except PermissionError as exc:
        return [error("daemon-status", f"{serve.status_socket}: {exc}", "run as a member of "
                      "the socket's group or as root")]
    except (TorrouteError, OSError) as exc:
        return [error("daemon-status", f"{serve.status_socket}: {exc}", "start the daemon "
                      "(systemctl start torroute); check its log", temporary=True)]
    if not isinstance(status, dict) or "error" in status:
        return [error("daemon-status", f"{serve.status_socket} answered {status!r:.200}",
                      "is that a torroute status socket?", temporary=True)]
    facts.daemon_status = status
    return status_lines(status, facts.pins)


def status_lines(status: dict, pins: Any = None) -> list[Check]:
    """The lines for one status-socket answer (pure)."""
    out: list[Check] = []
    reload = _dict(status.get("reload"))
    if reload.get("ok", True) is not False:
        out.append(ok("daemon-reload", f"pid {status.get('pid')}, up "
                      f"{_ago(status.get('uptime'))}; last reload ok"))
    else:
        out.append(error("daemon-reload", f"the last reload failed: {reload.get('message')}; "
                         "the daemon runs with the configuration and maps it had before",
                         "fix the file at FILE:LINE, then reload (systemctl reload torroute)"))
    onions = _dicts(status.get("onions"))
    by_onion: dict[str, list[str]] = {}
    for pin in (pins.pins.values() if pins is not None else ()):
        by_onion.setdefault(pin.onion, []).append(pin.domain)
    failing = []
    for o in onions:
        name = str(o.get("onion", ""))
        if not o.get("consecutive_failures"):
            continue
        last_ok, last_bad = _number(o.get("last_success")), _number(o.get("last_failure"))
        if last_ok is not None and last_ok >= (last_bad or 0):
            continue
        domains = by_onion.get(name) or by_onion.get(name.removesuffix(".onion") + ".onion")
        pinned = f" (pinned for {', '.join(sorted(domains)[:3])})" if domains else ""
        failing.append(f"{name}:{o.get('port')}{pinned}: {o.get('consecutive_failures')} "
                       f"failures in a row, last {o.get('last_reason_class') or '?'}: "
                       f"{o.get('last_reason') or ''}".strip())
    if failing:
        out.append(warn("onions-lately", f"{len(failing)} onions not reachable lately: "
                        f"{_more(failing)}", "tor client trouble if many fail at once "
                        "(tor's log); a stale pin if one fails for days (torroute map check "
                        "--probe)"))
    else:
        out.append(ok("onions-lately", f"{len(onions)} onions seen, none failing lately"))
    down = [f"{c.get('target')}: {c.get('reason') or 'down'}" for c in
            _dicts(status.get("canaries")) if c.get("up") is False]
    if down:
        out.append(warn("daemon-canaries", f"{len(down)} canaries down: {_more(down)}",
                        "see the onion-mx lines; check the onion service's tor"))
    return out


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict]:
    """The dict items of a JSON list (the daemon's answer is data, not trusted shape)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _ago(seconds: Any) -> str:
    try:
        s = int(float(seconds))
    except (TypeError, ValueError, OverflowError):  # the answer is data: inf, nan, "x"...
        return "?"
    return f"{s // 86400}d{s % 86400 // 3600}h" if s >= 86400 else \
        f"{s // 3600}h{s % 3600 // 60}m" if s >= 3600 else f"{s}s"


# ---- Postfix ------------------------------------------------------------------------------------

def _which(names: Sequence[str], fallbacks: Sequence[str] = ()) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    for path in fallbacks:
        if os.access(path, os.X_OK):
            return path
    return None


def socketmap_endpoint(table: str) -> str | None:
    """``[proxy:]socketmap:ENDPOINT:NAME`` -> ENDPOINT (None: not a socketmap table; pure)."""
    text = table.strip()
    if text.startswith("proxy:"):
        text = text[len("proxy:"):]
    if not text.startswith("socketmap:"):
        return None
    endpoint, sep, name = text[len("socketmap:"):].rpartition(":")
    return endpoint if sep and endpoint and name else None


def infer_setup(params: dict[str, str], services: dict[str, tuple[str, ...]]
                ) -> dict[str, Any]:
    """SetupOptions fields for a configuration set up by hand (no state file): the
    socketmap table of transport_maps, pipe or LMTP from master.cf, the pipe's program and
    user (pure)."""
    from ..mta.postfix import LMTP_SERVICE, PIPE_SERVICE, split_maps

    values: dict[str, Any] = {}
    for table in split_maps(params.get("transport_maps", "")):
        endpoint = socketmap_endpoint(table)
        if endpoint is not None:
            values["socket"] = endpoint
            values["proxy"] = table.strip().startswith("proxy:")
            break
    if LMTP_SERVICE in services and PIPE_SERVICE not in services:
        values["mode"] = "lmtp"
    pipe = services.get(PIPE_SERVICE, ())
    for item in pipe:
        if item.startswith("user="):
            values["user"] = item[5:].split(":")[0]
        elif item.startswith("argv="):
            values["program"] = item[5:]
        elif item.startswith("--config="):
            values["deliver_config"] = item[9:]
    return values


def check_postfix(opts: Options, facts: Facts) -> list[Check]:
    from ..mta.postfix import DEFAULT_CONFIG_DIR, PostfixConfig, SetupOptions, split_maps

    postconf = opts.postconf or _which(["postconf"], ["/usr/sbin/postconf"])
    directory = opts.postfix_dir or DEFAULT_CONFIG_DIR
    if postconf is None:
        if opts.postfix_dir:
            return [error("postfix", "postconf not found", "install postfix")]
        return [ok("postfix", "not installed (no postconf): skipped")]
    try:
        if not opts.postfix_dir and not Path(directory, "main.cf").exists():
            return [ok("postfix", f"no {directory}/main.cf: skipped")]
        pf = PostfixConfig(Path(directory), postconf=postconf)
        params = pf.params()
        services = pf.services()
        state = pf.load_state()
    except ConfigError as exc:
        return [error("postfix", str(exc), f"check {directory} (postconf -c {directory} -n)")]
    except (OSError, ValueError) as exc:  # permission, a state file that is not JSON
        return [error("postfix", f"{directory}: {exc}", "run the doctor as root (or a user "
                      "that can read the Postfix configuration)")]
    recorded = (state or {}).get("options") or infer_setup(params, services)
    try:
        options = SetupOptions(**recorded)
    except (ConfigError, TypeError) as exc:
        return [error("postfix", f"cannot tell how torroute is meant to be set up: {exc}",
                      f"torroute postfix setup -c {directory}")]
    out: list[Check] = []
    tables = split_maps(params.get("transport_maps", ""))
    ours = [i for i, t in enumerate(tables) if socketmap_endpoint(t) is not None]
    listeners = [str(ep) for ep in (facts.serve.listeners.get("socketmap", ())
                                    if facts.serve is not None else ())]
    if not ours:
        out.append(error("postfix-transport", "transport_maps has no socketmap table: "
                         "Postfix never asks torroute", f"torroute postfix setup -c {directory}"))
    else:
        endpoint = socketmap_endpoint(tables[ours[0]])
        if listeners and endpoint not in listeners:
            out.append(error("postfix-transport", f"transport_maps asks {endpoint}, the daemon "
                             f"listens on {', '.join(listeners)}", "make [serve] socketmap and "
                             f"transport_maps agree (torroute postfix setup --socket "
                             f"{listeners[0]})"))
        else:
            out.append(ok("postfix-transport", f"transport_maps asks the daemon at {endpoint}"))
    drift = pf.check(options)
    if drift:
        out.append(error("postfix-setup", f"{len(drift)} differences from the documented "
                         f"setup: {_more(drift)}", f"torroute postfix setup -c {directory} "
                         "(then postfix reload)"))
    else:
        out.append(ok("postfix-setup", f"{options.service} and main.cf as `torroute postfix "
                      "setup` leaves them"))
    out.append(onion_tables_line(tables[:ours[0]] if ours else tables, directory, opts.timeout))
    return out


def onion_tables_line(tables: Sequence[str], directory: str, timeout: float) -> Check:
    """Nothing routes .onion to the clear net: no transport table before torroute's answers
    for an onion address (asked with postmap -q)."""
    postmap = _which(["postmap"], ["/usr/sbin/postmap"])
    if not tables:
        return ok("postfix-onion", "torroute's table comes first in transport_maps: every "
                  ".onion goes to torroute")
    if postmap is None:
        return warn("postfix-onion", f"{len(tables)} tables before torroute's, not checked "
                    "(no postmap)", "put torroute's socketmap first in transport_maps")
    hits = []
    for table in tables:
        for key in (f"postmaster@{SAMPLE_ONION}", SAMPLE_ONION, ".onion"):
            try:
                result = subprocess.run([postmap, "-c", directory, "-q", key, table],
                                        capture_output=True, text=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if result.returncode == 0:
                hits.append(f"{table} answers {key!r} with {result.stdout.strip()!r}")
                break
    if hits:
        return error("postfix-onion", f"a transport table before torroute's routes .onion: "
                     f"{_more(hits)}", "remove the .onion entries or put torroute's socketmap "
                     "first in transport_maps")
    return warn("postfix-onion", f"{len(tables)} tables come before torroute's (none routes "
                ".onion now; their pins win over torroute's)", "put torroute's socketmap "
                "first in transport_maps")


# ---- Exim ---------------------------------------------------------------------------------------

def check_exim(opts: Options, facts: Facts) -> list[Check]:
    exim = opts.exim or _which(["exim4", "exim"], ["/usr/sbin/exim4", "/usr/sbin/exim"])
    if exim is None:
        return [ok("exim", "not installed (no exim4/exim): skipped")]

    def run(*args: str) -> subprocess.CompletedProcess:
        argv = [exim, *(("-C", opts.exim_config) if opts.exim_config else ()), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=opts.timeout)

    try:
        routers = run("-bP", "router_list")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [error("exim", f"cannot run {exim}: {exc}", "check the Exim installation")]
    if routers.returncode != 0:
        return [error("exim", f"{exim} -bP router_list failed: "
                      f"{(routers.stderr or routers.stdout).strip()[:300]}",
                      "fix the Exim configuration (exim -bV)")]
    names = routers.stdout.split()
    out: list[Check] = []
    if "torroute" not in names:
        out.append(error("exim-routers", f"no torroute router (routers: {' '.join(names)})",
                         "torroute exim setup (then update-exim4.conf and restart exim4)"))
    else:
        before = names[:names.index("torroute")]
        out.append(ok("exim-routers", "routers torroute" + (
            " and torroute_onion" if "torroute_onion" in names else "") +
            (f" after {', '.join(before)}" if before else " first")))
    transport = run("-bP", "transport", "torroute_smtp")
    socks = [line.split("=", 1)[1].strip() for line in transport.stdout.splitlines()
             if line.strip().startswith("socks_proxy") and "=" in line]
    if transport.returncode != 0 or not transport.stdout.strip():
        out.append(error("exim-transport", "no torroute_smtp transport",
                         "torroute exim setup"))
    elif not socks or not socks[0]:
        out.append(error("exim-transport", "torroute_smtp has no socks_proxy: it would dial "
                         "the onion's automap address directly", "set TORROUTE_SOCKS_PROXY "
                         "(the plugin's macros) to tor's SocksPort"))
    else:
        out.append(ok("exim-transport", f"torroute_smtp with socks_proxy {socks[0]}"))
    pins = facts.pins
    if pins is not None and pins.pins:
        domain = sorted(pins.pins)[0]
        try:
            bt = run("-bt", f"postmaster@{domain}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.append(error("exim-route", f"exim -bt: {exc}", "check Exim", temporary=True))
            return out
        text = " ".join(bt.stdout.split())
        if "router = torroute" in text and "transport = torroute_smtp" in text:
            out.append(ok("exim-route", f"exim -bt postmaster@{domain}: router torroute, "
                          "transport torroute_smtp"))
        elif bt.returncode == 1 and "defer" in text.lower():
            out.append(error("exim-route", f"exim -bt postmaster@{domain} defers: {text[:300]}",
                             "is the daemon running (the daemon lines)?", temporary=True))
        else:
            out.append(error("exim-route", f"exim -bt postmaster@{domain} (pinned) does not "
                             f"use torroute: {text[:300]}", "put the torroute routers before "
                             "dnslookup (torroute exim setup)"))
    return out


# ---- the onion MX -------------------------------------------------------------------------------

def check_onion_mx(opts: Options, facts: Facts) -> list[Check]:
    from ..tor.control import Tor
    from ..tor.relay_probe import relay_check

    config = facts.config
    assert config is not None
    onions = facts.onions
    if opts.onion_control:
        def read() -> list[Any]:
            with Tor.connect(opts.onion_control, config.tor_control_password) as tor:
                return tor.list_onions()
        try:
            onions = with_deadline(read, opts.timeout, "onion MX tor")
        except ControlAuthError as exc:
            return [error("onion-mx", str(exc), "give this user access to that control port")]
        except (TorrouteError, OSError) as exc:
            return [error("onion-mx", f"the onion MX's tor at {opts.onion_control}: {exc}",
                          "start that tor", temporary=True)]
    elif facts.tor_status is None:
        return [warn("onion-mx", "tor's control port did not answer: this machine's onion "
                     "services are unknown", "see the tor-control line")]
    services = [s for s in onions if any(p.virtual == 25 for p in s.ports) and s.address]
    if not services:
        ephemeral = sum(1 for s in onions if s.ephemeral)
        note = f" ({ephemeral} ephemeral services, whose ports tor does not report)" \
            if ephemeral else ""
        return [ok("onion-mx", f"no onion service with port 25 on this tor{note}: no onion "
                   "MX here")]
    out: list[Check] = []
    for service in services:
        name = service.address.removesuffix(".onion")[:16]
        try:
            banner = with_deadline(lambda s=service: banner_through_tor(
                s.address, 25, config.tor_socks, opts.timeout), opts.timeout + 2, "canary")
        except PermanentError as exc:
            out.append(error(f"onion-mx-reach {name}", str(exc), "check the service's client "
                             "authorization settings"))
        except (TorrouteError, OSError) as exc:
            out.append(error(f"onion-mx-reach {name}", f"{service.address}:25 not reachable "
                             f"through tor: {exc}", "wait for the descriptor (a new service "
                             "takes minutes), check tor's log and that the smtpd behind port "
                             "25 runs", temporary=True))
        else:
            out.append(ok(f"onion-mx-reach {name}", f"{service.address}:25 answers {banner}"))
        verdicts = relay_check(service.ports, opts.timeout)
        bad = [v for v in verdicts if v.refuse]
        missing = [v for v in verdicts if v.verdict == "no-listener"]
        if bad:
            out.append(error(f"onion-mx-relay {name}", "; ".join(v.line() for v in bad),
                             "point the onion port at an smtpd that trusts nobody "
                             "(mynetworks empty, reject_unauth_destination)"))
        elif missing:
            out.append(error(f"onion-mx-relay {name}", "; ".join(v.line() for v in missing),
                             "start the smtpd behind the onion port", temporary=True))
        else:
            out.append(ok(f"onion-mx-relay {name}", "; ".join(v.line() for v in verdicts)
                          or "no SMTP port to probe"))
    return out


# ---- a test message -----------------------------------------------------------------------------

def check_send_test(opts: Options, facts: Facts) -> list[Check]:
    import email.utils

    from ..delivery.client import send_message

    address = opts.send_test
    assert address is not None and facts.config is not None
    message = (f"From: {opts.send_from}\r\nTo: {address}\r\nSubject: torroute doctor test\r\n"
               f"Date: {email.utils.formatdate()}\r\nMessage-ID: {email.utils.make_msgid()}\r\n"
               "\r\nA test message from torroute doctor through the whole onion path.\r\n")
    results = send_message(message.encode("ascii"), opts.send_from, [address],
                           config=facts.config)
    result = results.get(address) or next(iter(results.values()))
    if result.status == "delivered":
        return [ok("send-test", f"{address}: delivered ({result.dsn} {result.text})")]
    return [error("send-test", f"{address}: {result.status} ({result.dsn} {result.text})",
                  "follow the lines above; the message was not sent in the clear",
                  temporary=result.temporary)]
