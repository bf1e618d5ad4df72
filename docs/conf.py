"""Sphinx configuration for torroute's documentation (built with -W in CI)."""

import sys
from pathlib import Path

# autodoc documents this tree's torroute, not whichever copy the venv has installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "torroute"
author = "the torroute developers"
copyright = "2026, the torroute developers"
extensions = ["sphinx.ext.autodoc"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_mock_imports: list[str] = []
nitpicky = False
