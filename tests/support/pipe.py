"""The pipe program as Postfix's pipe(8) runs it: this checkout's ``torroute``, a minimal
environment, and what pipe(8) reads from its output."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from support.paths import REPO, VENV_TORROUTE


def worktree_program() -> str:
    """The ``torroute`` entry point as pip installs it, but importing this checkout first.

    Why: the venv's copy is refreshed only by scripts/install-deps.sh (skipped with
    TORROUTE_SKIP_INSTALL=1), and these tests must run the code next to them.  A 0755 script
    in a 0755 directory, as pipe's user (nobody) needs; rewritten atomically at each import.
    One directory per checkout: two checkouts' test runs at once must not run each other's code."""
    tag = hashlib.sha1(str(REPO).encode()).hexdigest()[:12]
    directory = Path(tempfile.gettempdir()) / f"torroute-worktree-bin-{tag}"
    directory.mkdir(mode=0o755, exist_ok=True)
    os.chmod(directory, 0o755)
    script = directory / "torroute"
    text = (f"#!{VENV_TORROUTE.parent / 'python3'}\nimport sys\n"
            f"sys.path.insert(0, {str(REPO)!r})\nfrom torroute.cli import main\n"
            "sys.exit(main())\n")
    temporary = directory / f".torroute.{os.getpid()}"
    temporary.write_text(text)
    os.chmod(temporary, 0o755)
    os.replace(temporary, script)
    return str(script)


TORROUTE = worktree_program()
CLEAN_ENV = {"PATH": "/usr/bin:/bin"}  # what pipe(8) gives the program: no HOME
MESSAGE = (b"From: Alice <alice@origin.test>\nTo: bob@example.test\nSubject: test\n"
           b"Message-ID: <1@origin.test>\n\nline one\n.leading dot\n..two dots\n.\nend\n")


def deliver(*args: str, stdin: bytes = MESSAGE, user: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [TORROUTE, "deliver", *args]
    if user:
        cmd = ["/usr/sbin/runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, input=stdin, capture_output=True, env=CLEAN_ENV, cwd="/",
                          timeout=timeout)


def status(result: subprocess.CompletedProcess) -> tuple[int, str]:
    """(exit status, first word of the output): what Postfix's pipe(8) acts on."""
    out = result.stdout.decode() + result.stderr.decode()
    return result.returncode, out.split(" ", 1)[0]
