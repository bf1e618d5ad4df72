"""`torroute proxy` as a real process without the Tor network: the fail-closed answers that
need no onion (no onion route, tor down), the session bound, the loopback-only rule, inetd
with stderr on the socket (xinetd), and the open-relay probe's verdict on it."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support.onions import ONION_A
from support.paths import shared_tmpdir
from support.proxy import ENV, ProxyRun, proxy_command

from torroute.testing.ports import free_port
from torroute.tor.relay_probe import probe_relay
from torroute.tor.torrc import PortMapping


@pytest.fixture
def workdir():
    import shutil

    path = shared_tmpdir("torroute-proxy-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def proxies(workdir: Path):
    """``make(*args, inetd=False)`` -> a started ProxyRun; logs checked, all stopped after."""
    made: list[ProxyRun] = []

    def make(*args: str, inetd: bool = False) -> ProxyRun:
        run = ProxyRun(workdir, list(args), inetd=inetd).start()
        made.append(run)
        return run

    yield make
    for run in made:
        run.stop()
        if not run.expect_errors:
            run.check_log()


class Recorder:
    """A TCP port standing in for tor's SocksPort that only counts who connects."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def socks_recorder():
    rec = Recorder()
    yield rec
    rec.close()


def read_reply(f) -> bytes:
    out = b""
    while True:
        line = f.readline()
        out += line
        if not line or line[3:4] != b"-":
            return out


def handshake(port: int, line: str, timeout: float = 60) -> tuple[bytes, bytes, bytes]:
    """The proxy's greeting, its answer to ``line``, and what came after it until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        f = s.makefile("rb")
        greeting = read_reply(f)
        s.sendall(line.encode() + b"\r\n")
        reply = read_reply(f)
        rest = f.read()
    return greeting, reply, rest


@pytest.mark.parametrize("inetd", [False, True], ids=["listen", "inetd"])
def test_no_onion_route_is_421_and_tor_is_never_asked(inetd, proxies, dnsmasq_factory,
                                                      socks_recorder) -> None:
    dns = dnsmasq_factory([], local_domains=["example"])
    proxy = proxies("--nameserver", f"127.0.0.1:{dns.port}",
                    "--tor-socks", f"127.0.0.1:{socks_recorder.port}", inetd=inetd)
    greeting, reply, rest = handshake(proxy.port, "EHLO me.onion.test plain.example")
    assert greeting == b"220 localhost ESMTP torroute proxy\r\n"
    assert reply == (b"421 4.4.4 torroute proxy: plain.example: no onion route (no SRV record "
                     b"(NXDOMAIN)); the proxy never uses the clear net\r\n")
    assert rest == b""  # closed after the 421
    assert socks_recorder.accepted == 0  # not even tor was contacted
    log = proxy.wait_log("EHLO me.onion.test -> plain.example: plain.example: no onion route")
    assert "WARNING" in log


def test_tor_down_is_421(proxies) -> None:
    closed = free_port()
    proxy = proxies("--tor-socks", f"127.0.0.1:{closed}")
    _, reply, _ = handshake(proxy.port, f"EHLO me.onion.test {ONION_A}")
    assert reply.startswith(b"421 4.4.1 torroute proxy: tor SocksPort 127.0.0.1:") and \
        b"unreachable" in reply, reply


def test_usage_errors_before_ehlo(proxies, socks_recorder) -> None:
    proxy = proxies("--tor-socks", f"127.0.0.1:{socks_recorder.port}")
    with socket.create_connection(("127.0.0.1", proxy.port), 30) as s:
        f = s.makefile("rb")
        read_reply(f)
        s.sendall(b"EHLO onlyaname\r\n")
        assert read_reply(f).startswith(b"501 5.5.4 expected EHLO <local-name> <destination>")
        s.sendall(b"QUIT\r\n")
        assert read_reply(f).startswith(b"221 ")
    assert socks_recorder.accepted == 0


def test_max_sessions(proxies, socks_recorder) -> None:
    proxy = proxies("--max-sessions", "1", "--tor-socks", f"127.0.0.1:{socks_recorder.port}")
    proxy.wait_log("no EHLO: client closed the connection")  # start()'s readiness probe
    with socket.create_connection(("127.0.0.1", proxy.port), 30) as first:
        assert first.makefile("rb").readline().startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", proxy.port), 30) as second:
            f = second.makefile("rb")
            assert f.readline() == (b"421 4.3.2 torroute proxy: too many sessions, try "
                                    b"again later\r\n")
            assert f.read() == b""
    # the first session is gone: the next one is served again
    deadline = time.monotonic() + 10
    while True:
        greeting, _, _ = handshake(proxy.port, "QUIT")
        if greeting.startswith(b"220 ") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert greeting.startswith(b"220 ")
    assert "refused: 1 sessions already" in proxy.log()


def test_client_timeout(proxies) -> None:
    proxy = proxies("--command-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", proxy.port), 30) as s:
        f = s.makefile("rb")
        read_reply(f)
        assert read_reply(f) == b"421 4.4.2 torroute proxy: no EHLO from the client\r\n"
        assert f.read() == b""


@pytest.mark.parametrize("listen", ["0.0.0.0:2526", "192.0.2.1:2526"])
def test_listen_beyond_loopback_refused(listen) -> None:
    r = subprocess.run(proxy_command("--listen", listen), capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert r.returncode == 78, r
    assert "not a loopback address" in r.stderr and "--allow-remote" in r.stderr


def test_mode_required_and_bad_flags() -> None:
    r = subprocess.run(proxy_command(), capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 64 and "give --inetd or --listen" in r.stderr
    r = subprocess.run(proxy_command("--inetd", "--listen", "127.0.0.1:1"),
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 64
    r = subprocess.run(proxy_command("--inetd", "--tor-dns", "127.0.0.1:9053"),
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 64  # the proxy never asks tor's DNSPort: no such flag
    r = subprocess.run(proxy_command("--listen", "127.0.0.1:2526", "--max-sessions", "0"),
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 78 and "--max-sessions" in r.stderr


def test_config_file_proxy_table(workdir: Path, socks_recorder) -> None:
    port = free_port()
    conf = workdir / "torroute.toml"
    conf.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\nbanner_name = "mx.proxy.test"\n'
                    f'[tor]\nsocks = "127.0.0.1:{socks_recorder.port}"\n')
    log = open(workdir / "conf.log", "w")
    proc = subprocess.Popen(proxy_command("--config", str(conf)), stdout=log, stderr=log,
                            env=ENV)
    try:
        from support.daemon import wait_socket

        wait_socket(("127.0.0.1", port), proc=proc)
        greeting, _, _ = handshake(port, "QUIT")
        assert greeting == b"220 mx.proxy.test ESMTP torroute proxy\r\n"
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        log.close()
    conf.write_text("[proxy]\nlisten = \"127.0.0.1:1\"\nnonsense = 1\n")
    r = subprocess.run(proxy_command("--config", str(conf)), capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert r.returncode == 78 and "unknown setting proxy.nonsense" in r.stderr


def test_inetd_with_stderr_on_the_socket(dnsmasq_factory, socks_recorder) -> None:
    """xinetd hands the connection over as fds 0, 1 and 2: nothing but SMTP may reach the
    client, even with -vv (logging goes to syslog then)."""
    dns = dnsmasq_factory([], local_domains=["example"])
    a, b = socket.socketpair()
    with a, b:
        proc = subprocess.Popen(
            proxy_command("--inetd", "-vv", "--nameserver", f"127.0.0.1:{dns.port}",
                          "--tor-socks", f"127.0.0.1:{socks_recorder.port}"),
            stdin=b.fileno(), stdout=b.fileno(), stderr=b.fileno(), env=ENV)
        b.close()
        a.settimeout(60)
        f = a.makefile("rb")
        assert read_reply(f) == b"220 localhost ESMTP torroute proxy\r\n"
        a.sendall(b"EHLO me.onion.test plain.example\r\n")
        assert read_reply(f).startswith(b"421 4.4.4 ")
        assert f.read() == b""
        assert proc.wait(30) == 0


def test_inetd_on_pipes(dnsmasq_factory, socks_recorder) -> None:
    """stdin/stdout may be two pipes (a wrapper like tcpserver, or a test harness)."""
    dns = dnsmasq_factory([], local_domains=["example"])
    r = subprocess.run(
        proxy_command("--inetd", "--nameserver", f"127.0.0.1:{dns.port}",
                      "--tor-socks", f"127.0.0.1:{socks_recorder.port}"),
        input=b"EHLO me.onion.test plain.example\r\n", capture_output=True, env=ENV,
        timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"220 localhost ESMTP torroute proxy\r\n421 4.4.4 ")
    assert b"no onion route" in r.stderr and b"Traceback" not in r.stderr


def test_open_relay_probe_refuses_an_onion_pointing_at_the_proxy(proxies,
                                                                  socks_recorder) -> None:
    """The proxy carries anyone's mail into tor: an onion service must never point at it.  The
    probe that guards HiddenServicePort targets gets no MAIL through and refuses it."""
    proxy = proxies("--tor-socks", f"127.0.0.1:{socks_recorder.port}")
    verdict = probe_relay(PortMapping(25, f"127.0.0.1:{proxy.port}"))
    assert verdict.refuse and verdict.verdict == "inconclusive", verdict
    assert socks_recorder.accepted == 0
