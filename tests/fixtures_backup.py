"""Onion MXs on the private Tor network for the backup-target tests (pipe and LMTP relay).

Session fixtures (the onions cost ~2-4 s each to publish, so they are made once):
  ``mx_pair``         two real aiosmtpd sinks (``SmtpSink``), each behind its own onion;
                      ``mxs`` is the same pair, emptied and accepting everything, per test.
  ``stopped_onion``   a published onion whose SMTP server has stopped: tor answers 0x01.
  ``silent_onion``    an onion whose server accepts and never greets (``FakeSmtpServer``,
                      fake: a server that never answers, on demand).
``UNPUBLISHED`` is a valid v3 address nobody publishes: tor answers 0xF0 (no descriptor).
``srv_toml`` writes the configuration the daemon, the pipe and the relay share.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from onions import ONION_C

if TYPE_CHECKING:
    from fixtures_postfix import SmtpSink

UNPUBLISHED = ONION_C  # a real key (valid point, right checksum), never published
SRV = "_onion-mx._tcp."


@dataclass
class Mx:
    onion: str
    sink: SmtpSink


@dataclass
class MxPair:
    first: Mx
    second: Mx

    def reset(self) -> None:
        self.first.sink.reset()
        self.second.sink.reset()


@pytest.fixture(scope="session")
def mx_pair(testnet) -> Iterator[MxPair]:
    from fixtures_postfix import SmtpSink  # here: conftest loads fixtures_postfix after us

    sinks = [SmtpSink().start(), SmtpSink().start()]
    onions = [testnet.net.add_onion({25: s.address}) for s in sinks]
    yield MxPair(Mx(onions[0], sinks[0]), Mx(onions[1], sinks[1]))
    for onion, sink in zip(onions, sinks, strict=True):
        testnet.net.remove_onion(onion)
        sink.stop()


@pytest.fixture
def mxs(mx_pair: MxPair, testnet) -> MxPair:
    testnet.check_alive()
    mx_pair.reset()
    return mx_pair


@pytest.fixture(scope="session")
def stopped_onion(testnet) -> Iterator[str]:
    """Published while its server ran, then the server stopped (the port is closed)."""
    from fixtures_postfix import SmtpSink

    sink = SmtpSink().start()
    onion = testnet.net.add_onion({25: sink.address})
    sink.stop()
    yield onion
    testnet.net.remove_onion(onion)


@pytest.fixture(scope="session")
def silent_onion(testnet) -> Iterator[str]:
    from fixtures_postfix import FakeSmtpServer

    server = FakeSmtpServer("silent")  # fake: accepts, never sends a greeting
    onion = testnet.net.add_onion({25: server.address})
    yield onion
    testnet.net.remove_onion(onion)
    server.close()


def srv_toml(directory: Path, dns_port: int, socks: tuple[str, int], pins: str = "",
             deliver: str = "") -> Path:
    """The shared torroute.toml: dnsmasq for SRV, a text map, tor's SocksPort, [deliver]."""
    (directory / "map.txt").write_text(pins)
    cfg = directory / "torroute.toml"
    cfg.write_text(f'[routing]\nmaps = ["{directory / "map.txt"}"]\n'
                   f'nameservers = ["127.0.0.1:{dns_port}"]\ndns_timeout = 1.0\n\n'
                   f'[tor]\nsocks = "{socks[0]}:{socks[1]}"\n\n[deliver]\n{deliver}\n')
    cfg.chmod(0o644)
    return cfg
