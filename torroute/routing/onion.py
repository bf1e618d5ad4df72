"""v3 onion addresses (rend-spec-v3 §6): parse, validate, build.

An address is base32(PUBKEY[32] | CHECKSUM[2] | VERSION[1]) + ".onion", with
CHECKSUM = SHA3-256(".onion checksum" | PUBKEY | VERSION)[:2] and VERSION = 3.  Validation is
strict because a mistyped onion must never become a route; like tor, it also checks that the key
is a valid ed25519 point (see :mod:`torroute.routing.ed25519`).
"""

from __future__ import annotations

from ..errors import InvalidOnion

try:  # CPython's own SHA-3: hashlib would load OpenSSL first (~3 ms of the pipe's cold start)
    from _sha3 import sha3_256
except ImportError:  # pragma: no cover - other Pythons
    from hashlib import sha3_256

V3_LABEL_LEN = 56
V2_LABEL_LEN = 16
_VERSION = b"\x03"
_CHECKSUM_PREFIX = b".onion checksum"
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


_B32_VALUE = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz234567")}


def _checksum(pubkey: bytes, version: bytes = _VERSION) -> bytes:
    return sha3_256(_CHECKSUM_PREFIX + pubkey + version).digest()[:2]


def _b32decode(label: str) -> bytes:
    """The 35 bytes of a 56-character lowercase base32 label (already checked against the
    alphabet); base64.b32decode would cost the delivery program another import."""
    value = 0
    for char in label:
        value = value << 5 | _B32_VALUE[char]
    return value.to_bytes(len(label) * 5 // 8, "big")


def onion_from_pubkey(pubkey: bytes) -> str:
    """The ``<56 chars>.onion`` address of an ed25519 public key."""
    if len(pubkey) != 32:
        raise ValueError("an ed25519 public key is 32 bytes")
    import base64

    raw = pubkey + _checksum(pubkey) + _VERSION
    return base64.b32encode(raw).decode("ascii").lower() + ".onion"


class OnionAddress:
    """A validated v3 onion service address; ``host`` is ``<56 chars>.onion``, lowercase.

    A plain class, not a dataclass: importing dataclasses (and inspect with it) costs the
    delivery program ~11 ms of its ~60 ms start, and it validates its nexthop with this."""

    __slots__ = ("host",)

    def __init__(self, host: str) -> None:
        object.__setattr__(self, "host", host)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("OnionAddress is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OnionAddress) and other.host == self.host

    def __hash__(self) -> int:
        return hash(self.host)

    def __repr__(self) -> str:
        return f"OnionAddress(host={self.host!r})"

    @property
    def pubkey(self) -> bytes:
        return _b32decode(self.host[:V3_LABEL_LEN])[:32]

    def __str__(self) -> str:
        return self.host


def is_onion_name(name: str) -> bool:
    """True for any name under the ``.onion`` TLD (valid or not): such names never go to DNS."""
    return name.rstrip(".").lower().endswith(".onion")


def _is_v2_label(service: str) -> bool:
    return len(service) == V2_LABEL_LEN and set(service) <= _B32_ALPHABET


def is_v2_onion(name: str) -> bool:
    """A v2 onion address (16 base32 characters): a dead service, not a typo."""
    host = name.strip().rstrip(".").lower()
    return host.endswith(".onion") and _is_v2_label(host.split(".")[-2] if "." in host else "")


def parse_onion(name: str) -> OnionAddress:
    """Validate ``name`` as a v3 onion; subdomains reduce to the service.

    Raises InvalidOnion with a message a postmaster can act on.
    """
    if not isinstance(name, str):
        raise InvalidOnion(f"not a string: {name!r}")
    shown = name if len(name) <= 100 else name[:100] + "..."
    host = name.strip()
    if host.endswith("."):
        host = host[:-1]
    host = host.lower()
    if not host.endswith(".onion"):
        raise InvalidOnion(f"{shown!r} is not an .onion address")
    labels = host.split(".")
    service = labels[-2] if len(labels) >= 2 else ""
    if any(label == "" for label in labels):
        raise InvalidOnion(f"{shown!r} has an empty label")
    if _is_v2_label(service):
        raise InvalidOnion(
            f"{shown!r} is a v2 onion address: v2 onion services are dead since 2021 "
            "(tor 0.4.6 removed them); ask the domain for its v3 address"
        )
    if len(service) != V3_LABEL_LEN:
        raise InvalidOnion(
            f"{shown!r}: a v3 onion label has {V3_LABEL_LEN} characters, not {len(service)}"
        )
    if not set(service) <= _B32_ALPHABET:
        raise InvalidOnion(f"{shown!r}: onion label is not base32 (a-z, 2-7)")
    raw = _b32decode(service)
    pubkey, checksum, version = raw[:32], raw[32:34], raw[34:35]
    if version != _VERSION:
        raise InvalidOnion(f"{shown!r}: onion version {version[0]} is not 3")
    if checksum != _checksum(pubkey, version):
        raise InvalidOnion(f"{shown!r}: onion checksum mismatch (a typo in the address?)")
    from .ed25519 import is_valid_pubkey

    if not is_valid_pubkey(pubkey):
        raise InvalidOnion(
            f"{shown!r}: the checksum is right but the key is not a valid ed25519 service key; "
            "tor refuses such an address (SOCKS reply 0xF6): was it made up?"
        )
    return OnionAddress(service + ".onion")
