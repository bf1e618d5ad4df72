"""The daemon against real Exim: ${readsocket} answers, and which router text declines/defers.

Proved here with exim -be / -bt (documented in docs/daemon.rst):
  found     -> manualroute routes to <automap ip>::<port> (tor's DNSPort, asked every time)
  no route  -> empty answer -> the redirect router declines -> the next router (clear net)
  temp      -> ':defer:' -> "cannot be resolved at this time" (exim -bt exit 1): mail stays queued
  daemon down / tor DNSPort down -> defer as well; invalid .onion -> ':fail:' (bounce)
"""

from __future__ import annotations

import ipaddress
import re

import pytest
from support.onions import ONION_A, ONION_B

from torroute.testing.dnsmasq import SrvRecord

SRV = "_onion-mx._tcp."

# The router text from docs/daemon.rst, with the socket path filled in.
ROUTERS = r"""
torroute_lookup:
  driver = redirect
  domains = ! +local_domains
  address_data = ${{readsocket{{{sock}}}{{route $domain\n}}{{5s}}{{ }}}}
  data = ${{if match{{$address_data}}{{\N^(?:(?:\d{{1,3}}\.){{3}}\d{{1,3}}::\d{{1,5}})? ?$\N}}{{}}\
           {{${{if match{{$address_data}}{{\N^fail (.*?) ?$\N}}{{:fail: torroute: $1}}\
                 {{:defer: torroute: $address_data}}}}}}}}
  allow_defer
  allow_fail

torroute:
  driver = manualroute
  domains = ! +local_domains
  route_data = ${{if match{{$address_data}}\
                 {{\N^((?:\d{{1,3}}\.){{3}}\d{{1,3}}::\d{{1,5}}) ?$\N}}{{$1}}}}
  transport = onion_smtp

clearnet:
  driver = manualroute
  domains = ! +local_domains
  route_list = * 127.0.0.1::2599
  transport = clear_smtp
  self = send
"""


def write_config(path, dns_port: int, tor_dns: tuple[str, int]) -> str:
    (path / "map.txt").write_text(f"pinned.test {ONION_B}\nport.test {ONION_A}:2525\n")
    cfg = path / "torroute.toml"
    cfg.write_text(f"""
[routing]
maps = ["map.txt"]
nameservers = ["127.0.0.1:{dns_port}"]
local_domains = ["local.test"]
dns_timeout = 1.0
[tor]
dns = "{tor_dns[0]}:{tor_dns[1]}"
[serve]
automap_timeout = 1.0
""")
    return str(cfg)


@pytest.fixture
def dns(dnsmasq_factory):
    return dnsmasq_factory([SrvRecord(SRV + "srv.test", ONION_A, 25)])


@pytest.fixture
def setup(tor, dns, daemon_factory, exim_factory, serve_dir):
    d = daemon_factory("--config", write_config(serve_dir, dns.port, tor.dns))
    return d, exim_factory(ROUTERS.format(sock=d.exim))


def automap_answer(text: str) -> tuple[ipaddress.IPv4Address, int]:
    m = re.fullmatch(r"(\d+\.\d+\.\d+\.\d+)::(\d+)\s*", text)
    assert m, repr(text)
    ip = ipaddress.IPv4Address(m.group(1))
    assert ip in ipaddress.ip_network("127.192.0.0/10")  # tor's VirtualAddrNetworkIPv4
    return ip, int(m.group(2))


@pytest.mark.exim
def test_readsocket_returns_automap_address_from_real_tor(setup) -> None:
    d, exim = setup
    r = exim.expand(f"${{readsocket{{{d.exim}}}{{route nosrv.test\\n}}{{2s}}}}")
    assert r.returncode == 0
    assert r.stdout == "\n\n"  # no route: an empty line (-be adds one newline)
    r = exim.expand(f"${{readsocket{{{d.exim}}}{{route pinned.test\\n}}{{2s}}}}")
    ip, port = automap_answer(r.stdout)
    assert port == 25
    r = exim.expand(f"${{readsocket{{inet:127.0.0.1:{d.tcp_port}}}{{get u@srv.test\\n}}{{2s}}}}")
    assert r.stdout.strip() == f"200 torroute:[{ONION_A}]:25"  # Exim can ask tcp_table too
    r = exim.expand(f"${{readsocket{{{d.exim}}}{{route u@port.test\\n}}{{2s}}{{ }}}}")
    assert automap_answer(r.stdout)[1] == 2525
    assert "note='via 127." in d.wait_log("domain=pinned.test result=route")


@pytest.mark.exim
def test_router_text_found_noroute_local(setup) -> None:
    _d, exim = setup
    r = exim.route("user@srv.test")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "router = torroute, transport = onion_smtp" in r.stdout
    m = re.search(r"host (127\.\d+\.\d+\.\d+) \[\1\] port=25", r.stdout)
    assert m and ipaddress.IPv4Address(m.group(1)) in ipaddress.ip_network("127.192.0.0/10")
    r = exim.route("user@port.test")
    assert "router = torroute" in r.stdout and "port=2525" in r.stdout
    # no route: the lookup router declines and the next router (clear net) takes it
    r = exim.route("user@nosrv.test")
    assert r.returncode == 0 and "router = clearnet, transport = clear_smtp" in r.stdout


@pytest.mark.exim
def test_router_text_temp_defers(setup, dns) -> None:
    _d, exim = setup
    dns.stop()  # DNS down: the daemon answers temp, Exim must defer (exit 1), not go clear
    r = exim.route("user@unknown.test")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot be resolved at this time: torroute: temp" in r.stdout
    assert "clearnet" not in r.stdout


@pytest.mark.exim
def test_invalid_onion_fails(setup) -> None:
    _d, exim = setup
    r = exim.route("user@invalid.onion")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "is undeliverable: torroute: 'invalid.onion': a v3 onion label" in r.stdout


@pytest.mark.exim
def test_daemon_down_defers(setup) -> None:
    d, exim = setup
    d.stop()
    r = exim.route("user@pinned.test")
    assert r.returncode == 1 and "cannot be resolved at this time" in r.stdout
    assert "failed to connect to socket" in r.stdout


@pytest.mark.exim
def test_tor_dnsport_down_defers_and_tor_restart_recovers(dns, tor_factory, daemon_factory,
                                                         exim_factory, serve_dir) -> None:
    t = tor_factory()
    d = daemon_factory("--config", write_config(serve_dir, dns.port, t.dns))
    exim = exim_factory(ROUTERS.format(sock=d.exim))
    assert "router = torroute" in exim.route("u@pinned.test").stdout
    t.stop()
    r = exim.route("u@pinned.test")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot be resolved at this time: torroute: temp automap: tor DNSPort" in r.stdout
    r = exim.expand(f"${{readsocket{{{d.exim}}}{{route pinned.test\\n}}{{2s}}}}")
    assert r.stdout.startswith("temp automap: tor DNSPort")
    t.start()  # a new tor has no mappings: the daemon asks again and gets a fresh one
    r = exim.route("u@pinned.test")
    assert r.returncode == 0 and "router = torroute" in r.stdout, r.stdout + r.stderr


@pytest.mark.exim
def test_bare_empty_answer_declines_and_failed_expansion_defers(setup, exim_factory) -> None:
    """The raw Exim facts the router text relies on, shown with a single manualroute."""
    d, _ = setup
    raw = exim_factory(ROUTERS.split("torroute:\n")[0].replace("torroute_lookup", "unused")
                       .replace("domains = ! +local_domains", "domains = none.invalid")
                       + f"""
direct:
  driver = manualroute
  route_data = ${{readsocket{{{d.exim}}}{{route $domain\\n}}{{2s}}}}
  transport = onion_smtp
  self = send
""", name="raw")
    assert raw.route("u@pinned.test").returncode == 0
    assert "Unrouteable address" in raw.route("u@nosrv.test").stdout  # empty -> decline
    d.stop()
    r = raw.route("u@pinned.test")  # expansion failure -> defer
    assert r.returncode == 1 and "cannot be resolved at this time" in r.stdout
