"""torroute.daemon.health: the pure parts (HealPolicy, the per-onion table, canary targets)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torroute.config import Config
from torroute.daemon.health import (
    HealPolicy,
    OnionTable,
    check_canaries,
    parse_canary,
)
from torroute.daemon.settings import ServeSettings
from torroute.delivery.relay import TOR_PATH_FAILURES, Attempt
from torroute.errors import ConfigError

A, B, C = ("a" * 56 + ".onion", "b" * 56 + ".onion", "c" * 56 + ".onion")
V3 = "pg6mmjiyjmcrsslvykfwnntlaru7p5svn6y2ymmju6nubxndf4pscryd.onion"


def attempt(onion: str, code: int | None = None, ok: bool = False, timed_out: bool = False,
            refused: bool = False) -> Attempt:
    if ok:
        return Attempt(onion, 25, True, "delivered", None, False, "250 ok", 0.5, False)
    if refused:
        return Attempt(onion, 25, False, "deferred", 0x05, False, "refused", 0.1, False)
    return Attempt(onion, 25, False, "deferred", code, timed_out, "tor: failed", 1.0, False)


class Feeder:
    """A policy with the per-onion table beside it, as the service feeds it."""

    def __init__(self, **kwargs) -> None:
        self.policy = HealPolicy(**kwargs)
        self.table = OnionTable()

    def feed(self, a: Attempt, now: float) -> None:
        entry = self.table.entries.get((a.onion, a.port))
        self.policy.attempt(a, entry.last_success if entry else None, now)
        self.table.record(a, now)


def test_two_onions_that_worked_and_now_fail_on_tors_side_heal() -> None:
    f = Feeder(interval=600, window=900)
    f.feed(attempt(A, ok=True), 0)
    f.feed(attempt(B, ok=True), 10)
    f.feed(attempt(A, 0xF2), 100)
    assert not f.policy.decide(100, 100).heal  # one onion: the remote's problem
    f.feed(attempt(B, 0xF0), 110)
    verdict = f.policy.decide(110, 100)
    assert verdict.heal
    assert f"{A} introduction 0xF2" in verdict.evidence and f"{B} descriptor 0xF0" in \
        verdict.evidence
    f.policy.healed(110)
    assert f.policy.decide(111, 100).evidence is None  # the evidence is used up


def test_a_single_dead_onion_never_heals_however_often_it_fails() -> None:
    f = Feeder(interval=1, window=900)
    f.feed(attempt(A, ok=True), 0)
    for t in range(1, 500):
        f.feed(attempt(A, 0xF2 if t % 2 else 0xF0), t)
        assert not f.policy.decide(t, 100).heal


def test_onions_that_never_worked_or_long_ago_are_no_evidence() -> None:
    f = Feeder(interval=600, window=900)
    f.feed(attempt(A, ok=True), 0)
    f.feed(attempt(B, 0xF2), 10)  # never worked
    f.feed(attempt(A, 0xF2), 1000)  # worked 1000 s ago > window
    assert f.policy.decide(1000, 100).evidence is None


def test_remote_side_failures_are_no_evidence() -> None:
    """A closed port, a 4xx, tor's SocksPort down or auth: not tor's client path."""
    f = Feeder(interval=600, window=900)
    for onion in (A, B, C):
        f.feed(attempt(onion, ok=True), 0)
    f.feed(attempt(A, refused=True), 10)
    f.feed(Attempt(B, 25, True, "deferred", None, False, "451 busy", 1, False), 11)
    f.feed(attempt(C, 0xF4), 12)
    assert f.policy.decide(12, 100).evidence is None


def test_a_success_withdraws_the_evidence() -> None:
    f = Feeder(interval=600, window=900)
    f.feed(attempt(A, ok=True), 0)
    f.feed(attempt(B, ok=True), 0)
    f.feed(attempt(A, timed_out=True), 5)
    f.feed(attempt(A, ok=True), 6)
    f.feed(attempt(B, 0xF3), 7)
    assert not f.policy.decide(7, 100).heal


def test_held_back_without_bootstrap_disabled_or_rate_limited() -> None:
    f = Feeder(interval=600, window=900)
    for onion in (A, B):
        f.feed(attempt(onion, ok=True), 0)
        f.feed(attempt(onion, 0xF2), 1)
    assert f.policy.decide(2, 80).held == "bootstrap"
    assert f.policy.decide(2, None).held == "bootstrap"
    f.policy.enabled = False
    assert f.policy.decide(2, 100).held == "heal = false"
    f.policy.enabled = True
    assert f.policy.decide(2, 100).heal
    f.policy.healed(2)
    for onion in (A, B):  # they still worked within the window; fail again after NEWNYM
        f.feed(attempt(onion, 0xF2), 100)
    verdict = f.policy.decide(100, 100)
    assert not verdict.heal and verdict.held == "rate limit" and "98s ago" in verdict.detail
    assert f.policy.decide(602, 100).heal


def test_own_canary_failing_on_tors_side_heals_alone() -> None:
    policy = HealPolicy(interval=600, window=900)
    policy.canary(A, "refused", 0x05, 1)  # our MX's port closed: not tor's client
    assert policy.decide(1, 100).evidence is None
    policy.canary(A, "introduction", 0xF2, 2)
    verdict = policy.decide(2, 100)
    assert verdict.heal and f"canary {A} introduction 0xF2" in verdict.evidence
    policy.canary(A, "delivered", None, 3)
    assert policy.decide(3, 100).evidence is None


events = st.lists(st.tuples(
    st.sampled_from([A, B, C]),
    st.sampled_from(["ok", "f0", "f2", "f3", "f7", "timeout", "refused", "f4", "canary_ok",
                     "canary_f2", "check"]),
    st.floats(min_value=0, max_value=400, allow_nan=False)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(events, st.floats(min_value=1, max_value=500), st.floats(min_value=1, max_value=1000))
def test_policy_invariants(steps, interval, window) -> None:
    """Over random attempt sequences: every heal has >= 2 distinct onions that worked within
    the window and failed on tor's side since then, or a canary failing on tor's side; two
    heals are never closer than heal_interval."""
    f = Feeder(interval=interval, window=window)
    codes = {"f0": 0xF0, "f2": 0xF2, "f3": 0xF3, "f7": 0xF7}
    now, heals = 0.0, []
    # the model: per onion, last success and the time of the last tor-side failure after it
    last_ok: dict[str, float] = {}
    path_fail: dict[str, float] = {}
    canary_fail: dict[str, float] = {}
    for onion, kind, dt in steps:
        now += dt
        if kind == "canary_ok":
            f.policy.canary(onion, "delivered", None, now)
            canary_fail.pop(onion, None)
        elif kind == "canary_f2":
            f.policy.canary(onion, "introduction", 0xF2, now)
            canary_fail[onion] = now
        elif kind != "check":
            a = (attempt(onion, ok=True) if kind == "ok" else
                 attempt(onion, refused=True) if kind == "refused" else
                 attempt(onion, 0xF4) if kind == "f4" else
                 attempt(onion, timed_out=True) if kind == "timeout" else
                 attempt(onion, codes[kind]))
            worked = last_ok.get(onion)
            f.feed(a, now)
            if a.reason_class in TOR_PATH_FAILURES and worked is not None and \
                    now - worked <= window:
                path_fail[onion] = now
            elif a.reason_class not in TOR_PATH_FAILURES:
                path_fail.pop(onion, None)
            if kind == "ok":
                last_ok[onion] = now
        verdict = f.policy.decide(now, 100)
        if verdict.heal:
            since = max(now - window, heals[-1] if heals else -1.0)
            eligible = {o for o, t in path_fail.items() if t > since}
            canaries = {o for o, t in canary_fail.items() if t > since}
            assert len(eligible) >= 2 or canaries, (eligible, canaries, verdict)
            assert not heals or now - heals[-1] >= interval
            heals.append(now)
            f.policy.healed(now)
            path_fail.clear()
            canary_fail.clear()
        else:
            assert verdict.evidence is None or verdict.held == "rate limit"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.booleans()), max_size=400))
def test_onion_table_stays_bounded(steps) -> None:
    table = OnionTable(limit=50)
    for i, (n, ok) in enumerate(steps):
        onion = f"{n:056d}.onion"
        a = attempt(onion, ok=ok, code=None if ok else 0xF0)
        entry = table.record(a, float(i))
        assert entry.successes + entry.failures >= 1
        assert len(table) <= 50
    json.dumps([e.to_json() for e in table.entries.values()])


def test_onion_table_records_latency_and_reasons() -> None:
    table = OnionTable()
    table.record(attempt(A, ok=True), 1.0)
    entry = table.record(attempt(A, 0xF2), 2.0)
    assert entry.to_json() == {
        "onion": A, "port": 25, "successes": 1, "failures": 1, "consecutive_failures": 1,
        "last_success": 1.0, "last_failure": 2.0, "last_reason": "tor: failed",
        "last_reason_class": "introduction", "last_socks_code": 0xF2, "latency_seconds": 0.5}


def test_canary_targets() -> None:
    assert parse_canary(V3) == (V3, 25)
    assert parse_canary(f"{V3.upper()}:2525") == (V3, 2525)
    assert check_canaries([V3, f"{V3}:26"]) == ((V3, 25), (V3, 26))
    for bad in ("example.com", "abc.onion", f"{V3}:0", f"{V3}:x", f"mail.{V3}", 25):
        with pytest.raises(ConfigError, match="canary"):
            parse_canary(bad)  # type: ignore[arg-type]


def test_a_bad_canary_refuses_the_settings() -> None:
    with pytest.raises(ConfigError, match=r"serve\.canary: canary 'abc\.onion'"):
        ServeSettings(canary=("abc.onion",)).check()
    ServeSettings(canary=(V3,)).check()
    ServeSettings.from_config(Config())  # defaults: no canary


# ---- the service in a real (not started) LookupDaemon: the table, the snapshot, tor outages


def make_daemon(tmp_path, **serve):
    from torroute.daemon.service import LookupDaemon

    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[tor]\ncontrol = "unix:{tmp_path}/no-such-control"\n')
    from torroute.config import load_config

    config = load_config(str(cfg))
    return LookupDaemon(config, ServeSettings(**serve))


def test_service_snapshot_is_the_interface(tmp_path) -> None:
    from torroute.daemon.health import make_service

    daemon = make_daemon(tmp_path, canary=(V3,))
    service = make_service(daemon)
    assert daemon.health is service
    service.observe(attempt(A, ok=True))
    service.observe(attempt(A, 0xF2))  # one onion, no event loop: nothing scheduled
    snap = json.loads(json.dumps(service.snapshot()))
    assert set(snap) == {"onions", "canaries", "healing", "tor"}
    (onion,) = snap["onions"]
    assert onion["onion"] == A and onion["consecutive_failures"] == 1
    assert snap["canaries"] == [{"target": f"{V3}:25", "up": None, "last_check": None,
                                 "last_ok": None, "reason": None, "seconds": None,
                                 "checks": 0, "failures": 0}]
    assert snap["healing"] == {"enabled": True, "newnym_total": 0, "last_newnym": None,
                               "last_evidence": None, "suppressed_total": 0}
    assert snap["tor"] == {"bootstrap": None, "checked": None, "error": None}


def test_reload_applies_heal_settings_and_canaries(tmp_path) -> None:
    from dataclasses import replace

    from torroute.daemon.health import make_service

    daemon = make_daemon(tmp_path)
    service = make_service(daemon)
    daemon.settings = replace(daemon.settings, heal=False, heal_interval=60, canary=(V3,))
    for hook in daemon.on_reload:
        hook()
    assert not service.policy.enabled and service.policy.interval == 60
    assert list(service.canaries) == [(V3, 25)]


def test_control_port_outage_is_one_warning_per_state_change(tmp_path, caplog) -> None:
    """No tor control socket: bootstrap unknown, the error kept, one WARNING (no ERROR) for
    any number of polls; healing is held back, mail untouched."""
    import asyncio
    import logging

    from torroute.daemon.health import make_service

    daemon = make_daemon(tmp_path)
    service = make_service(daemon)
    with caplog.at_level(logging.INFO, logger="torroute.daemon"):
        for _ in range(3):
            assert asyncio.run(service._poll_tor()) is None
    assert service.snapshot()["tor"]["error"] and service.bootstrap is None
    lines = [r for r in caplog.records if "control" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING, lines
    assert "mail is not affected" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_control_port_that_never_answers_does_not_block(tmp_path, monkeypatch) -> None:
    """A listener that accepts and stays silent (a hung tor): the poll gives up after
    CONTROL_TIMEOUT, the loop was never blocked, and asyncio.run returns (no joined thread)."""
    import asyncio
    import socket

    from torroute.daemon import health
    from torroute.daemon.service import LookupDaemon

    monkeypatch.setattr(health, "CONTROL_TIMEOUT", 0.5)
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        cfg = tmp_path / "t.toml"
        cfg.write_text(f'[tor]\ncontrol = "inet:127.0.0.1:{silent.getsockname()[1]}"\n')
        from torroute.config import load_config

        service = health.make_service(LookupDaemon(load_config(str(cfg)), ServeSettings()))

        async def poll_while_ticking() -> tuple[int | None, int]:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.05)
                    ticks += 1

            ticker = asyncio.get_running_loop().create_task(tick())
            got = await service._poll_tor()
            ticker.cancel()
            return got, ticks

        got, ticks = asyncio.run(poll_while_ticking())
        assert got is None and ticks >= 3  # the loop ran while the control port hung
        assert "TimeoutError" in service.tor_error
    finally:
        silent.close()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=120),
                 st.builds(lambda p, s: f"{V3}{s}{p}", st.integers(-5, 70000),
                           st.sampled_from([":", "::", ": ", ""]))))
def test_parse_canary_never_crashes(text: str) -> None:
    """Any text: a (v3 onion, port in range) or ConfigError naming the canary, nothing else."""
    try:
        onion, port = parse_canary(text)
    except ConfigError as exc:
        assert str(exc).startswith("canary ")
    else:
        assert onion == V3 and 0 < port < 65536
