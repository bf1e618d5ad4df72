"""torroute.testing.latency: the delaying proxy in front of the testnet's ORPorts, on real
loopback sockets (ordering, the delay applied each way, no data lost, close propagated,
bounded buffering) -- and the relay's per-onion gates (OnionGates), plain asyncio."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from torroute.delivery.relay import OnionGates
from torroute.testing.latency import LatencyProxy
from torroute.testing.ports import free_port


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_echo_through_the_proxy_is_ordered_complete_and_delayed_both_ways() -> None:
    async def main() -> tuple[bytes, bytes, float, LatencyProxy]:
        server, port = await _echo_server()
        proxy = await LatencyProxy(("127.0.0.1", 0), ("127.0.0.1", port), 0.1).start()
        reader, writer = await asyncio.open_connection(*proxy.listen)
        started = time.monotonic()
        writer.write(b"ping")
        first = await reader.readexactly(4)
        rtt = time.monotonic() - started
        # many chunks, one direction after the other: order and completeness
        payload = b"".join(i.to_bytes(4, "big") for i in range(200_000))
        writer.write(payload)
        writer.write_eof()
        echoed = await reader.read()  # until the server's close came back through the proxy
        writer.close()
        await proxy.close()
        server.close()
        return first, echoed, rtt, proxy

    first, echoed, rtt, proxy = run(main())
    assert first == b"ping"
    assert echoed == b"".join(i.to_bytes(4, "big") for i in range(200_000))
    assert rtt >= 0.2  # 0.1 s there and 0.1 s back: both directions are delayed
    assert proxy.connections == 1
    assert proxy.bytes_delayed == 2 * (4 + 800_000)
    print(f"round trip through a 100 ms proxy: {rtt * 1000:.0f} ms")


def test_a_closed_target_closes_the_client_side() -> None:
    async def main() -> bytes:
        async def hang_up(reader, writer) -> None:
            writer.write(b"bye")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxy = await LatencyProxy(("127.0.0.1", 0), ("127.0.0.1", port), 0.02).start()
        reader, writer = await asyncio.open_connection(*proxy.listen)
        got = await reader.read()  # b"bye", then EOF
        writer.close()
        await proxy.close()
        server.close()
        return got

    assert run(main()) == b"bye"


def test_nothing_listening_behind_closes_the_connection() -> None:
    async def main() -> bytes:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        proxy = await LatencyProxy(("127.0.0.1", 0), ("127.0.0.1", port), 0.01).start()
        reader, writer = await asyncio.open_connection(*proxy.listen)
        got = await reader.read()
        writer.close()
        await proxy.close()
        return got

    assert run(main()) == b""


def test_buffering_is_bounded_when_the_far_side_does_not_read() -> None:
    async def main() -> int:
        stalled: list[asyncio.StreamWriter] = []

        async def never_reads(reader, writer) -> None:
            stalled.append(writer)
            await asyncio.sleep(30)

        server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxy = await LatencyProxy(("127.0.0.1", 0), ("127.0.0.1", port), 0.0,
                                   max_buffer=64 * 1024).start()
        reader, writer = await asyncio.open_connection(*proxy.listen)
        chunk = b"x" * 65536
        for _ in range(200):  # 12.5 MiB offered; the proxy must stop taking it
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break
        taken = proxy.bytes_delayed
        writer.close()
        await proxy.close()
        server.close()
        return taken

    taken = run(main())
    assert taken < 12 * 1024 * 1024  # reading paused: socket buffers + max_buffer, not all


def test_a_bad_mapping_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "torroute.testing.latency", "--delay-ms", "5",
                           "127.0.0.1:0=127.0.0.1:9"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2
    assert "port in 1..65535" in proc.stderr and "Traceback" not in proc.stderr


def test_loopback_only() -> None:
    with pytest.raises(ValueError):
        LatencyProxy(("0.0.0.0", 0), ("127.0.0.1", 1), 0.0)
    with pytest.raises(ValueError):
        LatencyProxy(("127.0.0.1", 0), ("10.0.0.1", 25), 0.0)


def test_the_proxy_program_says_ready_and_exits_with_its_owner(tmp_path) -> None:
    owner = subprocess.Popen(["sleep", "30"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "torroute.testing.latency", "--delay-ms", "5",
         "--owner", str(owner.pid), "--dir", str(tmp_path), f"127.0.0.1:{free_port()}=127.0.0.1:9"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready 127.0.0.1:")
        owner.kill()
        owner.wait()
        assert proc.wait(15) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        for p in (owner, proc):
            if p.poll() is None:
                p.kill()
                p.wait()


# ---- the relay's per-onion gates

def test_gates_cap_each_onion_queue_in_order_and_refuse_beyond_the_queue() -> None:
    async def main() -> tuple[list[str], bool, bool, dict]:
        gates = OnionGates(max_per_onion=1, max_waiting=2)
        slow, fast = ("a.onion", 25), ("b.onion", 25)
        order: list[str] = []
        assert await gates.acquire(slow)

        async def wait_turn(name: str) -> None:
            await gates.acquire(slow)
            order.append(name)
            gates.release(slow)

        w1 = asyncio.create_task(wait_turn("first"))
        await asyncio.sleep(0)
        w2 = asyncio.create_task(wait_turn("second"))
        await asyncio.sleep(0)
        refused = not await gates.acquire(slow)  # the queue (2) is full: defer at once
        other = await gates.acquire(fast)  # another onion is not held up at all
        gates.release(fast)
        gates.release(slow)
        await asyncio.gather(w1, w2)
        return order, refused, other, gates

    order, refused, other, gates = run(main())
    assert order == ["first", "second"]
    assert refused and other
    assert gates.stats == {"queued": 2, "busy_refused": 1, "max_waiting": 2}
    assert gates.gates == {}  # nothing kept for idle onions


def test_a_cancelled_waiter_gives_up_its_place_and_a_handed_slot_is_passed_on() -> None:
    async def main() -> tuple[bool, dict]:
        gates = OnionGates(max_per_onion=1, max_waiting=4)
        key = ("a.onion", 25)
        await gates.acquire(key)
        gone = asyncio.create_task(gates.acquire(key))
        later = asyncio.create_task(gates.acquire(key))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        gates.release(key)  # skips the cancelled waiter
        got = await asyncio.wait_for(later, 5)
        gates.release(key)
        return got, gates.gates

    got, left = run(main())
    assert got is True
    assert left == {}


def test_closing_the_gates_refuses_waiters_and_newcomers_but_not_the_busy() -> None:
    async def main() -> tuple[bool, bool, dict]:
        gates = OnionGates(max_per_onion=1, max_waiting=4)
        key = ("a.onion", 25)
        assert await gates.acquire(key)  # in use: its transaction goes on
        waiting = asyncio.create_task(gates.acquire(key))
        await asyncio.sleep(0)
        gates.close()  # the daemon stops
        refused = await asyncio.wait_for(waiting, 5)
        newcomer = await gates.acquire(key)
        gates.release(key)
        return refused, newcomer, gates.gates

    refused, newcomer, left = run(main())
    assert refused is False and newcomer is False
    assert left == {}


def test_the_gate_settings_are_checked() -> None:
    from torroute.daemon.settings import ServeSettings
    from torroute.errors import ConfigError

    ServeSettings(lmtp_max_per_onion=1, lmtp_max_waiting_per_onion=0).check()
    for bad in ({"lmtp_max_per_onion": 0}, {"lmtp_max_waiting_per_onion": -1}):
        with pytest.raises(ConfigError, match="lmtp_max_per_onion"):
            ServeSettings(**bad).check()
