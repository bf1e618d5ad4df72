"""Maildir delivery that never loses an accepted message and never shows a half-written one.

The order (maildir(5)): write ``tmp/NAME``, fsync it, rename it into ``new/``, fsync ``new/``;
only then may the sink answer 250.  A crash before the rename leaves at most a file in tmp/
(removed at the next start when older than 36 hours, or by :func:`clean_tmp`), never a partial
file in new/.  :func:`usage` counts the directory itself, so mail fetched by rsync or read over
ssh frees the quota at once.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

from .quota import Usage

SUBDIRS = ("tmp", "new", "cur")
TMP_MAX_AGE = 36 * 3600  # maildir(5): a tmp/ file this old is garbage

_serial = itertools.count(1)


def ensure(root: Path) -> None:
    """Create ``root`` and tmp/new/cur (0700) if missing; a path that is not a directory is
    a ConfigError-worthy OSError for the caller."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for sub in SUBDIRS:
        (root / sub).mkdir(mode=0o700, exist_ok=True)


def clean_tmp(root: Path, max_age: float = TMP_MAX_AGE, now: float | None = None) -> int:
    """Remove tmp/ files older than ``max_age`` seconds (a crash's leftovers); how many."""
    now = time.time() if now is None else now
    removed = 0
    with os.scandir(root / "tmp") as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and \
                        now - entry.stat(follow_symlinks=False).st_mtime > max_age:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


def usage(root: Path) -> Usage:
    """Messages and bytes in new/ and cur/ (what the owner has not fetched or removed yet)."""
    count = total = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(root / sub) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # fetched meanwhile
                        continue
                    count += 1
                    total += st.st_size
        except FileNotFoundError:
            continue
    return Usage(count, total)


def unique_name(now: float | None = None) -> str:
    """``<sec>.M<usec>P<pid>Q<n>.<host>`` (the maildir(5) convention; host without / and :)."""
    now = time.time() if now is None else now
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_serial)}.{host}"


def deliver(root: Path, message: bytes) -> Path:
    """Store ``message`` in ``root/new`` durably; returns its path.  Raises OSError (the
    tmp/ file removed) if anything fails: the caller answers 4xx and nothing is lost."""
    name = unique_name()
    tmp = root / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(message)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        final = root / "new" / f"{name},S={len(message)}"
        os.rename(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dirfd = os.open(root / "new", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return final


class Spool:
    """One message being received, written to ``tmp/`` as it arrives (so a session in DATA
    holds no more than one read in memory); :meth:`commit` makes it durable in new/,
    :meth:`discard` removes it.  A write error is kept and reported at commit (the client
    gets a 4xx then, not in the middle of DATA)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = unique_name()
        self.tmp = root / "tmp" / self.name
        self.size = 0
        self.header_size = 0  # the trace headers we wrote first
        self.error: OSError | None = None
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                      | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        if self.fd is None or self.error is not None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self.error = exc
        self.size += len(data)

    def commit(self) -> Path:
        """All three steps (blocking); the sink runs :meth:`sync` and :meth:`sync_dir` in a
        worker thread and :meth:`publish` in its event loop, so the rename and the quota's
        count of it happen together."""
        self.sync()
        final = self.publish()
        self.sync_dir()
        return final

    def sync(self) -> None:
        """Raise the first write error, or fsync the file (the tmp/ file removed on failure)."""
        assert self.fd is not None
        try:
            if self.error is not None:
                raise self.error
            os.fsync(self.fd)
        except BaseException:
            self.discard()
            raise

    def publish(self) -> Path:
        """Close and rename into new/ (after :meth:`sync`): from here it is the owner's mail."""
        assert self.fd is not None
        try:
            os.close(self.fd)
            self.fd = None
            final = self.root / "new" / f"{self.name},S={self.size}"
            os.rename(self.tmp, final)
        except BaseException:
            self.discard()
            raise
        return final

    def sync_dir(self) -> None:
        """fsync new/: the rename survives a crash; only then may the sink say 250."""
        dirfd = os.open(self.root / "new", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def discard(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
