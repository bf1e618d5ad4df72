"""Daemon faults: garbage floods, oversized requests, drain on SIGTERM, bind rules, sockets."""

from __future__ import annotations

import grp
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import sys
import time

import pytest
from support.onions import ONION_A, ONION_B

from torroute.protocols import eximline, socketmap, tcptable
from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port

SRV = "_onion-mx._tcp."


@pytest.fixture
def daemon(daemon_factory, serve_dir, dnsmasq_factory):
    dns = dnsmasq_factory([SrvRecord(SRV + "srv.test", ONION_A)])
    (serve_dir / "map.txt").write_text(f"pinned.test {ONION_B}\n")
    cfg = serve_dir / "torroute.toml"
    cfg.write_text(f'[routing]\nmaps = ["map.txt"]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                   'dns_timeout = 1.0\n[serve]\nmax_request = 1024\n')
    return daemon_factory("--config", str(cfg))


def connect(address) -> socket.socket:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    s = socket.socket(family)
    s.settimeout(10)
    s.connect(address)
    return s


def recv_until(s: socket.socket, done) -> bytes:
    data = b""
    while not done(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def garbage(rng: random.Random, kind: str) -> bytes:
    """One garbage request: random bytes, near-miss protocol text, oversized lines."""
    choice = rng.randrange(6)
    if choice == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if choice == 1:
        return b"get " + rng.randbytes(rng.randrange(0, 50)).replace(b"\n", b"") + b"\n"
    if choice == 2:
        return b"route " + bytes(rng.choice(b"%\r\x00 \x7f\xffa.") for _ in range(30)) + b"\n"
    if choice == 3:
        return b"%d:%s," % (rng.randrange(0, 40), rng.randbytes(rng.randrange(0, 40)))
    if choice == 4:
        return b"x" * rng.randrange(1000, 5000) + b"\n"
    return rng.choice([b"put a b\n", b"GET x\n", b"\n", b"0:,", b"99999999999:", b"route\n"])


def normal_query(daemon, kind: str) -> bytes:
    if kind == "socketmap":
        with connect(daemon.socketmap) as s:
            s.sendall(socketmap.encode_request("transport", "u@pinned.test"))
            return recv_until(s, lambda d: d.endswith(b","))
    if kind == "tcp_table":
        with connect(("127.0.0.1", daemon.tcp_port)) as s:
            s.sendall(tcptable.encode_get("u@pinned.test"))
            return recv_until(s, lambda d: d.endswith(b"\n"))
    with connect(daemon.exim) as s:
        s.sendall(eximline.encode_request("pinned.test"))
        s.shutdown(socket.SHUT_WR)
        return recv_until(s, lambda d: False)


@pytest.mark.parametrize("kind", ["socketmap", "tcp_table", "exim"])
def test_ten_thousand_garbage_requests_then_normal_query(daemon, kind: str) -> None:
    rng = random.Random(f"garbage-{kind}")
    address = {"socketmap": daemon.socketmap, "tcp_table": ("127.0.0.1", daemon.tcp_port),
               "exim": daemon.exim}[kind]
    sent = 0
    while sent < 10_000:
        # a new connection every 100 requests; some closed abruptly, some read first
        with connect(address) as s:
            for _ in range(100):
                try:
                    s.sendall(garbage(rng, kind))
                except (BrokenPipeError, ConnectionResetError):
                    break  # the daemon closed a hopeless (socketmap) stream: allowed
                finally:
                    sent += 1
            if rng.random() < 0.5:  # half-close and read every reply; else just drop it
                try:
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(65536):
                        pass
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass
    assert daemon.proc.poll() is None
    answer = normal_query(daemon, kind)
    if kind == "exim":
        assert answer.startswith(b"temp automap") or answer.startswith(b"127.")
    else:
        assert ONION_B.encode() in answer


def test_garbage_replies_are_protocol_errors_not_answers(daemon) -> None:
    with connect(("127.0.0.1", daemon.tcp_port)) as s:
        s.sendall(b"get %zz\nget u@pin%0Aned.test\nput k v\nget a%0D%0A%00%20b@pinned.test\n")
        lines = recv_until(s, lambda d: d.count(b"\n") >= 4).splitlines()
    assert [ln[:4] for ln in lines] == [b"400 ", b"500 ", b"400 ", b"200 "]
    assert lines[3] == f"200 torroute:[{ONION_B}]:25".encode()  # routed by domain, no echo
    assert all(b"\r" not in ln and b"\x00" not in ln for ln in lines)
    with connect(daemon.socketmap) as s:
        req = socketmap.encode_request("x", "u@pinned.test")
        s.sendall(b"5:hello," + req[:10])  # a request without a key, then one in two pieces
        s.sendall(req[10:])
        data = recv_until(s, lambda d: d.count(b",") >= 2 and d.endswith(b","))
    first, rest = socketmap.decode_netstring(data, 10000)
    assert first.startswith(b"PERM ")
    assert socketmap.decode_netstring(rest, 10000)[0].startswith(b"OK torroute:[")


def test_oversized_socketmap_request_is_perm_and_closed(daemon) -> None:
    with connect(daemon.socketmap) as s:
        s.sendall(b"5000:" + b"a" * 100)
        data = recv_until(s, lambda d: False)  # the daemon closes after the reply
    payload, rest = socketmap.decode_netstring(data, 10000)
    assert payload.startswith(b"PERM malformed request") and rest == b""


def test_pipelined_requests_answered_in_order(daemon) -> None:
    keys = ["u@srv.test", "u@pinned.test", "u@nosrv.test", "u@pinned.test", "u@srv.test"] * 20
    with connect(("127.0.0.1", daemon.tcp_port)) as s:
        s.sendall(b"".join(tcptable.encode_get(k) for k in keys))
        lines = recv_until(s, lambda d: d.count(b"\n") >= len(keys)).splitlines()
    expect = {"u@srv.test": f"200 torroute:[{ONION_A}]:25",
              "u@pinned.test": f"200 torroute:[{ONION_B}]:25", "u@nosrv.test": "500 "}
    assert len(lines) == len(keys)
    for key, line in zip(keys, lines, strict=True):
        assert line.decode().startswith(expect[key]), (key, line)


def test_sigterm_drains_in_flight_lookup(daemon_factory, serve_dir, silent_udp) -> None:
    cfg = serve_dir / "slow.toml"
    cfg.write_text(f'[routing]\nnameservers = ["127.0.0.1:{silent_udp.address[1]}"]\n'
                   "dns_timeout = 1.5\n")
    d = daemon_factory("--config", str(cfg))
    with connect(d.socketmap) as slow, connect(d.socketmap) as idle:
        slow.sendall(socketmap.encode_request("t", "u@slow.test"))
        time.sleep(0.3)  # the lookup is waiting for DNS now
        d.signal(signal.SIGTERM)
        data = recv_until(slow, lambda x: False)  # answered, then closed
        assert socketmap.decode_netstring(data, 1000)[0].startswith(b"TEMP DNS timeout")
        assert idle.recv(100) == b""  # idle connections are closed at once
    assert d.proc.wait(10) == 0
    assert not os.path.exists(d.socketmap)  # the daemon removed its sockets


def test_non_loopback_bind_refused_without_allow_remote(serve_dir) -> None:
    r = subprocess.run([sys.executable, "-m", "torroute.cli", "serve", "--tcp-table",
                        f"inet:0.0.0.0:{free_port()}"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 78 and "not a loopback address" in r.stderr
    assert "Traceback" not in r.stderr and "ERROR" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "torroute.cli", "serve"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 64 and "no listeners" in r.stderr and "Traceback" not in r.stderr


def test_unix_socket_mode_group_and_stale_socket(daemon_factory, serve_dir) -> None:
    group = "postfix" if _group_exists("postfix") else "root"
    stale = serve_dir / "socketmap.sock"
    with socket.socket(socket.AF_UNIX) as s:  # a stale socket file from a killed daemon
        s.bind(str(stale))
    d = daemon_factory("--socket-group", group)
    st = os.stat(d.socketmap)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam(group).gr_gid
    # a second daemon on the same path must not steal the live socket
    r = subprocess.run([sys.executable, "-m", "torroute.cli", "serve", "--socketmap",
                        f"unix:{d.socketmap}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 78 and "another daemon is listening" in r.stderr
    assert "Traceback" not in r.stderr and "ERROR" not in r.stderr
    assert normal_query(d, "socketmap").endswith(b",")


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_client_leaving_mid_lookup_does_not_starve_others(daemon_factory, serve_dir,
                                                         silent_udp) -> None:
    """Two clients wait on one shared DNS query; the first hangs up: the second still gets
    its (temporary failure) answer, and the daemon keeps serving."""
    cfg = serve_dir / "slow.toml"
    cfg.write_text(f'[routing]\nnameservers = ["127.0.0.1:{silent_udp.address[1]}"]\n'
                   "dns_timeout = 1.0\n")
    d = daemon_factory("--config", str(cfg))
    with connect(("127.0.0.1", d.tcp_port)) as first, connect(d.socketmap) as second:
        first.sendall(tcptable.encode_get("a@same.test"))
        time.sleep(0.2)
        second.sendall(socketmap.encode_request("t", "b@same.test"))
        time.sleep(0.2)
        first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        first.close()  # abortive close (RST): the daemon sees the connection lost at once
        data = recv_until(second, lambda x: x.endswith(b","))
    assert socketmap.decode_netstring(data, 1000)[0].startswith(b"TEMP ")
    assert d.proc.poll() is None


def test_last_decision_lines_reach_the_log_on_sigterm(daemon) -> None:
    with connect(("127.0.0.1", daemon.tcp_port)) as s:
        s.sendall(tcptable.encode_get("last@pinned.test"))
        recv_until(s, lambda d: d.endswith(b"\n"))
    daemon.signal(signal.SIGTERM)  # at once: the buffered line must still be written
    assert daemon.proc.wait(10) == 0
    assert "domain=pinned.test result=route" in daemon.log()


def test_missing_socket_directory_is_named_and_only_torroutes_own_is_made(daemon_factory,
                                                                           serve_dir) -> None:
    """`--socketmap unix:/run/torroute/socketmap.sock` outside systemd: the daemon makes its
    own directory (named ``torroute``, in an existing one); a missing directory of any other
    name is a mistake in the path: exit 78 naming it, nothing created."""
    for missing in (serve_dir / "elsewhere" / "socketmap.sock",
                    serve_dir / "no" / "torroute" / "socketmap.sock"):
        r = subprocess.run([sys.executable, "-m", "torroute.cli", "serve", "--socketmap",
                            f"unix:{missing}"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 78, r.stderr
        assert f"cannot listen on unix:{missing}: directory {missing.parent} does not exist" \
            in r.stderr
        assert not missing.parent.exists() and "Traceback" not in r.stderr
    own = serve_dir / "torroute"
    d = daemon_factory(socketmap=str(own / "socketmap.sock"), exim=str(own / "exim.sock"))
    st = os.stat(own)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert stat.S_IMODE(os.stat(d.socketmap).st_mode) == 0o660
    assert normal_query(d, "socketmap").endswith(b",")
    assert f"created the socket directory {own}" in d.wait_log("listening: exim")
    assert d.stop() == 0
    assert not os.path.exists(d.socketmap) and own.is_dir()  # the directory stays


def test_own_socket_directory_gets_the_socket_group(daemon_factory, serve_dir) -> None:
    group = "postfix" if _group_exists("postfix") else "root"
    own = serve_dir / "torroute"
    d = daemon_factory("--socket-group", group, socketmap=str(own / "socketmap.sock"))
    st = os.stat(own)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o750, grp.getgrnam(group).gr_gid)
    assert normal_query(d, "socketmap").endswith(b",")
