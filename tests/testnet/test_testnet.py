"""torroute.testing.testnet: loopback-only torrc checks (pure), and the real private network."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torroute.endpoint import format_hostport
from torroute.testing import testnet as tn
from torroute.testing import testnet_state
from torroute.testing.testnet import (
    BootError,
    Node,
    PrivateNetwork,
    UnsafeTorrc,
    check_torrc,
    consensus_relays,
    parse_onion_port,
    voting_offset,
)

RESOLV = {"/n/resolv.conf": "nameserver 127.0.0.1\n"}


def read(path: str) -> str:
    if path not in RESOLV:
        raise FileNotFoundError(path)
    return RESOLV[path]


FPR = "0123456789ABCDEF0123456789ABCDEF01234567"
CLIENT_OK = f"""\
TestingTorNetwork 1
DirAuthority a0 orport=5000 no-v2 v3ident=AAAA 127.0.0.1:5001 {FPR}
UseDefaultFallbackDirs 0
ClientUseIPv6 0
Address 127.0.0.1
SocksPort 127.0.0.1:9050 ExtendedErrors
DNSPort 127.0.0.1:9053
ControlPort 127.0.0.1:9051
"""
RELAY_OK = CLIENT_OK.replace("SocksPort 127.0.0.1:9050 ExtendedErrors\n", "SocksPort 0\n") + """\
ORPort 127.0.0.1:5002
ExitRelay 0
ExitPolicy reject *:*
ServerDNSDetectHijacking 0
ServerDNSTestAddresses
ServerDNSResolvConfFile /n/resolv.conf
"""
BRIDGE_OK = """\
UseBridges 1
Bridge 127.0.0.1:1
UseDefaultFallbackDirs 0
ClientUseIPv6 0
Address 127.0.0.1
SocksPort 127.0.0.1:9050
"""


def test_safe_torrcs_pass() -> None:
    check_torrc(CLIENT_OK, read)
    check_torrc(RELAY_OK, read)
    check_torrc(BRIDGE_OK)
    check_torrc(CLIENT_OK + "SocksPort unix:/run/x/socks\nHiddenServicePort 25 127.0.0.1:2525\n")


@pytest.mark.parametrize("text, why", [
    ("SocksPort 9050\n", "socksport"),  # a bare port: tor picks the address
    ("SocksPort 0.0.0.0:9050\n", "socksport"),
    ("ControlPort 9051\n", "controlport"),
    ("DNSPort 10.0.0.1:53\n", "dnsport"),
    ("MetricsPort 192.168.1.1:9035\n", "metricsport"),
    ("HiddenServicePort 25 10.0.0.1:25\n", "HiddenServicePort"),
    ("HiddenServicePort 25\n", "HiddenServicePort"),
    ("Socks5Proxy 127.0.0.1:1080\n", "socks5proxy"),
    ("HTTPSProxy 10.1.1.1:3128\n", "httpsproxy"),
    ("ReachableAddresses accept *:443\n", "reachableaddresses"),
    ("OutboundBindAddress 10.0.0.1\n", "outboundbindaddress"),
    ("FallbackDir 1.2.3.4:80 orport=9001 id=0123\n", "fallbackdir"),
    ("ClientTransportPlugin obfs4 exec /usr/bin/obfs4proxy\n", "clienttransportplugin"),
    ("%include /etc/tor/torrc.d\n", "%include"),
    ("DirAuthority evil orport=9001 no-v2 v3ident=AB 1.2.3.4:80 0123\n", "dirauthority"),
    ("DirAuthority six orport=1 ipv6=[::1]:1 no-v2 v3ident=AB 127.0.0.1:80 01\n", "ipv6"),
    ("ClientUseIPv6 1\n", "clientuseipv6"),
    ("Address 192.0.2.1\n", "address"),
])
def test_unsafe_lines_are_rejected(text: str, why: str) -> None:
    with pytest.raises(UnsafeTorrc, match=re.escape(why)):
        check_torrc(CLIENT_OK + text, read)


@pytest.mark.parametrize("remove, why", [
    ("TestingTorNetwork 1\n", "TestingTorNetwork"),
    ("UseDefaultFallbackDirs 0\n", "usedefaultfallbackdirs"),
    ("ClientUseIPv6 0\n", "clientuseipv6"),
    ("Address 127.0.0.1\n", "address"),
])
def test_missing_required_lines_are_rejected(remove: str, why: str) -> None:
    with pytest.raises(UnsafeTorrc, match=why):
        check_torrc(CLIENT_OK.replace(remove, ""), read)


def test_testing_network_needs_own_authorities() -> None:
    no_auth = "\n".join(line for line in CLIENT_OK.splitlines()
                        if not line.startswith("DirAuthority"))
    with pytest.raises(UnsafeTorrc, match="without DirAuthority"):
        check_torrc(no_auth, read)


def test_default_torrc_is_rejected() -> None:
    with pytest.raises(UnsafeTorrc, match="need TestingTorNetwork"):
        check_torrc("SocksPort 127.0.0.1:9050\n")
    with pytest.raises(UnsafeTorrc):
        check_torrc("")


def test_bridge_mode_needs_loopback_bridges() -> None:
    with pytest.raises(UnsafeTorrc, match="bridge"):
        check_torrc(BRIDGE_OK.replace("127.0.0.1:1", "192.0.2.7:443"))
    with pytest.raises(UnsafeTorrc, match="without Bridge lines"):
        check_torrc(BRIDGE_OK.replace("Bridge 127.0.0.1:1\n", ""))


@pytest.mark.parametrize("change, why", [
    (("ExitRelay 0\n", ""), "ExitRelay 0"),
    (("ExitPolicy reject *:*\n", "ExitPolicy accept *:*\n"), "ExitPolicy"),
    (("ServerDNSDetectHijacking 0\n", ""), "ServerDNSDetectHijacking"),
    (("ServerDNSTestAddresses\n", "ServerDNSTestAddresses www.google.com\n"),
     "ServerDNSTestAddresses"),
    (("ServerDNSResolvConfFile /n/resolv.conf\n", ""), "ServerDNSResolvConfFile"),
    (("ServerDNSResolvConfFile /n/resolv.conf\n", "ServerDNSResolvConfFile /nope\n"), "/nope"),
    (("ORPort 127.0.0.1:5002\n", "ORPort 5002\n"), "orport"),
])
def test_relay_rules(change: tuple[str, str], why: str) -> None:
    assert change[0] in RELAY_OK
    with pytest.raises(UnsafeTorrc, match=re.escape(why)):
        check_torrc(RELAY_OK.replace(*change), read)


def test_relay_resolv_conf_must_be_loopback() -> None:
    RESOLV["/n/bad.conf"] = "nameserver 127.0.0.1\nnameserver 8.8.8.8\n"
    text = RELAY_OK.replace("/n/resolv.conf", "/n/bad.conf")
    with pytest.raises(UnsafeTorrc, match="nameservers must all be 127"):
        check_torrc(text, read)


def fake_network(tmp: Path) -> PrivateNetwork:
    """A network whose nodes have ports and placeholder fingerprints, without booting."""
    net = PrivateNetwork(tmp / "net", {25: ("127.0.0.1", 2525), 587: ("127.0.0.1", 2587)},
                         owner_pid=1)
    ports = iter(range(21000, 21100))
    for i in range(3):
        net.nodes.append(Node(f"auth{i}", "authority", net.directory / f"auth{i}", next(ports),
                              or_port=next(ports), dir_port=next(ports),
                              fingerprint=f"{i:040X}", v3ident=f"{i + 10:040X}"))
    for i in range(2):
        net.nodes.append(Node(f"relay{i}", "relay", net.directory / f"relay{i}", next(ports),
                              or_port=next(ports), fingerprint=f"{i + 20:040X}"))
    net.nodes.append(Node("hs", "hs", net.directory / "hs", next(ports)))
    net.nodes.append(Node("client", "client", net.directory / "client", next(ports)))
    net.socks_port, net.socks_ext_port, net.dns_port = next(ports), next(ports), next(ports)
    return net


def test_generated_torrcs_pass_and_know_only_loopback(tmp_path: Path) -> None:
    net = fake_network(tmp_path)
    resolv = str(net.directory / "resolv.conf")
    for node in net.nodes:
        text = net.torrc(node, offset=3)
        check_torrc(text, lambda p: "nameserver 127.0.0.1\n" if p == resolv else "")
        for literal in re.findall(r"\b\d+\.\d+\.\d+\.\d+\b", text):
            assert ipaddress.ip_address(literal).is_loopback, (node.name, literal)
        assert "__OwningControllerProcess 1" in text
        assert "GeoIPFile /dev/null" in text
    client = net.torrc(net.node("client"))
    assert f"SocksPort 127.0.0.1:{net.socks_ext_port} ExtendedErrors IsolateSOCKSAuth" in client
    assert "AutomapHostsSuffixes .onion" in client and "DisableNetwork 1" in client
    hs = net.torrc(net.node("hs"))
    assert "HiddenServicePort 25 127.0.0.1:2525" in hs
    assert "HiddenServicePort 587 127.0.0.1:2587" in hs
    assert "TestingV3AuthVotingStartOffset 3" in net.torrc(net.node("auth1"), offset=3)
    assert len(re.findall("^DirAuthority ", client, re.M)) == 3


def test_unsafe_torrc_means_no_tor_starts(tmp_path: Path, monkeypatch) -> None:
    net = fake_network(tmp_path)
    for node in net.nodes:
        node.datadir.mkdir(parents=True)
    (net.directory / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    started = []
    monkeypatch.setattr(tn.subprocess, "Popen", lambda *a, **k: started.append(a))
    original = PrivateNetwork.torrc

    def with_proxy(self, node, offset=0):
        text = original(self, node, offset)
        return text + ("Socks5Proxy 192.0.2.1:1080\n" if node.name == "client" else "")

    monkeypatch.setattr(PrivateNetwork, "torrc", with_proxy)
    with pytest.raises(UnsafeTorrc, match="socks5proxy"):
        net._start_all()
    assert started == []  # checked every torrc before starting the first tor


def test_non_loopback_onion_target_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeTorrc):
        PrivateNetwork(tmp_path, {25: ("192.0.2.1", 25)})


@pytest.mark.parametrize("text, expected", [
    ("25=127.0.0.1:2525", (25, ("127.0.0.1", 2525))),
    ("587=2587", (587, ("127.0.0.1", 2587))),
    ("25=127.3.4.5:99", (25, ("127.3.4.5", 99))),
])
def test_parse_onion_port(text, expected) -> None:
    assert parse_onion_port(text) == expected


@pytest.mark.parametrize("text", ["25", "25=10.0.0.1:25", "x=127.0.0.1:1", "70000=127.0.0.1:1",
                                  "25=localhost:25", "25=127.0.0.1:0"])
def test_parse_onion_port_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_onion_port(text)


@pytest.mark.parametrize("now", [0.0, 1000.2, 86399.9, 1763782829.7, 1763782830.0])
@pytest.mark.parametrize("lead", [3.0, 4.5])
def test_voting_offset_puts_first_valid_after_lead_seconds_ahead(now: float, lead: float) -> None:
    offset = voting_offset(now, lead=lead, interval=6)
    assert 0 <= offset < 6
    midnight = now - now % 86400
    grid = [midnight + offset + 6 * k for k in range(-2, 14400 + 3)]
    first = min(t for t in grid if t > now + lead)
    assert now + lead < first <= now + lead + 1


def test_consensus_relays_parses_flags() -> None:
    doc = ("network-status-version 3 microdesc\n"
           "r auth0 AAAA 2026-01-01 00:00:00 127.0.0.1 5000 0\n"
           "m x\ns Authority Fast Guard HSDir Running Stable V2Dir Valid\n"
           "r relay0 BBBB 2026-01-01 00:00:00 127.0.0.1 5003 0\ns Fast Valid\n")
    assert consensus_relays(doc) == {
        "auth0": {"Authority", "Fast", "Guard", "HSDir", "Running", "Stable", "V2Dir", "Valid"},
        "relay0": {"Fast", "Valid"}}


# --------------------------------------------------------------------------------------------
# the real network


def socks5_by_hand(proxy: tuple[str, int], host: str, port: int,
                   timeout: float = 30.0) -> tuple[int, socket.socket]:
    """SOCKS5 CONNECT written out byte by byte (independent of torroute.tor.dial)."""
    sock = socket.create_connection(proxy, timeout=timeout)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    name = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        assert chunk, "tor closed the SOCKS connection without a reply"
        head += chunk
    if head[1] == 0:
        rest = {1: 4, 4: 16}.get(head[3])
        if rest is None:  # domain
            rest = sock.recv(1)[0]
        sock.recv(rest + 2)
    return head[1], sock


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.testnet
def test_onion_reachable_by_raw_socks(testnet, onion_sink) -> None:
    for proxy in (testnet.socks, testnet.socks_extended):
        code, sock = socks5_by_hand(proxy, testnet.onion, 25)
        with sock:
            assert code == 0
            assert read_line(sock).startswith(b"220 sink.testnet.invalid")
            sock.sendall(b"QUIT\r\n")
            assert read_line(sock).startswith(b"221")


@pytest.mark.testnet
def test_running_network_is_loopback_only_and_reports_status(testnet) -> None:
    net = testnet.net
    report = tn.status(net.directory)
    assert report["running"] and report["ready"]
    assert set(report["nodes"]) == {"auth0", "auth1", "auth2", "relay0", "relay1", "hs", "client"}
    assert report["onion"] == testnet.onion
    for key in ("socks", "socks_extended", "dns", "control"):
        host, _, port = report[key].partition(":")
        assert host == "127.0.0.1" and port.isdigit()
    for node in net.nodes:
        text = node.torrc_path.read_text()
        check_torrc(text, lambda p: Path(p).read_text())
        assert f"__OwningControllerProcess {net.keeper_pid}" in text
    # every socket each tor has is on loopback (listening or connected)
    for node in net.nodes:
        for line in subprocess.run(["ss", "-Htanp"], capture_output=True, text=True,
                                   check=True).stdout.splitlines():
            if f"pid={node.pid}," in line:
                state, local, peer = line.split()[0], *line.split()[3:5]
                for addr in (local,) if state == "LISTEN" else (local, peer):
                    host = addr.rsplit(":", 1)[0].strip("[]")
                    if host != "*":
                        assert ipaddress.ip_address(host).is_loopback, (node.name, line)


@pytest.mark.testnet
def test_added_onion_reaches_its_own_sink(testnet, onion_sink_factory) -> None:
    started = time.monotonic()
    extra = onion_sink_factory(vports=(25, 587))
    print(f"ADD_ONION reachable after {time.monotonic() - started:.1f}s")
    assert extra.onion != testnet.onion
    for vport in (25, 587):
        code, sock = socks5_by_hand(testnet.socks_extended, extra.onion, vport)
        with sock:
            assert code == 0
            assert read_line(sock).startswith(b"220 ")


@pytest.mark.testnet
def test_boot_failure_names_node_and_log_tail(testnet, monkeypatch) -> None:
    original = PrivateNetwork.torrc

    def broken(self, node, offset=0):
        text = original(self, node, offset)
        return text + ("NoSuchTorOption 1\n" if node.name == "relay1" else "")

    monkeypatch.setattr(PrivateNetwork, "torrc", broken)
    net = PrivateNetwork(testnet.new_dir("broken"), {25: ("127.0.0.1", 9)})
    with pytest.raises(BootError) as info:
        net.up(timeout=30)
    assert info.value.node == "relay1"
    assert "NoSuchTorOption" in str(info.value)
    # the others were stopped
    assert all(not testnet_state.pid_alive(n.pid) for n in net.nodes if n.pid)
    assert net.keeper_pid and not testnet_state.pid_alive(net.keeper_pid)


def torroute_cli(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torroute.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.testnet
def test_cli_up_status_down_beside_the_session_network(testnet, onion_sink) -> None:
    directory = testnet.new_dir("cli") / "net"
    target = f"25={onion_sink.sink.host}:{onion_sink.sink.port}"
    up = torroute_cli("testnet", "up", "--dir", str(directory), "--json", "--onion-port", target)
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    assert "onion reachable" in up.stderr  # progress went to stderr
    try:
        for key in ("socks", "socks_extended", "dns", "control"):
            assert re.fullmatch(r"127\.0\.0\.1:\d+", info[key])
        assert info["onion"] != testnet.onion and info["onion"].endswith(".onion")
        # the network outlived the command that booted it; its owner is the keeper
        keeper = info["keeper_pid"]
        assert testnet_state.pid_alive(keeper)
        client_torrc = (directory / "client" / "torrc").read_text()
        assert f"__OwningControllerProcess {keeper}" in client_torrc
        host, port = info["socks_extended"].split(":")
        code, sock = socks5_by_hand((host, int(port)), info["onion"], 25)
        with sock:
            assert code == 0 and read_line(sock).startswith(b"220 ")
        again = torroute_cli("testnet", "up", "--dir", str(directory))
        assert again.returncode == 64 and "already running" in again.stderr

        status = torroute_cli("testnet", "status", "--dir", str(directory), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["running"] is True
        text = torroute_cli("testnet", "status", "--dir", str(directory))
        assert info["onion"] in text.stdout and "running" in text.stdout
    finally:
        down = torroute_cli("testnet", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr
    pids = list(info["pids"].values()) + [info["keeper_pid"]]
    assert not any(testnet_state.pid_alive(p) for p in pids)
    assert not directory.exists()
    # the session network was not touched
    assert tn.status(testnet.net.directory)["running"]
    gone = torroute_cli("testnet", "status", "--dir", str(directory))
    assert gone.returncode == 1 and "no network" in gone.stderr


@pytest.mark.testnet
def test_demo_runs_end_to_end_and_cleans_up() -> None:
    """The README's first command: its own network, two routed domains, two deliveries."""
    before = set(Path("/tmp").glob("torroute-demo-*"))
    # this tree's torroute, not whatever /opt/torroute has installed (the same in CI)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "torroute.cli.demo"], capture_output=True,
                          text=True, timeout=120, cwd="/tmp", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"\.onion:25\tfrom srv \(ttl 300s\)", out)
    assert re.search(r"\.onion:25\tfrom map .*pins\.txt:2", out)
    assert "no onion route for plain.test" in out
    assert out.count("landed in") == 2
    assert "Subject: hello alice@example.test over Tor" in out
    assert set(Path("/tmp").glob("torroute-demo-*")) == before  # cleaned up


@pytest.mark.testnet
def test_port_taken_before_tor_binds_is_retried_with_new_ports(testnet, monkeypatch) -> None:
    """Ports are checked free, then bound by tor later: if another program takes one in
    between, the boot starts over on new ports instead of failing."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    taken = squatter.getsockname()[1]
    real_free_ports = tn.free_ports
    calls: list[list[int]] = []

    def free_ports(count, udp_too=()):
        ports = real_free_ports(count, udp_too)
        if not calls:
            ports[0] = taken  # auth0's ControlPort
        calls.append(ports)
        return ports

    class Reached(Exception):
        pass

    def stop_after_start(self, deadline):
        raise Reached  # the second set of tors started and bound: enough for this test

    monkeypatch.setattr(tn, "free_ports", free_ports)
    monkeypatch.setattr(PrivateNetwork, "_stage", stop_after_start)
    net = PrivateNetwork(testnet.new_dir("taken"), {25: ("127.0.0.1", 9)})
    original_start = PrivateNetwork._start_all

    def start_and_wait(self):
        original_start(self)
        if len(calls) == 1:  # first attempt: auth0 cannot bind and exits
            self._wait("auth0 to fail", time.monotonic() + 20, lambda: False, pause=0.1)

    monkeypatch.setattr(PrivateNetwork, "_start_all", start_and_wait)
    with squatter, pytest.raises(Reached):
        net.up(timeout=60)
    assert len(calls) == 2 and taken not in calls[1]
    assert "a port was taken meanwhile" in " ".join(net.timings)
    net.stop_processes()
    assert all(not testnet_state.pid_alive(n.pid) for n in net.nodes if n.pid)


def write_state(directory: Path, pids: dict[str, int]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    nodes = {name: {"role": "relay", "pid": pid} for name, pid in pids.items()}
    (directory / tn.STATE_FILE).write_text(json.dumps({"version": 1, "ready": True,
                                                       "nodes": nodes}))


def test_down_kills_only_processes_that_are_still_ours(tmp_path: Path) -> None:
    """A recorded pid that now belongs to another program (pid reuse) is left alone."""
    directory = tmp_path / "net"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = subprocess.Popen([*sleeper, str(directory)])  # names the directory: ours
    stranger = subprocess.Popen(sleeper)
    try:
        write_state(directory, {"auth0": ours.pid, "relay0": stranger.pid})
        report = tn.status(directory)
        assert report["nodes"]["auth0"]["running"] and not report["nodes"]["relay0"]["running"]
        assert not report["running"]
        assert tn.down(directory) == [ours.pid]
        ours.wait(5)  # exited (down reaped it already, so its status is lost)
        assert not testnet_state.pid_alive(ours.pid)
        assert stranger.poll() is None
        assert not directory.exists()
    finally:
        ours.kill()
        stranger.kill()
        ours.wait()
        stranger.wait()


def test_cli_status_and_down_of_a_stopped_network(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_state(directory, {"auth0": dead.pid})
    status = torroute_cli("testnet", "status", "--dir", str(directory), timeout=30)
    assert status.returncode == 75 and "NOT running" in status.stdout
    down = torroute_cli("testnet", "down", "--dir", str(directory), "--keep", timeout=30)
    assert down.returncode == 0 and directory.exists()
    down = torroute_cli("testnet", "down", "--dir", str(directory), "--json", timeout=30)
    assert down.returncode == 0 and json.loads(down.stdout)["stopped"] == []
    assert not directory.exists()


def test_remove_directory_refuses_a_directory_that_is_not_a_network(tmp_path: Path) -> None:
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "file").write_text("x")
    tn.remove_directory(keep)
    assert (keep / "file").exists()
    up = torroute_cli("testnet", "up", "--dir", str(keep), timeout=30)
    assert up.returncode == 64 and "not a testnet directory" in up.stderr


def test_cli_rejects_non_loopback_onion_port(tmp_path: Path) -> None:
    up = torroute_cli("testnet", "up", "--dir", str(tmp_path / "n"), "--onion-port",
                      "25=192.0.2.1:25", timeout=30)
    assert up.returncode == 64 and "loopback" in up.stderr
    assert not (tmp_path / "n").exists()


@pytest.mark.testnet
def test_stem_in_the_test_process_does_not_kill_the_network(testnet) -> None:
    """stem's authenticate() sends TAKEOWNERSHIP when __OwningControllerProcess is its own pid
    (tor then exits when that connection closes): the owner is a keeper process, not us."""
    from stem.control import Controller

    assert testnet.net.keeper_pid not in (None, os.getpid())
    assert testnet_state.is_ours(testnet.net.keeper_pid, testnet.net.directory)
    with Controller.from_port("127.0.0.1", testnet.control[1]) as ctl:
        ctl.authenticate()
        assert ctl.get_conf("__OwningControllerProcess") == str(testnet.net.keeper_pid)
    time.sleep(1)
    assert tn.status(testnet.net.directory)["running"]
    code, sock = socks5_by_hand(testnet.socks, testnet.onion, 25)
    with sock:
        assert code == 0 and read_line(sock).startswith(b"220 ")


def test_onion_ready_is_one_judgement_for_up_and_add_onion() -> None:
    """0x00 always; 0x01 ("the service's connect to its target failed") only while nothing
    listens on the target; 0xF0, other codes and no reply never."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        busy = listening.getsockname()
        closed = tn.free_ports(1)[0]
        for target in (busy, ("127.0.0.1", closed)):
            assert tn.onion_ready(0x00, target)
            for reply in (None, 0xF0, 0xF6, 0x04, 0x05):
                assert not tn.onion_ready(reply, target)
        assert not tn.onion_ready(0x01, busy)
        assert tn.onion_ready(0x01, ("127.0.0.1", closed))


@pytest.mark.testnet
def test_unreachable_added_onion_names_its_own_target(testnet) -> None:
    """The error of a never-reachable onion names that onion's target, not the session's."""
    net = testnet.net
    target = ("127.0.0.1", tn.free_ports(1)[0])
    onion = net.add_onion({25: target}, wait=False)
    net.remove_onion(onion)  # before its descriptor is published: never reachable
    with pytest.raises(BootError) as caught:
        net.wait_onion_reachable(onion, 25, target, deadline=time.monotonic() + 3)
    message = str(caught.value).splitlines()[0]
    assert f"{onion}:25 (-> 127.0.0.1:{target[1]})" in message, message
    # 0xF0 (descriptor not found) or, when the client's fetch hangs, no reply at all
    assert re.search(r"never succeeded: (reply 0xf0|no SOCKS reply)", message), message
    assert format_hostport(testnet.sink.address) not in message
