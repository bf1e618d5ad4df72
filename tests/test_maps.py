"""Map loading: onionmx map.yml, directories, the text format, and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onions import ONION_A, ONION_B, ONION_C

from torroute.errors import MapError
from torroute.maps import load_maps


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


def test_bad_entries_are_reported_with_file_and_line_and_skipped(tmp_path: Path) -> None:
    typo = ONION_A[:10] + ("a" if ONION_A[10] != "a" else "b") + ONION_A[11:]
    f = write(tmp_path / "map.yml", f"""{ONION_A}:
  - good.example
  - "bad domain!"
expyuzz4wqqyqhjn.onion:
  - v2.example
{typo}:
  - typo.example
not-an-onion.example:
  - clear.example
""")
    pins = load_maps([f])
    assert set(pins.pins) == {"good.example"}
    sources = sorted(p.source for p in pins.problems)
    assert sources == [f"{f}:3", f"{f}:5", f"{f}:7", f"{f}:9"]
    messages = " ".join(p.message for p in pins.problems)
    assert "v2" in messages and "checksum" in messages and "not an .onion" in messages


def test_yaml_syntax_error_skips_only_that_file(tmp_path: Path) -> None:
    d = tmp_path / "maps"
    d.mkdir()
    write(d / "a.yml", f"{ONION_A}:\n  - a.example\n")
    write(d / "b.yml", "key: [unclosed\n")
    write(d / "c.yml", f"{ONION_B}:\n  - c.example\n")
    write(d / ".hidden.yml", f"{ONION_C}:\n  - hidden.example\n")
    write(d / "old.yml~", f"{ONION_C}:\n  - backup.example\n")
    pins = load_maps([d])
    assert set(pins.pins) == {"a.example", "c.example"}
    assert len(pins.problems) == 1 and pins.problems[0].source.startswith(str(d / "b.yml"))


def test_text_format_with_ports_and_comments(tmp_path: Path) -> None:
    f = write(tmp_path / "pins.txt", f"""# domain onion[:port]
example.org {ONION_A}
example.net {ONION_B}:2525   # submission elsewhere
broken.example
bad.example {ONION_C}:99999
""")
    pins = load_maps([f])
    assert pins.get("example.org").port == 25
    assert (pins.get("example.net").onion, pins.get("example.net").port) == (ONION_B, 2525)
    assert [p.source for p in pins.problems] == [f"{f}:4", f"{f}:5"]


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
    f = write(tmp_path / "huge.txt", lines + "bad line here\n")
    pins = load_maps([f])
    assert len(pins) == n and len(pins.problems) == 1


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    f = write(tmp_path / "list.yml", f"- {ONION_A}\n- x.example\n")
    pins = load_maps([f])
    assert len(pins) == 0 and "mapping" in pins.problems[0].message


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=400))
def test_arbitrary_text_never_crashes_and_never_routes_garbage(tmp_path: Path, text: str) -> None:
    for name in ("x.yml", "x.txt"):
        f = write(tmp_path / name, text)
        pins = load_maps([f])
        for pin in pins.pins.values():
            assert pin.onion.endswith(".onion") and len(pin.onion) == 62
