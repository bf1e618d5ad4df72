"""`torroute map transport`: static Postfix transport(5) / Exim lsearch / cdbmake tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.onions import ONION_A, ONION_B, ONION_C, make_onion

from torroute import exitcodes
from torroute.cli import main
from torroute.mta.transport import (
    cdbmake_input,
    exim_lsearch,
    postfix_transport,
    render,
    sorted_pins,
)
from torroute.routing.maps import PinMap

V2 = "wy6zk3pmcwiyhiao.onion"
TYPO = ONION_A[:-13] + "aaaaaaa.onion"  # 56 characters, not a v3 address


def maps(tmp_path: Path) -> tuple[Path, Path]:
    yml = tmp_path / "map.yml"
    yml.write_text(f"""---
{ONION_B}:
  - zeta.example
  - alpha.example
{V2}:
  - riseup.example
{ONION_A}:
  - longer-domain.example
  - beta.example
{TYPO}:
  - broken.example
""")
    txt = tmp_path / "map.txt"
    txt.write_text(f"# extra pins\nport.example {ONION_C}:2525\n")
    return yml, txt


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["map", "transport", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def order(*onions: str) -> list[str]:
    return sorted(onions)


def test_postfix_transport_exact(tmp_path: Path, capsys) -> None:
    yml, txt = maps(tmp_path)
    rc, out, err = run(capsys, str(yml), str(txt))
    assert rc == exitcodes.OK
    by_onion = {
        ONION_A: ["beta.example", "longer-domain.example"],
        ONION_B: ["alpha.example", "zeta.example"],
        ONION_C: ["port.example"],
    }
    expected = ""
    for onion in order(ONION_A, ONION_B, ONION_C):
        for domain in by_onion[onion]:
            port = ":2525" if onion == ONION_C else ""
            expected += f"{domain:<21} smtptor:[{onion}]{port}\n"
    # the typo defers (Postfix's retry transport); without a line it would take the clear net
    expected += f"{'broken.example':<21} retry:4.3.5 invalid pin at {yml}:11\n"
    assert out == expected
    assert err.splitlines() == [
        f"torroute map transport: warning: {yml}:6: left out: riseup.example: v2 onion {V2} "
        "(v2 onion services are dead)",
        f"torroute map transport: warning: {yml}:11: deferred: invalid pin for broken.example "
        "(a retry:4.3.5 line: its mail waits until the map is fixed): "
        + err.split("until the map is fixed): ", 1)[1].splitlines()[0],
    ]
    assert TYPO in err


def test_torroute_transport_with_port(tmp_path: Path, capsys) -> None:
    yml, _ = maps(tmp_path)
    rc, out, _ = run(capsys, "--transport", "torroute", "--port", "25", str(yml))
    assert rc == exitcodes.OK
    *lines, deferral = out.splitlines()
    assert re.fullmatch(r"broken\.example +retry:4\.3\.5 invalid pin at \S+:11", deferral)
    for line in lines:
        assert re.fullmatch(r"\S+ +torroute:\[[a-z2-7]{56}\.onion\]:25", line), line
    assert [ln.split()[0] for ln in lines] == [
        d for o in order(ONION_A, ONION_B)
        for d in (["beta.example", "longer-domain.example"] if o == ONION_A
                  else ["alpha.example", "zeta.example"])]


def test_exim_lsearch_and_cdbmake_exact(tmp_path: Path, capsys) -> None:
    _, txt = maps(tmp_path)
    two = tmp_path / "two.txt"
    two.write_text(f"b.example {ONION_A}\na.example {ONION_A}\n")
    rc, out, err = run(capsys, "--format", "exim", str(txt), str(two))
    assert rc == exitcodes.OK and err == ""
    first, second = order(ONION_A, ONION_C)
    lines = {ONION_A: [f"a.example: {ONION_A}", f"b.example: {ONION_A}"],
             ONION_C: [f"port.example: {ONION_C}::2525"]}
    assert out == "".join(f"{ln}\n" for o in (first, second) for ln in lines[o])
    rc, out, _ = run(capsys, "--format", "cdbmake", str(two))
    assert rc == exitcodes.OK
    assert out == f"+9,62:a.example->{ONION_A}\n+9,62:b.example->{ONION_A}\n\n"


def test_empty_map_gives_an_empty_table(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "map.yml"
    empty.write_text("")
    assert run(capsys, str(empty)) == (exitcodes.OK, "", "")
    assert run(capsys, "--format", "cdbmake", str(empty)) == (exitcodes.OK, "\n", "")


def test_maps_from_the_configuration(tmp_path: Path, capsys) -> None:
    _, txt = maps(tmp_path)
    conf = tmp_path / "torroute.toml"
    conf.write_text('[routing]\nmaps = ["map.txt"]\n')
    rc, out, _ = run(capsys, "--config", str(conf))
    assert rc == exitcodes.OK and out == f"port.example smtptor:[{ONION_C}]:2525\n"


@pytest.mark.parametrize("argv,needle", [
    ([], "no map"),
    (["--transport", "a b", "M"], "not a master.cf service name"),
    (["--transport", "x:y", "M"], "not a master.cf service name"),
    (["--port", "0", "M"], "not a TCP port"),
    (["--port", "70000", "M"], "not a TCP port"),
    (["--format", "exim", "--transport", "torroute", "M"], "--format postfix only"),
])
def test_usage_errors(argv, needle, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("TORROUTE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "M").write_text("")
    conf = tmp_path / "empty.toml"
    conf.write_text("")
    rc, out, err = run(capsys, "--config", str(conf), *argv)
    assert rc == exitcodes.USAGE and out == "" and needle in err


def test_broken_map_is_an_error_with_file_and_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "map.yml"
    bad.write_text(f"---\n{ONION_A}:\n  - [nested\n")
    rc, out, err = run(capsys, str(bad))
    assert rc == exitcodes.DATAERR and out == ""
    assert f"{bad}:" in err and "YAML" in err
    rc, _, err = run(capsys, str(tmp_path / "missing.yml"))
    assert rc == exitcodes.DATAERR and "does not exist" in err


def test_a_domain_pinned_twice_warns_and_the_later_wins(tmp_path: Path, capsys) -> None:
    m = tmp_path / "map.txt"
    m.write_text(f"x.example {ONION_A}\nx.example {ONION_B}\n")
    rc, out, err = run(capsys, str(m))
    assert rc == exitcodes.OK and out == f"x.example smtptor:[{ONION_B}]\n"
    assert len(err.splitlines()) == 1 and "later entry wins" in err and f"{m}:2" in err


# -- properties of the pure renderers ------------------------------------------------------

ONIONS = [make_onion(seed) for seed in range(10, 16)]
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
DOMAIN = st.lists(LABEL, min_size=1, max_size=3).map(lambda labels: ".".join(labels + ["test"]))
ENTRY = st.tuples(DOMAIN, st.sampled_from(ONIONS), st.sampled_from([25, 25, 2525, 587]))


def pinmap_of(entries: list[tuple[str, str, int]]) -> PinMap:
    pm = PinMap()
    for number, (domain, onion, port) in enumerate(entries, 1):
        pm.add(domain, f"{onion}:{port}", f"gen:{number}", 25)
    return pm


@settings(max_examples=150, deadline=None)
@given(st.lists(ENTRY, max_size=25), st.booleans())
def test_postfix_lines_are_sorted_aligned_and_read_back(entries, show_port) -> None:
    pm = pinmap_of(entries)
    text = postfix_transport(sorted_pins(pm), "torroute", show_port)
    lines = text.splitlines()
    assert text == "".join(f"{ln}\n" for ln in lines)
    expected = {d: (o, p) for d, o, p in entries}  # the last entry wins
    got = {}
    columns = set()
    for line in lines:
        m = re.fullmatch(r"(\S+)( +)torroute:\[(\S+)\](?::(\d+))?", line)
        assert m, line
        columns.add(len(m.group(1)) + len(m.group(2)))
        port = int(m.group(4)) if m.group(4) else 25
        assert show_port == bool(m.group(4)) or port != 25
        got[m.group(1)] = (m.group(3), port)
    assert got == expected
    assert len(columns) <= 1  # one column for the transport
    keys = [(got[d][0], d) for d in (ln.split()[0] for ln in lines)]
    assert keys == sorted(keys)


@settings(max_examples=150, deadline=None)
@given(st.lists(ENTRY, max_size=25), st.booleans())
def test_exim_and_cdbmake_forms_carry_the_same_pairs(entries, show_port) -> None:
    pm = pinmap_of(entries)
    pins = sorted_pins(pm)
    lsearch = dict(ln.split(": ", 1) for ln in exim_lsearch(pins, show_port).splitlines())
    records = cdbmake_input(pins, show_port)
    assert records.endswith("\n\n") or records == "\n"
    cdb = {}
    rest = records
    while rest != "\n":
        m = re.match(r"\+(\d+),(\d+):", rest)
        assert m, rest[:80]
        klen, dlen = int(m.group(1)), int(m.group(2))
        body = rest[m.end():]
        key, arrow, data = body[:klen], body[klen:klen + 2], body[klen + 2:klen + 2 + dlen]
        assert arrow == "->" and body[klen + 2 + dlen] == "\n"
        cdb[key] = data
        rest = body[klen + 3 + dlen:]
    assert cdb == lsearch
    for domain, (onion, port) in {d: (o, p) for d, o, p in entries}.items():
        written = f"{onion}::{port}" if show_port or port != 25 else onion
        assert lsearch[domain] == written
    assert render(pm, "exim", show_port=show_port) == exim_lsearch(pins, show_port)


def test_exim_formats_refuse_invalid_pins(tmp_path: Path, capsys) -> None:
    """lsearch/cdb tables cannot say "defer": a mistyped pin would send its mail the usual way,
    so the table is not written at all (the old one stays in place)."""
    yml, _ = maps(tmp_path)
    for fmt in ("exim", "cdbmake"):
        rc, out, err = run(capsys, "--format", fmt, str(yml))
        assert rc == exitcodes.DATAERR and out == ""
        assert f"invalid pins at {yml}:11: fix the map first" in err
