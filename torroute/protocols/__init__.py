"""Pure wire codecs (sans-IO): bytes in, events and bytes to send out; the drivers do the I/O.

The lookup daemon's codecs (:mod:`.socketmap`, :mod:`.tcptable`, :mod:`.eximline`, their shared
parts in :mod:`.lookup`), the LMTP server (:mod:`.lmtp`), the SMTP client (:mod:`.smtp`), the
SOCKS5 client for tor (:mod:`.socks5`) and tor's control protocol (:mod:`.control`).  The
shared names are loaded on first use (PEP 562): ``torroute deliver`` imports only :mod:`.socks5`
and :mod:`.smtp`, and building :mod:`.lookup`'s two dataclasses and regexes costs
~0.8 ms (``-X importtime``) in a program started once per message.
"""

from __future__ import annotations

from ..errors import ProtocolError

__all__ = [
    "ProtocolError",
    "Lookup",
    "Malformed",
    "Event",
    "sanitize_reason",
    "check_value",
    "postfix_value",
    "POSTFIX_ANSWER_PRESETS",
    "POSTFIX_REJECT",
    "DEFAULT_MAX_REQUEST",
]




def __getattr__(name: str) -> object:
    """The shared lookup-codec names (``from torroute.protocols import Lookup``), on first use."""
    if not name.startswith("__") and name not in _SUBMODULES:
        import importlib

        value = getattr(importlib.import_module(".lookup", __name__), name, _MISSING)
        if value is not _MISSING:
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# asked for by ``from torroute.protocols import lmtp`` before the submodule is imported
_SUBMODULES = frozenset({"lookup", "socketmap", "tcptable", "eximline", "lmtp", "socks5", "smtp",
                         "control", "heloproxy"})
_MISSING = object()
