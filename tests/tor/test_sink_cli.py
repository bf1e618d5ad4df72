"""``torroute sink --listen`` as a real process on loopback (behind an existing
HiddenServicePort): STARTTLS with a key it makes, the deadlines against slow clients, session
and message rates, the session limit, a unix socket, bad flags, SIGTERM; real smtplib clients.
The onion paths (--ephemeral-key, floods over tor) are tests/testnet/test_sink.py."""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from torroute.testing.ports import free_port
from torroute.tor.relay_probe import probe_relay
from torroute.tor.torrc import PortMapping

SINK = [sys.executable, "-m", "torroute.cli", "sink"]
DOMAIN = "inbox.example"
MESSAGE = b"From: a@sender.test\r\nTo: me@inbox.example\r\nSubject: t\r\n\r\nhello\r\n"


@dataclass
class Sink:
    proc: subprocess.Popen
    port: int
    maildir: Path
    log: Path

    def new(self) -> list[Path]:
        return sorted((self.maildir / "new").iterdir())

    def smtp(self, timeout: float = 10) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=timeout)
        client.ehlo("client.test")
        return client

    def raw(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        assert sock.recv(512).startswith(b"220 ")
        return sock

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_line(out: Path, proc: subprocess.Popen, prefix: str, log: Path,
              timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out.read_text().splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            pytest.fail(f"sink exited {proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"no {prefix!r} line: {log.read_text()}")


@pytest.fixture
def sink_factory(tmp_path: Path):
    made: list[Sink] = []

    def make(*extra: str, listen: str | None = None) -> Sink:
        n = len(made)
        port = free_port()
        maildir, log, out = tmp_path / f"M{n}", tmp_path / f"sink{n}.log", tmp_path / f"o{n}"
        cmd = [*SINK, "--maildir", str(maildir), "--listen", listen or f"127.0.0.1:{port}",
               "--domain", DOMAIN, *extra]
        proc = subprocess.Popen(cmd, stdout=out.open("wb"), stderr=log.open("wb"),
                                stdin=subprocess.DEVNULL)
        wait_line(out, proc, "torroute sink: listening on", log)
        sink = Sink(proc, port, maildir, log)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        if sink.proc.poll() is None:
            sink.proc.send_signal(signal.SIGTERM)
            assert sink.proc.wait(20) == 0
        text = sink.log_text()
        assert "ERROR" not in text and "Traceback" not in text, text


def code_of(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(4096)


def test_delivers_refuses_relay_and_passes_the_relay_probe(sink_factory) -> None:
    sink = sink_factory()
    with sink.smtp() as client:
        assert client.sendmail("a@sender.test", ["me@inbox.example", "you@INBOX.example"],
                               MESSAGE) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            client.sendmail("a@sender.test", ["x@elsewhere.test"], MESSAGE)
        assert exc.value.recipients["x@elsewhere.test"][:1] == (550,)
    (path,) = sink.new()
    text = path.read_bytes()
    assert text.startswith(b"Return-Path: <a@sender.test>\nReceived: from client.test by ")
    assert text.endswith(b"Subject: t\n\nhello\n")
    assert probe_relay(PortMapping(25, f"127.0.0.1:{sink.port}")).verdict == "closed"
    log = sink.log_text()
    assert " stored " in log and "session peer=127.0.0.1 helo=client.test" in log


def test_starttls_with_a_self_signed_key_it_makes(sink_factory, tmp_path: Path) -> None:
    key, cert = tmp_path / "tls" / "key.pem", tmp_path / "tls" / "cert.pem"
    sink = sink_factory("--starttls", "--tls-key", str(key), "--tls-cert", str(cert),
                        "--hostname", "mx.inbox.example")
    assert key.stat().st_mode & 0o777 == 0o600 and cert.exists()
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    with sink.smtp() as client:
        assert client.has_extn("starttls")
        client.starttls(context=context)
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        assert client.sendmail("a@sender.test", ["me@inbox.example"], MESSAGE) == {}
    (path,) = sink.new()
    assert b"with ESMTPS" in path.read_bytes()
    # the same key is reused at the next start
    before = key.read_bytes()
    sink.proc.send_signal(signal.SIGTERM)
    assert sink.proc.wait(20) == 0
    sink_factory("--starttls", "--tls-key", str(key), "--tls-cert", str(cert))
    assert key.read_bytes() == before


def test_deadlines_against_slow_clients(sink_factory) -> None:
    sink = sink_factory("--idle-timeout", "1", "--command-timeout", "2", "--data-timeout", "3",
                        "--stress-idle", "0.5")
    started = time.monotonic()
    idle = sink.raw()
    assert idle.recv(512).startswith(b"421 4.4.2 idle timeout")
    assert 0.8 < time.monotonic() - started < 3
    # a byte every 0.5 s never makes a command: cut at the command deadline
    trickle = sink.raw()
    started = time.monotonic()
    got = b""
    for byte in b"EHLO slowly.example.test.and.more.bytes\r\n":
        try:
            trickle.send(bytes([byte]))
        except OSError:
            break
        time.sleep(0.5)
        trickle.setblocking(False)
        try:
            got += trickle.recv(512)
        except BlockingIOError:
            pass
        trickle.setblocking(True)
        if got:
            break
    assert got.startswith(b"421 4.4.2 command timeout"), got
    assert time.monotonic() - started < 4
    # DATA that never ends: cut at the data deadline, nothing stored
    slow = sink.raw()
    for line in (b"EHLO c.test\r\n", b"MAIL FROM:<a@s.test>\r\n", b"RCPT TO:<me@inbox.example>\r\n",
                 b"DATA\r\n"):
        slow.sendall(line)
        time.sleep(0.1)
    slow.recv(4096)
    started = time.monotonic()
    try:
        while time.monotonic() - started < 6:
            slow.sendall(b"x" * 10 + b"\r\n")
            time.sleep(0.3)
    except OSError:
        pass
    assert 2.5 < time.monotonic() - started < 5
    assert not sink.new()
    log = sink.log_text()
    assert "end=idle timeout" in log and "end=command timeout" in log and "end=data timeout" in log


def test_session_rate_and_limits_refuse_with_421_and_451(sink_factory) -> None:
    sink = sink_factory("--client-sessions", "3", "--rate-window", "3",
                        "--max-messages-per-session", "2", "--global-messages", "3")
    for _ in range(3):
        sink.raw().close()
    refused = socket.create_connection(("127.0.0.1", sink.port), timeout=5)
    assert refused.recv(512).startswith(b"421 4.7.0 too many connections")
    time.sleep(3.2)  # the window moved on
    with sink.smtp() as client:
        assert client.sendmail("a@s.test", ["me@inbox.example"], MESSAGE) == {}
        assert client.sendmail("a@s.test", ["me@inbox.example"], MESSAGE) == {}
        with pytest.raises(smtplib.SMTPSenderRefused) as exc:
            client.sendmail("a@s.test", ["me@inbox.example"], MESSAGE)
        assert exc.value.smtp_code == 451
    with sink.smtp() as client:  # a new session: the global rate (3 per window) is spent
        assert client.sendmail("a@s.test", ["me@inbox.example"], MESSAGE) == {}
        with pytest.raises(smtplib.SMTPSenderRefused) as exc:
            client.sendmail("a@s.test", ["me@inbox.example"], MESSAGE)
        assert exc.value.smtp_code == 451 and b"too fast" in exc.value.smtp_error
    assert len(sink.new()) == 3
    assert sink.proc.poll() is None


def test_defaults_allow_ten_sessions_in_five_seconds(sink_factory) -> None:
    sink = sink_factory()
    for _ in range(12):
        with sink.smtp() as client:
            assert client.sendmail("a@s.test", ["me@inbox.example"], MESSAGE) == {}
    assert len(sink.new()) == 12


def test_max_sessions_421_and_room_made_from_idle_ones(sink_factory) -> None:
    sink = sink_factory("--max-sessions", "2", "--stress-idle", "1")
    busy = [sink.raw(), sink.raw()]
    third = socket.create_connection(("127.0.0.1", sink.port), timeout=5)
    assert third.recv(512).startswith(b"421 4.3.2 too many sessions")
    time.sleep(1.3)  # now both are idle past --stress-idle: one makes room
    with sink.smtp() as client:
        assert client.sendmail("a@s.test", ["me@inbox.example"], MESSAGE) == {}
    closed = 0
    for sock in busy:
        sock.settimeout(2)
        try:
            data = sock.recv(512)
        except OSError:
            data = b""
        closed += data.startswith(b"421") or data == b""
    assert closed >= 1
    assert "closed for a new session" in sink.log_text()


def test_unix_socket_listener(sink_factory, tmp_path: Path) -> None:
    path = tmp_path / "sink.sock"
    sink_factory(listen=f"unix:{path}")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.settimeout(5)
        assert sock.recv(512).startswith(b"220 ")
        assert code_of(sock, b"EHLO c.test\r\n").startswith(b"250-")
        assert code_of(sock, b"QUIT\r\n").startswith(b"221")


@pytest.mark.parametrize("args, code, words", [
    (["--listen", "0.0.0.0:2525"], 78, "--allow-remote"),
    (["--listen", "127.0.0.1:2525", "--max-messages", "0"], 78, "--max-messages"),
    (["--listen", "127.0.0.1:2525", "--max-message-size", "lots"], 78, "--max-message-size"),
    (["--listen", "127.0.0.1:2525", "--onion-dir", "/x", "--ephemeral-key", "/y"], 64, ""),
    ([], 78, "--ephemeral-key"),
])
def test_bad_flags_refuse_to_start(tmp_path: Path, args, code, words) -> None:
    r = subprocess.run([*SINK, "--maildir", str(tmp_path / "M"), *args], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == code, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "M").exists()


def test_maildir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "M").write_text("not a dir")
    r = subprocess.run([*SINK, "--maildir", str(tmp_path / "M"), "--listen",
                        f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 78 and "maildir" in r.stderr and "Traceback" not in r.stderr


def test_a_client_that_never_reads_is_cut_off(sink_factory) -> None:
    sink = sink_factory("--idle-timeout", "1")
    sock = sink.raw()
    sock.settimeout(3)
    chunk = b"NOOP\r\n" * 20000
    started = time.monotonic()
    try:
        while time.monotonic() - started < 20:
            sock.sendall(chunk)  # and never a recv: the replies pile up on the sink's side
    except OSError:  # reset by the sink, or our send blocked on a sink that stopped reading
        pass
    deadline = time.monotonic() + 10
    while "client does not read" not in sink.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "end=client does not read our replies" in sink.log_text()
    with sink.smtp() as client:  # and the sink goes on
        assert client.noop()[0] == 250


def test_body_over_the_limit_without_size_is_552_and_not_stored(sink_factory) -> None:
    sink = sink_factory("--max-message-size", "1K")
    sock = sink.raw()
    sock.sendall(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<me@inbox.example>\r\n"
                 b"DATA\r\n")
    got = b""
    while got.count(b"\r\n") < 9:  # EHLO (7 lines), MAIL, RCPT, DATA
        got += sock.recv(4096)
    sock.sendall(b"x" * 5000 + b"\r\n.\r\nQUIT\r\n")
    rest = b""
    while not rest.endswith(b"221 2.0.0 bye\r\n"):
        rest += sock.recv(4096)
    assert rest.startswith(b"552 5.3.4 message too big\r\n")
    assert not sink.new() and not list((sink.maildir / "tmp").iterdir())
