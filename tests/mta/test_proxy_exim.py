"""A real Exim configured as the Exim FAQ's tor-smtp setup says, delivering through a real
`torroute proxy` (inetd mode behind a test-side acceptor, and the listener) over the private Tor
network.

The config is the shipped text: plugins/exim_proxy/conf.d/ is ``.include``d (routers
``tor_to_any`` and ``any_to_tor``, transport ``torroute_proxy_smtp`` with ``helo_data =
"$address_data $original_domain"``, ``hosts_avoid_tls = *``).  After them, ``clear_net``
stands in for the clear net: a manualroute to a local SMTP sink that must stay empty.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socketserver
import threading

import pytest
from support.exim import EXIM_BIN, EximInstance, TrustedConfigs, prepare_workdir, write_root_file
from support.onions import ONION_A, ONION_C
from support.paths import PLUGINS, shared_tmpdir
from support.proxy import ProxyRun

from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port
from torroute.testing.sink import MaildirSink

pytestmark = [pytest.mark.exim, pytest.mark.testnet]

PLUGIN = PLUGINS / "exim_proxy"
ME = ONION_C  # this host's own onion identity (a local domain, as the FAQ insists)

CONFIG = """\
# torroute proxy Exim test instance (tests/mta/test_proxy_exim.py)
keep_environment =
TORROUTE_PROXY_PORT = {proxy_port}
exim_path = {exim}
primary_hostname = clearnet-host.example.net
qualify_domain = local.test
local_interfaces = <; 127.0.0.1.{smtp_port}
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
pid_file_path = {dir}/exim.pid
log_selector = +outgoing_port +smtp_confirmation
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
domainlist local_domains = local.test : {me}
.include {plugin}/conf.d/main/01_torroute_proxy_macros

begin routers
.include {plugin}/conf.d/router/150_torroute_proxy

clear_net:
  driver = manualroute
  domains = ! +local_domains
  route_data = 127.0.0.1::{clear_port}
  transport = clear_smtp
  self = send
  no_more

local_user:
  driver = accept
  domains = +local_domains
  transport = local_file

begin transports
.include {plugin}/conf.d/transport/30_torroute_proxy

clear_smtp:
  driver = smtp
  hosts_avoid_tls = *

local_file:
  driver = appendfile
  file = {dir}/mail/$local_part_data
  user = Debian-exim
  group = Debian-exim
  mode = 0644

begin retry
*   *   F,2m,15s
"""


@pytest.fixture
def clear_sink():
    sink = MaildirSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def proxy_exim(exim_binary, clear_sink):
    """``make(proxy_port)`` -> an EximInstance running the shipped proxy config."""
    trusted = TrustedConfigs()
    made: list[EximInstance] = []

    def make(proxy_port: int) -> EximInstance:
        workdir = shared_tmpdir("torroute-proxy-exim-")
        prepare_workdir(workdir)
        conf = workdir / "exim.conf"
        write_root_file(conf, CONFIG.format(proxy_port=proxy_port, exim=EXIM_BIN,
                                            smtp_port=free_port(), dir=workdir, me=ME,
                                            plugin=PLUGIN, clear_port=clear_sink.port))
        trusted.add(conf)
        inst = EximInstance(workdir, conf, clear_port=clear_sink.port)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        if os.environ.get("TORROUTE_EXIM_KEEP") != "1":
            shutil.rmtree(inst.workdir, ignore_errors=True)
    trusted.remove_all()


@pytest.fixture
def proxies(request):
    """``make(*args, inetd=, port=, socks=)`` -> a started ProxyRun through the testnet's tor
    (booted only when ``socks`` is not given); logs checked, all stopped after the test."""
    made: list[ProxyRun] = []
    workdir = shared_tmpdir("torroute-proxy-")

    def make(*args: str, inetd: bool = False, port: int = 0,
             socks: tuple[str, int] | None = None) -> ProxyRun:
        socks = socks or request.getfixturevalue("testnet").socks
        run = ProxyRun(workdir, ["--tor-socks", f"{socks[0]}:{socks[1]}", *args],
                       inetd=inetd, port=port).start()
        made.append(run)
        return run

    yield make
    for run in made:
        run.stop()
    for run in made:
        if not run.expect_errors:
            run.check_log()
    shutil.rmtree(workdir, ignore_errors=True)


def test_shipped_transport_is_the_faqs(proxy_exim) -> None:
    """What Exim reads from the shipped files: the FAQ's options."""
    exim = proxy_exim(2526)
    text = exim.run("-bP", "transport", "torroute_proxy_smtp").stdout
    assert "\nhelo_data = $address_data $original_domain\n" in text
    assert "\nport = 2526\n" in text and "\nhosts_avoid_tls = *\n" in text
    assert "\nallow_localhost\n" in text and "\nconnection_max_messages = 1\n" in text
    assert "\nno_multi_domain\n" in text
    for router in ("tor_to_any", "any_to_tor"):
        assert "\nself = send\n" in exim.run("-bP", "router", router).stdout
    r = exim.bt(f"bob@{ONION_A}")  # another onion
    assert "router = any_to_tor, transport = torroute_proxy_smtp" in r.stdout, r.stdout
    assert "host localhost [127.0.0.1]" in r.stdout


@pytest.mark.parametrize("inetd", [True, False], ids=["inetd", "listen"])
def test_exim_delivers_to_an_onion_through_the_proxy(inetd, testnet, onion_sink_factory,
                                                     proxies, proxy_exim, clear_sink) -> None:
    mx = onion_sink_factory()
    proxy = proxies(inetd=inetd)
    exim = proxy_exim(proxy.port)
    rcpt = f"bob@{mx.onion}"
    msgid = exim.submit(rcpt, subject="to an onion", verbose=True)
    [got] = mx.sink.wait_for(1, timeout=90)
    assert got.rcpt_tos == [rcpt] and got.mail_from == "alice@local.test"
    assert got.message["Subject"] == "to an onion"
    assert mx.sink.ehlo_names == ["localhost"]  # TORROUTE_PROXY_HELO, not primary_hostname
    transcript = exim.last_transcript
    assert f"SMTP>> EHLO localhost {mx.onion}" in transcript, transcript
    assert "STARTTLS" not in transcript
    assert any(re.search(rf" => {re.escape(rcpt)} R=any_to_tor T=torroute_proxy_smtp "
                         rf"H=localhost \[127\.0\.0\.1\]:{proxy.port} ", ln)
               for ln in exim.log_lines(msgid)), exim.mainlog()
    assert exim.queue_count() == 0 and clear_sink.messages == []
    proxy.wait_log(f"EHLO localhost -> {mx.onion} via {mx.onion}:25: spliced")
    if inetd:
        assert proxy.wait_children() == [0]


def test_onion_identity_to_pinned_and_srv_domains(testnet, onion_sink_factory,
                                                  dnsmasq_factory, proxies, proxy_exim,
                                                  clear_sink) -> None:
    """tor_to_any: mail from our onion goes over tor to ordinary domains torroute routes; one
    message, two domains: two connections, each EHLO naming its own destination; the FAQ's
    header scrubbing."""
    mx = onion_sink_factory()
    dns = dnsmasq_factory([SrvRecord("_onion-mx._tcp.srv.example", mx.onion, 25)],
                          local_domains=["example"])
    mapfile = testnet.new_dir("map") / "map.txt"
    mapfile.write_text(f"pinned.example {mx.onion}\n")
    proxy = proxies("--map", str(mapfile), "--nameserver", f"127.0.0.1:{dns.port}")
    exim = proxy_exim(proxy.port)
    sender = f"me@{ME}"
    headers = ("Message-ID: <1.2@clearnet-host.example.net>\nX-Mailer: Mutt 2.2\n"
               "User-Agent: Mutt/2.2\n")
    before = set(exim.message_ids())
    r = exim.run("-odi", "-v", "-f", sender, "carol@pinned.example", "erin@srv.example",
                 input=f"From: {sender}\nSubject: both\n{headers}\nhello\n")
    assert r.returncode == 0, r.stderr
    [msgid] = [m for m in exim.message_ids() if m not in before]
    got = {m.rcpt_tos[0]: m for m in mx.sink.wait_for(2, timeout=90)}
    assert sorted(got) == ["carol@pinned.example", "erin@srv.example"]
    assert mx.sink.ehlo_names == [ME, ME]
    assert f"SMTP>> EHLO {ME} pinned.example" in r.stderr + r.stdout
    assert f"SMTP>> EHLO {ME} srv.example" in r.stderr + r.stdout
    for m in got.values():
        for name in ("Received", "X-Mailer", "User-Agent"):
            assert m.message.get_all(name) is None, name
        assert m.message.get_all("Message-ID") == [
            f"<{hashlib.sha1(msgid.encode()).hexdigest().upper()}@{ME}>"]
        assert b"clearnet-host" not in m.data
    proxy.wait_log(f"EHLO {ME} -> pinned.example via {mx.onion}:25: spliced")
    proxy.wait_log(f"EHLO {ME} -> srv.example via {mx.onion}:25: spliced")
    assert exim.queue_count() == 0 and clear_sink.messages == []


def deferred_with(exim: EximInstance, msgid: str, text: str) -> str:
    lines = [ln for ln in exim.log_lines(msgid) if " == " in ln or "defer" in ln]
    hit = [ln for ln in lines if text in ln]
    assert hit, f"no deferral with {text!r}:\n{exim.mainlog()}"
    return hit[0]


def test_no_onion_route_defers_and_nothing_reaches_the_clear_net(dnsmasq_factory, proxies,
                                                                 proxy_exim,
                                                                 clear_sink) -> None:
    dns = dnsmasq_factory([], local_domains=["example"])
    proxy = proxies("--nameserver", f"127.0.0.1:{dns.port}", socks=("127.0.0.1", free_port()))
    exim = proxy_exim(proxy.port)
    msgid = exim.submit("dave@plain.example", sender=f"me@{ME}")
    line = deferred_with(exim, msgid, "421 4.4.4 torroute proxy: plain.example: no onion "
                         "route (no SRV record (NXDOMAIN)); the proxy never uses the clear net")
    assert "R=tor_to_any T=torroute_proxy_smtp" in line
    assert exim.queue_count() == 1 and clear_sink.messages == []
    exim.queue_run()  # again: still deferred, still not on the clear net
    assert exim.queue_count() == 1 and clear_sink.messages == []


class Greeter(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"554 5.3.2 busy, go away\r\n")
        self.request.recv(100)


def test_remote_greeting_not_220_defers(testnet, proxies, proxy_exim, clear_sink) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Greeter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    onion = testnet.net.add_onion({25: server.server_address})
    try:
        proxy = proxies()
        exim = proxy_exim(proxy.port)
        msgid = exim.submit(f"frank@{onion}")
        deferred_with(exim, msgid, f"421 4.4.2 torroute proxy: {onion}:25: remote greeting: "
                      "554 5.3.2 busy, go away")
        assert exim.queue_count() == 1 and clear_sink.messages == []
    finally:
        testnet.net.remove_onion(onion)
        server.shutdown()
        server.server_close()


def test_tor_down_defers_then_each_message_reaches_its_own_onion(
        testnet, onion_sink_factory, proxies, proxy_exim, clear_sink) -> None:
    """tor fails: 421, the mail waits.  Back up, one queue run delivers two messages for two
    onions over the same "host" (localhost:port): connection_max_messages = 1 keeps Exim from
    sending the second one down the connection the first EHLO routed."""
    mx1, mx2 = onion_sink_factory(), onion_sink_factory()
    port = free_port()
    down = proxies(port=port, socks=("127.0.0.1", free_port()))
    exim = proxy_exim(port)
    first = exim.submit(f"gina@{mx1.onion}")
    deferred_with(exim, first, "421 4.4.1 torroute proxy: tor SocksPort 127.0.0.1:")
    exim.submit(f"hank@{mx2.onion}")  # held back with the host (see the 421 test above)
    assert exim.queue_count() == 2
    down.stop()
    up = proxies(port=port)
    exim.queue_run()
    assert [m.rcpt_tos for m in mx1.sink.wait_for(1, timeout=90)] == [[f"gina@{mx1.onion}"]]
    assert [m.rcpt_tos for m in mx2.sink.wait_for(1, timeout=90)] == [[f"hank@{mx2.onion}"]]
    assert exim.queue_count() == 0 and clear_sink.messages == []
    up.wait_log("spliced", count=2)



def test_421_at_ehlo_holds_back_every_destination(dnsmasq_factory, proxies, proxy_exim,
                                                 clear_sink) -> None:
    """Why ``--defer-at rcpt`` exists: Exim files a 421 to EHLO under the host, so after one
    unroutable destination it holds every message for localhost:port, for any destination,
    until the host's retry time."""
    dns = dnsmasq_factory([], local_domains=["example"])
    proxy = proxies("--nameserver", f"127.0.0.1:{dns.port}", socks=("127.0.0.1", free_port()))
    exim = proxy_exim(proxy.port)
    exim.submit("dave@plain.example", sender=f"me@{ME}")
    second = exim.submit(f"erin@{ONION_A}")
    deferred_with(exim, second, "retry time not reached for any host")
    proxy.wait_log("EHLO ")
    assert proxy.log().count("EHLO ") == 1  # the second was not even tried


def test_defer_at_rcpt_defers_only_that_address(dnsmasq_factory, proxies, proxy_exim,
                                                clear_sink) -> None:
    dns = dnsmasq_factory([], local_domains=["example"])
    proxy = proxies("--defer-at", "rcpt", "--nameserver", f"127.0.0.1:{dns.port}",
                    socks=("127.0.0.1", free_port()))
    exim = proxy_exim(proxy.port)
    first = exim.submit("dave@plain.example", sender=f"me@{ME}")
    second = exim.submit("erin@other.example", sender=f"me@{ME}")
    line = deferred_with(exim, first, "SMTP error from remote mail server after RCPT "
                         "TO:<dave@plain.example>: 451 4.4.4 torroute proxy: plain.example: "
                         "no onion route")
    assert "R=tor_to_any T=torroute_proxy_smtp" in line
    deferred_with(exim, second, "451 4.4.4 torroute proxy: other.example: no onion route")
    assert "retry time not reached" not in exim.mainlog()
    assert exim.queue_count() == 2 and clear_sink.messages == []
    proxy.wait_log("deferred at RCPT: ", count=2)


def test_defer_at_rcpt_other_mail_still_flows(testnet, onion_sink_factory, dnsmasq_factory,
                                              proxies, proxy_exim, clear_sink) -> None:
    """With --defer-at rcpt (the shipped units' choice), an unroutable destination defers
    that address only: the next message, to an onion, goes out at once."""
    mx = onion_sink_factory()
    dns = dnsmasq_factory([], local_domains=["example"])
    proxy = proxies("--defer-at", "rcpt", "--nameserver", f"127.0.0.1:{dns.port}")
    exim = proxy_exim(proxy.port)
    stuck = exim.submit("dave@plain.example", sender=f"me@{ME}")
    deferred_with(exim, stuck, "451 4.4.4 torroute proxy: plain.example: no onion route")
    exim.submit(f"ivan@{mx.onion}")
    assert [m.rcpt_tos for m in mx.sink.wait_for(1, timeout=90)] == [[f"ivan@{mx.onion}"]]
    assert exim.queue_count() == 1 and clear_sink.messages == []
