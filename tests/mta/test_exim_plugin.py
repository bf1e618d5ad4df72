"""The Exim plugin (plugins/exim_perl) in a real Exim, with the real torroute daemon and tor.

Both variants -- embedded Perl (``${perl{torroute_route}}``) and ``${readsocket}`` -- run the
same tests.  Here tor is the lead's loopback-only bridge-mode tor: its DNSPort automaps onions
without bootstrap, so routing decisions are real; deliveries through the private Tor network
are in test_exim_testnet.py.  The ``clear_net`` router after torroute's delivers to a local
sink standing in for the clear net: a decline is observable there, and a leak would be too.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.onions import ONION_A, ONION_B, ONION_C

from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port
from torroute.testing.sink import MaildirSink
from torroute.testing.tor import TorProcess
from torroute.tor.automap import resolve_automap

pytestmark = pytest.mark.exim

SRV = "_onion-mx._tcp."
VARIANTS = ["perl", "readsocket"]
VIRTUAL = ipaddress.ip_network("127.192.0.0/10")
PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "exim_perl"
ROUTED = re.compile(r"router = torroute, transport = torroute_smtp\n\s+host (\S+) \[(\S+)\] "
                    r"port=(\d+)")


def daemon_args(serve_dir: Path, dns_port: int, tor_dns: tuple[str, int],
                map_text: str | None = None) -> list[str]:
    """`torroute serve` arguments: a pin, an SRV resolver, tor's DNSPort, the Exim group."""
    map_file = serve_dir / "map.txt"
    map_file.write_text(map_text if map_text is not None else
                        f"pinned.example {ONION_A}\nport.example {ONION_C}:2525\n")
    return ["--map", str(map_file), "--nameserver", f"127.0.0.1:{dns_port}",
            "--tor-dns", f"{tor_dns[0]}:{tor_dns[1]}", "--local-domain", "local.test",
            "--dns-timeout", "1", "--socket-group", "Debian-exim"]


@pytest.fixture
def dns(dnsmasq_factory):
    # authoritative-style for .example: unknown names are NXDOMAIN (a definite "no route")
    return dnsmasq_factory([SrvRecord(SRV + "srv.example", ONION_B, 25)],
                           local_domains=["example"])


@pytest.fixture
def clear_sink(serve_dir: Path):
    """The stand-in for the clear net (the router after torroute's delivers here)."""
    sink = MaildirSink(serve_dir / "clear" / "Maildir").start()
    yield sink
    sink.stop()


@pytest.fixture
def daemon(daemon_factory, serve_dir, dns, tor):
    return daemon_factory(*daemon_args(serve_dir, dns.port, tor.dns))


def daemon_log_has(daemon, *texts: str, timeout: float = 10.0) -> str:
    """The daemon's log once it has every one of ``texts`` (it may flush its log lazily)."""
    deadline = time.monotonic() + timeout
    while True:
        log = daemon.log()
        if all(t in log for t in texts) or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


def routed_host(result: subprocess.CompletedProcess) -> tuple[str, int]:
    m = ROUTED.search(result.stdout)
    assert m, result.stdout + result.stderr
    assert m.group(1) == m.group(2)  # an IP literal: no DNS lookup of any name
    return m.group(1), int(m.group(3))


@pytest.mark.parametrize("variant", VARIANTS)
def test_bt_shows_onion_routes(variant, daemon, tor, exim_plugin_factory) -> None:
    exim = exim_plugin_factory(daemon.exim, tor.socks_plain, perl=variant == "perl")
    cases = {
        "user@pinned.example": (ONION_A, 25),  # pinned map
        "user@PORT.example": (ONION_C, 2525),  # pinned with a port
        "user@srv.example": (ONION_B, 25),  # DNS SRV _onion-mx._tcp
        f"user@{ONION_C}": (ONION_C, 25),  # a .onion recipient
    }
    for address, (onion, port) in cases.items():
        r = exim.bt(address)
        assert r.returncode == 0, r.stdout + r.stderr
        ip, got_port = routed_host(r)
        # the route is tor's automap address for exactly that onion: tor maps it back
        assert ipaddress.ip_address(ip) in VIRTUAL
        assert ip == str(resolve_automap(onion, tor.dns)), address
        assert got_port == port
    r = exim.bt("user@nothing.example")  # no pin, NXDOMAIN for SRV: declined to the next router
    assert r.returncode == 0 and "router = clear_net" in r.stdout, r.stdout + r.stderr
    r = exim.bt("bob@local.test")  # local domains are not even asked about
    assert r.returncode == 0 and "router = local_user" in r.stdout
    assert "torroute" not in r.stderr
    log = daemon_log_has(daemon, "domain=pinned.example result=route",
                         "domain=nothing.example result=noroute")
    assert "domain=pinned.example result=route" in log
    assert "domain=nothing.example result=noroute" in log
    assert "domain=local.test" not in log


@pytest.mark.parametrize("variant", VARIANTS)
def test_invalid_onion_bounces_never_dnslookup(variant, daemon, tor, exim_plugin_factory,
                                               clear_sink) -> None:
    exim = exim_plugin_factory(daemon.exim, tor.socks_plain, perl=variant == "perl",
                               clear_port=clear_sink.port)
    bad = ONION_A[:-10] + "aaaaaa.onion"  # right shape, wrong checksum
    r = exim.bt(f"user@{bad}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "is undeliverable: torroute:" in r.stdout
    msgid = exim.submit(f"user@{bad}")
    assert exim.queue_count() == 0
    assert any(" ** user@" in ln for ln in exim.log_lines(msgid)), exim.mainlog()
    assert "Mail delivery failed" in exim.mailbox("alice")  # the bounce reached the sender
    assert clear_sink.messages == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_route_declines_to_next_router(variant, daemon, tor, exim_plugin_factory,
                                          clear_sink) -> None:
    exim = exim_plugin_factory(daemon.exim, tor.socks_plain, perl=variant == "perl",
                               clear_port=clear_sink.port)
    msgid = exim.submit("bob@nothing.example")
    clear_sink.wait_for(1, timeout=20)
    assert clear_sink.messages[0].rcpt_tos == ["bob@nothing.example"]
    assert any("=> bob@nothing.example R=clear_net T=clear_smtp" in ln
               for ln in exim.log_lines(msgid)), exim.mainlog()
    assert exim.queue_count() == 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_daemon_down_defers(variant, how, daemon, tor, exim_plugin_factory, clear_sink) -> None:
    """Daemon stopped (socket gone) or killed -9 (stale socket: connection refused): the mail
    stays queued, the clear net sees nothing; once the daemon is back the route works again."""
    exim = exim_plugin_factory(daemon.exim, tor.socks_plain, perl=variant == "perl",
                               clear_port=clear_sink.port)
    assert exim.bt("user@pinned.example").returncode == 0
    if how == "stopped":
        daemon.stop()
        assert not Path(daemon.exim).exists()
    else:
        daemon.proc.kill()
        daemon.proc.wait()
        assert Path(daemon.exim).is_socket()
    for address in ("user@pinned.example", "user@nothing.example"):
        r = exim.bt(address)
        assert r.returncode == 1, r.stdout + r.stderr  # 1: cannot be resolved at this time
        assert "cannot be resolved at this time" in r.stdout
    msgid = exim.submit("user@pinned.example")
    exim.submit("other@nothing.example")  # not even "no route" can be known: defer too
    assert exim.queue_count() == 2
    lines = exim.log_lines(msgid)
    assert any(" == user@pinned.example R=torroute" in ln and " defer " in ln for ln in lines)
    assert clear_sink.messages == []
    daemon.start()
    r = exim.bt("user@pinned.example")
    assert r.returncode == 0 and routed_host(r)


@pytest.mark.parametrize("variant", VARIANTS)
def test_daemon_hung_defers_within_timeout(variant, daemon, tor, exim_plugin_factory) -> None:
    """A daemon that accepts but never answers (SIGSTOP: real, not simulated) defers after
    TORROUTE_TIMEOUT instead of blocking Exim."""
    exim = exim_plugin_factory(daemon.exim, tor.socks_plain, perl=variant == "perl",
                               timeout="2s")
    daemon.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = exim.bt("user@pinned.example")
        took = time.monotonic() - started
    finally:
        daemon.signal(signal.SIGCONT)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot be resolved at this time" in r.stdout
    assert 1.5 < took < 4.5  # TORROUTE_TIMEOUT (2s) bounds the wait in both variants
    assert exim.bt("user@pinned.example").returncode == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_tor_dnsport_down_defers(variant, daemon_factory, serve_dir, dns, tor,
                                 exim_plugin_factory, clear_sink) -> None:
    """The route exists, but tor's DNSPort does not answer (nothing listens): defer with the
    daemon's reason; the clear net sees nothing.  Unrouted domains still decline (no tor
    needed to know there is no route)."""
    closed = ("127.0.0.1", free_port())
    d = daemon_factory(*daemon_args(serve_dir, dns.port, closed))
    exim = exim_plugin_factory(d.exim, tor.socks_plain, perl=variant == "perl",
                               clear_port=clear_sink.port)
    for address in ("user@pinned.example", "user@srv.example", f"user@{ONION_C}"):
        r = exim.bt(address)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "torroute: temp automap" in r.stdout and "DNSPort" in r.stdout, r.stdout
    msgid = exim.submit("user@pinned.example")
    assert exim.queue_count() == 1
    assert any("defer" in ln and "torroute: temp automap" in ln for ln in exim.log_lines(msgid))
    assert exim.bt("user@nothing.example").returncode == 0
    assert clear_sink.messages == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_dns_failure_defers_srv_but_pins_route(variant, daemon_factory, serve_dir, silent_udp,
                                               tor, exim_plugin_factory) -> None:
    """The SRV resolver times out: an unpinned domain might have an onion route, so it defers
    (never dnslookup); pinned domains need no DNS and still route."""
    d = daemon_factory(*daemon_args(serve_dir, silent_udp.address[1], tor.dns))
    exim = exim_plugin_factory(d.exim, tor.socks_plain, perl=variant == "perl")
    r = exim.bt("user@srv.example")
    assert r.returncode == 1 and "torroute: temp DNS timeout" in r.stdout, r.stdout + r.stderr
    r = exim.bt("user@pinned.example")
    assert r.returncode == 0 and routed_host(r)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inet_listener(variant, daemon_factory, serve_dir, dns, tor, exim_plugin_factory) -> None:
    """TORROUTE_SOCKET = inet:127.0.0.1:PORT works in both variants (torroute serve --exim
    inet:...)."""
    port = free_port()
    d = daemon_factory(*daemon_args(serve_dir, dns.port, tor.dns), "--exim",
                       f"inet:127.0.0.1:{port}")
    exim = exim_plugin_factory(f"inet:127.0.0.1:{port}", tor.socks_plain,
                               perl=variant == "perl")
    ip, _ = routed_host(exim.bt("user@pinned.example"))
    assert ip == str(resolve_automap(ONION_A, tor.dns))
    expected = "proto=exim domain=pinned.example result=route"
    assert expected in daemon_log_has(d, expected)


def test_perl_functions_directly(daemon, tor) -> None:
    """torroute.pl outside Exim (plain perl, core modules only): the answer contract."""
    script = PLUGIN_DIR / "torroute.pl"

    def perl(code: str) -> subprocess.CompletedProcess:
        return subprocess.run(["perl", "-w", "-e", f"do '{script}' or die $@ || $!; {code}"],
                              capture_output=True, text=True, timeout=30)

    r = perl(f"print torroute_route('pinned.example', '{daemon.exim}', '1m30s')")
    assert r.returncode == 0 and r.stdout == f"{resolve_automap(ONION_A, tor.dns)}::25", r
    r = perl(f"print torroute_route('port.example', 'unix:{daemon.exim}')")
    assert r.returncode == 0 and r.stdout.endswith("::2525"), r
    r = perl(f"print defined(torroute_route('nothing.example', '{daemon.exim}')) ? 'def' : 'undef'")
    assert r.stdout == "undef", r
    r = perl(f"print torroute_answer('bad.onion', '{daemon.exim}')")
    assert r.stdout.startswith("fail "), r
    # die text is what Exim logs: no trailing newline, no "at FILE line N"
    r = perl(f"eval {{ torroute_route('x\ny', '{daemon.exim}') }}; print \"[$@]\"")
    assert r.stdout == "[torroute: refusing to look up a name with spaces or control characters]"
    r = perl("eval { torroute_route('pinned.example', '/nonexistent/exim.sock') }; print \"[$@]\"")
    assert r.stdout.startswith("[torroute: cannot connect to the torroute daemon at "), r
    assert r.stdout.endswith("No such file or directory]")
    # TORROUTE_TIMEOUT arrives in Exim time syntax
    r = perl("print join ',', map { _torroute_seconds($_) // 'undef' } "
             "qw(10s 1m30s 2 0.5 1h 5x), ''")
    assert r.stdout == "10,90,2,0.5,3600,undef,undef", r
    # a temporary answer of the daemon (DNS REFUSED for a name outside .example) dies with it
    r = perl(f"eval {{ torroute_route('elsewhere.other', '{daemon.exim}') }}; print \"[$@]\"")
    assert r.stdout.startswith("[torroute: temp DNS REFUSED"), r


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_state_over_tor_restart(variant, daemon_factory, serve_dir, dns, tor_factory,
                                   exim_plugin_factory) -> None:
    """tor forgets automap addresses when it restarts; the plugin keeps nothing, so Exim's next
    routing gets a fresh address from the new tor (here: a tor on the same DNSPort)."""
    t = tor_factory()
    d = daemon_factory(*daemon_args(serve_dir, dns.port, t.dns))
    exim = exim_plugin_factory(d.exim, t.socks_plain, perl=variant == "perl")
    first, _ = routed_host(exim.bt("user@pinned.example"))
    t.stop()
    r = exim.bt("user@pinned.example")
    assert r.returncode == 1, r.stdout  # tor down: defer, nothing cached
    t.start()
    second, _ = routed_host(exim.bt("user@pinned.example"))
    assert second == str(resolve_automap(ONION_A, t.dns))
    assert ipaddress.ip_address(first) in VIRTUAL and ipaddress.ip_address(second) in VIRTUAL


def torrc_snippet_lines(socks_port: int, dns_port: int) -> list[str]:
    """plugins/exim_perl/torrc.torroute, with its production ports swapped for free ones."""
    text = (PLUGIN_DIR / "torrc.torroute").read_text()
    text = text.replace("127.0.0.1:9050", f"127.0.0.1:{socks_port}")
    text = text.replace("127.0.0.1:9053", f"127.0.0.1:{dns_port}")
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


class SnippetTor(TorProcess):
    """The lead's loopback-only bridge-mode tor, but with the plugin's own torrc lines instead
    of the fixture's SocksPort/DNSPort/automap lines."""

    REPLACED = ("dnsport", "automaphostsonresolve", "automaphostssuffixes",
                "virtualaddrnetworkipv4")

    def torrc(self) -> str:
        lines = [ln for ln in super().torrc().splitlines()
                 if ln.split()[0].lower() not in self.REPLACED
                 and ln != f"SocksPort 127.0.0.1:{self.socks_port}"]
        return "\n".join(lines + torrc_snippet_lines(self.socks_port, self.dns_port)) + "\n"


@pytest.mark.parametrize("variant", VARIANTS)
def test_torrc_snippet_is_what_automap_needs(variant, daemon_factory, serve_dir, dns,
                                             exim_plugin_factory, tmp_path_factory) -> None:
    """A tor configured with exactly the documented torrc lines gives Exim its routes."""
    t = SnippetTor(tmp_path_factory.mktemp("snippet-tor"))
    assert "AutomapHostsOnResolve 1" in t.torrc() and "DNSPort" in t.torrc()
    t.start()
    try:
        d = daemon_factory(*daemon_args(serve_dir, dns.port, t.dns))
        exim = exim_plugin_factory(d.exim, t.socks_plain, perl=variant == "perl")
        ip, port = routed_host(exim.bt("user@pinned.example"))
        assert ipaddress.ip_address(ip) in VIRTUAL and port == 25
        assert ip == str(resolve_automap(ONION_A, t.dns))
    finally:
        t.stop()
