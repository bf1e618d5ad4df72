"""Fairness of the LMTP relay: does one slow onion slow mail to a fast one?

Two onion MXs on the private Tor network: ``fast.test`` (a plain sink) and ``slow.test`` (a
sink that answers the end of DATA after ``--slow-seconds``, 5 s).  A real Postfix hands both to
``torroute serve --lmtp``.  Each configuration runs two phases, one after the other:

  alone      --messages to fast.test only
  with slow  --slow-messages to slow.test first, then the same --messages to fast.test

and prints the fast onion's rate (first submission -> last arrival) in both, their ratio, the
fast messages' max delay, and what became of the slow ones (all must arrive in the end: busy
4xx answers are retried by Postfix, nothing lost, nothing duplicated, nothing in the clear).

Configurations: ``capped`` (the shipped [serve] lmtp_max_per_onion / lmtp_max_waiting_per_onion
and Postfix settings) and ``uncapped`` (cap and queue 1000: what the relay did before the
per-onion gates), so the effect of the gates is measured in the same run.

    /opt/torroute/bin/python bench/fairness.py [--messages 50] [--slow-messages 60]
        [--latency-ms 0] [--rounds 1]
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

from support.postfix import PostfixInstance, lmtp_service  # noqa: E402

from torroute.daemon.settings import ServeSettings  # noqa: E402
from torroute.mta.postfix import LMTP_PARAMETERS  # noqa: E402
from torroute.testing.dnsmasq import Dnsmasq  # noqa: E402
from torroute.testing.sink import ESMTP_FULL, MaildirSink  # noqa: E402
from torroute.testing.testnet import PrivateNetwork  # noqa: E402

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)


def arrivals(sink: MaildirSink, prefix: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for m in list(sink.messages):
        found = MESSAGE_ID.search(m.data)
        if found and found.group(1).decode().startswith(prefix):
            out.setdefault(found.group(1).decode(), []).append(m.arrived)
    return out


def submit(client: smtplib.SMTP, domain: str, tag: str, count: int) -> dict[str, float]:
    sent = {}
    for i in range(count):
        mid = f"{tag}-{i}@origin.test"
        body = (f"From: bench@origin.test\r\nTo: user{i}@{domain}\r\nMessage-ID: <{mid}>\r\n"
                f"Subject: {tag} {i}\r\n\r\n" + "line of text\r\n" * 40).encode()
        sent[mid] = time.monotonic()
        client.sendmail("bench@origin.test", [f"user{i}@{domain}"], body)
    return sent


def wait_all(sink: MaildirSink, sent: dict[str, float], timeout: float) -> dict[str, list]:
    deadline = time.monotonic() + timeout
    got: dict[str, list[float]] = {}
    prefix = next(iter(sent)).split("-", 1)[0] + "-"
    while time.monotonic() < deadline:
        got = arrivals(sink, prefix)
        if all(mid in got for mid in sent):
            break
        time.sleep(0.05)
    return got


def phase(pf: PostfixInstance, fast: MaildirSink, slow: MaildirSink, tag: str, count: int,
          slow_count: int, slow_timeout: float) -> dict:
    slow_sent: dict[str, float] = {}
    with smtplib.SMTP("127.0.0.1", pf.port, local_hostname="client.test") as client:
        if slow_count:
            slow_sent = submit(client, "slow.test", f"{tag}s", slow_count)
            time.sleep(1.0)  # the slow onion's transactions are in the relay by now
        fast_sent = submit(client, "fast.test", f"{tag}f", count)
    started = min(fast_sent.values())
    got = wait_all(fast, fast_sent, 300)
    firsts = {mid: min(v) for mid, v in got.items() if mid in fast_sent}
    last = max(firsts.values(), default=started)
    res = {"rate": len(firsts) / max(last - started, 1e-9),
           "max_delay": max((firsts[m] - fast_sent[m] for m in firsts), default=float("nan")),
           "lost": count - len(firsts), "dups": sum(len(v) - 1 for v in got.values())}
    if slow_count:
        t = time.monotonic()
        sgot = wait_all(slow, slow_sent, slow_timeout)
        res["slow_arrived"] = sum(m in sgot for m in slow_sent)
        res["slow_dups"] = sum(len(v) - 1 for v in sgot.values())
        res["slow_wait"] = time.monotonic() - t
    log = pf.log()
    res["busy"] = log.count("dsn=4.4.5")  # Postfix's deferrals of the relay's busy answers
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--slow-messages", type=int, default=60)
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    opts = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="torroute-fair-"))
    root.chmod(0o755)
    fast = MaildirSink(**ESMTP_FULL).start()
    slow = MaildirSink(**ESMTP_FULL, data_delay=opts.slow_seconds).start()
    clear = MaildirSink(**ESMTP_FULL).start()
    net = PrivateNetwork(root / "net", {25: fast.address}, latency_ms=opts.latency_ms,
                         progress=lambda msg: print(f"testnet: {msg}", file=sys.stderr))
    dns = Dnsmasq().start()
    daemon: subprocess.Popen | None = None
    results = []
    shipped = ServeSettings()
    configs = {
        "capped": (shipped.lmtp_max_per_onion, shipped.lmtp_max_waiting_per_onion),
        "uncapped": (1000, 1000),
    }
    try:
        net.up(timeout=180)
        slow_onion = net.add_onion({25: slow.address}, timeout=120)
        (root / "map.txt").write_text(f"fast.test {net.onion}\nslow.test {slow_onion}\n")
        sock, lmtp_sock = root / "socketmap.sock", root / "lmtp.sock"
        main_extra = "".join(f"{k} = {v}\n" for k, v in LMTP_PARAMETERS.items())
        for r in range(opts.rounds):
            for name, (cap, waiting) in configs.items():
                conf = root / f"torroute-{name}.toml"
                conf.write_text(
                    f'[routing]\nmaps = ["{root / "map.txt"}"]\nnameservers = '
                    f'["127.0.0.1:{dns.port}"]\n\n[tor]\nsocks = '
                    f'"{net.socks_extended[0]}:{net.socks_extended[1]}"\n\n[serve]\n'
                    f"lmtp_max_per_onion = {cap}\nlmtp_max_waiting_per_onion = {waiting}\n")
                conf.chmod(0o644)
                for path in (sock, lmtp_sock):
                    path.unlink(missing_ok=True)
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "torroute.cli", "serve", "--config", str(conf),
                     "--socketmap", f"unix:{sock}", "--lmtp", f"unix:{lmtp_sock}",
                     "--socket-group", "postfix"],
                    stdout=open(root / f"serve-{name}-{r}.log", "w"),
                    stderr=subprocess.STDOUT, cwd=REPO)
                deadline = time.monotonic() + 20
                while not (sock.exists() and lmtp_sock.exists()):
                    if daemon.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("torroute serve did not start")
                    time.sleep(0.05)
                for ph, slow_count in (("alone", 0), ("with slow", opts.slow_messages)):
                    tag = f"r{r}{name[0]}{ph[0]}"
                    print(f"running {name} {ph} (round {r + 1})", file=sys.stderr)
                    work = root / f"pf-{tag}"
                    work.mkdir(mode=0o755)
                    pf = PostfixInstance(work, f"socketmap:unix:{sock}:transport", clear.port,
                                         master_extra=lmtp_service(), main_extra=main_extra)
                    pf.start()
                    try:
                        # warm-up: circuits to both onions
                        with smtplib.SMTP("127.0.0.1", pf.port) as c:
                            submit(c, "fast.test", f"{tag}w", 1)
                        wait_all(fast, {f"{tag}w-0@origin.test": 0}, 120)
                        res = phase(pf, fast, slow, tag, opts.messages, slow_count,
                                    timeout_for(opts))
                    finally:
                        pf.stop()
                    res.update(config=name, phase=ph, clear=len(clear.messages))
                    results.append(res)
                daemon.terminate()
                daemon.wait(15)
                stats = re.findall(r"lmtp: relay stats (.*)",
                                   (root / f"serve-{name}-{r}.log").read_text())
                results[-1]["relay"] = stats[-1] if stats else "?"
                daemon = None
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(15)
        net.down()
        dns.stop()
        for s in (fast, slow, clear):
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
    hop = f", {opts.latency_ms:g} ms per relay hop" if opts.latency_ms else ""
    print(f"fairness: {opts.messages} messages to a fast onion, alone and after "
          f"{opts.slow_messages} to an onion whose MX takes {opts.slow_seconds:g} s per message"
          f"{hop}; {os.cpu_count()} CPUs")
    print(f"{'config':<10}{'phase':<11}{'fast msg/s':>11}{'max delay':>10}{'lost':>6}"
          f"{'dups':>6}{'clear':>6}{'slow arrived':>17}{'busy 4xx':>9}")
    for res in results:
        slow_col = (f"{res['slow_arrived']}/{opts.slow_messages} in {res['slow_wait']:.0f}s"
                    if "slow_arrived" in res else "-")
        print(f"{res['config']:<10}{res['phase']:<11}{res['rate']:>11.1f}"
              f"{res['max_delay']:>10.2f}{res['lost']:>6}{res['dups'] + res.get('slow_dups', 0):>6}"
              f"{res['clear']:>6}{slow_col:>17}{res['busy']:>9}")
        if "relay" in res:
            print(f"{'':<10}relay {res['relay']}")
    for name in configs:
        alone = [r["rate"] for r in results if r["config"] == name and r["phase"] == "alone"]
        mixed = [r["rate"] for r in results if r["config"] == name and r["phase"] != "alone"]
        if alone and mixed:
            ratio = statistics.median(mixed) / statistics.median(alone)
            print(f"{name}: fast onion with the slow one running / alone = {ratio:.2f}")


def timeout_for(opts: argparse.Namespace) -> float:
    """How long to wait for every slow message (Postfix retries the busy ones)."""
    return 60 + 2 * opts.slow_messages * opts.slow_seconds


if __name__ == "__main__":
    main()
