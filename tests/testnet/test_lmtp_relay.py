"""The LMTP relay below Postfix: the SMTP client's relay options (pure), and torroute.delivery.relay
against real parts (dnsmasq, the private Tor network, aiosmtpd behind an onion)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from support.onions import ONION_A

from torroute.config import load_config
from torroute.delivery.relay import Relay
from torroute.delivery.settings import DeliverSettings
from torroute.protocols.lmtp import Transaction
from torroute.protocols.smtp import BOUNCED, DEFERRED, DELIVERED, Close, Options, Send, SmtpClient
from torroute.routing.router import Router
from torroute.testing.ports import free_port

DEST = "x" * 56 + ".onion:25"
EHLO = {"PIPELINING": "", "SIZE": "1000000", "8BITMIME": ""}


def relay_client(rcpts: list[bytes], pipelining: bool = True) -> SmtpClient:
    options = Options(destination=DEST, per_recipient=True, keep_alive=True,
                      pipelining=pipelining)
    return SmtpClient(b"a@origin.test", rcpts, b"Subject: s\n\nbody\n", options)


def sends(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def test_fresh_connection_is_kept_after_delivery_without_quit() -> None:
    client = relay_client([b"u@example.test"])
    actions = client.receive(b"220 mx\r\n")
    actions = client.receive(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n")
    assert sends(actions).startswith(b"MAIL FROM:<a@origin.test>")
    actions = client.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert sends(actions).endswith(b"\r\n.\r\n")
    actions = client.receive(b"250 2.0.0 stored\r\n")
    assert actions == [Close()] and client.reusable  # no QUIT: the pool keeps it
    assert client.outcome.status == DELIVERED


def test_resume_pipelines_rset_with_the_transaction() -> None:
    client = relay_client([b"u@example.test"])
    actions = client.resume(EHLO)
    wire = sends(actions)
    assert wire.startswith(b"RSET\r\nMAIL FROM:<a@origin.test> SIZE=")
    assert wire.endswith(b"RCPT TO:<u@example.test>\r\nDATA\r\n")
    actions = client.receive(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert sends(actions).endswith(b"\r\n.\r\n")
    assert client.receive(b"250 2.0.0 stored\r\n") == [Close()] and client.reusable


def test_resume_without_pipelining_waits_for_rset() -> None:
    client = relay_client([b"u@example.test"], pipelining=False)
    assert sends(client.resume(EHLO)) == b"RSET\r\n"
    assert sends(client.receive(b"250 reset\r\n")).startswith(b"MAIL FROM:")


def test_refused_rset_defers_and_drops_the_connection() -> None:
    client = relay_client([b"u@example.test"])
    client.resume(EHLO)
    actions = client.receive(b"421 4.4.2 idle timeout\r\n")
    assert actions == [Close()] and not client.reusable
    assert client.outcome.status == DEFERRED and client._last_reply is not None


def test_per_recipient_partial_delivery() -> None:
    client = relay_client([b"a@example.test", b"gone@example.test", b"c@example.test"])
    client.resume(EHLO)
    actions = client.receive(b"250 r\r\n250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n250 ok\r\n")
    assert sends(actions) == b"DATA\r\n"  # two accepted: the message goes to them
    client.receive(b"354 go\r\n")
    client.receive(b"250 2.0.0 stored\r\n")
    outcomes = client.recipient_outcomes()
    assert [o.status for o in outcomes] == [DELIVERED, BOUNCED, DELIVERED]
    assert outcomes[1].dsn == "5.1.1" and "no such user" in outcomes[1].text
    assert "RCPT TO:<gone@example.test>" in outcomes[1].text


def test_per_recipient_all_refused_sends_nothing() -> None:
    client = relay_client([b"a@example.test", b"b@example.test"])
    client.resume(EHLO)
    actions = client.receive(b"250 r\r\n250 ok\r\n550 5.1.1 gone\r\n450 4.2.1 busy\r\n")
    assert b"DATA" not in sends(actions) and client.reusable  # RSET before the next one
    assert [o.status for o in client.recipient_outcomes()] == [BOUNCED, DEFERRED]


def test_refused_mail_defers_every_recipient_despite_pipelined_503s() -> None:
    client = relay_client([b"a@example.test", b"b@example.test"])
    client.resume(EHLO)
    client.receive(b"250 r\r\n451 4.3.0 try later\r\n503 5.5.1 need MAIL\r\n503 5.5.1 x\r\n")
    assert [o.status for o in client.recipient_outcomes()] == [DEFERRED, DEFERRED]


# ---- torroute.delivery.relay with real parts


def make_relay(directory: Path, dns_port: int, socks: tuple[str, int], pins: str = "",
               idle: float = 10.0) -> Relay:
    (directory / "map.txt").write_text(pins)
    cfg = directory / "torroute.toml"
    cfg.write_text(f'[routing]\nmaps = ["{directory / "map.txt"}"]\n'
                   f'nameservers = ["127.0.0.1:{dns_port}"]\ndns_timeout = 1.0\n\n'
                   f'[tor]\nsocks = "{socks[0]}:{socks[1]}"\n')
    config = load_config(str(cfg))
    return Relay(Router.from_config(config), DeliverSettings.from_config(config),
                 idle_timeout=idle)


def test_no_route_and_invalid_onion_and_tor_down(dnsmasq_factory, serve_dir,
                                                 daemon_records) -> None:
    """Decided without any MX: no route any more -> 451 (Postfix routes it again), an
    invalid .onion -> 550 5.1.2, a pinned onion with tor's SocksPort closed -> 451 4.4.1."""
    dns = dnsmasq_factory([])
    port = free_port()
    relay = make_relay(serve_dir, dns.port, ("127.0.0.1", port), f"pinned.test {ONION_A}\n")
    bad = "x" * 56 + ".onion"
    txn = Transaction(b"a@origin.test", (b"u@plain.test", f"v@{bad}".encode(),
                                         b"w@pinned.test"), b"Subject: s\n\nb\n")
    replies = asyncio.run(relay.relay(txn))
    assert replies[0].startswith(b"451 4.3.0 no onion route for plain.test")
    assert replies[1].startswith(b"550 5.1.2 ")
    assert replies[2].startswith(f"451 4.4.1 tor SocksPort 127.0.0.1:{port} unreachable".encode())
    assert all(r.endswith(b"\r\n") and r.count(b"\r\n") == 1 for r in replies)


@pytest.mark.testnet
def test_pooled_connection_whose_mx_went_away_is_replaced(testnet, dnsmasq_factory,
                                                          serve_dir, daemon_records) -> None:
    """The MX restarts between two messages (the pooled connection dies): the second message
    goes over a fresh connection, exactly once."""
    from aiosmtpd.controller import Controller

    from torroute.testing.sink import ESMTP_FULL, MaildirSink, SinkHandler

    sink = MaildirSink(**ESMTP_FULL)
    sink.port = free_port()

    def controller() -> Controller:
        c = Controller(SinkHandler(sink), hostname="127.0.0.1", port=sink.port,
                       ready_timeout=10)
        c.start()
        return c

    mx = controller()
    onion = testnet.net.add_onion({25: sink.address})
    try:
        relay = make_relay(serve_dir, dnsmasq_factory([]).port, testnet.socks_extended,
                           f"pinned.test {onion}\n")

        def txn(n: int) -> Transaction:
            return Transaction(b"a@origin.test", (b"u@pinned.test",),
                               b"Message-ID: <%d@o.test>\n\nbody\n" % n)

        async def scenario() -> list[list[bytes]]:
            first = await relay.relay(txn(1))
            second = await relay.relay(txn(2))  # reuses the pooled connection
            await asyncio.to_thread(mx.stop)  # the MX goes away, and comes back
            await asyncio.to_thread(lambda: replaced.append(controller()))
            third = await relay.relay(txn(3))
            relay.close()
            return [first, second, third]

        replaced: list[Controller] = []
        results = asyncio.run(scenario())
        assert [r[0][:4] for r in results] == [b"250 ", b"250 ", b"250 "], results
        assert relay.stats["reused"] >= 1 and relay.stats["dialed"] == 2
        ids = sorted(m.data.split(b">", 1)[0] for m in sink.messages)
        assert ids == [b"Message-ID: <1@o.test", b"Message-ID: <2@o.test",
                       b"Message-ID: <3@o.test"]
    finally:
        testnet.net.remove_onion(onion)
        for c in [mx, *locals().get("replaced", [])]:
            try:
                c.stop()
            except Exception:  # noqa: BLE001 - already stopped
                pass


# ---- settings


def test_lmtp_listener_settings(serve_dir) -> None:
    """An lmtp listener switches the Postfix answer to the daemon's socket; a non-loopback
    one is refused (an unauthenticated relay into tor) unless allow_remote."""
    from torroute.daemon.settings import ServeSettings
    from torroute.errors import ConfigError

    cfg = serve_dir / "t.toml"
    cfg.write_text("[serve]\nlmtp_idle_timeout = 3\nlmtp_session_idle_timeout = 4.5\n")
    config = load_config(str(cfg))

    def settings(*lmtp: str, remote: bool = False) -> ServeSettings:
        return ServeSettings.from_config(config, {"lmtp": list(lmtp),
                                                   "allow_remote": remote or None})

    assert settings().lmtp_answer is None
    s = settings(f"unix:{serve_dir}/lmtp.sock")
    assert s.lmtp_answer == f"torroute-lmtp:unix:{serve_dir}/lmtp.sock"
    assert (s.lmtp_idle_timeout, s.lmtp_session_idle_timeout) == (3, 4.5)
    assert ServeSettings().lmtp_session_idle_timeout == 10.0  # above Postfix's cache time, 2 s
    assert settings("inet:127.0.0.1:2424").lmtp_answer == "torroute-lmtp:inet:127.0.0.1:2424"
    with pytest.raises(ConfigError, match="not a loopback"):
        settings("inet:192.0.2.1:24")
    with pytest.raises(ConfigError, match="unusable Postfix answer"):
        settings("unix:/tmp/with space/lmtp.sock")
    cfg.write_text("[serve]\nlmtp_session_idle_timeout = 0\n")
    config = load_config(str(cfg))
    with pytest.raises(ConfigError, match="lmtp_session_idle_timeout must be positive"):
        settings()


@pytest.mark.testnet
def test_client_leaving_mid_relay_cancels_it(testnet, dnsmasq_factory, daemon_factory,
                                             serve_dir, fake_smtp_factory) -> None:
    """Postfix drops the LMTP session while the relay waits for a silent MX: the relay is
    cancelled (nothing was sent, so a retry cannot duplicate), the daemon carries on."""
    import socket

    from support.daemon import wait_socket

    silent = fake_smtp_factory("silent")  # fake: an MX that never answers, on demand
    onion = testnet.net.add_onion({25: silent.address})
    try:
        dns = dnsmasq_factory([])
        (serve_dir / "map.txt").write_text(f"pinned.test {onion}\n")
        cfg = serve_dir / "torroute.toml"
        cfg.write_text(f'[routing]\nmaps = ["{serve_dir / "map.txt"}"]\nnameservers = '
                       f'["127.0.0.1:{dns.port}"]\n[tor]\nsocks = "{testnet.socks_extended[0]}:'
                       f'{testnet.socks_extended[1]}"\n')
        sock_path = serve_dir / "lmtp.sock"
        daemon = daemon_factory("--config", str(cfg), "--lmtp", f"unix:{sock_path}")
        wait_socket(str(sock_path), proc=daemon.proc)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sock_path))
            client.settimeout(10)
            assert client.recv(1024).startswith(b"220 ")
            client.sendall(b"LHLO t\r\nMAIL FROM:<a@o.test>\r\nRCPT TO:<u@pinned.test>\r\n"
                           b"DATA\r\n")
            got = b""
            while b"354 " not in got:
                got += client.recv(1024)
            client.sendall(b"Subject: s\r\n\r\nbody\r\n.\r\n")
            time.sleep(1.5)  # the relay has dialed the onion and waits for a greeting
        daemon.wait_log("lmtp: client left during the relay; relay cancelled", timeout=20)
        with socket.socket(socket.AF_UNIX) as again:  # still serving
            again.connect(str(sock_path))
            again.settimeout(10)
            assert again.recv(1024).startswith(b"220 ")
            again.sendall(b"QUIT\r\n")
            assert again.recv(1024).startswith(b"221 ")
    finally:
        testnet.net.remove_onion(onion)
