"""Onion -> Tor virtual IPv4 through Tor's DNSPort (``AutomapHostsOnResolve``).

Exim's SOCKS client sends only IP addresses, so Exim reaches an onion through the virtual address
Tor hands out for it; Tor maps it back on the SocksPort.  Tor keeps that mapping only in memory
(TTL 60 s), so answers are never cached here: ask again every time.

:class:`AutomapLookup` is the whole question, pure (the query to send, which datagram answers it,
what the answer and a socket error mean); :func:`resolve_automap` (blocking) and
:func:`aresolve_automap` (asyncio) only send, receive and time out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from ..endpoint import HostPort, format_hostport
from ..errors import AutomapError, TorUnavailable
from ..routing.onion import parse_onion
from .torrc import DEFAULT_VIRTUAL_NETWORK


def automap_query(onion: str) -> dns.message.Message:
    query = dns.message.make_query(onion, dns.rdatatype.A)
    query.flags |= dns.flags.RD
    return query


def parse_automap_answer(
    onion: str, response: dns.message.Message, virtual_network: str, dns_port: HostPort
) -> ipaddress.IPv4Address:
    """The virtual address in ``response``, checked against VirtualAddrNetworkIPv4."""
    where = format_hostport(dns_port)
    rcode = response.rcode()
    if rcode != dns.rcode.NOERROR:
        raise AutomapError(
            f"tor DNSPort {where} answered {dns.rcode.to_text(rcode)} for {onion}: is "
            "'AutomapHostsOnResolve 1' set (with .onion in AutomapHostsSuffixes)?"
        )
    network = ipaddress.ip_network(virtual_network)
    addresses = [ipaddress.ip_address(rr.address) for rrset in response.answer
                 if rrset.rdtype == dns.rdatatype.A for rr in rrset]
    if not addresses:
        raise AutomapError(f"tor DNSPort {where} gave no address for {onion}: is "
                           "'AutomapHostsOnResolve 1' set?")
    for address in addresses:
        if address in network:
            return address  # type: ignore[return-value]
    raise AutomapError(
        f"tor DNSPort {where} answered {addresses[0]} for {onion}, outside the virtual network "
        f"{network}: check VirtualAddrNetworkIPv4 in torrc and virtual_network in torroute"
    )


class AutomapLookup:
    """One automap question for a validated v3 onion (tor maps even malformed names: validate
    first; raises InvalidOnion)."""

    def __init__(self, onion: str, dns_port: HostPort,
                 virtual_network: str = DEFAULT_VIRTUAL_NETWORK) -> None:
        self.onion = parse_onion(onion).host
        self.dns_port = dns_port
        self.virtual_network = virtual_network
        self.query = automap_query(self.onion)

    def request(self) -> bytes:
        return self.query.to_wire()

    def response(self, wire: bytes) -> dns.message.Message | None:
        """The answer in a datagram, or None (garbage, or the answer to another query)."""
        try:
            message = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        return message if message.id == self.query.id else None

    def result(self, response: dns.message.Message) -> ipaddress.IPv4Address:
        return parse_automap_answer(self.onion, response, self.virtual_network, self.dns_port)

    def failure(self, exc: OSError, timeout: float) -> TorUnavailable:
        """A socket error (a timeout included) while asking."""
        where = format_hostport(self.dns_port)
        if isinstance(exc, ConnectionRefusedError):
            return TorUnavailable(f"tor DNSPort {where} refused the query: is tor running with "
                                  "'DNSPort' set?")
        if isinstance(exc, TimeoutError):
            return TorUnavailable(f"tor DNSPort {where} did not answer within {timeout:g}s")
        return TorUnavailable(f"tor DNSPort {where}: {exc.strerror or exc}")


def resolve_automap(
    onion: str,
    dns_port: HostPort = ("127.0.0.1", 9053),
    timeout: float = 2.0,
    virtual_network: str = DEFAULT_VIRTUAL_NETWORK,
) -> ipaddress.IPv4Address:
    """Ask tor's DNSPort for the virtual IPv4 of a validated v3 onion."""
    lookup = AutomapLookup(onion, dns_port, virtual_network)
    family = socket.AF_INET6 if ":" in dns_port[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(dns_port)  # connected: a closed port fails at once (ICMP), not by timeout
            sock.send(lookup.request())
            while (response := lookup.response(sock.recv(65535))) is None:
                pass
        except OSError as exc:
            raise lookup.failure(exc, timeout) from None
    return lookup.result(response)


class _OneAnswer(asyncio.DatagramProtocol):
    def __init__(self, lookup: AutomapLookup) -> None:
        self.lookup = lookup
        self.answer: asyncio.Future[dns.message.Message] = (
            asyncio.get_running_loop().create_future())

    def datagram_received(self, data: bytes, addr) -> None:
        message = self.lookup.response(data)
        if message is not None and not self.answer.done():
            self.answer.set_result(message)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def aresolve_automap(
    onion: str,
    dns_port: HostPort = ("127.0.0.1", 9053),
    timeout: float = 2.0,
    virtual_network: str = DEFAULT_VIRTUAL_NETWORK,
) -> ipaddress.IPv4Address:
    """Async :func:`resolve_automap` (for the daemon)."""
    lookup = AutomapLookup(onion, dns_port, virtual_network)
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _OneAnswer(lookup), remote_addr=dns_port)
    except OSError as exc:
        raise lookup.failure(exc, timeout) from None
    try:
        transport.sendto(lookup.request())
        response = await asyncio.wait_for(protocol.answer, timeout)
    except OSError as exc:
        raise lookup.failure(exc, timeout) from None
    finally:
        transport.close()
    return lookup.result(response)
