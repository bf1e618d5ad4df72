"""Onion MXs on the private Tor network, for the end-to-end and backup-target tests (pipe and
LMTP relay).  The onions cost ~2-4 s each to publish, so they are made once per module or session:

  ``onion_mx``        module: one real aiosmtpd sink (SMTPUTF8, PIPELINING) behind its own onion
                      (support.e2e.OnionMX).
  ``mx_pair``         session: two such sinks, each behind its own onion; ``mxs`` is the same
                      pair, emptied and accepting everything, per test.
  ``stopped_onion``   session: a published onion whose SMTP server has stopped: tor answers 0x01.
  ``silent_onion``    session: an onion whose server accepts and never greets (``FakeSmtpServer``,
                      fake: a server that never answers, on demand).
``support.e2e.UNPUBLISHED`` is a valid v3 address nobody publishes: tor answers 0xF0.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.e2e import MxPair, OnionMX
from support.fakes import FakeSmtpServer

from torroute.testing.sink import ESMTP_FULL, MaildirSink


@pytest.fixture(scope="module")
def onion_mx(testnet) -> Iterator[OnionMX]:
    """A real aiosmtpd (SMTPUTF8, PIPELINING) behind its own onion service on the testnet."""
    sink = MaildirSink(**ESMTP_FULL).start()
    onion = testnet.net.add_onion({25: sink.address})
    yield OnionMX(onion, sink)
    testnet.net.remove_onion(onion)
    sink.stop()


@pytest.fixture(scope="session")
def mx_pair(testnet) -> Iterator[MxPair]:
    sinks = [MaildirSink(**ESMTP_FULL).start(), MaildirSink(**ESMTP_FULL).start()]
    onions = [testnet.net.add_onion({25: s.address}) for s in sinks]
    yield MxPair(OnionMX(onions[0], sinks[0]), OnionMX(onions[1], sinks[1]))
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
    sink = MaildirSink(**ESMTP_FULL).start()
    onion = testnet.net.add_onion({25: sink.address})
    sink.stop()
    yield onion
    testnet.net.remove_onion(onion)


@pytest.fixture(scope="session")
def silent_onion(testnet) -> Iterator[str]:
    server = FakeSmtpServer("silent")  # fake: accepts, never sends a greeting
    onion = testnet.net.add_onion({25: server.address})
    yield onion
    testnet.net.remove_onion(onion)
    server.close()
