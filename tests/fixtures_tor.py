"""Fixtures for real tor (loopback only) and real dnsmasq."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from realparts import Dnsmasq, SilentUdpServer, SrvRecord, TorProcess


@pytest.fixture(scope="session")
def tor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorProcess]:
    """One real tor for the whole session (bridge mode: never bootstraps, never leaves loopback)."""
    proc = TorProcess(tmp_path_factory.mktemp("tor")).start()
    yield proc
    proc.stop()


@pytest.fixture
def tor_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
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
def dnsmasq_factory() -> Iterator:
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
    server = SilentUdpServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def have_tor() -> None:
    if shutil.which("tor") is None and not Path("/usr/sbin/tor").exists():
        pytest.fail("tor is not installed: run scripts/install-deps.sh (CI installs it)")
