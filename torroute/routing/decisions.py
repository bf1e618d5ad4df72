"""The four answers of the router, and the domain a destination is routed by.

Pure and dnspython-free: the pipe program (``torroute deliver``) imports this module on every
message and must not pay for dnspython.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Route:
    """Deliver to ``onion:port`` over Tor."""

    domain: str
    onion: str
    port: int
    source: str  # "map FILE:LINE", "srv", "onion"
    ttl: float | None = None
    alternatives: tuple[tuple[str, int], ...] = ()  # further SRV targets, in RFC 2782 order

    kind = "route"


@dataclass(frozen=True, slots=True)
class _Verdict:
    """A decision without a route: the domain and one line of why."""

    domain: str
    reason: str


class NoRoute(_Verdict):
    """No onion route: deliver the usual way (or, for a local domain, locally)."""

    __slots__ = ()
    kind = "noroute"


class TempFail(_Verdict):
    """The route cannot be known now: defer the mail."""

    __slots__ = ()
    kind = "tempfail"


class Reject(_Verdict):
    """The destination is an invalid ``.onion`` name: no route can ever exist (bounce)."""

    __slots__ = ()
    kind = "reject"


Decision = Route | NoRoute | TempFail | Reject


def destination_domain(domain_or_address: str) -> str:
    """The domain part of ``user@domain`` (or the domain itself), lowercase, no trailing dot."""
    text = domain_or_address.strip()
    if "@" in text:
        text = text.rsplit("@", 1)[1]
    if text.startswith("[") and text.endswith("]"):
        return text  # an address literal: never routed
    return text.rstrip(".").lower()
