"""Fixtures for throwaway real Exim instances (the one runner: support.exim.EximInstance)
running the shipped torroute Exim plugin files, Debian's generated config, or a routers section
given as text.  Work directories and trusted_configs entries are removed afterwards
(``TORROUTE_EXIM_KEEP=1`` keeps the directories), daemons stopped."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.exim import (
    EXIM_BIN,
    EximInstance,
    TrustedConfigs,
    build_debian_config,
    debian_overrides,
    plugin_config,
    prepare_workdir,
    routers_config,
    torroute_macros,
)
from support.paths import shared_tmpdir

from torroute.testing.ports import free_port


@pytest.fixture
def debian_exim_factory(exim_binary: Path) -> Iterator:
    """``make(socket, socks, split=..., perl=..., smarthost_port=...)`` -> an EximInstance
    running Debian's generated exim4 config (split or non-split) with torroute installed."""
    trusted = TrustedConfigs()
    made: list[EximInstance] = []

    def make(socket: str, socks: tuple[str, int], *, split: bool, perl: bool,
             smarthost_port: int = 0, macros: dict[str, str] | None = None,
             install: bool = True) -> EximInstance:
        workdir = shared_tmpdir("torroute-debexim-")
        prepare_workdir(workdir)
        smtp_port = free_port()
        smarthost_port = smarthost_port or free_port()
        all_macros = debian_overrides(workdir, workdir / "etc")
        all_macros.update(torroute_macros(socket, socks, perl=perl, extra=macros))
        all_macros["TORROUTE_PERL_SCRIPT"] = str(workdir / "perl" / "torroute.pl")
        conf = build_debian_config(workdir, split=split, smarthost=f"127.0.0.2::{smarthost_port}",
                                   smtp_port=smtp_port, macros=all_macros, install=install)
        trusted.add(conf)
        inst = EximInstance(workdir, conf, smtp_port, smarthost_port)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.stop_daemon()
        if os.environ.get("TORROUTE_EXIM_KEEP") != "1":
            shutil.rmtree(inst.workdir, ignore_errors=True)
    trusted.remove_all()


@pytest.fixture(scope="session")
def exim_binary() -> Path:
    if not EXIM_BIN.exists():
        pytest.fail(f"{EXIM_BIN} missing: run scripts/install-exim.sh (CI's install-deps does)")
    return EXIM_BIN


@pytest.fixture
def exim_plugin_factory(exim_binary: Path) -> Iterator:
    """``make(socket, socks, perl=..., macros={...}, clear_port=...)`` -> an EximInstance whose
    config includes the plugin's conf.d files.  Work directories and trusted_configs entries
    are removed afterwards, daemons stopped."""
    trusted = TrustedConfigs()
    made: list[EximInstance] = []

    def make(socket: str, socks: tuple[str, int], *, perl: bool, clear_port: int = 0,
             macros: dict[str, str] | None = None, timeout: str = "5s") -> EximInstance:
        workdir = shared_tmpdir("torroute-exim-")
        prepare_workdir(workdir)
        smtp_port = free_port()
        clear_port = clear_port or free_port()  # nothing listens there unless the test says
        all_macros = torroute_macros(socket, socks, perl=perl, timeout=timeout, extra=macros)
        conf = plugin_config(workdir, all_macros, smtp_port, clear_port)
        trusted.add(conf)
        inst = EximInstance(workdir, conf, smtp_port, clear_port)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.stop_daemon()
        if os.environ.get("TORROUTE_EXIM_KEEP") != "1":
            shutil.rmtree(inst.workdir, ignore_errors=True)
    trusted.remove_all()


@pytest.fixture
def exim_factory(serve_dir: Path, exim_binary: Path) -> Iterator:
    """``exim_factory(routers_text)`` -> an EximInstance whose config is the given routers
    section in a minimal config (support.exim.routers_config), for ``-be``/``-bt``."""
    trusted = TrustedConfigs()

    def make(routers: str, name: str = "exim") -> EximInstance:
        workdir = serve_dir / name
        workdir.mkdir(exist_ok=True)
        prepare_workdir(workdir)
        conf = routers_config(workdir, routers)
        trusted.add(conf)
        return EximInstance(workdir, conf)

    yield make
    trusted.remove_all()
