#!/opt/torroute/bin/python
"""Lookup-daemon benchmark: torroute serve vs onionrouter 0.6.2, side by side, one run.

Both daemons get the same real dnsmasq (SRV records) and the same onionmx map.yml, and are
driven by the same blocking tcp_table client (Postfix's protocol, ``get <key>\\n``):

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

    bench/lookup.py [--onionrouter-venv /opt/onionrouter-venv] [--quick]
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds; the median of each figure is reported (default 3)")
    args = ap.parse_args()
    scale = 0.1 if args.quick else 1.0
    n_static, n_srv, n_new = int(20000 * scale), int(5000 * scale), int(3000 * scale)

    onionrouter_bin = Path(args.onionrouter_venv) / "bin" / "onionrouter"
    if not onionrouter_bin.exists():
        print(f"onionrouter missing: python3 -m venv {args.onionrouter_venv} && "
              f"{args.onionrouter_venv}/bin/pip install onionrouter==0.6.2", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="torroute-bench-"))
    procs: list[subprocess.Popen] = []
    dns = None
    try:
        pinned = {f"pin{i}.bench.test": make_onion(1000 + i) for i in range(N_PINNED)}
        srv = {f"srv{i}.bench.test": make_onion(2000 + i) for i in range(N_SRV)}
        dns = Dnsmasq(srv=[SrvRecord(f"_onion-mx._tcp.{d}", o) for d, o in srv.items()],
                      local_domains=["bench.test"], ttl=300).start()
        map_yml = work / "map.yml"
        map_yml.write_text("---\n" + "".join(f"{o}:\n  - {d}\n" for d, o in pinned.items()))

        # onionrouter, in its own venv with the shim
        shim_dir = work / "shim"
        shim_dir.mkdir()
        (shim_dir / "sitecustomize.py").write_text(SHIM)
        or_conf = work / "onionrouter"
        or_conf.mkdir()
        (or_conf / "onionrouter.ini").write_text(ONIONROUTER_INI.format(port=dns.port))
        or_port = free_port()
        or_log = open(work / "onionrouter.log", "w")
        procs.append(subprocess.Popen(
            [str(onionrouter_bin), "--config", str(or_conf), "--mappings", str(map_yml),
             "--host", "127.0.0.1", "--port", str(or_port)],
            stdout=or_log, stderr=or_log, env={"PATH": "/usr/bin:/bin",
                                               "PYTHONPATH": str(shim_dir)}))
        # torroute, same map and dnsmasq, default settings (decision log lines on, to a file)
        tr_conf = work / "torroute.toml"
        tr_conf.write_text(f'[routing]\nmaps = ["{map_yml}"]\n'
                           f'nameservers = ["127.0.0.1:{dns.port}"]\n')
        tr_port = free_port()
        tr_log = open(work / "torroute.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torroute.cli", "serve", "--config", str(tr_conf),
             "--tcp-table", f"inet:127.0.0.1:{tr_port}"],
            stdout=tr_log, stderr=tr_log, cwd=REPO,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}))
        noop_port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", NOOP_SERVER, str(noop_port)]))
        wait_port(or_port)
        wait_port(tr_port)
        wait_port(noop_port)

        daemons = {"onionrouter": (or_port, procs[0].pid), "torroute": (tr_port, procs[1].pid)}
        static_keys = [f"user{i}@{d}" for i, d in zip(range(n_static), _cycle(list(pinned)),
                                                      strict=False)]
        srv_keys = [f"user{i}@{d}" for i, d in zip(range(n_srv), _cycle(list(srv)), strict=False)]
        new_keys = static_keys[:n_new]
        for port, _pid in daemons.values():  # warm both (torroute caches SRV answers)
            for d in srv:
                persistent(port, [f"warm@{d}"], b"200 ")
        rounds: dict[str, list[dict]] = {name: [] for name in daemons}
        floor: list[dict] = []
        load_before = os.getloadavg()[0]
        for _ in range(args.rounds):
            # interleaved, so that load from elsewhere on the machine hits both alike
            for name, (port, pid) in daemons.items():
                r = {"static": persistent(port, static_keys, b"200 "),
                     "srv": persistent(port, srv_keys, b"200 "),
                     "newconn": new_connections(port, new_keys, b"200 ")}
                time.sleep(0.5)  # let onionrouter's per-connection processes exit
                r["mem_idle"], r["mem_busy"] = memory_with_client(pid, port, static_keys[0])
                rounds[name].append(r)
            floor.append({"static": persistent(noop_port, static_keys, b"200 "),
                          "newconn": new_connections(noop_port, new_keys, b"200 ")})
        results = {name: median_of(rs) for name, rs in rounds.items()}
        results["floor"] = {k: {f: statistics.median(r[k][f] for r in floor) for f in floor[0][k]}
                            for k in ("static", "newconn")}
        print(f"load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f} "
              f"({os.cpu_count()} CPUs); median of {args.rounds} interleaved rounds")
        report(results, n_static, n_srv, n_new)
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if dns is not None:
            dns.stop()
        shutil.rmtree(work, ignore_errors=True)


def median_of(rounds: list[dict]) -> dict:
    """Per-figure median over rounds (memory: the largest seen)."""
    out: dict = {}
    for key in ("static", "srv", "newconn"):
        out[key] = {f: statistics.median(r[key][f] for r in rounds) for f in rounds[0][key]}
    for key in ("mem_idle", "mem_busy"):
        out[key] = max((r[key] for r in rounds), key=lambda m: m[0])
    return out


def _cycle(items: list[str]):
    while True:
        yield from items


def report(results: dict, n_static: int, n_srv: int, n_new: int) -> None:
    o, t = results["onionrouter"], results["torroute"]
    us = 1e6
    print(f"lookup daemons, tcp_table, one blocking client; {n_static} static, {n_srv} SRV, "
          f"{n_new} new-connection lookups")
    print(f"{'':34}{'onionrouter':>14}{'torroute':>14}{'ratio':>9}")
    rows = [
        ("static lookups/s (1 connection)", o["static"]["qps"], t["static"]["qps"], "x"),
        ("  static p50 latency (us)", o["static"]["p50"] * us, t["static"]["p50"] * us, "/"),
        ("  static p99 latency (us)", o["static"]["p99"] * us, t["static"]["p99"] * us, "/"),
        ("SRV lookups/s (repeat, 1 conn)", o["srv"]["qps"], t["srv"]["qps"], "x"),
        ("  SRV p50 latency (us)", o["srv"]["p50"] * us, t["srv"]["p50"] * us, "/"),
        ("  SRV p99 latency (us)", o["srv"]["p99"] * us, t["srv"]["p99"] * us, "/"),
        ("new connection + lookup /s", o["newconn"]["qps"], t["newconn"]["qps"], "x"),
        ("  new-conn p50 latency (us)", o["newconn"]["p50"] * us, t["newconn"]["p50"] * us, "/"),
        ("  new-conn p99 latency (us)", o["newconn"]["p99"] * us, t["newconn"]["p99"] * us, "/"),
        ("RSS idle (MB)", o["mem_idle"][0] / 1024, t["mem_idle"][0] / 1024, "/"),
        ("RSS with 1 client (MB)", o["mem_busy"][0] / 1024, t["mem_busy"][0] / 1024, "/"),
        ("PSS with 1 client (MB)", o["mem_busy"][1] / 1024, t["mem_busy"][1] / 1024, "/"),
    ]
    for label, ov, tv, kind in rows:
        # "x": higher is better (torroute/onionrouter); "/": lower is better (onionrouter/torroute)
        ratio = tv / ov if kind == "x" else ov / tv
        print(f"{label:34}{ov:14.1f}{tv:14.1f}{ratio:8.2f}x")
    print("ratio: how many times better torroute is (throughput: t/o; latency and memory: o/t)")
    f = results["floor"]
    print(f"\nno-op server (fake, does no lookup) with the same client: "
          f"{f['static']['qps']:.0f} q/s, p50 {f['static']['p50'] * us:.1f} us; "
          f"new connections {f['newconn']['qps']:.0f}/s, p50 {f['newconn']['p50'] * us:.1f} us")
    o_cost = o["static"]["p50"] - f["static"]["p50"]
    t_cost = t["static"]["p50"] - f["static"]["p50"]
    print(f"daemon time per static lookup above that floor (p50): onionrouter "
          f"{o_cost * us:.1f} us, torroute {t_cost * us:.1f} us "
          f"({o_cost / t_cost if t_cost > 0 else float('inf'):.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
