"""The private Tor network (torroute.testing.testnet), booted once per session, with SMTP
sinks behind it.

Fixtures:
  ``testnet``              session: a running network; ``.onion`` port 25 reaches ``.sink``.
  ``onion_sink``           per test: that session sink, emptied and accepting everything again.
  ``onion_sink_factory``   per test: ``make(vports=(25,))`` -> a fresh sink on a fresh onion
                           (ADD_ONION; ~2-4 s each), removed at the end of the test.
Mark tests that use them ``@pytest.mark.testnet``.  ``TORROUTE_TESTNET_KEEP=1`` keeps the
network directory (logs) after the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from torroute.testing.sink import MaildirSink
from torroute.testing.testnet import PrivateNetwork


@dataclass
class OnionSink:
    """An SMTP sink reachable as ``onion:port`` through the testnet's client tor."""

    onion: str
    port: int
    sink: MaildirSink

    @property
    def maildir(self) -> Path:
        return self.sink.maildir_path


class RunningTestnet:
    """What the ``testnet`` fixture yields: the network, its client ports and the session sink.

    ``socks``/``socks_extended``/``dns``/``control`` are ("127.0.0.1", port) tuples of the client
    tor (``socks_extended`` has ExtendedErrors: 0xF0..0xF7 replies); ``onion`` port 25 reaches
    ``sink`` (a Maildir SMTP sink); ``root`` is a 0755 directory for per-test state.
    """

    def __init__(self, net: PrivateNetwork, sink: MaildirSink, root: Path) -> None:
        self.net = net
        self.sink = sink
        self.root = root
        self.onion = net.onion
        self.socks = net.socks
        self.socks_extended = net.socks_extended
        self.dns = net.dns
        self.control = net.control
        self.control_cookie = net.control_cookie
        self.boot_seconds = net.timings.get("ready", 0.0)
        self._serial = 0

    @property
    def onion_sink(self) -> OnionSink:
        return OnionSink(self.onion, 25, self.sink)

    def new_dir(self, prefix: str) -> Path:
        """A fresh 0755 directory under the network's root (not pytest's 0700 tmp_path)."""
        self._serial += 1
        path = self.root / f"{prefix}{self._serial}"
        path.mkdir(mode=0o755, parents=True)
        return path

    def add_sink(self, vports: tuple[int, ...] = (25,), timeout: float = 60.0) -> OnionSink:
        """A new Maildir sink behind a new onion service (every vport -> the sink)."""
        sink = MaildirSink(self.new_dir("sink") / "Maildir").start()
        try:
            onion = self.net.add_onion({v: sink.address for v in vports}, timeout=timeout)
        except BaseException:
            sink.stop()
            raise
        return OnionSink(onion, vports[0], sink)

    def check_alive(self) -> None:
        """Fail clearly if a node of the session network died (an earlier test's doing?)."""
        for node in self.net.nodes:
            if node.process is not None and node.process.poll() is not None:
                pytest.fail(f"the session testnet lost {node.name} (exit "
                            f"{node.process.returncode}); its log ends:\n{node.log_tail()}")

    def remove_sink(self, onion_sink: OnionSink) -> None:
        self.net.remove_onion(onion_sink.onion)
        onion_sink.sink.stop()


@pytest.fixture(scope="session")
def testnet() -> Iterator[RunningTestnet]:
    """Boot the private Tor network once per session (~10-13 s); fails with the failing node's
    name and log tail if it cannot boot."""
    if shutil.which("tor") is None or shutil.which("tor-gencert") is None:
        pytest.fail("tor / tor-gencert not installed: run scripts/install-deps.sh")
    root = Path(tempfile.mkdtemp(prefix="torroute-testnet-"))
    root.chmod(0o755)
    sink = MaildirSink(root / "sink" / "Maildir").start()
    net = PrivateNetwork(root / "net", {25: sink.address},
                         progress=lambda msg: print(f"testnet: {msg}", flush=True))
    started = time.monotonic()
    try:
        net.up(timeout=120)
    except BaseException:
        sink.stop()
        if os.environ.get("TORROUTE_TESTNET_KEEP") != "1":
            shutil.rmtree(root, ignore_errors=True)
        raise
    print(f"testnet: ready in {time.monotonic() - started:.1f}s at {root}")
    running = RunningTestnet(net, sink, root)
    yield running
    keep = os.environ.get("TORROUTE_TESTNET_KEEP") == "1"
    net.down(keep=keep)
    sink.stop()
    if not keep:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def onion_sink(testnet: RunningTestnet) -> OnionSink:
    """The session's onion sink (port 25), emptied and accepting every recipient again."""
    testnet.check_alive()
    testnet.sink.reset()
    return testnet.onion_sink


@pytest.fixture
def onion_sink_factory(testnet: RunningTestnet) -> Iterator:
    """``make(vports=(25,))`` -> a fresh OnionSink on its own onion; removed after the test."""
    made: list[OnionSink] = []
    testnet.check_alive()

    def make(vports: tuple[int, ...] = (25,), timeout: float = 60.0) -> OnionSink:
        item = testnet.add_sink(vports, timeout=timeout)
        made.append(item)
        return item

    yield make
    for item in made:
        testnet.remove_sink(item)
