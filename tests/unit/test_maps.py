"""Map loading: onionmx map.yml, directories, the text format, and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.onions import ONION_A, ONION_B, ONION_C

from torroute.errors import MapError
from torroute.routing.maps import MAX_LOGGED_PROBLEMS, InvalidPin, load_maps


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_onionmx_map_yml_as_published(tmp_path: Path) -> None:
    f = write(tmp_path / "map.yml", f"""---
{ONION_A}:
  - example.org
  - Example.NET.
{ONION_B}:
{ONION_C}:
  - third.example
""")
    pins = load_maps([f])
    assert pins.problems == []
    assert set(pins.pins) == {"example.org", "example.net", "third.example"}
    assert pins.get("example.net").onion == ONION_A
    assert pins.get("example.org").port == 25
    assert pins.get("third.example").source == f"{f}:7"


def test_mistyped_onions_are_invalid_pins_that_defer_with_file_and_line(tmp_path: Path) -> None:
    typo = ONION_A[:10] + ("a" if ONION_A[10] != "a" else "b") + ONION_A[11:]
    f = write(tmp_path / "map.yml", f"""{ONION_A}:
  - good.example
expyuzz4wqqyqhjn.onion:
  - v2.example
{typo}:
  - typo.example
not-an-onion.example:
  - clear.example
""")
    pins = load_maps([f])
    assert set(pins.pins) == {"good.example"}
    assert set(pins.invalid) == {"typo.example", "clear.example"}
    typo_pin = pins.lookup("typo.example")
    assert isinstance(typo_pin, InvalidPin) and typo_pin.source == f"{f}:6"
    assert "checksum" in typo_pin.message
    assert pins.lookup("clear.example").source == f"{f}:8"
    assert "not an .onion" in pins.lookup("clear.example").message
    # v2: a dead service, not a typo: ignored (the domain is unpinned), reported once
    assert pins.lookup("v2.example") is None
    assert [p.source for p in pins.v2] == [f"{f}:4"]
    assert sorted(p.source for p in pins.problems) == [f"{f}:6", f"{f}:8"]


def test_an_invalid_domain_name_is_a_map_error_with_file_and_line(tmp_path: Path) -> None:
    f = write(tmp_path / "map.yml", f"{ONION_A}:\n  - good.example\n  - \"bad domain!\"\n")
    with pytest.raises(MapError, match=rf"^{f}:3: invalid domain"):
        load_maps([f])


def test_v2_pins_warn_once_per_load_and_can_be_deferred(tmp_path: Path, caplog) -> None:
    v2s = "".join(f"{c * 16}.onion:\n  - v2-{c}.example\n" for c in "abcdefg")
    f = write(tmp_path / "map.yml", v2s + f"{ONION_A}:\n  - v3.example\n")
    with caplog.at_level(logging.WARNING, logger="torroute.routing.maps"):
        pins = load_maps([f])
    v2_lines = [r for r in caplog.records if "v2 onion pins ignored" in r.getMessage()]
    assert len(v2_lines) == 1 and "7 v2 onion pins" in v2_lines[0].getMessage()
    assert "\n" not in v2_lines[0].getMessage() and "and 2 more" in v2_lines[0].getMessage()
    assert pins.lookup("v2-a.example") is None and pins.get("v3.example").onion == ONION_A
    deferred = load_maps([f], v2_pins="defer")
    bad = deferred.lookup("v2-a.example")
    assert isinstance(bad, InvalidPin) and "v2" in bad.message and bad.source == f"{f}:2"
    with pytest.raises(MapError, match="v2_pins"):
        load_maps([f], v2_pins="ignore")


def test_an_ignored_v2_entry_never_replaces_a_v3_pin(tmp_path: Path) -> None:
    f = write(tmp_path / "map.yml",
              f"{ONION_A}:\n  - both.example\nexpyuzz4wqqyqhjn.onion:\n  - both.example\n")
    assert load_maps([f]).get("both.example").onion == ONION_A


def test_later_entries_win_between_valid_and_invalid_pins(tmp_path: Path) -> None:
    typo = ONION_B[:-7] + ("a" if ONION_B[-7] != "a" else "b") + ONION_B[-6:]
    good_then_bad = write(tmp_path / "a.txt", f"d.example {ONION_A}\nd.example {typo}\n")
    pins = load_maps([good_then_bad])
    assert pins.get("d.example") is None
    assert pins.lookup("d.example").source == f"{good_then_bad}:2"
    bad_then_good = write(tmp_path / "b.txt", f"d.example {typo}\nd.example {ONION_A}\n")
    pins = load_maps([bad_then_good])
    assert pins.lookup("d.example").onion == ONION_A and not pins.invalid


def test_each_problem_is_one_line_and_many_get_one_summary(tmp_path: Path, caplog) -> None:
    typo = ONION_A[:-7] + ("a" if ONION_A[-7] != "a" else "b") + ONION_A[-6:]
    f = write(tmp_path / "many.txt", "".join(f"d{i}.example {typo}\n" for i in range(50)))
    with caplog.at_level(logging.INFO, logger="torroute.routing.maps"):
        pins = load_maps([f])
    assert len(pins.invalid) == 50
    messages = [r.getMessage() for r in caplog.records]
    assert all("\n" not in m for m in messages)
    per_entry = [m for m in messages if "invalid pin for" in m]
    assert len(per_entry) == MAX_LOGGED_PROBLEMS
    summary = [m for m in messages if m.startswith("maps: ")]
    assert summary == ["maps: 0 pinned domains from 1 map files, 50 invalid pins deferred, "
                       f"{50 - MAX_LOGGED_PROBLEMS} more map problems not logged one by one"]


def test_text_format_with_ports_and_comments(tmp_path: Path) -> None:
    f = write(tmp_path / "pins.txt", f"""# domain onion[:port]
example.org {ONION_A}
example.net {ONION_B}:2525   # submission elsewhere
bad.example {ONION_C}:99999
""")
    pins = load_maps([f])
    assert pins.get("example.org").port == 25
    assert (pins.get("example.net").onion, pins.get("example.net").port) == (ONION_B, 2525)
    assert [p.source for p in pins.problems] == [f"{f}:4"]
    assert "invalid port" in pins.lookup("bad.example").message


def test_a_text_line_that_is_not_domain_onion_is_a_map_error(tmp_path: Path) -> None:
    f = write(tmp_path / "pins.txt", f"example.org {ONION_A}\nbroken.example\n")
    with pytest.raises(MapError, match=rf"^{f}:2: expected 'domain onion\[:port\]'"):
        load_maps([f])


def test_duplicate_domain_last_wins_with_warning(tmp_path: Path, caplog) -> None:
    a = write(tmp_path / "a.txt", f"dup.example {ONION_A}\n")
    b = write(tmp_path / "b.yml", f"{ONION_B}:\n  - dup.example\n")
    with caplog.at_level(logging.WARNING):
        pins = load_maps([a, b])
    assert pins.get("dup.example").onion == ONION_B
    assert "later entry wins" in caplog.text and str(a) in caplog.text


def test_unicode_domains_are_normalised_to_a_labels(tmp_path: Path) -> None:
    f = write(tmp_path / "map.yml", f"{ONION_A}:\n  - bücher.example\n  - 例え.テスト\n")
    pins = load_maps([f])
    assert pins.problems == []
    assert set(pins.pins) == {"xn--bcher-kva.example", "xn--r8jz45g.xn--zckzah"}


def test_missing_map_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MapError, match="does not exist"):
        load_maps([tmp_path / "nope.yml"])


def test_non_utf8_map_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"caf\xe9.example " + ONION_A.encode() + b"\n")
    with pytest.raises(MapError, match="UTF-8"):
        load_maps([f])


def test_huge_map_loads(tmp_path: Path) -> None:
    n = 50_000
    lines = "".join(f"d{i}.example {ONION_A}\n" for i in range(n))
    f = write(tmp_path / "huge.txt", lines + f"bad.example {ONION_A[:-8]}.onion\n")
    pins = load_maps([f])
    assert len(pins) == n and len(pins.problems) == 1 and len(pins.invalid) == 1


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    f = write(tmp_path / "list.yml", f"- {ONION_A}\n- x.example\n")
    with pytest.raises(MapError, match=rf"^{f}:1: expected a mapping"):
        load_maps([f])
    g = write(tmp_path / "nested.yml", f"{ONION_A}:\n  deep: x.example\n")
    with pytest.raises(MapError, match=rf"^{g}:1: .*expected a list of domains"):
        load_maps([g])


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=400))
def test_arbitrary_text_never_crashes_and_never_routes_garbage(tmp_path: Path, text: str) -> None:
    for name in ("x.yml", "x.txt"):
        f = write(tmp_path / name, text)
        try:
            pins = load_maps([f])
        except MapError as exc:  # a file that does not parse: refused whole, with file:line
            assert str(exc).startswith(str(f)) and "\n" not in str(exc)
            continue
        for pin in pins.pins.values():
            assert pin.onion.endswith(".onion") and len(pin.onion) == 62
