"""The ed25519 public-key check tor applies to onion addresses (pure Python, no secrets).

Tor refuses an onion whose checksum is right but whose key is not a point of the prime-order
subgroup (SOCKS reply 0xF6, "invalid onion address"): ``ed25519_validate_pubkey`` decodes the
point and checks ``l * P`` is the identity.  A random 32-byte key passes only ~1 time in 16, so a
made-up address in a map must be refused here too, before it can become a route.
"""

from __future__ import annotations

from functools import lru_cache

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # group order
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)

Point = tuple[int, int, int, int]  # extended coordinates X, Y, Z, T
IDENTITY: Point = (0, 1, 1, 0)


def _add(a: Point, b: Point) -> Point:
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % P
    bb = (y1 + x1) * (y2 + x2) % P
    cc = 2 * D * t1 * t2 % P
    dd = 2 * z1 * z2 % P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return e * f % P, g * h % P, f * g % P, e * h % P


def _mul(scalar: int, point: Point) -> Point:
    result = IDENTITY
    while scalar:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _is_identity(point: Point) -> bool:
    x, y, z, _ = point
    return x % P == 0 and (y - z) % P == 0


def decode_point(key: bytes) -> Point | None:
    """The curve point of an encoded key, or None if it is not on the curve."""
    if len(key) != 32:
        return None
    y = int.from_bytes(key, "little") & ((1 << 255) - 1)
    sign = key[31] >> 7
    if y >= P:
        return None
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if (v * x * x - u) % P != 0:
        x = x * SQRT_M1 % P
        if (v * x * x - u) % P != 0:
            return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = P - x
    return (x, y, 1, x * y % P)


@lru_cache(maxsize=65536)
def is_valid_pubkey(key: bytes) -> bool:
    """True if tor accepts ``key`` as an onion service key (on the curve, in the prime subgroup,
    not the identity)."""
    point = decode_point(key)
    if point is None or _is_identity(point):
        return False
    return _is_identity(_mul(L, point))


_BASE_Y = 4 * pow(5, P - 2, P) % P
BASE: Point = decode_point(_BASE_Y.to_bytes(32, "little"))  # type: ignore[assignment]


def encode_point(point: Point) -> bytes:
    x, y, z, _ = point
    zinv = pow(z, P - 2, P)
    x, y = x * zinv % P, y * zinv % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def public_key_from_seed_scalar(scalar: int) -> bytes:
    """``scalar * B`` encoded: a valid public key (for tests and examples, not for signing)."""
    return encode_point(_mul(scalar % L, BASE))
