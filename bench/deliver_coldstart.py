"""Cold start of `torroute deliver` (one process per message, as Postfix's pipe runs it) against
a floor program: SOCKS5 by hand + smtplib, nothing else.

Both deliver the same message over the same path: loopback SOCKS5 relay -> aiosmtpd sink (no
tor: this measures the program, not the network).  Runs are interleaved, the environment is
pipe(8)'s (PATH=/usr/bin:/bin, no HOME, cwd /), medians are reported.  Also prints the import
time of each variant (``python -X importtime``, everything imported after interpreter start-up).

    /opt/torroute/bin/python bench/deliver_coldstart.py [--runs 40]

Variants:
  torroute deliver        /opt/torroute/bin/torroute deliver ...  (cli.main as it is; the
                          tree's code: PYTHONPATH is this checkout)
  fast path               python -m torroute.cli.deliver ...      (what cli.main does if it
                          hands argv[0] == "deliver" straight to torroute.cli.deliver.main)
  floor                   hand SOCKS5 + smtplib
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support.fakes import FakeSocksServer  # noqa: E402

from torroute.testing.sink import MaildirSink  # noqa: E402

PYTHON = "/opt/torroute/bin/python3"
TORROUTE = "/opt/torroute/bin/torroute"
ONION = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion"
# pipe(8)'s environment, plus this tree first on sys.path: the bench measures the checkout it
# is in, not the installed copy (PYTHONPATH precedes site-packages, also for the console script)
ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
MESSAGE = (b"From: a@origin.test\nTo: b@example.test\nSubject: cold start\n"
           b"Message-ID: <x@origin.test>\n\n" + b"body line\n" * 200)

FLOOR = r'''
import smtplib, socket, struct, sys
proxy_port, host, port, sender, rcpt = sys.argv[1:6]
proxy_port, port = int(proxy_port), int(port)
msg = sys.stdin.buffer.read().replace(b"\n", b"\r\n")
s = socket.create_connection(("127.0.0.1", proxy_port), timeout=120)
s.sendall(b"\x05\x01\x00"); s.recv(2)
s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode() + struct.pack(">H", port))
head = s.recv(10)
if head[1] != 0:
    print("4.4.1 socks", head[1]); sys.exit(75)
class SMTP(smtplib.SMTP):
    def _get_socket(self, h, p, t):
        return s
c = SMTP("127.0.0.1", 1, local_hostname="localhost")
c.sendmail(sender, [rcpt], msg)
c.quit()
'''


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(cmd, input=MESSAGE, capture_output=True, env=ENV, cwd="/")
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({result.returncode}): {result.stdout!r} "
                         f"{result.stderr!r}")
    return elapsed


def import_ms(cmd: list[str]) -> tuple[float, float]:
    """(all top-level imports after start-up, site's share) in ms, from -X importtime."""
    if cmd[0] != PYTHON:
        cmd = [PYTHON, *cmd]
    result = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], input=MESSAGE,
                            capture_output=True, env=ENV, cwd="/")
    total = site = 0.0
    for line in result.stderr.decode().splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if name.startswith("  ") or not cumulative.strip().isdigit():
            continue  # nested, or the header
        if name.strip() in ("encodings", "encodings.utf_8", "_signal", "io", "zipimport",
                            "_frozen_importlib_external", "_codecs_preload"):
            continue  # interpreter start-up, same for every Python program
        micro = int(cumulative)
        total += micro / 1000
        if name.strip() == "site":
            site = micro / 1000
    return total, site


def serve() -> None:
    """The far end, in its own process so it does not compete with the timing loop."""
    sink = MaildirSink().start()
    socks = FakeSocksServer(sink.address)  # fake: loopback SOCKS5 relay standing in for tor
    print(socks.port, flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    print(len(sink.messages), flush=True)
    socks.close()
    sink.stop()


class Far:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())

    def close(self) -> int:
        self.proc.stdin.close()
        count = int(self.proc.stdout.readline() or 0)
        self.proc.wait(30)
        return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve:
        return serve()
    compileall.compile_dir(str(REPO / "torroute"), quiet=1)  # as an installed package would be
    measured = subprocess.run([PYTHON, "-c", "import torroute; print(torroute.__file__)"],
                              env=ENV, cwd="/", capture_output=True, text=True).stdout.strip()
    if not measured.startswith(str(REPO)):
        raise SystemExit(f"the variants would import {measured}, not {REPO}/torroute")

    socks = Far()
    floor_dir = Path(tempfile.mkdtemp(prefix="torroute-bench-"))
    os.chmod(floor_dir, 0o755)
    floor = floor_dir / "floor.py"
    floor.write_text(FLOOR)
    common = [f"--tor-socks=127.0.0.1:{socks.port}", "--sender=a@origin.test",
              f"--nexthop=[{ONION}]:25", "--", "b@example.test"]
    variants = {
        "torroute deliver": [TORROUTE, "deliver", *common],
        "fast path": [PYTHON, "-m", "torroute.cli.deliver", *common],
        "floor": [PYTHON, str(floor), str(socks.port), ONION, "25", "a@origin.test",
                  "b@example.test"],
        "python -c pass": [PYTHON, "-c", "pass"],
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for name, cmd in variants.items():  # warm the page cache
            if name != "python -c pass":
                timed(cmd)
        for _ in range(opts.runs):
            for name, cmd in variants.items():
                if name == "python -c pass":
                    started = time.perf_counter()
                    subprocess.run(cmd, env=ENV, cwd="/")
                    times[name].append(time.perf_counter() - started)
                else:
                    times[name].append(timed(cmd))
        imports = {}
        for name, cmd in variants.items():
            if name != "python -c pass":
                samples = [import_ms(cmd) for _ in range(7)]
                imports[name] = (statistics.median(s[0] for s in samples),
                                 statistics.median(s[1] for s in samples))
    finally:
        delivered = socks.close()
    floor_median = statistics.median(times["floor"])
    print(f"cold start, {opts.runs} interleaved runs each, {delivered} messages delivered "
          f"(loopback SOCKS5 -> aiosmtpd), {os.cpu_count()} CPUs, torroute from {measured}")
    print(f"{'variant':<20}{'median ms':>10}{'p90 ms':>9}{'x floor':>9}{'imports ms':>12}"
          f"{'(site)':>8}")
    print("imports: median of 7 `python -X importtime` runs, all top-level imports after "
          "interpreter start-up (site included, shown apart)")
    for name, values in times.items():
        med = statistics.median(values)
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        imp, site = imports.get(name, (float("nan"), float("nan")))
        print(f"{name:<20}{med * 1000:>10.1f}{p90 * 1000:>9.1f}{med / floor_median:>9.2f}"
              f"{imp:>12.1f}{site:>8.1f}")
    print("target: torroute deliver <= 1.5x floor; deliver-path imports <= 50 ms")


if __name__ == "__main__":
    main()
