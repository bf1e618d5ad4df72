"""SOCKS5 dial through a loopback SOCKS server: torroute's codec + drivers (torroute.tor.dial)
against python-socks, per dial (client CPU, process_time) and at import (fresh process).

The server (tests/support/fakes.FakeSocksServer, in a child process so its threads do not
count) answers every CONNECT with one reply code and closes: 0x00 (success) or 0xF0 (tor's
"descriptor not found").  No tor: this measures the client, not the network.

    /opt/torroute/bin/python bench/socks_dial.py [--dials 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ONION = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion"
SERVER = (
    "import sys, time; sys.path.insert(0, %r)\n"
    "from support.fakes import FakeSocksServer\n"
    "s = FakeSocksServer(); s.reply = int(sys.argv[1]); print(s.port, flush=True)\n"
    "sys.stdin.read()\n"
)


def server(code: int) -> tuple[subprocess.Popen, tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER % str(REPO / "tests"), str(code)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, ("127.0.0.1", int(proc.stdout.readline()))


def ours_sync(proxy: tuple[str, int]) -> None:
    from torroute.errors import SocksError
    from torroute.tor import dial as tordial

    try:
        tordial.connect(ONION, 25, proxy, 10).close()
    except SocksError:
        pass


def pysocks_sync(proxy: tuple[str, int]) -> None:
    from python_socks import ProxyError, ProxyType
    from python_socks.sync import Proxy

    try:
        Proxy(ProxyType.SOCKS5, proxy[0], proxy[1], rdns=True).connect(ONION, 25, timeout=10)\
            .close()
    except ProxyError as exc:
        from torroute.tor.dial import reply_code

        reply_code(exc)


async def ours_async(proxy: tuple[str, int]) -> None:
    from torroute.errors import SocksError
    from torroute.tor import dial as tordial

    try:
        _, writer = await tordial.open_connection(ONION, 25, proxy, 10)
        writer.close()
    except SocksError:
        pass


async def pysocks_async(proxy: tuple[str, int]) -> None:
    from python_socks import ProxyError, ProxyType
    from python_socks.async_.asyncio import Proxy

    try:
        sock = await Proxy(ProxyType.SOCKS5, proxy[0], proxy[1], rdns=True).connect(
            ONION, 25, timeout=10)
        reader, writer = await asyncio.open_connection(sock=sock)  # what adial returned
        writer.close()
    except ProxyError as exc:
        from torroute.tor.dial import reply_code

        reply_code(exc)


def per_dial(fn, proxy: tuple[str, int], dials: int) -> float:
    """Median over 5 rounds of client CPU microseconds per dial."""
    rounds = []
    for _ in range(5):
        started = time.process_time()
        if asyncio.iscoroutinefunction(fn):
            async def many() -> None:
                for _ in range(dials):
                    await fn(proxy)
            asyncio.run(many())
        else:
            for _ in range(dials):
                fn(proxy)
        rounds.append((time.process_time() - started) / dials * 1e6)
    return statistics.median(rounds)


def import_ms(module: str, runs: int = 15) -> float:
    """Median wall ms of importing ``module`` in a fresh interpreter (start-up subtracted)."""
    def run(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd="/",
                       env={"PYTHONPATH": str(REPO)})
        return time.perf_counter() - started
    base = statistics.median(run("pass") for _ in range(runs))
    return (statistics.median(run(f"import {module}") for _ in range(runs)) - base) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dials", type=int, default=2000)
    args = parser.parse_args()
    for module in ("torroute.tor.dial", "python_socks.sync", "python_socks.async_.asyncio",
                   "asyncio"):
        print(f"import {module:30} {import_ms(module):6.1f} ms")
    for code in (0x00, 0xF0):
        proc, proxy = server(code)
        try:
            for name, fn in (("tordial.connect", ours_sync), ("python-socks sync", pysocks_sync),
                             ("tordial.open_connection", ours_async),
                             ("python-socks asyncio", pysocks_async)):
                print(f"reply {code:#04x} {name:24} {per_dial(fn, proxy, args.dials):7.1f} "
                      "us CPU/dial")
        finally:
            proc.stdin.close()
            proc.wait()


if __name__ == "__main__":
    main()
