"""The fast prime-subgroup check against the scalar multiplication it replaced, and the facts
about edwards25519 / Curve25519 that make it exact."""

from __future__ import annotations

import math
import os
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torroute.routing.ed25519 import (
    _BASE_X,
    _BASE_Y,
    _SQRT_I_AA,
    BASE,
    IDENTITY,
    SQRT_M1,
    A,
    D,
    L,
    P,
    Point,
    _add,
    _is_identity,
    _legendre,
    _mul,
    _pow_p38,
    _sqrt,
    decode_point,
    encode_point,
    is_valid_pubkey,
    public_key_from_seed_scalar,
)

fast = is_valid_pubkey.__wrapped__  # without the lru_cache, so every call computes


def _is_valid_pubkey_reference(key: bytes) -> bool:
    """The check as it was (and as tor does it): decode, refuse the identity, ``l * P == O``.
    ~1.7 ms a key."""
    point = decode_point(key)
    if point is None or _is_identity(point):
        return False
    return _is_identity(_mul(L, point))


def _order(point: Point) -> int:
    """The order of a point whose order divides 8 * L and is a power of 2 or L times one."""
    for order in (1, 2, 4, 8, L, 2 * L, 4 * L, 8 * L):
        if _is_identity(_mul(order, point)):
            return order
    raise AssertionError("order does not divide 8 * L")


def _u(point: Point) -> int:
    """The Montgomery u = (1 + y) / (1 - y) of a point other than the identity."""
    x, y, z, _ = point
    return (z + y) * pow(z - y, -1, P) % P


@cache
def _torsion() -> list[Point]:
    """The 8 points of order dividing 8, as i * T8 for a point T8 of order 8."""
    y = 2
    while True:
        point = decode_point(y.to_bytes(32, "little"))
        y += 1
        if point is None:
            continue
        t8 = _mul(L, point)
        if _order(t8) == 8:
            return [_mul(i, t8) for i in range(8)]


def _same(key: bytes) -> bool:
    answer = fast(key)
    assert answer == _is_valid_pubkey_reference(key), key.hex()
    return answer


# -- the facts the method rests on ------------------------------------------------------------


def test_group_order_is_8l_and_the_2_part_is_cyclic() -> None:
    # B has order L (prime); a point of order 8 exists; by Hasse the only multiple of 8 * L in
    # [p + 1 - 2 sqrt(p), p + 1 + 2 sqrt(p)] is 8 * L itself: E(F_p) = Z/8 x Z/L, and 8E is the
    # subgroup of order L.
    assert _order(BASE) == L
    assert [_order(t) for t in _torsion()] == [1, 8, 4, 8, 2, 8, 4, 8]
    bound = 2 * math.isqrt(P) + 2
    assert P + 1 - bound <= 8 * L <= P + 1 + bound < 16 * L
    # the only rational 2-torsion point: u^2 + A u + 1 has no root (A^2 - 4 not a square)
    assert _legendre(A * A - 4) == -1
    assert decode_point((P - 1).to_bytes(32, "little")) == (0, P - 1, 1, 0)
    assert _u(_torsion()[4]) == 0


def test_points_of_order_8_have_non_square_u() -> None:
    # so the map P -> (u(P) / p) is onto {1, -1} and its kernel is exactly 2E
    order8 = [t for t in _torsion() if _order(t) == 8]
    assert len(order8) == 4
    assert all(_legendre(_u(t)) == -1 for t in order8)
    # and the order-4 points (u = +-1) have square u, as points of 2E must
    assert sorted(_u(t) for t in _torsion() if _order(t) == 4) == [1, 1]


def test_constants_the_halving_uses() -> None:
    assert _legendre(A + 2) == 1  # so sqrt(-(A + 2)) exists and the two w - 2 agree
    assert _legendre(A - 2) == -1  # so exactly one w gives a square w^2 - 4
    assert _legendre(2) == -1 and P % 8 == 5
    assert _legendre(-1) == 1 and SQRT_M1 * SQRT_M1 % P == P - 1
    assert (A + 2) * D % P == (2 - A) % P  # u^2 + A u + 1 = (A + 2)(d y^2 + 1) / (1 - y)^2
    assert _legendre(-pow(D, -1, P)) == -1  # d y^2 + 1 is never 0


def test_written_out_constants() -> None:
    assert SQRT_M1 == pow(2, (P - 1) // 4, P)
    assert D == -121665 * pow(121666, P - 2, P) % P
    assert _BASE_Y == 4 * pow(5, P - 2, P) % P
    assert BASE == decode_point(_BASE_Y.to_bytes(32, "little")) and _BASE_X % 2 == 0
    assert _SQRT_I_AA * _SQRT_I_AA % P == SQRT_M1 * (A + 2) * (A - 2) % P


def test_every_branch_of_the_first_halving() -> None:
    # the square root of n = (2y + r)(2 + r) lands in one of four cases: n, -n (n a square),
    # i n, -i n (not: the other sign of r is taken); each must agree with the reference
    seen: dict[str, int] = {}
    for k in range(1, 200):
        key = public_key_from_seed_scalar(k)
        y = int.from_bytes(key, "little") & ((1 << 255) - 1)
        r = _sqrt((A + 2) * (D * y * y + 1))
        assert r is not None
        n = (2 * y + r) * (2 + r) % P
        square = _pow_p38(n) ** 2 % P
        case = {n: "n", P - n: "-n", SQRT_M1 * n % P: "i n", P - SQRT_M1 * n % P: "-i n"}[square]
        if seen.setdefault(case, k) == k:
            point = decode_point(key)
            assert point is not None
            for i, t in enumerate(_torsion()):
                assert _same(encode_point(_add(point, t))) == (i == 0)
        if len(seen) == 4:
            break
    assert len(seen) == 4, seen


@settings(max_examples=40, deadline=None)
@given(st.integers(1, L - 1), st.integers(1, L - 1))
def test_montgomery_u_doubles_and_adds_t2_as_the_method_assumes(k: int, m: int) -> None:
    point = _mul(k, BASE)
    for t in _torsion():
        q = _add(point, t)
        u = _u(q)
        # u(2Q) = (u^2 - 1)^2 / (4 u (u^2 + A u + 1)), u(Q + T2) = 1 / u
        assert _u(_add(q, q)) * 4 * u * (u * u + A * u + 1) % P == (u * u - 1) ** 2 % P
        assert _u(_add(q, _torsion()[4])) * u % P == 1
        # and u is a homomorphism to F_p* / squares (points of 2E have square u)
        other = _add(_mul(m, BASE), t)
        total = _add(q, other)
        if not _is_identity(total) and _u(total) != 0:  # T2 (u = 0): class 1 by convention
            assert _legendre(_u(total)) == _legendre(u) * _legendre(_u(other))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, P - 1))
def test_legendre_and_square_root(a: int) -> None:
    euler = pow(a, (P - 1) // 2, P)
    assert _legendre(a) == {0: 0, 1: 1, P - 1: -1}[euler]
    assert _pow_p38(a) == pow(a, (P + 3) // 8, P)
    root = _sqrt(a)
    if euler == P - 1:
        assert root is None
    else:
        assert root is not None and root * root % P == a


# -- differential tests against the scalar multiplication -------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, L - 1))
def test_multiples_of_the_base_are_valid(k: int) -> None:
    key = encode_point(_mul(k, BASE))
    assert _same(key)
    assert _same(bytes(key[:31]) + bytes([key[31] ^ 0x80]))  # -P, also in the subgroup
    assert key == public_key_from_seed_scalar(k)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, L - 1))
def test_base_multiples_plus_each_small_order_point(k: int) -> None:
    point = _mul(k, BASE)
    for i, t in enumerate(_torsion()):
        key = encode_point(_add(point, t))
        # only T = identity keeps the point in the subgroup (and k = 0 gives the identity)
        assert _same(key) == (i == 0 and k != 0)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_arbitrary_32_bytes(key: bytes) -> None:
    _same(key)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, P - 1), st.booleans())
def test_arbitrary_y_on_or_off_the_curve(y: int, sign: bool) -> None:
    _same((y | sign << 255).to_bytes(32, "little"))


def _y(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


SPECIAL = {
    "identity": _y(1),
    "identity, sign bit": _y(1, 1),
    "(0, -1)": _y(P - 1),
    "(0, -1), sign bit": _y(P - 1, 1),
    "y = 0 (order 4)": _y(0),
    "y = 0, sign bit": _y(0, 1),
    "y = p - 2": _y(P - 2),
    "all ones": b"\xff" * 32,
    "all ones but the sign bit": b"\xff" * 31 + b"\x7f",
    "zero bytes": bytes(32),
}
SPECIAL.update({f"y = p + {i}, sign {s}": _y(P + i, s) for i in range(19) for s in (0, 1)})
SPECIAL.update({f"y = {i}, sign {s}": _y(i, s) for i in range(2, 12) for s in (0, 1)})
SPECIAL.update({f"y = p - {i}, sign {s}": _y(P - i, s) for i in range(2, 12) for s in (0, 1)})


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_special_encodings(name: str) -> None:
    _same(SPECIAL[name])


def test_special_encodings_answers() -> None:
    for name in ("identity", "identity, sign bit", "(0, -1)", "(0, -1), sign bit",
                 "y = 0 (order 4)", "zero bytes", "all ones"):
        assert not fast(SPECIAL[name]), name
    assert not any(fast(_y(P + i, s)) for i in range(19) for s in (0, 1))


def test_small_order_encodings_with_both_sign_bits() -> None:
    for t in _torsion():
        key = encode_point(t)
        for flipped in (key, key[:31] + bytes([key[31] ^ 0x80])):
            assert not _same(flipped)


def test_non_canonical_encodings_of_valid_points_are_refused() -> None:
    # y < 19 has a second encoding y + p >= p: decode_point refuses it, so must the check
    for y in range(19):
        for sign in (0, 1):
            assert not fast(_y(y + P, sign))
            _same(_y(y, sign))


def test_wrong_lengths() -> None:
    key = public_key_from_seed_scalar(12345)
    for bad in (b"", key[:31], key + b"\0", bytes(33)):
        assert fast(bad) is False and _is_valid_pubkey_reference(bad) is False


def test_public_api_is_kept() -> None:
    assert is_valid_pubkey.cache_info().maxsize == 65536
    key = public_key_from_seed_scalar(7)
    assert is_valid_pubkey(key) and is_valid_pubkey(key)
    assert decode_point(encode_point(BASE)) == BASE
    assert encode_point(IDENTITY) == _y(1)
    assert fast(os.urandom(32)) in (True, False)
