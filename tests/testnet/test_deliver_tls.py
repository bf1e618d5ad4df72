"""``tls_verify``: STARTTLS is required and the MX's certificate must chain to a trusted CA
(``tls_ca_file``, here a private CA made with openssl) and name the recipient's domain, a host
under it, or the onion -- Postfix's ``verify`` level with ``nexthop, dot-nexthop`` matching.

A real aiosmtpd with STARTTLS behind a real onion on the private Tor network; the pipe program
(`torroute deliver`) and the LMTP relay.  The sink accepts MAIL in the clear too, so a client
that fell back to plaintext would be seen.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.paths import shared_tmpdir
from support.pipe import CLEAN_ENV, MESSAGE, TORROUTE, status

from torroute.config import load_config
from torroute.delivery.relay import Relay
from torroute.delivery.settings import DeliverSettings
from torroute.delivery.tls import tls_check_peer
from torroute.protocols.lmtp import Transaction
from torroute.routing.router import Router
from torroute.testing.sink import MaildirSink, SinkHandler

pytestmark = [pytest.mark.testnet]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


class Pki:
    """Two private CAs (``ca`` trusted by the tests, ``rogue`` not) and leaf certificates."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        for name in ("ca", "rogue"):
            openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN=torroute test {name}", "-keyout", str(directory / f"{name}.key"),
                    "-out", str(directory / f"{name}.pem"),
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        (directory / "ca.pem").chmod(0o644)  # the pipe's user reads it
        self._serial = 0

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    def leaf(self, names: list[str], ca: str = "ca") -> tuple[Path, Path]:
        self._serial += 1
        base = self.dir / f"leaf{self._serial}"
        ext = base.with_suffix(".ext")
        ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                       "authorityKeyIdentifier=keyid\n"
                       "subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n")
        openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={names[0]}",
                "-keyout", f"{base}.key", "-out", f"{base}.csr")
        openssl("x509", "-req", "-in", f"{base}.csr", "-CA", str(self.dir / f"{ca}.pem"),
                "-CAkey", str(self.dir / f"{ca}.key"), "-set_serial", str(self._serial),
                "-days", "2", "-extfile", str(ext), "-out", f"{base}.pem")
        return Path(f"{base}.pem"), Path(f"{base}.key")


class _TlsHandler(SinkHandler):
    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: N802
        self.sink.mail_tls.append(session.ssl is not None)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"


class TlsSink(MaildirSink):
    """``MaildirSink`` offering STARTTLS with a certificate that can be swapped between tests
    (``use``: the context loads the new chain; later handshakes present it).  ``mail_tls``: for
    each MAIL command, whether it came over TLS."""

    def __init__(self, cert: tuple[Path, Path]) -> None:
        super().__init__(hostname="tls-sink.test.invalid", smtputf8=False,
                         data_size_limit=33554432,  # aiosmtpd's default
                         tls_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
        self.mail_tls: list[bool] = []
        self.context = self.tls_context
        self.use(cert)

    def use(self, cert: tuple[Path, Path]) -> None:
        self.context.load_cert_chain(*cert)

    def handler(self) -> _TlsHandler:
        return _TlsHandler(self)

    def reset(self) -> None:
        super().reset()
        self.mail_tls.clear()


@dataclass
class TlsMx:
    onion: str
    sink: TlsSink
    pki: Pki
    dir: Path
    socks: str

    def config(self, deliver: str = "", pins: str = "") -> Path:
        cfg = self.dir / "torroute.toml"
        (self.dir / "map.txt").write_text(pins)
        cfg.write_text(f'[routing]\nmaps = ["{self.dir / "map.txt"}"]\nnameservers = '
                       f'["127.0.0.1:9"]\ndns_timeout = 0.5\n\n[tor]\nsocks = "{self.socks}"\n\n'
                       f"[deliver]\n{deliver}\n")
        cfg.chmod(0o644)
        return cfg


@pytest.fixture(scope="module")
def tls_mx(testnet) -> Iterator[TlsMx]:
    directory = shared_tmpdir("torroute-tls-")
    pki = Pki(directory)
    sink = TlsSink(pki.leaf(["example.test"])).start()
    onion = testnet.net.add_onion({25: sink.address})
    yield TlsMx(onion, sink, pki, directory,
                f"{testnet.socks_extended[0]}:{testnet.socks_extended[1]}")
    testnet.net.remove_onion(onion)
    sink.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def mx(tls_mx: TlsMx, testnet) -> TlsMx:
    testnet.check_alive()
    tls_mx.sink.reset()
    return tls_mx


def deliver(mx: TlsMx, *extra: str, rcpt: str = "user@example.test"
            ) -> subprocess.CompletedProcess:
    return subprocess.run([TORROUTE, "deliver", f"--config={mx.config()}",
                           "--sender=alice@origin.test", f"--nexthop=[{mx.onion}]:25", *extra,
                           "--", rcpt], input=MESSAGE, capture_output=True, env=CLEAN_ENV,
                          cwd="/", timeout=120)


def verify(mx: TlsMx) -> tuple[str, str]:
    return ("--tls-verify", f"--tls-ca-file={mx.pki.ca_file}")


# ---- the pipe program


@pytest.mark.parametrize("names", [["example.test"], ["mx.example.test"], ["*.example.test"],
                                   ["other.test", "example.test"], ["onion"]])
def test_certificate_for_the_domain_or_the_onion_is_delivered(names: list[str],
                                                              mx: TlsMx) -> None:
    mx.sink.use(mx.pki.leaf([mx.onion if n == "onion" else n for n in names]))
    r = deliver(mx, *verify(mx))
    assert status(r) == (0, "2.0.0"), r
    [got] = mx.sink.wait_for(1)
    assert mx.sink.mail_tls == [True] and got.rcpt_tos == ["user@example.test"]


@pytest.mark.parametrize("names", [["other.test"], ["example.test.evil"], ["*.test"],
                                   ["a.b.example.test.other"]])
def test_certificate_for_another_name_defers_and_nothing_is_sent(names: list[str],
                                                                 mx: TlsMx) -> None:
    mx.sink.use(mx.pki.leaf(names))
    r = deliver(mx, *verify(mx))
    assert status(r) == (75, "4.7.5"), r
    assert f"TLS certificate is for {names[0]}".encode() in r.stdout, r
    assert b"not example.test" in r.stdout
    assert mx.sink.mail_tls == [] and not mx.sink.messages  # not even MAIL, in clear or not


def test_certificate_from_an_untrusted_ca_defers(mx: TlsMx) -> None:
    mx.sink.use(mx.pki.leaf(["example.test"], ca="rogue"))
    r = deliver(mx, *verify(mx))
    assert status(r) == (75, "4.7.5") and b"not trusted" in r.stdout, r
    mx.sink.use(mx.pki.leaf(["example.test"]))  # the private CA is not in the system store
    r = deliver(mx, "--tls-verify")
    assert status(r) == (75, "4.7.5") and b"not trusted" in r.stdout, r
    assert mx.sink.mail_tls == [] and not mx.sink.messages


def test_without_tls_verify_the_certificate_is_not_checked(mx: TlsMx) -> None:
    """The onion address authenticates the server: opportunistic STARTTLS takes any
    certificate (the default); a configured tls_verify is turned off by --no-tls-verify."""
    mx.sink.use(mx.pki.leaf(["other.test"], ca="rogue"))
    r = deliver(mx, "--starttls=opportunistic")
    assert status(r) == (0, "2.0.0"), r
    assert mx.sink.mail_tls == [True]


def test_tls_verify_requires_starttls(onion_sink, testnet, serve_dir: Path) -> None:
    """A server that offers no STARTTLS (the session's Maildir sink): deferred 4.7.4, the
    message is not sent in the clear."""
    cfg = serve_dir / "t.toml"
    cfg.write_text(f'[tor]\nsocks = "{testnet.socks_extended[0]}:{testnet.socks_extended[1]}"\n'
                   '[deliver]\ntls_verify = true\nstarttls = "opportunistic"\n')
    r = subprocess.run([TORROUTE, "deliver", f"--config={cfg}", "--sender=a@origin.test",
                        f"--nexthop=[{onion_sink.onion}]:25", "--", "user@example.test"],
                       input=MESSAGE, capture_output=True, env=CLEAN_ENV, cwd="/", timeout=120)
    assert status(r) == (75, "4.7.4"), r
    assert onion_sink.sink.messages == []


def test_the_ca_file_is_read_as_the_pipe_user(mx: TlsMx) -> None:
    mx.sink.use(mx.pki.leaf(["example.test"]))
    cmd = ["/usr/sbin/runuser", "-u", "nobody", "--", TORROUTE, "deliver",
           f"--config={mx.config()}", "--sender=a@origin.test", f"--nexthop=[{mx.onion}]:25",
           *verify(mx), "--", "user@example.test"]
    r = subprocess.run(cmd, input=MESSAGE, capture_output=True, env=CLEAN_ENV, cwd="/",
                       timeout=120)
    assert status(r) == (0, "2.0.0"), r


# ---- the LMTP relay


def test_relay_verifies_each_domain_on_its_own(mx: TlsMx) -> None:
    """One transaction, two domains pinned to the same onion, a certificate for example.test:
    its recipient is delivered, other.test's deferred 4.7.5 (never sent); a later message for
    other.test does not ride the pooled connection verified for example.test."""
    mx.sink.use(mx.pki.leaf(["example.test"]))
    cfg = mx.config(f'tls_verify = true\ntls_ca_file = "{mx.pki.ca_file}"\n',
                    pins=f"example.test {mx.onion}\nother.test {mx.onion}\n")
    config = load_config(str(cfg))
    relay = Relay(Router.from_config(config), DeliverSettings.from_config(config),
                  idle_timeout=10)

    async def scenario() -> list[list[bytes]]:
        try:
            both = await relay.relay(Transaction(b"a@origin.test", (b"u@example.test",
                                                                    b"v@other.test"), b"s\n"))
            later = await relay.relay(Transaction(b"a@origin.test", (b"w@other.test",), b"t\n"))
            return [both, later]
        finally:
            relay.close()

    (ok, refused), (later,) = asyncio.run(scenario())
    assert ok.startswith(b"250 2.0.0 host "), ok
    assert refused.startswith(b"451 4.7.5 ") and b"not other.test" in refused, refused
    assert later.startswith(b"451 4.7.5 "), later
    [got] = mx.sink.wait_for(1)
    assert got.rcpt_tos == ["u@example.test"] and mx.sink.mail_tls == [True]


# ---- the name check alone


def test_name_matching_rules() -> None:
    def cert(*names: str) -> dict:
        return {"subject": ((("commonName", names[0]),),),
                "subjectAltName": tuple(("DNS", n) for n in names)}

    onion = "x" * 56 + ".onion"
    assert tls_check_peer(cert("example.org"), onion, ["example.org"]) is None
    assert tls_check_peer(cert("MX.Example.org."), onion, ["example.org"]) is None
    assert tls_check_peer(cert("*.example.org"), onion, ["a.example.org"]) is None
    assert tls_check_peer(cert(onion), onion, ["example.org"]) is None
    assert tls_check_peer(cert("a.example.org", "b.example.net"), onion,
                          ["example.org", "example.net"]) is None
    assert tls_check_peer(cert("example.org"), onion, ["example.org", "example.net"])
    assert tls_check_peer(cert("*.org"), onion, ["example.org"])
    assert tls_check_peer(cert("*.example.org"), onion, ["a.b.example.org"])  # one label
    assert tls_check_peer(cert("*.b.example.org"), onion, ["c.example.org"])
    assert tls_check_peer(cert("notexample.org"), onion, ["example.org"])
    assert tls_check_peer({"subject": ((("commonName", "example.org"),),)}, onion,
                          ["example.org"]) is None  # no SAN: the CN counts
    assert tls_check_peer({}, onion, ["example.org"])
