"""`torroute deliver` as Postfix runs it (a process, message on stdin), without Postfix.

Real tor (the lead's bridge-mode `tor`) for tor's own refusals and timeouts; a real aiosmtpd sink
behind ``FakeSocksServer`` (a loopback SOCKS5 relay) for SMTP behaviour; ``FakeSmtpServer`` only
for a reset in the middle of DATA and a server that never answers.

The program is this checkout's (``support.pipe.worktree_program``), not the venv's installed
copy, which only ``scripts/install-deps.sh`` refreshes.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from email import message_from_bytes
from pathlib import Path

import pytest
from support.onions import ONION_A, ONION_B
from support.paths import REPO, VENV_TORROUTE
from support.pipe import CLEAN_ENV, MESSAGE, TORROUTE, deliver, status

from torroute.testing.ports import free_port
from torroute.testing.sink import ESMTP_FULL, MaildirSink


def via(socks: tuple[str, int], *extra: str, onion: str = ONION_A, port: int = 25,
        rcpts: tuple[str, ...] = ("bob@example.test",), sender: str = "alice@origin.test"
        ) -> list[str]:
    return [f"--tor-socks={socks[0]}:{socks[1]}", f"--sender={sender}",
            f"--nexthop=[{onion}]:{port}", *extra, "--", *rcpts]


@pytest.fixture
def relay(fake_socks_factory, smtp_sink):
    """FakeSocksServer -> real aiosmtpd sink."""
    return fake_socks_factory(smtp_sink.address)


# ---- delivered


def test_delivers_through_socks_with_hostname_and_neutral_ehlo(relay, smtp_sink) -> None:
    r = deliver(*via(relay.address))
    assert status(r) == (0, "2.0.0"), r
    [got] = smtp_sink.wait_for(1)
    assert relay.requests == [(3, ONION_A, 25)]  # ATYP 3: the name went to tor, unresolved
    assert smtp_sink.ehlo_names == ["localhost"]
    assert socket.gethostname() not in r.stdout.decode() + "".join(smtp_sink.ehlo_names)
    assert got.mail_from == "alice@origin.test" and got.rcpt_tos == ["bob@example.test"]
    assert got.data == MESSAGE.replace(b"\n", b"\r\n")  # dot-stuffing undone by the server
    assert message_from_bytes(got.data)["Message-ID"] == "<1@origin.test>"


def test_runs_as_nobody_with_pipe_environment(relay, smtp_sink) -> None:
    """pipe(8) runs the program as an unprivileged user, PATH=/usr/bin:/bin, no HOME."""
    r = deliver(*via(relay.address), user="nobody")
    assert status(r) == (0, "2.0.0"), r
    assert len(smtp_sink.wait_for(1)) == 1


def test_null_sender_and_ehlo_name_from_config(relay, smtp_sink, postfix_dir: Path) -> None:
    cfg = postfix_dir / "t.toml"
    cfg.write_text('[deliver]\nehlo_name = "abcdef.onion"\n')
    r = deliver(f"--config={cfg}", *via(relay.address, sender=""))
    assert status(r) == (0, "2.0.0"), r
    [got] = smtp_sink.wait_for(1)
    assert got.mail_from == "<>" and smtp_sink.ehlo_names == ["abcdef.onion"]


def test_ten_megabytes_and_8bit_smtputf8(relay, smtp_sink) -> None:
    big = b"Subject: big\n\n" + b"".join(b"%07d " % i + b"x" * 70 + b"\n" for i in range(134000))
    assert len(big) > 10_000_000
    r = deliver(*via(relay.address), stdin=big, timeout=120)
    assert status(r) == (0, "2.0.0"), r
    utf8 = "From: Ålice <ålice@örigin.test>\nSubject: grüße\n\nbody ü ✓\n".encode()
    r = deliver(*via(relay.address, rcpts=("bøb@exämple.test",), sender="ålice@örigin.test"),
                stdin=utf8)
    assert status(r) == (0, "2.0.0"), r
    first, second = smtp_sink.wait_for(2)
    assert first.data == big.replace(b"\n", b"\r\n")
    crlf_size = len(big.replace(b"\n", b"\r\n"))
    assert f"SIZE={crlf_size}" in first.mail_options
    assert second.data == utf8.replace(b"\n", b"\r\n")
    assert second.rcpt_tos == ["bøb@exämple.test"] and second.mail_from == "ålice@örigin.test"
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(second.mail_options)


# ---- remote answers


def test_remote_550_bounces_with_remote_text(relay, smtp_sink) -> None:
    smtp_sink.reject("bob@example.test", "550 5.1.1 <bob@example.test>: no such user here")
    r = deliver(*via(relay.address))
    assert status(r) == (69, "5.1.1"), r
    assert b"no such user here" in r.stdout and not smtp_sink.messages


def test_remote_451_defers(relay, smtp_sink) -> None:
    smtp_sink.data_reply = "451 4.3.0 try again later"
    r = deliver(*via(relay.address))
    assert status(r) == (75, "4.3.0"), r
    assert b"try again later" in r.stdout


def test_multi_recipient_all_or_nothing(relay, smtp_sink) -> None:
    rcpts = ("a@example.test", "b@example.test", "c@example.test")
    smtp_sink.reject("b@example.test", "550 5.1.1 no b here")
    r = deliver(*via(relay.address, rcpts=rcpts))
    assert status(r) == (75, "4.5.3"), r
    assert b"no b here" in r.stdout and b"recipient_limit" in r.stdout
    smtp_sink.rcpt_replies.clear()
    r = deliver(*via(relay.address, rcpts=rcpts))
    assert status(r) == (0, "2.0.0"), r
    [got] = smtp_sink.wait_for(1)  # the refused run delivered nothing
    assert got.rcpt_tos == list(rcpts)


def test_reset_in_the_middle_of_data_defers(fake_socks_factory, fake_smtp_factory) -> None:
    server = fake_smtp_factory("reset-in-data")
    r = deliver(*via(fake_socks_factory(server.address).address),
                stdin=b"Subject: x\n\n" + b"y" * 200_000 + b"\n")
    assert status(r) == (75, "4.4.2"), r
    assert b"DATA" in server.received


@pytest.mark.parametrize("mode", ["silent", "garbage"])
def test_unresponsive_or_garbage_server_defers(fake_socks_factory, fake_smtp_factory,
                                               mode: str) -> None:
    server = fake_smtp_factory(mode)
    r = deliver(*via(fake_socks_factory(server.address).address, "--command-timeout=1"))
    assert status(r)[0] == 75 and status(r)[1] in ("4.4.2", "4.5.0"), r


def test_time_limit_bounds_the_whole_run(fake_socks_factory, fake_smtp_factory) -> None:
    server = fake_smtp_factory("silent")
    r = deliver(*via(fake_socks_factory(server.address).address, "--time-limit=1.5"),
                timeout=30)
    assert status(r) == (75, "4.4.2"), r


def test_starttls_opportunistic(fake_socks_factory, postfix_dir: Path) -> None:
    import ssl

    from aiosmtpd.controller import Controller

    key, cert = postfix_dir / "key.pem", postfix_dir / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=sink.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sink = MaildirSink(**ESMTP_FULL)
    from torroute.testing.sink import SinkHandler

    handler = SinkHandler(sink)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context,
                            require_starttls=True, server_hostname="sink.test")
    controller.start()
    try:
        socks = fake_socks_factory(("127.0.0.1", port)).address
        r = deliver(*via(socks))  # default: no STARTTLS; this server insists on it
        assert status(r)[0] == 69 and b"STARTTLS" in r.stdout, r
        assert not sink.messages
        r = deliver(*via(socks, "--starttls=opportunistic"))
        assert status(r) == (0, "2.0.0"), r
        assert len(sink.wait_for(1)) == 1
    finally:
        controller.stop()


# ---- tor's answers (real tor)


def test_tor_socksport_down_defers() -> None:
    r = deliver(*via(("127.0.0.1", free_port())))
    assert status(r) == (75, "4.4.1"), r
    assert b"SocksPort" in r.stdout and b"unreachable" in r.stdout


def test_real_tor_isolation_auth_is_accepted(tor, postfix_dir: Path) -> None:
    """tor takes the per-onion SOCKS username/password and goes on to the (unreachable: the
    bridge-mode tor never bootstraps) onion: the run ends in the connect timeout, not in a
    refused SOCKS authentication."""
    cfg = postfix_dir / "iso.toml"
    cfg.write_text("[deliver]\nisolate = true\n")
    r = deliver(f"--config={cfg}", *via(tor.socks, "--connect-timeout=2", onion=ONION_B))
    assert status(r) == (75, "4.4.1"), r
    assert b"timed out after 2s" in r.stdout and b"refused" not in r.stdout


def test_real_tor_unreachable_onion_times_out_and_defers(tor) -> None:
    """The bridge-mode tor never bootstraps: a valid onion cannot be reached -> defer."""
    r = deliver(*via(tor.socks, "--connect-timeout=2"), timeout=60)
    assert status(r) == (75, "4.4.1"), r


@pytest.mark.parametrize("code", [0xF0, 0xF2, 0xF3, 0xF7])
def test_tor_extended_temporary_errors_defer(fake_socks_factory, code: int) -> None:
    socks = fake_socks_factory()
    socks.reply = code
    r = deliver(*via(socks.address))
    assert status(r) == (75, "4.4.1"), r
    assert f"{code:#04x}".encode() in r.stdout


def test_tor_extended_0xf6_from_fake_bounces(fake_socks_factory) -> None:
    socks = fake_socks_factory()
    socks.reply = 0xF6
    assert status(deliver(*via(socks.address))) == (69, "5.1.2")


# ---- the nexthop is validated before tor is asked (as `torroute route` does)


def _bad_key_onion() -> str:
    """A v3 address with a right checksum and version whose key is no ed25519 point of the
    prime-order group: only the key check catches it (tor: 0xF6; plain SocksPort: 0x01)."""
    from torroute.routing.ed25519 import is_valid_pubkey
    from torroute.routing.onion import onion_from_pubkey

    key = next(k for k in (bytes([n]) * 32 for n in range(256)) if not is_valid_pubkey(k))
    return onion_from_pubkey(key)


def _flip(onion: str, at: int) -> str:
    return onion[:at] + ("a" if onion[at] != "a" else "b") + onion[at + 1:]


INVALID_ONIONS = {
    "checksum": (_flip(ONION_A, 10), "checksum mismatch"),
    "55 characters": (ONION_A[1:], "not 55"),
    "57 characters": ("a" + ONION_A, "not 57"),
    "v2": ("expyuzz4wqqyqhjn.onion", "v2 onion address"),
    "not base32": (ONION_A[:5] + "1" + ONION_A[6:], "not base32"),
    "bad key": (_bad_key_onion(), "not a valid ed25519 service key"),
    "subdomain of a bad one": ("mx." + _flip(ONION_B, 20), "checksum mismatch"),
}


@pytest.mark.parametrize("kind", sorted(INVALID_ONIONS))
def test_invalid_onion_nexthop_bounces_before_tor_is_asked(kind: str, relay, smtp_sink) -> None:
    """Anything ending in .onion that is not a valid v3 address: 5.1.2 and exit 69 at once,
    the verdict (and reason) of `torroute route`; tor's SocksPort sees nothing."""
    onion, reason = INVALID_ONIONS[kind]
    r = deliver(*via(relay.address, onion=onion))
    assert status(r) == (69, "5.1.2"), r
    assert reason.encode() in r.stdout, r
    assert relay.requests == [] and not smtp_sink.messages
    route = subprocess.run([TORROUTE, "route", f"user@{onion}"], capture_output=True,
                           env=CLEAN_ENV, cwd="/", timeout=30)
    assert route.returncode == 65, route  # the same verdict: invalid (EX_DATAERR)
    said = route.stderr.decode().split(": ", 2)[-1].strip()
    assert said in r.stdout.decode(), (said, r.stdout)


def test_mistyped_onion_bounces_on_a_socksport_without_extended_errors(tor) -> None:
    """Real tor's plain SocksPort answers a bad checksum with 0x01 (general failure): without
    the validation that deferred (4.4.1) until the message expired."""
    r = deliver(*via(tor.socks_plain, onion=INVALID_ONIONS["checksum"][0]))
    assert status(r) == (69, "5.1.2"), r
    r = deliver(*via(tor.socks_plain, onion=INVALID_ONIONS["bad key"][0]))
    assert status(r) == (69, "5.1.2"), r


def test_valid_onion_with_subdomain_is_delivered(relay, smtp_sink) -> None:
    r = deliver(*via(relay.address, onion="mx." + ONION_A))
    assert status(r) == (0, "2.0.0"), r
    assert relay.requests == [(3, "mx." + ONION_A, 25)]


def test_success_path_imports_no_routing_dns_or_ssl(relay, smtp_sink) -> None:
    """The backup-target code (torroute.routing.router, dnspython) loads only after a failure; a
    delivery that works starts as cheaply as before (bench/deliver_coldstart.py)."""
    probe = ("import sys\nfrom torroute.cli.deliver import main\nrc = main(sys.argv[1:])\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('dns', 'ssl', "
             "'smtplib', 'email', 'python_socks', 'asyncio') or m in ('torroute.routing.router', "
             "'torroute.delivery.relay', 'torroute.routing.maps'))\nprint('RESULT', rc, heavy)\n")
    r = subprocess.run([str(VENV_TORROUTE.parent / "python3"), "-c", probe, *via(relay.address)],
                       input=MESSAGE, capture_output=True, cwd="/", timeout=60,
                       env={**CLEAN_ENV, "PYTHONPATH": str(REPO)})
    assert r.stdout.decode().splitlines()[-1] == "RESULT 0 []", r
    assert len(smtp_sink.wait_for(1)) == 1


# ---- every [deliver] setting has a flag


class Tap:
    """A recording TCP forwarder in front of a real server: what the client sent, chunk by
    chunk as recv() returned it (one chunk per client write on loopback)."""

    def __init__(self, target: tuple[str, int]) -> None:
        import threading

        self.target = target
        self.chunks: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = self.sock.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=30)

            def down(src: socket.socket = upstream, dst: socket.socket = conn) -> None:
                try:
                    while data := src.recv(65536):
                        dst.sendall(data)
                except OSError:
                    pass
                dst.close()

            threading.Thread(target=down, daemon=True).start()
            try:
                while data := conn.recv(65536):
                    self.chunks.append(data)
                    upstream.sendall(data)
            except OSError:
                pass
            upstream.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("flag", ["", "--no-pipelining", "--no-chunking"])
def test_pipelining_flag(flag: str, fake_socks_factory, smtp_sink, postfix_dir: Path) -> None:
    tap = Tap(smtp_sink.address)
    try:
        cfg = postfix_dir / "p.toml"
        cfg.write_text("[deliver]\npipelining = true\n")
        extra = [flag] if flag else []
        r = deliver(f"--config={cfg}", *via(fake_socks_factory(tap.address).address, *extra))
        assert status(r) == (0, "2.0.0"), r
        [mail] = [c for c in tap.chunks if c.startswith(b"MAIL FROM:")]
        lines = mail.split(b"\r\n")[:-1]
        assert lines[0].startswith(b"MAIL FROM:<alice@origin.test> SIZE="), mail
        if flag == "--no-pipelining":
            assert len(lines) == 1, mail  # alone: the client waited for each reply
        elif flag == "--no-chunking":
            assert lines[1:] == [b"RCPT TO:<bob@example.test>", b"DATA"], mail  # one write
        else:  # the sink offers CHUNKING: the message goes in the same write, after BDAT
            assert lines[1] == b"RCPT TO:<bob@example.test>", mail
            assert lines[2].startswith(b"BDAT ") and lines[2].endswith(b" LAST"), mail
    finally:
        tap.close()


def test_isolate_flags_override_the_configuration(relay, smtp_sink, postfix_dir: Path) -> None:
    """The loopback relay offers only 'no authentication': with --isolate the program asks for
    username/password (IsolateSOCKSAuth) and refuses the connection; --no-isolate beats the
    configuration's isolate = true."""
    r = deliver(*via(relay.address, "--isolate"))
    assert status(r) == (75, "4.4.1") and b"refused the SOCKS5 method" in r.stdout, r
    cfg = postfix_dir / "iso.toml"
    cfg.write_text("[deliver]\nisolate = true\n")
    r = deliver(f"--config={cfg}", *via(relay.address, "--no-isolate"))
    assert status(r) == (0, "2.0.0"), r
    assert len(smtp_sink.wait_for(1)) == 1


def test_require_onion_flags(relay, smtp_sink, postfix_dir: Path) -> None:
    """--no-require-onion lets a clear-net name through tor's SocksPort (as a name: tor
    resolves it); --require-onion beats the configuration's false: 4.3.5, nothing dialled."""
    args = [f"--tor-socks={relay.address[0]}:{relay.address[1]}", "--sender=a@origin.test",
            "--nexthop=[mail.example.com]:25"]
    cfg = postfix_dir / "ro.toml"
    cfg.write_text("[deliver]\nrequire_onion = false\n")
    r = deliver(f"--config={cfg}", *args, "--require-onion", "--", "bob@example.test")
    assert status(r) == (75, "4.3.5"), r
    assert relay.requests == []
    r = deliver(*args, "--no-require-onion", "--", "bob@example.test")
    assert status(r) == (0, "2.0.0"), r
    assert relay.requests == [(3, "mail.example.com", 25)]


def test_every_deliver_setting_has_a_flag() -> None:
    """The README's promise, checked: each [deliver] key is reachable from the command line."""
    from torroute.cli.deliver import add_arguments
    from torroute.config import Config
    from torroute.delivery.settings import DeliverSettings

    parser = __import__("argparse").ArgumentParser()
    add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    keys = {"ehlo_name", "starttls", "tls_verify", "tls_ca_file", "pipelining",
            "connect_timeout", "command_timeout", "data_timeout", "time_limit", "isolate",
            "require_onion"}
    assert keys <= flags, keys - flags
    args = parser.parse_args(["--sender=a@b.test", "--nexthop=x", "--no-pipelining",
                              "--isolate", "--no-require-onion", "--tls-verify",
                              "--tls-ca-file=/etc/ssl/certs/ca-certificates.crt", "--", "r@x"])
    config = Config()
    config.raw = {"deliver": {"pipelining": True, "isolate": False, "require_onion": True}}
    s = DeliverSettings.from_config(config, {k: getattr(args, k) for k in keys})
    assert (s.pipelining, s.isolate, s.require_onion, s.tls_verify) == (False, True, False, True)
    assert s.starttls == "required" and s.tls_ca_file == "/etc/ssl/certs/ca-certificates.crt"
    plain_args = parser.parse_args(["--sender=a@b.test", "--nexthop=x", "--", "r@x"])
    plain = DeliverSettings.from_config(config, {k: getattr(plain_args, k) for k in keys})
    assert (plain.pipelining, plain.isolate, plain.require_onion) == (True, False, True)


# ---- its own failures always defer, never bounce


def test_non_onion_nexthop_defers(relay, smtp_sink) -> None:
    r = deliver(f"--tor-socks={relay.address[0]}:{relay.address[1]}", "--sender=a@b.test",
                "--nexthop=[mail.example.com]:25", "--", "bob@example.test")
    assert status(r) == (75, "4.3.5"), r
    assert relay.requests == []  # nothing dialled, not even through tor


@pytest.mark.parametrize("args", [
    ["--nexthop=x", "--", "r@x.test"],  # no --sender
    ["--sender=a@b.test", "--nexthop=x"],  # no recipient
    ["--sender=a@b.test", "--nexthop=x", "--bogus", "--", "r@x.test"],
    ["--sender=a@b.test", "--nexthop=x", "--data-timeout=soon", "--", "r@x.test"],
])
@pytest.mark.parametrize("entry", ["torroute", "fast"])
def test_usage_errors_defer(args: list[str], entry: str) -> None:
    if entry == "torroute":
        r = deliver(*args)
    else:
        r = subprocess.run([sys.executable, "-m", "torroute.cli.deliver", *args], input=b"",
                           capture_output=True, env=CLEAN_ENV, cwd="/", timeout=30)
    assert status(r) == (75, "4.3.5"), r


@pytest.mark.parametrize("toml", ['[deliver]\nbogus = 1\n', '[deliver]\nstarttls = "maybe"\n',
                                  '[tor]\nsocks = "nonsense"\n', "not toml [",
                                  '[deliver]\ntls_verify = true\ntls_ca_file = "/nonexistent"\n',
                                  '[deliver]\ntls_verify = true\ntls_ca_file = "/etc/passwd"\n',
                                  '[deliver]\nisolate = "yes"\n'])
def test_config_errors_defer(toml: str, postfix_dir: Path) -> None:
    cfg = postfix_dir / "bad.toml"
    cfg.write_text(toml)
    r = deliver(f"--config={cfg}", *via(("127.0.0.1", 9)))
    assert status(r) == (75, "4.3.5"), r


def test_missing_config_file_defers(postfix_dir: Path) -> None:
    r = deliver(f"--config={postfix_dir}/absent.toml", *via(("127.0.0.1", 9)))
    assert status(r) == (75, "4.3.5"), r


def test_internal_error_defers_without_traceback(monkeypatch, capsys) -> None:
    import torroute.delivery.pipe
    from torroute.cli import deliver as cli_deliver

    def explode(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(torroute.delivery.pipe, "deliver", explode)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MESSAGE)))
    code = cli_deliver.main(["--sender=a@b.test", f"--nexthop={ONION_A}", "--", "r@x.test"])
    out = capsys.readouterr()
    assert code == 75
    assert out.out.startswith("4.3.0 torroute deliver: internal error: KeyError")
    assert "Traceback" not in out.out + out.err


def test_program_is_reachable_by_nobody() -> None:
    """The installed entry point and the code it imports are readable by pipe's user."""
    installed = str(VENV_TORROUTE)
    r = subprocess.run(["/usr/sbin/runuser", "-u", "nobody", "--", installed, "deliver",
                        "--help"], capture_output=True, env=CLEAN_ENV, cwd="/", timeout=30)
    assert r.returncode == 0 and b"--nexthop" in r.stdout, r
    assert os.access(installed, os.X_OK)


def test_non_ascii_remote_text_keeps_its_status_in_an_ascii_locale(relay, smtp_sink) -> None:
    smtp_sink.reject("bob@example.test", "550 5.1.1 Empfänger unbekannt ✗")
    cmd = [TORROUTE, "deliver", *via(relay.address)]
    r = subprocess.run(cmd, input=MESSAGE, capture_output=True, cwd="/", timeout=60,
                       env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PYTHONIOENCODING": "ascii"})
    assert status(r) == (69, "5.1.1"), r
    assert "Empfänger".encode() in r.stdout
