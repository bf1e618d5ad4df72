"""The LMTP relay's per-onion cap and queue against real parts (the private Tor network, real
onion sinks, one of them a slow MX): a slow onion cannot hold up mail to a fast one, replies
still come only after the MX answered, and at shutdown queued transactions get 4xx (nothing of
them was sent, Postfix keeps them).  No timing thresholds: the order of events is checked."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from support.daemon import wait_socket

from torroute.config import load_config
from torroute.delivery.relay import Attempt, Relay
from torroute.delivery.settings import DeliverSettings
from torroute.protocols.lmtp import Transaction
from torroute.routing.router import Router

pytestmark = pytest.mark.testnet


def txn(domain: str, n: int) -> Transaction:
    return Transaction(b"a@origin.test", (f"u{n}@{domain}".encode(),),
                       b"Message-ID: <%d@o.test>\n\nbody\n" % n)


def config_text(serve_dir, dns_port: int, socks, pins: str, serve: str = "") -> str:
    (serve_dir / "map.txt").write_text(pins)
    return (f'[routing]\nmaps = ["{serve_dir / "map.txt"}"]\nnameservers = '
            f'["127.0.0.1:{dns_port}"]\n\n[tor]\nsocks = "{socks[0]}:{socks[1]}"\n{serve}')


def test_a_slow_onion_does_not_block_a_fast_one(testnet, onion_sink_factory, dnsmasq_factory,
                                                serve_dir, daemon_records) -> None:
    slow, fast = onion_sink_factory(), onion_sink_factory()
    slow.sink.data_delay = 4.0  # its MX answers the end of DATA late
    cfg = serve_dir / "torroute.toml"
    cfg.write_text(config_text(serve_dir, dnsmasq_factory([]).port, testnet.socks_extended,
                               f"slow.test {slow.onion}\nfast.test {fast.onion}\n"))
    config = load_config(str(cfg))
    relay = Relay(Router.from_config(config), DeliverSettings.from_config(config),
                  max_per_onion=1, max_waiting_per_onion=1)
    attempts: list[Attempt] = []
    relay.on_attempt.append(attempts.append)
    events: list[tuple[str, bytes, int]] = []  # (what, first reply, sink messages then)

    async def timed(name: str, sink, t: Transaction) -> None:
        replies = await relay.relay(t)
        events.append((name, replies[0], len(sink.messages)))

    async def scenario() -> None:
        first = asyncio.create_task(timed("slow1", slow.sink, txn("slow.test", 1)))
        await asyncio.sleep(1.0)  # slow1 holds the slow onion's one connection
        second = asyncio.create_task(timed("slow2", slow.sink, txn("slow.test", 2)))
        await asyncio.sleep(0.2)  # slow2 waits in the slow onion's queue (1 place)
        third = asyncio.create_task(timed("slow3", slow.sink, txn("slow.test", 3)))
        await timed("fast", fast.sink, txn("fast.test", 4))
        await asyncio.gather(first, second, third)
        relay.close()

    asyncio.run(scenario())
    order = [e[0] for e in events]
    # slow3 found the queue full: deferred at once, before anything else finished
    assert order[0] == "slow3" and events[0][1].startswith(b"451 4.4.5 ")
    # the fast onion's transaction did not wait for the slow onion's MX
    assert order.index("fast") < order.index("slow1") < order.index("slow2"), order
    by = {e[0]: e for e in events}
    assert by["fast"][1].startswith(b"250 ") and by["fast"][2] == 1
    # each 250 came only once the slow MX had stored the message (the sink's count then)
    assert by["slow1"][1].startswith(b"250 ") and by["slow1"][2] >= 1
    assert by["slow2"][1].startswith(b"250 ") and by["slow2"][2] == 2
    assert len(slow.sink.messages) == 2 and len(fast.sink.messages) == 1
    assert relay.gates.stats == {"queued": 1, "busy_refused": 1, "max_waiting": 1}
    # the busy refusal tried no target: three attempts, all delivered
    assert sorted(a.onion for a in attempts) == sorted([slow.onion, slow.onion, fast.onion])
    assert all(a.reason_class == "delivered" for a in attempts)


def lmtp_send(sock_path, rcpt: str) -> socket.socket:
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(sock_path))
    client.settimeout(60)
    assert client.recv(1024).startswith(b"220 ")
    client.sendall(f"LHLO t\r\nMAIL FROM:<a@o.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    got = b""
    while b"354 " not in got:
        got += client.recv(1024)
    client.sendall(b"Subject: s\r\n\r\nbody\r\n.\r\n")
    return client


def read_until_closed(client: socket.socket) -> bytes:
    got = b""
    while chunk := client.recv(4096):
        got += chunk
    return got


def test_queued_transactions_get_4xx_when_the_daemon_stops(testnet, onion_sink_factory,
                                                           dnsmasq_factory, daemon_factory,
                                                           serve_dir) -> None:
    slow = onion_sink_factory()
    slow.sink.data_delay = 4.0
    cfg = serve_dir / "torroute.toml"
    cfg.write_text(config_text(serve_dir, dnsmasq_factory([]).port, testnet.socks_extended,
                               f"slow.test {slow.onion}\n",
                               "\n[serve]\nlmtp_max_per_onion = 1\n"
                               "lmtp_max_waiting_per_onion = 4\ndrain_timeout = 30\n"))
    sock_path = serve_dir / "lmtp.sock"
    daemon = daemon_factory("--config", str(cfg), "--lmtp", f"unix:{sock_path}")
    wait_socket(str(sock_path), proc=daemon.proc)
    busy = lmtp_send(sock_path, "u1@slow.test")
    time.sleep(1.0)  # it holds the one connection to the slow onion
    queued = lmtp_send(sock_path, "u2@slow.test")
    time.sleep(0.5)
    daemon.stop()
    with busy, queued:
        queued_said, busy_said = read_until_closed(queued), read_until_closed(busy)
    # the queued one: nothing sent, answered 4xx (Postfix keeps it), then 421
    assert queued_said.startswith(b"451 4.3.2 ") and b"shutting down" in queued_said
    assert queued_said.rstrip().endswith(b"shutting down") and b"\r\n421 " in queued_said
    # the one in flight finished within drain_timeout: delivered, then answered
    assert busy_said.startswith(b"250 "), busy_said
    assert [m.rcpt_tos for m in slow.sink.messages] == [["u1@slow.test"]]
    log = daemon.log()
    assert "lmtp: relay stats " in log and "queued=1" in log
