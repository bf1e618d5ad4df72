"""The daemon's Prometheus metrics: ``GET /metrics`` over HTTP on a loopback (or unix) endpoint.

Hand-written with the standard library rather than prometheus_client: the exposition (text
format 0.0.4) is ~100 lines here, the daemon's state is already counted where it happens
(lookups in :mod:`.lookup`, relay attempts by the observer below, health in
:mod:`.health`), and the client library would add a dependency and import time to every
``torroute serve`` start for no behaviour we need.  Everything is rendered at scrape time from
that state, so a scrape costs nothing between scrapes.

The HTTP side is a minimal HTTP/1.1 responder: one request per connection, a bounded request
head (:data:`MAX_HEAD`) and a deadline (:data:`.side.DEADLINE`); only ``GET /metrics`` answers 200.
The request parser (:func:`parse_request`) is pure: bytes in, a request or an error out.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import ProtocolError
from .side import OneRequestConnection, SideListener

if TYPE_CHECKING:
    from ..delivery.relay import Attempt, Relay
    from .service import LookupDaemon

log = logging.getLogger(__package__)

#: relay latency buckets (seconds): an onion dial alone takes 1-10 s, a timeout 60 s or more
RELAY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
#: at most this many onions get per-onion series (the worst first): label cardinality bound
MAX_ONION_SERIES = 100
MAX_HEAD = 8192  # bytes of request line + headers
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# ---- exposition (text format 0.0.4)

def escape_label(value: str) -> str:
    """A label value: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and line feed escaped (quotes stay)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Sample = tuple[Mapping[str, str], float]


class Exposition:
    """Metric families in the text format, each with its HELP and TYPE line once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, text: str, samples: Iterable[Sample]) -> None:
        """``samples``: (labels, value); a family with no samples still gets HELP/TYPE."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad metric name {name!r}")
        self.lines.append(f"# HELP {name} {escape_help(text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.sample(name, labels, value)

    def sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        if labels:
            for key in labels:
                if not _LABEL.fullmatch(key) or key.startswith("__"):
                    raise ValueError(f"bad label name {key!r}")
            inner = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {format_value(value)}")
        else:
            self.lines.append(f"{name} {format_value(value)}")

    def histogram(self, name: str, text: str,
                  series: Iterable[tuple[Mapping[str, str], Histogram]]) -> None:
        self.lines.append(f"# HELP {name} {escape_help(text)}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, hist in series:
            running = 0
            for bound, count in zip((*hist.bounds, math.inf), hist.counts, strict=True):
                running += count
                self.sample(f"{name}_bucket", {**labels, "le": format_value(float(bound))},
                            running)
            self.sample(f"{name}_sum", labels, hist.sum)
            self.sample(f"{name}_count", labels, hist.count)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Histogram:
    """Cumulative-on-render histogram: one bucket increment per observation."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = RELAY_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value
        self.count += 1


# ---- what the daemon counts

class RelayCounters:
    """Relay attempts by outcome and reason class, and their latency: a cheap
    ``Relay.on_attempt`` observer (two dict increments and a bisect)."""

    def __init__(self) -> None:
        self.attempts: dict[tuple[str, str], int] = {}
        self.seconds: dict[str, Histogram] = {}

    def observe(self, attempt: Attempt) -> None:
        key = (attempt.status, attempt.reason_class)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        hist = self.seconds.get(attempt.status)
        if hist is None:
            hist = self.seconds[attempt.status] = Histogram()
        hist.observe(max(0.0, attempt.seconds))

    def by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_status, reason), n in self.attempts.items():
            out[reason] = out.get(reason, 0) + n
        return out


def relay_counters(daemon: LookupDaemon) -> RelayCounters:
    """The daemon's one RelayCounters, made (and registered on the LMTP relay) on first use:
    the metrics endpoint and the status socket share it."""
    counters = daemon.relay_counters
    if counters is None:
        counters = daemon.relay_counters = RelayCounters()
        if daemon.lmtp is not None:
            daemon.lmtp.relay.on_attempt.append(counters.observe)
    return counters


def lookup_counts(daemon: LookupDaemon) -> dict[str, dict[str, int]]:
    """{protocol: {result: n}} as counted by :mod:`.lookup` (a copy)."""
    return {proto: dict(counts) for proto, counts in daemon.lookups.items()}


def health_snapshot(daemon: LookupDaemon) -> dict[str, Any]:
    """``daemon.health.snapshot()``, or {} without a health service or when it fails (the
    metrics and the status socket then show what they have, never an error)."""
    health = daemon.health
    if health is None:
        return {}
    try:
        snap = health.snapshot()
    except Exception:
        log.exception("health snapshot failed")
        return {}
    return snap if isinstance(snap, dict) else {}


def worst_onions(onions: list[dict[str, Any]], limit: int = MAX_ONION_SERIES
                 ) -> list[dict[str, Any]]:
    """The per-onion rows, worst first (most consecutive failures, then the most recent
    failure), at most ``limit``."""
    def key(row: dict[str, Any]) -> tuple[float, float]:
        return (-(_num(row.get("consecutive_failures")) or 0),
                -(_num(row.get("last_failure")) or 0))

    rows = [r for r in onions if isinstance(r, dict) and isinstance(r.get("onion"), str)]
    return sorted(rows, key=key)[:limit]


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return value if isinstance(value, int | float) else None


def render(daemon: LookupDaemon, now: float | None = None) -> str:
    """The whole exposition for ``daemon`` (a LookupDaemon; missing parts are left out)."""
    out = Exposition()
    now = time.time() if now is None else now
    out.family("torroute_build_info", "gauge", "torroute's version (always 1)",
               [({"version": __version__}, 1)])
    out.family("torroute_start_time_seconds", "gauge", "When the daemon started (Unix time)",
               [({}, daemon.started)])
    lookups = lookup_counts(daemon)
    out.family("torroute_lookups_total", "counter",
               "Lookups answered, by protocol and result (route, noroute, tempfail, reject)",
               [({"protocol": p, "result": r}, n)
                for p, counts in sorted(lookups.items()) for r, n in sorted(counts.items())])
    out.family("torroute_malformed_requests_total", "counter",
               "Lookup requests that were not the protocol (answered with its error)",
               [({}, daemon.malformed)])
    out.family("torroute_connections", "gauge", "Open lookup and LMTP connections",
               [({}, len(daemon.connections))])
    state = daemon.reload_state
    out.family("torroute_reload_ok", "gauge",
               "1 if the last (re)load of the configuration worked, 0 if it failed "
               "(the old configuration is still served)", [({}, bool(state.ok))])
    out.family("torroute_reload_timestamp_seconds", "gauge",
               "When the configuration was last (re)loaded or a reload failed",
               [({}, state.when)])
    out.family("torroute_pinned_domains", "gauge", "Pinned domains served now",
               [({}, state.pinned)])
    out.family("torroute_reload_failures_total", "counter", "Failed reloads (SIGHUP) since start",
               [({}, daemon.reload_failures)])
    counters = daemon.relay_counters
    if counters is not None:
        out.family("torroute_relay_attempts_total", "counter",
                   "LMTP relay attempts of one onion target, by outcome (delivered, deferred, "
                   "bounced) and reason class (delivered, descriptor, introduction, "
                   "rendezvous, timeout, tor_down, mx_deferred, ...)",
                   [({"outcome": o, "reason": r}, n)
                    for (o, r), n in sorted(counters.attempts.items())])
        out.histogram("torroute_relay_seconds",
                      "Seconds per relay attempt (tor dial + SMTP session), by outcome",
                      [({"outcome": o}, h) for o, h in sorted(counters.seconds.items())])
    _relay_stats(out, daemon.lmtp.relay if daemon.lmtp is not None else None)
    _health(out, health_snapshot(daemon))
    return out.text()


def _relay_stats(out: Exposition, relay: Relay | None) -> None:
    """The LMTP relay's own counters (its pool and per-onion gates); none without a relay."""
    stats = relay.stats if relay is not None else {}
    gates = relay.gates.stats if relay is not None else {}
    if isinstance(stats.get("transactions"), int):
        out.family("torroute_relay_transactions_total", "counter",
                   "LMTP transactions the relay handled (whatever their outcome)",
                   [({}, stats["transactions"])])
    conns = [({"how": how}, stats[how]) for how in ("dialed", "reused")
             if isinstance(stats.get(how), int)]
    if conns:
        out.family("torroute_relay_connections_total", "counter",
                   "SMTP sessions of the relay: newly dialed through tor, or pooled and reused",
                   conns)
    for key, name, text in (
            ("queued", "torroute_relay_queued_total",
             "Relay transactions that waited for a connection slot of their onion"),
            ("busy_refused", "torroute_relay_busy_refused_total",
             "Relay transactions answered 451 busy at once (too many waiting for one onion)")):
        if isinstance(gates.get(key), int):
            out.family(name, "counter", text, [({}, gates[key])])


def _health(out: Exposition, snap: dict[str, Any]) -> None:
    onions = snap.get("onions")
    if isinstance(onions, list):
        shown = worst_onions(onions)
        out.family("torroute_onions_tracked", "gauge",
                   "Onion targets with health state (per-onion series are capped at "
                   f"{MAX_ONION_SERIES}, the worst first)", [({}, len(onions))])
        out.family("torroute_onion_consecutive_failures", "gauge",
                   "Failed relay attempts of an onion since its last success",
                   [(_onion_labels(r), _num(r.get("consecutive_failures")) or 0)
                    for r in shown])
        out.family("torroute_onion_last_success_timestamp_seconds", "gauge",
                   "When an onion last took mail (Unix time)",
                   [(_onion_labels(r), _num(r["last_success"])) for r in shown
                    if _num(r.get("last_success")) is not None])
    canaries = snap.get("canaries")
    if isinstance(canaries, list):
        rows = [c for c in canaries if isinstance(c, dict) and isinstance(c.get("target"), str)]
        out.family("torroute_canary_up", "gauge",
                   "1 if the last canary dial of the target got through tor, 0 if not "
                   "(absent until the first check)",
                   [({"target": c["target"]}, bool(c["up"])) for c in rows
                    if c.get("up") is not None])
        out.family("torroute_canary_last_check_timestamp_seconds", "gauge",
                   "When the canary target was last dialed (Unix time)",
                   [({"target": c["target"]}, _num(c["last_check"])) for c in rows
                    if _num(c.get("last_check")) is not None])
    healing = snap.get("healing")
    if isinstance(healing, dict):
        for key, name, text in (
                ("newnym_total", "torroute_heal_newnym_total",
                 "NEWNYM signals sent to tor by self-healing"),
                ("suppressed_total", "torroute_heal_suppressed_total",
                 "Self-healing NEWNYMs held back (rate limit or too little evidence)")):
            if _num(healing.get(key)) is not None:
                out.family(name, "counter", text, [({}, _num(healing[key]))])
    tor = snap.get("tor")
    if isinstance(tor, dict) and _num(tor.get("bootstrap")) is not None:
        out.family("torroute_tor_bootstrap_percent", "gauge",
                   "tor's bootstrap progress as its control port reports it (100: ready)",
                   [({}, _num(tor["bootstrap"]))])


def _onion_labels(row: dict[str, Any]) -> dict[str, str]:
    port = row.get("port")
    return {"onion": row["onion"], "port": str(port if isinstance(port, int) else "")}


# ---- HTTP

@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str  # the request target, e.g. /metrics?x=1
    version: str  # HTTP/1.0 or HTTP/1.1

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


_REQUEST_LINE = re.compile(r"([A-Z]{1,20}) (\S{1,2000}) (HTTP/1\.[01])")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~]*")


def parse_request(buf: bytes, max_head: int = MAX_HEAD) -> HttpRequest | None:
    """The request of ``buf`` once its head (up to the empty line) is complete; None while
    it is not.  ProtocolError for anything that is not an HTTP/1.x request head, or a head
    longer than ``max_head``.  A body is never read: GET has none."""
    end = buf.find(b"\r\n\r\n")
    sep = 4
    lf = buf.find(b"\n\n")
    if lf != -1 and (end == -1 or lf < end):
        end, sep = lf, 2
    if end == -1:
        if len(buf) > max_head:
            raise ProtocolError("request head too long")
        return None
    if end + sep > max_head:
        raise ProtocolError("request head too long")
    try:
        head = buf[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("request head is not ASCII") from None
    lines = head.replace("\r\n", "\n").split("\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise ProtocolError("not an HTTP/1.x request line")
    for line in lines[1:]:
        if not _HEADER.fullmatch(line):
            raise ProtocolError("malformed header line")
    return HttpRequest(*match.groups())


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             extra: str = "") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              408: "Request Timeout", 431: "Request Header Fields Too Large",
              500: "Internal Server Error", 503: "Service Unavailable"}[status]
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode("ascii") + body


def answer(request: HttpRequest, metrics: Callable[[], str]) -> bytes:
    """The response to one parsed request: only ``GET /metrics`` gets the exposition."""
    if request.method != "GET":
        return response(405, b"only GET\n", extra="Allow: GET\r\n")
    if request.path != "/metrics":
        return response(404, b"not found: try /metrics\n")
    return response(200, metrics().encode("utf-8"), CONTENT_TYPE)


class _HttpConnection(OneRequestConnection):
    service: MetricsService

    def on_data(self, buf: bytes) -> bytes | None:
        try:
            request = parse_request(buf)
        except ProtocolError as exc:
            self.service.bad_requests += 1
            log.debug("metrics: bad request (%s)", exc)
            return response(431 if "too long" in str(exc) else 400, f"{exc}\n".encode())
        if request is None:
            return None
        try:
            return answer(request, self.service.render)
        except Exception:  # a broken part of the state must not take the endpoint down
            log.exception("metrics: rendering failed")
            return response(500, b"rendering failed\n")

    def on_eof(self, buf: bytes) -> bytes:
        self.service.bad_requests += 1
        return response(400, b"incomplete request\n")

    def on_timeout(self) -> bytes:
        return response(408, b"request timeout\n")

    def on_busy(self) -> bytes:
        return response(503, b"busy\n")


class MetricsService(SideListener):
    """The /metrics endpoint of one daemon (``settings.metrics``)."""

    kind = "metrics"
    connection = _HttpConnection

    def __init__(self, daemon: LookupDaemon) -> None:
        super().__init__(daemon, daemon.settings.metrics)
        self.bad_requests = 0
        relay_counters(daemon)

    def render(self) -> str:
        return render(self.daemon)


def make_service(daemon: LookupDaemon) -> MetricsService | None:
    """The /metrics endpoint if ``[serve] metrics`` / ``--metrics`` asks for one."""
    if daemon.settings.metrics is None:
        return None
    return MetricsService(daemon)
