"""A private Postfix instance for delivery tests, an SMTP sink, and two named fakes.

Real parts: ``PostfixInstance`` (Debian's Postfix with its own config/queue/data directories in
a 0755 directory, smtpd on 127.0.0.1 only, logging to a file) and ``SmtpSink`` (aiosmtpd, with
SMTPUTF8 and PIPELINING, answering per recipient as told).

Fakes, only for faults real parts cannot produce on demand:
``FakeSocksServer`` (tor's extended SOCKS errors 0xF0..0xF7, a silent SocksPort) and
``FakeSmtpServer`` (a connection reset in the middle of DATA, a server that never answers).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from realparts import free_port, shared_tmpdir, wait_tcp

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"
REPO = Path(__file__).resolve().parent.parent
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"  # Debian's
VENV_TORROUTE = Path("/opt/torroute/bin/torroute")  # world-readable: pipe runs it as nobody


# ---------------------------------------------------------------------------------------------
# a real SMTP sink


@dataclass
class SinkMessage:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    data: bytes
    arrived: float = field(default_factory=time.monotonic)


class SmtpSink:
    """aiosmtpd on 127.0.0.1 storing raw messages; ``reject(rcpt, reply)`` / ``data_reply``."""

    def __init__(self, smtputf8: bool = True, pipelining: bool = True) -> None:
        self.messages: list[SinkMessage] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply: str | None = None
        self.ehlo_names: list[str] = []
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self._cv = threading.Condition()
        self._controller = None
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> SmtpSink:
        from aiosmtpd.controller import Controller

        self.port = free_port()
        self._controller = Controller(_SinkHandler(self), hostname="127.0.0.1", port=self.port,
                                      server_hostname="sink.test.invalid",
                                      enable_SMTPUTF8=self.smtputf8,
                                      data_size_limit=64 * 1024 * 1024, ready_timeout=10)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def reject(self, rcpt: str, reply: str) -> None:
        self.rcpt_replies[rcpt.lower()] = reply

    def reset(self) -> None:
        """Accept everything again and forget what arrived."""
        with self._cv:
            self.messages.clear()
            self.rcpt_replies.clear()
            self.data_reply = None
            self.ehlo_names.clear()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[SinkMessage]:
        with self._cv:
            if not self._cv.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"{len(self.messages)} of {count} messages at the sink")
            return list(self.messages)

    def _store(self, message: SinkMessage) -> None:
        with self._cv:
            self.messages.append(message)
            self._cv.notify_all()


class _SinkHandler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802
        self.sink.ehlo_names.append(hostname)
        session.host_name = hostname
        if self.sink.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        reply = self.sink.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.sink.data_reply:
            return self.sink.data_reply
        data = envelope.original_content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self.sink._store(SinkMessage(envelope.mail_from, list(envelope.rcpt_tos),
                                     list(envelope.mail_options), data))
        return "250 2.0.0 stored"


# ---------------------------------------------------------------------------------------------
# fakes for faults


class FakeSocksServer:  # fake: tor's 0xF0..0xF7 replies and a silent SocksPort, on demand
    """A SOCKS5 server on 127.0.0.1.  ``reply`` = None forwards every CONNECT to ``target``
    (a loopback SMTP server) and records the requested host; an int answers with that SOCKS
    reply code; ``"silent"`` accepts and never answers."""

    def __init__(self, target: tuple[str, int] | None = None) -> None:
        self.target = target
        self.reply: int | str | None = None
        self.requests: list[tuple[int, str, int]] = []  # (atyp, host, port)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = _recv_exact(conn, 2)
            _recv_exact(conn, head[1])
            conn.sendall(b"\x05\x00")
            ver, cmd, _, atyp = _recv_exact(conn, 4)
            if atyp == 3:
                host = _recv_exact(conn, _recv_exact(conn, 1)[0]).decode()
            elif atyp == 1:
                host = socket.inet_ntoa(_recv_exact(conn, 4))
            else:
                host = socket.inet_ntop(socket.AF_INET6, _recv_exact(conn, 16))
            (port,) = struct.unpack(">H", _recv_exact(conn, 2))
            self.requests.append((atyp, host, port))
            if self.reply == "silent":
                self._stop.wait(600)
                return
            if isinstance(self.reply, int):
                conn.sendall(bytes([5, self.reply, 0, 1, 0, 0, 0, 0, 0, 0]))
                return
            assert self.target is not None
            upstream = socket.create_connection(self.target, timeout=10)
            for sock in (conn, upstream):  # no Nagle: a relay must not add delayed-ACK waits
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(bytes([5, 0, 0, 1, 127, 0, 0, 1, 0, 0]))
            _relay(conn, upstream)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass


class FakeSmtpServer:  # fake: resets the connection mid-DATA or never answers, on demand
    """A scripted SMTP server: ``mode`` = "reset-in-data" (accepts up to DATA's 354, reads
    some of the message, then RSTs), "silent" (never sends the greeting), "garbage"."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.received = bytearray()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.mode == "silent":
                self._stop.wait(600)
                return
            if self.mode == "garbage":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                conn.recv(1024)
                return
            conn.sendall(b"220 fake ESMTP\r\n")
            reader = conn.makefile("rb")
            while True:
                line = reader.readline()
                if not line:
                    return
                self.received += line
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-fake\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    self.received += reader.read(1000)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))  # close -> RST
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("eof")
        data += chunk
    return data


def _relay(a: socket.socket, b: socket.socket) -> None:
    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join(30)
    b.close()


# ---------------------------------------------------------------------------------------------
# a private Postfix instance

MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
lmtp      unix  -       -       n       -       -       lmtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
{torroute_service}
{extra}"""
PLUGIN_MASTER_CF = REPO / "plugins" / "postfix_pipe" / "master.cf"


def torroute_service(deliver_command: str, config: Path, user: str = "nobody") -> str:
    """The shipped plugins/postfix_pipe/master.cf entry, with this instance's user, program
    and configuration file: the tests run what the documentation tells users to install."""
    lines = [ln for ln in PLUGIN_MASTER_CF.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    text = "\n".join(lines)
    for old, new in (("user=torroute", f"user={user}"),
                     ("/opt/torroute/bin/torroute deliver",
                      f"{deliver_command} --config={config}")):
        assert old in text, f"{PLUGIN_MASTER_CF} changed: no {old!r}"
        text = text.replace(old, new)
    return text

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
myhostname = postfix-test.localdomain
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
alias_maps =
alias_database =
biff = no
maillog_file = {dir}/maillog
maillog_file_prefixes = /tmp
smtputf8_enable = yes
message_size_limit = 30000000
transport_retry_time = 5s
queue_run_delay = 2s
minimal_backoff_time = 2s
maximal_backoff_time = 4s
delay_warning_time = 0
default_transport = smtp:[127.0.0.1]:{clear_port}
transport_maps = {transport_maps}
torroute_destination_recipient_limit = {recipient_limit}
{extra}
"""


@dataclass
class PostfixInstance:
    """Postfix with its own directories under ``workdir`` (0755), smtpd on 127.0.0.1:port.

    ``default_transport`` goes to ``clear_port`` (a sink standing for the clear net: nothing
    for an onion route may ever arrive there)."""

    workdir: Path
    transport_maps: str
    clear_port: int
    deliver_config: str = ""  # TOML for torroute deliver (the pipe reads it as nobody)
    recipient_limit: int = 1
    main_extra: str = ""
    master_extra: str = ""
    deliver_command: str = f"{VENV_TORROUTE} deliver"  # what master.cf argv= runs
    #: extra daemon programs (name -> shell script) for master.cf's command column, which is
    #: relative to daemon_directory: they get a private one (symlinks to Debian's + these)
    daemon_wrappers: dict[str, str] = field(default_factory=dict)
    port: int = 0
    started: bool = False
    _log_offset: int = field(default=0, repr=False)

    @property
    def confdir(self) -> Path:
        return self.workdir / "etc"

    @property
    def config_path(self) -> Path:
        return self.workdir / "torroute.toml"

    @property
    def maillog(self) -> Path:
        return self.workdir / "maillog"

    def write(self) -> None:
        self.port = self.port or free_port()
        self.confdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "queue").mkdir(exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        shutil.chown(data, "postfix", "postfix")
        self.config_path.write_text(self.deliver_config)
        os.chmod(self.config_path, 0o644)
        extra = self.main_extra
        if self.daemon_wrappers:
            libexec = self.workdir / "libexec"
            libexec.mkdir(exist_ok=True)
            for program in Path(DAEMON_DIRECTORY).iterdir():
                link = libexec / program.name
                if not link.exists():
                    link.symlink_to(program)
            for name, script in self.daemon_wrappers.items():
                (libexec / name).write_text(script)
                os.chmod(libexec / name, 0o755)
            extra += f"\ndaemon_directory = {libexec}\n"
        main_cf = self.confdir / "main.cf"
        main_cf.write_text(MAIN_CF.format(
            dir=self.workdir, clear_port=self.clear_port, transport_maps=self.transport_maps,
            recipient_limit=self.recipient_limit, extra=extra))
        (self.confdir / "master.cf").write_text(MASTER_CF.format(
            host="127.0.0.1", port=self.port,
            torroute_service=torroute_service(self.deliver_command, self.config_path),
            extra=self.master_extra))
        old = time.time() - 3600  # a fresh main.cf stalls every Postfix command ~1.8 s
        for name in ("main.cf", "master.cf"):
            os.utime(self.confdir / name, (old, old))

    def run(self, *args: str, check: bool = True, timeout: float = 60
            ) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{args} -> {result.returncode}\n{result.stdout}{result.stderr}"
                               f"\n--- maillog ---\n{self.log()[-3000:]}")
        return result

    def start(self) -> PostfixInstance:
        self.write()
        self.run(POSTFIX, "-c", str(self.confdir), "check")
        self.run(POSTFIX, "-c", str(self.confdir), "start")
        self.started = True
        wait_tcp(self.port, 20, what="postfix smtpd")
        return self

    def master_pid(self) -> int | None:
        try:
            return int((self.workdir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """`postfix stop`, then wait for this instance's master to go (kill it if it won't)."""
        if not self.started:
            return
        pid = self.master_pid()
        self.run(POSTFIX, "-c", str(self.confdir), "stop", check=False)
        self.started = False
        deadline = time.monotonic() + 10
        while pid and time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if state in ("Z", "X"):  # exited; waiting for its parent (init) to reap it
                return
            time.sleep(0.05)
        if pid:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def reload(self) -> None:
        self.run(POSTFIX, "-c", str(self.confdir), "reload")

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queue(self) -> list[dict]:
        """``postqueue -j``: one dict per queued message (recipients with delay_reason)."""
        out = self.run(POSTQUEUE, "-c", str(self.confdir), "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        self.run(POSTQUEUE, "-c", str(self.confdir), "-f")

    def delete_all(self) -> None:
        self.run(POSTSUPER, "-c", str(self.confdir), "-d", "ALL", check=False)

    def submit(self, sender: str, recipients: list[str], message: bytes,
               options: tuple[str, ...] = ()) -> None:
        """Hand a message to this Postfix over SMTP (like any client would)."""
        import smtplib

        if b"\r\n" not in message:  # smtplib fixes line ends of str only; bytes "x\n" would
            message = message.replace(b"\n", b"\r\n")  # gain a blank line at the end
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test",
                          timeout=60) as client:
            client.sendmail(sender, recipients, message, mail_options=list(options))

    def wait(self, predicate: Callable[[], object], timeout: float = 60.0,
             what: str = "condition") -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{what} not reached in {timeout:g}s; queue={self.queue()}\n"
                           f"--- {self.config_path} ---\n{self.config_path.read_text()}\n"
                           f"--- maillog ---\n{self.log()[-4000:]}")

    def wait_log(self, needle: str, timeout: float = 60.0) -> str:
        return str(self.wait(lambda: needle in self.log() and self.log(), timeout,
                             f"{needle!r} in maillog"))

    def wait_queued(self, count: int = 1, timeout: float = 60.0) -> list[dict]:
        """Wait until ``count`` messages are in the queue with a delay_reason (deferred)."""
        def deferred() -> list[dict]:
            q = self.queue()
            done = [m for m in q if m.get("queue_name") == "deferred"
                    and all(r.get("delay_reason") for r in m["recipients"])]
            return q if len(done) >= count else []
        return list(self.wait(deferred, timeout, f"{count} deferred message(s)"))

    def wait_empty(self, timeout: float = 60.0) -> None:
        self.wait(lambda: not self.queue(), timeout, "an empty queue")


@pytest.fixture
def postfix_dir() -> Iterator[Path]:
    path = shared_tmpdir("torroute-postfix-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clear_sink() -> Iterator[SmtpSink]:
    """A sink standing for the clear net (Postfix's default_transport): must stay empty of
    onion-routed mail."""
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def postfix_factory(postfix_dir: Path, clear_sink: SmtpSink) -> Iterator:
    """``make(transport_maps, deliver_config="", **kw)`` -> a started PostfixInstance."""
    if not Path(POSTFIX).exists():
        pytest.fail("postfix is not installed: run scripts/install-deps.sh")
    made: list[PostfixInstance] = []

    def make(transport_maps: str, deliver_config: str = "", name: str = "pf",
             **kwargs) -> PostfixInstance:
        workdir = postfix_dir / f"{name}{len(made)}"
        workdir.mkdir(mode=0o755)
        pf = PostfixInstance(workdir, transport_maps, clear_sink.port, deliver_config,
                             **kwargs)
        made.append(pf)
        return pf.start()

    yield make
    for pf in made:
        pf.stop()


@pytest.fixture
def fake_socks_factory() -> Iterator:
    made: list[FakeSocksServer] = []

    def make(target: tuple[str, int] | None = None) -> FakeSocksServer:
        server = FakeSocksServer(target)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def fake_smtp_factory() -> Iterator:
    made: list[FakeSmtpServer] = []

    def make(mode: str) -> FakeSmtpServer:
        server = FakeSmtpServer(mode)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()
