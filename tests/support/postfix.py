"""The one Postfix runner of the tests: Debian's Postfix as a private instance.

Its own config/queue/data directories in a 0755 directory, smtpd on 127.0.0.1 only, logging to a
file, the shipped plugins/postfix_pipe/master.cf entry for ``torroute deliver``.  Options make
the variants the tests need:

* the delivery chain (``transport_maps``, ``clear_port``: Postfix's default_transport, a sink
  standing for the clear net, ``deliver_config``: the pipe's torroute.toml);
* a bare smtpd for the open-relay probe (``smtpd_args="-o mynetworks= ..."``, no transport);
* a client configuration for ``postmap -q`` against the daemon (``maillog_file="/dev/stderr"``,
  never started: :meth:`PostfixInstance.query`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from support.paths import PLUGINS
from support.pipe import TORROUTE
from torroute.testing.ports import free_port, wait_tcp

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"
POSTMAP = shutil.which("postmap") or "/usr/sbin/postmap"
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"  # Debian's

MASTER_CF = """\
{host}:{port} inet n - n - - smtpd {smtpd_args}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
lmtp      unix  -       -       n       -       -       lmtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
{torroute_service}
{extra}"""
PLUGIN_MASTER_CF = PLUGINS / "postfix_pipe" / "master.cf"
PLUGIN_MASTER_LMTP_CF = PLUGINS / "postfix_pipe" / "master-lmtp.cf"


def torroute_service(deliver_command: str, config: Path, user: str = "nobody") -> str:
    """The shipped plugins/postfix_pipe/master.cf entry, with this instance's user, program
    and configuration file: the tests run what the documentation tells users to install."""
    lines = [ln for ln in PLUGIN_MASTER_CF.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    text = "\n".join(lines)
    for old, new in (("user=torroute", f"user={user}"),
                     ("/opt/torroute/bin/torroute deliver",
                      f"{deliver_command} --config={config}")):
        assert old in text, f"{PLUGIN_MASTER_CF} changed: no {old!r}"
        text = text.replace(old, new)
    return text


def lmtp_service() -> str:
    """The shipped plugins/postfix_pipe/master-lmtp.cf entry, as users install it."""
    return "\n".join(ln for ln in PLUGIN_MASTER_LMTP_CF.read_text().splitlines()
                     if ln.strip() and not ln.startswith("#")) + "\n"


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
myhostname = {myhostname}
myorigin = $myhostname
mydestination = {mydestination}
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
alias_maps =
alias_database =
biff = no
maillog_file = {maillog_file}
maillog_file_prefixes = {maillog_prefix}
smtputf8_enable = yes
message_size_limit = 30000000
transport_retry_time = 5s
queue_run_delay = 2s
minimal_backoff_time = 2s
maximal_backoff_time = 4s
delay_warning_time = 0
{default_transport}
transport_maps = {transport_maps}
torroute_destination_recipient_limit = {recipient_limit}
{extra}
"""


@dataclass
class PostfixInstance:
    """Postfix with its own directories under ``workdir`` (0755), smtpd on 127.0.0.1:port.

    ``default_transport`` goes to ``clear_port`` (a sink standing for the clear net: nothing
    for an onion route may ever arrive there; 0: no default_transport line).  ``smtpd_args``
    are ``-o`` overrides on the smtpd line.  ``maillog_file``: the log (default
    ``workdir/maillog``; ``/dev/stderr`` for a client configuration whose commands report on
    their stderr)."""

    workdir: Path
    transport_maps: str = ""
    clear_port: int = 0
    deliver_config: str = ""  # TOML for torroute deliver (the pipe reads it as nobody)
    recipient_limit: int = 1
    main_extra: str = ""
    master_extra: str = ""
    #: what master.cf argv= runs: this checkout's program (support.pipe.worktree_program)
    deliver_command: str = f"{TORROUTE} deliver"
    smtpd_args: str = ""
    myhostname: str = "postfix-test.localdomain"
    mydestination: str = ""
    maillog_file: str = ""
    #: extra daemon programs (name -> shell script) for master.cf's command column, which is
    #: relative to daemon_directory: they get a private one (symlinks to Debian's + these)
    daemon_wrappers: dict[str, str] = field(default_factory=dict)
    port: int = 0
    started: bool = False
    _log_offset: int = field(default=0, repr=False)

    @property
    def confdir(self) -> Path:
        return self.workdir / "etc"

    @property
    def config_path(self) -> Path:
        return self.workdir / "torroute.toml"

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "queue"

    @property
    def maillog(self) -> Path:
        return Path(self.maillog_file or self.workdir / "maillog")

    def write(self) -> None:
        self.port = self.port or free_port()
        self.confdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "queue").mkdir(exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        shutil.chown(data, "postfix", "postfix")
        self.config_path.write_text(self.deliver_config)
        os.chmod(self.config_path, 0o644)
        extra = self.main_extra
        if self.daemon_wrappers:
            libexec = self.workdir / "libexec"
            libexec.mkdir(exist_ok=True)
            for program in Path(DAEMON_DIRECTORY).iterdir():
                link = libexec / program.name
                if not link.exists():
                    link.symlink_to(program)
            for name, script in self.daemon_wrappers.items():
                (libexec / name).write_text(script)
                os.chmod(libexec / name, 0o755)
            extra += f"\ndaemon_directory = {libexec}\n"
        main_cf = self.confdir / "main.cf"
        main_cf.write_text(MAIN_CF.format(
            dir=self.workdir, transport_maps=self.transport_maps,
            default_transport=(f"default_transport = smtp:[127.0.0.1]:{self.clear_port}"
                               if self.clear_port else ""),
            myhostname=self.myhostname, mydestination=self.mydestination,
            maillog_file=self.maillog, maillog_prefix=self.maillog.parent,
            recipient_limit=self.recipient_limit, extra=extra))
        (self.confdir / "master.cf").write_text(MASTER_CF.format(
            host="127.0.0.1", port=self.port, smtpd_args=self.smtpd_args,
            torroute_service=torroute_service(self.deliver_command, self.config_path),
            extra=self.master_extra))
        old = time.time() - 3600  # a fresh main.cf stalls every Postfix command ~1.8 s
        for name in ("main.cf", "master.cf"):
            os.utime(self.confdir / name, (old, old))

    def run(self, *args: str, check: bool = True, timeout: float = 60
            ) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{args} -> {result.returncode}\n{result.stdout}{result.stderr}"
                               f"\n--- maillog ---\n{self.log()[-3000:]}")
        return result

    def start(self) -> PostfixInstance:
        self.write()
        self.run(POSTFIX, "-c", str(self.confdir), "check")
        self.run(POSTFIX, "-c", str(self.confdir), "start")
        self.started = True
        wait_tcp(self.port, 20, what="postfix smtpd")
        return self

    def master_pid(self) -> int | None:
        try:
            return int((self.workdir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """`postfix stop`, then wait for this instance's master to go (kill it if it won't)."""
        if not self.started:
            return
        pid = self.master_pid()
        self.run(POSTFIX, "-c", str(self.confdir), "stop", check=False)
        self.started = False
        deadline = time.monotonic() + 10
        while pid and time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if state in ("Z", "X"):  # exited; waiting for its parent (init) to reap it
                return
            time.sleep(0.05)
        if pid:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def reload(self) -> None:
        self.run(POSTFIX, "-c", str(self.confdir), "reload")

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queue(self) -> list[dict]:
        """``postqueue -j``: one dict per queued message (recipients with delay_reason)."""
        out = self.run(POSTQUEUE, "-c", str(self.confdir), "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        self.run(POSTQUEUE, "-c", str(self.confdir), "-f")

    def delete_all(self) -> None:
        self.run(POSTSUPER, "-c", str(self.confdir), "-d", "ALL", check=False)

    def submit(self, sender: str, recipients: list[str], message: bytes,
               options: tuple[str, ...] = ()) -> None:
        """Hand a message to this Postfix over SMTP (like any client would)."""
        import smtplib

        if b"\r\n" not in message:  # smtplib fixes line ends of str only; bytes "x\n" would
            message = message.replace(b"\n", b"\r\n")  # gain a blank line at the end
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test",
                          timeout=60) as client:
            client.sendmail(sender, recipients, message, mail_options=list(options))

    def wait(self, predicate: Callable[[], object], timeout: float = 60.0,
             what: str = "condition") -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{what} not reached in {timeout:g}s; queue={self.queue()}\n"
                           f"--- {self.config_path} ---\n{self.config_path.read_text()}\n"
                           f"--- maillog ---\n{self.log()[-4000:]}")

    def wait_log(self, needle: str, timeout: float = 60.0) -> str:
        return str(self.wait(lambda: needle in self.log() and self.log(), timeout,
                             f"{needle!r} in maillog"))

    def wait_queued(self, count: int = 1, timeout: float = 60.0) -> list[dict]:
        """Wait until ``count`` messages are in the queue with a delay_reason (deferred)."""
        def deferred() -> list[dict]:
            q = self.queue()
            done = [m for m in q if m.get("queue_name") == "deferred"
                    and all(r.get("delay_reason") for r in m["recipients"])]
            return q if len(done) >= count else []
        return list(self.wait(deferred, timeout, f"{count} deferred message(s)"))

    def wait_empty(self, timeout: float = 60.0) -> None:
        self.wait(lambda: not self.queue(), timeout, "an empty queue")

    # ---- Postfix's own map client against the daemon

    def query(self, key: str, table: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """`postmap -c DIR -q KEY TABLE`: one lookup as Postfix's daemons make it."""
        return subprocess.run([POSTMAP, "-c", str(self.confdir), "-q", key, table],
                              capture_output=True, text=True, timeout=timeout)

    def stdin_session(self, table: str) -> subprocess.Popen:
        """`postmap -q - TABLE`: one Postfix client keeping its map connection open.

        SIGPIPE stays ignored (restore_signals=False), as in Postfix's daemons (trivial-rewrite
        ignores it): a write to a connection the daemon closed is then an error Postfix's map
        client recovers from by reconnecting, instead of killing the command.
        """
        return subprocess.Popen([POSTMAP, "-c", str(self.confdir), "-q", "-", table],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, bufsize=1,
                                restore_signals=False)
