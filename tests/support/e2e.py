"""What the end-to-end tests share: the mail chain through a real Postfix, the daemon and the
private Tor network, for both delivery modes (the pipe program and the LMTP relay).

    smtplib -> Postfix smtpd -> socketmap -> `torroute serve` -> pipe(8) + `torroute deliver`
                                                              or lmtp(8) -> the daemon's relay
            -> tor -> onion service -> SMTP sink (an :class:`OnionMX`)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path

from support.daemon import wait_socket
from support.onions import ONION_C
from support.postfix import PostfixInstance, lmtp_service
from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.sink import MaildirSink

SRV = "_onion-mx._tcp."
UNPUBLISHED = ONION_C  # a real key (valid point, right checksum), never published


def message(subject: str, to: str = "user@example.test", body: str = "hello\n") -> bytes:
    return (f"From: Alice <alice@origin.test>\nTo: <{to}>\nSubject: {subject}\n"
            f"Message-ID: <{subject.replace(' ', '-')}@origin.test>\n"
            f"Date: Sun, 22 Nov 2026 10:00:00 +0000\nX-Custom: kept as is\n\n{body}").encode()


def headers(data: bytes) -> list[tuple[str, str]]:
    return [(k, str(v)) for k, v in message_from_bytes(data).items() if k != "Received"]


@dataclass
class OnionMX:
    """An SMTP sink behind its own onion service on the testnet."""

    onion: str
    sink: MaildirSink


@dataclass
class MxPair:
    first: OnionMX
    second: OnionMX

    def reset(self) -> None:
        self.first.sink.reset()
        self.second.sink.reset()


def write_config(directory: Path, dns_port: int, onion: str, socks: tuple[str, int],
                 extra: str = "") -> Path:
    """torroute.toml with ``pinned.test`` pinned to ``onion``, SRV from dnsmasq, tor's socks."""
    (directory / "map.txt").write_text(f"pinned.test {onion}\n")
    cfg = directory / "torroute.toml"
    cfg.write_text(f"""
[routing]
maps = ["{directory / 'map.txt'}"]
nameservers = ["127.0.0.1:{dns_port}"]
dns_timeout = 1.0

[tor]
socks = "{socks[0]}:{socks[1]}"
{extra}
""")
    cfg.chmod(0o644)
    return cfg


def srv_toml(directory: Path, dns_port: int, socks: tuple[str, int], pins: str = "",
             deliver: str = "") -> Path:
    """The shared torroute.toml: dnsmasq for SRV, a text map, tor's SocksPort, [deliver]."""
    (directory / "map.txt").write_text(pins)
    cfg = directory / "torroute.toml"
    cfg.write_text(f'[routing]\nmaps = ["{directory / "map.txt"}"]\n'
                   f'nameservers = ["127.0.0.1:{dns_port}"]\ndns_timeout = 1.0\n\n'
                   f'[tor]\nsocks = "{socks[0]}:{socks[1]}"\n\n[deliver]\n{deliver}\n')
    cfg.chmod(0o644)
    return cfg


def relay_from(cfg: Path, idle_timeout: float = 5.0, time_limit: float = 540.0):
    """A :class:`torroute.delivery.relay.Relay` on ``cfg``'s routing and [deliver] settings, as
    `torroute serve --lmtp` builds it."""
    from torroute.config import load_config
    from torroute.delivery.relay import Relay
    from torroute.delivery.settings import DeliverSettings
    from torroute.routing.router import Router

    config = load_config(str(cfg))
    return Relay(Router.from_config(config), DeliverSettings.from_config(config),
                 idle_timeout=idle_timeout, time_limit=time_limit)


@dataclass
class Setup:
    """A running chain: Postfix -> the daemon -> (pipe | LMTP relay) -> tor -> ``mx``.

    ``clear`` is Postfix's default_transport (the clear net: must stay empty of onion mail)."""

    postfix: PostfixInstance
    mx: OnionMX
    clear: MaildirSink
    daemon: object
    config: Path
    lmtp_sock: Path | None = None

    def submitted(self, sender: str, rcpts: list[str], data: bytes, **kw) -> None:
        self.postfix.submit(sender, rcpts, data, **kw)


def lmtp_destination(sock: Path, onion: str) -> Path:
    """The per-onion Postfix destination the daemon answers for ``onion``: a link to ``sock``
    (torroute.daemon.lmtp_links)."""
    return sock.parent / f"{sock.stem}.d" / onion.removesuffix(".onion")


def start_lmtp_postfix(cfg: Path, serve_dir: Path, daemon_factory: Callable,
                       postfix_factory: Callable) -> tuple[object, PostfixInstance, Path]:
    """`torroute serve --lmtp` with ``cfg``, and a Postfix whose transport is its socketmap and
    whose master.cf has the shipped LMTP service: (daemon, postfix, LMTP socket)."""
    sock = serve_dir / "lmtp.sock"
    daemon = daemon_factory("--config", str(cfg), "--socket-group", "postfix",
                            "--lmtp", f"unix:{sock}")
    wait_socket(str(sock), proc=daemon.proc)
    pf = postfix_factory(daemon.socketmap_table, master_extra=lmtp_service())
    return daemon, pf, sock


def start_chain(mx: OnionMX, socks: tuple[str, int], *, lmtp: bool, dnsmasq_factory: Callable,
                daemon_factory: Callable, postfix_factory: Callable, serve_dir: Path,
                clear_sink: MaildirSink) -> Setup:
    """The whole chain to ``mx``: ``example.test`` by SRV (dnsmasq), ``pinned.test`` by the map.

    ``lmtp``: Postfix's lmtp(8) to the daemon's relay; otherwise pipe(8) runs `torroute deliver`
    (reading the same configuration)."""
    mx.sink.reset()
    dns = dnsmasq_factory([SrvRecord(SRV + "example.test", mx.onion, 25)])
    cfg = write_config(serve_dir, dns.port, mx.onion, socks)
    if lmtp:
        daemon, pf, sock = start_lmtp_postfix(cfg, serve_dir, daemon_factory, postfix_factory)
        return Setup(pf, mx, clear_sink, daemon, cfg, sock)
    daemon = daemon_factory("--config", str(cfg), "--socket-group", "postfix")
    pf = postfix_factory(daemon.socketmap_table, deliver_config=cfg.read_text())
    return Setup(pf, mx, clear_sink, daemon, cfg)


def prio_records(dead: str, mxs: MxPair, domain: str = "prio.test") -> list[SrvRecord]:
    """SRV 0 ``dead``, SRV 10 the first live MX, SRV 20 the second (the backup-target tests)."""
    return [SrvRecord(SRV + domain, dead, 25, priority=0),
            SrvRecord(SRV + domain, mxs.first.onion, 25, priority=10),
            SrvRecord(SRV + domain, mxs.second.onion, 25, priority=20)]


@contextmanager
def extra_socks_port(testnet, port: int) -> Iterator[None]:
    """Meanwhile, the testnet's client tor listens on 127.0.0.1:``port`` too (ExtendedErrors):
    a SocksPort that was down comes up (through the control port, as SETCONF)."""
    from stem.control import Controller

    with Controller.from_port(port=testnet.control[1]) as ctl:
        ctl.authenticate()
        before = ctl.get_conf("SocksPort", multiple=True)
        ctl.set_options([("SocksPort", p) for p in before]
                        + [("SocksPort", f"127.0.0.1:{port} ExtendedErrors")])
        try:
            yield
        finally:
            ctl.set_options([("SocksPort", p) for p in before])
