"""Where things are: this checkout, the venv's program, directories MTA users can enter."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
PLUGINS = REPO / "plugins"
VENV_TORROUTE = Path("/opt/torroute/bin/torroute")  # world-readable: pipe runs it as nobody


def shared_tmpdir(prefix: str) -> Path:
    """A 0755 directory (unlike pytest's tmp_path) that MTAs' unprivileged users can enter."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path
