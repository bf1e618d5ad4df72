"""An operator's mistake in a map may delay mail; it must never send it over the clear net.

Against the real daemon and Postfix's own clients: a map that does not parse refuses the start
(exit 78, FILE:LINE) and, on SIGHUP, keeps the whole old configuration; a mistyped pin defers
its domain (TEMP) instead of answering "not found" (which makes Postfix use its default,
clear-net transport).
"""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.onions import ONION_A, ONION_B, ONION_C

from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port

SRV = "_onion-mx._tcp."
TORROUTE = [sys.executable, "-m", "torroute.cli"]
TYPO_A = ONION_A[:20] + ("a" if ONION_A[20] != "a" else "b") + ONION_A[21:]


def write_setup(directory: Path, dns_port: int, map_text: str) -> Path:
    (directory / "map.yml").write_text(map_text)
    cfg = directory / "torroute.toml"
    cfg.write_text(f"""
[routing]
maps = ["map.yml"]
nameservers = ["127.0.0.1:{dns_port}"]
dns_timeout = 1.0
""")
    return cfg


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(TORROUTE + list(args), capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})


@pytest.fixture
def dns(dnsmasq_factory):
    # every pinned domain here also has an SRV record: a broken pin must not fall through to it
    return dnsmasq_factory([SrvRecord(SRV + "pinned.test", ONION_C),
                            SrvRecord(SRV + "typo.test", ONION_C),
                            SrvRecord(SRV + "new.test", ONION_C)])


BROKEN_YAML = f"{ONION_A}:\n  - pinned.test\n  - 'new.test\n"


def test_route_refuses_a_map_that_does_not_parse(tmp_path: Path, dns) -> None:
    cfg = write_setup(tmp_path, dns.port, BROKEN_YAML)
    r = run("route", "--config", str(cfg), "u@pinned.test")
    assert r.returncode == 78, r
    assert r.stdout == ""
    [line] = r.stderr.splitlines()
    assert line.startswith(f"torroute: configuration error: {tmp_path / 'map.yml'}:3: YAML "
                           "syntax error")


def test_route_defers_a_mistyped_pin_with_file_and_line(tmp_path: Path, dns) -> None:
    cfg = write_setup(tmp_path, dns.port, f"{ONION_B}:\n  - pinned.test\n{TYPO_A}:\n"
                                          "  - typo.test\n")
    r = run("route", "--config", str(cfg), "--json", "u@typo.test")
    assert r.returncode == 75, r
    assert f'"reason": "invalid pin at {tmp_path / "map.yml"}:4: ' in r.stdout
    assert "checksum" in r.stdout
    assert run("route", "--config", str(cfg), "pinned.test").stdout.startswith(ONION_B)


def test_route_of_nothing_is_a_usage_error(tmp_path: Path, dns) -> None:
    cfg = write_setup(tmp_path, dns.port, f"{ONION_B}:\n  - pinned.test\n")
    for empty in ("", "  "):
        r = run("route", "--config", str(cfg), empty)
        assert r.returncode == 64 and "empty destination" in r.stderr, r


def test_serve_refuses_to_start_with_a_map_that_does_not_parse(serve_dir: Path, dns) -> None:
    cfg = write_setup(serve_dir, dns.port, f"{ONION_A}:\n  pinned.test: [\n")
    r = run("serve", "--config", str(cfg), "--tcp-table", f"inet:127.0.0.1:{free_port()}")
    assert r.returncode == 78, r
    assert f"{serve_dir / 'map.yml'}:" in r.stderr and "YAML syntax error" in r.stderr
    assert "Traceback" not in r.stderr
    assert "listening" not in r.stderr


@pytest.mark.postfix
def test_sighup_with_a_broken_map_keeps_the_old_pins(daemon_factory, serve_dir: Path, dns,
                                                     postmap) -> None:
    """The issue's reproduction: an unclosed quote appended, then SIGHUP."""
    good = f"{ONION_A}:\n  - pinned.test\n"
    d = daemon_factory("--config", str(write_setup(serve_dir, dns.port, good)))
    assert postmap.query("u@pinned.test", d.tcp_table).stdout.strip() == (
        f"torroute:[{ONION_A}]:25")
    (serve_dir / "map.yml").write_text(good + "  - 'new.test\n")
    d.expect_errors = True  # the one ERROR line below is the point of this test
    d.signal(signal.SIGHUP)
    log = d.wait_log("reload failed")
    [error] = [ln for ln in log.splitlines() if "ERROR" in ln]
    assert f"{serve_dir / 'map.yml'}:3: YAML syntax error" in error
    assert "old configuration" in error and "Traceback" not in log
    assert "reloaded configuration" not in log
    for table in (d.tcp_table, d.socketmap_table):
        r = postmap.query("u@pinned.test", table)
        assert (r.returncode, r.stdout.strip()) == (0, f"torroute:[{ONION_A}]:25"), r
        # new.test is not in the old configuration: its SRV answers, as before the reload
        assert postmap.query("u@new.test", table).stdout.strip() == f"torroute:[{ONION_C}]:25"
    # fixed: the next SIGHUP loads it
    (serve_dir / "map.yml").write_text(good + f"{ONION_B}:\n  - new.test\n")
    d.signal(signal.SIGHUP)
    d.wait_log("reloaded configuration")
    assert postmap.query("u@new.test", d.tcp_table).stdout.strip() == f"torroute:[{ONION_B}]:25"


@pytest.mark.postfix
def test_a_mistyped_pin_answers_temp_never_notfound(daemon_factory, serve_dir: Path, dns,
                                                    postmap) -> None:
    cfg = write_setup(serve_dir, dns.port, f"{ONION_A}:\n  - pinned.test\n{TYPO_A}:\n"
                                           "  - typo.test\n")
    d = daemon_factory("--config", str(cfg))
    for table in (d.tcp_table, d.socketmap_table):
        r = postmap.query("u@typo.test", table)
        assert r.returncode != 0 and r.stdout == "", r
        assert "query error" in r.stderr or "temporary" in r.stderr, r
    r = postmap.query("u@typo.test", d.socketmap_table)
    assert f"invalid pin at {serve_dir / 'map.yml'}:4" in r.stderr
    log = d.wait_log("domain=typo.test result=tempfail", count=2)
    assert "invalid pin" in log and "map.yml:4" in log


@pytest.mark.postfix
def test_real_postfix_defers_mail_for_a_mistyped_pin(daemon_factory, serve_dir: Path, dns,
                                                    postfix_factory, clear_sink) -> None:
    """Postfix's smtpd asks trivial-rewrite, which asks the daemon: TEMP -> 451 at RCPT; the
    message never reaches the default (clear-net) transport."""
    cfg = write_setup(serve_dir, dns.port, f"{TYPO_A}:\n  - typo.test\n")
    d = daemon_factory("--config", str(cfg), "--socket-group", "postfix")
    pf = postfix_factory(d.socketmap_table)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        pf.submit("a@origin.test", ["u@typo.test"], b"Subject: t\n\nhello\n")
    code, text = refused.value.recipients["u@typo.test"]
    assert code == 451 and b"4.3.0" in text
    d.wait_log("domain=typo.test result=tempfail")
    pf.submit("a@origin.test", ["u@nosrv.test"], b"Subject: t\n\nhello\n")  # control
    got = clear_sink.wait_for(1)
    time.sleep(1)
    assert [m.rcpt_tos for m in clear_sink.messages] == [["u@nosrv.test"]], got
