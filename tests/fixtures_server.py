"""Fixtures for the lookup daemon: a real `torroute serve` process (support.daemon.Daemon) and
the log check of a daemon run in the test's own process."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import Daemon
from support.paths import shared_tmpdir


@pytest.fixture
def serve_dir() -> Iterator[Path]:
    """A 0755 directory (Postfix/Exim users must reach the sockets), removed afterwards."""
    path = shared_tmpdir("torroute-serve-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon_factory(serve_dir: Path) -> Iterator:
    """``daemon_factory(*args)`` starts `torroute serve` with all three listeners plus args.

    At teardown every daemon is stopped and its log must have no ERROR/CRITICAL/Traceback
    line, unless the test set ``d.expect_errors = True`` (and asserted its own error)."""
    made: list[Daemon] = []

    def make(*args: str, start: bool = True, env: dict[str, str] | None = None,
             **paths: str) -> Daemon:
        """``paths``: socketmap= / exim= socket paths other than the defaults."""
        name = "daemon.log" if not made else f"daemon-{len(made) + 1}.log"
        d = Daemon(serve_dir, list(args), log_name=name, env=dict(env or {}), **paths)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.stop()
    for d in made:
        if not d.expect_errors:
            d.check_log()


@pytest.fixture
def daemon_records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """For a daemon (LookupDaemon, Relay) run in the test's own process: its log records, at
    INFO and above.  At teardown nothing may have logged ERROR or worse or a traceback, unless
    the test set ``daemon_records.expect_errors = True`` (and checked its own error)."""
    caplog.set_level(logging.INFO)
    caplog.expect_errors = False  # type: ignore[attr-defined]
    yield caplog
    if not caplog.expect_errors:  # type: ignore[attr-defined]
        records = caplog.get_records("setup") + caplog.get_records("call")
        bad = [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
        assert not bad, "in-process daemon logged errors:\n" + "\n".join(
            f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad)
