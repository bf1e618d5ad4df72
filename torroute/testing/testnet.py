"""A private Tor network on 127.0.0.1: real tor, a real v3 onion service, nothing leaves loopback.

Why: onion delivery has never been tested end to end automatically; this lets the test suite (and
users checking their own Postfix/Exim setup) dial a real onion service through a real tor client
in ~10 s, with no Internet.  It is NOT anonymous and NOT the Tor network: 3 directory
authorities + 2 relays + 1 onion-service tor + 1 client tor, all ours, all on loopback.

Layout of a network directory (``PrivateNetwork(directory)``)::

    testnet.json          state: pids, ports, onion (read by ``status``/``down``)
    resolv.conf           loopback-only resolver file for the relays
    auth0..auth2/         directory authorities (also relays), relay0..relay1/, hs/, client/
        torrc  notice.log  console.log  tor.pid  (and tor's data files; 0700)

Every torrc passes :func:`~torroute.testing.torrc_safety.check_torrc` before any tor starts; a
failing check refuses to start.  The control connections are :mod:`torroute.tor.control_socket`
(the control-protocol codec is :mod:`torroute.protocols.control`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..endpoint import HostPort, format_hostport, parse_hostport
from ..errors import BootError, ControlError, SocksError, TestnetError, TorRefused, UnsafeTorrc
from ..protocols.control import Reply, parse_hs_desc
from ..tor import dial as tordial
from ..tor.control_socket import ControlSocket
from .testnet_state import (
    STATE_FILE,
    STATE_VERSION,
    down,
    is_ours,
    pid_alive,
    read_state,
    remove_directory,
    rss_kib,
    state_pids,
    status,
    stop_pids,
)
from .torrc_safety import check_torrc, is_loopback_hostport, is_loopback_ipv4, parse_torrc

__all__ = ["PrivateNetwork", "Node", "read_state", "status", "down", "remove_directory",
           "check_torrc", "parse_torrc", "parse_onion_port", "free_ports", "onion_ready",
           "socks_probe", "voting_offset", "consensus_relays", "STATE_FILE",
           "BootError", "TestnetError", "UnsafeTorrc"]

Progress = Callable[[str], None]

INITIAL_VOTING_INTERVAL = 5  # seconds; the regular one must be a multiple of it
# The regular interval sets the onion-service time period: with TestingTorNetwork tor makes it
# one shared-random protocol run (24 intervals) in *whole minutes*, while the run itself stays
# 24 intervals.  12 s gave runs of 288 s but periods of 4 min: every 24 min the service's
# descriptor rotation (it follows the runs) missed a period, and the session onion answered
# 0xF0 (descriptor not found) for minutes while onions added later were fine.  10 s: runs and
# periods are both 240 s, the period starts 120 s into the run, as on the real network.
VOTING_INTERVAL = 10
VOTE_DELAY = 2
VOTING_LEAD = float(os.environ.get("TORROUTE_TESTNET_VOTING_LEAD", "4.5"))  # see voting_offset
DIST_DELAY = 2
AUTHORITIES = 3
RELAYS = 2  # onion circuits need 4 distinct relays: 3 in total never works, use 5

SOCKS_OK = 0x00
SOCKS_GENERAL_FAILURE = 0x01  # from an onion service: its target port is closed
SOCKS_DESCRIPTOR_NOT_FOUND = 0xF0  # tor ExtendedErrors: retry, the client has not got it yet

_PORT_TAKEN = re.compile(r"Could not bind to 127\.0\.0\.1:\d+: Address already in use")


# --------------------------------------------------------------------------------------------
# pure helpers


def voting_offset(now: float, lead: float | None = None,
                  interval: int = INITIAL_VOTING_INTERVAL) -> int:
    """``TestingV3AuthVotingStartOffset`` so the first valid-after lands ``lead`` s after ``now``.

    Valid-after times are k*interval + offset seconds after midnight UTC; with a 6 s interval
    tor votes ~2-3 s before (it shrinks the delays to interval/4).  Relay descriptors need ~1.5 s
    to reach every authority: measured here, a lead of 3 s missed relays every time (the network
    then waits another interval: +10 s), 4 s worked every time, 5.5 s cost ~1 s; 4.5 leaves margin.
    """
    target = int(now + (VOTING_LEAD if lead is None else lead)) + 1
    return target % 86400 % interval


def consensus_relays(text: str) -> dict[str, set[str]]:
    """Nickname -> flags for every router in a (microdesc) consensus document."""
    relays: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("r "):
            current = line.split()[1]
            relays[current] = set()
        elif line.startswith("s ") and current is not None:
            relays[current] = set(line.split()[1:])
    return relays


def parse_onion_port(text: str) -> tuple[int, HostPort]:
    """``"25=127.0.0.1:2525"`` -> (25, ("127.0.0.1", 2525)); a bare ``PORT`` target means
    127.0.0.1.  Raises ValueError for anything else (targets must be loopback)."""
    vport_text, sep, target = text.partition("=")
    if not sep or not vport_text.strip().isdigit():
        raise ValueError(f"{text!r}: expected VPORT=127.0.0.1:PORT")
    vport = int(vport_text)
    target = target.strip()
    if target.isdigit():
        target = f"127.0.0.1:{target}"
    if not is_loopback_hostport(target):
        raise ValueError(f"{text!r}: the target must be 127.x.x.x:PORT (loopback only)")
    if not 0 < vport < 65536:
        raise ValueError(f"{text!r}: virtual port out of range")
    return vport, parse_hostport(target)


# --------------------------------------------------------------------------------------------
# I/O helpers


def free_ports(count: int, udp_too: Iterable[int] = (), low: int = 20000,
               high: int = 32000) -> list[int]:
    """``count`` distinct free loopback ports below the ephemeral range (so tor's own outgoing
    connections never take them); indexes in ``udp_too`` are also free for UDP (DNSPort)."""
    udp_indexes = set(udp_too)
    chosen: list[int] = []
    rng = random.SystemRandom()
    while len(chosen) < count:
        port = rng.randrange(low, high)
        if port in chosen:
            continue
        kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if len(chosen) in udp_indexes else [])
        try:
            for kind in kinds:
                with socket.socket(socket.AF_INET, kind) as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        chosen.append(port)
    return chosen


def _tcp_listening(target: HostPort) -> bool:
    try:
        with socket.create_connection(target, timeout=1.0):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def socks_probe(proxy: HostPort, host: str, port: int, timeout: float = 10.0) -> int | None:
    """One SOCKS5 CONNECT through ``proxy`` (greeting and CONNECT in one write); the reply
    code, or None (no reply in time, or not a SOCKS5 answer).

    On success the stream is closed at once: the probe only proves the onion is reachable.
    """
    try:
        tordial.connect(host, port, proxy, timeout, pipeline=True).close()
    except SocksError as exc:
        return exc.code
    except OSError:
        return None
    return 0


def onion_ready(reply: int | None, target: HostPort) -> bool:
    """Whether one reply of the client's ExtendedErrors SocksPort proves an onion service
    reachable (the one judgement for ``up()`` and ``add_onion()``); ``target`` is the loopback
    address the service maps the probed virtual port to.

    0x00: connected.  0x01: on that port onion failures are 0xF0..0xF7, so 0x01 means the
    rendezvous worked and the service's own connect to ``target`` failed (measured: after
    ~0.2 s; an unmapped virtual port gives 0x05).  That proves the onion works when nothing
    listens on ``target`` yet (``testnet up`` before the user's sink starts), not when
    something does (then ask again: it may have started listening just now).
    """
    if reply == SOCKS_OK:
        return True
    return reply == SOCKS_GENERAL_FAILURE and not _tcp_listening(target)


def _probe_failure(reply: int | None, target: HostPort) -> str:
    if reply is None:
        return "no SOCKS reply (the rendezvous never completed)"
    if reply == SOCKS_DESCRIPTOR_NOT_FOUND:
        return "reply 0xf0 (the client never found the onion's descriptor)"
    if reply == SOCKS_GENERAL_FAILURE:
        return (f"reply 0x01: the onion service could not connect to {format_hostport(target)}, "
                f"although something listens there")
    return f"reply {reply:#04x}"


# the control connection: torroute.tor.control_socket, its errors as TestnetError


class ControlConnection(ControlSocket):
    """A cookie-authenticated control connection to one of our tors (``port`` on 127.0.0.1);
    HS_DESC and other events go to ``on_event``.  Failures are :class:`TestnetError`."""

    def __init__(self, port: int, cookie: Path, on_event: Callable[[Reply], None] | None = None,
                 timeout: float = 10.0) -> None:
        self.port = port
        try:
            super().__init__(("127.0.0.1", port), cookie, on_event, timeout)
        except (ControlError, TorRefused) as exc:
            raise TestnetError(str(exc)) from None

    def command(self, line: str) -> Reply:
        try:
            return super().command(line)
        except (ControlError, TorRefused) as exc:
            raise TestnetError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# the network


@dataclass
class Node:
    """One tor of the network."""

    name: str
    role: str  # "authority" | "relay" | "hs" | "client"
    datadir: Path
    control_port: int
    or_port: int = 0  # the advertised ORPort (the latency proxy's, with latency)
    dir_port: int = 0
    or_bind_port: int = 0  # with latency: where tor itself listens (NoAdvertise)
    fingerprint: str = ""
    v3ident: str = ""
    pid: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def torrc_path(self) -> Path:
        return self.datadir / "torrc"

    @property
    def log_path(self) -> Path:
        return self.datadir / "notice.log"

    def log_tail(self, lines: int = 25) -> str:
        text = _tail(self.log_path, lines)
        console = _tail(self.datadir / "console.log", lines)
        return text if text else console

    def to_json(self) -> dict:
        return {"role": self.role, "datadir": str(self.datadir), "pid": self.pid,
                "control": f"127.0.0.1:{self.control_port}", "or_port": self.or_port,
                "dir_port": self.dir_port, "fingerprint": self.fingerprint}


class PrivateNetwork:
    """A private Tor network in ``directory`` (created; must not hold a running network).

    ``onion_ports`` maps the onion service's virtual ports to loopback targets.  ``owner_pid``
    goes into every torrc as ``__OwningControllerProcess``: the tors exit (~15 s) after that
    process dies.  Default: a tiny *keeper* process (:meth:`start_keeper`) that lives while this
    process and the directory do.  Not this process itself: stem's ``authenticate()`` sends
    ``TAKEOWNERSHIP`` when the owner pid is its own, and tor then exits as soon as that one
    control connection closes, so any stem user in the test process would kill the network.
    A CLI that returns while the network runs uses ``start_keeper(follow=None)``: the keeper then
    lives until ``down`` or until the directory disappears.
    """

    def __init__(self, directory: Path | str, onion_ports: Mapping[int, HostPort] | None = None,
                 *, owner_pid: int | None = None, progress: Progress | None = None,
                 tor: str | None = None, tor_gencert: str | None = None,
                 latency_ms: float = 0) -> None:
        self.directory = Path(directory).absolute()
        if latency_ms < 0:
            raise ValueError("latency_ms must not be negative")
        #: added per relay hop, each direction: every ORPort is advertised on a
        #: torroute.testing.latency proxy that forwards to the relay's real (NoAdvertise) one
        self.latency_ms = latency_ms
        self.latency_pid: int | None = None
        self._latency: subprocess.Popen | None = None
        self.onion_ports: dict[int, HostPort] = dict(onion_ports or {25: ("127.0.0.1", 25)})
        for vport, target in self.onion_ports.items():
            if not is_loopback_ipv4(target[0]):
                raise UnsafeTorrc(f"onion port {vport}: target {target} is not loopback")
        self.owner_pid: int | None = owner_pid  # None: a keeper following us, made by up()
        self.keeper_pid: int | None = None
        self._progress = progress or (lambda _msg: None)
        self.tor = tor or shutil.which("tor") or "/usr/sbin/tor"
        self.tor_gencert = tor_gencert or shutil.which("tor-gencert") or "/usr/bin/tor-gencert"
        self.nodes: list[Node] = []
        self.onion: str = ""
        self.socks_port = self.socks_ext_port = self.dns_port = 0
        self.timings: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._controllers: dict[str, ControlConnection] = {}
        self._uploaded: dict[str, float] = {}
        self._uploaded_cv = threading.Condition()

    # ---- public info

    @property
    def socks(self) -> HostPort:
        """Client SocksPort (plain SOCKS5 replies)."""
        return ("127.0.0.1", self.socks_port)

    @property
    def socks_extended(self) -> HostPort:
        """Client SocksPort with ``ExtendedErrors`` (0xF0..0xF7 for onion failures)."""
        return ("127.0.0.1", self.socks_ext_port)

    @property
    def dns(self) -> HostPort:
        """Client DNSPort (automaps .onion names into tor's default virtual network,
        ``DEFAULT_VIRTUAL_NETWORK``; never ask it other names)."""
        return ("127.0.0.1", self.dns_port)

    @property
    def control(self) -> HostPort:
        return ("127.0.0.1", self.node("client").control_port)

    @property
    def control_cookie(self) -> Path:
        return self.node("client").datadir / "control_auth_cookie"

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def info(self) -> dict:
        """What ``torroute testnet up --json`` prints."""
        return {
            "socks": format_hostport(self.socks),
            "socks_extended": format_hostport(self.socks_extended),
            "dns": format_hostport(self.dns),
            "control": format_hostport(self.control),
            "control_cookie": str(self.control_cookie),
            "onion": self.onion,
            "onion_ports": {str(v): format_hostport(t)
                            for v, t in sorted(self.onion_ports.items())},
            "dir": str(self.directory),
            "pids": {n.name: n.pid for n in self.nodes},
            "keeper_pid": self.keeper_pid,
        }

    # ---- boot

    def _say(self, message: str) -> None:
        self.timings[message] = time.monotonic() - self._t0
        self._progress(f"[{time.monotonic() - self._t0:5.1f}s] {message}")

    def start_keeper(self, follow: int | None = None) -> int:
        """Start a detached process that owns the tors.

        It lives while the network directory exists and, if ``follow`` is a pid, while that
        process lives; ``down`` kills it.  When it exits the tors follow within ~15 s
        (``__OwningControllerProcess``): a crashed test run or a deleted directory leaves no
        tors behind.  ``follow=None`` is for a CLI that returns while the network keeps running.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        script = ('while [ -d "$0" ] && { [ -z "$1" ] || kill -0 "$1" 2>/dev/null; }; '
                  'do sleep 2; done')
        proc = subprocess.Popen(
            ["/bin/sh", "-c", script, str(self.directory), str(follow or "")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        self.keeper_pid = proc.pid
        self.owner_pid = proc.pid
        return proc.pid

    def up(self, timeout: float = 90.0) -> PrivateNetwork:
        """Boot and return once a real SOCKS connect to the onion succeeds; on failure stop
        every tor started and raise :class:`BootError` (node + log tail)."""
        self._t0 = time.monotonic()
        deadline = self._t0 + timeout
        if self.owner_pid is None:
            self.check_directory()
            self.start_keeper(follow=os.getpid())
        for attempt in (1, 2):
            try:
                # the retry's state file is our own first attempt's: its tors were just stopped
                # (one still exiting under load would make the check refuse our own directory)
                self._prepare(check=attempt == 1)
                self._start_all()
                self._stage(deadline)
                self._wait_ready(deadline)
                break
            except BootError as exc:
                self.stop_processes(keeper=attempt == 2 or not _PORT_TAKEN.search(exc.log_tail))
                if attempt == 2 or not _PORT_TAKEN.search(exc.log_tail):
                    raise
                # another program took one of our ports between the check and tor's bind
                self._say(f"{exc.node}: a port was taken meanwhile; retrying with new ports")
                self._clean_nodes()
            except BaseException:
                self.stop_processes()
                raise
        self.timings["ready"] = time.monotonic() - self._t0
        self._write_state(ready=True)
        return self

    def _clean_nodes(self) -> None:
        for node in self.nodes:
            shutil.rmtree(node.datadir, ignore_errors=True)
        self.nodes = []

    def check_directory(self) -> None:
        """Refuse a directory where a network of ours still runs."""
        if (self.directory / STATE_FILE).exists():
            state = read_state(self.directory)
            if any(pid_alive(p) and is_ours(p, self.directory) for p in state_pids(state)):
                raise TestnetError(f"{self.directory}: a network is already running there "
                                   f"(torroute testnet down --dir {self.directory})")

    def _prepare(self, check: bool = True) -> None:
        if check:
            self.check_directory()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        (self.directory / "torrc-defaults").write_text("")  # never /etc/tor/torrc-defaults
        # ports: 3 per authority, 2 per relay, 1 hs, 4 client (the last one, DNS, also UDP)
        count = AUTHORITIES * 3 + RELAYS * 2 + 1 + 4
        ports_all = free_ports(count, udp_too=[count - 1])
        ports = iter(ports_all)
        self.nodes = []
        for i in range(AUTHORITIES):
            self.nodes.append(Node(f"auth{i}", "authority", self.directory / f"auth{i}",
                                   next(ports), or_port=next(ports), dir_port=next(ports)))
        for i in range(RELAYS):
            self.nodes.append(Node(f"relay{i}", "relay", self.directory / f"relay{i}",
                                   next(ports), or_port=next(ports)))
        self.nodes.append(Node("hs", "hs", self.directory / "hs", next(ports)))
        self.nodes.append(Node("client", "client", self.directory / "client", next(ports)))
        self.socks_port, self.socks_ext_port, self.dns_port = next(ports), next(ports), next(ports)
        if self.latency_ms:
            taken = set(ports_all)
            extra = [p for p in free_ports(2 * AUTHORITIES + 2 * RELAYS) if p not in taken]
            for node, port in zip([n for n in self.nodes if n.or_port], extra, strict=False):
                node.or_bind_port = port
        for node in self.nodes:
            (node.datadir / "keys").mkdir(parents=True, exist_ok=True)
            os.chmod(node.datadir, 0o700)
            os.chmod(node.datadir / "keys", 0o700)
        self._write_state(ready=False)
        self._make_keys()
        self._say("keys and fingerprints made")

    def _run_checked(self, args: list[str], node: Node, stdin: bytes = b"") -> str:
        proc = subprocess.run(args, input=stdin, capture_output=True, timeout=60)
        if proc.returncode != 0:
            raise BootError(f"{Path(args[0]).name} failed (exit {proc.returncode})", node.name,
                            (proc.stdout + proc.stderr).decode(errors="replace")[-2000:])
        return proc.stdout.decode(errors="replace")

    def _make_keys(self) -> None:
        """Authority keys (tor-gencert) and relay fingerprints (tor --list-fingerprint), in
        parallel threads: it is most of the boot's CPU time."""
        errors: list[BaseException] = []

        def gencert(node: Node) -> None:
            keys = node.datadir / "keys"
            self._run_checked([self.tor_gencert, "--create-identity-key", "--passphrase-fd", "0",
                               "-i", str(keys / "authority_identity_key"),
                               "-s", str(keys / "authority_signing_key"),
                               "-c", str(keys / "authority_certificate"),
                               "-m", "12", "-a", f"127.0.0.1:{node.dir_port}"], node, b"\n")
            cert = (keys / "authority_certificate").read_text()
            node.v3ident = re.search(r"^fingerprint (\w+)", cert, re.M).group(1)

        def fingerprint(node: Node) -> None:
            throwaway = node.datadir / "torrc.fingerprint"
            text = self._common_lines(node, ["DirAuthority placeholder orport=1 no-v2 "
                                             "127.0.0.1:1 " + "0" * 40])
            text += self._relay_lines(node)
            throwaway.write_text(text)
            check_torrc(text, _read_text)
            out = self._run_checked([self.tor, "--defaults-torrc",
                                     str(self.directory / "torrc-defaults"),
                                     "-f", str(throwaway), "--list-fingerprint", "--quiet"],
                                    node)
            match = re.search(rf"^{node.name} ((?:[0-9A-F]{{4}} ?){{10}})", out, re.M)
            if not match:
                raise BootError(f"no fingerprint in tor --list-fingerprint output: {out!r}",
                                node.name)
            node.fingerprint = match.group(1).replace(" ", "")

        def guarded(fn: Callable[[Node], None], node: Node) -> None:
            try:
                fn(node)
            except BaseException as exc:  # re-raised in the main thread
                errors.append(exc)

        threads = []
        for node in self.nodes:
            if node.role == "authority":
                threads.append(threading.Thread(target=lambda n=node: (
                    guarded(gencert, n), guarded(fingerprint, n))))
            elif node.role == "relay":
                threads.append(threading.Thread(target=guarded, args=(fingerprint, node)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    # ---- torrc generation

    def _dirauthority_lines(self) -> list[str]:
        return [f"DirAuthority {n.name} orport={n.or_port} no-v2 v3ident={n.v3ident} "
                f"127.0.0.1:{n.dir_port} {n.fingerprint}"
                for n in self.nodes if n.role == "authority"]

    def _common_lines(self, node: Node, dirauths: list[str]) -> str:
        lines = [
            "# generated by torroute.testing.testnet: a private, loopback-only test network",
            "GeoIPFile /dev/null",
            "GeoIPv6File /dev/null",
            "TestingTorNetwork 1",
            f"DataDirectory {node.datadir}",
            f"Nickname {node.name}",
            "RunAsDaemon 0",
            "Sandbox 0",
            f"PidFile {node.datadir / 'tor.pid'}",
            f"ControlPort 127.0.0.1:{node.control_port}",
            "CookieAuthentication 1",
            f"Log notice file {node.log_path}",
            "SafeLogging 0",
            "ShutdownWaitLength 0",
            f"__OwningControllerProcess {self.owner_pid}",
            "ClientUseIPv4 1",
            "ClientUseIPv6 0",
            "UseDefaultFallbackDirs 0",
            "Address 127.0.0.1",
            "PathsNeededToBuildCircuits 0.67",
            *dirauths,
        ]
        return "\n".join(lines) + "\n"

    def _relay_lines(self, node: Node) -> str:
        lines = [
            "SocksPort 0",
            *([f"ORPort 127.0.0.1:{node.or_port}"] if not node.or_bind_port else
              [f"ORPort 127.0.0.1:{node.or_port} NoListen",  # the latency proxy's
               f"ORPort 127.0.0.1:{node.or_bind_port} NoAdvertise"]),
            "AddressDisableIPv6 1",
            "AssumeReachable 1",
            "ExitRelay 0",
            "ExitPolicy reject *:*",
            "ServerDNSDetectHijacking 0",
            "ServerDNSTestAddresses",
            f"ServerDNSResolvConfFile {self.directory / 'resolv.conf'}",
            f"ContactInfo {node.name}@testnet.invalid",
        ]
        return "\n".join(lines) + "\n"

    def torrc(self, node: Node, offset: int = 0) -> str:
        """The full torrc of ``node`` (fingerprints must be known)."""
        text = self._common_lines(node, self._dirauthority_lines())
        if node.role in ("authority", "relay"):
            text += self._relay_lines(node)
        if node.role == "authority":
            text += "\n".join([
                f"DirPort 127.0.0.1:{node.dir_port}",
                "AuthoritativeDirectory 1",
                "V3AuthoritativeDirectory 1",
                f"TestingV3AuthInitialVotingInterval {INITIAL_VOTING_INTERVAL}",
                f"TestingV3AuthInitialVoteDelay {VOTE_DELAY}",
                f"TestingV3AuthInitialDistDelay {DIST_DELAY}",
                f"V3AuthVotingInterval {VOTING_INTERVAL}",
                f"V3AuthVoteDelay {VOTE_DELAY}",
                f"V3AuthDistDelay {DIST_DELAY}",
                "V3AuthNIntervalsValid 2",
                f"TestingV3AuthVotingStartOffset {offset}",
                "TestingDirAuthVoteGuard *",
                "TestingDirAuthVoteHSDir *",
            ]) + "\n"
        else:
            # the voting schedule of the authorities, for the moments without a live consensus:
            # tor then derives the onion time period from V3AuthVotingInterval (default 1 h,
            # which would make the period a day: another blinded key, 0xF0)
            text += (f"V3AuthVotingInterval {VOTING_INTERVAL}\n"
                     f"TestingV3AuthVotingStartOffset {offset}\n")
        if node.role in ("hs", "client"):
            text += "DisableNetwork 1\nFetchDirInfoEarly 1\nFetchDirInfoExtraEarly 1\n"
            if node.role == "hs":
                text += "SocksPort 0\n"
                text += f"HiddenServiceDir {node.datadir / 'onion'}\nHiddenServiceVersion 3\n"
                for vport, target in sorted(self.onion_ports.items()):
                    text += f"HiddenServicePort {vport} {format_hostport(target)}\n"
            else:
                text += "\n".join([
                    f"SocksPort 127.0.0.1:{self.socks_port} IsolateSOCKSAuth",
                    f"SocksPort 127.0.0.1:{self.socks_ext_port} ExtendedErrors IsolateSOCKSAuth",
                    f"DNSPort 127.0.0.1:{self.dns_port}",
                    "AutomapHostsOnResolve 1",
                    "AutomapHostsSuffixes .onion",
                ]) + "\n"
        return text

    # ---- processes

    def _start_all(self) -> None:
        offset = voting_offset(time.time())
        texts = {}
        for node in self.nodes:  # check every torrc before any tor starts
            texts[node.name] = self.torrc(node, offset)
            check_torrc(texts[node.name], _read_text)
        self._start_latency()
        for node in self.nodes:
            node.torrc_path.write_text(texts[node.name])
            with open(node.datadir / "console.log", "wb") as console:
                node.process = subprocess.Popen(
                    [self.tor, "--defaults-torrc", str(self.directory / "torrc-defaults"),
                     "-f", str(node.torrc_path)],
                    stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True)
            node.pid = node.process.pid
        self._write_state(ready=False)
        self._say(f"started {len(self.nodes)} tors (voting offset {offset})")

    def _start_latency(self) -> None:
        """With ``latency_ms``: one proxy process for every ORPort, following the owner as the
        tors do (it exits once the owner or the directory is gone)."""
        if not self.latency_ms:
            return
        mappings = [f"127.0.0.1:{n.or_port}=127.0.0.1:{n.or_bind_port}"
                    for n in self.nodes if n.or_bind_port]
        with open(self.directory / "latency.log", "wb") as log:
            self._latency = subprocess.Popen(
                [sys.executable, "-m", "torroute.testing.latency",
                 "--delay-ms", f"{self.latency_ms:g}", "--owner", str(self.owner_pid),
                 "--dir", str(self.directory), *mappings],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True, close_fds=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))})
        assert self._latency.stdout is not None
        line = self._latency.stdout.readline()
        if not line.startswith(b"ready"):
            self._latency.kill()
            self._latency.wait()
            raise BootError("the latency proxy did not start", "latency",
                            _tail(self.directory / "latency.log"))
        self._latency.stdout.close()
        self.latency_pid = self._latency.pid
        self._say(f"latency proxies: {self.latency_ms:g} ms per hop and direction on "
                  f"{len(mappings)} ORPorts")

    def _check_alive(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None:
                raise BootError(f"tor exited with status {node.process.returncode} during boot",
                                node.name, node.log_tail())

    def _wait(self, what: str, deadline: float, test: Callable[[], object],
              node: Node | None = None, pause: float = 0.1) -> object:
        while True:
            self._check_alive()
            result = test()
            if result:
                return result
            if time.monotonic() > deadline:
                blame = node or self.node("auth0")
                raise BootError(f"timed out waiting for {what}", blame.name, blame.log_tail())
            time.sleep(pause)

    def _controller(self, node: Node, deadline: float) -> ControlConnection:
        """A control connection (cookie auth) to ``node``, kept open for events."""

        def connect() -> ControlConnection | None:
            cookie = node.datadir / "control_auth_cookie"
            if not cookie.exists():
                return None
            try:
                on_event = self._on_event if node.role == "hs" else None
                return ControlConnection(node.control_port, cookie, on_event)
            except OSError:
                return None

        ctl = self._wait(f"{node.name}'s control port", deadline, connect, node)
        self._controllers[node.name] = ctl
        return ctl

    def _on_event(self, event: Reply) -> None:
        desc = parse_hs_desc(event.lines[0].text)  # 650 HS_DESC UPLOADED <address> UNKNOWN ...
        if desc is not None and desc.action == "UPLOADED":
            with self._uploaded_cv:
                self._uploaded.setdefault(desc.address, time.monotonic())
                self._uploaded_cv.notify_all()

    def _stage(self, deadline: float) -> None:
        """Enable the onion service and client only once the consensus lists every relay
        Running: started earlier, they fetch an incomplete consensus and wait for the next."""
        hs, client = self.node("hs"), self.node("client")
        hs_ctl = self._controller(hs, deadline)
        hs_ctl.command("SETEVENTS HS_DESC")
        client_ctl = self._controller(client, deadline)
        hostname = hs.datadir / "onion" / "hostname"
        self.onion = str(self._wait("the onion service's hostname file", deadline,
                                    lambda: _read_text(hostname).strip(), hs))
        self._write_state(ready=False)
        relays = {n.name for n in self.nodes if n.role in ("authority", "relay")}
        consensus = self.node("auth0").datadir / "cached-microdesc-consensus"

        def all_running() -> bool:
            listed = consensus_relays(_read_text(consensus))
            return relays <= {name for name, flags in listed.items() if "Running" in flags}

        self._wait(f"a consensus listing all {len(relays)} relays Running", deadline,
                   all_running, self.node("auth0"), pause=0.1)
        self._say(f"consensus lists all {len(relays)} relays Running")
        hs_ctl.command("SETCONF DisableNetwork=0")
        client_ctl.command("SETCONF DisableNetwork=0")

    def _wait_ready(self, deadline: float) -> None:
        client, hs = self.node("client"), self.node("hs")
        client_ctl = self._controllers["client"]

        def bootstrapped() -> bool:
            return "PROGRESS=100" in client_ctl.getinfo("status/bootstrap-phase")

        self._wait("the client to bootstrap", deadline, bootstrapped, client, pause=0.1)
        self._say("client bootstrapped 100%")
        address = self.onion.removesuffix(".onion")
        self._wait("the onion descriptor upload (HS_DESC UPLOADED)", deadline,
                   lambda: address in self._uploaded, hs, pause=0.1)
        self._say("onion descriptor uploaded")
        vport = min(self.onion_ports)
        self._wait_reachable(self.onion, vport, self.onion_ports[vport], deadline)

    def _wait_reachable(self, onion: str, vport: int, target: HostPort, deadline: float) -> None:
        reply = self.wait_onion_reachable(onion, vport, target, deadline=deadline)
        if reply == SOCKS_OK:
            self._say(f"onion reachable through SOCKS ({onion})")
        else:
            self._say(f"onion reachable through SOCKS ({onion}); note: nothing listens "
                      f"on {format_hostport(target)} yet")

    def wait_onion_reachable(self, onion: str, vport: int, target: HostPort, *,
                             deadline: float) -> int:
        """Retry a real SOCKS connect to ``onion:vport`` (whose service maps it to ``target``)
        until :func:`onion_ready` judges the reply a success; returns that reply.

        0xF0 = the client has no descriptor yet, or raced the upload to the other HSDirs: ask
        again after 1 s.  No reply at all (a hung stream): NEWNYM, then ask again.
        """
        last: int | None = None

        def attempt() -> bool:
            nonlocal last
            last = socks_probe(self.socks_extended, onion, vport,
                               timeout=max(1.0, min(15.0, deadline - time.monotonic())))
            return onion_ready(last, target)

        while not attempt():
            self._check_alive()
            if time.monotonic() > deadline:
                client = self.node("client")
                raise BootError(f"SOCKS connect to {onion}:{vport} (-> {format_hostport(target)}) "
                                f"never succeeded: {_probe_failure(last, target)}",
                                client.name, client.log_tail())
            if last is None:
                # the stream hung (seen once under load: every HSDir fetch failed, "No more
                # HSDir available to query"): NEWNYM purges the client's onion-service state
                # and circuits, so the next attempt fetches the descriptor afresh
                self.newnym()
            time.sleep(1.0 if last == SOCKS_DESCRIPTOR_NOT_FOUND else 0.3)
        assert last is not None
        return last

    # ---- more onion services

    def add_onion(self, ports: Mapping[int, HostPort], timeout: float = 60.0,
                  wait: bool = True) -> str:
        """A new ephemeral v3 onion service (``ADD_ONION``) on the onion-service tor, mapping
        virtual ports to loopback targets; returns ``<56>.onion`` once reachable (``wait``)."""
        for vport, target in ports.items():
            if not is_loopback_ipv4(target[0]):
                raise UnsafeTorrc(f"onion port {vport}: target {target} is not loopback")
        ctl = self._controllers.get("hs") or self._controller(self.node("hs"),
                                                              time.monotonic() + 10)
        spec = " ".join(f"Port={v},{format_hostport(t)}" for v, t in sorted(ports.items()))
        reply = ctl.command(f"ADD_ONION NEW:ED25519-V3 Flags=Detach,DiscardPK {spec}")
        match = re.search(r"ServiceID=([a-z2-7]{56})", "\n".join(reply.texts))
        if not match:
            raise TestnetError(f"ADD_ONION failed: {reply.texts}")
        onion = match.group(1) + ".onion"
        if wait:
            deadline = time.monotonic() + timeout
            with self._uploaded_cv:
                self._uploaded_cv.wait_for(lambda: match.group(1) in self._uploaded,
                                           timeout=timeout)
            vport = min(ports)
            try:
                self._wait_reachable(onion, vport, ports[vport], deadline)
            except BaseException:
                with contextlib.suppress(Exception):  # keep the first error (hs tor gone?)
                    self.remove_onion(onion)
                raise
        return onion

    def remove_onion(self, onion: str) -> None:
        ctl = self._controllers.get("hs")
        if ctl is not None:
            ctl.command(f"DEL_ONION {onion.removesuffix('.onion')}")

    def newnym(self) -> None:
        """SIGNAL NEWNYM on the client: new circuits (measures cold connects)."""
        ctl = self._controllers.get("client") or self._controller(self.node("client"),
                                                                  time.monotonic() + 10)
        ctl.command("SIGNAL NEWNYM")

    # ---- state, status, stop

    def _write_state(self, ready: bool) -> None:
        state = {"version": STATE_VERSION, "ready": ready, "owner_pid": self.owner_pid,
                 "keeper_pid": self.keeper_pid, "nodes": {n.name: n.to_json() for n in self.nodes},
                 "created": time.time(), **({"info": self.info()} if self.nodes else {})}
        tmp = self.directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.directory / STATE_FILE)

    def close_controllers(self) -> None:
        for ctl in self._controllers.values():
            ctl.close()
        self._controllers.clear()

    def stop_processes(self, keeper: bool = True) -> None:
        """SIGTERM our tors (and the keeper) by pid (they exit at once: ShutdownWaitLength 0)."""
        self.close_controllers()
        pids = [n.pid for n in self.nodes if n.pid]
        if self.latency_pid:
            pids.append(self.latency_pid)
        stop_pids(pids, self.directory)
        if self._latency is not None:
            try:
                self._latency.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._latency = None
            self.latency_pid = None
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        if keeper and self.keeper_pid:
            stop_pids([self.keeper_pid], self.directory)

    def down(self, keep: bool = False) -> None:
        self.stop_processes()
        if not keep:
            remove_directory(self.directory)

    def rss_kib(self) -> dict[str, int]:
        return {n.name: rss_kib(n.pid) for n in self.nodes if n.pid}

    def __enter__(self) -> PrivateNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def _package_root() -> str:
    """The directory holding this torroute package (the proxy runs the same code)."""
    return str(Path(__file__).resolve().parent.parent.parent)


def _read_text(path: Path | str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""
