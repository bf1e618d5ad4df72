"""The metrics exposition (text format 0.0.4, checked by the real promtool), the histogram, the
pure HTTP request parser of the /metrics endpoint, the status formatting, and the shipped alert
rules (promtool check rules + promtool test rules)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.paths import REPO

from torroute.cli.status import format_status
from torroute.config import Config
from torroute.daemon import metrics
from torroute.daemon.lookup import count_table
from torroute.daemon.service import LookupDaemon
from torroute.daemon.settings import ServeSettings
from torroute.daemon.status import StatusService, snapshot
from torroute.delivery.relay import Attempt
from torroute.endpoint import Endpoint
from torroute.errors import ProtocolError

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
RULES = REPO / "contrib" / "prometheus" / "torroute-alerts.yml"
RULE_TESTS = REPO / "contrib" / "prometheus" / "torroute-alerts.test.yml"
ONION = "b" * 56 + ".onion"
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$')


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None
             ) -> subprocess.CompletedProcess:
    assert Path(PROMTOOL).exists(), "promtool missing: apt-get install prometheus"
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def attempt(status: str = "delivered", reached: bool = True, code: int | None = None,
            seconds: float = 1.0, onion: str = ONION) -> Attempt:
    return Attempt(onion, 25, reached, status, code, False, "reason", seconds, False)


def daemon() -> LookupDaemon:
    """A real (not started) LookupDaemon: what the exposition reads is its plain state."""
    settings = ServeSettings(listeners={"tcp_table": (Endpoint.parse("inet:127.0.0.1:1"),)},
                             metrics=Endpoint.parse("inet:127.0.0.1:2"))
    return LookupDaemon(Config(), settings)


class HealthSnapshotFake:
    """The health service's snapshot in the documented shape (notes/interfaces.md) with
    awkward label values; canary and bootstrap values need a live tor, so the daemon tests
    check the real service and this one checks the rendering of every key."""

    def __init__(self, snap: Any) -> None:
        self.snap = snap

    def snapshot(self) -> Any:
        if isinstance(self.snap, Exception):
            raise self.snap
        return self.snap


FULL = {
    "onions": [{"onion": f"o{i}.onion", "port": 25, "successes": 1, "failures": i,
                "consecutive_failures": i, "last_success": 1000.0 + i, "last_failure": None,
                "last_reason": None, "last_reason_class": "descriptor", "last_socks_code": None,
                "latency_seconds": 2.0} for i in range(150)]
    + [{"onion": 'we"ird\\name\nx', "port": 25, "consecutive_failures": 1000,
        "last_success": None}],
    "canaries": [{"target": ONION + ":25", "up": False, "last_check": 5.0, "last_ok": None,
                  "reason": "descriptor", "seconds": 3.0, "checks": 2, "failures": 2},
                 {"target": "c" * 56 + ".onion:25", "up": None, "last_check": None,
                  "last_ok": None, "reason": None, "seconds": None, "checks": 0,
                  "failures": 0}],
    "healing": {"enabled": True, "newnym_total": 3, "last_newnym": 7.0,
                "last_evidence": "3 onions", "suppressed_total": 1},
    "tor": {"bootstrap": 100, "checked": 8.0, "error": None},
}


def parse_exposition(text: str) -> dict[str, list[tuple[dict[str, str], str]]]:
    """Our own reading of the exposition (names -> (labels, value)), to check values."""
    out: dict[str, list[tuple[dict[str, str], str]]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, line
        labels = {k: unescape(v) for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"',
                                                          m.group(2) or "")}
        out.setdefault(m.group(1), []).append((labels, m.group(3)))
    return out


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


# ---- exposition

def test_escaping() -> None:
    assert metrics.escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert metrics.escape_help('say "x"\\\n') == 'say "x"\\\\\\n'
    assert metrics.format_value(True) == "1" and metrics.format_value(3) == "3"
    assert metrics.format_value(math.inf) == "+Inf" and metrics.format_value(math.nan) == "NaN"
    assert metrics.format_value(0.5) == "0.5"


@given(st.text(max_size=200))
def test_label_escaping_round_trips(value: str) -> None:
    escaped = metrics.escape_label(value)
    assert "\n" not in escaped and not re.search(r'(?<!\\)(\\\\)*"', escaped)
    assert unescape(escaped) == value


def test_bad_names_are_refused() -> None:
    out = metrics.Exposition()
    with pytest.raises(ValueError):
        out.family("1bad", "gauge", "x", [])
    with pytest.raises(ValueError):
        out.family("ok", "gauge", "x", [({"bad-label": "v"}, 1)])


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    hist = metrics.Histogram((1.0, 5.0))
    for value in (0.5, 1.0, 3.0, 5.0, 99.0):
        hist.observe(value)
    out = metrics.Exposition()
    out.histogram("t_seconds", "test", [({"outcome": "x"}, hist)])
    samples = parse_exposition(out.text())
    buckets = {labels["le"]: value for labels, value in samples["t_seconds_bucket"]}
    assert buckets == {"1.0": "2", "5.0": "4", "+Inf": "5"}
    assert samples["t_seconds_count"] == [({"outcome": "x"}, "5")]
    assert samples["t_seconds_sum"] == [({"outcome": "x"}, "108.5")]
    with pytest.raises(ValueError):
        metrics.Histogram((2.0, 1.0))


def test_render_of_a_daemon_passes_promtool_and_counts() -> None:
    d = daemon()
    counts = count_table(d, "socketmap")  # what LookupConnection increments per answer
    counts["route"] += 2
    counts["tempfail"] += 1
    counters = metrics.relay_counters(d)
    assert metrics.relay_counters(d) is counters  # one per daemon, shared with status
    counters.observe(attempt(seconds=0.3))
    counters.observe(attempt("deferred", reached=False, code=0xF0, seconds=12.0))
    counters.observe(attempt("deferred", reached=True, seconds=400.0))
    d.reload_failures = 2
    d.health = HealthSnapshotFake(FULL)
    text = metrics.render(d)
    check = promtool("check", "metrics", stdin=text)
    assert check.returncode == 0, check.stdout + check.stderr
    s = parse_exposition(text)
    lookups = {(lb["protocol"], lb["result"]): v for lb, v in s["torroute_lookups_total"]}
    assert lookups[("socketmap", "route")] == "2" and lookups[("socketmap", "tempfail")] == "1"
    assert lookups[("socketmap", "noroute")] == "0"
    relay = {(lb["outcome"], lb["reason"]): v for lb, v in s["torroute_relay_attempts_total"]}
    assert relay == {("delivered", "delivered"): "1", ("deferred", "descriptor"): "1",
                     ("deferred", "mx_deferred"): "1"}
    inf = {lb["outcome"]: v for lb, v in s["torroute_relay_seconds_bucket"] if lb["le"] == "+Inf"}
    assert inf == {"deferred": "2", "delivered": "1"}
    assert s["torroute_reload_failures_total"] == [({}, "2")]
    assert s["torroute_reload_ok"] == [({}, "1")]
    # per-onion series capped, worst first; the awkward name survives escaping
    onions = s["torroute_onion_consecutive_failures"]
    assert len(onions) == metrics.MAX_ONION_SERIES
    assert onions[0] == ({"onion": 'we"ird\\name\nx', "port": "25"}, "1000")
    assert s["torroute_onions_tracked"] == [({}, "151")]
    assert s["torroute_canary_up"] == [({"target": ONION + ":25"}, "0")]  # unchecked: absent
    assert s["torroute_tor_bootstrap_percent"] == [({}, "100")]
    assert s["torroute_heal_newnym_total"] == [({}, "3")]


@pytest.mark.parametrize("snap", [None, {}, {"onions": "no"}, {"tor": {"bootstrap": None}},
                                  {"canaries": [{"up": True}], "healing": {}},
                                  RuntimeError("health broke")])
def test_partial_or_broken_health_renders_what_is_there(snap: Any, daemon_records) -> None:
    d = daemon()
    if snap is not None:
        d.health = HealthSnapshotFake(snap)
    if isinstance(snap, Exception):
        daemon_records.expect_errors = True
    text = metrics.render(d)
    assert promtool("check", "metrics", stdin=text).returncode == 0
    s = parse_exposition(text)
    assert "torroute_reload_ok" in s and "torroute_tor_bootstrap_percent" not in s
    if isinstance(snap, Exception):
        assert "health snapshot failed" in daemon_records.text


# ---- HTTP request parser

def test_parse_request_forms() -> None:
    assert metrics.parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n") is None
    req = metrics.parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
    assert req == metrics.HttpRequest("GET", "/metrics?x=1", "HTTP/1.1")
    assert req.path == "/metrics"
    assert metrics.parse_request(b"GET / HTTP/1.0\n\n") == metrics.HttpRequest("GET", "/",
                                                                             "HTTP/1.0")
    for bad in (b"GET /metrics\r\n\r\n", b"get / HTTP/1.1\r\n\r\n", b"GET / HTTP/2\r\n\r\n",
                b"GET / HTTP/1.1\r\nno colon\r\n\r\n", b"\xff / HTTP/1.1\r\n\r\n",
                b"EHLO x\r\n\r\n", b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n"):
        with pytest.raises(ProtocolError):
            metrics.parse_request(bad)
    with pytest.raises(ProtocolError, match="too long"):
        metrics.parse_request(b"GET / HTTP/1.1\r\nX: " + b"a" * 9000)
    with pytest.raises(ProtocolError, match="too long"):
        metrics.parse_request(b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n")


@given(st.binary(max_size=10000))
@settings(max_examples=300)
def test_parse_request_never_crashes(data: bytes) -> None:
    try:
        req = metrics.parse_request(data)
    except ProtocolError:
        return
    assert req is None or req.method.isupper()
    if req is None:
        assert len(data) <= metrics.MAX_HEAD


heads = st.builds(
    lambda method, path, headers: (f"{method} {path} HTTP/1.1\r\n"
                                   + "".join(f"{k}: {v}\r\n" for k, v in headers)
                                   + "\r\n").encode(),
    st.sampled_from(["GET", "POST", "HEAD", "DELETE"]),
    st.from_regex(r"/[a-z0-9/?=&._-]{0,50}", fullmatch=True),
    st.lists(st.tuples(st.from_regex(r"[A-Za-z-]{1,20}", fullmatch=True),
                       st.from_regex(r"[ -~]{0,40}", fullmatch=True).map(str.strip)),
             max_size=10))


@given(heads, st.data())
def test_parse_request_is_the_same_in_any_pieces(head: bytes, data: st.DataObject) -> None:
    whole = metrics.parse_request(head)
    assert whole is not None
    cut = data.draw(st.integers(0, len(head) - 1))
    assert metrics.parse_request(head[:cut]) is None  # incomplete until the empty line
    assert metrics.parse_request(head + b"trailing body") == whole


def test_only_get_metrics_answers() -> None:
    def render() -> str:
        return "# HELP x y\n# TYPE x gauge\nx 1\n"

    def status(raw: bytes) -> tuple[int, bytes, bytes]:
        req = metrics.parse_request(raw)
        assert req is not None
        reply = metrics.answer(req, render)
        head, _, body = reply.partition(b"\r\n\r\n")
        return int(head.split()[1]), head, body

    code, head, body = status(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 200 and body == render().encode()
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert status(b"GET / HTTP/1.1\r\n\r\n")[0] == 404
    for method in (b"POST", b"HEAD", b"PUT", b"CONNECT"):
        code, head, _ = status(method + b" /metrics HTTP/1.1\r\n\r\n")
        assert code == 405 and b"Allow: GET" in head


# ---- status

def test_status_snapshot_is_json_and_formats() -> None:
    d = daemon()
    count_table(d, "tcp_table")["route"] += 5
    metrics.relay_counters(d).observe(attempt("deferred", reached=False, code=0xF2))
    d.health = HealthSnapshotFake(FULL)
    snap = json.loads(json.dumps(snapshot(d)))
    assert snap["counts"]["lookups"]["tcp_table"]["route"] == 5
    assert snap["counts"]["attempts"] == {"introduction": 1}
    assert snap["reload"] == {"ok": True, "when": d.reload_state.when, "message": "started",
                              "pinned": 0, "failures": 0}
    assert snap["tor"]["bootstrap"] == 100 and len(snap["onions"]) == 151
    text = format_status(snap, now=10.0)
    lines = text.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("onions (worst first)"))
    assert "we\"ird" in lines[first + 2]  # 1000 failures in a row: first row
    assert "DOWN" in text and "not checked yet" in text and "bootstrapped 100%" in text
    assert "reload: ok (started) at " in text
    d.health = None
    bare = format_status(json.loads(json.dumps(snapshot(d))))
    assert "onions" not in bare and "tcp_table" in bare


@given(st.binary(max_size=300))
def test_status_command_never_raises(line: bytes) -> None:
    service = StatusService(daemon())
    answer = service.command(line)
    json.dumps(answer)  # always JSON-able
    if line.strip() == b"status":
        assert answer["reload"]["ok"] is True
    else:
        assert set(answer) == {"error"}


# ---- alert rules

def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS), cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rule_tests_catch_a_rule_that_fires_for_one_dead_onion(tmp_path: Path) -> None:
    """The unit tests discriminate: without the 'at least two onions' guard the stalled alert
    also fires for the instance whose only traffic goes to one dead onion, and they fail."""
    rules = RULES.read_text()
    guard = "count by (instance) (torroute_onion_consecutive_failures > 0) >= 2"
    assert guard in rules
    (tmp_path / RULES.name).write_text(rules.replace(guard, guard[:-1] + "1"))
    shutil.copy(RULE_TESTS, tmp_path)
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert 'instance="only-one"' in result.stdout + result.stderr
