"""`torroute proxy` on the private Tor network, both modes as real processes, a Python SMTP
client as the MTA: delivery to a raw onion, to a pinned and an SRV-published domain, an onion MX
that offers STARTTLS (the keyword never reaches the client, a STARTTLS is answered by the
proxy), a remote greeting that is not 220, and tor refusing an unpublished onion."""

from __future__ import annotations

import smtplib
import socketserver
import subprocess
import threading
from pathlib import Path

import pytest
from support.onions import ONION_B
from support.proxy import ProxyRun

from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.sink import MaildirSink

pytestmark = [pytest.mark.testnet]

MESSAGE = "From: me@{me}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nover the proxy\r\n"


@pytest.fixture
def proxies(testnet):
    made: list[ProxyRun] = []

    def make(*args: str, inetd: bool = False) -> ProxyRun:
        run = ProxyRun(testnet.new_dir("proxy"), ["--tor-socks",
                                                  f"{testnet.socks[0]}:{testnet.socks[1]}",
                                                  *args], inetd=inetd).start()
        made.append(run)
        return run

    yield make
    for run in made:
        run.stop()
        if not run.expect_errors:
            run.check_log()


def send(port: int, local: str, destination: str, rcpt: str, subject: str,
         starttls_probe: bool = False) -> dict[str, str]:
    """One message through the proxy with smtplib (the MTA's part: ``EHLO <local> <dest>``);
    returns the EHLO features the client saw."""
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
        code, _ = smtp.ehlo(f"{local} {destination}")
        assert code == 250
        features = dict(smtp.esmtp_features)
        if starttls_probe:
            code, text = smtp.docmd("STARTTLS")
            assert code == 454 and b"not available through the torroute proxy" in text
        smtp.sendmail(f"me@{local}", [rcpt],
                      MESSAGE.format(me=local, rcpt=rcpt, subject=subject))
    return features


@pytest.mark.parametrize("inetd", [False, True], ids=["listen", "inetd"])
def test_raw_onion_destination(inetd, testnet, onion_sink_factory, proxies) -> None:
    mx = onion_sink_factory()
    proxy = proxies(inetd=inetd)
    me = testnet.onion  # any onion name of ours
    features = send(proxy.port, me, mx.onion, f"bob@{mx.onion}", "raw onion")
    [got] = mx.sink.wait_for(1, timeout=90)
    assert got.rcpt_tos == [f"bob@{mx.onion}"] and got.message["Subject"] == "raw onion"
    assert mx.sink.ehlo_names == [me]  # the remote saw our local name, not the two words
    assert "starttls" not in features
    log = proxy.wait_log(f"EHLO {me} -> {mx.onion} via {mx.onion}:25: spliced: 250")
    assert "client closed" in log or "remote closed" in log
    if inetd:
        assert proxy.wait_children() == [0]


def test_pinned_and_srv_domains(testnet, onion_sink_factory, dnsmasq_factory, proxies) -> None:
    mx = onion_sink_factory()
    dns = dnsmasq_factory([SrvRecord("_onion-mx._tcp.srv.example", mx.onion, 25)],
                          local_domains=["example"])
    mapfile = testnet.new_dir("map") / "map.txt"
    mapfile.write_text(f"pinned.example {mx.onion}\n")
    proxy = proxies("--map", str(mapfile), "--nameserver", f"127.0.0.1:{dns.port}")
    for domain in ("pinned.example", "srv.example"):
        send(proxy.port, "me.onion.test", domain, f"carol@{domain}", domain)
    got = mx.sink.wait_for(2, timeout=90)
    assert sorted(m.rcpt_tos[0] for m in got) == ["carol@pinned.example", "carol@srv.example"]
    assert mx.sink.ehlo_names == ["me.onion.test", "me.onion.test"]
    proxy.wait_log(f"-> pinned.example via {mx.onion}:25: spliced")
    proxy.wait_log(f"-> srv.example via {mx.onion}:25: spliced")


def self_signed(directory: Path):
    import ssl

    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.onion.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_starttls_never_passes_through(testnet, proxies) -> None:
    """An onion MX offering STARTTLS: the EHLO answer reaches the client without it, the
    client's STARTTLS gets the proxy's 454, and the message still arrives in the clear
    over the (end-to-end encrypted) onion circuit."""
    root = testnet.new_dir("tlsmx")
    sink = MaildirSink(root / "Maildir", tls_context=self_signed(root)).start()
    onion = testnet.net.add_onion({25: sink.address})
    try:
        with smtplib.SMTP(*sink.address, timeout=10) as direct:  # the sink itself offers it
            direct.ehlo("check")
            assert direct.has_extn("starttls")
        proxy = proxies()
        features = send(proxy.port, "me.onion.test", onion, f"dan@{onion}", "tls",
                        starttls_probe=True)
        assert "starttls" not in features and "size" in features  # the rest passes
        [got] = sink.wait_for(1, timeout=90)
        assert got.rcpt_tos == [f"dan@{onion}"]
    finally:
        testnet.net.remove_onion(onion)
        sink.stop()


class Greeter(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"554 5.3.2 mx.onion.test: not accepting mail\r\n")
        self.request.recv(100)


def test_remote_greeting_not_220(testnet, proxies) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Greeter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    onion = testnet.net.add_onion({25: server.server_address})
    try:
        proxy = proxies()
        with smtplib.SMTP("127.0.0.1", proxy.port, timeout=120) as smtp:
            code, text = smtp.ehlo(f"me.onion.test {onion}")
        assert code == 421
        assert text == (f"4.4.2 torroute proxy: {onion}:25: remote greeting: 554 5.3.2 "
                        "mx.onion.test: not accepting mail").encode()
        proxy.wait_log(f"-> {onion} via {onion}:25: {onion}:25: remote greeting: 554")
    finally:
        testnet.net.remove_onion(onion)
        server.shutdown()
        server.server_close()


def test_tor_refuses_unpublished_onion(testnet, proxies) -> None:
    """A valid onion nobody publishes: tor's SOCKS refusal (or the dial timeout) is a 421."""
    proxy = proxies("--connect-timeout", "40")
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=120) as smtp:
        code, text = smtp.ehlo(f"me.onion.test {ONION_B}")
    assert code == 421 and text.startswith(b"4.4.1 torroute proxy: "), text
    assert b"tor" in text



def test_srv_backup_after_a_bad_greeting(testnet, onion_sink_factory, dnsmasq_factory,
                                         proxies) -> None:
    """The first SRV target greets 554: the proxy tries the next one (RFC 2782 order) within
    the same handshake, and the client never sees the failure."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Greeter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bad = testnet.net.add_onion({25: server.server_address})
    mx = onion_sink_factory()
    try:
        dns = dnsmasq_factory([SrvRecord("_onion-mx._tcp.backup.example", bad, 25, 0),
                               SrvRecord("_onion-mx._tcp.backup.example", mx.onion, 25, 10)],
                              local_domains=["example"])
        proxy = proxies("--nameserver", f"127.0.0.1:{dns.port}")
        send(proxy.port, "me.onion.test", "backup.example", "kim@backup.example", "backup")
        assert [m.rcpt_tos for m in mx.sink.wait_for(1, timeout=90)] == [["kim@backup.example"]]
        log = proxy.wait_log(f"-> backup.example via {mx.onion}:25: spliced")
        assert f"{bad}:25: remote greeting: 554 5.3.2" in log
    finally:
        testnet.net.remove_onion(bad)
        server.shutdown()
        server.server_close()
