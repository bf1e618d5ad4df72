"""torroute doctor without tor, daemon or MTA: the exit rule, the JSON shape, and a
half-configured machine (no config, a broken file, nothing listening, no Postfix or Exim on
PATH), where each check reports its own failure and the doctor never raises."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.onions import ONION_A, ONION_B

from torroute import exitcodes
from torroute.cli import main
from torroute.doctor import Options, run_doctor
from torroute.doctor.checks import (
    infer_setup,
    socketmap_endpoint,
    status_lines,
    tor_lines,
    tor_version,
)
from torroute.doctor.probes import ProbeTimeout, with_deadline
from torroute.doctor.report import ERROR, OK, STATUSES, WARN, Check, Report, exit_status
from torroute.protocols.control import Bootstrap
from torroute.routing.maps import load_maps
from torroute.testing.ports import free_port
from torroute.tor.settings import Problem, Status, TorSettings

# -- the report -------------------------------------------------------------------------------

checks = st.builds(Check, name=st.text(min_size=1, max_size=10),
                   status=st.sampled_from(STATUSES), why=st.text(max_size=30),
                   fix=st.text(max_size=30), temporary=st.booleans())


@given(st.lists(checks, max_size=12))
def test_exit_rule_misconfiguration_wins_then_temporary_warn_never_fails(items) -> None:
    errors = [c for c in items if c.status == ERROR]
    expected = (exitcodes.CONFIG if any(not c.temporary for c in errors)
                else exitcodes.TEMPFAIL if errors else exitcodes.OK)
    report = Report(list(items))
    assert exit_status(items) == report.exit_status == expected
    assert report.ok is (not errors)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is report.ok and data["exit"] == expected
    assert all(set(c) == {"name", "status", "why", "fix"} for c in data["checks"])
    assert [c["status"] for c in data["checks"]] == [c.status for c in items]


def test_check_lines_and_bad_status() -> None:
    line = Check("tor-bootstrap", ERROR, "5%  Connecting\nnow", "wait", True)
    assert line.lines() == ["error tor-bootstrap: 5% Connecting now", "    fix: wait"]
    assert Check("x", OK, "fine", "unused").lines() == ["ok x: fine"]
    with pytest.raises(ValueError):
        Check("x", "fine", "why")


def test_with_deadline_gives_up_on_a_call_that_hangs() -> None:
    release = threading.Event()
    with pytest.raises(ProbeTimeout, match="stuck: no answer within 0.2s"):
        with_deadline(release.wait, 0.2, "stuck")
    release.set()
    assert with_deadline(lambda: 42, 5, "quick") == 42
    with pytest.raises(KeyError):
        with_deadline(lambda: {}["x"], 5, "raises")


# -- a half-configured machine -----------------------------------------------------------------

def doctor_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["doctor", "--json", "--timeout", "3", *args])
    data = json.loads(capsys.readouterr().out)
    assert data["exit"] == code
    return code, data


def by_name(data: dict) -> dict[str, dict]:
    return {c["name"]: c for c in data["checks"]}


def test_missing_config_is_78_and_every_area_says_why_it_was_not_checked(tmp_path, capsys):
    code, data = doctor_json(capsys, "--config", str(tmp_path / "nope.toml"))
    assert code == exitcodes.CONFIG and data["ok"] is False
    lines = by_name(data)
    assert lines["config"]["status"] == ERROR and "does not exist" in lines["config"]["why"]
    assert lines["config"]["fix"]
    assert {"tor", "daemon", "postfix", "exim", "onion-mx"} <= set(lines)
    assert all(lines[a]["status"] == WARN for a in ("tor", "daemon", "onion-mx"))


@pytest.mark.parametrize("kind", ["directory", "toml", "setting"])
def test_broken_config_file_is_one_error_line_with_its_place(tmp_path, capsys, kind) -> None:
    path = tmp_path / "torroute.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "toml":
        path.write_text("[tor]\nsocks = \n")
    else:
        path.write_text("[routing]\nno_such_key = 1\n")
    code, data = doctor_json(capsys, "--config", str(path))
    line = by_name(data)["config"]
    assert code == exitcodes.CONFIG and line["status"] == ERROR
    assert str(path) in line["why"]
    if kind == "toml":
        assert "line 2" in line["why"]
    if kind == "setting":
        assert "no_such_key" in line["why"]


def write_config(tmp_path: Path, maps: str = "", extra: str = "") -> Path:
    closed = free_port()  # nothing listens there: tor, DNS and the daemon all "down"
    path = tmp_path / "torroute.toml"
    path.write_text(f"""[routing]
nameservers = ["127.0.0.1:{closed}"]
dns_timeout = 1
{maps}
[tor]
control = "inet:127.0.0.1:{closed}"
socks = "127.0.0.1:{closed}"
[serve]
socketmap = "unix:{tmp_path}/socketmap.sock"
exim = "inet:127.0.0.1:{closed}"
status_socket = "unix:{tmp_path}/status.sock"
{extra}""")
    return path


def test_nothing_running_no_mta_on_path_is_75_each_part_on_its_line(tmp_path, capsys,
                                                                     monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no postconf, no exim
    (tmp_path / "map.yml").write_text(f"{ONION_A}:\n  - pinned.example\n")
    cfg = write_config(tmp_path, maps='maps = ["map.yml"]')
    code, data = doctor_json(capsys, "--config", str(cfg))
    lines = by_name(data)
    assert code == exitcodes.TEMPFAIL, data
    assert lines["config"]["status"] == OK and lines["maps"]["status"] == OK
    assert "1 pinned domains" in lines["maps"]["why"]
    assert lines["pins-dns-lookup"]["status"] == WARN  # the resolver is down: not checked
    assert lines["tor-control"]["status"] == ERROR and "nothing listens" in \
        lines["tor-control"]["why"]
    for name in ("daemon-socketmap", "daemon-exim", "daemon-status"):
        assert lines[name]["status"] == ERROR and lines[name]["fix"], name
    assert "socketmap.sock" in lines["daemon-socketmap"]["why"]
    assert lines["postfix"]["status"] == OK and "skipped" in lines["postfix"]["why"]
    assert lines["exim"]["status"] == OK and "skipped" in lines["exim"]["why"]
    assert lines["onion-mx"]["status"] == WARN
    names = [c["name"] for c in data["checks"]]  # data-path order
    assert names.index("maps") < names.index("tor-control") < names.index("daemon-socketmap") \
        < names.index("postfix") < names.index("exim") < names.index("onion-mx")


def test_named_but_missing_binaries_are_errors_not_crashes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    pf = tmp_path / "postfix"
    pf.mkdir()
    cfg = write_config(tmp_path)
    code, data = doctor_json(capsys, "--config", str(cfg), "--skip", "tor", "--skip", "daemon",
                             "--postfix-config", str(pf), "--exim", str(tmp_path / "exim4"))
    lines = by_name(data)
    assert code == exitcodes.CONFIG
    assert lines["postfix"]["status"] == ERROR and "main.cf: no such file" in \
        lines["postfix"]["why"]
    assert lines["exim"]["status"] == ERROR and "exim4" in lines["exim"]["why"]
    assert "tor-control" not in lines and "daemon-socketmap" not in lines
    (pf / "main.cf").write_text("")
    (pf / "master.cf").write_text("")
    report = run_doctor(Options(config_path=str(cfg), postfix_dir=str(pf),
                                postconf=str(tmp_path / "postconf"),
                                skip=frozenset({"tor", "daemon", "exim", "dns"})))
    line = {c.name: c for c in report.checks}["postfix"]
    assert line.status == ERROR and "cannot run" in line.why and "postconf" in line.why


def test_a_map_that_does_not_parse_is_78_with_file_and_line(tmp_path, capsys) -> None:
    (tmp_path / "map.yml").write_text(f"{ONION_A}:\n  - ok.example\n  - [broken\n")
    cfg = write_config(tmp_path, maps='maps = ["map.yml"]')
    code, data = doctor_json(capsys, "--config", str(cfg), "--skip", "tor", "--skip", "daemon",
                             "--skip", "postfix", "--skip", "exim", "--skip", "onion-mx")
    line = by_name(data)["maps"]
    assert code == exitcodes.CONFIG and line["status"] == ERROR
    assert f"{tmp_path / 'map.yml'}:" in line["why"]


def test_invalid_and_v2_pins_are_reported_with_their_lines(tmp_path, capsys) -> None:
    typo = ONION_B[:10] + ("a" if ONION_B[10] != "a" else "b") + ONION_B[11:]
    (tmp_path / "map.yml").write_text(
        f"{ONION_A}:\n  - ok.example\n{typo}:\n  - typo.example\n"
        "expyuzz4wqqyqhjn.onion:\n  - old.example\n")
    cfg = write_config(tmp_path, maps='maps = ["map.yml"]')
    code, data = doctor_json(capsys, "--config", str(cfg), "--skip", "dns", "--skip", "tor",
                             "--skip", "daemon", "--skip", "postfix", "--skip", "exim",
                             "--skip", "onion-mx")
    lines = by_name(data)
    assert code == exitcodes.CONFIG
    assert lines["pins-invalid"]["status"] == ERROR
    assert "map.yml:4: typo.example" in lines["pins-invalid"]["why"]
    assert lines["pins-v2"]["status"] == WARN and "map.yml:6" in lines["pins-v2"]["why"]


def test_human_output_one_line_per_check_and_fix_lines(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = write_config(tmp_path)
    code = main(["doctor", "--config", str(cfg), "--timeout", "3", "--skip", "tor"])
    out = capsys.readouterr().out.splitlines()
    assert code == exitcodes.TEMPFAIL
    assert out[0] == f"ok config: loaded {cfg}"
    assert any(line.startswith("error daemon-socketmap: nothing listens") for line in out)
    assert all(line.startswith(("ok ", "warn ", "error ", "    fix: ")) for line in out[:-1])
    assert out[-1].endswith("exit 75")


def test_run_doctor_library_never_raises_on_a_bad_timeout_value(tmp_path) -> None:
    report = run_doctor(Options(config_path=str(write_config(tmp_path)), timeout=0.5,
                                skip=frozenset({"postfix", "exim"})))
    assert report.exit_status == exitcodes.TEMPFAIL
    assert {c.name for c in report.checks} >= {"config", "tor-control", "daemon-socketmap"}


# -- pure line makers ----------------------------------------------------------------------------

def status(progress=100, problems=(), warning=None, disable=False) -> Status:
    settings = TorSettings(socks_ports=["127.0.0.1:9050 ExtendedErrors"],
                           dns_ports=["127.0.0.1:9053"], automap=True, suffixes=[".onion"],
                           disable_network=disable)
    return Status("unix:/run/tor/control", "0.4.8.10", Bootstrap(progress, "done", "Done",
                                                                 warning),
                  "up", True, settings, list(problems))


def statuses(lines: list[Check]) -> dict[str, tuple[str, bool]]:
    return {c.name: (c.status, c.temporary) for c in lines}


def test_tor_lines_ready_not_bootstrapped_and_wrong_settings() -> None:
    assert set(statuses(tor_lines(status())).values()) == {(OK, False)}
    assert statuses(tor_lines(status(progress=5)))["tor-bootstrap"] == (ERROR, True)
    assert statuses(tor_lines(status(disable=True)))["tor-bootstrap"] == (ERROR, False)
    wrong = tor_lines(status(problems=[
        Problem("DNSPort", "no DNSPort", "torroute tor ensure"),
        Problem("SocksPort", "lacks ExtendedErrors", "ensure", severity="warning")]))
    got = statuses(wrong)
    assert got["tor-dns"] == (ERROR, False) and got["tor-socks"] == (WARN, False)
    assert exit_status(wrong) == exitcodes.CONFIG
    skew = tor_lines(status(progress=40, warning="Clock skew -7200 in microdesc"))
    assert statuses(skew)["tor-clock"] == (WARN, False)


def test_tor_version() -> None:
    assert tor_version("0.4.8.10") == (0, 4, 8, 10)
    assert tor_version("0.4.9.1-alpha") == (0, 4, 9, 1)
    assert tor_version("garbage") is None and tor_version("") is None
    old = status()
    old.version = "0.4.2.7"
    line = {c.name: c for c in tor_lines(old)}["tor-control"]
    assert line.status == WARN and "ExtendedErrors" in line.why


@given(st.text(max_size=30))
def test_tor_version_never_raises(text: str) -> None:
    got = tor_version(text)
    assert got is None or all(isinstance(n, int) for n in got)


def test_status_lines_reload_failure_and_onions_failing_lately(tmp_path) -> None:
    (tmp_path / "m.yml").write_text(f"{ONION_A}:\n  - a.example\n  - b.example\n")
    pins = load_maps([tmp_path / "m.yml"])
    answer = {"pid": 7, "uptime": 4000, "reload": {"ok": False, "message": "m.yml:3: bad"},
              "onions": [{"onion": ONION_A, "port": 25, "consecutive_failures": 3,
                          "last_success": 10.0, "last_failure": 20.0,
                          "last_reason_class": "descriptor", "last_reason": "0xF0"},
                         {"onion": ONION_B, "port": 25, "consecutive_failures": 0,
                          "last_success": 30.0, "last_failure": None}],
              "canaries": [{"target": f"{ONION_B}:25", "up": False, "reason": "timeout"}]}
    lines = {c.name: c for c in status_lines(answer, pins)}
    assert lines["daemon-reload"].status == ERROR and not lines["daemon-reload"].temporary
    assert "m.yml:3: bad" in lines["daemon-reload"].why
    assert lines["onions-lately"].status == WARN
    assert "a.example, b.example" in lines["onions-lately"].why and ONION_B not in \
        lines["onions-lately"].why
    assert lines["daemon-canaries"].status == WARN
    healthy = {c.name: c.status for c in status_lines({"reload": {"ok": True}, "onions": []})}
    assert healthy == {"daemon-reload": OK, "onions-lately": OK}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4), max_leaves=20)
status_keys = st.sampled_from(["reload", "onions", "canaries", "pid", "uptime", "ok",
                               "consecutive_failures", "last_success", "last_failure", "up",
                               "onion", "message"])


@given(st.dictionaries(status_keys, json_values | st.lists(st.dictionaries(
    status_keys, json_values, max_size=6), max_size=3), max_size=6))
def test_status_lines_never_raise_on_any_json_object(answer) -> None:
    lines = status_lines(answer)
    assert lines[0].name == "daemon-reload"
    assert all(c.status in STATUSES for c in lines)


# -- the Postfix parsers ----------------------------------------------------------------------

def test_socketmap_endpoint_and_infer_setup() -> None:
    assert socketmap_endpoint("proxy:socketmap:unix:/run/t.sock:transport") == "unix:/run/t.sock"
    assert socketmap_endpoint("socketmap:inet:127.0.0.1:2000:transport") == "inet:127.0.0.1:2000"
    assert socketmap_endpoint("texthash:/etc/postfix/transport") is None
    params = {"transport_maps": "proxy:socketmap:unix:/run/t.sock:transport, hash:/etc/x"}
    services = {"torroute/unix": ("torroute", "unix", "-", "n", "n", "-", "-", "pipe",
                                  "flags=q", "user=nobody", "argv=/usr/bin/torroute",
                                  "deliver", "--config=/etc/t.toml")}
    assert infer_setup(params, services) == {
        "socket": "unix:/run/t.sock", "proxy": True, "user": "nobody",
        "program": "/usr/bin/torroute", "deliver_config": "/etc/t.toml"}
    assert infer_setup({}, {"torroute-lmtp/unix": ("torroute-lmtp",) * 8}) == {"mode": "lmtp"}


@given(st.text(max_size=80))
def test_socketmap_endpoint_never_raises(text: str) -> None:
    got = socketmap_endpoint(text)
    assert got is None or ("socketmap:" + got) in text


@given(st.sampled_from(["unix:/run/a b", "inet:127.0.0.1:1", "unix:/x"]),
       st.from_regex(r"[a-z_]{1,10}", fullmatch=True), st.booleans())
def test_socketmap_endpoint_round_trip(endpoint: str, name: str, proxy: bool) -> None:
    table = f"{'proxy:' if proxy else ''}socketmap:{endpoint}:{name}"
    assert socketmap_endpoint(table) == endpoint


@given(st.dictionaries(st.sampled_from(["transport_maps", "relayhost"]), st.text(max_size=60)),
       st.dictionaries(st.sampled_from(["torroute/unix", "torroute-lmtp/unix", "smtp/inet"]),
                       st.lists(st.text(min_size=1, max_size=20), max_size=12).map(tuple)))
def test_infer_setup_never_raises(params, services) -> None:
    assert isinstance(infer_setup(params, services), dict)
