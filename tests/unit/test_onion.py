"""Onion address validation: checksum, version, key, v2 refusal, normalisation."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.onions import ONION_A, TORPROJECT, make_onion

from torroute.errors import InvalidOnion, PermanentError
from torroute.routing.ed25519 import is_valid_pubkey
from torroute.routing.onion import is_onion_name, onion_from_pubkey, parse_onion

B32 = "abcdefghijklmnopqrstuvwxyz234567"


def test_real_published_address_is_valid() -> None:
    assert parse_onion(TORPROJECT).host == TORPROJECT


def test_address_from_key_round_trips() -> None:
    parsed = parse_onion(ONION_A)
    assert onion_from_pubkey(parsed.pubkey) == ONION_A


@pytest.mark.parametrize("form", [
    lambda o: o.upper(), lambda o: o + ".", lambda o: "mx." + o, lambda o: "a.b." + o.upper() + ".",
    lambda o: f"  {o}\n",
])
def test_case_trailing_dot_and_subdomains_reduce_to_the_service(form) -> None:
    assert parse_onion(form(TORPROJECT)).host == TORPROJECT


def test_v2_is_refused_with_a_clear_message() -> None:
    with pytest.raises(InvalidOnion, match="v2 .*dead since 2021"):
        parse_onion("expyuzz4wqqyqhjn.onion")


@pytest.mark.parametrize("bad", [
    "example.org", "onion", ".onion", "x..onion", "abc.onion", TORPROJECT[:-7] + "0.onion",
    TORPROJECT.replace(".onion", ".onion.example"), "", "a" * 56 + ".onion",
])
def test_malformed_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidOnion):
        parse_onion(bad)


def test_invalid_onion_is_permanent() -> None:
    assert issubclass(InvalidOnion, PermanentError)
    assert not InvalidOnion("x").temporary


@settings(max_examples=300)
@given(position=st.integers(0, 55), replacement=st.sampled_from(B32))
def test_every_one_character_corruption_is_rejected(position: int, replacement: str) -> None:
    label = TORPROJECT[:56]
    if label[position] == replacement:
        replacement = B32[(B32.index(replacement) + 1) % 32]
    corrupted = label[:position] + replacement + label[position + 1:] + ".onion"
    with pytest.raises(InvalidOnion):
        parse_onion(corrupted)


def test_every_one_character_corruption_exhaustively() -> None:
    label = ONION_A[:56]
    accepted = []
    for position in range(56):
        for replacement in B32:
            if replacement == label[position]:
                continue
            candidate = label[:position] + replacement + label[position + 1:] + ".onion"
            try:
                parse_onion(candidate)
            except InvalidOnion:
                continue
            accepted.append(candidate)
    assert accepted == []


def test_right_checksum_but_invalid_key_is_refused() -> None:
    # a key that is not an ed25519 point in the prime subgroup; its checksum is right
    for _ in range(100):
        key = os.urandom(32)
        if not is_valid_pubkey(key):
            break
    address = onion_from_pubkey(key)
    with pytest.raises(InvalidOnion, match="not a valid ed25519"):
        parse_onion(address)


def test_generated_keys_are_valid() -> None:
    for seed in range(20):
        assert parse_onion(make_onion(seed))


@given(st.text(max_size=200))
def test_arbitrary_text_gives_only_invalid_onion_errors(text: str) -> None:
    try:
        host = parse_onion(text).host
    except InvalidOnion:
        return
    assert len(host) == 62 and host.endswith(".onion")
    label = base64.b32decode(host[:56].upper())
    assert label[34] == 3


def test_is_onion_name() -> None:
    assert is_onion_name("Foo.ONION.")
    assert not is_onion_name("onion.example")
