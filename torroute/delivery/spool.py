"""The ``torroute send --queue DIR`` spool: deferred mail kept on disk until an onion MX takes it.

Maildir-like, so a crash at any moment leaves either the old file or the new one, never half
of one: an entry is written into ``tmp/``, fsynced, renamed into ``new/`` and the directory
fsynced before ``send`` exits 0.  Each entry is one file, ``MAGIC``, one JSON line of state
(envelope sender, creation time, attempts, next try, and the state of every recipient) and
the message bytes.  ``flush`` retries the pending recipients of each entry that is due (with
exponential backoff), saves the new state the same way (write, fsync, rename over), deletes
the entry only when every recipient was delivered (250), and moves an entry with a
permanently failed recipient into ``failed/`` (kept for the operator, with the state saying
who got it).  A lock (``flock`` on ``.lock``) keeps two flushes from sending the same entry.

Delivery is at least once: a crash between the MX's 250 and the state's rename sends that
recipient again on the next flush (never zero times).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import exitcodes
from ..errors import TemporaryError

__all__ = ["Entry", "FlushReport", "Spool", "SpoolBusy", "backoff", "decode_entry",
           "encode_entry", "make_name", "parse_name"]

MAGIC = b"torroute-spool 1\n"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
STATUSES = (PENDING, DELIVERED, FAILED)

#: first retry after 5 minutes, doubling, at most every 4 hours; given up after 5 days
BACKOFF_BASE = 300.0
BACKOFF_CAP = 4 * 3600.0
LIFETIME = 5 * 86400.0

_NAME = re.compile(r"(\d{1,12})\.M(\d{6})P(\d{1,10})R([0-9a-f]{16})\Z")


class SpoolBusy(TemporaryError):
    """Another flush holds the spool's lock (try again later)."""


def make_name(now: float, pid: int, random_bits: int) -> str:
    """A unique entry name, Maildir style: seconds, microseconds, pid, 64 random bits (no
    host name: the spool may be on an onion-only host that must not name itself)."""
    seconds = int(now)
    micro = min(int((now - seconds) * 1_000_000), 999_999)
    return f"{seconds}.M{micro:06d}P{pid}R{random_bits & (2**64 - 1):016x}"


def parse_name(name: str) -> tuple[int, int, int, int] | None:
    """(seconds, microseconds, pid, random) of an entry name, or None for anything else (an
    editor's backup, a dot file: never touched by a flush)."""
    match = _NAME.match(name)
    if match is None:
        return None
    return (int(match[1]), int(match[2]), int(match[3]), int(match[4], 16))


def backoff(attempts: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds until the next try after ``attempts`` failed ones: base, 2*base, 4*base ... cap."""
    if attempts <= 1:
        return min(base, cap)
    return min(base * 2.0 ** min(attempts - 1, 64), cap)


@dataclass
class Recipient:
    """One recipient's state in an entry: pending, delivered or failed (with the last words)."""

    status: str = PENDING
    dsn: str = ""
    text: str = ""
    code: int = exitcodes.TEMPFAIL


@dataclass
class Entry:
    name: str
    sender: str
    created: float
    data: bytes
    recipients: dict[str, Recipient]
    attempts: int = 0
    next_try: float = 0.0

    def pending(self) -> list[str]:
        return [r for r, st in self.recipients.items() if st.status == PENDING]


def encode_entry(entry: Entry) -> bytes:
    state = {"sender": entry.sender, "created": entry.created, "attempts": entry.attempts,
             "next_try": entry.next_try,
             "recipients": [[rcpt, st.status, st.dsn, st.text, st.code]
                            for rcpt, st in entry.recipients.items()]}
    return MAGIC + json.dumps(state, ensure_ascii=True).encode("ascii") + b"\n" + entry.data


def decode_entry(name: str, blob: bytes) -> Entry:
    """The inverse of :func:`encode_entry`; ValueError for a file that is not an entry."""
    if not blob.startswith(MAGIC):
        raise ValueError(f"{name}: not a torroute spool entry")
    end = blob.find(b"\n", len(MAGIC))
    if end < 0:
        raise ValueError(f"{name}: truncated spool entry")
    state = json.loads(blob[len(MAGIC):end])
    recipients = {}
    for rcpt, status, dsn, text, code in state["recipients"]:
        if status not in STATUSES:
            raise ValueError(f"{name}: unknown recipient status {status!r}")
        recipients[str(rcpt)] = Recipient(status, str(dsn), str(text), int(code))
    return Entry(name, str(state["sender"]), float(state["created"]), blob[end + 1:],
                 recipients, int(state["attempts"]), float(state["next_try"]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class FlushReport:
    """What a flush did: per entry name, the results of its recipients (the submit module's
    RecipientResult), and the entries it could not read."""

    results: list[tuple[str, object]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


class Spool:
    """The spool directory (created 0700: it holds mail).  ``tmp/`` in the making, ``new/``
    pending, ``failed/`` given up (kept, never deleted by torroute)."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock

    def create(self) -> Spool:
        """The directories (an entry's rename must survive a crash: a new directory's own
        entry is fsynced too)."""
        made = False
        for sub in ("", "tmp", "new", "failed"):
            try:
                (self.path / sub).mkdir(mode=0o700)
                made = True
            except FileExistsError:
                pass
        if made:
            _fsync_dir(self.path)
            _fsync_dir(self.path.parent)
        return self

    def _write(self, entry: Entry, into: str) -> Path:
        """tmp/NAME written and fsynced, renamed to ``into``/NAME, the directory fsynced."""
        tmp = self.path / "tmp" / entry.name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(encode_entry(entry))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        final = self.path / into / entry.name
        os.replace(tmp, final)
        _fsync_dir(self.path / into)
        return final

    def enqueue(self, data: bytes, sender: str, recipients: dict[str, tuple[str, str]]) -> Path:
        """Keep ``data`` for ``recipients`` (rcpt -> (dsn, text) of their deferral); returns
        the entry's path once it is on disk (fsynced file and directory)."""
        self.create()
        now = self.clock()
        entry = Entry(make_name(now, os.getpid(), secrets.randbits(64)), sender, now, data,
                      {r: Recipient(PENDING, dsn, text) for r, (dsn, text) in
                       recipients.items()}, attempts=1, next_try=now + backoff(1))
        return self._write(entry, "new")

    def names(self) -> list[str]:
        """The pending entries, oldest first."""
        try:
            found = os.listdir(self.path / "new")
        except FileNotFoundError:
            return []
        return sorted((n for n in found if parse_name(n)), key=lambda n: parse_name(n))

    def load(self, name: str) -> Entry:
        return decode_entry(name, (self.path / "new" / name).read_bytes())

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The flush lock; raises :class:`SpoolBusy` at once if another flush has it."""
        self.create()
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise SpoolBusy(f"{self.path}: another flush is running") from None
                raise
            yield
        finally:
            os.close(fd)

    def flush(self, deliver: Callable[[bytes, str, Sequence[str]], Sequence], *,
              now: bool = False, lifetime: float = LIFETIME) -> FlushReport:
        """Retry every due entry (all with ``now``) under the lock; ``deliver(data, sender,
        recipients)`` returns one RecipientResult per recipient (torroute.delivery.submit).
        Entries not yet due report their pending recipients as deferred."""
        from .submit import DEFERRED, QUEUED, RecipientResult
        from .submit import DELIVERED as SENT

        report = FlushReport()
        with self.locked():
            for name in self.names():
                try:
                    entry = self.load(name)
                except FileNotFoundError:
                    continue
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    report.unreadable.append(f"{name}: {exc}")
                    continue
                started = self.clock()
                pending = entry.pending()
                if not now and entry.next_try > started:
                    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry.next_try))
                    for rcpt in pending:
                        st = entry.recipients[rcpt]
                        report.results.append((name, RecipientResult(
                            rcpt, QUEUED, st.dsn, f"still queued (next try {when}): {st.text}",
                            exitcodes.TEMPFAIL)))
                    continue
                results = list(deliver(entry.data, entry.sender, pending)) if pending else []
                entry.attempts += 1
                entry.next_try = started + backoff(entry.attempts)
                expired = started - entry.created > lifetime
                for result in results:
                    st = entry.recipients[result.recipient]
                    st.dsn, st.text, st.code = result.dsn, result.text, result.code
                    if result.kind == SENT:
                        st.status = DELIVERED
                    elif result.kind == DEFERRED and not expired:
                        st.status = PENDING
                        when = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                             time.gmtime(entry.next_try))
                        result = RecipientResult(result.recipient, QUEUED, result.dsn,
                                                 f"{result.text}; still queued (next try "
                                                 f"{when})", exitcodes.TEMPFAIL)
                    else:
                        st.status = FAILED
                        if result.kind == DEFERRED:  # given up: the deferral became final
                            days = lifetime / 86400
                            st.dsn = "5.4.7"
                            st.text = f"gave up after {days:g} days in {self.path}: {st.text}"
                            st.code = exitcodes.UNAVAILABLE
                            result = RecipientResult(result.recipient, "expired", st.dsn,
                                                     st.text, st.code)
                    report.results.append((name, result))
                self._settle(entry)
        return report

    def _settle(self, entry: Entry) -> None:
        """Delete when all were delivered; else save the state (atomically) and, when nothing
        is pending any more, move the entry to failed/ (one rename: never both places)."""
        statuses = {st.status for st in entry.recipients.values()}
        if statuses == {DELIVERED}:
            (self.path / "new" / entry.name).unlink()
            _fsync_dir(self.path / "new")
            return
        self._write(entry, "new")
        if PENDING not in statuses:
            os.replace(self.path / "new" / entry.name, self.path / "failed" / entry.name)
            _fsync_dir(self.path / "failed")
            _fsync_dir(self.path / "new")
