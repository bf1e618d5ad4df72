"""torroute map check without DNS or tor: every entry of an onionmx-format map judged with its
FILE:LINE, the SRV comparison as a pure function, the exit statuses a CI job sees."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from support.onions import ONION_A, ONION_B, ONION_C, make_onion

from torroute import exitcodes
from torroute.cli import main
from torroute.config import Config
from torroute.routing.mapcheck import (
    INVALID,
    OK,
    TEMPORARY,
    WARN,
    SrvAnswer,
    check_maps,
    compare_srv,
)
from torroute.routing.srv import SrvTarget

V2 = "expyuzz4wqqyqhjn.onion"
TYPO = ONION_A[:10] + ("a" if ONION_A[10] != "a" else "b") + ONION_A[11:]


def onionmx_map(tmp_path: Path) -> Path:
    """onionmx's sources/map.yml layout (onion -> list of domains, quoted or not), with the
    stale and broken entries its users report."""
    path = tmp_path / "sources" / "map.yml"
    path.parent.mkdir()
    path.write_text(f"""---
{ONION_A}:
  - systemli.example
  - 'jabber.example'
'{V2}':
  - 'riseup.example'
{TYPO}:
  - typo.example
'{ONION_B}':
  - twice.example
  - same.example
{ONION_C}:
  - twice.example
  - same.example
  -
{ONION_B}:
  - same.example
""")
    return path


def test_every_entry_with_its_verdict_and_line(tmp_path: Path) -> None:
    path = onionmx_map(tmp_path)
    report = check_maps([path], Config(), dns=False)
    got = {(e.domain, e.source.rsplit(":", 1)[1]): e.status for e in report.entries}
    assert got == {
        ("systemli.example", "3"): OK, ("jabber.example", "4"): OK,
        ("riseup.example", "6"): INVALID,  # v2
        ("typo.example", "8"): INVALID,  # checksum
        ("twice.example", "13"): INVALID,  # ONION_B at line 10, then ONION_C at 13
        ("same.example", "17"): INVALID,  # B, C, B again: the C entry differs
    }
    notes = {e.domain: " ".join(e.notes) for e in report.entries}
    assert notes["riseup.example"].startswith(f"v2 onion {V2} (v2 onion services are dead")
    assert f"{path}:10 is overridden by {path}:13" in notes["twice.example"]
    assert any("empty list item" in p for p in report.problems)
    assert report.exit_status() == exitcodes.DATAERR
    assert [e.source for e in report.entries] == sorted(
        (e.source for e in report.entries), key=lambda s: int(s.rsplit(":", 1)[1]))


def test_clean_map_exits_0_and_same_target_twice_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "map.yml"
    path.write_text(f"{ONION_A}:\n  - a.example\n  - b.example\n{ONION_A}:\n  - a.example\n")
    report = check_maps([path], Config(), dns=False)
    assert {e.domain: e.status for e in report.entries} == {"a.example": WARN, "b.example": OK}
    assert report.exit_status() == exitcodes.OK
    report.strict = True
    assert report.exit_status() == exitcodes.DATAERR


def srv(*targets: tuple[str, int]) -> SrvAnswer:
    return SrvAnswer(tuple(SrvTarget(0, 5, port, t) for t, port in targets))


def test_compare_srv() -> None:
    assert compare_srv(ONION_A, 25, SrvAnswer()) == (OK, "no SRV record: the pin is the only "
                                                        "route")
    assert compare_srv(ONION_A, 25, srv((ONION_A, 25)))[0] == OK
    assert compare_srv(ONION_A, 25, srv(("mx." + ONION_A, 25)))[0] == OK  # a subdomain form
    verdict, why = compare_srv(ONION_A, 25, srv((ONION_B, 25)))
    assert verdict == WARN and f"points elsewhere: {ONION_B}:25" in why
    verdict, why = compare_srv(ONION_A, 25, srv((V2, 25)))
    assert verdict == WARN and "v2 onion" in why
    verdict, why = compare_srv(ONION_A, 25, srv((ONION_A, 25), (V2, 25)))
    assert verdict == WARN and "agrees" in why and V2 in why
    assert compare_srv(ONION_A, 25, srv((ONION_A, 2525)))[0] == WARN
    assert compare_srv(ONION_A, 25, srv(("mail.clear.example", 25)))[0] == WARN
    assert compare_srv(ONION_A, 25, SrvAnswer(error="DNS timeout"))[0] == TEMPORARY
    assert compare_srv(ONION_A, 25, srv((".", 0)))[0] == OK  # "decidedly not available"


targets = st.one_of(st.sampled_from([ONION_A, ONION_B, V2, "mx.clear.example", ".", ""]),
                    st.text(max_size=70))


@given(st.lists(st.tuples(targets, st.integers(0, 65535)), max_size=6),
       st.integers(1, 65535))
def test_compare_srv_ok_only_when_the_pin_is_named_or_nothing_is(records, port) -> None:
    verdict, why = compare_srv(ONION_A, port, srv(*records))
    assert verdict in (OK, WARN) and why
    named = [(t, p) for t, p in records if t not in ("", ".")]
    if verdict == OK:  # other v3 onions beside the pin are backups: named, still OK
        assert not named or any(t.endswith(ONION_A) and p == port for t, p in named)
        assert all(t.endswith(ONION_A) or t in why for t, _ in named)


def test_cli_exit_statuses_and_json(tmp_path: Path, capsys) -> None:
    bad = onionmx_map(tmp_path)
    good = tmp_path / "good.txt"
    good.write_text(f"ok.example {make_onion(9)}:2525\n")
    assert main(["map", "check", "--no-dns", str(good)]) == exitcodes.OK
    out = capsys.readouterr().out
    assert out.strip().endswith("exit 0") and "1 ok" in out
    assert main(["map", "check", "--no-dns", "--json", str(bad)]) == exitcodes.DATAERR
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["exit"] == exitcodes.DATAERR
    assert data["counts"] == {"ok": 2, "warn": 0, "temporary": 0, "invalid": 4}
    assert {"domain", "source", "status", "onion", "port", "notes", "srv", "probe"} == \
        set(data["entries"][0])
    assert main(["map", "check", "--no-dns", str(bad)]) == exitcodes.DATAERR
    out = capsys.readouterr().out
    assert f"invalid {bad}:6: riseup.example" in out and "systemli" not in out
    assert main(["map", "check", "--no-dns", str(tmp_path / "nope.yml")]) == exitcodes.NOINPUT
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.yml"
    broken.write_text(f"{ONION_A}:\n  - [x\n")
    assert main(["map", "check", "--no-dns", str(broken)]) == exitcodes.DATAERR
    assert f"{broken}:" in capsys.readouterr().err
    assert main(["map", "check", "--no-dns", "--concurrency", "0", str(good)]) == \
        exitcodes.USAGE
