"""``torroute send`` on the private Tor network: neomutt in batch mode (``set sendmail=...``) and
the program itself, delivering into Maildir sinks behind onion services; the exit status of
each case; ``--queue`` then ``--flush`` once the onion is back (no duplicates).

    pinned.test   pinned (text map) to the session sink's onion
    srv.test      _onion-mx._tcp SRV (real dnsmasq) to a second onion sink
    user@<onion>  the session sink's onion as is
    down.test     pinned to ``stopped_onion`` (published, its server gone): deferred
    flaky.test    pinned to a sink this test stops and starts again
    nosrv.test    NXDOMAIN: no onion route (68), never sent
(The public ``torroute.send_message`` API on the same kinds of recipients:
tests/testnet/test_api.py and the docs/api.rst examples in test_api_docs.py.)
"""

from __future__ import annotations

import email
import subprocess
from pathlib import Path

import pytest
from support.e2e import SRV
from support.onions import ONION_A
from support.pipe import TORROUTE

from torroute.delivery.spool import Spool, decode_entry
from torroute.testing.dnsmasq import SrvRecord

BODY = "hello over tor\n.leading dot\n.\nafter the dot line\n"


@pytest.fixture
def net(testnet, onion_sink, onion_sink_factory, dnsmasq_factory, stopped_onion,
        tmp_path: Path):
    """(config path, first sink, second sink, flaky sink) for the recipients above."""
    second = onion_sink_factory()
    flaky = onion_sink_factory()
    dns = dnsmasq_factory([SrvRecord(SRV + "srv.test", second.onion, 25)])
    (tmp_path / "pins.txt").write_text(f"pinned.test {onion_sink.onion}\n"
                                       f"down.test {stopped_onion}\n"
                                       f"flaky.test {flaky.onion}\n")
    cfg = tmp_path / "torroute.toml"
    cfg.write_text(f'[routing]\nmaps = ["{tmp_path / "pins.txt"}"]\n'
                   f'nameservers = ["127.0.0.1:{dns.port}"]\ndns_timeout = 2\n'
                   f'[tor]\nsocks = "127.0.0.1:{testnet.socks_extended[1]}"\n'
                   f'[deliver]\ntime_limit = 90\n')
    cfg.chmod(0o644)
    return cfg, onion_sink, second, flaky


def stored(sink, received) -> email.message.Message:
    path = sink.path_of(received)
    assert path.is_file(), path
    return email.message_from_bytes(path.read_bytes())


def neomutt(cfg: Path, home: Path, *rcpts: str, bcc: str | None = None,
            body: str = BODY) -> subprocess.CompletedProcess:
    """neomutt -n -F muttrc -s SUBJECT -- RCPT... < body, with its own HOME and nothing that
    looks anything up (hostname given, no folders, no record)."""
    home.mkdir(exist_ok=True)
    muttrc = home / "muttrc"
    muttrc.write_text(f'set sendmail="{TORROUTE} send -oi --config {cfg}"\n'
                      'set from="Alice <alice@origin.test>"\nset use_from=yes\n'
                      'set use_envelope_from=yes\nset hostname="origin.test"\n'
                      'set record=""\nset copy=no\nset postpone=no\n'
                      f'set folder="{home}/Mail"\nset spoolfile="{home}/Mail/inbox"\n'
                      f'set header_cache=""\nset tmpdir="{home}"\n')
    argv = ["neomutt", "-n", "-F", str(muttrc), "-s", "from neomutt"]
    if bcc:
        argv += ["-b", bcc]
    return subprocess.run([*argv, "--", *rcpts], input=body.encode(), capture_output=True,
                          timeout=240, env={"HOME": str(home), "PATH": "/usr/bin:/bin",
                                            "LANG": "C.UTF-8"}, cwd=home)


def send(cfg: Path, *args: str, stdin: bytes = b"", timeout: float = 240
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run([TORROUTE, "send", "--config", str(cfg), *args], input=stdin,
                          capture_output=True, timeout=timeout, env={"PATH": "/usr/bin:/bin"})
    err = proc.stderr.decode()
    assert "Traceback" not in err and "ERROR" not in err, err
    return proc


def lines(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """recipient -> its stderr line (after 'torroute send: [entry: ]')."""
    found = {}
    for line in proc.stderr.decode().splitlines():
        words = line.split()
        if line.startswith("torroute send: ") and len(words) > 3:
            rcpt = words[2] if words[2].count("@") else words[3]
            found[rcpt.rstrip(":")] = line
    return found


MESSAGE = (b"From: Script <script@origin.test>\nSubject: from a script\n"
           b"Message-ID: <s1@origin.test>\n\nbody\n")


@pytest.mark.testnet
def test_neomutt_delivers_to_pinned_srv_and_raw_onion(net, tmp_path: Path) -> None:
    cfg, first, second, _ = net
    raw = f"dave@{first.onion}"
    proc = neomutt(cfg, tmp_path / "home", "bob@pinned.test", "carol@srv.test", raw,
                   bcc="erin@pinned.test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == b"" or b"rror" not in proc.stderr, proc.stderr
    # one transaction per onion: the pinned, raw-onion and Bcc recipients share the first
    [got] = first.sink.wait_for(1)
    assert got.mail_from == "alice@origin.test"  # neomutt's -f (use_envelope_from)
    assert sorted(got.rcpt_tos) == sorted(["bob@pinned.test", raw, "erin@pinned.test"])
    msg = stored(first.sink, got)
    assert msg["Subject"] == "from neomutt" and msg["From"] == "Alice <alice@origin.test>"
    assert msg["Bcc"] is None and b"erin" not in got.data
    # -oi: the single-dot line is part of the message (dot-stuffed on the wire)
    assert msg.get_payload().replace("\r\n", "\n") == BODY
    [got2] = second.sink.wait_for(1)
    assert got2.rcpt_tos == ["carol@srv.test"] and stored(second.sink, got2)["Subject"]
    assert len(first.sink.messages) == 1 and len(second.sink.messages) == 1


@pytest.mark.testnet
def test_neomutt_sees_a_deferral_as_failure(net, tmp_path: Path) -> None:
    """exit 75: neomutt reports 'child exited 75' and does not count the message as sent."""
    cfg, first, _, _ = net
    proc = neomutt(cfg, tmp_path / "home", "x@down.test")
    assert proc.returncode != 0
    assert b"exited 75" in proc.stderr + proc.stdout, proc.stderr
    assert first.sink.messages == []


@pytest.mark.testnet
def test_exit_status_per_case(net) -> None:
    cfg, first, second, _ = net
    first.sink.reject("eve@pinned.test", "550 5.1.1 <eve@pinned.test>: no such user")
    bad_onion = "x@" + ("b" if ONION_A[0] == "a" else "a") + ONION_A[1:]
    cases = [(["eve@pinned.test"], 69, "refused 5.1.1"),
             (["x@nosrv.test"], 68, "no-route 5.4.4 no onion route for nosrv.test"),
             ([bad_onion], 65, "bad-address 5.1.2"),
             (["x@down.test"], 75, "deferred 4."),
             (["-t"], 0, "delivered 2.0.0")]
    for args, code, words in cases:
        stdin = MESSAGE.replace(b"Subject", b"To: carol@srv.test\nSubject")
        proc = send(cfg, *args, stdin=stdin)
        assert proc.returncode == code, (args, proc.stderr)
        assert words in proc.stderr.decode(), (args, proc.stderr)
    assert "not sent (torroute never uses the clear net)" in \
        send(cfg, "x@nosrv.test", stdin=MESSAGE).stderr.decode()
    [got] = second.sink.wait_for(1)
    assert got.rcpt_tos == ["carol@srv.test"] and got.mail_from == "script@origin.test"
    assert first.sink.messages == []  # eve refused at RCPT: no transaction


@pytest.mark.testnet
def test_mixed_results_precedence(net) -> None:
    cfg, first, _, _ = net
    first.sink.reject("eve@pinned.test", "550 5.1.1 no such user")
    proc = send(cfg, "bob@pinned.test", "eve@pinned.test", "x@down.test", "y@nosrv.test",
                stdin=MESSAGE)
    assert proc.returncode == 75, proc.stderr  # deferred (not queued) wins
    got = lines(proc)
    assert ": delivered 2.0.0" in got["bob@pinned.test"]
    assert ": refused 5.1.1" in got["eve@pinned.test"]
    assert ": deferred 4." in got["x@down.test"] and ": no-route" in got["y@nosrv.test"]
    proc = send(cfg, "eve@pinned.test", "y@nosrv.test", stdin=MESSAGE)
    assert proc.returncode == 68, proc.stderr  # 68 before 69
    [delivered] = first.sink.wait_for(1)
    assert delivered.rcpt_tos == ["bob@pinned.test"] and len(first.sink.messages) == 1


@pytest.mark.testnet
def test_queue_then_flush_once_the_onion_is_back(net, tmp_path: Path) -> None:
    cfg, first, _, flaky = net
    flaky.sink.stop()  # the onion stays published; its SMTP server is gone: tor fails (0x01)
    q1, q2 = tmp_path / "q1", tmp_path / "q2"
    proc = send(cfg, "--queue", str(q1), "x@flaky.test", "bob@pinned.test", stdin=MESSAGE)
    assert proc.returncode == 0, proc.stderr  # delivered + queued (fsynced)
    got = lines(proc)
    assert ": delivered" in got["bob@pinned.test"] and ": queued 4." in got["x@flaky.test"]
    proc = send(cfg, "--queue", str(q2), "x2@flaky.test", "y@down.test", stdin=MESSAGE)
    assert proc.returncode == 0, proc.stderr
    # still down: the flush keeps both, exit 75
    proc = send(cfg, "--flush", str(q1), "--now")
    assert proc.returncode == 75 and ": queued" in lines(proc)["x@flaky.test"], proc.stderr
    [name1] = Spool(q1).names()
    assert Spool(q1).load(name1).attempts == 2
    flaky.sink.start()  # the same port again: the onion works again
    proc = send(cfg, "--flush", str(q1))  # not due yet (backoff): nothing tried
    assert proc.returncode == 75 and "next try" in proc.stderr.decode(), proc.stderr
    assert flaky.sink.messages == []
    proc = send(cfg, "--flush", str(q1), "--now")
    assert proc.returncode == 0, proc.stderr
    assert ": delivered 2.0.0" in lines(proc)["x@flaky.test"]
    assert Spool(q1).names() == [] and list((q1 / "failed").iterdir()) == []
    assert list((q1 / "tmp").iterdir()) == []
    proc = send(cfg, "--flush", str(q2), "--now")  # partial: x2 delivered, y still deferred
    assert proc.returncode == 75, proc.stderr
    [name2] = Spool(q2).names()
    entry = decode_entry(name2, (q2 / "new" / name2).read_bytes())
    assert entry.recipients["x2@flaky.test"].status == "delivered"
    assert entry.pending() == ["y@down.test"]
    proc = send(cfg, "--flush", str(q2), "--now")  # y again, never x2 again
    assert proc.returncode == 75 and "x2@flaky.test" not in proc.stderr.decode()
    assert send(cfg, "--flush", str(q1), "--now").returncode == 0  # empty: nothing to do
    # exactly once each: x, then x2; bob once on the pinned sink
    messages = flaky.sink.wait_for(2)
    assert [m.rcpt_tos for m in messages] == [["x@flaky.test"], ["x2@flaky.test"]]
    assert len(flaky.sink.messages) == 2
    assert [m.rcpt_tos for m in first.sink.messages] == [["bob@pinned.test"]]
    assert stored(flaky.sink, messages[0])["Subject"] == "from a script"


@pytest.mark.testnet
def test_an_onion_identity_is_scrubbed_on_the_send_path(net) -> None:
    """send builds on send_message, so [deliver] scrub_* applies (docs/scrub.rst): Received,
    X-Mailer, User-Agent gone, the Message-ID replaced by one that names the sender's onion."""
    import hashlib

    from support.onions import ONION_B

    cfg, first, _, _ = net
    message = (b"From: <me@" + ONION_B.encode() + b">\nSubject: scrub via send\n"
               b"Message-ID: <1@laptop.clear.example>\nX-Mailer: neomutt\n"
               b"Received: from laptop.clear.example\nUser-Agent: x/1\nX-Kept: yes\n\nbody\n")
    proc = send(cfg, "-t", "-oi", "-f", f"me@{ONION_B}", "bob@pinned.test", stdin=message)
    assert proc.returncode == 0, proc.stderr
    [got] = first.sink.wait_for(1)
    new_id = hashlib.sha256(b"<1@laptop.clear.example>").hexdigest()
    assert got.data.replace(b"\r\n", b"\n") == (
        b"From: <me@" + ONION_B.encode() + b">\nSubject: scrub via send\nX-Kept: yes\n"
        b"Message-ID: <" + new_id.encode() + b"@" + ONION_B.encode() + b">\n\nbody\n")
