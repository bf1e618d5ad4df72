"""Test setup: loads every tests/fixtures_*.py as a plugin (each area owns its fixtures)."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = sorted(
    f"fixtures_{p.stem[len('fixtures_'):]}" for p in Path(__file__).parent.glob("fixtures_*.py")
)
