"""The daemon against Postfix's own client (`postmap -q`): socketmap and tcp_table."""

from __future__ import annotations

import signal
import smtplib
import time
from pathlib import Path

import pytest
from support.onions import ONION_A, ONION_B, ONION_C

from torroute.testing.dnsmasq import SrvRecord

SRV = "_onion-mx._tcp."


def write_config(path: Path, dns_port: int, extra: str = "", map_text: str = "") -> Path:
    (path / "map.txt").write_text(map_text or f"pinned.test {ONION_B}\nport.test {ONION_C}:2525\n")
    cfg = path / "torroute.toml"
    cfg.write_text(f"""
[routing]
maps = ["map.txt"]
nameservers = ["127.0.0.1:{dns_port}"]
local_domains = ["local.test"]
dns_timeout = 1.0
{extra}
""")
    return cfg


def wait_log(daemon, text: str, count: int = 1, timeout: float = 10) -> str:
    return daemon.wait_log(text, count, timeout)


@pytest.fixture
def dns(dnsmasq_factory):
    return dnsmasq_factory([SrvRecord(SRV + "srv.test", ONION_A, 25),
                            SrvRecord(SRV + "srvport.test", "mx." + ONION_B, 2526)])


@pytest.fixture
def daemon(daemon_factory, serve_dir, dns):
    return daemon_factory("--config", str(write_config(serve_dir, dns.port)))


@pytest.mark.postfix
@pytest.mark.parametrize("table", ["socketmap", "tcp"])
def test_answers_through_postmap(daemon, postmap, table: str) -> None:
    t = daemon.socketmap_table if table == "socketmap" else daemon.tcp_table
    expect = {
        "user@pinned.test": f"torroute:[{ONION_B}]:25",
        "user@PORT.test": f"torroute:[{ONION_C}]:2525",
        "u@srv.test": f"torroute:[{ONION_A}]:25",
        "u@srvport.test": f"torroute:[{ONION_B}]:2526",  # SRV target mx.<onion>
        f"u@{ONION_C}": f"torroute:[{ONION_C}]:25",
    }
    for key, value in expect.items():
        r = postmap.query(key, t)
        assert (r.returncode, r.stdout.strip()) == (0, value), (key, r.stderr)
    for key in ["*", "u@local.test", "u@nosrv.test"]:
        r = postmap.query(key, t)
        assert (r.returncode, r.stdout, r.stderr) == (1, "", ""), key
    r = postmap.query("u@invalid.onion", t)  # bounce via error(8), never the default route
    assert (r.returncode, r.stdout.strip()) == (0, "error:5.1.2 invalid .onion address")
    wait_log(daemon, "domain=srv.test result=route")  # log lines are flushed within 0.2 s
    log = daemon.log()
    assert "source='srv'" in log and "ms=" in log


@pytest.mark.postfix
@pytest.mark.parametrize("table", ["socketmap", "tcp"])
def test_dns_down_is_temp_not_notfound(daemon_factory, serve_dir, postmap, silent_udp,
                                       table: str) -> None:
    # a resolver that never answers: Postfix must get TEMP/400 (defer), never "not found"
    d = daemon_factory("--config", str(write_config(serve_dir, silent_udp.address[1])))
    t = d.socketmap_table if table == "socketmap" else d.tcp_table
    r = postmap.query("u@srv.test", t)
    assert r.returncode != 0 and r.stdout == ""
    assert "query error" in r.stderr  # postmap's report of a temporary lookup error
    if table == "socketmap":
        assert "temporary error: DNS timeout" in r.stderr
    # pins and local domains need no DNS: still answered
    assert postmap.query("u@pinned.test", t).stdout.strip() == f"torroute:[{ONION_B}]:25"
    assert postmap.query("u@local.test", t).returncode == 1
    wait_log(d, "result=tempfail")


@pytest.mark.postfix
def test_dnsmasq_stopped_mid_run_gives_temp(daemon, dns, postmap) -> None:
    assert postmap.query("u@srv.test", daemon.socketmap_table).returncode == 0
    dns.stop()
    r = postmap.query("u@other.test", daemon.socketmap_table)
    assert r.returncode != 0 and "temporary error" in r.stderr


@pytest.mark.postfix
def test_onionmx_answer_form_by_one_config_line(daemon_factory, serve_dir, dns, postmap) -> None:
    cfg = write_config(serve_dir, dns.port, '[serve]\npostfix_answer = "onionmx"\n')
    d = daemon_factory("--config", str(cfg))
    assert postmap.query("a@pinned.test", d.tcp_table).stdout.strip() == f"smtptor:[{ONION_B}]"
    assert (postmap.query("a@port.test", d.socketmap_table).stdout.strip()
            == f"smtptor:[{ONION_C}]:2525")


@pytest.mark.postfix
def test_transport_name_flag(daemon_factory, serve_dir, dns, postmap) -> None:
    d = daemon_factory("--config", str(write_config(serve_dir, dns.port)), "--transport", "tor25")
    assert postmap.query("a@pinned.test", d.socketmap_table).stdout.strip() == (
        f"tor25:[{ONION_B}]:25")


@pytest.mark.postfix
def test_sighup_reloads_map_without_dropping_postfix_connection(daemon_factory, serve_dir, dns,
                                                                postmap) -> None:
    d = daemon_factory("--config", str(write_config(serve_dir, dns.port)), "-vv")
    # `postmap -q -` is one Postfix client that opens the map once and keeps the connection
    session = postmap.stdin_session(d.socketmap_table)
    try:
        session.stdin.write("a@pinned.test\n")
        session.stdin.flush()
        wait_log(d, "domain=pinned.test result=route")
        opened = d.log().count("socketmap: connection opened")
        (serve_dir / "map.txt").write_text(f"pinned.test {ONION_A}\nnew.test {ONION_C}\n")
        d.signal(signal.SIGHUP)
        wait_log(d, "reloaded configuration")
        session.stdin.write("a@pinned.test\nb@new.test\n")
        out, err = session.communicate(timeout=20)
    finally:
        session.kill()
    assert session.returncode == 0, err
    assert out.splitlines() == [
        f"a@pinned.test\ttorroute:[{ONION_B}]:25",
        f"a@pinned.test\ttorroute:[{ONION_A}]:25",
        f"b@new.test\ttorroute:[{ONION_C}]:25",
    ]
    # the connection survived SIGHUP: no new one was needed
    wait_log(d, "domain=new.test result=route")
    assert d.log().count("socketmap: connection opened") == opened
    assert d.proc.poll() is None


@pytest.mark.postfix
def test_broken_map_on_reload_keeps_old_answers(daemon, serve_dir, postmap) -> None:
    """A configuration that does not parse on SIGHUP: exactly one ERROR line naming the file
    and the mistake, no traceback, and the old answers stay."""
    daemon.expect_errors = True  # the one below, checked exactly
    cfg = serve_dir / "torroute.toml"
    cfg.write_text("[routing\nbroken")
    daemon.signal(signal.SIGHUP)
    log = wait_log(daemon, "reload failed")
    r = postmap.query("a@pinned.test", daemon.tcp_table)
    assert r.stdout.strip() == f"torroute:[{ONION_B}]:25"
    [error] = daemon.error_lines()
    assert error.startswith("torroute: ERROR torroute.daemon: reload failed, keeping the old "
                            f"configuration: config file {cfg}: Expected ']'"), log
    assert "(at line 1, column 9)" in error
    assert "Traceback" not in daemon.log()


@pytest.mark.postfix
@pytest.mark.parametrize("table", ["socketmap", "tcp"])
def test_daemon_restart_while_postfix_holds_connection(daemon, postmap, table: str) -> None:
    # Postfix keeps its map connection; after a daemon restart it must reconnect and get
    # answers again (not a stale "not found").
    t = daemon.socketmap_table if table == "socketmap" else daemon.tcp_table
    session = postmap.stdin_session(t)
    try:
        session.stdin.write("a@pinned.test\n")
        session.stdin.flush()
        wait_log(daemon, "domain=pinned.test result=route")
        assert daemon.stop() == 0  # SIGTERM: drains, closes the held connection, exits 0
        daemon.start()
        session.stdin.write("b@srv.test\n")
        out, err = session.communicate(timeout=30)
    finally:
        session.kill()
    assert session.returncode == 0, err
    assert out.splitlines() == [f"a@pinned.test\ttorroute:[{ONION_B}]:25",
                                f"b@srv.test\ttorroute:[{ONION_A}]:25"]


@pytest.mark.postfix
def test_lookup_while_daemon_down_is_an_error_not_notfound(daemon, postmap) -> None:
    daemon.stop()
    for table in (daemon.socketmap_table, daemon.tcp_table):
        r = postmap.query("a@pinned.test", table)
        assert r.returncode != 0 and r.stdout == "" and "fatal" in r.stderr


@pytest.mark.postfix
def test_real_postfix_survives_daemon_restart_and_defers_on_temp(daemon_factory, serve_dir, dns,
                                                                 postfix_factory,
                                                                 clear_sink) -> None:
    """A real Postfix instance (trivial-rewrite keeps its socketmap connection open)."""
    d = daemon_factory("--config", str(write_config(serve_dir, dns.port)),
                       "--socket-group", "postfix")
    pf = postfix_factory(d.socketmap_table)
    body = b"Subject: t\n\nhello\n"
    pf.submit("a@origin.test", ["u1@nosrv.test"], body)  # no route: Postfix's default route
    clear_sink.wait_for(1)
    d.wait_log("domain=nosrv.test result=noroute")
    assert d.stop() == 0  # Postfix still holds its connection to the old daemon
    d.start()
    pf.submit("a@origin.test", ["u2@other.test"], body)
    got = clear_sink.wait_for(2)
    assert sorted(m.rcpt_tos[0] for m in got) == ["u1@nosrv.test", "u2@other.test"]
    d.wait_log("domain=other.test result=noroute")
    # DNS down: TEMP -> smtpd answers 451 at RCPT (the client retries later); the mail never
    # takes the default (clear-net) route
    dns.stop()
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        pf.submit("a@origin.test", ["u3@unknown.test"], body)
    code, text = refused.value.recipients["u3@unknown.test"]
    assert code == 451 and b"4.3.0" in text and b"Temporary lookup failure" in text
    d.wait_log("domain=unknown.test result=tempfail")
    time.sleep(1)
    assert len(clear_sink.messages) == 2 and pf.queue() == []
