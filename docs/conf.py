"""Sphinx configuration for torroute's documentation (built with -W in CI)."""

project = "torroute"
author = "the torroute developers"
copyright = "2026, the torroute developers"
extensions = ["sphinx.ext.autodoc"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_mock_imports: list[str] = []
nitpicky = False
