"""Pure SRV answer handling: from a DNS response to a routing decision (no sockets).

RFC 2782 selection: the lowest priority wins; within it, a weighted random pick.  Only valid v3
onion targets count; anything else is ignored and logged, so a clear-net or v2 target can never
become a route.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidOnion
from .onion import parse_onion

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SrvTarget:
    priority: int
    weight: int
    port: int
    target: str  # without the trailing dot


def valid_onion_targets(domain: str, records: Sequence[SrvTarget]) -> list[SrvTarget]:
    """The records whose target is a valid v3 onion (reduced to the service), others logged."""
    good: list[SrvTarget] = []
    for rec in records:
        if rec.target in ("", "."):
            continue  # "service decidedly not available" (RFC 2782)
        try:
            onion = parse_onion(rec.target).host
        except InvalidOnion as exc:
            log.warning("SRV for %s: target ignored: %s", domain, exc)
            continue
        if rec.port == 0:
            log.warning("SRV for %s: target %s ignored: port 0", domain, onion)
            continue
        good.append(SrvTarget(rec.priority, rec.weight, rec.port, onion))
    return good


def order_targets(
    records: Sequence[SrvTarget], rng: random.Random | None = None
) -> list[SrvTarget]:
    """All records in RFC 2782 order: by priority, weighted-random within a priority."""
    rng = rng or random.Random()
    ordered: list[SrvTarget] = []
    for priority in sorted({r.priority for r in records}):
        group = [r for r in records if r.priority == priority]
        # any order, but zero-weight records first (RFC 2782); shuffled so equal records share load
        rng.shuffle(group)
        group.sort(key=lambda r: r.weight != 0)
        while group:
            total = sum(r.weight for r in group)
            if total == 0:
                pick = 0
            else:
                threshold = rng.randint(0, total)
                running = 0
                pick = len(group) - 1
                for index, rec in enumerate(group):
                    running += rec.weight
                    if running >= threshold:
                        pick = index
                        break
            ordered.append(group.pop(pick))
    return ordered
