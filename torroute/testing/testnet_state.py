"""A private network's directory on disk: its state file and the processes it records, for
``torroute testnet status`` / ``down`` (no :class:`~torroute.testing.testnet.PrivateNetwork`
object needed: the network may have been booted by another process).

Only processes that are still ours are ever signalled: a recorded pid whose command line does
not name the network directory belongs to someone else now (pid reuse).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["STATE_FILE", "STATE_VERSION", "read_state", "state_pids", "pid_alive", "cmdline",
           "rss_kib", "is_ours", "stop_pids", "reap", "remove_directory", "status", "down"]

STATE_FILE = "testnet.json"
STATE_VERSION = 1


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as dead
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cmdline(pid: int) -> str:
    """Its command line, words joined by spaces ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def rss_kib(pid: int) -> int:
    """Its resident memory in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def read_state(directory: Path | str) -> dict:
    """The state a network wrote; raises FileNotFoundError if there is none."""
    return json.loads((Path(directory) / STATE_FILE).read_text())


def state_pids(state: dict) -> list[int]:
    pids = [n.get("pid") for n in state.get("nodes", {}).values()]
    return [p for p in pids if isinstance(p, int)]


def is_ours(pid: int, directory: Path) -> bool:
    """Guard against pid reuse: only processes whose command line names our directory."""
    return str(directory) in cmdline(pid)


def stop_pids(pids: list[int], directory: Path, timeout: float = 5.0) -> list[int]:
    """SIGTERM, wait, SIGKILL what is left; only pids that are ours. Returns the pids signalled."""
    mine = [p for p in pids if pid_alive(p) and is_ours(p, directory)]
    for pid in mine:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in mine):
        reap(mine)
        time.sleep(0.05)
    for pid in mine:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reap(mine)
    return mine


def reap(pids: Iterable[int]) -> None:
    """Collect these pids if they are exited children of ours (never other fixtures' children:
    ``waitpid(-1)`` would steal their exit statuses)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def remove_directory(directory: Path | str) -> None:
    """Remove a network directory, but only one that holds our state file."""
    directory = Path(directory)
    if (directory / STATE_FILE).exists():
        shutil.rmtree(directory, ignore_errors=True)


def status(directory: Path | str) -> dict:
    """State plus liveness of each node (pid alive and still ours)."""
    directory = Path(directory).absolute()
    state = read_state(directory)
    nodes = {}
    for name, node in state.get("nodes", {}).items():
        pid = node.get("pid")
        alive = bool(pid) and pid_alive(pid) and is_ours(pid, directory)
        nodes[name] = {"pid": pid, "running": alive, "rss_kib": rss_kib(pid) if alive else 0}
    keeper = state.get("keeper_pid")
    return {
        "dir": str(directory),
        "ready": bool(state.get("ready")),
        "running": bool(nodes) and all(n["running"] for n in nodes.values()),
        "nodes": nodes,
        "keeper": {"pid": keeper, "running": bool(keeper) and pid_alive(keeper)
                   and is_ours(keeper, directory)} if keeper else None,
        **state.get("info", {}),
    }


def down(directory: Path | str, keep: bool = False) -> list[int]:
    """Stop exactly the processes recorded in ``directory`` (by pid); remove it unless keep."""
    directory = Path(directory).absolute()
    state = read_state(directory)
    pids = state_pids(state)
    if state.get("keeper_pid"):
        pids.append(state["keeper_pid"])
    stopped = stop_pids(pids, directory)
    if not keep:
        remove_directory(directory)
    return stopped
