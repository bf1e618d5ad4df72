"""Sphinx configuration for torroute's documentation (built with -W in CI)."""

import sys
import tomllib
from pathlib import Path

# autodoc documents this tree's torroute, not whichever copy the venv has installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "torroute"
# the man pages' footer names the version (pyproject.toml's, the one the .deb is built from)
with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as _fh:
    version = release = tomllib.load(_fh)["project"]["version"]
author = "the torroute developers"
copyright = "2026, the torroute developers"
extensions = ["sphinx.ext.autodoc"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_mock_imports: list[str] = []
nitpicky = False

# -- man pages (``sphinx-build -W -b man docs OUT``; scripts/build-man) -----------------------
# The sources are docs/man/*.rst, each marked :orphan: (they repeat the program pages of the
# HTML manual in reference form, so the HTML toctree does not list them; they are still built
# as HTML pages, which keeps every man page checked by the HTML build's -W too).
man_pages = [
    ("man/torroute", "torroute", "deliver mail for ordinary domains over Tor onion services",
     [author], 1),
    ("man/torroute-serve", "torroute-serve",
     "the torroute lookup daemon for Postfix and Exim, and its LMTP relay", [author], 8),
    ("man/torroute-deliver", "torroute-deliver",
     "deliver one message from Postfix pipe(8) to an onion MX over tor", [author], 8),
    ("man/torroute.toml", "torroute.toml", "torroute configuration file", [author], 5),
]
man_make_section_directory = False  # OUT/torroute.1, not OUT/man1/torroute.1
man_show_urls = False
