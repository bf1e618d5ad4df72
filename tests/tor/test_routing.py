"""Routing against a real dnsmasq: SRV selection, failures as TempFail, caching, pins, order."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.onions import ONION_A, ONION_B, ONION_C

from torroute.config import Config
from torroute.routing.maps import PinMap
from torroute.routing.onion import parse_onion
from torroute.routing.router import (
    NoRoute,
    Reject,
    Route,
    Router,
    TempFail,
    decide_static,
    destination_domain,
)
from torroute.routing.srv import SrvTarget, order_targets
from torroute.testing.dnsmasq import Dnsmasq, SrvRecord

SRV = "_onion-mx._tcp."
ROOT_ANCHOR = ("--trust-anchor=.,20326,8,2,"
               "E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D")


def records() -> list[SrvRecord]:
    recs = [
        SrvRecord(SRV + "example.test", ONION_A),
        SrvRecord(SRV + "port.test", "mx." + ONION_B, 2525),
        SrvRecord(SRV + "multi.test", "mail.clear.example", 25, 1),
        SrvRecord(SRV + "multi.test", "expyuzz4wqqyqhjn.onion", 25, 2),
        SrvRecord(SRV + "multi.test", ONION_A, 25, 10),
        SrvRecord(SRV + "multi.test", ONION_B, 25, 20),
        SrvRecord(SRV + "v2only.test", "expyuzz4wqqyqhjn.onion"),
        SrvRecord(SRV + "clear.test", "mx.clear.example"),
        SrvRecord(SRV + "pinned.test", ONION_C),
    ]
    # 40 records do not fit a 512-byte UDP answer: dnsmasq sets TC, the router must use TCP
    recs += [SrvRecord(SRV + "big.test", f"mx{i}.{ONION_C}", 25, 5, i) for i in range(40)]
    return recs


@pytest.fixture
def dns(dnsmasq_factory) -> Dnsmasq:
    return dnsmasq_factory(records(), extra=[f'--txt-record={SRV}nodata.test,"no srv here"'])


def router_for(*servers: tuple[str, int], **kwargs) -> Router:
    kwargs.setdefault("dns_timeout", 1.0)
    return Router(Config(nameservers=list(servers), **kwargs))


def test_srv_route(dns: Dnsmasq) -> None:
    decision = router_for(dns.address).route("user@Example.TEST")
    assert isinstance(decision, Route)
    assert (decision.domain, decision.onion, decision.port, decision.source) == (
        "example.test", ONION_A, 25, "srv")
    assert decision.ttl == 300


def test_srv_target_subdomain_and_port(dns: Dnsmasq) -> None:
    decision = router_for(dns.address).route("port.test")
    assert (decision.onion, decision.port) == (ONION_B, 2525)


def test_lowest_priority_valid_onion_wins_clear_and_v2_ignored(dns: Dnsmasq, caplog) -> None:
    decision = router_for(dns.address).route("multi.test")
    assert decision.onion == ONION_A
    assert decision.alternatives == ((ONION_B, 25),)
    assert "mail.clear.example" in caplog.text and "v2" in caplog.text


@pytest.mark.parametrize("domain", ["v2only.test", "clear.test"])
def test_only_invalid_targets_means_no_route(dns: Dnsmasq, domain: str) -> None:
    decision = router_for(dns.address).route(domain)
    assert isinstance(decision, NoRoute) and "no valid v3 onion" in decision.reason


def test_nxdomain_and_nodata_are_no_route(dns: Dnsmasq) -> None:
    router = router_for(dns.address)
    nx, nodata = router.route("nothing.test"), router.route("nodata.test")
    assert isinstance(nx, NoRoute) and "NXDOMAIN" in nx.reason
    assert isinstance(nodata, NoRoute) and "NODATA" in nodata.reason


def test_truncated_udp_answer_falls_back_to_tcp(dns: Dnsmasq) -> None:
    decision = router_for(dns.address).route("big.test")
    assert isinstance(decision, Route) and decision.onion == ONION_C
    assert len(decision.alternatives) == 39


def test_refused_is_tempfail(dnsmasq_factory) -> None:
    server = dnsmasq_factory(local_domains=[])  # no upstream: answers REFUSED
    decision = router_for(server.address).route("example.org")
    assert isinstance(decision, TempFail) and "REFUSED" in decision.reason


def test_servfail_is_tempfail(dnsmasq_factory) -> None:
    upstream = dnsmasq_factory(records())
    # a validating dnsmasq whose upstream cannot prove anything: real SERVFAIL answers
    validating = dnsmasq_factory(local_domains=[], extra=[
        "--dnssec", ROOT_ANCHOR, f"--server=127.0.0.1#{upstream.port}"])
    decision = router_for(validating.address).route("example.test")
    assert isinstance(decision, TempFail) and "SERVFAIL" in decision.reason


def test_timeout_is_tempfail(silent_udp) -> None:
    started = time.monotonic()
    decision = router_for(silent_udp.address, dns_timeout=0.5).route("example.org")
    assert isinstance(decision, TempFail) and "timeout" in decision.reason
    assert time.monotonic() - started < 3


def test_second_nameserver_answers_when_first_fails(dns: Dnsmasq, silent_udp) -> None:
    decision = router_for(silent_udp.address, dns.address, dns_timeout=0.3).route("example.test")
    assert isinstance(decision, Route)


def test_positive_cache_honours_ttl(dnsmasq_factory) -> None:
    server = dnsmasq_factory(records(), ttl=2)
    router = router_for(server.address)
    first = router.route("example.test")
    assert first.ttl == 2 and router.dns_queries == 1
    second = router.route("example.test")
    assert router.dns_queries == 1 and second.onion == first.onion and second.ttl <= 2
    time.sleep(2.1)
    router.route("example.test")
    assert router.dns_queries == 2


def test_negative_answers_are_cached(dns: Dnsmasq) -> None:
    router = router_for(dns.address, negative_ttl=60)
    router.route("nothing.test")
    router.route("nothing.test")
    assert router.dns_queries == 1


def test_tempfail_is_not_cached(dnsmasq_factory) -> None:
    server = dnsmasq_factory(local_domains=[])
    router = router_for(server.address)
    router.route("example.org")
    router.route("example.org")
    assert router.dns_queries == 2


def test_cache_is_bounded_lru(dns: Dnsmasq) -> None:
    router = router_for(dns.address, cache_size=2)
    for domain in ("example.test", "port.test", "multi.test"):
        router.route(domain)
    assert len(router.cache) == 2
    router.route("example.test")  # evicted: asks again
    assert router.dns_queries == 4


def test_order_local_ignored_onion_pins_then_srv(dns: Dnsmasq, tmp_path: Path) -> None:
    pinfile = tmp_path / "pins.txt"
    pinfile.write_text(f"pinned.test {ONION_A}:2525\nlocal.test {ONION_B}\n")
    config = Config(nameservers=[dns.address], local_domains=["local.test"],
                    ignore_domains=[".ignored.test"], maps=[pinfile])
    router = Router.from_config(config)
    assert router.route("local.test") == NoRoute("local.test", "local domain")
    assert router.route("a.ignored.test") == NoRoute("a.ignored.test", "ignored domain")
    pinned = router.route("x@pinned.test")  # the SRV says ONION_C: the pin wins
    assert (pinned.onion, pinned.port) == (ONION_A, 2525)
    assert pinned.source == f"map {pinfile}:1"
    onion = router.route(f"user@mx.{ONION_B.upper()}.")
    assert (onion.onion, onion.source) == (ONION_B, "onion")
    assert isinstance(router.route("user@bad.onion"), Reject)
    assert router.dns_queries == 0


def test_require_dnssec_without_ad_bit_is_tempfail(dns: Dnsmasq) -> None:
    decision = router_for(dns.address, require_dnssec=True).route("example.test")
    assert isinstance(decision, TempFail) and "AD bit" in decision.reason
    # negative answers are still accepted: a domain without SRV is not onion-routed
    assert isinstance(router_for(dns.address, require_dnssec=True).route("nothing.test"), NoRoute)


def test_concurrent_async_lookups_share_one_query(dns: Dnsmasq) -> None:
    router = router_for(dns.address)

    async def many() -> list:
        return await asyncio.gather(*(router.aroute(f"u{i}@example.test") for i in range(50)))

    results = asyncio.run(many())
    assert router.dns_queries == 1
    assert {r.onion for r in results} == {ONION_A}


def test_async_failures_are_tempfail(silent_udp) -> None:
    router = router_for(silent_udp.address, dns_timeout=0.3)
    decision = asyncio.run(router.aroute("example.org"))
    assert isinstance(decision, TempFail)


def test_destination_domain() -> None:
    assert destination_domain('"a@b"@Example.ORG.') == "example.org"
    assert destination_domain("[127.0.0.1]") == "[127.0.0.1]"


def test_weighted_selection_follows_rfc2782() -> None:
    recs = [SrvTarget(0, 90, 25, "a"), SrvTarget(0, 10, 25, "b"), SrvTarget(1, 100, 25, "c")]
    import random

    rng = random.Random(7)
    firsts = Counter(order_targets(recs, rng)[0].target for _ in range(5000))
    assert firsts["c"] == 0
    assert 0.85 < firsts["a"] / 5000 < 0.95
    assert all(order_targets(recs, rng)[-1].target == "c" for _ in range(100))


def test_zero_weights_all_get_picked() -> None:
    import random

    recs = [SrvTarget(0, 0, 25, "a"), SrvTarget(0, 0, 25, "b")]
    rng = random.Random(1)
    assert {order_targets(recs, rng)[0].target for _ in range(100)} == {"a", "b"}
    assert sorted(t.target for t in order_targets(recs, rng)) == ["a", "b"]


@settings(max_examples=500)
@given(st.text(max_size=300))
def test_static_decisions_never_raise_and_never_route_garbage(text: str) -> None:
    config = Config(nameservers=[], local_domains=["local.test"])
    decision = decide_static(destination_domain(text), config, PinMap())
    if isinstance(decision, Route):
        assert parse_onion(decision.onion).host == decision.onion


def test_a_cancelled_caller_does_not_cancel_the_shared_query(silent_udp) -> None:
    router = router_for(silent_udp.address, dns_timeout=0.5)

    async def scenario():
        first = asyncio.create_task(router.aroute("a@slow.example"))
        second = asyncio.create_task(router.aroute("b@slow.example"))
        await asyncio.sleep(0.1)
        first.cancel()
        result = await second
        with pytest.raises(asyncio.CancelledError):
            await first
        return result

    decision = asyncio.run(scenario())
    assert isinstance(decision, TempFail) and router.dns_queries == 1


def test_leading_dot_patterns_in_config(tmp_path) -> None:
    from torroute.config import load_config

    cfg = tmp_path / "t.toml"
    cfg.write_text('[routing]\nignore_domains = [".Internal.Example."]\nnameservers = []\n')
    config = load_config(cfg)
    assert config.ignore_domains == [".internal.example"]
    assert Router(config).route("x@a.internal.example") == NoRoute("a.internal.example",
                                                                   "ignored domain")


def test_an_invalid_pin_defers_and_never_asks_dns(dns: Dnsmasq, tmp_path: Path) -> None:
    """pinned.test has an SRV record: a typo in its pin must not fall through to it."""
    typo = ONION_A[:20] + ("a" if ONION_A[20] != "a" else "b") + ONION_A[21:]
    pinfile = tmp_path / "pins.txt"
    pinfile.write_text(f"ok.test {ONION_B}\npinned.test {typo}\n")
    router = router_for(dns.address, maps=[pinfile])
    for decision in (router.route("u@pinned.test"), asyncio.run(router.aroute("pinned.test"))):
        assert isinstance(decision, TempFail)
        assert decision.reason.startswith(f"invalid pin at {pinfile}:2: ")
        assert "checksum" in decision.reason
    assert router.dns_queries == 0
    assert router.route("ok.test").onion == ONION_B


def test_an_ignored_v2_pin_routes_as_if_unpinned(dns: Dnsmasq, tmp_path: Path) -> None:
    pinfile = tmp_path / "map.yml"
    pinfile.write_text("expyuzz4wqqyqhjn.onion:\n  - pinned.test\n  - nosrv.test\n")
    router = router_for(dns.address, maps=[pinfile])
    srv = router.route("pinned.test")
    assert isinstance(srv, Route) and (srv.onion, srv.source) == (ONION_C, "srv")
    assert isinstance(router.route("nosrv.test"), NoRoute)
    deferring = router_for(dns.address, maps=[pinfile], v2_pins="defer")
    decision = deferring.route("pinned.test")
    assert isinstance(decision, TempFail) and f"invalid pin at {pinfile}:2" in decision.reason
    assert deferring.dns_queries == 0


def test_reload_with_a_broken_map_keeps_the_whole_old_configuration(dns: Dnsmasq,
                                                                     tmp_path: Path) -> None:
    from torroute.errors import MapError

    pinfile = tmp_path / "map.yml"
    pinfile.write_text(f"{ONION_A}:\n  - pinned.test\n")
    router = router_for(dns.address, maps=[pinfile])
    assert router.route("pinned.test").onion == ONION_A
    pinfile.write_text(f"{ONION_A}:\n  - pinned.test\n  - 'new.test\n")
    with pytest.raises(MapError, match=rf"^{pinfile}:3: YAML syntax error"):
        router.reload(Config(nameservers=[dns.address], maps=[pinfile], local_domains=["x.t"]))
    assert router.route("pinned.test").onion == ONION_A
    assert router.config.local_domains == []


def test_a_dead_nameserver_fails_at_once_and_the_next_is_asked(dns: Dnsmasq) -> None:
    """ICMP port unreachable: a connected UDP socket sees ECONNREFUSED, so the reason is
    "unreachable", not "DNS timeout" (an unconnected socket waits the whole dns_timeout)."""
    from torroute.testing.ports import free_port

    dead = ("127.0.0.1", free_port(socket.SOCK_DGRAM))
    router = router_for(dead, dns_timeout=5.0)
    decision = router.route("example.test")
    assert isinstance(decision, TempFail) and "unreachable" in decision.reason
    decision = asyncio.run(router_for(dead, dns_timeout=5.0).aroute("example.test"))
    assert isinstance(decision, TempFail) and "unreachable" in decision.reason
    both = router_for(dead, dns.address, dns_timeout=5.0)
    assert both.route("example.test").onion == ONION_A
    assert asyncio.run(both.aroute("port.test")).onion == ONION_B
