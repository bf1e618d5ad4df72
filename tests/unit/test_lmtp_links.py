"""Per-onion Postfix destinations: links to the one LMTP socket (torroute.daemon.lmtp_links)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from support.onions import ONION_A, ONION_B

from torroute.daemon.lmtp_links import OnionLinks


@pytest.fixture
def short(tmp_path: Path):
    """A directory with a short path: pytest's tmp_path leaves no room for a socket path."""
    path = Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def listening(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


def test_each_onion_gets_a_link_that_reaches_the_socket(short: Path) -> None:
    sock = short / "lmtp.sock"
    with listening(sock) as server:
        links = OnionLinks(sock).prepare()
        a, b = links.path(ONION_A), links.path(ONION_B)
        assert a == f"{short}/lmtp.d/{ONION_A.removesuffix('.onion')}"
        assert b != a and os.readlink(b) == str(sock)
        assert links.path(ONION_A) == a  # made once
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(a)  # Postfix's lmtp(8) connects to the link: the same listener
            conn, _ = server.accept()
            conn.close()
    assert links.disabled is None


def test_prepare_drops_stale_links_to_our_socket_only(short: Path) -> None:
    sock = short / "lmtp.sock"
    d = short / "lmtp.d"
    d.mkdir()
    (d / "old").symlink_to(sock)
    (d / "other").symlink_to(short / "elsewhere.sock")
    (d / "file").write_text("kept")
    OnionLinks(sock).prepare()
    assert sorted(p.name for p in d.iterdir()) == ["file", "other"]


def test_a_link_pointing_elsewhere_is_replaced(short: Path) -> None:
    sock = short / "lmtp.sock"
    links = OnionLinks(sock).prepare()
    label = ONION_A.removesuffix(".onion")
    (short / "lmtp.d" / label).symlink_to(short / "wrong.sock")
    assert os.readlink(links.path(ONION_A)) == str(sock)


def test_no_usable_directory_falls_back_to_the_shared_socket(short: Path, caplog) -> None:
    sock = short / "lmtp.sock"
    (short / "lmtp.d").write_text("a file where the directory should be")
    with caplog.at_level(logging.WARNING):
        links = OnionLinks(sock).prepare()
    assert links.disabled and links.path(ONION_A) is None
    assert "every onion is answered the shared socket" in caplog.text


def test_a_path_too_long_for_a_unix_socket_falls_back(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    links = OnionLinks(deep / "lmtp.sock").prepare()
    assert links.disabled and "longer than a unix socket path" in links.disabled
    assert links.path(ONION_A) is None and not (deep / "lmtp.d").exists()


def test_only_onion_labels_become_link_names(short: Path) -> None:
    links = OnionLinks(short / "lmtp.sock").prepare()
    for bad in ("../../etc/passwd.onion", "x.onion", "A" * 56 + ".onion", "a" * 55 + "/.onion"):
        assert links.path(bad) is None
    assert list((short / "lmtp.d").iterdir()) == []
