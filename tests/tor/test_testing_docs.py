"""docs/testing.rst's example test, extracted from the .rst and run as written by pytest in a
fresh process (with only torroute's plugin: no tests/conftest.py), so the documentation of
torroute.testing cannot drift."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.docs import python_blocks
from support.paths import REPO

DOC = REPO / "docs" / "testing.rst"


def test_the_example_test_passes_with_the_plugin(tmp_path: Path) -> None:
    (code,) = python_blocks(DOC.read_text())
    assert "def test_" in code and "dnsmasq_factory" in code
    (tmp_path / "test_my_routes.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "TORROUTE_CONFIG"}
    env["PYTHONPATH"] = str(REPO)  # this checkout's torroute (the plugin is its entry point)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "test_my_routes.py"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout


def test_the_plugin_is_registered_once_from_this_checkout() -> None:
    """The entry point loads torroute.testing.pytest_plugin (this tree's: it is first on
    sys.path); tests/conftest.py does not register it a second time."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--trace-config", "--co", "-q",
                        "-p", "no:cacheprovider", str(REPO / "tests" / "unit" / "test_onion.py")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    registered = [ln for ln in r.stdout.splitlines()
                  if ln.startswith("PLUGIN registered: <module 'torroute.testing.pytest_plugin'")]
    assert len(registered) == 1, r.stdout[-3000:]
    assert str(REPO / "torroute" / "testing" / "pytest_plugin.py") in registered[0]
