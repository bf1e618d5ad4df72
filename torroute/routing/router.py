"""Routing: domain (or address) -> onion route, no route, or temporary failure.

Order: local domains, ignored domains (no route); ``.onion`` destinations (themselves); pins from
maps; DNS SRV ``_onion-mx._tcp.<domain>``.  Any DNS failure is a TempFail: mail defers, it never
falls back to the clear net because a resolver was down.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from ..config import Config, normalize_domain
from ..endpoint import HostPort
from ..errors import InvalidOnion
from .decisions import Decision, NoRoute, Reject, Route, TempFail, destination_domain
from .maps import Pin, PinMap, load_maps
from .onion import is_onion_name, parse_onion
from .srv import SrvTarget, order_targets, valid_onion_targets

log = logging.getLogger(__name__)


def decide_static(domain: str, config: Config, pins: PinMap) -> Decision | None:
    """Every decision that needs no DNS; None means "ask DNS"."""
    if not domain or domain.startswith("["):
        return NoRoute(domain, "no domain" if not domain else "address literal")
    if is_onion_name(domain):
        try:
            onion = parse_onion(domain).host
        except InvalidOnion as exc:
            return Reject(domain, str(exc))
        return Route(domain, onion, config.default_port, "onion")
    try:
        domain = normalize_domain(domain)
    except ValueError as exc:
        return NoRoute(domain, f"not a routable domain: {exc}")
    if _matches(domain, config.local_domains):
        return NoRoute(domain, "local domain")
    if _matches(domain, config.ignore_domains):
        return NoRoute(domain, "ignored domain")
    pin = pins.lookup(domain)
    if pin is not None:
        if pin.__class__ is Pin:
            return Route(domain, pin.onion, pin.port, f"map {pin.source}")
        # an operator's typo: defer until the map is fixed; never SRV, never the clear net
        return TempFail(domain, f"invalid pin at {pin.source}: {pin.message}")
    return None


def _matches(domain: str, patterns: list[str]) -> bool:
    """Exact match, or a pattern with a leading dot matching subdomains (Postfix style)."""
    for pattern in patterns:
        if domain == pattern or (pattern.startswith(".") and domain.endswith(pattern)):
            return True
    return False


def srv_query(domain: str, config: Config) -> dns.message.QueryMessage:
    qname = dns.name.from_text(f"{config.srv_service}.{domain}")
    query = dns.message.make_query(qname, dns.rdatatype.SRV, want_dnssec=config.require_dnssec)
    query.flags |= dns.flags.AD  # RFC 6840: ask the validating resolver to report AD
    return query


def decide_srv(
    domain: str, query: dns.message.Message, response: dns.message.Message, config: Config
) -> tuple[Decision, float]:
    """A decision and how long it may be cached (0 = not at all) from one SRV response."""
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return NoRoute(domain, "no SRV record (NXDOMAIN)"), _negative_ttl(response, config)
    if rcode != dns.rcode.NOERROR:
        return TempFail(domain, f"DNS {dns.rcode.to_text(rcode)} for SRV"), 0.0
    try:
        chain = response.resolve_chaining()
    except dns.exception.DNSException as exc:
        return TempFail(domain, f"unusable DNS answer: {exc}"), 0.0
    if chain.answer is None:
        return NoRoute(domain, "no SRV record (NODATA)"), _negative_ttl(response, config)
    if config.require_dnssec and not response.flags & dns.flags.AD:
        return TempFail(domain, "SRV answer not DNSSEC-validated (no AD bit) and require_dnssec "
                                "is set"), 0.0
    records = [SrvTarget(r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True))
               for r in chain.answer]
    targets = valid_onion_targets(domain, records)
    ttl = float(min(chain.minimum_ttl, config.max_ttl))
    if not targets:
        return NoRoute(domain, "SRV has no valid v3 onion target"), ttl
    ordered = order_targets(targets)
    first = ordered[0]
    return Route(domain, first.target, first.port, "srv", ttl,
                 tuple((t.target, t.port) for t in ordered[1:])), ttl


def _negative_ttl(response: dns.message.Message, config: Config) -> float:
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return float(min(rrset.ttl, rrset[0].minimum, config.max_ttl))
    return float(min(config.negative_ttl, config.max_ttl))


class DecisionCache:
    """Bounded LRU of decisions with per-entry expiry (the DNS TTL)."""

    def __init__(self, size: int, clock=time.monotonic) -> None:
        self.size = size
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, Decision]] = OrderedDict()

    def get(self, key: str) -> tuple[Decision, float] | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, decision = item
        remaining = expires - self._clock()
        if remaining <= 0:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return decision, remaining

    def put(self, key: str, decision: Decision, ttl: float) -> None:
        if ttl <= 0 or self.size <= 0:
            return
        self._data[key] = (self._clock() + ttl, decision)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def load_pins(config: Config) -> PinMap:
    """The pins of ``config.maps``; raises MapError (FILE:LINE) on a map that does not parse."""
    return load_maps(config.maps, config.default_port, config.v2_pins)


@dataclass
class Router:
    """The routing core shared by the CLI, the daemon and library users."""

    config: Config
    pins: PinMap | None = None  # None: loaded from config.maps

    def __post_init__(self) -> None:
        self.cache = DecisionCache(self.config.cache_size)
        self._inflight: dict[str, asyncio.Future[Decision]] = {}  # one DNS query per domain
        self._nameservers: list[HostPort] | None = None
        self.dns_queries = 0  # counts queries sent, for tests and stats
        if self.pins is None:
            self.pins = load_pins(self.config)

    @classmethod
    def from_config(cls, config: Config) -> Router:
        return cls(config, load_pins(config))

    def reload(self, config: Config) -> None:
        """Swap in a new configuration and maps (load first: a broken map file raises MapError
        and the old configuration stays, whole)."""
        pins = load_pins(config)
        self.config, self.pins = config, pins
        self.cache = DecisionCache(config.cache_size)
        self._nameservers = None

    # -- decisions -----------------------------------------------------------------------
    def route(self, domain_or_address: str) -> Decision:
        domain = destination_domain(domain_or_address)
        static = decide_static(domain, self.config, self.pins)
        if static is not None:
            return static
        domain = normalize_domain(domain)
        cached = self._cached(domain)
        if cached is not None:
            return cached
        decision, ttl = self._lookup_sync(domain)
        self.cache.put(domain, decision, ttl)
        return decision

    async def aroute(self, domain_or_address: str) -> Decision:
        domain = destination_domain(domain_or_address)
        static = decide_static(domain, self.config, self.pins)
        if static is not None:
            return static
        domain = normalize_domain(domain)
        cached = self._cached(domain)
        if cached is not None:
            return cached
        pending = self._inflight.get(domain)
        if pending is None:
            # the query runs in its own task: a caller that gives up (cancelled) does not cancel
            # it for the others waiting on the same domain
            pending = asyncio.ensure_future(self._lookup_and_cache(domain))
            self._inflight[domain] = pending
            pending.add_done_callback(lambda _f, d=domain: self._inflight.pop(d, None))
        return await asyncio.shield(pending)

    async def _lookup_and_cache(self, domain: str) -> Decision:
        decision, ttl = await self._lookup_async(domain)
        self.cache.put(domain, decision, ttl)
        return decision

    def _cached(self, domain: str) -> Decision | None:
        hit = self.cache.get(domain)
        if hit is None:
            return None
        decision, remaining = hit
        if isinstance(decision, Route):
            return Route(decision.domain, decision.onion, decision.port, decision.source,
                         remaining, decision.alternatives)
        return decision

    # -- DNS I/O ---------------------------------------------------------------------------
    def nameservers(self) -> list[HostPort]:
        if self._nameservers is None:
            if self.config.nameservers is not None:
                self._nameservers = list(self.config.nameservers)
            else:  # production default only: the system resolver
                import dns.resolver

                resolver = dns.resolver.Resolver()
                self._nameservers = [(str(ns), resolver.port) for ns in resolver.nameservers]
        return self._nameservers

    def _judge(self, domain: str, query: dns.message.Message, response: dns.message.Message,
               host: str, port: int) -> tuple[Decision, float] | str:
        """A final decision with its TTL, or why this nameserver's answer is a failure."""
        decision, ttl = decide_srv(domain, query, response, self.config)
        if isinstance(decision, TempFail):
            return f"{decision.reason} from {host}:{port}"
        return decision, ttl

    def _lookup_sync(self, domain: str) -> tuple[Decision, float]:
        import dns.query

        query = srv_query(domain, self.config)
        failure = "no nameserver configured"
        for host, port in self.nameservers():
            self.dns_queries += 1
            try:
                # a connected socket: an ICMP "port unreachable" fails the query at once
                # (ECONNREFUSED) instead of after dns_timeout, and the next server is asked
                with _connected_udp(host, port) as sock:
                    response = dns.query.udp(query, host, port=port, sock=sock,
                                             timeout=self.config.dns_timeout,
                                             ignore_unexpected=True)
                if response.flags & dns.flags.TC:
                    response = dns.query.tcp(query, host, port=port,
                                             timeout=self.config.dns_timeout)
            except (dns.exception.DNSException, OSError) as exc:
                failure = _describe(exc, host, port)
                continue
            outcome = self._judge(domain, query, response, host, port)
            if isinstance(outcome, str):
                failure = outcome  # try the next nameserver
                continue
            return outcome
        return TempFail(domain, failure), 0.0

    async def _lookup_async(self, domain: str) -> tuple[Decision, float]:
        import dns.asyncbackend
        import dns.asyncquery

        query = srv_query(domain, self.config)
        failure = "no nameserver configured"
        for host, port in self.nameservers():
            self.dns_queries += 1
            try:
                # connected, as in _lookup_sync (asyncio's backend would not connect it)
                backend = dns.asyncbackend.get_default_backend()
                async with await backend.make_socket(_family(host), socket.SOCK_DGRAM, 0, None,
                                                     (host, port)) as sock:
                    response = await dns.asyncquery.udp(query, host, port=port, sock=sock,
                                                        timeout=self.config.dns_timeout,
                                                        ignore_unexpected=True)
                if response.flags & dns.flags.TC:
                    response = await dns.asyncquery.tcp(query, host, port=port,
                                                        timeout=self.config.dns_timeout)
            except (dns.exception.DNSException, OSError) as exc:
                failure = _describe(exc, host, port)
                continue
            outcome = self._judge(domain, query, response, host, port)
            if isinstance(outcome, str):
                failure = outcome  # try the next nameserver
                continue
            return outcome
        return TempFail(domain, failure), 0.0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _connected_udp(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket connected to a nameserver (dnspython wants it non-blocking)."""
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _describe(exc: BaseException, host: str, port: int) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return f"DNS timeout asking {host}:{port}"
    if isinstance(exc, OSError):
        return f"DNS server {host}:{port} unreachable: {exc.strerror or exc}"
    return f"DNS error from {host}:{port}: {exc}"
