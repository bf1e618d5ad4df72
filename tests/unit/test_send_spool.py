"""The --queue spool (torroute.delivery.spool): names, the entry format, backoff, and the flush
state machine (per-recipient state, delete only after every 250, failed/ for permanent
failures, the lock).  ``deliver`` here is a stand-in callable (named so): the real delivery is
tested on the private Tor network (tests/testnet/test_send.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torroute import exitcodes
from torroute.delivery.spool import (
    BACKOFF_CAP,
    LIFETIME,
    Entry,
    Recipient,
    Spool,
    SpoolBusy,
    backoff,
    decode_entry,
    encode_entry,
    make_name,
    parse_name,
)
from torroute.delivery.submit import DEFERRED, DELIVERED, REFUSED, RecipientResult


@given(st.floats(min_value=0, max_value=2**33, allow_nan=False), st.integers(0, 2**22),
       st.integers(0, 2**64 - 1))
def test_names_round_trip(now: float, pid: int, bits: int) -> None:
    name = make_name(now, pid, bits)
    seconds, micro, got_pid, got_bits = parse_name(name)
    assert (seconds, got_pid, got_bits) == (int(now), pid, bits) and 0 <= micro < 10**6
    assert "/" not in name and not name.startswith(".")


@given(st.text(max_size=40))
def test_other_file_names_are_not_entries(text: str) -> None:
    parsed = parse_name(text)
    if parsed is not None:
        assert make_name(parsed[0] + parsed[1] / 1e6, parsed[2], parsed[3]) == text or \
            text.startswith("0")  # leading zeros parse but are never made


RCPT = st.text(min_size=1, max_size=20)
STATE = st.builds(Recipient, st.sampled_from(["pending", "delivered", "failed"]),
                  st.text(max_size=6), st.text(max_size=30), st.integers(0, 255))


@given(st.text(max_size=30), st.floats(0, 2**33), st.binary(max_size=200),
       st.dictionaries(RCPT, STATE, max_size=5), st.integers(0, 1000), st.floats(0, 2**33))
def test_entries_round_trip(sender, created, data, recipients, attempts, next_try) -> None:
    entry = Entry("1.M000000P1R0000000000000000", sender, created, data, recipients, attempts,
                  next_try)
    assert decode_entry(entry.name, encode_entry(entry)) == entry


@given(st.binary(max_size=60))
def test_garbage_is_not_an_entry(blob: bytes) -> None:
    try:
        decode_entry("x", blob)
    except (ValueError, KeyError, TypeError):
        pass


@given(st.integers(0, 10_000))
def test_backoff_grows_and_is_capped(attempts: int) -> None:
    assert 0 < backoff(attempts) <= BACKOFF_CAP
    assert backoff(attempts) <= backoff(attempts + 1)


def test_backoff_schedule() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [300, 600, 1200, 2400]
    assert backoff(50) == BACKOFF_CAP


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Deliver:
    """Stand-in for torroute.delivery.submit.submit: answers per recipient as told, and
    records what it was asked to send."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, str, list[str]]] = []
        self.kinds: dict[str, str] = {}

    def __call__(self, data: bytes, sender: str, rcpts) -> list[RecipientResult]:
        self.calls.append((data, sender, list(rcpts)))
        codes = {DELIVERED: 0, DEFERRED: 75, REFUSED: 69}
        return [RecipientResult(r, self.kinds.get(r, DELIVERED), "x.y.z", "said so",
                                codes[self.kinds.get(r, DELIVERED)]) for r in rcpts]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "q", clock=Clock())


def test_enqueue_is_on_disk_private_and_whole(spool: Spool) -> None:
    path = spool.enqueue(b"Subject: s\n\nbody\n", "a@o.test",
                         {"b@x.test": ("4.4.1", "down"), "c@y.test": ("4.4.3", "dns")})
    assert path.parent == spool.path / "new" and os.listdir(spool.path / "tmp") == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.path.stat().st_mode) == 0o700
    entry = spool.load(path.name)
    assert entry.data == b"Subject: s\n\nbody\n" and entry.sender == "a@o.test"
    assert entry.pending() == ["b@x.test", "c@y.test"] and entry.attempts == 1
    assert entry.next_try == spool.clock() + backoff(1)


def test_flush_respects_backoff_partial_success_and_deletes_after_all_250(spool: Spool) -> None:
    spool.enqueue(b"M\n", "a@o.test", {"b@x.test": ("4.4.1", "down"),
                                         "c@y.test": ("4.4.1", "down")})
    deliver = Deliver()
    report = spool.flush(deliver)  # not due yet
    assert deliver.calls == [] and [r.kind for _, r in report.results] == ["queued"] * 2
    assert all(r.code == exitcodes.TEMPFAIL for _, r in report.results)
    spool.clock.now += backoff(1)
    deliver.kinds["c@y.test"] = DEFERRED
    report = spool.flush(deliver)
    assert deliver.calls == [(b"M\n", "a@o.test", ["b@x.test", "c@y.test"])]
    assert [(r.recipient, r.kind) for _, r in report.results] == [("b@x.test", DELIVERED),
                                                                   ("c@y.test", "queued")]
    [name] = spool.names()
    entry = spool.load(name)
    assert entry.recipients["b@x.test"].status == "delivered"
    assert entry.pending() == ["c@y.test"] and entry.attempts == 2
    # --now: only the pending one again, then the entry is gone
    deliver.kinds.clear()
    report = spool.flush(deliver, now=True)
    assert deliver.calls[-1] == (b"M\n", "a@o.test", ["c@y.test"])
    assert spool.names() == [] and os.listdir(spool.path / "failed") == []
    assert os.listdir(spool.path / "new") == [] and os.listdir(spool.path / "tmp") == []


def test_a_permanent_failure_moves_the_entry_to_failed_with_its_state(spool: Spool) -> None:
    spool.enqueue(b"M\n", "a@o.test", {"b@x.test": ("", ""), "c@y.test": ("", "")})
    deliver = Deliver()
    deliver.kinds["c@y.test"] = REFUSED
    report = spool.flush(deliver, now=True)
    assert [r.code for _, r in report.results] == [0, 69]
    assert spool.names() == []
    [name] = os.listdir(spool.path / "failed")
    entry = decode_entry(name, (spool.path / "failed" / name).read_bytes())
    assert entry.recipients["b@x.test"].status == "delivered"
    assert entry.recipients["c@y.test"].status == "failed"
    spool.flush(deliver, now=True)
    assert len(deliver.calls) == 1  # failed/ is never retried


def test_deferred_past_the_lifetime_gives_up(spool: Spool) -> None:
    spool.enqueue(b"M\n", "a@o.test", {"b@x.test": ("", "")})
    spool.clock.now += LIFETIME + 1
    deliver = Deliver()
    deliver.kinds["b@x.test"] = DEFERRED
    [(_, got)] = spool.flush(deliver).results
    assert (got.kind, got.dsn, got.code) == ("expired", "5.4.7", exitcodes.UNAVAILABLE)
    assert "gave up after 5 days" in got.text and len(os.listdir(spool.path / "failed")) == 1


def test_two_flushes_never_run_at_once(spool: Spool) -> None:
    spool.enqueue(b"M\n", "a@o.test", {"b@x.test": ("", "")})
    deliver = Deliver()
    with spool.locked(), pytest.raises(SpoolBusy, match="another flush"):
        spool.flush(deliver, now=True)
    assert deliver.calls == []
    spool.flush(deliver, now=True)
    assert len(deliver.calls) == 1 and spool.names() == []


def test_foreign_and_broken_files_are_left_alone(spool: Spool) -> None:
    spool.create()
    (spool.path / "new" / "README").write_text("not mine")
    broken = spool.path / "new" / make_name(1.5, 1, 7)
    broken.write_bytes(b"torroute-spool 1\n{not json")
    report = spool.flush(Deliver(), now=True)
    assert report.results == [] and len(report.unreadable) == 1
    assert (spool.path / "new" / "README").exists() and broken.exists()
