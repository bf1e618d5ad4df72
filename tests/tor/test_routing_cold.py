"""The asyncio SRV path on a cold cache, against a real dnsmasq: many different domains in flight
on one shared UDP socket per nameserver (torroute.routing.dns_transport), each answer reaching
its own question; failures fail closed exactly as before."""

from __future__ import annotations

import asyncio
import socket

import dns.resolver
import pytest
from support.onions import ONION_A, ONION_C, make_onion

from torroute.config import Config
from torroute.routing.router import (
    STATIC_MEMO_BYTES,
    STATIC_MEMO_MAX_KEY,
    NoRoute,
    Route,
    Router,
    TempFail,
)
from torroute.testing.dnsmasq import Dnsmasq, SrvRecord
from torroute.testing.ports import free_port

SRV = "_onion-mx._tcp."
ROOT_ANCHOR = ("--trust-anchor=.,20326,8,2,"
               "E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D")
N = 240
ONIONS = [make_onion(500 + i) for i in range(N // 4)]


def domains() -> dict[str, str | None]:
    """Every fourth domain has its own onion; the others are NXDOMAIN."""
    return {f"d{i}.cold.test": ONIONS[i // 4] if i % 4 == 0 else None for i in range(N)}


@pytest.fixture
def cold_dns(dnsmasq_factory) -> Dnsmasq:
    recs = [SrvRecord(SRV + d, o) for d, o in domains().items() if o]
    recs += [SrvRecord(SRV + "big.cold.test", f"mx{i}.{ONION_C}", 25, 5, i) for i in range(40)]
    return dnsmasq_factory(recs, local_domains=["cold.test"])


def router_for(*servers: tuple[str, int], **kwargs) -> Router:
    kwargs.setdefault("dns_timeout", 2.0)
    return Router(Config(nameservers=list(servers), **kwargs))


def test_many_concurrent_different_domains_each_get_their_own_answer(cold_dns: Dnsmasq,
                                                                     monkeypatch) -> None:
    # the configured nameservers only: building a system resolver (resolv.conf) would fail
    monkeypatch.setattr(dns.resolver.Resolver, "__init__", _no_system_resolver)
    router = router_for(cold_dns.address)
    want = domains()

    async def run() -> tuple[dict, int, int]:
        names = list(want)
        results = await asyncio.gather(*(router.aroute(f"u@{d}") for d in names))
        ns = router._udp[cold_dns.address]
        return dict(zip(names, results, strict=True)), len(ns._channels), ns._current.sent

    results, sockets, sent = asyncio.run(run())
    for domain, onion in want.items():
        decision = results[domain]
        assert decision.domain == domain
        if onion is None:
            assert isinstance(decision, NoRoute) and "NXDOMAIN" in decision.reason, decision
        else:
            assert isinstance(decision, Route) and decision.onion == onion, decision
    # the path: one socket for all N questions, each asked once
    assert (sockets, sent, router.dns_queries) == (1, N, N)


def _no_system_resolver(self, *args, **kwargs) -> None:
    raise AssertionError("dns.resolver.Resolver built: /etc/resolv.conf would be read")


def test_truncated_answer_retried_over_tcp_on_the_async_path(cold_dns: Dnsmasq) -> None:
    router = router_for(cold_dns.address)

    async def run():
        return await asyncio.gather(router.aroute("big.cold.test"), router.aroute("d0.cold.test"))

    big, small = asyncio.run(run())
    assert isinstance(big, Route) and big.onion == ONION_C and len(big.alternatives) == 39
    assert small.onion == ONIONS[0]


def test_timeout_servfail_nxdomain_and_route_side_by_side(dnsmasq_factory, cold_dns: Dnsmasq,
                                                         silent_udp) -> None:
    upstream = dnsmasq_factory([SrvRecord(SRV + "example.test", ONION_A)])
    validating = dnsmasq_factory(local_domains=[], extra=[
        "--dnssec", ROOT_ANCHOR, f"--server=127.0.0.1#{upstream.port}"])
    silent = router_for(silent_udp.address, dns_timeout=0.5)
    servfail = router_for(validating.address)
    good = router_for(cold_dns.address)

    async def run():
        return await asyncio.gather(
            silent.aroute("d0.cold.test"), servfail.aroute("example.test"),
            good.aroute("d1.cold.test"), good.aroute("d4.cold.test"))

    timeout, sf, nx, route = asyncio.run(run())
    assert isinstance(timeout, TempFail) and "timeout" in timeout.reason
    assert isinstance(sf, TempFail) and "SERVFAIL" in sf.reason
    assert isinstance(nx, NoRoute) and "NXDOMAIN" in nx.reason
    assert isinstance(route, Route) and route.onion == ONIONS[1]
    # fail closed: a temporary failure is never cached, the next ask asks DNS again
    assert silent.cache.get("d0.cold.test") is None
    assert servfail.cache.get("example.test") is None


def test_a_timed_out_nameserver_passes_every_waiting_question_to_the_next(cold_dns: Dnsmasq,
                                                                         silent_udp) -> None:
    router = router_for(silent_udp.address, cold_dns.address, dns_timeout=0.3)

    async def run():
        return await asyncio.gather(*(router.aroute(f"d{i}.cold.test") for i in range(0, 40, 4)))

    results = asyncio.run(run())
    assert [r.onion for r in results] == ONIONS[:10]
    assert router.dns_queries == 20  # each asked both nameservers


def test_a_datagram_from_another_address_answers_nothing(silent_udp) -> None:
    """A forged answer with the right id sent to our socket from another port: dropped (the
    socket is connected), the question still times out -- a TempFail, never a route."""
    router = router_for(silent_udp.address, dns_timeout=1.0)

    async def run():
        task = asyncio.create_task(router.aroute("victim.test"))
        data, ours = await asyncio.to_thread(silent_udp.sock.recvfrom, 4096)
        forged = bytearray(data)
        forged[2] |= 0x80  # QR: the question itself, turned into an (empty) answer
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer:
            spoofer.bind(("127.0.0.1", 0))
            spoofer.sendto(bytes(forged), ours)
        return await task, router._udp[silent_udp.address]._current.table.ignored

    decision, ignored = asyncio.run(run())
    assert isinstance(decision, TempFail) and "timeout" in decision.reason
    assert ignored == 0  # never even reached the table: the kernel dropped it


def test_a_reflected_question_from_the_nameserver_address_is_ignored(silent_udp) -> None:
    """From the nameserver's own address but not an answer (QR clear): ignored, counted."""
    router = router_for(silent_udp.address, dns_timeout=1.0)

    async def run():
        task = asyncio.create_task(router.aroute("victim.test"))
        data, ours = await asyncio.to_thread(silent_udp.sock.recvfrom, 4096)
        silent_udp.sock.sendto(data, ours)  # the question itself, and garbage
        silent_udp.sock.sendto(b"\x00" * 5, ours)
        return await task, router._udp[silent_udp.address]._current.table.ignored

    decision, ignored = asyncio.run(run())
    assert isinstance(decision, TempFail) and ignored == 2


def test_sockets_close_with_their_loop_and_on_reload(cold_dns: Dnsmasq) -> None:
    router = router_for(cold_dns.address)
    assert asyncio.run(router.aroute("d0.cold.test")).onion == ONIONS[0]
    first = router._udp[cold_dns.address]
    assert not first._channels  # the loop ended: its socket is closed
    # a new loop gets a new socket
    assert asyncio.run(router.aroute("d4.cold.test")).onion == ONIONS[1]
    assert router._udp[cold_dns.address] is not first

    async def reload_midway():
        await router.aroute("d8.cold.test")
        ns = router._udp[cold_dns.address]
        channel = ns._current
        router.reload(Config(nameservers=[cold_dns.address]))
        return channel.closed, await router.aroute("d12.cold.test")

    closed, decision = asyncio.run(reload_midway())
    assert closed and decision.onion == ONIONS[3]


def test_a_dead_nameserver_fails_all_waiting_questions_at_once(cold_dns: Dnsmasq) -> None:
    dead = ("127.0.0.1", free_port(socket.SOCK_DGRAM))
    router = router_for(dead, cold_dns.address, dns_timeout=30.0)

    async def run():
        return await asyncio.gather(*(router.aroute(f"d{i}.cold.test") for i in range(8)))

    results = asyncio.run(asyncio.wait_for(run(), 20))  # not 30 s: ECONNREFUSED at once
    assert [type(r) for r in results] == [Route, NoRoute, NoRoute, NoRoute] * 2


def test_static_memo_is_bounded_in_bytes_and_skips_long_keys() -> None:
    router = Router(Config(nameservers=[], local_domains=[".local.test"]))
    long = "x." * 1000 + "local.test"
    assert isinstance(router.decide_now(f"u@{long}"), NoRoute)
    assert long not in router._static  # decided, not memoised
    cleared = 0
    for i in range(20_000):  # ~580 bytes charged each: the 8 MB bound is reached
        before = len(router._static)
        decision = router.decide_now(f"u@{'a.' * 100}{i}.local.test")
        assert isinstance(decision, NoRoute) and decision.reason == "local domain"
        assert router._static.charged <= STATIC_MEMO_BYTES
        cleared += len(router._static) < before
    assert cleared >= 1 and all(len(k) <= STATIC_MEMO_MAX_KEY for k in router._static)
    assert router.decide_now("u@b.local.test").reason == "local domain"


def test_a_domain_too_long_for_an_srv_name_is_no_route_without_asking(cold_dns: Dnsmasq) -> None:
    """245 octets is a valid domain, but ``_onion-mx._tcp.`` + it is over 255 on the wire."""
    domain = ".".join(["a" * 60] * 4) + ".test"
    router = router_for(cold_dns.address)
    for decision in (router.route(domain), asyncio.run(router.aroute(f"u@{domain}"))):
        assert isinstance(decision, NoRoute) and "too long" in decision.reason
    assert router.dns_queries == 0


def test_an_unanswered_question_is_sent_again_with_the_same_id(silent_udp) -> None:
    """A lost datagram costs a retransmission (after 1 s), not the whole timeout; every copy is
    the same question with the same id, so either answer would count and a duplicate not."""
    router = router_for(silent_udp.address, dns_timeout=2.5)
    decision = asyncio.run(router.aroute("lost.test"))
    assert isinstance(decision, TempFail) and "timeout" in decision.reason
    silent_udp.sock.setblocking(False)
    copies = []
    while True:
        try:
            copies.append(silent_udp.sock.recv(4096))
        except BlockingIOError:
            break
    assert len(copies) >= 2 and len(set(copies)) == 1
