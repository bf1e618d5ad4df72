"""LMTP sessions of `torroute serve --lmtp` with a raw client, against the real daemon.

Postfix's lmtp(8) keeps a session for several transactions (it sends RSET after each one to
check the connection before caching it), so a session must survive any number of them, with or
without RSET, with input pipelined after the end of DATA; and sessions are bounded: they count
towards ``max_connections`` and an idle one is closed with 421.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
from support.daemon import wait_socket
from support.onions import ONION_A


class LmtpClient:
    """A blocking LMTP client that reads whole replies (multi-line ones included)."""

    def __init__(self, path: Path | str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""

    def reply(self) -> bytes:
        """One reply (all its lines); b"" if the daemon closed the connection first."""
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return b"".join(lines)  # what came before the close (maybe nothing)
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line + b"\r\n")
            if line[3:4] != b"-":
                return b"".join(lines)

    def replies(self, count: int) -> list[bytes]:
        return [self.reply() for _ in range(count)]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str) -> bytes:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True when the daemon has closed the connection (and sent nothing more)."""
        return self.buffer == b"" and self.sock.recv(65536) == b""

    def close(self) -> None:
        self.sock.close()


def message(n: int) -> bytes:
    return (f"From: <a@origin.test>\r\nSubject: message {n}\r\n"
            f"Message-ID: <{n}@origin.test>\r\n\r\nbody {n}\r\n.dot-stuffed line\r\n").encode()


def stuffed(n: int) -> bytes:
    return message(n).replace(b"\r\n.", b"\r\n..") + b".\r\n"


def write_config(directory: Path, onion: str, socks: tuple[str, int], dns_port: int,
                 serve: str = "") -> Path:
    (directory / "map.txt").write_text(f"pinned.test {onion}\nother.test {onion}\n")
    cfg = directory / "torroute.toml"
    cfg.write_text(f'[routing]\nmaps = ["{directory / "map.txt"}"]\n'
                   f'nameservers = ["127.0.0.1:{dns_port}"]\ndns_timeout = 1.0\n'
                   f'[tor]\nsocks = "{socks[0]}:{socks[1]}"\n[serve]\n{serve}')
    return cfg


@pytest.mark.testnet
@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])  # uvloop (installed) and asyncio's
def test_one_session_carries_many_transactions(testnet, onion_sink, dnsmasq_factory,
                                               daemon_factory, serve_dir,
                                               event_loop: str) -> None:
    """Four transactions on one LMTP connection, relayed through the real private Tor network
    to the onion's sink: Postfix's way (each reply awaited, RSET after the end of DATA), no
    RSET at all, the next transaction pipelined behind the '.', two recipients in one."""
    cfg = write_config(serve_dir, testnet.onion, testnet.socks_extended,
                       dnsmasq_factory([]).port, serve=f'event_loop = "{event_loop}"\n')
    sock = serve_dir / "lmtp.sock"
    daemon = daemon_factory("--config", str(cfg), "--lmtp", f"unix:{sock}", "-vv")
    wait_socket(str(sock), proc=daemon.proc)
    probes = daemon.wait_log("lmtp: connection closed").count("lmtp: connection opened")
    client = LmtpClient(sock)
    try:
        assert client.reply().startswith(b"220 ")
        assert client.command("LHLO postfix.test").startswith(b"250-")
        # 1: as Postfix does it, then RSET (which it sends before caching the connection)
        assert client.command("MAIL FROM:<a@origin.test>").startswith(b"250 ")
        assert client.command("RCPT TO:<u1@pinned.test>").startswith(b"250 ")
        assert client.command("DATA").startswith(b"354 ")
        client.send(stuffed(1))
        assert client.reply().startswith(b"250 2.0.0 ")
        assert client.command("RSET") == b"250 2.0.0 OK\r\n"
        assert client.command("NOOP") == b"250 2.0.0 OK\r\n"
        # 2: the next transaction straight after the first, no RSET
        assert client.command("MAIL FROM:<a@origin.test>").startswith(b"250 ")
        assert client.command("RCPT TO:<u2@pinned.test>").startswith(b"250 ")
        assert client.command("DATA").startswith(b"354 ")
        client.send(stuffed(2))
        assert client.reply().startswith(b"250 2.0.0 ")
        # 3: everything up to DATA pipelined; after the '.', transaction 4's commands too:
        # they arrive while 3 is relayed and must be answered after it, in order
        client.send(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<u3@pinned.test>\r\nDATA\r\n")
        assert [r[:4] for r in client.replies(3)] == [b"250 ", b"250 ", b"354 "]
        client.send(stuffed(3) + b"RSET\r\nMAIL FROM:<a@origin.test>\r\n"
                    b"RCPT TO:<u4@pinned.test>\r\nRCPT TO:<v4@other.test>\r\nDATA\r\n")
        got = client.replies(6)
        assert [r[:4] for r in got] == [b"250 ", b"250 ", b"250 ", b"250 ", b"250 ", b"354 "], got
        assert got[0].startswith(b"250 2.0.0 ")  # transaction 3's own answer comes first
        # 4: two recipients, one answer each; QUIT pipelined behind the '.'
        client.send(stuffed(4) + b"QUIT\r\n")
        assert [r[:10] for r in client.replies(3)] == [b"250 2.0.0 ", b"250 2.0.0 ",
                                                       b"221 2.0.0 "]
        assert client.closed()
    finally:
        client.close()
    received = onion_sink.sink.wait_for(4, timeout=60)
    time.sleep(0.5)  # nothing more (no duplicate) may follow
    received = onion_sink.sink.messages
    ids = sorted(m.message["Message-ID"] for m in received)
    assert ids == [f"<{n}@origin.test>" for n in (1, 2, 3, 4)], ids
    by_id = {m.message["Message-ID"]: m for m in received}
    assert sorted(by_id["<4@origin.test>"].rcpt_tos) == ["u4@pinned.test", "v4@other.test"]
    assert by_id["<1@origin.test>"].data.endswith(b"body 1\r\n.dot-stuffed line\r\n")
    # the path: one LMTP connection, five recipients relayed, one SMTP session through tor
    log = daemon.wait_log("lmtp rcpt=", count=5)
    assert log.count("lmtp: connection opened") == probes + 1, log[-3000:]
    assert log.count("reply='250 2.0.0") == 5
    assert len({m.peer for m in received}) == 1, [m.peer for m in received]
    assert daemon.error_lines() == []


def test_connections_count_towards_max_connections(daemon_factory, serve_dir) -> None:
    """``max_connections = 20``: LMTP sessions count with the lookup connections; the ones
    beyond the limit get a 421 greeting and are closed; a closed session frees its slot."""
    cfg = serve_dir / "torroute.toml"
    cfg.write_text("[serve]\nmax_connections = 20\n")
    sock = serve_dir / "lmtp.sock"
    daemon = daemon_factory("--config", str(cfg), "--lmtp", f"unix:{sock}")
    wait_socket(str(sock), proc=daemon.proc)
    time.sleep(0.2)  # the start-up probes of every listener have gone
    lookup = socket.create_connection(("127.0.0.1", daemon.tcp_port), timeout=10)
    clients = [LmtpClient(sock, timeout=10) for _ in range(30)]
    try:
        greetings = [c.reply() for c in clients]
        accepted = [c for c, g in zip(clients, greetings, strict=True) if g.startswith(b"220 ")]
        refused = [c for c, g in zip(clients, greetings, strict=True) if g.startswith(b"421 ")]
        assert len(accepted) == 19 and len(refused) == 11, greetings  # + the lookup one
        assert {g for g in greetings if g.startswith(b"421")} == {
            b"421 4.3.2 torroute: too many connections, try again later\r\n"}
        assert all(c.closed() for c in refused)
        for c in accepted:  # the accepted ones work
            assert c.command("LHLO t").startswith(b"250-")
        accepted[0].command("QUIT")
        accepted[0].close()
        time.sleep(0.2)
        again = LmtpClient(sock, timeout=10)
        clients.append(again)
        assert again.reply().startswith(b"220 ")  # the slot is free again
        late = LmtpClient(sock, timeout=10)
        clients.append(late)
        assert late.reply().startswith(b"421 ")
    finally:
        lookup.close()
        for c in clients:
            c.close()
    log = daemon.wait_log("lmtp: refusing connection", count=12)
    assert "lmtp: refusing connection (20 open" in log


def test_idle_session_is_closed_after_the_timeout(daemon_factory, serve_dir) -> None:
    """``lmtp_session_idle_timeout = 1``: a session without a command for 1 s gets
    ``421 4.4.2`` and is closed; one that keeps talking stays open."""
    cfg = serve_dir / "torroute.toml"
    cfg.write_text("[serve]\nlmtp_session_idle_timeout = 1.0\n")
    sock = serve_dir / "lmtp.sock"
    daemon = daemon_factory("--config", str(cfg), "--lmtp", f"unix:{sock}")
    wait_socket(str(sock), proc=daemon.proc)
    idle = LmtpClient(sock, timeout=10)
    busy: LmtpClient | None = None
    try:
        assert idle.reply().startswith(b"220 ")
        assert idle.command("LHLO t").startswith(b"250-")
        started = time.monotonic()
        assert idle.reply() == b"421 4.4.2 torroute: idle timeout (1s), closing\r\n"
        waited = time.monotonic() - started
        assert idle.closed()
        busy = LmtpClient(sock, timeout=10)
        assert busy.reply().startswith(b"220 ")
        for _ in range(6):  # 2.4 s of NOOPs, 0.4 s apart: never idle for 1 s
            assert busy.command("NOOP") == b"250 2.0.0 OK\r\n"
            time.sleep(0.4)
        assert busy.command("QUIT").startswith(b"221 ")
    finally:
        idle.close()
        if busy is not None:
            busy.close()
    assert 0.9 <= waited < 3.0, waited
    log = daemon.wait_log("lmtp: closing a session idle for 1s")
    assert log.count("lmtp: closing a session idle") == 1


def transaction(client: LmtpClient, rcpt: str, n: int) -> None:
    """Everything up to the end of DATA (the replies before it are checked)."""
    client.send(f"LHLO t\r\nMAIL FROM:<a@origin.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    assert [r[:4] for r in client.replies(4)] == [b"250-", b"250 ", b"250 ", b"354 "]
    client.send(stuffed(n))


@pytest.mark.parametrize("drain", ["answered", "cancelled"])
def test_sigterm_drains_lmtp_sessions(daemon_factory, serve_dir, fake_socks_factory,
                                      drain: str) -> None:
    """SIGTERM: an idle session gets 421 at once; one relaying a message gets its reply first
    (here the relay's own 451 when tor's SocksPort stays silent past connect_timeout), then
    421; past drain_timeout the relay is cancelled and the session dropped without a reply
    (the message stays in Postfix's queue, nothing was sent).  The daemon exits 0."""
    socks = fake_socks_factory()  # fake: a SocksPort that accepts and never answers
    socks.reply = "silent"
    answered = drain == "answered"
    cfg = write_config(serve_dir, ONION_A, socks.address, 9,  # DNS unused: a pin
                       serve=f"drain_timeout = {10 if answered else 1}\n")
    cfg.write_text(cfg.read_text() + f"[deliver]\nconnect_timeout = {1.5 if answered else 60}\n")
    sock = serve_dir / "lmtp.sock"
    daemon = daemon_factory("--config", str(cfg), "--lmtp", f"unix:{sock}")
    wait_socket(str(sock), proc=daemon.proc)
    idle, busy = LmtpClient(sock, timeout=30), LmtpClient(sock, timeout=30)
    try:
        assert idle.reply().startswith(b"220 ") and busy.reply().startswith(b"220 ")
        assert idle.command("LHLO t").startswith(b"250-")
        transaction(busy, "u@pinned.test", 1)
        deadline = time.monotonic() + 10
        while not socks.requests:  # the relay waits for tor's SOCKS reply now
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert idle.reply() == b"421 4.3.2 torroute: shutting down\r\n" and idle.closed()
        assert time.monotonic() - started < 1.0
        if answered:
            reply = busy.reply()
            assert reply.startswith(b"451 4.4."), reply
            assert busy.reply() == b"421 4.3.2 torroute: shutting down\r\n"
        else:
            assert busy.reply() == b""  # dropped: no reply, so Postfix defers and retries
        assert busy.closed()
        waited = time.monotonic() - started
    finally:
        idle.close()
        busy.close()
    assert daemon.proc.wait(15) == 0
    assert (1.2 < waited < 8) if answered else (0.8 < waited < 5), waited
    log = daemon.log()
    assert ("lmtp: relay cancelled at shutdown" in log) is not answered
    assert socks.requests[0][1] == ONION_A
