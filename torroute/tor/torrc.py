"""torrc lines for torroute, rendered without touching tor (pure functions, no I/O).

For admins who manage ``/etc/tor/torrc`` with configuration management instead of letting
``torroute tor ensure`` / ``torroute onion create`` change tor through its control port.  The same
:class:`PortMapping` type is used by :mod:`torroute.tor.control` for ``HiddenServicePort`` and
``ADD_ONION Port=`` values.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import Config
from ..endpoint import HostPort, format_hostport, parse_hostport

#: The suffix tor must automap for torroute (tor's default list is ".onion,.exit").
ONION_SUFFIX = ".onion"
#: tor's default VirtualAddrNetworkIPv4, defined once: as the default of Config.virtual_network
DEFAULT_VIRTUAL_NETWORK: str = Config.virtual_network


@dataclass(frozen=True)
class PortMapping:
    """One onion service port: ``virtual`` (what clients dial) -> ``target`` on this machine.

    ``target`` is ``IP:PORT`` (``[V6]:PORT``) or ``unix:PATH``, as tor spells it.
    """

    virtual: int
    target: str

    @property
    def torrc_value(self) -> str:
        """The value of a ``HiddenServicePort`` line."""
        return f"{self.virtual} {self.target}"

    @property
    def add_onion_value(self) -> str:
        """The value of an ``ADD_ONION ... Port=`` argument."""
        return f"{self.virtual},{self.target}"

    @property
    def tcp_target(self) -> HostPort | None:
        """(ip, port) for a TCP target, None for a unix socket."""
        if self.target.startswith("unix:"):
            return None
        return parse_hostport(self.target)

    def __str__(self) -> str:
        return f"{self.virtual}={self.target}"


def parse_target(text: str, default_port: int) -> str:
    """Normalise a service target: ``PORT``, ``IP:PORT``, ``[V6]:PORT`` or ``unix:PATH``.

    Not :func:`torroute.endpoint.parse_hostport`: this is tor's rule for a target (an IP
    literal, never a name; a bare port means 127.0.0.1; like tor, ``::1:2525`` is ``[::1]:2525``
    where parse_hostport refuses the ambiguity).  The result is in ``format_hostport`` form."""
    text = text.strip()
    if text.startswith("unix:"):
        if len(text) <= 5 or not text[5:].startswith("/"):
            raise ValueError(f"{text!r}: a unix target needs an absolute path (unix:/PATH)")
        return text
    if not text:
        return f"127.0.0.1:{default_port}"
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected PORT, IP:PORT or unix:PATH")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: the target must be an IP address (tor does not resolve "
                         "names here), e.g. 127.0.0.1:2525") from None
    port = _port(port_text, text)
    return format_hostport((str(address), port))


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: port {text!r} is not in 1..65535")
    return int(text)


def parse_port_mapping(text: str) -> PortMapping:
    """``25=127.0.0.1:2525`` (also ``25,TARGET``, ``25 TARGET`` or just ``25``)."""
    text = text.strip()
    for sep in ("=", ",", " "):
        if sep in text:
            virtual, _, target = text.partition(sep)
            break
    else:
        virtual, target = text, ""
    port = _port(virtual.strip(), text)
    return PortMapping(port, parse_target(target, port))


def parse_hidden_service_port(value: str) -> PortMapping:
    """A ``HiddenServicePort`` value as tor reports it (``25 127.0.0.1:2525``, ``587``)."""
    virtual, _, target = value.strip().partition(" ")
    port = _port(virtual, value)
    return PortMapping(port, parse_target(target, port))


def torrc_quote(value: str) -> str:
    """Quote a torrc value only when tor would misread it (spaces, '#', quotes, backslashes)."""
    if value and not any(c in value for c in ' \t#"\\'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def client_lines(socks: HostPort = ("127.0.0.1", 9050), dns: HostPort = ("127.0.0.1", 9053),
                 virtual_network: str = DEFAULT_VIRTUAL_NETWORK) -> list[str]:
    """What torroute needs from the tor on a mail relay: automapped .onion names on a DNSPort
    (Exim and the Postfix plugins reach onions through a virtual IPv4) and a SOCKS port whose
    replies say why an onion failed (ExtendedErrors)."""
    lines = [
        f"SocksPort {format_hostport(socks)} ExtendedErrors",
        f"DNSPort {format_hostport(dns)}",
        "AutomapHostsOnResolve 1",
        f"AutomapHostsSuffixes {ONION_SUFFIX}",
    ]
    if virtual_network != DEFAULT_VIRTUAL_NETWORK:
        lines.append(f"VirtualAddrNetworkIPv4 {virtual_network}")
    return lines


def onion_service_lines(directory: str, ports: Sequence[PortMapping]) -> list[str]:
    """A persistent onion service (the onion MX of this machine)."""
    if not directory.startswith("/"):
        raise ValueError(f"{directory!r}: HiddenServiceDir must be an absolute path")
    if not ports:
        raise ValueError("an onion service needs at least one port")
    return [f"HiddenServiceDir {torrc_quote(directory)}"] + [
        f"HiddenServicePort {p.torrc_value}" for p in ports
    ]


def render(*, socks: HostPort = ("127.0.0.1", 9050), dns: HostPort = ("127.0.0.1", 9053),
           virtual_network: str = DEFAULT_VIRTUAL_NETWORK, client: bool = True,
           onion_dir: str | None = None, onion_ports: Iterable[PortMapping] = ()) -> str:
    """The torrc block for ``torroute torrc``, commented so that it explains itself."""
    out: list[str] = []
    if client:
        out += [
            "## torroute, client side: deliver mail to onion MX hosts",
            "# torroute's DNSPort: .onion names resolve to virtual addresses in "
            f"{virtual_network}",
            "# (Exim's socks_proxy and the automap lookups need them).  ExtendedErrors makes",
            "# the SocksPort say why an onion failed (not found, invalid address, ...).",
            "# A SocksPort line in torrc replaces every SocksPort of the defaults file: on",
            "# Debian also keep 'SocksPort unix:/run/tor/socks WorldWritable' if anything uses",
            "# it, and any SocksPort other programs use (SocksPort may appear several times).",
            *client_lines(socks, dns, virtual_network),
        ]
    ports = list(onion_ports)
    if onion_dir is not None:
        if out:
            out.append("")
        out += [
            "## torroute, server side: this machine's onion MX",
            "# Onion connections reach the target from 127.0.0.1.  Postfix trusts 127.0.0.1",
            "# (mynetworks) and would relay for anyone on Tor: point port 25 at a dedicated",
            "# smtpd that trusts nobody, e.g. in master.cf:",
            "#   127.0.0.1:2525 inet n - y - - smtpd -o mynetworks= "
            "-o smtpd_relay_restrictions=reject_unauth_destination",
            "# The address: cat HiddenServiceDir/hostname (or: torroute onion address --dir DIR)",
            *onion_service_lines(onion_dir, ports or [PortMapping(25, "127.0.0.1:2525")]),
        ]
    return "\n".join(out) + "\n" if out else ""
