"""The ed25519 public-key check tor applies to onion addresses (pure Python, no secrets).

Tor refuses an onion whose checksum is right but whose key is not a point of the prime-order
subgroup (SOCKS reply 0xF6, "invalid onion address"): ``ed25519_validate_pubkey`` decodes the
point and checks ``l * P`` is the identity.  A random 32-byte key passes only ~1 time in 16, so a
made-up address in a map must be refused here too, before it can become a route.

:func:`is_valid_pubkey` gives the same answer as ``l * P == O`` without the scalar multiplication
(1.2–1.8 ms a key in Python, now 0.3–0.45 ms): the group of points is cyclic of order ``8 * l``,
so the prime-order subgroup is ``8 * E``, and membership is decided by halving ``P`` twice on the
Montgomery u-line (see :func:`is_valid_pubkey` for the argument).  tests/unit/test_ed25519.py
checks it against the scalar multiplication and checks the facts it rests on.
"""

from __future__ import annotations

from functools import lru_cache

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # group order
D = -121665 * pow(121666, -1, P) % P
# Constants written out rather than computed at import (each pow costs ~0.1 ms of every
# ``torroute deliver`` start: the import went from 0.6 to 0.18 ms); tests/unit/test_ed25519.py
# recomputes them.  2^((P-1)/4):
SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
A = 486662  # Curve25519 (Montgomery form of edwards25519): v^2 = u^3 + A u^2 + u
# sqrt(SQRT_M1 * (A + 2) * (A - 2)), for the halving's second square root when the first fails
_SQRT_I_AA = 54954254911200584944555990941615833583158669589131464553875841587222940443526

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


def _legendre(a: int) -> int:
    """The Legendre symbol (a / P): 1, -1, or 0 if ``a`` is 0 mod P.

    Binary Jacobi algorithm (quadratic reciprocity) rather than Euler's ``a^((P-1)/2)``: about
    20 us against 120 us for the ``pow``."""
    a %= P
    n = P
    result = 1
    while a:
        twos = (a & -a).bit_length() - 1
        a >>= twos
        if twos & 1 and n & 7 in (3, 5):
            result = -result
        if a & n & 2:
            result = -result
        a, n = n % a, a
    return result if n == 1 else 0


def _pow_p38(a: int) -> int:
    """``a^((P+3)/8) mod P`` by the usual addition chain for ``2^252 - 2``: ~12% faster than
    ``pow``, whose binary method multiplies at each of the exponent's 250 one bits."""
    a2 = a * a % P
    a3 = a2 * a % P  # a^(2^2 - 1)
    a15 = pow(a3, 4, P) * a3 % P  # a^(2^4 - 1)
    a31 = a15 * a15 % P * a % P  # a^(2^5 - 1)
    a10 = pow(a31, 1 << 5, P) * a31 % P  # a^(2^10 - 1), and so on
    a20 = pow(a10, 1 << 10, P) * a10 % P
    a40 = pow(a20, 1 << 20, P) * a20 % P
    a50 = pow(a40, 1 << 10, P) * a10 % P
    a100 = pow(a50, 1 << 50, P) * a50 % P
    a200 = pow(a100, 1 << 100, P) * a100 % P
    a250 = pow(a200, 1 << 50, P) * a50 % P
    return pow(a250, 4, P) * a2 % P  # a^(2^252 - 2)


def _sqrt(a: int) -> int | None:
    """A square root of ``a`` mod P (P = 5 mod 8), or None if ``a`` is not a square."""
    root = _pow_p38(a % P)
    square = root * root % P
    if square == a % P:
        return root
    if square == -a % P:
        return root * SQRT_M1 % P
    return None


@lru_cache(maxsize=65536)
def is_valid_pubkey(key: bytes) -> bool:
    """True if tor accepts ``key`` as an onion service key (on the curve, in the prime subgroup,
    not the identity).

    Same answer as ``decode_point(key)`` then ``l * P == O`` (kept in the tests as the
    reference), in 0.3–0.45 ms instead of 1.2–1.8 ms (60 valid keys, best of 7, several runs on
    a shared 2-core machine): three square roots and two Legendre symbols instead of ~380 point
    additions (a square root is one ~250-bit exponentiation, ~0.1 ms; see :func:`_legendre`).
    Why it is exact, with ``u = (1 + y) / (1 - y)`` the Montgomery coordinate (curve
    ``v^2 = u (u^2 + A u + 1)``, a group isomorphism for x != 0):

    * E(F_p) has order ``8 l`` with a point of order 8, so it is Z/8 x Z/l and the subgroup of
      order ``l`` is ``8E``.  Its only rational 2-torsion point is ``T2 = (u, v) = (0, 0)``, which
      is in ``4E``; ``P + T2`` has u-coordinate ``1 / u``.
    * ``P`` is in ``2E`` iff ``u`` is a square: ``u(2Q) = ((u_Q^2 - 1) / 2 v_Q)^2``, and for a
      square ``u != 0`` the halving equation below has a rational root (A - 2 is not a square
      and A + 2 is, so exactly one of the two ``w`` gives a square ``w^2 - 4``), and a half with
      a rational u is a rational point since ``v_R != 0``.
    * Halving: the halves ``Q, Q + T2`` of ``R`` have u-coordinates ``x, 1 / x`` with
      ``w = x + 1/x = 2 u_R +- 2 sqrt(u_R^2 + A u_R + 1)`` and ``x = (w + sqrt(w^2 - 4)) / 2``.
      Either half may be used, since they differ by ``T2``, which is in ``4E``.
    * For a square ``u_R != 0``, ``x`` is a square iff ``w - 2`` is, whichever sign was taken
      for ``w``: ``x + 1/x + 2 = (x + 1)^2 / x``, ``(w - 2)(w + 2)`` is a square for the right
      ``w``, and the two ``w - 2`` multiply to ``-4 (A + 2) u_R``, a square.

    So ``P`` is in ``8E`` iff ``u_P`` is a square, a half ``P1`` of ``P`` has a square
    ``u_1``, and ``2 (u_1 - 1 + sqrt(u_1^2 + A u_1 + 1))`` is a square.  Here ``u`` is kept as
    a fraction over ``z = 1 - y``, and the off-curve keys (``(y^2 - 1) / (d y^2 + 1)`` not a
    square) are refused on the way: given a square ``y^2 - 1``, the point is on the curve iff
    ``u^2 + A u + 1 = (A + 2)(d y^2 + 1) / z^2`` is a square.
    """
    if len(key) != 32:
        return False
    y = int.from_bytes(key, "little") & ((1 << 255) - 1)
    if y >= P:
        return False
    yy = y * y % P
    if yy == 1:  # the identity and the point of order 2 (x = 0, whatever the sign bit)
        return False
    if _legendre(yy - 1) != 1:  # off the curve, or on it with a non-square u (not in 2E)
        return False
    r = _sqrt((A + 2) * (D * yy + 1))  # z * sqrt(u^2 + A u + 1)
    if r is None:  # off the curve
        return False
    # z^2 (w^2 - 4) / 4 = (2y + r)(2 + r) for w = 2 (1 + y + r) / z; for w' = 2 (1 + y - r) / z
    # it is (A + 2)(A - 2)(y^2 - 1)^2 / ((2y + r)(2 + r)): exactly one of the two is a square
    z = (1 - y) % P
    n = (2 * y + r) * (2 + r) % P
    root = _pow_p38(n)
    square = root * root % P
    if square == n:
        u1 = 1 + y + r + root  # over z: the u-coordinate of a half of P
    elif square == P - n:
        u1 = 1 + y + r + root * SQRT_M1
    else:  # square = +-i n, so sqrt(n') = (y^2 - 1) sqrt(+-i (A + 2)(A - 2)) / root: w' it is
        k = _SQRT_I_AA if square == SQRT_M1 * n % P else _SQRT_I_AA * SQRT_M1
        u1 = root * (1 + y - r) + (yy - 1) * k
        z = z * root % P
    u1 %= P
    r1 = _sqrt(u1 * u1 + A * u1 * z + z * z)  # z * sqrt(u1^2 + A u1 + 1): exists iff u1 square
    if r1 is None:  # the half is not in 2E: P is not in 4E
        return False
    # w1 - 2 = 2 (u1 + r1 - z) / z, and (2 / P) = -1 as P = 5 mod 8
    return _legendre((u1 + r1 - z) * z) == -1


# B = decode_point((4/5).to_bytes(32, "little")), written out (see above)
_BASE_X = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BASE_Y = 46316835694926478169428394003475163141307993866256225615783033603165251855960
BASE: Point = (_BASE_X, _BASE_Y, 1, _BASE_X * _BASE_Y % P)


def encode_point(point: Point) -> bytes:
    x, y, z, _ = point
    zinv = pow(z, P - 2, P)
    x, y = x * zinv % P, y * zinv % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def public_key_from_seed_scalar(scalar: int) -> bytes:
    """``scalar * B`` encoded: a valid public key (for tests and examples, not for signing)."""
    return encode_point(_mul(scalar % L, BASE))
