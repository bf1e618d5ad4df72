"""Routing: domain (or address) -> onion route, no route, or temporary failure.

Order: local domains, ignored domains (no route); ``.onion`` destinations (themselves); pins from
maps; DNS SRV ``_onion-mx._tcp.<domain>``.  Any DNS failure is a TempFail: mail defers, it never
falls back to the clear net because a resolver was down.

The parts: :func:`decide_static` (everything that needs no DNS), :func:`srv_query` and
:func:`decide_srv` (one SRV question and what its answer means), :class:`SrvLookup` (the
nameservers in turn, pure), and :class:`Router`, whose one fast path (:meth:`Router.decide_now`)
serves the CLI, the library and the daemon alike, with a blocking and an asyncio driver of
:class:`SrvLookup` behind it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
import time
from collections import OrderedDict

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from ..config import Config, domain_matches, normalize_domain
from ..endpoint import HostPort
from ..errors import InvalidOnion
from . import dns_wire
from .decisions import Decision, NoRoute, Reject, Route, TempFail, destination_domain
from .dns_transport import UdpNameserver, encode_query
from .maps import Pin, PinMap, load_maps
from .memo import ByteMemo
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
    if domain_matches(domain, config.local_domains):
        return NoRoute(domain, "local domain")
    if domain_matches(domain, config.ignore_domains):
        return NoRoute(domain, "ignored domain")
    pin = pins.lookup(domain)
    if pin is not None:
        if pin.__class__ is Pin:
            return Route(domain, pin.onion, pin.port, f"map {pin.source}")
        # an operator's typo: defer until the map is fixed; never SRV, never the clear net
        return TempFail(domain, f"invalid pin at {pin.source}: {pin.message}")
    if len(domain) + len(config.srv_service) + 1 > 253:  # over 255 octets on the wire
        return NoRoute(domain, "too long for an SRV name: no SRV record can exist")
    return None


def srv_query(domain: str, config: Config) -> dns.message.QueryMessage:
    qname = dns.name.from_text(f"{config.srv_service}.{domain}")
    query = dns.message.make_query(qname, dns.rdatatype.SRV, want_dnssec=config.require_dnssec)
    query.flags |= dns.flags.AD  # RFC 6840: ask the validating resolver to report AD
    return query


def srv_query_wire(domain: str, config: Config) -> bytes:
    """:func:`srv_query`'s wire bytes (id 0), rendered without dnspython for plain names."""
    wire = encode_query(f"{config.srv_service}.{domain}", dns.rdatatype.SRV,
                        dns.flags.RD | dns.flags.AD, config.require_dnssec)
    if wire is None:
        query = srv_query(domain, config)
        query.id = 0
        wire = query.to_wire()
    return wire


def decide_srv(
    domain: str, query: dns.message.Message | None, response: dns.message.Message,
    config: Config,
) -> tuple[Decision, float]:
    """A decision and how long it may be cached (0 = not at all) from one SRV response (the
    response is already matched to ``query``, which may be None)."""
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return NoRoute(domain, _NXDOMAIN), _negative_ttl(response, config)
    if rcode != dns.rcode.NOERROR:
        return _rcode_failure(domain, rcode), 0.0
    try:
        chain = response.resolve_chaining()
    except dns.exception.DNSException as exc:
        return TempFail(domain, f"unusable DNS answer: {exc}"), 0.0
    if chain.answer is None:
        return NoRoute(domain, _NODATA), _negative_ttl(response, config)
    return _decide_answer(domain, response.flags, [
        SrvTarget(r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True))
        for r in chain.answer], chain.minimum_ttl, config)


def decide_srv_wire(domain: str, response: dns_wire.Response,
                    config: Config) -> tuple[Decision, float] | None:
    """:func:`decide_srv` on a response read by :func:`torroute.routing.dns_wire.decode`,
    without dnspython; None when dnspython must decide (a CNAME chain too long, a target
    needing escapes).  Gives exactly what
    :func:`decide_srv` gives for the same bytes (tests/unit/test_routing_dns_wire.py)."""
    rcode = response.flags & 0x000F
    if rcode == dns_wire.NXDOMAIN:
        return NoRoute(domain, _NXDOMAIN), _negative_ttl_of(dns_wire.negative_soa(response),
                                                             config)
    if rcode != dns_wire.NOERROR:
        return _rcode_failure(domain, rcode), 0.0
    chain = dns_wire.srv_answer(response)
    if chain is None:
        return None
    records, min_ttl = chain
    if records is None:
        return NoRoute(domain, _NODATA), _negative_ttl_of(dns_wire.negative_soa(response),
                                                          config)
    return _decide_answer(domain, response.flags, [SrvTarget(*r) for r in records], min_ttl,
                          config)


_NXDOMAIN = "no SRV record (NXDOMAIN)"
_NODATA = "no SRV record (NODATA)"
#: one generator for RFC 2782's weighted pick, not one seeded from os.urandom (2.5 KB) per
#: answer: that seeding was a tenth of an SRV decision; reseeded in a forked child
_RNG = random.Random()
os.register_at_fork(after_in_child=_RNG.seed)


def _rcode_failure(domain: str, rcode: int) -> TempFail:
    return TempFail(domain, f"DNS {dns.rcode.to_text(rcode)} for SRV")


def _decide_answer(domain: str, flags: int, records: list[SrvTarget], min_ttl: int,
                   config: Config) -> tuple[Decision, float]:
    """The decision from an answer's SRV records (both decoders end here)."""
    if config.require_dnssec and not flags & dns.flags.AD:
        return TempFail(domain, "SRV answer not DNSSEC-validated (no AD bit) and require_dnssec "
                                "is set"), 0.0
    targets = valid_onion_targets(domain, records)
    ttl = float(min(min_ttl, config.max_ttl))
    if not targets:
        return NoRoute(domain, "SRV has no valid v3 onion target"), ttl
    ordered = order_targets(targets, _RNG)
    first = ordered[0]
    return Route(domain, first.target, first.port, "srv", ttl,
                 tuple((t.target, t.port) for t in ordered[1:])), ttl


def _negative_ttl(response: dns.message.Message, config: Config) -> float:
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return _negative_ttl_of((rrset.ttl, rrset[0].minimum), config)
    return _negative_ttl_of(None, config)


def _negative_ttl_of(soa: tuple[int, int] | None, config: Config) -> float:
    """From the authority SOA's (TTL, MINIMUM), else the configured negative TTL."""
    if soa is not None:
        return float(min(soa[0], soa[1], config.max_ttl))
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


class SrvLookup:
    """One domain's SRV lookup without I/O: what to ask whom, and what each answer means.

    The drivers (:meth:`Router._lookup_sync`, :meth:`Router._lookup_async`) only send
    :attr:`query` to :attr:`server` (over TCP when :attr:`tcp`) within :attr:`timeout`, and
    report the response (:meth:`answered`) or the exception (:meth:`failed`) until :attr:`done`;
    then :attr:`outcome` is the decision and how long it may be cached.  A nameserver that
    fails or answers SERVFAIL (or an unvalidated answer under ``require_dnssec``) passes the
    question to the next one; when none is left the outcome is a TempFail naming the last
    failure, never a NoRoute.
    """

    def __init__(self, domain: str, config: Config, nameservers: list[HostPort]) -> None:
        self.domain = domain
        self.config = config
        self.wire = srv_query_wire(domain, config)  # what the asyncio driver sends (id 0)
        self._query: dns.message.Message | None = None
        self.timeout = config.dns_timeout
        self.asked = 0  # nameservers asked (a TCP retry of the same one is not counted)
        self.tcp = False
        self.server: HostPort | None = None
        self.outcome: tuple[Decision, float] | None = None
        self._servers = iter(nameservers)
        self._failure = "no nameserver configured"
        self._next_server()

    @property
    def query(self) -> dns.message.Message:
        """The question as a dnspython message (random id), made when first needed: by the
        blocking driver, for TCP, and for the transport's rare full answer check."""
        if self._query is None:
            self._query = srv_query(self.domain, self.config)
        return self._query

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def answered(self, response: dns.message.Message | dns_wire.Response) -> None:
        """The server's response to :attr:`query` (dnspython's, or the asyncio driver's
        :class:`~torroute.routing.dns_wire.Response`)."""
        host, port = self.server
        if not self.tcp and response.flags & dns.flags.TC:
            self.tcp = True  # truncated: the same question to the same server over TCP
            return
        if response.__class__ is dns_wire.Response:  # the asyncio driver's fast decoding
            outcome = decide_srv_wire(self.domain, response, self.config)
            if outcome is None:  # unusual: dnspython decides (it reads what decode read)
                try:
                    response = dns.message.from_wire(response.wire)
                except dns.exception.DNSException as exc:
                    self.failed(exc)
                    return
                outcome = decide_srv(self.domain, self._query, response, self.config)
        else:
            outcome = decide_srv(self.domain, self._query, response, self.config)
        decision, ttl = outcome
        if isinstance(decision, TempFail):
            self._failure = f"{decision.reason} from {host}:{port}"
            self._next_server()
        else:
            self.outcome = decision, ttl

    def failed(self, exc: BaseException) -> None:
        """Asking the server raised (dnspython's DNSException, OSError): try the next one."""
        host, port = self.server
        self._failure = _describe(exc, host, port)
        self._next_server()

    def _next_server(self) -> None:
        self.tcp = False
        self.server = next(self._servers, None)
        if self.server is None:
            self.outcome = TempFail(self.domain, self._failure), 0.0
        else:
            self.asked += 1


#: What :meth:`Router.decide_now_wire` takes as a plain host name: nothing that
#: :func:`destination_domain` would strip, split at or leave as an address literal
_PLAIN_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,299}")

#: Bound of the router's memo of static decisions (domain -> decision or DNS name) in bytes of
#: key + value (:class:`~torroute.routing.memo.ByteMemo`); cleared when full and on every
#: change of configuration or pins.
STATIC_MEMO_BYTES = 4 * 1024 * 1024
#: Longer destination domains are decided anew each time, never memoised (a domain name has at
#: most 253 octets; anything longer is garbage from the wire)
STATIC_MEMO_MAX_KEY = 300


class Router:
    """The routing core shared by the CLI, the daemon and library users.

    One fast path for every caller, :meth:`decide_now`: a memo of the decisions that need no
    DNS (a pure function of config and pins) and the decision cache.  :meth:`route` and
    :meth:`aroute` fall back to one SRV lookup (:class:`SrvLookup`), blocking or asyncio.
    """

    def __init__(self, config: Config, pins: PinMap | None = None) -> None:
        # destination domain -> its static decision, or the normalised name to ask DNS for
        self._static: ByteMemo = ByteMemo(STATIC_MEMO_BYTES, STATIC_MEMO_MAX_KEY)
        self._config = config
        self._pins = load_pins(config) if pins is None else pins
        self.cache = DecisionCache(config.cache_size)
        self._inflight: dict[str, asyncio.Future[Decision]] = {}  # one DNS query per domain
        self._nameservers: list[HostPort] | None = None
        self._udp: dict[HostPort, UdpNameserver] = {}  # the asyncio driver's shared sockets
        self.dns_queries = 0  # counts nameservers asked, for tests and stats

    def __repr__(self) -> str:
        return f"{type(self).__name__}(config={self._config!r}, pins={self._pins!r})"

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self._static.clear()

    @property
    def pins(self) -> PinMap:
        return self._pins

    @pins.setter
    def pins(self, pins: PinMap) -> None:
        self._pins = pins
        self._static.clear()

    @classmethod
    def from_config(cls, config: Config) -> Router:
        return cls(config, load_pins(config))

    def reload(self, config: Config) -> None:
        """Swap in a new configuration and maps (load first: a broken map file raises MapError
        and the old configuration stays, whole)."""
        pins = load_pins(config)
        self._config, self._pins = config, pins
        self._static.clear()
        self.cache = DecisionCache(config.cache_size)
        self._nameservers = None
        self._retire_udp()

    def _retire_udp(self) -> None:
        for ns in self._udp.values():
            ns.retire()
        self._udp = {}

    def _udp_nameserver(self, server: HostPort) -> UdpNameserver:
        """The shared UDP socket(s) to ``server`` on the running event loop."""
        ns = self._udp.get(server)
        if ns is None or (ns.loop is not None and ns.loop is not asyncio.get_running_loop()):
            ns = self._udp[server] = UdpNameserver(*server)
        return ns

    # -- decisions -----------------------------------------------------------------------
    def decide_now(self, domain_or_address: str) -> Decision | None:
        """The decision if it needs no I/O, else None (then :meth:`route` or :meth:`aroute`
        asks DNS): pins, local and ignored domains, ``.onion`` names, unroutable names, and
        SRV decisions still in the cache.

        A cached decision is returned as stored, the same object until it expires (its
        ``ttl`` as DNS gave it; :meth:`route` reports the remaining one), so a caller may
        memoise per decision: the daemon keeps reply bytes and log text so, and answers a
        lookup from here in a few microseconds.
        """
        domain = destination_domain(domain_or_address)
        memo = self._static.get(domain)
        if memo is None:
            memo = self._remember(domain)
        if memo.__class__ is not str:
            return memo  # type: ignore[return-value]
        hit = self.cache.get(memo)  # type: ignore[arg-type]
        return None if hit is None else hit[0]

    def decide_now_wire(self, domain: bytes) -> Decision | None:
        """:meth:`decide_now` for a destination still in wire bytes, the part of a lookup key
        after its last ``@`` (the daemon's quick path, which so skips decoding, parsing and
        lowercasing): the static or cached decision, else None.

        None too unless ``domain`` is a plain host name (letters, digits, ``.-_``), because
        only for those is the decision of ``user@<domain>`` the decision of ``<domain>``;
        :meth:`decide_now` decides everything else.  The bytes share the static memo (bytes
        keys never equal str keys), so they are dropped with it on every change.
        """
        memo = self._static.get(domain)
        if memo is None:
            if _PLAIN_NAME.fullmatch(domain) is None:
                return None
            text = destination_domain(domain.decode("ascii"))
            memo = self._static.get(text)
            if memo is None:
                memo = self._remember(text)
            self._static.put(domain, memo, len(domain), _memo_size(memo))
        if memo.__class__ is not str:
            return memo  # type: ignore[return-value]
        hit = self.cache.get(memo)  # type: ignore[arg-type]
        return None if hit is None else hit[0]

    def _remember(self, domain: str) -> Decision | str:
        """Memoise ``domain``'s static decision, or the name DNS is asked for."""
        static = decide_static(domain, self._config, self._pins)
        memo = static if static is not None else normalize_domain(domain)
        self._static.put(domain, memo, len(domain), _memo_size(memo))
        return memo

    def route(self, domain_or_address: str) -> Decision:
        decision = self.decide_now(domain_or_address)
        if decision is not None:
            return self._remaining_ttl(decision)
        domain = normalize_domain(destination_domain(domain_or_address))
        decision, ttl = self._lookup_sync(domain)
        self.cache.put(domain, decision, ttl)
        return decision

    async def aroute(self, domain_or_address: str) -> Decision:
        # decide_now, inlined for the name DNS is asked for: that is the memo (normalising it
        # again was one of three normalize_domain calls per cold lookup, together a tenth of
        # the daemon's profiled time)
        domain = destination_domain(domain_or_address)
        memo = self._static.get(domain)
        if memo is None:
            memo = self._remember(domain)
        if memo.__class__ is not str:
            return self._remaining_ttl(memo)  # type: ignore[arg-type]
        domain = memo  # type: ignore[assignment]
        hit = self.cache.get(domain)
        if hit is not None:
            return self._remaining_ttl(hit[0])
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

    def _remaining_ttl(self, decision: Decision) -> Decision:
        """A cached SRV route with the TTL it has left (static routes have none)."""
        if decision.__class__ is not Route or decision.ttl is None:
            return decision
        hit = self.cache.get(decision.domain)  # SRV routes carry their cache key, the name
        remaining = 0.0 if hit is None else hit[1]  # None: it expired a moment ago
        return Route(decision.domain, decision.onion, decision.port, decision.source,
                     remaining, decision.alternatives)

    # -- DNS I/O: the two drivers of SrvLookup ---------------------------------------------
    def nameservers(self) -> list[HostPort]:
        if self._nameservers is None:
            if self._config.nameservers is not None:
                self._nameservers = list(self._config.nameservers)
            else:  # production default only: the system resolver
                import dns.resolver

                resolver = dns.resolver.Resolver()
                self._nameservers = [(str(ns), resolver.port) for ns in resolver.nameservers]
        return self._nameservers

    def _lookup_sync(self, domain: str) -> tuple[Decision, float]:
        import dns.query

        lookup = SrvLookup(domain, self._config, self.nameservers())
        try:
            while lookup.outcome is None:
                host, port = lookup.server
                try:
                    if lookup.tcp:
                        response = dns.query.tcp(lookup.query, host, port=port,
                                                 timeout=lookup.timeout)
                    else:
                        # a connected socket: an ICMP "port unreachable" fails the query at
                        # once (ECONNREFUSED) instead of after dns_timeout
                        with _connected_udp(host, port) as sock:
                            response = dns.query.udp(lookup.query, host, port=port, sock=sock,
                                                     timeout=lookup.timeout,
                                                     ignore_unexpected=True)
                except (dns.exception.DNSException, OSError) as exc:
                    lookup.failed(exc)
                else:
                    lookup.answered(response)
        finally:
            self.dns_queries += lookup.asked
        return lookup.outcome

    async def _lookup_async(self, domain: str) -> tuple[Decision, float]:
        lookup = SrvLookup(domain, self._config, self.nameservers())
        try:
            while lookup.outcome is None:
                server = lookup.server
                try:
                    if lookup.tcp:  # truncated over UDP (rare: dnspython's TCP, loaded then)
                        from dns import asyncquery  # not "import dns...": dns stays global

                        host, port = server
                        response = await asyncquery.tcp(lookup.query, host, port=port,
                                                            timeout=lookup.timeout)
                    else:
                        # one connected UDP socket per nameserver shared by every question in
                        # flight (dns_transport); ECONNREFUSED fails at once, as in _lookup_sync
                        response = await self._udp_nameserver(server).ask(
                            lookup.wire, lookup.timeout, _query_of(lookup))
                except (dns.exception.DNSException, OSError) as exc:
                    lookup.failed(exc)
                else:
                    lookup.answered(response)
        finally:
            self.dns_queries += lookup.asked
        return lookup.outcome


def _query_of(lookup: SrvLookup):
    return lambda: lookup.query


def _memo_size(memo: Decision | str) -> int:
    """Bytes a static decision holds beyond the fixed overhead (its strings)."""
    if memo.__class__ is str:
        return len(memo)  # type: ignore[arg-type]
    return len(memo.domain) + len(getattr(memo, "reason", "")) + 100  # the dataclass itself


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
