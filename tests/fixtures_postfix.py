"""Fixtures for Postfix (the one runner: support.postfix.PostfixInstance), the clear-net sink,
and the two named fakes (support.fakes), for faults real parts cannot produce on demand."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fakes import FakeSmtpServer, FakeSocksServer
from support.paths import shared_tmpdir
from support.postfix import POSTFIX, PostfixInstance

from torroute.testing.sink import ESMTP_FULL, MaildirSink


def _require_postfix() -> None:
    if not Path(POSTFIX).exists():
        pytest.fail("postfix is not installed: run scripts/install-deps.sh (CI installs it)")


@pytest.fixture
def postfix_dir() -> Iterator[Path]:
    path = shared_tmpdir("torroute-postfix-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clear_sink() -> Iterator[MaildirSink]:
    """A sink standing for the clear net (Postfix's default_transport): must stay empty of
    onion-routed mail."""
    sink = MaildirSink(**ESMTP_FULL).start()
    yield sink
    sink.stop()


@pytest.fixture
def postfix_factory(postfix_dir: Path, clear_sink: MaildirSink) -> Iterator:
    """``make(transport_maps, deliver_config="", **kw)`` -> a started PostfixInstance whose
    default_transport is ``clear_sink`` and whose pipe runs this checkout's `torroute deliver`."""
    _require_postfix()
    made: list[PostfixInstance] = []

    def make(transport_maps: str, deliver_config: str = "", name: str = "pf",
             **kwargs) -> PostfixInstance:
        workdir = postfix_dir / f"{name}{len(made)}"
        workdir.mkdir(mode=0o755)
        pf = PostfixInstance(workdir, transport_maps, clear_sink.port, deliver_config,
                             **kwargs)
        made.append(pf)
        return pf.start()

    yield make
    for pf in made:
        pf.stop()


@pytest.fixture
def postmap(serve_dir: Path) -> PostfixInstance:
    """A Postfix client configuration (never started) for ``postmap.query(key, table)`` and
    ``postmap.stdin_session(table)``: Postfix's own map client, reporting on its stderr."""
    pf = PostfixInstance(serve_dir / "postfix", maillog_file="/dev/stderr")
    pf.write()
    return pf


@pytest.fixture(scope="session")
def postfix_smtpds() -> Iterator[dict[str, PostfixInstance]]:
    """Two real Postfix smtpds for the open-relay probe: ``open`` (Debian defaults: mynetworks
    includes 127.0.0.0/8, so clients on 127.0.0.1 may relay -- the trap) and ``closed`` (the
    dedicated onion smtpd the docs recommend: ``-o mynetworks= -o
    smtpd_relay_restrictions=reject_unauth_destination``)."""
    _require_postfix()
    base = shared_tmpdir("torroute-relaycheck-")
    host = {"myhostname": "relaytest.torroute.invalid", "mydestination": "$myhostname"}
    servers = {
        "open": PostfixInstance(base / "open", **host),
        "closed": PostfixInstance(base / "closed", smtpd_args=(
            "-o mynetworks= -o smtpd_relay_restrictions=reject_unauth_destination"), **host),
    }
    started: list[PostfixInstance] = []
    try:
        for server in servers.values():
            started.append(server.start())
        yield servers
    finally:
        for server in started:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fake_socks_factory() -> Iterator:
    made: list[FakeSocksServer] = []

    def make(target: tuple[str, int] | None = None) -> FakeSocksServer:
        server = FakeSocksServer(target)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def fake_smtp_factory() -> Iterator:
    made: list[FakeSmtpServer] = []

    def make(mode: str) -> FakeSmtpServer:
        server = FakeSmtpServer(mode)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()
