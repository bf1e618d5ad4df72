"""The private network's safety rule, pure: a torrc passes :func:`check_torrc` only if the tor it
configures can talk to nothing outside 127.0.0.0/8.  Every torrc of
:class:`~torroute.testing.testnet.PrivateNetwork` (and of the tests' bridge-mode tor) is checked
before any tor starts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from ..endpoint import is_loopback_host, parse_hostport
from ..errors import ConfigError, UnsafeTorrc

__all__ = ["parse_torrc", "check_torrc", "is_loopback_ipv4", "is_loopback_hostport"]

_PORT_OPTIONS = {
    "orport", "dirport", "socksport", "controlport", "dnsport", "transport", "natdport",
    "httptunnelport", "extorport", "metricsport",
}
_FORBIDDEN = {
    "reachableaddresses", "reachableoraddresses", "reachablediraddresses",
    "outboundbindaddress", "outboundbindaddressor", "outboundbindaddressexit",
    "outboundbindaddresspt", "fallbackdir", "clienttransportplugin", "servertransportplugin",
    "%include", "alternatedirauthority", "alternatebridgeauthority", "dirauthorityfallbackrate",
}


def parse_torrc(text: str) -> list[tuple[str, str]]:
    """(lowercased key, value) pairs in order; comments and blank lines dropped."""
    pairs = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        pairs.append((key.lstrip("+/").lower(), value.strip()))
    return pairs


def is_loopback_ipv4(host: str) -> bool:
    """An IPv4 address in 127.0.0.0/8 (brackets allowed).  Stricter than
    :func:`torroute.endpoint.is_loopback_host` on purpose: no ``localhost`` (tor would resolve
    it) and no ``::1`` (the network runs with ``ClientUseIPv6 0``: IPv6 is never meant)."""
    if not is_loopback_host(host) or host == "localhost":
        return False
    return ipaddress.ip_address(host.strip("[]")).version == 4


def is_loopback_hostport(value: str) -> bool:
    """``127.x.x.x:PORT`` (port 1..65535), as torrc spells a listener or a target."""
    try:
        host, _ = parse_hostport(value)
    except ConfigError:
        return False
    return is_loopback_ipv4(host)


def check_torrc(text: str, read_file: Callable[[str], str] | None = None) -> None:
    """Raise :class:`UnsafeTorrc` unless this torrc keeps tor on loopback.

    Required: ``TestingTorNetwork 1`` with only 127.x ``DirAuthority`` lines, or ``UseBridges 1``
    with only 127.x ``Bridge`` lines; ``UseDefaultFallbackDirs 0``; ``ClientUseIPv6 0``;
    ``Address 127.0.0.1``; every port option ``0``, ``unix:`` or ``127.0.0.1:PORT``; onion
    service targets ``127.0.0.1:PORT``; no proxies, transports, fallback dirs, %include.
    Relays (an ORPort) also need ``ExitRelay 0``, ``ExitPolicy reject *:*`` and a
    ``ServerDNSResolvConfFile`` naming only loopback nameservers (read with ``read_file``;
    without it the file is not read and that one check is skipped), ``ServerDNSDetectHijacking
    0`` and an empty ``ServerDNSTestAddresses``.
    """
    pairs = parse_torrc(text)
    problems: list[str] = []
    values: dict[str, list[str]] = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)

    def last(key: str) -> str | None:
        return values[key][-1] if key in values else None

    for key, value in pairs:
        if key in _FORBIDDEN or key.endswith("proxy"):
            problems.append(f"{key} is not allowed in a loopback-only network")
        elif key in _PORT_OPTIONS:
            first = value.split()[0] if value.split() else ""
            if not (first == "0" or first.startswith("unix:") or is_loopback_hostport(first)):
                problems.append(f"{key} {value!r}: must be 0, unix: or 127.0.0.1:PORT")
        elif key == "hiddenserviceport":
            parts = value.split()
            target = parts[1] if len(parts) > 1 else ""
            if not (target.startswith("unix:") or is_loopback_hostport(target)):
                problems.append(f"HiddenServicePort {value!r}: target must be 127.0.0.1:PORT")
        elif key in ("dirauthority", "bridge"):
            addrs = [t for t in value.split() if ":" in t and "=" not in t]  # not key=value
            if not addrs or not all(is_loopback_hostport(a) for a in addrs):
                problems.append(f"{key} {value!r}: address must be 127.x.x.x:PORT")
            if any(t.lower().startswith("ipv6=") for t in value.split()):
                problems.append(f"{key} {value!r}: ipv6= is not allowed")

    testing = last("testingtornetwork") == "1"
    bridges = last("usebridges") == "1"
    if testing:
        if "dirauthority" not in values:
            problems.append("TestingTorNetwork 1 without DirAuthority lines uses the real ones")
    elif bridges:
        if "bridge" not in values:
            problems.append("UseBridges 1 without Bridge lines")
    else:
        problems.append("need TestingTorNetwork 1 + DirAuthority, or UseBridges 1 + Bridge")
    if "dirauthority" in values and not testing:
        problems.append("DirAuthority lines need TestingTorNetwork 1 here")
    for key, want in (("usedefaultfallbackdirs", "0"), ("clientuseipv6", "0"),
                      ("address", "127.0.0.1")):
        if last(key) != want:
            problems.append(f"{key} must be {want} (is {last(key)!r})")

    orport = last("orport")
    if orport is not None and orport.split()[0] != "0":
        if last("exitrelay") != "0":
            problems.append("a relay needs ExitRelay 0")
        if last("exitpolicy") != "reject *:*":
            problems.append("a relay needs ExitPolicy reject *:*")
        if last("serverdnsdetecthijacking") != "0":
            problems.append("a relay needs ServerDNSDetectHijacking 0")
        if last("serverdnstestaddresses") != "":
            problems.append("a relay needs an empty ServerDNSTestAddresses")
        resolv = last("serverdnsresolvconffile")
        if not resolv:
            problems.append("a relay needs ServerDNSResolvConfFile (else /etc/resolv.conf)")
        elif read_file is not None:
            try:
                servers = [line.split()[1] for line in read_file(resolv).splitlines()
                           if line.startswith("nameserver") and len(line.split()) > 1]
            except OSError as exc:
                problems.append(f"ServerDNSResolvConfFile {resolv}: {exc}")
            else:
                if not servers or not all(is_loopback_ipv4(s) for s in servers):
                    problems.append(f"{resolv}: nameservers must all be 127.x")
    if problems:
        raise UnsafeTorrc("unsafe torrc: " + "; ".join(problems))
