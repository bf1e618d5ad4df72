"""Automap and SOCKS dialers against a real (loopback-only) tor."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time

import pytest
from support.onions import ONION_A, ONION_B, TORPROJECT

from torroute.errors import (
    AutomapError,
    InvalidOnion,
    PermanentSocksError,
    TemporarySocksError,
    TorUnavailable,
)
from torroute.protocols.socks5 import socks_error
from torroute.routing.ed25519 import is_valid_pubkey
from torroute.routing.onion import onion_from_pubkey
from torroute.testing.ports import free_port
from torroute.tor.automap import aresolve_automap, resolve_automap
from torroute.tor.dial import adial, dial, reply_code

VIRTUAL = ipaddress.ip_network("127.192.0.0/10")


def test_automap_gives_a_virtual_address(tor) -> None:
    address = resolve_automap(ONION_A, tor.dns)
    assert address in VIRTUAL
    assert resolve_automap("mx." + ONION_A.upper(), tor.dns) == address  # same service
    assert resolve_automap(ONION_B, tor.dns) != address


def test_async_automap(tor) -> None:
    address = asyncio.run(aresolve_automap(ONION_A, tor.dns))
    assert address == resolve_automap(ONION_A, tor.dns)


def test_automap_refuses_invalid_onions_before_asking_tor(tor) -> None:
    with pytest.raises(InvalidOnion):
        resolve_automap("expyuzz4wqqyqhjn.onion", tor.dns)


@pytest.mark.parametrize("resolver", [resolve_automap, aresolve_automap])
def test_dnsport_down_is_a_quick_temporary_error(resolver) -> None:
    started = time.monotonic()
    with pytest.raises(TorUnavailable, match="refused") as info:
        result = resolver(ONION_A, ("127.0.0.1", free_port()), 5.0)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    assert info.value.temporary
    assert time.monotonic() - started < 1  # connected UDP: ICMP refusal, no 5 s timeout


def test_automap_off_tor_answers_servfail(tor_factory) -> None:
    """Measured: with AutomapHostsOnResolve 0 tor's DNSPort answers SERVFAIL for an onion."""
    plain = tor_factory(extra=["AutomapHostsOnResolve 0"])
    with pytest.raises(AutomapError, match="SERVFAIL.*AutomapHostsOnResolve"):
        resolve_automap(ONION_A, plain.dns)


def test_virtual_network_mismatch_is_reported(tor) -> None:
    with pytest.raises(AutomapError, match="outside the virtual network"):
        resolve_automap(ONION_A, tor.dns, virtual_network="10.192.0.0/10")


def test_bad_checksum_gives_0xf6_permanent_from_real_tor(tor) -> None:
    typo = TORPROJECT[:10] + ("a" if TORPROJECT[10] != "a" else "b") + TORPROJECT[11:]
    with pytest.raises(PermanentSocksError) as info:
        dial(typo, 25, proxy=tor.socks, timeout=10, validate=False)
    assert info.value.code == 0xF6 and not info.value.temporary


def test_v2_address_gives_0xf6_from_real_tor(tor) -> None:
    with pytest.raises(PermanentSocksError) as info:
        dial("expyuzz4wqqyqhjn.onion", 25, proxy=tor.socks, timeout=10, validate=False)
    assert info.value.code == 0xF6


def test_async_dialer_classifies_0xf6(tor) -> None:
    with pytest.raises(PermanentSocksError) as info:
        asyncio.run(adial("expyuzz4wqqyqhjn.onion", 25, proxy=tor.socks, timeout=10,
                          validate=False))
    assert info.value.code == 0xF6


def test_without_extended_errors_tor_says_general_failure_temporary(tor) -> None:
    with pytest.raises(TemporarySocksError) as info:
        dial("expyuzz4wqqyqhjn.onion", 25, proxy=tor.socks_plain, timeout=10, validate=False)
    assert info.value.code == 0x01


def test_our_key_check_agrees_with_tor(tor) -> None:
    """For random keys with a right checksum, tor says 0xF6 exactly when our check refuses them
    (valid ones are not reachable here: the bridge-mode tor times out, which is not 0xF6)."""
    seen = {True: 0, False: 0}
    for _ in range(48):
        key = os.urandom(32)
        expected_valid = is_valid_pubkey(key)
        if expected_valid and seen[True] >= 2:
            continue
        address = onion_from_pubkey(key)
        try:
            dial(address, 25, proxy=tor.socks, timeout=1.5, validate=False)
        except PermanentSocksError as exc:
            assert exc.code == 0xF6 and not expected_valid, address
        except TemporarySocksError:
            assert expected_valid, address
        seen[expected_valid] += 1
    assert seen[False] >= 10


def test_local_validation_refuses_before_tor(tor) -> None:
    with pytest.raises(InvalidOnion):
        dial("expyuzz4wqqyqhjn.onion", 25, proxy=tor.socks, timeout=5)


def test_unreachable_onion_times_out_temporary(tor) -> None:
    # the bridge-mode tor cannot build circuits: a valid onion never answers
    started = time.monotonic()
    with pytest.raises(TemporarySocksError, match="timed out"):
        dial(ONION_A, 25, proxy=tor.socks, timeout=1.0)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("use_async", [False, True])
def test_socksport_down_is_tor_unavailable(use_async: bool) -> None:
    proxy = ("127.0.0.1", free_port())
    with pytest.raises(TorUnavailable, match="SocksPort"):
        if use_async:
            asyncio.run(adial(ONION_A, 25, proxy=proxy, timeout=5))
        else:
            dial(ONION_A, 25, proxy=proxy, timeout=5)


def test_reply_code_parsing_from_python_socks_messages() -> None:
    from python_socks import ProxyError

    assert reply_code(ProxyError("Invalid reply code: 0XF0")) == 0xF0
    assert reply_code(ProxyError("Invalid reply code: 0xf7")) == 0xF7
    assert reply_code(ProxyError("Host unreachable", error_code=4)) == 4
    assert reply_code(ProxyError("Malformed connect reply")) is None


@pytest.mark.parametrize(("code", "temporary"), [
    (0x01, True), (0x04, True), (0x06, True), (0xF0, True), (0xF1, True), (0xF2, True),
    (0xF3, True), (0xF4, False), (0xF5, False), (0xF6, False), (0xF7, True), (0x99, True),
    (None, True),
])
def test_classification(code, temporary: bool) -> None:
    exc = socks_error(code, "x.onion:25", "detail")
    assert exc.temporary is temporary and exc.code == code


def test_the_onion_a_route_returns_is_automapped(tor, dnsmasq_factory, tmp_path) -> None:
    """SRV and pin answers feed straight into tor's automap (the Exim path)."""
    from torroute.config import Config
    from torroute.routing.router import Route, Router
    from torroute.testing.dnsmasq import SrvRecord

    dns = dnsmasq_factory([SrvRecord("_onion-mx._tcp.example.test", "mx." + ONION_A)])
    pins = tmp_path / "pins.txt"
    pins.write_text(f"pinned.example {ONION_B}:2525\n")
    router = Router.from_config(Config(nameservers=[dns.address], maps=[pins]))
    for domain, onion in (("example.test", ONION_A), ("pinned.example", ONION_B)):
        decision = router.route(f"user@{domain}")
        assert isinstance(decision, Route) and decision.onion == onion
        assert resolve_automap(decision.onion, tor.dns) in VIRTUAL
