"""Onion addresses for tests: real keys (valid points), made by the ed25519 helper or by tor."""

from __future__ import annotations

import random

from torroute.routing.ed25519 import public_key_from_seed_scalar
from torroute.routing.onion import onion_from_pubkey

# A published, real v3 address (torproject.org's own onion service), for a key made elsewhere.
TORPROJECT = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion"


def make_onion(seed: int) -> str:
    """A valid v3 address whose key is ``k * B`` for a scalar derived from ``seed``."""
    return onion_from_pubkey(public_key_from_seed_scalar(random.Random(seed).getrandbits(256)))


ONION_A = make_onion(1)
ONION_B = make_onion(2)
ONION_C = make_onion(3)
