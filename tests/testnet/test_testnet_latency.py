"""PrivateNetwork(latency_ms=...): a private Tor network whose relay hops are delayed by
torroute.testing.latency proxies boots, carries an onion SMTP round trip, and the proxies
really carried (and delayed) the network's traffic.  Timings are printed, not asserted: a
test is not a benchmark."""

from __future__ import annotations

import re
import time

import pytest

from torroute.testing.sink import MaildirSink
from torroute.testing.testnet import Node, PrivateNetwork
from torroute.tor import dial

pytestmark = pytest.mark.testnet


def test_a_network_with_latency_boots_and_carries_an_onion_round_trip(tmp_path) -> None:
    with MaildirSink() as sink:
        net = PrivateNetwork(tmp_path / "net", {25: sink.address}, latency_ms=50)
        try:
            net.up(timeout=240)
            relays = [n for n in net.nodes if n.role in ("authority", "relay")]
            assert relays and all(n.or_bind_port and n.or_bind_port != n.or_port
                                  for n in relays)
            for node in relays:  # advertised on the proxy, listening behind it
                torrc = node.torrc_path.read_text()
                assert f"ORPort 127.0.0.1:{node.or_port} NoListen" in torrc
                assert f"ORPort 127.0.0.1:{node.or_bind_port} NoAdvertise" in torrc
            started = time.monotonic()
            sock = dial.dial(net.onion, 25, proxy=net.socks_extended, timeout=120)
            dialed = time.monotonic() - started
            with sock:
                greeting = sock.recv(1000)
                started = time.monotonic()
                sock.sendall(b"NOOP\r\n")
                noop = sock.recv(1000)
                rtt = time.monotonic() - started
                sock.sendall(b"QUIT\r\n")
            assert greeting.startswith(b"220 ") and noop.startswith(b"250")
            print(f"50 ms per hop: onion dial {dialed * 1000:.0f} ms, "
                  f"SMTP round trip {rtt * 1000:.0f} ms")
            log = ""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the proxy reports its counters each second
                log = (net.directory / "latency.log").read_text()
                counts = re.findall(r"connections=(\d+) bytes_delayed=(\d+)", log)
                if counts and int(counts[-1][1]) > 0:
                    break
                time.sleep(0.5)
            assert counts, log
            assert int(counts[-1][0]) >= len(relays) and int(counts[-1][1]) > 10000
            assert "Traceback" not in log
            pid = net.latency_pid
            assert pid is not None
        finally:
            net.down()
        assert net.latency_pid is None
        assert not _alive(pid)


def test_no_latency_is_todays_network(tmp_path) -> None:
    """The default (0) writes a relay's torrc as before: one plain ORPort, no proxy."""
    net = PrivateNetwork(tmp_path / "net", owner_pid=1)
    net.nodes = [Node("relay0", "relay", tmp_path / "relay0", 20001, or_port=20002)]
    torrc = net.torrc(net.nodes[0])
    assert "ORPort 127.0.0.1:20002\n" in torrc
    assert "NoListen" not in torrc and "NoAdvertise" not in torrc
    net._start_latency()  # nothing to start
    assert net.latency_pid is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
