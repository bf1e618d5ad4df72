#!/opt/torroute/bin/python
"""Lookup-daemon benchmark: torroute serve vs onionrouter 0.6.2, side by side, one run.

Both daemons get the same real dnsmasq (SRV records) and the same onionmx map.yml, and are
driven by the same blocking tcp_table client (Postfix's protocol, ``get <key>\\n``):

  cold     lookups/s on a cold cache: 8 concurrent tcp_table clients (persistent connections,
           as Postfix keeps them), every domain asked once, a quarter with an SRV record and
           the rest NXDOMAIN; once with dnsmasq ``--local-ttl=300`` and once with TTL 0
           (dnsmasq's own default: nothing may be cached)
  static   lookups/s of pinned domains on one persistent connection (+ p50/p99 latency)
  srv      lookups/s of SRV domains, repeated, on one persistent connection
  newconn  connect + one lookup + close, per second (+ p50/p99)
  rss      resident memory after the runs (onionrouter: its listener plus, while a client is
           connected, the process it forks per connection; PSS counts shared pages once)

onionrouter is installed from PyPI into its own venv (default /opt/onionrouter-venv).  Its
0.6.2 calls ``yaml.load()`` without a Loader, which PyYAML 6 refuses, so it runs with a
``sitecustomize.py`` shim (written by this script) that makes ``yaml.load`` default to
``SafeLoader``; the shim also builds dnspython resolvers with ``configure=False`` (onionrouter
sets its nameservers itself), so nothing reads /etc/resolv.conf.  Loopback only.

    bench/lookup.py [--onionrouter-venv /opt/onionrouter-venv] [--quick] [--only cold]
                    [--cold 4000] [--clients 8] [--profile-torroute FILE.prof]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support.onions import make_onion  # noqa: E402  (tests/support/onions.py: valid v3 addresses)

from torroute.testing.dnsmasq import Dnsmasq, SrvRecord  # noqa: E402
from torroute.testing.ports import free_port  # noqa: E402

SHIM = '''\
# bench/lookup.py: shim for onionrouter 0.6.2 under PyYAML 6 (yaml.load needs a Loader)
import yaml as _yaml

_load = _yaml.load


def _safe_load(stream, Loader=None):
    return _load(stream, Loader=Loader or _yaml.SafeLoader)


_yaml.load = _safe_load

# never let dnspython read /etc/resolv.conf: onionrouter sets nameservers/port itself
import dns.resolver as _resolver

_init = _resolver.Resolver.__init__


def _init_unconfigured(self, filename="/etc/resolv.conf", configure=False):
    _init(self, filename=filename, configure=False)


_resolver.Resolver.__init__ = _init_unconfigured
'''

ONIONROUTER_INI = """\
[RESOLVER]
resolver_ip:         127.0.0.1
resolver_port:       {port}
tcp:                 False

[DOMAIN]
hostname:            myself.bench

[DNS]
srv_record:          _onion-mx._tcp.

[REROUTE]
onion_transport:     smtptor

[IGNORED]
domains:             ignored.bench
"""

# A no-op server (fake: does no lookup at all) answering every line at once: the ceiling this
# client and kernel allow, so the figures can be read as "client+kernel floor + daemon time".
NOOP_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(4096)
        if not d:
            break
        c.sendall(b"200 x\\n" * d.count(b"\\n"))
    c.close()
"""

N_PINNED = 200
N_SRV = 20


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Client:
    """Blocking tcp_table client, one request at a time (as Postfix's tcp client does)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None

    def connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(self, key: str) -> bytes:
        assert self.sock is not None
        self.sock.sendall(b"get " + key.encode() + b"\n")
        data = self.sock.recv(4096)
        while not data.endswith(b"\n"):
            more = self.sock.recv(4096)
            if not more:
                break
            data += more
        return data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def persistent(port: int, keys: list[str], expect: bytes) -> dict:
    client = Client(port)
    client.connect()
    client.get(keys[0])  # warm up (and let torroute cache the SRV answer, as it would)
    lat = []
    started = time.perf_counter()
    for key in keys:
        t0 = time.perf_counter()
        answer = client.get(key)
        lat.append(time.perf_counter() - t0)
        if not answer.startswith(expect):
            raise RuntimeError(f"unexpected answer for {key}: {answer!r}")
    elapsed = time.perf_counter() - started
    client.close()
    return {"qps": len(keys) / elapsed, "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)}


def new_connections(port: int, keys: list[str], expect: bytes) -> dict:
    lat = []
    started = time.perf_counter()
    for key in keys:
        t0 = time.perf_counter()
        client = Client(port)
        client.connect()
        answer = client.get(key)
        client.close()
        lat.append(time.perf_counter() - t0)
        if not answer.startswith(expect):
            raise RuntimeError(f"unexpected answer for {key}: {answer!r}")
    elapsed = time.perf_counter() - started
    return {"qps": len(keys) / elapsed, "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)}


def _cold_client(port: int, work: list[tuple[str, bytes]], go, out) -> None:
    """One of the concurrent cold-cache clients (a forked process): its domains, each once."""
    client = Client(port)
    client.connect()
    go.wait()
    started = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    bad = []
    for domain, expect in work:
        answer = client.get(f"user@{domain}")
        if not answer.startswith(expect):
            bad.append(f"{domain}: {answer!r}")
    out.put((started, time.perf_counter(), len(work), bad[:3], len(bad)))
    client.close()


def cold(port: int, domains: list[tuple[str, bytes]], clients: int) -> dict:
    """lookups/s of ``clients`` concurrent connections over ``domains`` (each asked once)."""
    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_cold_client, args=(port, domains[i::clients], go, out))
             for i in range(clients)]
    for proc in procs:
        proc.start()
    time.sleep(0.3)  # all connected
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    bad = sum(r[4] for r in results)
    if bad:
        raise RuntimeError(f"{bad} unexpected answers, e.g. {[b for r in results for b in r[3]]}")
    elapsed = max(r[1] for r in results) - min(r[0] for r in results)
    return {"qps": sum(r[2] for r in results) / elapsed}


def plain_udp(port: int, domains: list[tuple[str, bytes]], window: int) -> dict:
    """Questions/s dnsmasq answers to a plain UDP client (``window`` in flight, one socket):
    the ceiling of the resolver itself for the same SRV questions."""
    import dns.message
    import dns.rdatatype

    wires = []
    for i, (domain, _expect) in enumerate(domains):
        q = dns.message.make_query(f"_onion-mx._tcp.{domain}", dns.rdatatype.SRV)
        q.id = i % 65536
        wires.append(q.to_wire())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(2)
    started = time.perf_counter()
    sent = answered = 0
    while answered < len(wires):
        while sent < len(wires) and sent - answered < window:
            sock.send(wires[sent])
            sent += 1
        try:
            sock.recv(4096)
        except TimeoutError:
            raise RuntimeError("dnsmasq stopped answering") from None
        answered += 1
    elapsed = time.perf_counter() - started
    sock.close()
    return {"qps": len(wires) / elapsed}


def cold_domains(tag: str, n: int) -> list[tuple[str, bytes]]:
    """``n`` fresh names: every fourth has an SRV record (answer 200), the rest NXDOMAIN (500)."""
    return [(f"{tag}-{i}.cold.test", b"200 " if i % 4 == 0 else b"500 ") for i in range(n)]


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB of a process and all its descendants."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            pids.append(int(child))
    rss = pss = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def memory_with_client(pid: int, port: int, key: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Memory idle, and while one client connection is open (after one lookup)."""
    idle = memory(pid)
    client = Client(port)
    client.connect()
    client.get(key)
    time.sleep(0.3)
    busy = memory(pid)
    client.close()
    return idle, busy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onionrouter-venv", default="/opt/onionrouter-venv")
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--only", choices=("all", "cold", "warm"), default="all",
                    help="cold: only the cold-cache figures; warm: only static/SRV/newconn")
    ap.add_argument("--cold", type=int, default=4000,
                    help="cold-cache lookups per daemon, round and TTL case (default 4000)")
    ap.add_argument("--clients", type=int, default=8,
                    help="concurrent clients of the cold-cache run (default 8)")
    ap.add_argument("--torroute-src", metavar="DIR", default=str(REPO),
                    help="source tree torroute serve runs from (default: this checkout; e.g. "
                         "`git archive` of an older commit, for before/after figures)")
    ap.add_argument("--profile-torroute", metavar="FILE",
                    help="run torroute serve under cProfile, stats to FILE at the end")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds; the median of each figure is reported (default 3)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the clean-up below
    scale = 0.1 if args.quick else 1.0
    n_static, n_srv, n_new = int(20000 * scale), int(5000 * scale), int(3000 * scale)
    n_cold = max(args.clients * 4, int(args.cold * scale))

    onionrouter_bin = Path(args.onionrouter_venv) / "bin" / "onionrouter"
    if not onionrouter_bin.exists():
        print(f"onionrouter missing: python3 -m venv {args.onionrouter_venv} && "
              f"{args.onionrouter_venv}/bin/pip install onionrouter==0.6.2", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="torroute-bench-"))
    procs: list[subprocess.Popen] = []
    dns = None
    dnsmasqs: list[Dnsmasq] = []
    try:
        pinned = {f"pin{i}.bench.test": make_onion(1000 + i) for i in range(N_PINNED)}
        srv = {f"srv{i}.bench.test": make_onion(2000 + i) for i in range(N_SRV)}
        cold_sets = {(r, name, ttl): cold_domains(f"r{r}{name[0]}{ttl}", n_cold)
                     for r in range(args.rounds) for name in ("onionrouter", "torroute")
                     for ttl in (300, 0)}
        onions = [make_onion(3000 + i) for i in range(100)]
        records = [SrvRecord(f"_onion-mx._tcp.{d}", o) for d, o in srv.items()]
        dns = Dnsmasq(srv=records, local_domains=["bench.test", "cold.test"], ttl=300).start()
        dns0 = Dnsmasq(srv=records, local_domains=["bench.test", "cold.test"], ttl=0).start()
        dnsmasqs.append(dns0)

        def fresh_dnsmasq(server: Dnsmasq, domains: list[tuple[str, bytes]]) -> None:
            """The same dnsmasq (port, TTL) restarted with the SRV records of one cold run only:
            dnsmasq scans its SRV records linearly for every question, so the records of all
            runs at once would make it, not the daemons, the bottleneck."""
            conf = work / f"cold-{server.port}.conf"
            with open(conf, "w") as f:
                for i, (domain, expect) in enumerate(domains):
                    if expect == b"200 ":
                        f.write(f"srv-host=_onion-mx._tcp.{domain},{onions[i % 100]},25,0,5\n")
            server.stop()
            server.extra = [f"--conf-file={conf}"]
            server.start()

        map_yml = work / "map.yml"
        map_yml.write_text("---\n" + "".join(f"{o}:\n  - {d}\n" for d, o in pinned.items()))

        # onionrouter, in its own venv with the shim
        shim_dir = work / "shim"
        shim_dir.mkdir()
        (shim_dir / "sitecustomize.py").write_text(SHIM)

        def start_onionrouter(dns_port: int, tag: str) -> int:
            or_conf = work / f"onionrouter-{tag}"
            or_conf.mkdir()
            (or_conf / "onionrouter.ini").write_text(ONIONROUTER_INI.format(port=dns_port))
            port = free_port()
            or_log = open(work / f"onionrouter-{tag}.log", "w")
            procs.append(subprocess.Popen(
                [str(onionrouter_bin), "--config", str(or_conf), "--mappings", str(map_yml),
                 "--host", "127.0.0.1", "--port", str(port)],
                stdout=or_log, stderr=or_log, env={"PATH": "/usr/bin:/bin",
                                                   "PYTHONPATH": str(shim_dir)}))
            return port

        # torroute, same map and dnsmasq, default settings (decision log lines on, to a file)
        def start_torroute(dns_port: int, tag: str, profile: str | None = None) -> int:
            tr_conf = work / f"torroute-{tag}.toml"
            tr_conf.write_text(f'[routing]\nmaps = ["{map_yml}"]\n'
                               f'nameservers = ["127.0.0.1:{dns_port}"]\n')
            port = free_port()
            tr_log = open(work / f"torroute-{tag}.log", "w")
            prof = ["-m", "cProfile", "-o", profile] if profile else []
            procs.append(subprocess.Popen(
                [sys.executable, *prof, "-m", "torroute.cli", "serve", "--config", str(tr_conf),
                 "--tcp-table", f"inet:127.0.0.1:{port}"],
                stdout=tr_log, stderr=tr_log, cwd=args.torroute_src,
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": args.torroute_src}))
            return port

        or_port = start_onionrouter(dns.port, "ttl300")
        tr_port = start_torroute(dns.port, "ttl300", args.profile_torroute)
        or0_port = start_onionrouter(dns0.port, "ttl0")
        tr0_port = start_torroute(dns0.port, "ttl0")
        noop_port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", NOOP_SERVER, str(noop_port)]))
        wait_port(or_port)
        wait_port(tr_port)
        wait_port(noop_port)
        for port in (or0_port, tr0_port):
            wait_port(port)

        daemons = {"onionrouter": (or_port, procs[0].pid), "torroute": (tr_port, procs[1].pid)}
        static_keys = [f"user{i}@{d}" for i, d in zip(range(n_static), _cycle(list(pinned)),
                                                      strict=False)]
        srv_keys = [f"user{i}@{d}" for i, d in zip(range(n_srv), _cycle(list(srv)), strict=False)]
        new_keys = static_keys[:n_new]
        ttl0 = {"onionrouter": or0_port, "torroute": tr0_port}
        warm = args.only != "cold"
        for port, _pid in daemons.values():  # warm both (torroute caches SRV answers)
            for d in srv:
                persistent(port, [f"warm@{d}"], b"200 ")
            persistent(port, static_keys[:50], b"200 ")
        for port in ttl0.values():
            persistent(port, static_keys[:50], b"200 ")
        rounds: dict[str, list[dict]] = {name: [] for name in daemons}
        floor: list[dict] = []
        load_before = os.getloadavg()[0]
        for rnd in range(args.rounds):
            # interleaved, so that load from elsewhere on the machine hits both alike
            for name, (port, pid) in daemons.items():
                r: dict = {}
                if args.only != "warm":
                    fresh_dnsmasq(dns, cold_sets[rnd, name, 300])
                    r["cold"] = cold(port, cold_sets[rnd, name, 300], args.clients)
                    r["udp"] = plain_udp(dns.port, cold_sets[rnd, name, 300], args.clients)
                    fresh_dnsmasq(dns0, cold_sets[rnd, name, 0])
                    r["cold0"] = cold(ttl0[name], cold_sets[rnd, name, 0], args.clients)
                if warm:
                    r.update({"static": persistent(port, static_keys, b"200 "),
                              "srv": persistent(port, srv_keys, b"200 "),
                              "newconn": new_connections(port, new_keys, b"200 ")})
                time.sleep(0.5)  # let onionrouter's per-connection processes exit
                r["mem_idle"], r["mem_busy"] = memory_with_client(pid, port, static_keys[0])
                rounds[name].append(r)
            if warm:
                floor.append({"static": persistent(noop_port, static_keys, b"200 "),
                              "newconn": new_connections(noop_port, new_keys, b"200 ")})
        results = {name: median_of(rs) for name, rs in rounds.items()}
        if warm:
            results["floor"] = {k: {f: statistics.median(r[k][f] for r in floor)
                                    for f in floor[0][k]} for k in ("static", "newconn")}
        print(f"load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f} "
              f"({os.cpu_count()} CPUs); median of {args.rounds} interleaved rounds")
        report(results, n_static, n_srv, n_new, n_cold, args.clients)
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT if args.profile_torroute else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if dns is not None:
            dns.stop()
        for server in dnsmasqs:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def median_of(rounds: list[dict]) -> dict:
    """Per-figure median over rounds (memory: the largest seen)."""
    out: dict = {}
    for key in ("cold", "cold0", "udp", "static", "srv", "newconn"):
        if key in rounds[0]:
            out[key] = {f: statistics.median(r[key][f] for r in rounds) for f in rounds[0][key]}
    for key in ("mem_idle", "mem_busy"):
        out[key] = max((r[key] for r in rounds), key=lambda m: m[0])
    return out


def _cycle(items: list[str]):
    while True:
        yield from items


def report(results: dict, n_static: int, n_srv: int, n_new: int, n_cold: int,
           clients: int) -> None:
    o, t = results["onionrouter"], results["torroute"]
    us = 1e6
    print(f"lookup daemons, tcp_table; {n_cold} cold lookups per run ({clients} concurrent "
          f"clients, 1/4 SRV, 3/4 NXDOMAIN); one blocking client: {n_static} static, {n_srv} "
          f"SRV, {n_new} new-connection lookups")
    print(f"{'':34}{'onionrouter':>14}{'torroute':>14}{'ratio':>9}")
    rows = []
    if "cold" in t:
        rows += [("cold lookups/s (dnsmasq TTL 300)", o["cold"]["qps"], t["cold"]["qps"], "x"),
                 ("cold lookups/s (dnsmasq TTL 0)", o["cold0"]["qps"], t["cold0"]["qps"], "x")]
    if "static" in t:
        rows += [
            ("static lookups/s (1 connection)", o["static"]["qps"], t["static"]["qps"], "x"),
            ("  static p50 latency (us)", o["static"]["p50"] * us, t["static"]["p50"] * us, "/"),
            ("  static p99 latency (us)", o["static"]["p99"] * us, t["static"]["p99"] * us, "/"),
            ("SRV lookups/s (repeat, 1 conn)", o["srv"]["qps"], t["srv"]["qps"], "x"),
            ("  SRV p50 latency (us)", o["srv"]["p50"] * us, t["srv"]["p50"] * us, "/"),
            ("  SRV p99 latency (us)", o["srv"]["p99"] * us, t["srv"]["p99"] * us, "/"),
            ("new connection + lookup /s", o["newconn"]["qps"], t["newconn"]["qps"], "x"),
            ("  new-conn p50 latency (us)", o["newconn"]["p50"] * us,
             t["newconn"]["p50"] * us, "/"),
            ("  new-conn p99 latency (us)", o["newconn"]["p99"] * us,
             t["newconn"]["p99"] * us, "/"),
        ]
    rows += [
        ("RSS idle (MB)", o["mem_idle"][0] / 1024, t["mem_idle"][0] / 1024, "/"),
        ("RSS with 1 client (MB)", o["mem_busy"][0] / 1024, t["mem_busy"][0] / 1024, "/"),
        ("PSS with 1 client (MB)", o["mem_busy"][1] / 1024, t["mem_busy"][1] / 1024, "/"),
    ]
    if "udp" in t:
        udp = statistics.median([o["udp"]["qps"], t["udp"]["qps"]])
        print(f"(dnsmasq alone, plain UDP client, {clients} in flight: {udp:.0f} questions/s)")
    for label, ov, tv, kind in rows:
        # "x": higher is better (torroute/onionrouter); "/": lower is better (onionrouter/torroute)
        ratio = tv / ov if kind == "x" else ov / tv
        print(f"{label:34}{ov:14.1f}{tv:14.1f}{ratio:8.2f}x")
    print("ratio: how many times better torroute is (throughput: t/o; latency and memory: o/t)")
    if "floor" not in results:
        return
    f = results["floor"]
    print(f"\nno-op server (fake, does no lookup) with the same client: "
          f"{f['static']['qps']:.0f} q/s, p50 {f['static']['p50'] * us:.1f} us; "
          f"new connections {f['newconn']['qps']:.0f}/s, p50 {f['newconn']['p50'] * us:.1f} us")
    o_cost = o["static"]["p50"] - f["static"]["p50"]
    t_cost = t["static"]["p50"] - f["static"]["p50"]
    print(f"daemon time per static lookup above that floor (p50): onionrouter "
          f"{o_cost * us:.1f} us, torroute {t_cost * us:.1f} us "
          f"({o_cost / t_cost if t_cost > 0 else float('inf'):.2f}x)")
    # what any daemon could reach end to end with this client: the floor stays in both
    floor_p50 = f["static"]["p50"]
    srv_cost = t["srv"]["p50"] - floor_p50
    print(f"end-to-end p50 ratio a daemon taking no time could reach with this client: static "
          f"{o['static']['p50'] / floor_p50:.2f}x, SRV repeats {o['srv']['p50'] / floor_p50:.2f}x"
          f" (torroute above the floor: SRV repeat {srv_cost * us:.1f} us)")


if __name__ == "__main__":
    sys.exit(main())
