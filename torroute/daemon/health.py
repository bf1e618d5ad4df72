"""The daemon's per-onion health from real traffic, canary dials, self-healing (NEWNYM)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .service import LookupDaemon


def make_service(daemon: LookupDaemon) -> Any | None:
    """The running service for ``daemon`` (``async start()``/``async stop()``), or None when
    the configuration asks for none."""
    return None
