#!/opt/torroute/bin/python
"""Memory of ``torroute serve`` under a fuzz of every listener, and at idle vs onionrouter 0.6.2.

One daemon with all four listeners (socketmap, tcp_table, Exim's line protocol, LMTP) on
loopback and a real dnsmasq behind it (a few SRV domains, NXDOMAIN for the rest) is fuzzed for
``--seconds`` (default 120) by ``--workers`` client processes: each connection gets a batch of
requests -- valid ones for random, never repeated domains (up to the 4 KB request limit),
malformed ones (garbage bytes, bad netstrings, overlong lines, LMTP commands out of order) --
and is closed politely or abruptly.  The daemon's RSS is sampled from ``/proc/PID/status``;
the peak is ``VmHWM``, checked against the bound (``--bound-mb``, default 64).

Idle RSS: torroute serve (tcp_table) and onionrouter (run with bench/lookup.py's shim), same
map, after a few lookups each.  Loopback only; tor is not started (the LMTP relay and Exim's
automap point at closed ports: they defer, which the fuzz also exercises).

    bench/memory.py [--seconds 120] [--workers 4] [--onionrouter-venv /opt/onionrouter-venv]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from lookup import ONIONROUTER_INI, SHIM, Client, wait_port  # noqa: E402  (bench/lookup.py)
from support.onions import make_onion  # noqa: E402

from torroute.testing.dnsmasq import Dnsmasq, SrvRecord  # noqa: E402
from torroute.testing.ports import free_port  # noqa: E402

KINDS = ("socketmap", "tcp_table", "exim", "lmtp")
N_SRV = 50


def status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def tree_rss(pid: int) -> int:
    """RSS (kB) of a process and its children (onionrouter forks per connection)."""
    total = status(pid)["VmRSS"]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        try:
            total += status(int(child))["VmRSS"]
        except (OSError, KeyError):
            pass
    return total


# -- the fuzz -----------------------------------------------------------------------------
def random_domain(rng: random.Random, n: int) -> str:
    roll = rng.random()
    if roll < 0.05:
        return f"srv{rng.randrange(N_SRV)}.fuzz.test"
    if roll < 0.55:
        return f"u{n}-{rng.getrandbits(40):x}.fuzz.test"  # NXDOMAIN, never asked before
    if roll < 0.75:  # long: many labels, up to the request limit
        labels = [f"{rng.getrandbits(30):x}" * rng.randint(1, 8) for _ in range(rng.randint(5, 60))]
        return (".".join(labels) + f".x{n}.fuzz.test")[-rng.randint(200, 4000):]
    if roll < 0.85:
        return "".join(chr(rng.randint(33, 0x2FFF)) for _ in range(rng.randint(1, 300)))
    if roll < 0.9:
        return f"{rng.getrandbits(40):x}.other.example"  # outside dnsmasq's zone: REFUSED
    return f"{rng.getrandbits(80):x}.onion"  # an invalid onion: reject


def garbage(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 600)))


def requests(kind: str, rng: random.Random, n: int) -> bytes:
    """One connection's worth of bytes: a mix of valid and malformed requests."""
    out = []
    if kind == "lmtp":
        out.append(b"LHLO fuzz.test\r\n")
        if rng.random() < 0.8:
            out.append(b"MAIL FROM:<fuzz@fuzz.test>\r\n")
    for i in range(rng.randint(1, 40)):
        key = f"user{i}@{random_domain(rng, n * 100 + i)}".encode("utf-8", "surrogatepass")
        bad = rng.random() < 0.25
        if kind == "tcp_table":
            out.append(garbage(rng) + b"\n" if bad else b"get " + key + b"\n")
        elif kind == "exim":
            out.append(garbage(rng) + b"\n" if bad else b"route " + key + b"\n")
        elif kind == "socketmap":
            if bad:
                out.append(rng.choice([b"99999:", b"x:", b"5:ab,", garbage(rng)]))
            else:
                body = b"transport " + key
                out.append(str(len(body)).encode() + b":" + body + b",")
        else:
            if bad:
                out.append(rng.choice([b"DATA\r\n", b"RCPT TO:<>\r\n", b"BDAT 9\r\n",
                                       garbage(rng) + b"\r\n", b"X" * 5000 + b"\r\n"]))
            else:
                out.append(b"RCPT TO:<" + key[:900] + b">\r\n")
    if kind == "lmtp" and rng.random() < 0.3:
        out.append(b"DATA\r\nSubject: fuzz\r\n\r\nbody\r\n.\r\n")
    if kind == "lmtp":
        out.append(b"QUIT\r\n")
    return b"".join(out)


def fuzz_worker(ports: dict[str, int], seconds: float, seed: int, out) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    sent = connections = 0
    n = seed * 10_000_000
    while time.monotonic() < deadline:
        kind = rng.choice(KINDS)
        n += 1
        data = requests(kind, rng, n)
        try:
            sock = socket.create_connection(("127.0.0.1", ports[kind]), timeout=5)
        except OSError:
            time.sleep(0.05)
            continue
        connections += 1
        try:
            sock.sendall(data)
            sent += len(data)
            if rng.random() < 0.15:  # abrupt: close with answers (maybe lookups) pending
                continue
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2)
            while sock.recv(65536):
                pass
        except OSError:
            pass
        finally:
            sock.close()
    out.put((connections, sent))


# -- the run ------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="fuzz duration (default 120)")
    ap.add_argument("--workers", type=int, default=4, help="fuzzing client processes")
    ap.add_argument("--bound-mb", type=float, default=64.0, help="RSS bound to report against")
    ap.add_argument("--onionrouter-venv", default="/opt/onionrouter-venv")
    args = ap.parse_args()
    onionrouter_bin = Path(args.onionrouter_venv) / "bin" / "onionrouter"
    if not onionrouter_bin.exists():
        print(f"onionrouter missing: python3 -m venv {args.onionrouter_venv} && "
              f"{args.onionrouter_venv}/bin/pip install onionrouter==0.6.2", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="torroute-membench-"))
    procs: list[subprocess.Popen] = []
    dns = None
    try:
        pinned = {f"pin{i}.fuzz.test": make_onion(1000 + i) for i in range(20)}
        dns = Dnsmasq(srv=[SrvRecord(f"_onion-mx._tcp.srv{i}.fuzz.test", make_onion(2000 + i))
                           for i in range(N_SRV)], local_domains=["fuzz.test"], ttl=300).start()
        map_yml = work / "map.yml"
        map_yml.write_text("---\n" + "".join(f"{o}:\n  - {d}\n" for d, o in pinned.items()))
        dead = free_port()  # tor's SOCKS and DNS ports: nothing listens
        ports = {kind: free_port() for kind in KINDS}
        idle_port = free_port()
        cfg = work / "torroute.toml"
        cfg.write_text(f'[routing]\nmaps = ["{map_yml}"]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                       f'[tor]\nsocks = "127.0.0.1:{dead}"\ndns = "127.0.0.1:{dead}"\n')
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
        log = open(work / "torroute.log", "w")
        listen = [a for kind in KINDS for a in (f"--{kind.replace('_', '-')}",
                                                f"inet:127.0.0.1:{ports[kind]}")]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torroute.cli", "serve", "--config", str(cfg), *listen],
            stdout=log, stderr=log, cwd=REPO, env=env))
        # the idle comparison: a tcp_table-only torroute and onionrouter, same map and dnsmasq
        idle_log = open(work / "torroute-idle.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torroute.cli", "serve", "--config", str(cfg),
             "--tcp-table", f"inet:127.0.0.1:{idle_port}"],
            stdout=idle_log, stderr=idle_log, cwd=REPO, env=env))
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
        for port in (*ports.values(), idle_port, or_port):
            wait_port(port)
        daemon, idle_daemon, onionrouter = procs

        # idle: after one static, one SRV and one NXDOMAIN lookup each
        for port in (idle_port, or_port):
            client = Client(port)
            client.connect()
            for key in ("a@pin0.fuzz.test", "a@srv0.fuzz.test", "a@nothing.fuzz.test"):
                client.get(key)
            client.close()
        time.sleep(1.0)
        idle_t, idle_o = status(idle_daemon.pid)["VmRSS"], tree_rss(onionrouter.pid)
        start = status(daemon.pid)

        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        workers = [ctx.Process(target=fuzz_worker, args=(ports, args.seconds, seed + 1, out))
                   for seed in range(args.workers)]
        started = time.monotonic()
        for w in workers:
            w.start()
        samples = []
        while any(w.is_alive() for w in workers) and \
                time.monotonic() - started < args.seconds + 60:
            samples.append(status(daemon.pid)["VmRSS"])
            time.sleep(0.5)
        totals = [out.get(timeout=30) for _ in workers]
        for w in workers:
            w.join()
        elapsed = time.monotonic() - started
        end = status(daemon.pid)
        # the daemon still answers
        client = Client(ports["tcp_table"])
        client.connect()
        alive = client.get("a@pin1.fuzz.test")
        client.close()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        log.close()
        text = (work / "torroute.log").read_text(errors="replace")
        tracebacks = text.count("Traceback")
        errors = sum(" ERROR " in line for line in text.splitlines())

        mb = 1024
        conns, sent = sum(t[0] for t in totals), sum(t[1] for t in totals)
        print(f"fuzz: {args.workers} workers, {elapsed:.0f} s, {conns} connections "
              f"({conns / elapsed:.0f}/s), {sent / 1e6:.1f} MB of requests, all 4 listeners")
        print(f"{'torroute serve RSS (MB)':40}{'start':>8}{'peak':>8}{'end':>8}{'bound':>8}")
        print(f"{'  socketmap+tcp_table+exim+lmtp':40}{start['VmRSS'] / mb:8.1f}"
              f"{end['VmHWM'] / mb:8.1f}{end['VmRSS'] / mb:8.1f}{args.bound_mb:8.1f}")
        print(f"  peak (VmHWM) {end['VmHWM'] / mb:.1f} MB "
              f"{'<=' if end['VmHWM'] / mb <= args.bound_mb else '>'} {args.bound_mb:.0f} MB "
              f"bound; sampled max {max(samples, default=0) / mb:.1f} MB; after the fuzz it "
              f"answered {alive[:4]!r}; log: {tracebacks} tracebacks, {errors} ERROR lines")
        print(f"{'idle RSS (MB)':40}{'onionrouter':>12}{'torroute':>10}{'ratio':>8}")
        print(f"{'  tcp_table, after 3 lookups':40}{idle_o / mb:12.1f}{idle_t / mb:10.1f}"
              f"{idle_o / idle_t:7.2f}x")
        print("ratio: onionrouter/torroute (above 1: torroute uses less)")
        if tracebacks or errors:
            lines = text.splitlines()
            first = next(i for i, line in enumerate(lines) if "Traceback" in line or
                         " ERROR " in line)
            print("first error in the daemon's log:", *lines[max(0, first - 2):first + 25],
                  sep="\n  ")
        return 0 if end["VmHWM"] / mb <= args.bound_mb and not tracebacks else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if dns is not None:
            dns.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
