"""The plugin inside Debian's real exim4 configuration, split and non-split.

Debian's exim4-config files (unpacked, not installed: the package set conflicts with postfix)
get torroute through plugins/exim_perl/install-debian.sh, and Debian's own update-exim4.conf
generates the config Exim runs -- the path a Debian postmaster takes.  Config type smarthost
(to a sink on 127.0.0.2): torroute's router must come before it, and what torroute declines
goes there, which keeps every test away from the system resolver.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support.exim import DEBIAN_CONFIG, DEBIAN_UE4CC, PLUGIN
from support.onions import ONION_A, ONION_B
from support.paths import shared_tmpdir

from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.sink import MaildirSink
from torroute.tor.automap import resolve_automap

pytestmark = pytest.mark.exim

VIRTUAL = ipaddress.ip_network("127.192.0.0/10")
LAYOUTS = [pytest.param(True, id="split"), pytest.param(False, id="nonsplit")]
VARIANTS = ["perl", "readsocket"]


def daemon_args(serve_dir: Path, dns_port: int, tor_dns: tuple[str, int], onion: str) -> list:
    (serve_dir / "map.txt").write_text(f"pinned.example {onion}\n")
    return ["--map", str(serve_dir / "map.txt"), "--nameserver", f"127.0.0.1:{dns_port}",
            "--tor-dns", f"{tor_dns[0]}:{tor_dns[1]}", "--local-domain", "local.test",
            "--socket-group", "Debian-exim"]


@pytest.fixture
def smarthost_sink(serve_dir: Path):
    """Debian's smarthost: stands in for the clear net (127.0.0.2, not a local interface
    address, so Exim's "self" check does not interfere)."""
    sink = MaildirSink(serve_dir / "smarthost" / "Maildir", host="127.0.0.2").start()
    yield sink
    sink.stop()


@pytest.mark.parametrize("split", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_debian_config_routes(split, variant, tor, dnsmasq_factory, daemon_factory, serve_dir,
                              debian_exim_factory) -> None:
    dns = dnsmasq_factory([SrvRecord("_onion-mx._tcp.srv.example", ONION_B)],
                          local_domains=["example"])
    daemon = daemon_factory(*daemon_args(serve_dir, dns.port, tor.dns, ONION_A))
    exim = debian_exim_factory(daemon.exim, tor.socks_plain, split=split,
                               perl=variant == "perl")
    # torroute's routers sit between hubbed_hosts and Debian's primary (smarthost) router
    r = exim.run("-bP", "router_list")
    routers = r.stdout.split()
    ours = ["torroute", "torroute_onion"] if variant == "perl" else [
        "torroute_lookup", "torroute", "torroute_onion"]
    start = routers.index("hubbed_hosts") + 1
    assert routers[start:start + len(ours) + 1] == ours + ["smarthost"], r.stdout
    for address, onion in (("user@pinned.example", ONION_A), ("user@srv.example", ONION_B)):
        r = exim.bt(address)
        assert r.returncode == 0, r.stdout + r.stderr
        m = re.search(r"router = torroute, transport = torroute_smtp\n\s+host (\S+) \[\S+\] "
                      r"port=25", r.stdout)
        assert m and ipaddress.ip_address(m.group(1)) in VIRTUAL, r.stdout
        assert m.group(1) == str(resolve_automap(onion, tor.dns))
    r = exim.bt("user@nothing.example")
    assert r.returncode == 0 and "router = smarthost" in r.stdout, r.stdout + r.stderr
    assert "host 127.0.0.2 [127.0.0.2]" in r.stdout
    r = exim.bt(f"user@{ONION_A[:-12]}aaaaaaa.onion")
    assert r.returncode == 2 and "undeliverable: torroute" in r.stdout, r.stdout
    daemon.stop()
    for address in ("user@pinned.example", "user@nothing.example"):
        r = exim.bt(address)
        assert r.returncode == 1 and "cannot be resolved at this time" in r.stdout, r.stdout


def generate(confdir: Path, out: Path) -> str:
    out.unlink(missing_ok=True)
    r = subprocess.run([str(DEBIAN_CONFIG / "usr/sbin/update-exim4.conf"), "--confdir",
                        str(confdir), "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out.read_text()


@pytest.mark.parametrize("split", LAYOUTS)
def test_install_is_idempotent_and_uninstall_rolls_back(split) -> None:
    if not (DEBIAN_CONFIG / "etc/exim4").exists():
        pytest.fail(f"{DEBIAN_CONFIG} missing (see plugins/exim_perl/README.md, 'Tests')")
    work = shared_tmpdir("torroute-debinst-")
    try:
        confdir, pristine = work / "etc", work / "pristine"
        shutil.copytree(DEBIAN_CONFIG / "etc/exim4", confdir)
        (confdir / "update-exim4.conf.conf").write_text(DEBIAN_UE4CC.format(
            smtp_port=25, smarthost="127.0.0.2::25", split="true" if split else "false"))
        shutil.copytree(confdir, pristine)
        before = generate(confdir, work / "before.conf")
        installer = [str(PLUGIN / "install-debian.sh"), "--confdir", str(confdir),
                     "--perl-dir", str(work / "perl")]
        for _ in range(2):  # twice: the second run changes nothing
            r = subprocess.run(installer, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            assert ("split config" if split else "nonsplit config") in r.stdout
        installed = generate(confdir, work / "installed.conf")
        if split:  # the files' text is in the generated config
            assert installed.count("\ntorroute:\n") == 2  # the perl and the readsocket variant
            assert installed.count("\ntorroute_smtp:\n") == 1
        else:  # three .include lines, once each, in the documented places
            includes = re.findall(r"^\.include (\S+)$", installed, re.M)
            assert includes == [str(confdir / "torroute" / name) for name in
                                ("01_torroute_macros", "190_torroute", "30_torroute")]
        assert (work / "perl" / "torroute.pl").read_bytes() == (PLUGIN / "torroute.pl").read_bytes()
        r = subprocess.run(installer + ["--uninstall"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert generate(confdir, work / "after.conf") == before
        diff = subprocess.run(["diff", "-r", str(pristine), str(confdir)],
                              capture_output=True, text=True)
        assert diff.returncode == 0, diff.stdout  # not one byte left behind
        assert not (work / "perl").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.testnet
@pytest.mark.parametrize("split,variant", [pytest.param(True, "perl", id="split-perl"),
                                           pytest.param(False, "readsocket",
                                                        id="nonsplit-readsocket")])
def test_debian_config_delivers_over_onion(split, variant, testnet, onion_sink, dnsmasq_factory,
                                           daemon_factory, serve_dir, debian_exim_factory,
                                           smarthost_sink) -> None:
    dns = dnsmasq_factory([], local_domains=["example"])
    daemon = daemon_factory(*daemon_args(serve_dir, dns.port, testnet.dns, testnet.onion))
    exim = debian_exim_factory(daemon.exim, testnet.socks, split=split, perl=variant == "perl",
                               smarthost_port=smarthost_sink.port)
    msgid = exim.submit("ivy@pinned.example", verbose=True)
    transcript = exim.last_transcript
    other = exim.submit("jay@nothing.example")
    got = onion_sink.sink.wait_for(1, timeout=90)
    assert got[0].rcpt_tos == ["ivy@pinned.example"]
    ip = str(resolve_automap(testnet.onion, testnet.dns))
    assert any(re.search(rf" => ivy@pinned\.example R=torroute T=torroute_smtp "
                         rf"H={re.escape(ip)} \[{re.escape(ip)}\]:25 "
                         rf"PRX=\[127\.0\.0\.1\]:{testnet.socks[1]}", ln)
               for ln in exim.log_lines(msgid)), exim.mainlog()
    assert "SMTP>> EHLO localhost" in transcript, transcript
    # the declined domain went the usual (here: smarthost) way, the onion-routed one did not
    smarthost_sink.wait_for(1, timeout=30)
    assert [m.rcpt_tos for m in smarthost_sink.messages] == [["jay@nothing.example"]]
    assert any(" => jay@nothing.example R=smarthost" in ln for ln in exim.log_lines(other))
    assert exim.queue_count() == 0
