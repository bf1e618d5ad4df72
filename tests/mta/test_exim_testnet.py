"""End to end: a real Exim with the plugin delivers over the private Tor network.

Exim -> torroute router (the real `torroute serve`, Perl or readsocket) -> the automap address
of the onion -> Exim's smtp transport with socks_proxy -> the testnet client tor -> the onion
service -> the Maildir SMTP sink.  A second sink on 127.0.0.1 behind the ``clear_net`` router
stands in for the clear net and must stay empty.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import smtplib
from pathlib import Path

import pytest

from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.sink import MaildirSink
from torroute.tor.automap import resolve_automap

pytestmark = [pytest.mark.exim, pytest.mark.testnet]

VARIANTS = ["perl", "readsocket"]
VIRTUAL = ipaddress.ip_network("127.192.0.0/10")


@pytest.fixture
def clear_sink(serve_dir: Path):
    sink = MaildirSink(serve_dir / "clear" / "Maildir").start()
    yield sink
    sink.stop()


@pytest.fixture
def routed(testnet, dnsmasq_factory, daemon_factory, serve_dir):
    """`torroute serve` with pinned.example pinned to the testnet onion and srv.example
    published by DNS SRV, automapping through the testnet client's DNSPort."""
    dns = dnsmasq_factory([SrvRecord("_onion-mx._tcp.srv.example", testnet.onion, 25)],
                          local_domains=["example"])
    (serve_dir / "map.txt").write_text(f"pinned.example {testnet.onion}\n")
    return daemon_factory(
        "--map", str(serve_dir / "map.txt"), "--nameserver", f"127.0.0.1:{dns.port}",
        "--tor-dns", f"{testnet.dns[0]}:{testnet.dns[1]}", "--local-domain", "local.test",
        "--socket-group", "Debian-exim")


def delivered_line(exim, msgid: str, rcpt: str) -> re.Match:
    """The ``=>`` line: router, transport, host (an IP literal) and the SOCKS proxy used."""
    for line in exim.log_lines(msgid):
        m = re.search(rf" => {re.escape(rcpt)} R=torroute T=torroute_smtp "
                      r"H=(\S+) \[([\d.]+)\]:(\d+) PRX=\[([\d.]+)\]:(\d+)", line)
        if m:
            return m
    raise AssertionError(f"no torroute delivery line for {msgid}:\n{exim.mainlog()}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("domain", ["pinned.example", "srv.example"])
def test_mail_arrives_at_onion_mx(variant, domain, testnet, onion_sink, routed,
                                  exim_plugin_factory, clear_sink) -> None:
    exim = exim_plugin_factory(routed.exim, testnet.socks, perl=variant == "perl",
                               clear_port=clear_sink.port)
    rcpt = f"carol@{domain}"
    r = exim.bt(rcpt)  # the route `exim -bt` shows: tor's automap address of the onion
    assert r.returncode == 0 and "router = torroute, transport = torroute_smtp" in r.stdout
    msgid = exim.submit(rcpt, subject=f"{variant} {domain}", verbose=True)
    got = onion_sink.sink.wait_for(1, timeout=90)
    assert got[0].rcpt_tos == [rcpt] and got[0].mail_from == "alice@local.test"
    assert got[0].message["Subject"] == f"{variant} {domain}"
    m = delivered_line(exim, msgid, rcpt)
    ip = m.group(2)
    assert m.group(1) == ip and ipaddress.ip_address(ip) in VIRTUAL and m.group(3) == "25"
    assert ip == str(resolve_automap(testnet.onion, testnet.dns))  # the onion's automap IP
    assert (m.group(4), int(m.group(5))) == testnet.socks  # through tor's SocksPort
    # the SMTP dialogue over tor: no clear-net name in EHLO, no STARTTLS over the onion
    transcript = exim.last_transcript
    assert "SMTP>> EHLO localhost" in transcript, transcript
    assert "clearnet-host" not in transcript.split("SMTP<< 220", 1)[1]
    # no TLS over onions by default: the transport never even tries STARTTLS
    avoid = exim.run("-bP", "transport", "torroute_smtp").stdout
    assert "\nhosts_avoid_tls = *\n" in avoid and "socks_proxy = 127.0.0.1 port=" in avoid
    assert exim.queue_count() == 0
    assert clear_sink.messages == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_daemon_down_queues_then_delivers(variant, testnet, onion_sink, routed,
                                          exim_plugin_factory, clear_sink) -> None:
    """Fail closed, then recover: the mail waits in the queue (never the clear net) and goes
    over Tor on the next queue run once the daemon is back."""
    exim = exim_plugin_factory(routed.exim, testnet.socks, perl=variant == "perl",
                               clear_port=clear_sink.port)
    routed.stop()
    msgid = exim.submit("dave@pinned.example")
    assert exim.queue_count() == 1
    assert any(" == dave@pinned.example R=torroute" in ln for ln in exim.log_lines(msgid))
    assert onion_sink.sink.messages == [] and clear_sink.messages == []
    routed.start()
    exim.queue_run()
    got = onion_sink.sink.wait_for(1, timeout=90)
    assert got[0].rcpt_tos == ["dave@pinned.example"]
    delivered_line(exim, msgid, "dave@pinned.example")
    assert exim.queue_count() == 0 and clear_sink.messages == []


def test_smtp_daemon_receives_routes_and_delivers(testnet, onion_sink, routed,
                                                  exim_plugin_factory, clear_sink) -> None:
    """The Exim SMTP daemon (-bdf): RCPT verification routes as Debian-exim through the
    daemon's socket (group Debian-exim), delivery goes over Tor; with the daemon down, RCPT
    gets a temporary 451, not a rejection and not a clear-net route."""
    exim = exim_plugin_factory(routed.exim, testnet.socks, perl=False,
                               clear_port=clear_sink.port).start_daemon()
    with smtplib.SMTP("127.0.0.1", exim.smtp_port, timeout=60) as smtp:
        smtp.sendmail("alice@local.test", ["erin@srv.example"],
                      "From: alice@local.test\r\nSubject: via smtp\r\n\r\nhi\r\n")
    got = onion_sink.sink.wait_for(1, timeout=90)
    assert got[0].rcpt_tos == ["erin@srv.example"]
    exim.wait_log(r" => erin@srv\.example R=torroute T=torroute_smtp H=\S+ \[127\.[\d.]+\]"
                  r":25 PRX=")
    routed.stop()
    with smtplib.SMTP("127.0.0.1", exim.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("alice@local.test")
        code, text = smtp.rcpt("frank@pinned.example")
    assert code == 451, (code, text)
    assert clear_sink.messages == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_scrubbed_headers_from_onion_identity(variant, testnet, onion_sink, routed,
                                              exim_plugin_factory) -> None:
    """TORROUTE_SCRUB_SENDER_DOMAINS: mail from an onion identity leaves without Received,
    X-Mailer, User-Agent and its original Message-ID; the new Message-ID is the hash of
    Exim's message id at the sender's domain.  Other senders' mail is untouched."""
    exim = exim_plugin_factory(routed.exim, testnet.socks, perl=variant == "perl",
                               macros={"TORROUTE_SCRUB_SENDER_DOMAINS": "*.onion"})
    identity = f"me@{testnet.onion}"
    headers = ("Message-ID: <123.456@clearnet-host.example.net>\nX-Mailer: Mutt 2.2\n"
               "User-Agent: Mutt/2.2\n")
    msgid = exim.submit("gina@pinned.example", sender=identity, headers=headers)
    exim.submit("hank@pinned.example", headers=headers)  # from a clear-net identity
    got = {m.rcpt_tos[0]: m for m in onion_sink.sink.wait_for(2, timeout=90)}
    scrubbed = got["gina@pinned.example"].message
    for name in ("Received", "X-Mailer", "User-Agent"):
        assert scrubbed.get_all(name) is None, name
    assert scrubbed.get_all("Message-ID") == [
        f"<{hashlib.sha256(msgid.encode()).hexdigest()}@{testnet.onion}>"]
    assert b"clearnet-host" not in got["gina@pinned.example"].data
    kept = got["hank@pinned.example"].message
    assert kept.get_all("Message-ID") == ["<123.456@clearnet-host.example.net>"]
    assert kept["X-Mailer"] == "Mutt 2.2" and kept.get_all("Received")
