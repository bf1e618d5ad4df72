"""Throughput of a real Postfix delivering to an onion MX on the private Tor network.

50 messages (one recipient each) are submitted back to back over one SMTP session to a private
Postfix instance; the clock runs from the first submission until all 50 are at the sink behind
the onion.  Variants, each with its own Postfix, one after another, same network, same sink:

  direct (no tor)        Postfix smtp straight to the sink: the ceiling of this machine
  torroute               transport_maps = socketmap -> `torroute serve`; pipe -> `torroute deliver`
  torroute lmtp          transport_maps = socketmap -> `torroute serve --lmtp`; Postfix's lmtp ->
                         the daemon's LMTP relay (pooled SMTP connections through tor)
  torsocks (published)   the onionmx recipe: smtptor:[onion], Postfix smtp under torsocks
  torsocks (no cache)    the same with -o smtp_connection_cache_on_demand=no

Each variant first delivers one warm-up message (circuits built, daemons started), then the
50 are timed.  Prints msg/s, the slowest message (submit -> arrival), lost and duplicates.

    /opt/torroute/bin/python bench/postfix_throughput.py [--messages 50] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support.pipe import TORROUTE  # noqa: E402  (this checkout's torroute, as pipe runs it)
from support.postfix import PostfixInstance  # noqa: E402

from torroute.mta.postfix import LMTP_PARAMETERS  # noqa: E402
from torroute.testing.dnsmasq import Dnsmasq  # noqa: E402
from torroute.testing.sink import ESMTP_FULL  # noqa: E402
from torroute.testing.sink import MaildirSink as SmtpSink  # noqa: E402
from torroute.testing.testnet import PrivateNetwork  # noqa: E402

DOMAIN = "bench.test"
LMTP_LIMIT = "torroute-lmtp_destination_concurrency_limit"  # Postfix's agents per onion
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)


def wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"torroute serve did not create {path}")
        time.sleep(0.05)


class Variant:
    def __init__(self, name: str, transport_maps: str, master_extra: str = "",
                 wrappers: dict[str, str] | None = None, deliver_config: str = "",
                 deliver_command: str = f"{TORROUTE} deliver",
                 main_extra: str = "", serve_extra: str = "") -> None:
        self.name = name
        self.serve_extra = serve_extra  # [serve] settings of the LMTP variants' daemon
        self.deliver_command = deliver_command
        self.main_extra = main_extra
        self.transport_maps = transport_maps
        self.master_extra = master_extra
        self.wrappers = wrappers or {}
        self.deliver_config = deliver_config


#: ``--profile-lmtp``: the daemon under cProfile timed by CPU (process_time), not wall time,
#: so the event loop's waits do not count; written when it exits (SIGTERM)
CPU_PROFILE = """
import cProfile, runpy, sys, time
out, sys.argv = sys.argv[1], ["torroute", *sys.argv[2:]]
prof = cProfile.Profile(time.process_time)
prof.enable()
try:
    runpy.run_module("torroute.cli", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    prof.disable()
    prof.dump_stats(out)
"""

DELAYS = re.compile(r"delays=([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+), .*status=sent")


def cpu_seconds() -> float:
    """CPU time used by the whole machine so far (user+nice+system+irq+softirq, /proc/stat)."""
    fields = open("/proc/stat").readline().split()[1:]
    ticks = sum(int(fields[i]) for i in (0, 1, 2, 5, 6))
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int, children: bool = False) -> float:
    """utime+stime (and, with ``children``, the reaped children's) of one process, seconds;
    0 for a process that is gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/*/stat parent pids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, ()))
    return out


class CpuMeter:
    """CPU seconds per group of processes over the timed run: the profile of a variant.
    Processes that appear during the run count from zero; reaped children count through
    their parent's cutime/cstime (Postfix's pipe -> torroute deliver)."""

    def __init__(self, groups: dict[str, callable]) -> None:
        self.groups = groups  # name -> () -> list of pids
        self.start: dict[str, dict[int, float]] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        return {name: {pid: proc_cpu(pid, children=True) for pid in pids()}
                for name, pids in self.groups.items()}

    def begin(self) -> None:
        self.start = self._sample()

    def end(self) -> dict[str, float]:
        now = self._sample()
        return {name: sum(v - self.start[name].get(pid, 0.0) for pid, v in now[name].items())
                for name in now}


def lmtp_connections(log: str) -> tuple[int, int] | None:
    """(LMTP connections Postfix opened, messages it sent over them) in the timed run: a
    delivery without ``conn_use=`` opened its connection."""
    sent = [ln for ln in log.splitlines() if LMTP_SENT.search(ln)][1:]  # not the warm-up
    if not sent:
        return None
    return sum("conn_use=" not in ln for ln in sent), len(sent)


def postfix_delays(log: str) -> str:
    """Postfix's delays=a/b/c/d (before qmgr / in qmgr / connection setup / transmission) of
    the timed messages: 'median/max' of each."""
    rows = [tuple(map(float, m.groups())) for m in DELAYS.finditer(log)][1:]  # not warm-up
    if not rows:
        return ""
    cols = list(zip(*rows, strict=True))
    return " ".join(f"{statistics.median(c):.2f}/{max(c):.2f}" for c in cols)


LMTP_SENT = re.compile(r"/lmtp\[\d+\]: \w+: to=.*status=sent")


def run_variant(variant: Variant, workdir: Path, sink: SmtpSink, clear: SmtpSink,
                count: int, tag: str, groups: dict | None = None) -> dict:
    """One timed run; ``groups`` (name -> () -> pids) are profiled besides Postfix's tree."""
    workdir.mkdir(mode=0o755)
    pf = PostfixInstance(workdir, variant.transport_maps, clear.port, variant.deliver_config,
                         master_extra=variant.master_extra, daemon_wrappers=variant.wrappers,
                         deliver_command=variant.deliver_command, main_extra=variant.main_extra)
    pf.start()
    try:
        before = len(sink.messages)
        pf.submit("bench@origin.test", [f"warmup@{DOMAIN}"],
                  f"Message-ID: <{tag}-warmup@origin.test>\nSubject: warm-up\n\nx\n".encode())
        try:
            sink.wait_for(before + 1, timeout=120)
        except TimeoutError:
            print(f"{variant.name}: the warm-up did not arrive; Postfix's log ends:\n"
                  + "\n".join(pf.log().splitlines()[-15:]), file=sys.stderr)
            raise
        first = len(sink.messages)
        submitted: dict[str, float] = {}
        master = pf.master_pid()
        meter = CpuMeter({**(groups or {}),
                          "postfix": lambda: descendants(master) if master else [],
                          "bench+sinks": lambda: [os.getpid()]})
        meter.begin()
        cpu_started = cpu_seconds()
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", pf.port, local_hostname="client.test") as client:
            for i in range(count):
                mid = f"{tag}-{i}@origin.test"
                body = (f"From: bench@origin.test\r\nTo: user{i}@{DOMAIN}\r\n"
                        f"Message-ID: <{mid}>\r\nSubject: bench {i}\r\n\r\n"
                        + "line of text\r\n" * 40).encode()
                t = time.monotonic()
                client.sendmail("bench@origin.test", [f"user{i}@{DOMAIN}"], body)
                submitted[mid] = t
        submit_seconds = time.monotonic() - started
        deadline = time.monotonic() + 180
        arrivals: dict[str, list[float]] = {}
        while time.monotonic() < deadline:
            arrivals = {}
            for m in sink.messages[first:]:
                found = MESSAGE_ID.search(m.data)
                if found:
                    arrivals.setdefault(found.group(1).decode(), []).append(m.arrived)
            if all(mid in arrivals for mid in submitted):
                break
            time.sleep(0.05)
        cpu_used = cpu_seconds() - cpu_started
        profile = meter.end()
        time.sleep(1)  # late duplicates
        arrivals = {}
        for m in sink.messages[first:]:
            found = MESSAGE_ID.search(m.data)
            if found:
                arrivals.setdefault(found.group(1).decode(), []).append(m.arrived)
        got = [mid for mid in submitted if mid in arrivals]
        last = max((min(arrivals[mid]) for mid in got), default=started)
        delays = [min(arrivals[mid]) - submitted[mid] for mid in got]
        elapsed = last - started
        return {
            "variant": variant.name, "elapsed": elapsed, "rate": len(got) / elapsed,
            "max_delay": max(delays, default=float("nan")),
            "median_delay": statistics.median(delays) if delays else float("nan"),
            "lost": count - len(got),
            "duplicates": sum(len(v) - 1 for v in arrivals.values()),
            "clear": len(clear.messages),
            "throttled": pf.log().count("throttling"),
            "deferred": pf.log().count("status=deferred"),
            "delays": postfix_delays(pf.log()),
            "cpu_ms": 1000 * cpu_used / count,
            "submit": submit_seconds,
            "profile": {k: 1000 * v / count for k, v in profile.items()},
            "lmtp_conns": lmtp_connections(pf.log()),
        }
    finally:
        pf.stop()


# ---- a PROTOTYPE of a persistent relay, only to measure the design proposed in
# docs/postfix.rst: Postfix's lmtp client -> one long-running process -> SMTP over tor.
# Not production code: static routes, no connection reuse, aiosmtpd (a test dependency).


def relay_prototype(socket_path: str, socks: str, routes: list[str]) -> None:
    import asyncio

    from aiosmtpd.controller import UnixSocketController
    from aiosmtpd.lmtp import LMTP

    from torroute.protocols.smtp import Close, Options, Send, SmtpClient
    from torroute.tor.dial import adial

    proxy = (socks.rsplit(":", 1)[0], int(socks.rsplit(":", 1)[1]))
    table = {d: o for d, o in (r.split("=", 1) for r in routes)}

    async def deliver(sender: bytes, rcpt: bytes, message: bytes, onion: str) -> str:
        try:
            reader, writer = await adial(onion, 25, proxy=proxy, timeout=120)
        except Exception as exc:  # noqa: BLE001 - prototype: every dial failure defers
            return f"451 4.4.1 {exc}"
        client = SmtpClient(sender, [rcpt], message, Options(destination=f"{onion}:25"))
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), 300)
                if not data:
                    out = client.connection_lost()
                    break
                actions = client.receive(data)
                for action in actions:
                    if isinstance(action, Send):
                        writer.write(action.data)
                        await writer.drain()
                if any(isinstance(a, Close) for a in actions):
                    out = client.outcome
                    break
        finally:
            writer.close()
        code = {"delivered": 250, "deferred": 451, "bounced": 550}[out.status]
        return f"{code} {out.dsn} {out.text}"

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            message = envelope.original_content.replace(b"\r\n", b"\n")
            sender = envelope.mail_from.encode()
            replies = await asyncio.gather(*[
                deliver(sender, r.encode(), message, table[r.rsplit("@", 1)[1].lower()])
                for r in envelope.rcpt_tos])
            return "\r\n".join(replies)  # LMTP: one reply per recipient

    class Controller(UnixSocketController):
        def factory(self):
            return LMTP(self.handler, **self.SMTP_kwargs)

    controller = Controller(Handler(), unix_socket=socket_path)
    controller.start()
    os.chmod(socket_path, 0o666)
    print("ready", flush=True)
    sys.stdin.read()
    controller.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", action="append", help="run only variants containing this")
    parser.add_argument("--latency-ms", type=float, default=0,
                        help="delay added per relay hop, each direction (torroute.testing"
                             ".latency proxies in front of every ORPort)")
    parser.add_argument("--lmtp-concurrency", type=int, nargs="+", default=[], metavar="N",
                        help="also run the LMTP relay with torroute-lmtp_destination_concurrency"
                             "_limit and _initial_destination_concurrency = N (one variant each)")
    parser.add_argument("--relay-cap", type=int, nargs="+", default=[], metavar="N",
                        help="also run the LMTP relay with [serve] lmtp_max_per_onion = N (MX "
                             "connections per onion; Postfix's agents beyond them queue in the "
                             "relay), one variant each")
    parser.add_argument("--profile-lmtp", metavar="FILE",
                        help="run the LMTP variants' daemon under cProfile timed by CPU, into "
                             "FILE.<round and variant tag>")
    parser.add_argument("--relay-prototype", nargs="+", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.relay_prototype:
        return relay_prototype(opts.relay_prototype[0], opts.relay_prototype[1],
                               opts.relay_prototype[2:])
    root = Path(tempfile.mkdtemp(prefix="torroute-bench-"))
    root.chmod(0o755)
    sink = SmtpSink(**ESMTP_FULL).start()  # as Postfix's test sinks: SMTPUTF8, PIPELINING
    clear = SmtpSink(**ESMTP_FULL).start()
    net = PrivateNetwork(root / "net", {25: sink.address}, latency_ms=opts.latency_ms,
                         progress=lambda msg: print(f"testnet: {msg}", file=sys.stderr))
    serve: subprocess.Popen | None = None
    serve_lmtp: subprocess.Popen | None = None
    relay: subprocess.Popen | None = None
    dns = Dnsmasq().start()  # a real resolver for the daemon (no SRV: the map routes bench.test)
    try:
        net.up(timeout=120)
        onion = net.onion
        conf = root / "torroute.toml"
        (root / "map.txt").write_text(f"{DOMAIN} {onion}\n")
        conf.write_text(f'[routing]\nmaps = ["{root / "map.txt"}"]\nnameservers = '
                        f'["127.0.0.1:{dns.port}"]\n\n[tor]\nsocks = '
                        f'"{net.socks_extended[0]}:{net.socks_extended[1]}"\n')
        conf.chmod(0o644)
        sock = root / "socketmap.sock"
        serve = subprocess.Popen(
            [sys.executable, "-m", "torroute.cli", "serve", "--config", str(conf),
             "--socketmap", f"unix:{sock}", "--socket-group", "postfix"],
            stdout=open(root / "serve.log", "w"), stderr=subprocess.STDOUT, cwd=REPO)
        wait_socket(sock, serve)
        sock_lmtp, lmtp_sock = root / "socketmap-lmtp.sock", root / "lmtp.sock"

        def start_lmtp(tag: str, serve_extra: str = "") -> subprocess.Popen:
            for path in (sock_lmtp, lmtp_sock):
                path.unlink(missing_ok=True)
            lmtp_conf = conf
            if serve_extra:
                lmtp_conf = root / f"torroute-{tag}.toml"
                lmtp_conf.write_text(f"{conf.read_text()}\n[serve]\n{serve_extra}")
                lmtp_conf.chmod(0o644)
            prof = ["-c", CPU_PROFILE, f"{opts.profile_lmtp}.{tag}"] if opts.profile_lmtp \
                else ["-m", "torroute.cli"]
            proc = subprocess.Popen(
                [sys.executable, *prof, "serve", "--config",
                 str(lmtp_conf), "--socketmap", f"unix:{sock_lmtp}", "--lmtp",
                 f"unix:{lmtp_sock}",
                 "--socket-group", "postfix"],
                stdout=open(root / f"serve-lmtp-{tag}.log", "w"), stderr=subprocess.STDOUT,
                cwd=REPO)
            wait_socket(lmtp_sock, proc)
            wait_socket(sock_lmtp, proc)
            return proc
        lmtp_service = "\n".join(
            ln for ln in (REPO / "plugins/postfix_pipe/master-lmtp.cf").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")) + "\n"
        torsocks_conf = root / "torsocks.conf"
        torsocks_conf.write_text(f"TorAddress 127.0.0.1\nTorPort {net.socks[1]}\n"
                                 "OnionAddrRange 127.42.42.0/24\n")
        torsocks_conf.chmod(0o644)
        wrapper = {"smtp_tor": f"#!/bin/sh\nTORSOCKS_CONF_FILE={torsocks_conf} exec "
                               f"{shutil.which('torsocks')} {'/usr/lib/postfix/sbin/smtp'} "
                               '"$@"\n'}
        relay_sock = root / "relay.sock"
        relay = subprocess.Popen(
            [sys.executable, __file__, "--relay-prototype", str(relay_sock),
             f"{net.socks_extended[0]}:{net.socks_extended[1]}", f"{DOMAIN}={onion}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        if relay.stdout.readline().strip() != "ready":
            raise SystemExit("relay prototype did not start")
        shipped_lmtp = "".join(f"{k} = {v}\n" for k, v in LMTP_PARAMETERS.items())
        smtptor = f"inline:{{{DOMAIN}=smtptor:[{onion}]}}"
        variants = [
            Variant("direct (no tor)", f"inline:{{{DOMAIN}=smtp:[127.0.0.1]:{sink.port}}}"),
            Variant("torroute", f"socketmap:unix:{sock}:transport",
                    deliver_config=conf.read_text()),
            Variant("torroute (fast path)", f"socketmap:unix:{sock}:transport",
                    deliver_config=conf.read_text(),
                    deliver_command=f"/usr/bin/env PYTHONPATH={REPO} /opt/torroute/bin/python3 "
                                    "-m torroute.cli.deliver"),
            Variant("torroute lmtp", f"socketmap:unix:{sock_lmtp}:transport", lmtp_service,
                    main_extra=shipped_lmtp),
            *[Variant(f"torroute lmtp c{n}", f"socketmap:unix:{sock_lmtp}:transport",
                      lmtp_service,
                      main_extra="".join(f"{k} = {n}\n" for k in LMTP_PARAMETERS))
              for n in opts.lmtp_concurrency],
            *[Variant(f"torroute lmtp cap{n}", f"socketmap:unix:{sock_lmtp}:transport",
                      lmtp_service, main_extra=shipped_lmtp,
                      serve_extra=f"lmtp_max_per_onion = {n}\nlmtp_max_waiting_per_onion = "
                                  f"{max(64, 2 * int(LMTP_PARAMETERS[LMTP_LIMIT]))}\n")
              for n in opts.relay_cap],
            Variant("lmtp (postfix dflt)", f"socketmap:unix:{sock_lmtp}:transport",
                    lmtp_service),
            Variant("relay prototype (lmtp)", f"inline:{{{DOMAIN}=lmtp:unix:{relay_sock}}}"),
            Variant("torsocks (published)", smtptor,
                    "smtptor unix - - n - - smtp_tor\n", wrapper),
            Variant("torsocks (no cache)", smtptor,
                    "smtptor unix - - n - - smtp_tor\n  -o smtp_connection_cache_on_demand=no\n",
                    wrapper),
        ]
        if opts.only:
            variants = [v for v in variants if any(o in v.name for o in opts.only)]
        results = []
        tors = {"tor": lambda: [n.pid for n in net.nodes if n.pid]}
        if net.latency_pid:
            tors["latency proxy"] = lambda: [net.latency_pid]
        for r in range(opts.rounds):
            for n, variant in enumerate(variants):
                tag = f"r{r}v{n}"
                print(f"running {variant.name} (round {r + 1})", file=sys.stderr)
                groups = dict(tors)
                if "lmtp" in variant.name and "prototype" not in variant.name:
                    serve_lmtp = start_lmtp(tag, variant.serve_extra)
                    groups["torroute"] = lambda p=serve_lmtp.pid: [p]
                elif variant.name.startswith("torroute"):
                    groups["torroute"] = lambda: [serve.pid]  # + deliver: in postfix (pipe)
                try:
                    res = run_variant(variant, root / f"pf-{tag}", sink, clear,
                                      opts.messages, tag, groups)
                except TimeoutError as exc:
                    for log in sorted(root.glob(f"serve-lmtp-{tag}.log")):
                        print(f"{log.name} ends:\n{log.read_text()[-3000:]}", file=sys.stderr)
                    res = {"variant": variant.name, "elapsed": float("nan"), "rate": 0.0,
                           "max_delay": float("nan"), "median_delay": float("nan"),
                           "lost": opts.messages, "duplicates": 0, "clear": len(clear.messages),
                           "throttled": 0, "deferred": 0, "delays": f"FAILED: {exc}",
                           "cpu_ms": float("nan"), "submit": float("nan"), "profile": {},
                           "lmtp_conns": None}
                print(f"  {variant.name}: {res['rate']:.1f} msg/s, max delay "
                      f"{res['max_delay']:.2f} s, lost {res['lost']}", file=sys.stderr)
                if serve_lmtp is not None:
                    serve_lmtp.terminate()
                    serve_lmtp.wait(15)
                    serve_lmtp = None
                    found = re.findall(r"lmtp: relay stats (.*)",
                                       (root / f"serve-lmtp-{tag}.log").read_text())
                    res["relay_stats"] = found[-1] if found else "?"
                    ms = [float(m) for m in re.findall(
                        r"lmtp rcpt=.*reply='2.* ms=(\d+)",
                        (root / f"serve-lmtp-{tag}.log").read_text())][1:]
                    if ms:
                        res["relay_stats"] += (f" relay-ms median {statistics.median(ms):.0f} "
                                               f"max {max(ms):.0f}")
                results.append(res)
    finally:
        for daemon in (serve, serve_lmtp):
            if daemon is not None:
                daemon.terminate()
                daemon.wait(15)
        if relay is not None:
            relay.stdin.close()
            relay.wait(15)
        net.down()
        dns.stop()
        sink.stop()
        clear.stop()
        shutil.rmtree(root, ignore_errors=True)
    hop = f", {opts.latency_ms:g} ms added per relay hop and direction" if opts.latency_ms \
        else ""
    print(f"{opts.messages} messages, private Tor network on loopback{hop}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'variant':<22}{'seconds':>8}{'msg/s':>8}{'max delay':>10}{'median':>8}"
          f"{'lost':>6}{'dups':>6}{'clear':>6}{'deferred':>9}{'throttled':>10}{'cpu/msg':>8}"
          f"{'submit':>8}  postfix delays a b c d (median/max)")
    print("cpu/msg: ms of CPU used by the whole machine per message while timing (all tors, "
          "Postfix, torroute, the sink; anything else running counts too)")
    for res in results:
        print(f"{res['variant']:<22}{res['elapsed']:>8.2f}{res['rate']:>8.1f}"
              f"{res['max_delay']:>10.2f}{res['median_delay']:>8.2f}{res['lost']:>6}"
              f"{res['duplicates']:>6}{res['clear']:>6}{res['deferred']:>9}"
              f"{res['throttled']:>10}{res['cpu_ms']:>8.0f}{res['submit']:>8.2f}"
              f"  {res['delays']}")
    print("\nprofile: ms of CPU per message by process group (torroute: the daemon; the pipe's "
          "torroute deliver runs under postfix)")
    for res in results:
        parts = "  ".join(f"{k} {v:.1f}" for k, v in res["profile"].items())
        extra = ""
        if res["lmtp_conns"]:
            conns, sent = res["lmtp_conns"]
            extra += f"  lmtp connections {conns} ({sent / max(conns, 1):.1f} msg each)"
        if "relay_stats" in res:
            extra += f"  relay {res['relay_stats']}"
        print(f"  {res['variant']:<22}{parts}{extra}")
    by: dict[str, list[float]] = {}
    for res in results:
        by.setdefault(res["variant"], []).append(res["rate"])
    med = {name: statistics.median(rates) for name, rates in by.items()}
    tuned = "torsocks (no cache)"
    print()
    for name in ("torroute lmtp", *(f"torroute lmtp c{n}" for n in opts.lmtp_concurrency),
                 *(f"torroute lmtp cap{n}" for n in opts.relay_cap),
                 "lmtp (postfix dflt)", "torroute", "torroute (fast path)",
                 "torsocks (published)"):
        if name not in med:
            continue
        line = f"{name:<22} {med[name]:6.1f} msg/s (median)"
        if tuned in med and name != tuned:
            line += f"  {med[name] / med[tuned]:5.2f}x tuned torsocks ({med[tuned]:.1f})"
        if "direct (no tor)" in med:
            line += (f"  {med[name] / med['direct (no tor)']:5.2f}x no-tor ceiling "
                     f"({med['direct (no tor)']:.1f})")
        print(line)
    worst = max((res["max_delay"] for res in results if res["variant"] == "torroute lmtp"),
                default=float("nan"))
    bad = sum(res["lost"] + res["duplicates"] + res["clear"] for res in results)
    print(f"torroute lmtp max delay {worst:.2f} s; lost+duplicates+clear over all runs: {bad}")
    print("targets (issue 15): lmtp >= 100 msg/s, >= 2.5x tuned torsocks, >= 0.4x no-tor, "
          "max delay <= 2 s; at 50 ms/hop >= 3x tuned torsocks")

if __name__ == "__main__":
    main()
