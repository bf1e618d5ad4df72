"""``torroute map check``: every entry of a map validated, each pinned domain's SRV compared
with its pin, optionally each onion dialed through tor -- a report a map maintainer runs in CI
and the doctor's "pins vs DNS" check.

Entry verdicts: ``ok``; ``warn`` (the map routes, but something is stale: SRV points
elsewhere or to a v2 onion, a domain listed twice with the same target); ``invalid`` (the entry
does not route as written: a mistyped or v2 onion, a domain listed twice with different
targets); ``temporary`` (the check could not be made now: DNS or tor failed, the onion did not
answer).  Exit status (:meth:`MapCheck.exit_status`): 65 if any entry is invalid (or, with
``strict``, any warns), else 75 if any check was temporary, else 0; 66 when a map file cannot
be read at all (see :func:`check_maps`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import exitcodes
from ..config import Config
from ..endpoint import HostPort
from ..errors import InvalidOnion, MapError, PermanentError, TorrouteError
from .maps import PinMap, load_maps
from .onion import is_v2_onion, parse_onion
from .srv import SrvTarget

OK, WARN, INVALID, TEMPORARY = "ok", "warn", "invalid", "temporary"
RANK = {OK: 0, WARN: 1, TEMPORARY: 2, INVALID: 3}


@dataclass(frozen=True)
class SrvAnswer:
    """One SRV question's outcome: ``records`` (empty: no SRV record) or ``error``."""

    records: tuple[SrvTarget, ...] = ()
    error: str | None = None


def srv_answer(domain: str, config: Config, nameservers: Sequence[HostPort]) -> SrvAnswer:
    """Ask ``_onion-mx._tcp.<domain>`` (config.srv_service) of the nameservers in turn, as the
    router does (:func:`~torroute.routing.router.srv_query`, TCP on truncation), and keep every
    record as it is -- clear-net and v2 targets included, which the router drops."""
    import dns.exception
    import dns.flags
    import dns.query
    import dns.rcode
    import dns.rdatatype

    from .router import _connected_udp, _describe, srv_query

    query = srv_query(domain, config)
    failure = "no nameserver configured"
    for host, port in nameservers:
        try:
            with _connected_udp(host, port) as sock:
                response = dns.query.udp(query, host, port=port, sock=sock,
                                         timeout=config.dns_timeout, ignore_unexpected=True)
            if response.flags & dns.flags.TC:
                response = dns.query.tcp(query, host, port=port, timeout=config.dns_timeout)
        except (dns.exception.DNSException, OSError) as exc:
            failure = _describe(exc, host, port)
            continue
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return SrvAnswer()
        if rcode != dns.rcode.NOERROR:
            failure = f"DNS {dns.rcode.to_text(rcode)} from {host}:{port}"
            continue
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException as exc:
            failure = f"unusable DNS answer from {host}:{port}: {exc}"
            continue
        if chain.answer is None:
            return SrvAnswer()
        return SrvAnswer(tuple(
            SrvTarget(r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True))
            for r in chain.answer if r.rdtype == dns.rdatatype.SRV))
    return SrvAnswer(error=failure)


def compare_srv(onion: str, port: int, answer: SrvAnswer) -> tuple[str, str]:
    """(verdict, why) of a pin ``onion:port`` against its domain's SRV answer (pure)."""
    if answer.error is not None:
        return TEMPORARY, f"SRV lookup failed: {answer.error}"
    records = [r for r in answer.records if r.target not in ("", ".")]
    if not records:
        return OK, "no SRV record: the pin is the only route"
    valid: list[tuple[str, int]] = []
    v2: list[str] = []
    other: list[str] = []
    for r in records:
        try:
            valid.append((parse_onion(r.target).host, r.port))
        except InvalidOnion:
            (v2 if is_v2_onion(r.target) else other).append(f"{r.target[:80]}:{r.port}")
    notes = []
    if v2:
        notes.append(f"SRV also points to a v2 onion (dead since 2021): {', '.join(v2)}")
    if other:
        notes.append(f"SRV has targets that are no v3 onion: {', '.join(other)}")
    if any(o == onion for o, _ in valid):
        ports = sorted({p for o, p in valid if o == onion})
        if port not in ports:
            return WARN, (f"SRV names the pinned onion on port {', '.join(map(str, ports))}, "
                          f"the pin uses {port}")
        others = sorted({f"{o}:{p}" for o, p in valid if o != onion})
        agrees = "SRV agrees with the pin" + (
            f" (it also lists {', '.join(others)}: backups the pin does not use)"
            if others else "")
        return (WARN, f"{agrees}; " + "; ".join(notes)) if notes else (OK, agrees)
    if valid:
        shown = ", ".join(f"{o}:{p}" for o, p in valid)
        return WARN, f"SRV points elsewhere: {shown} (pinned: {onion}:{port})" + \
            ("; " + "; ".join(notes) if notes else "")
    return WARN, "; ".join(notes)


@dataclass
class Entry:
    """One domain of the maps and what was found about it."""

    domain: str
    source: str  # FILE:LINE
    status: str = OK
    onion: str | None = None
    port: int | None = None
    notes: list[str] = field(default_factory=list)
    srv: str | None = None  # the SRV comparison, one line
    probe: str | None = None  # the reachability probe, one line

    def mark(self, status: str, note: str) -> None:
        if RANK[status] > RANK[self.status]:
            self.status = status
        self.notes.append(note)

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "source": self.source, "status": self.status,
                "onion": self.onion, "port": self.port, "notes": self.notes,
                "srv": self.srv, "probe": self.probe}


@dataclass
class MapCheck:
    files: list[str] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # file-level (not an entry)
    strict: bool = False

    def counts(self) -> dict[str, int]:
        return {s: sum(e.status == s for e in self.entries) for s in RANK}

    def exit_status(self) -> int:
        statuses = {e.status for e in self.entries}
        if INVALID in statuses or (self.strict and (WARN in statuses or self.problems)):
            return exitcodes.DATAERR
        if TEMPORARY in statuses:
            return exitcodes.TEMPFAIL
        return exitcodes.OK

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.exit_status() == exitcodes.OK, "exit": self.exit_status(),
                "files": self.files, "counts": self.counts(), "problems": self.problems,
                "entries": [e.to_dict() for e in self.entries]}


def entries_of(pinmap: PinMap) -> list[Entry]:
    """Every entry the loader saw, as an :class:`Entry` with its load verdict (pure)."""
    out: list[Entry] = []
    for pin in pinmap.pins.values():
        out.append(Entry(pin.domain, pin.source, onion=pin.onion, port=pin.port))
    for bad in pinmap.invalid.values():
        e = Entry(bad.domain, bad.source)
        e.mark(INVALID, f"invalid pin (mail for it defers): {bad.message}")
        out.append(e)
    for problem in pinmap.v2:  # message: "DOMAIN: v2 onion HOST"
        domain, _, what = problem.message.partition(": ")
        e = Entry(domain, problem.source)
        e.mark(INVALID, f"{what} (v2 onion services are dead since 2021): the entry is "
               "ignored, the domain routed as if unpinned")
        out.append(e)
    by_domain = {e.domain: e for e in out}
    for domain, earlier, later, same in pinmap.duplicates:
        e = by_domain.get(domain)
        if e is None:
            continue
        if same:
            e.mark(WARN, f"listed twice with the same target ({earlier} and {later})")
        else:
            e.mark(INVALID, f"listed twice with different targets: {earlier} is overridden "
                   f"by {later}")
    out.sort(key=lambda e: _source_key(e.source))
    return out


def _source_key(source: str) -> tuple[str, int]:
    file, _, line = source.rpartition(":")
    return (file, int(line)) if line.isdigit() else (source, 0)


Prober = Callable[[str, int], str]


def check_maps(paths: Iterable[Path | str], config: Config, *, dns: bool = True,
               nameservers: Sequence[HostPort] | None = None, probe: Prober | None = None,
               concurrency: int = 8, strict: bool = False) -> MapCheck:
    """Load the maps (raises MapError: FILE:LINE when a file does not parse) and check every
    entry: its load verdict, its SRV (``dns``) and, with ``probe`` (``probe(onion, port)``
    returns a line or raises TorrouteError), each onion once, ``concurrency`` at a time."""
    quiet = logging.getLogger("torroute.routing.maps")
    saved = quiet.disabled
    quiet.disabled = True  # every problem becomes an entry line; no log copy of it
    try:
        pinmap = load_maps(paths, default_port=config.default_port, v2_pins="unpinned")
    finally:
        quiet.disabled = saved
    report = MapCheck(files=[str(f) for f in pinmap.files], strict=strict)
    report.entries = entries_of(pinmap)
    listed = {e.source for e in report.entries}
    report.problems = [str(p) for p in pinmap.problems
                       if p.source not in listed and "invalid pin" not in p.message]
    routed = [e for e in report.entries if e.onion is not None]
    workers = max(1, concurrency)
    if dns and routed:
        servers = list(nameservers if nameservers is not None else _nameservers(config))
        with ThreadPoolExecutor(workers, thread_name_prefix="mapcheck-srv") as pool:
            answers = pool.map(lambda e: srv_answer(e.domain, config, servers), routed)
            for entry, answer in zip(routed, answers, strict=True):
                verdict, why = compare_srv(entry.onion, entry.port, answer)
                entry.srv = why
                if verdict != OK:
                    entry.mark(verdict, why)
    if probe is not None and routed:
        targets = sorted({(e.onion, e.port) for e in routed})
        with ThreadPoolExecutor(min(workers, len(targets)),
                                thread_name_prefix="mapcheck-probe") as pool:
            results = dict(zip(targets, pool.map(lambda t: _probe(probe, *t), targets),
                               strict=True))
        for entry in routed:
            verdict, why = results[(entry.onion, entry.port)]
            entry.probe = why
            if verdict != OK:
                entry.mark(verdict, why)
    return report


def _probe(probe: Prober, onion: str, port: int) -> tuple[str, str]:
    try:
        return OK, f"reachable: {probe(onion, port)}"
    except PermanentError as exc:  # client authorization: the map's onion is unusable
        return WARN, f"not usable: {exc}"
    except (TorrouteError, OSError) as exc:
        return TEMPORARY, f"unreachable now: {exc}"


def _nameservers(config: Config) -> list[HostPort]:
    from .router import Router

    return Router(config, PinMap()).nameservers()


def tor_prober(config: Config, timeout: float) -> Prober:
    """The reachability probe: the onion's SMTP banner through tor's SocksPort."""
    from ..doctor.probes import banner_through_tor

    def probe(onion: str, port: int) -> str:
        return banner_through_tor(onion, port, config.tor_socks, timeout)

    return probe


__all__ = ["SrvAnswer", "srv_answer", "compare_srv", "Entry", "MapCheck", "entries_of",
           "check_maps", "tor_prober", "MapError"]
