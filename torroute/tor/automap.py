"""Onion -> Tor virtual IPv4 through Tor's DNSPort (``AutomapHostsOnResolve``).

Exim's SOCKS client sends only IP addresses, so Exim reaches an onion through the virtual address
Tor hands out for it; Tor maps it back on the SocksPort.  Tor keeps that mapping only in memory
(TTL 60 s), so answers are never cached here: ask again every time.
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

DEFAULT_VIRTUAL_NETWORK = "127.192.0.0/10"


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


def resolve_automap(
    onion: str,
    dns_port: HostPort = ("127.0.0.1", 9053),
    timeout: float = 2.0,
    virtual_network: str = DEFAULT_VIRTUAL_NETWORK,
) -> ipaddress.IPv4Address:
    """Ask tor's DNSPort for the virtual IPv4 of a validated v3 onion."""
    host = parse_onion(onion).host  # tor maps even malformed names: validate first
    query = automap_query(host)
    family = socket.AF_INET6 if ":" in dns_port[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(dns_port)  # connected: a closed port fails at once (ICMP), not by timeout
            sock.send(query.to_wire())
            while True:
                wire = sock.recv(65535)
                try:
                    response = dns.message.from_wire(wire)
                except dns.exception.DNSException:
                    continue
                if response.id == query.id:
                    break
        except ConnectionRefusedError:
            raise TorUnavailable(f"tor DNSPort {format_hostport(dns_port)} refused the query: is "
                                 "tor running with 'DNSPort' set?") from None
        except TimeoutError:
            raise TorUnavailable(f"tor DNSPort {format_hostport(dns_port)} did not answer within "
                                 f"{timeout:g}s") from None
        except OSError as exc:
            raise TorUnavailable(f"tor DNSPort {format_hostport(dns_port)}: "
                                 f"{exc.strerror or exc}") from None
    return parse_automap_answer(host, response, virtual_network, dns_port)


class _OneAnswer(asyncio.DatagramProtocol):
    def __init__(self, query_id: int) -> None:
        self.query_id = query_id
        self.answer: asyncio.Future[dns.message.Message] = (
            asyncio.get_running_loop().create_future())

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            message = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        if message.id == self.query_id and not self.answer.done():
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
    host = parse_onion(onion).host
    query = automap_query(host)
    loop = asyncio.get_running_loop()
    where = format_hostport(dns_port)
    try:
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _OneAnswer(query.id), remote_addr=dns_port)
    except OSError as exc:
        raise TorUnavailable(f"tor DNSPort {where}: {exc.strerror or exc}") from None
    try:
        transport.sendto(query.to_wire())
        response = await asyncio.wait_for(protocol.answer, timeout)
    except ConnectionRefusedError:
        raise TorUnavailable(f"tor DNSPort {where} refused the query: is tor running with "
                             "'DNSPort' set?") from None
    except TimeoutError:
        raise TorUnavailable(f"tor DNSPort {where} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise TorUnavailable(f"tor DNSPort {where}: {exc.strerror or exc}") from None
    finally:
        transport.close()
    return parse_automap_answer(host, response, virtual_network, dns_port)
