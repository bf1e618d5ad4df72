"""Maildir delivery (torroute.inbox.maildir) and the [sink] settings (torroute.inbox.settings):
durable order, usage recount, tmp/ cleanup, config keys and flag errors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from torroute.config import Config
from torroute.errors import ConfigError
from torroute.inbox import maildir
from torroute.inbox.quota import Usage
from torroute.inbox.settings import SinkSettings, size


def test_deliver_writes_new_only_complete_files(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "Maildir"
    maildir.ensure(root)
    assert all((root / d).is_dir() for d in ("tmp", "new", "cur"))
    assert (root.stat().st_mode & 0o777) == 0o700
    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        calls.append("fsync")
        return real_fsync(fd)

    def rename(a, b):
        calls.append("rename")
        return real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    path = maildir.deliver(root, b"Subject: x\n\nbody\n")
    assert calls == ["fsync", "rename", "fsync"]  # file, rename into new/, the directory
    assert path.parent == root / "new" and path.name.endswith(",S=17")
    assert path.read_bytes() == b"Subject: x\n\nbody\n"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert not list((root / "tmp").iterdir())


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """A fake for what real parts cannot do on demand: the disk fails during the write."""
    root = tmp_path / "Maildir"
    maildir.ensure(root)

    def broken(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        maildir.deliver(root, b"x\n")
    assert not list((root / "tmp").iterdir()) and not list((root / "new").iterdir())


def test_usage_counts_new_and_cur(tmp_path: Path) -> None:
    root = tmp_path / "M"
    maildir.ensure(root)
    maildir.deliver(root, b"a" * 10)
    p = maildir.deliver(root, b"b" * 20)
    (root / "tmp" / "partial").write_bytes(b"c" * 99)
    p.rename(root / "cur" / (p.name + ":2,S"))
    assert maildir.usage(root) == Usage(2, 30)
    names = {maildir.unique_name() for _ in range(1000)}
    assert len(names) == 1000


def test_clean_tmp_removes_only_old_files(tmp_path: Path) -> None:
    root = tmp_path / "M"
    maildir.ensure(root)
    old, fresh = root / "tmp" / "old", root / "tmp" / "fresh"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    past = time.time() - maildir.TMP_MAX_AGE - 10
    os.utime(old, (past, past))
    assert maildir.clean_tmp(root) == 1
    assert not old.exists() and fresh.exists()


def config(table: dict) -> Config:
    cfg = Config()
    cfg.raw = {"sink": table}
    cfg.path = Path("/etc/torroute/torroute.toml")
    return cfg


def test_settings_from_table_and_flags() -> None:
    s = SinkSettings.from_config(config({"maildir": "/srv/Maildir", "listen": "inet:127.0.0.1:2525",
                                         "max_total_size": "300M", "domains": ["Example.ORG"]}),
                                 {"max_messages": 100, "max_message_size": "10M",
                                  "idle_timeout": None})
    assert s.max_total_size == 300 << 20 and s.max_message_size == 10 << 20
    assert s.max_messages == 100 and s.domains == ("example.org",)
    assert s.idle_timeout == 120.0 and not s.onion


@pytest.mark.parametrize("table, flags, words", [
    ({}, {"listen": "inet:127.0.0.1:25"}, "no Maildir"),
    ({"maildir": "/m"}, {}, "--onion-dir DIR, --ephemeral-key"),
    ({"maildir": "/m", "nonsense": 1}, {}, "unknown setting sink.nonsense"),
    ({"maildir": "/m", "listen": "inet:0.0.0.0:25"}, {}, "--allow-remote"),
    ({"maildir": "/m", "listen": "inet:127.0.0.1:25"}, {"max_messages": 0},
     "--max-messages: must be positive"),
    ({"maildir": "/m", "listen": "inet:127.0.0.1:25", "max_total_size": "lots"}, {},
     "sink.max_total_size"),
    ({"maildir": "/m", "listen": "inet:127.0.0.1:25"}, {"starttls": True}, "--tls-key"),
    ({"maildir": "/m", "onion_dir": "/o", "ephemeral_key": "/k"}, {}, "not both"),
])
def test_settings_errors_name_the_key_or_flag(table, flags, words) -> None:
    with pytest.raises(ConfigError, match=None) as exc:
        SinkSettings.from_config(config(table), flags)
    assert words in str(exc.value)


def test_wide_listener_with_allow_remote() -> None:
    s = SinkSettings.from_config(config({"maildir": "/m"}), {"listen": "inet:0.0.0.0:25",
                                                             "allow_remote": True})
    assert s.allow_remote and s.listen.host == "0.0.0.0"


@pytest.mark.parametrize("text, expected", [("10M", 10 << 20), ("300MB", 300 << 20),
                                            ("1g", 1 << 30), (4096, 4096), ("512k", 512 << 10)])
def test_sizes(text, expected) -> None:
    assert size(text) == expected


def test_spool_commit_and_discard(tmp_path: Path) -> None:
    root = tmp_path / "M"
    maildir.ensure(root)
    spool = maildir.Spool(root)
    spool.write(b"Subject: a\n\n")
    spool.write(b"body\n")
    assert list((root / "tmp").iterdir()) == [spool.tmp] and not list((root / "new").iterdir())
    path = spool.commit()
    assert path.read_bytes() == b"Subject: a\n\nbody\n" and path.name.endswith(",S=17")
    dropped = maildir.Spool(root)
    dropped.write(b"half a mess")
    dropped.discard()
    assert not list((root / "tmp").iterdir()) and len(list((root / "new").iterdir())) == 1
