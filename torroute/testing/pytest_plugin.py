"""torroute's pytest plugin: real tor, dnsmasq, SMTP sinks and the private Tor network as fixtures.

Registered as the ``pytest11`` entry point ``torroute``: installing torroute (with its ``test``
extra, for aiosmtpd) makes these fixtures available in any test suite; ``-p no:torroute`` turns
the plugin off.  Every process listens on 127.0.0.1 only; none reaches past loopback.

=======================  ========  ==========================================================
fixture                  scope     yields
=======================  ========  ==========================================================
``tor``                  session   a :class:`~torroute.testing.tor.TorProcess` (bridge mode:
                                   never bootstraps)
``tor_factory``          function  ``make(extra=[...], start=True, **kw)`` -> TorProcess
``dnsmasq_factory``      function  ``make(srv=[SrvRecord...], **kw)`` -> started Dnsmasq
``silent_udp``           function  a :class:`~torroute.testing.dnsmasq.SilentUdpServer`
``smtp_sink``            function  a started :class:`~torroute.testing.sink.MaildirSink`
``maildir_sink``         function  a started MaildirSink storing in ``tmp_path / "Maildir"``
``testnet``              session   :class:`RunningTestnet`: the private Tor network
``onion_sink``           function  :class:`OnionSink`: the session sink behind ``testnet.onion``
``onion_sink_factory``   function  ``make(vports=(25,))`` -> a fresh OnionSink on a new onion
=======================  ========  ==========================================================

Tests that use ``testnet``, ``onion_sink`` or ``onion_sink_factory`` get the ``testnet`` marker
(``-m "not testnet"`` leaves them out).  ``TORROUTE_TESTNET_KEEP=1`` keeps the network's
directory (its logs) after the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .dnsmasq import Dnsmasq, SilentUdpServer, SrvRecord
from .sink import ESMTP_FULL, MaildirSink
from .tor import TOR, TorProcess

#: fixtures that boot (or use) the session's private Tor network
TESTNET_FIXTURES = frozenset({"testnet", "onion_sink", "onion_sink_factory"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "testnet: needs the private Tor network (boots once per session)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the private network ``testnet``, whether or not it says so."""
    for item in items:
        if TESTNET_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.testnet)


# ---------------------------------------------------------------------------------------------
# real tor (bridge mode) and dnsmasq


def _require_tor() -> None:
    if shutil.which("tor") is None and not Path(TOR).exists():
        pytest.fail("tor is not installed (Debian: apt-get install tor)")


@pytest.fixture(scope="session")
def have_tor() -> None:
    """Fails the test clearly when no tor binary is installed."""
    _require_tor()


@pytest.fixture(scope="session")
def tor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorProcess]:
    """One real tor for the whole session (bridge mode: never bootstraps, never leaves loopback)."""
    _require_tor()
    proc = TorProcess(tmp_path_factory.mktemp("tor")).start()
    yield proc
    proc.stop()


@pytest.fixture
def tor_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., TorProcess]]:
    """Make extra tors with their own torrc lines (stopped at the end of the test)."""
    made: list[TorProcess] = []

    def make(extra: list[str] | None = None, start: bool = True, **kwargs) -> TorProcess:
        proc = TorProcess(Path(tmp_path_factory.mktemp("tor")), extra=extra or [], **kwargs)
        made.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture
def dnsmasq_factory() -> Iterator[Callable[..., Dnsmasq]]:
    """Start real dnsmasq servers: ``dnsmasq_factory(srv=[SrvRecord(...)], ttl=...)``."""
    made: list[Dnsmasq] = []

    def make(srv: list[SrvRecord] | None = None, **kwargs) -> Dnsmasq:
        server = Dnsmasq(srv=list(srv or []), **kwargs).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def silent_udp() -> Iterator[SilentUdpServer]:
    """A UDP port that never answers (a nameserver that times out)."""
    server = SilentUdpServer()
    yield server
    server.close()


# ---------------------------------------------------------------------------------------------
# SMTP sinks


@pytest.fixture
def smtp_sink() -> Iterator[MaildirSink]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 keeping messages in memory; SMTPUTF8,
    PIPELINING and CHUNKING offered (``ESMTP_FULL``)."""
    sink = MaildirSink(**ESMTP_FULL).start()
    yield sink
    sink.stop()


@pytest.fixture
def maildir_sink(tmp_path: Path) -> Iterator[MaildirSink]:
    """A real SMTP server on 127.0.0.1 (aiosmtpd's extensions) storing messages in
    ``tmp_path / "Maildir"`` too."""
    sink = MaildirSink(tmp_path / "Maildir").start()
    yield sink
    sink.stop()


# ---------------------------------------------------------------------------------------------
# the private Tor network


@dataclass
class OnionSink:
    """An SMTP sink reachable as ``onion:port`` through the testnet's client tor."""

    onion: str
    port: int
    sink: MaildirSink

    @property
    def maildir(self) -> Path | None:
        return self.sink.maildir_path


class RunningTestnet:
    """What the ``testnet`` fixture yields: the network, its client ports and the session sink.

    ``socks``/``socks_extended``/``dns``/``control`` are ("127.0.0.1", port) tuples of the client
    tor (``socks_extended`` has ExtendedErrors: 0xF0..0xF7 replies); ``onion`` port 25 reaches
    ``sink`` (a Maildir SMTP sink); ``root`` is a 0755 directory for per-test state; ``net`` is
    the :class:`~torroute.testing.testnet.PrivateNetwork` itself (``net.add_onion``...).
    """

    def __init__(self, net, sink: MaildirSink, root: Path) -> None:
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
    from .testnet import PrivateNetwork

    if shutil.which("tor") is None or shutil.which("tor-gencert") is None:
        pytest.fail("tor / tor-gencert not installed (Debian: apt-get install tor)")
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
def onion_sink_factory(testnet: RunningTestnet) -> Iterator[Callable[..., OnionSink]]:
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
