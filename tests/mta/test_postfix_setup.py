"""`torroute postfix setup|check|remove` against real Postfix configurations and instances.

The program is this checkout's ``torroute`` (support.pipe.TORROUTE), run as an admin would run
it; Postfix's own postconf(1) reads and writes the files.  The end-to-end tests start from a
Postfix configuration with no torroute in it (the test runner's, stripped), run setup on the
configuration directory alone, then start that Postfix: a message to a pinned domain must reach
the onion MX over the private Tor network, and remove must give back the very same bytes.
"""

from __future__ import annotations

import hashlib
import os
import smtplib
import subprocess
import time
from pathlib import Path

import pytest
from support.daemon import wait_socket
from support.e2e import OnionMX, lmtp_destination, message, write_config
from support.pipe import TORROUTE
from support.postfix import MASTER_CF, PostfixInstance

from torroute.errors import ConfigError
from torroute.mta.postfix import POSTCONF, RECIPIENT_LIMIT, STATE_NAME, PostfixConfig, SetupOptions
from torroute.testing.dnsmasq import SrvRecord

pytestmark = [pytest.mark.postfix]

#: what an existing site has: its own transport table and clear-net routing
SITE_MAIN_CF = """\
# a site's main.cf, with comments that must survive
compatibility_level = 3.6
myhostname = mx.site.test
relayhost = [127.0.0.1]:2525
default_transport = smtp
sender_dependent_relayhost_maps = texthash:/etc/postfix/sender_relay
transport_maps =
    texthash:/etc/postfix/transport,
    texthash:/etc/postfix/transport2
message_size_limit = 30000000
"""


def torroute(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TORROUTE, "postfix", *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})


def postconf_n(confdir: Path) -> dict[str, str]:
    out = subprocess.run([POSTCONF, "-c", str(confdir), "-n"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                for line in out.splitlines())


def digests(confdir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(confdir.iterdir())}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A configuration directory alone: main.cf, master.cf, nothing running, no queue."""
    confdir = tmp_path / "postfix"
    confdir.mkdir()
    (confdir / "main.cf").write_text(SITE_MAIN_CF)
    (confdir / "master.cf").write_text(MASTER_CF.format(
        host="127.0.0.1", port=25, smtpd_args="", torroute_service="", extra=""))
    return confdir


PIPE_ARGS = ("--program", "/usr/bin/torroute", "--user", "nobody")


def test_setup_twice_then_remove_is_byte_identical(site: Path) -> None:
    original = {n: (site / n).read_bytes() for n in ("main.cf", "master.cf")}
    before = postconf_n(site)
    first = torroute("setup", "-c", str(site), *PIPE_ARGS)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("set ") == 3 and first.stderr == ""
    after = postconf_n(site)
    changed = {k for k in after.keys() | before.keys() if after.get(k) != before.get(k)}
    assert changed == {"transport_maps", RECIPIENT_LIMIT}  # nothing about the clear net
    assert after["transport_maps"] == (
        "proxy:socketmap:unix:/run/torroute/socketmap.sock:transport, "
        "texthash:/etc/postfix/transport, texthash:/etc/postfix/transport2")
    assert "# a site's main.cf, with comments that must survive" in (site / "main.cf").read_text()
    master = subprocess.run([POSTCONF, "-c", str(site), "-M", "torroute/unix"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert master[:8] == ["torroute", "unix", "-", "n", "n", "-", "-", "pipe"]
    assert "argv=/usr/bin/torroute" in master and "user=nobody" in master
    state = digests(site)
    assert set(state) == {"main.cf", "master.cf", "main.cf.torroute-backup",
                          "master.cf.torroute-backup", STATE_NAME}

    second = torroute("setup", "-c", str(site), *PIPE_ARGS)
    assert second.returncode == 0 and "nothing to change" in second.stdout
    assert digests(site) == state  # not a byte changed, the state file neither
    clean = torroute("check", "-c", str(site))  # the options come from the state file
    assert (clean.returncode, clean.stdout, clean.stderr) == (0, "", "")

    removed = torroute("remove", "-c", str(site))
    assert removed.returncode == 0, removed.stderr
    assert "restored from the backups" in removed.stdout
    assert {n: (site / n).read_bytes() for n in original} == original
    assert sorted(p.name for p in site.iterdir()) == ["main.cf", "master.cf"]
    again = torroute("remove", "-c", str(site))
    assert again.returncode == 0 and "not set up" in again.stdout


def test_dry_run_changes_nothing(site: Path) -> None:
    before = digests(site)
    result = torroute("setup", "-c", str(site), "--dry-run", *PIPE_ARGS)
    assert result.returncode == 0 and result.stdout.count("would set") == 3
    assert digests(site) == before


def test_remove_refuses_with_a_diff_when_the_admin_edited_our_parameter(site: Path) -> None:
    assert torroute("setup", "-c", str(site), *PIPE_ARGS).returncode == 0
    tm = postconf_n(site)["transport_maps"]
    subprocess.run([POSTCONF, "-c", str(site), "-e", f"transport_maps={tm}, hash:/etc/extra"],
                   check=True)
    edited = digests(site)
    refused = torroute("remove", "-c", str(site))
    assert refused.returncode == 78
    assert "changed since torroute postfix setup: transport_maps" in refused.stderr
    assert f"-transport_maps = {tm}\n" in refused.stderr
    assert f"+transport_maps = {tm}, hash:/etc/extra\n" in refused.stderr
    assert digests(site) == edited  # nothing touched
    drift = torroute("check", "-c", str(site))
    assert drift.returncode == 78
    assert drift.stdout == (f"main.cf: transport_maps changed since setup: now {tm}, "
                            f"hash:/etc/extra  (torroute set: {tm}; remove refuses, setup "
                            "adopts it)\n")
    # the admin runs setup again: the edit is adopted, and remove takes back only our table
    adopted = torroute("setup", "-c", str(site))
    assert adopted.returncode == 0 and "transport_maps: edited since setup" in adopted.stdout
    assert torroute("check", "-c", str(site)).returncode == 0
    removed = torroute("remove", "-c", str(site))
    assert removed.returncode == 0, removed.stderr
    assert postconf_n(site)["transport_maps"] == ("texthash:/etc/postfix/transport, "
                                                  "texthash:/etc/postfix/transport2, "
                                                  "hash:/etc/extra")
    assert "torroute" not in (site / "main.cf").read_text() + (site / "master.cf").read_text()


def test_check_reports_one_line_per_drift(site: Path) -> None:
    assert torroute("setup", "-c", str(site), *PIPE_ARGS).returncode == 0
    subprocess.run([POSTCONF, "-c", str(site), "-e", f"{RECIPIENT_LIMIT}=10"], check=True)
    subprocess.run([POSTCONF, "-c", str(site), "-MX", "torroute/unix"], check=True)
    drift = torroute("check", "-c", str(site))
    assert drift.returncode == 78
    lines = drift.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("master.cf: want torroute/unix = torroute unix - n n - - pipe")
    assert lines[1] == f"main.cf: want {RECIPIENT_LIMIT} = 1  (now: 10)"
    # setup repairs the drift; remove then puts everything back
    assert torroute("setup", "-c", str(site)).returncode == 0
    assert torroute("check", "-c", str(site)).returncode == 0
    assert torroute("remove", "-c", str(site)).returncode == 0
    assert "torroute" not in (site / "main.cf").read_text() + (site / "master.cf").read_text()


def test_other_admin_edits_survive_remove(site: Path) -> None:
    before = postconf_n(site)
    assert torroute("setup", "-c", str(site), *PIPE_ARGS).returncode == 0
    subprocess.run([POSTCONF, "-c", str(site), "-e", "message_size_limit=1000"], check=True)
    removed = torroute("remove", "-c", str(site))
    assert removed.returncode == 0, removed.stderr
    assert "restored" not in removed.stdout
    assert postconf_n(site) == {**before, "message_size_limit": "1000"}
    assert "torroute" not in (site / "master.cf").read_text()


def test_mode_switch_and_bad_flags_refused(site: Path) -> None:
    assert torroute("setup", "-c", str(site), *PIPE_ARGS).returncode == 0
    state = digests(site)
    switched = torroute("setup", "-c", str(site), "--lmtp")
    assert switched.returncode == 78 and "run `torroute postfix remove` first" in switched.stderr
    for args in (("--user", "root"), ("--socket", "/run/x.sock")):
        bad = torroute("setup", "-c", str(site), *args)
        assert bad.returncode == 78 and bad.stderr.count("\n") == 1, bad.stderr
    assert digests(site) == state
    missing = torroute("setup", "-c", str(site / "nope"))
    assert missing.returncode == 78 and "no such file" in missing.stderr


# ---- end to end: a real Postfix set up by `torroute postfix setup`, the private Tor network

class Untouched(PostfixInstance):
    """The test runner's Postfix, minus everything torroute: an admin's configuration before
    `torroute postfix setup`.  Written once; start() then runs what setup left."""

    def write(self) -> None:
        if (self.confdir / "main.cf").exists():
            return
        super().write()
        main = self.confdir / "main.cf"
        lines = [ln for ln in main.read_text().splitlines(keepends=True)
                 if not ln.startswith(("transport_maps =", RECIPIENT_LIMIT))]
        if self.transport_maps:
            lines.append(f"transport_maps = {self.transport_maps}\n")
        main.write_text("".join(lines))
        master = self.confdir / "master.cf"
        kept, skipping = [], False
        for ln in master.read_text().splitlines(keepends=True):
            skipping = ln.startswith("torroute ") or (skipping and ln[:1].isspace())
            if not skipping:
                kept.append(ln)
        master.write_text("".join(kept))
        assert "socketmap" not in main.read_text() and RECIPIENT_LIMIT not in main.read_text()
        assert " pipe" not in master.read_text()
        settle(self.confdir)


def settle(confdir: Path) -> None:
    """A fresh main.cf stalls every Postfix command ~1.8 s (see support.postfix): age it.
    Only mtimes change, never bytes."""
    old = time.time() - 3600
    for name in ("main.cf", "master.cf"):
        os.utime(confdir / name, (old, old))


def run_e2e(onion_mx: OnionMX, testnet, dnsmasq_factory, daemon_factory, serve_dir: Path,
            postfix_dir: Path, clear_sink, lmtp: bool) -> None:
    onion_mx.sink.reset()
    dns = dnsmasq_factory([SrvRecord("_onion-mx._tcp.example.test", onion_mx.onion, 25)])
    cfg = write_config(serve_dir, dns.port, onion_mx.onion, testnet.socks_extended)
    lmtp_args = ("--lmtp", f"unix:{serve_dir / 'lmtp.sock'}") if lmtp else ()
    daemon = daemon_factory("--config", str(cfg), "--socket-group", "postfix", *lmtp_args)
    if lmtp:
        wait_socket(str(serve_dir / "lmtp.sock"), proc=daemon.proc)
    workdir = postfix_dir / ("lmtp" if lmtp else "pipe")
    workdir.mkdir(mode=0o755)
    own = workdir / "transport"  # the site's own table: kept, after torroute's
    own.write_text("kept.test error:5.7.1 answered-by-the-site-table\n"
                   "pinned.test error:5.7.1 site-table-must-not-win\n")
    pf = Untouched(workdir, f"texthash:{own}", clear_sink.port)
    pf.write()
    original = {n: (pf.confdir / n).read_bytes() for n in ("main.cf", "master.cf")}
    mode = ("--lmtp",) if lmtp else ("--program", TORROUTE, "--user", "nobody",
                                     "--config", str(cfg))
    result = torroute("setup", "-c", str(pf.confdir), "--socket", f"unix:{daemon.socketmap}",
                      *mode)
    assert result.returncode == 0, result.stderr
    assert f"transport_maps = proxy:socketmap:unix:{daemon.socketmap}:transport, " \
           f"texthash:{own}" in result.stdout
    assert postconf_n(pf.confdir)["default_transport"] == f"smtp:[127.0.0.1]:{clear_sink.port}"
    settle(pf.confdir)
    try:
        pf.start()
        pf.submit("alice@origin.test", ["someone@pinned.test"],
                  message("pinned via setup", "someone@pinned.test"))
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:  # smtpd asks at RCPT
            pf.submit("alice@origin.test", ["x@kept.test"], message("kept", "x@kept.test"))
        assert refused.value.recipients["x@kept.test"] == (
            550, b"5.7.1 <x@kept.test>: Recipient address rejected: answered-by-the-site-table")
        [got] = onion_mx.sink.wait_for(1, timeout=90)
        assert got.rcpt_tos == ["someone@pinned.test"] and got.mail_from == "alice@origin.test"
        pf.wait_empty(30)
        assert clear_sink.messages == []
        log = pf.log()
        assert "site-table-must-not-win" not in log
        via = (f"[{lmtp_destination(serve_dir / 'lmtp.sock', onion_mx.onion)}]" if lmtp
               else "relay=torroute")
        assert via in log and ("postfix/lmtp[" in log) == lmtp
        assert log.count("status=sent") == 1
        assert not [ln for ln in log.splitlines()
                    if any(w in ln for w in (" warning: ", " fatal: ", " panic: ", " error: "))]
        again = torroute("setup", "-c", str(pf.confdir), *mode,
                         "--socket", f"unix:{daemon.socketmap}")
        assert again.returncode == 0 and "nothing to change" in again.stdout
    finally:
        pf.stop()
    removed = torroute("remove", "-c", str(pf.confdir))
    assert removed.returncode == 0, removed.stderr
    assert {n: (pf.confdir / n).read_bytes() for n in original} == original
    assert not (pf.confdir / STATE_NAME).exists()


@pytest.mark.testnet
def test_pipe_setup_delivers_pinned_domain_over_tor(onion_mx, testnet, dnsmasq_factory,
                                                    daemon_factory, serve_dir, postfix_dir,
                                                    clear_sink) -> None:
    run_e2e(onion_mx, testnet, dnsmasq_factory, daemon_factory, serve_dir, postfix_dir,
            clear_sink, lmtp=False)


@pytest.mark.testnet
def test_lmtp_setup_delivers_pinned_domain_over_tor(onion_mx, testnet, dnsmasq_factory,
                                                    daemon_factory, serve_dir, postfix_dir,
                                                    clear_sink) -> None:
    run_e2e(onion_mx, testnet, dnsmasq_factory, daemon_factory, serve_dir, postfix_dir,
            clear_sink, lmtp=True)


def test_a_postconf_failing_halfway_leaves_the_files_as_they_were(site: Path,
                                                                  tmp_path: Path) -> None:
    """FAKE postconf (named so): the real one, except that ``-e`` fails, as on a full disk --
    a fault the real tool gives on no demand.  The service was already added by then."""
    fake = tmp_path / "postconf-fails-on-e"
    fake.write_text(f'#!/bin/sh\nfor a; do [ "$a" = -e ] && {{ echo "postconf: fatal: '
                    f'write error" >&2; exit 1; }}; done\nexec {POSTCONF} "$@"\n')
    fake.chmod(0o755)
    before = digests(site)
    with pytest.raises(ConfigError, match="write error"):
        PostfixConfig(site, postconf=str(fake)).setup(SetupOptions(user="nobody"))
    assert digests(site) == before  # no service, no backups, no state file
