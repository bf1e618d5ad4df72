"""The "From Python" snippet of docs/testnet.rst, extracted from the .rst and run as written
(its own private network, in a fresh process), so the documentation cannot drift."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.docs import python_blocks

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "testnet.rst"


def test_python_blocks_extracts_the_indented_body() -> None:
    text = "x\n\n.. code-block:: python\n\n   a = 1\n\n   if a:\n       b = 2\n\nafter\n"
    assert python_blocks(text) == ["a = 1\n\nif a:\n    b = 2\n"]


@pytest.mark.testnet
def test_from_python_snippet_runs_as_written(tmp_path: Path) -> None:
    (code,) = python_blocks(DOC.read_text())
    assert "net.add_onion(" in code and "PrivateNetwork(" in code
    tmp_path.chmod(0o755)
    # this tree's torroute (not whatever /opt/torroute has installed); temp files in tmp_path
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    onions = re.findall(r"onion reachable through SOCKS \(([a-z2-7]{56}\.onion)\)(.*)", out)
    assert len(onions) == 2, out[-4000:]
    assert onions[0][1] == ""  # the first onion's sink listens
    assert "nothing listens on 127.0.0.1:2526 yet" in onions[1][1]
    assert re.search(r"^220 \S+ ", proc.stdout, re.M), out[-4000:]
    (root,) = tmp_path.glob("testnet-*")
    assert not (root / "net").exists()  # net.down() removed the network directory
