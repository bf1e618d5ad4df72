"""Fixtures for torroute.tor.control: real loopback-only tors with chosen control/auth settings
(support.tor.ControlTor) and a hashed control password from ``tor --hash-password``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.tor import ControlTor, hash_password


@pytest.fixture
def control_tor_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """``control_tor_factory(bare=True, control_socket=True, cookie=..., extra=[...],
    control_password_hash=...)`` -> a started ControlTor, stopped after the test."""
    made: list[ControlTor] = []

    def make(start: bool = True, **kwargs) -> ControlTor:
        proc = ControlTor(Path(tmp_path_factory.mktemp("ctltor")), **kwargs)
        made.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture(scope="session")
def control_password() -> tuple[str, str]:
    """(password, hash) for HashedControlPassword."""
    password = "torroute-test-password"
    return password, hash_password(password)
