"""The examples of docs/api.rst, extracted from the .rst and run as written (one program, in
order, in a fresh process) against the private Tor network and a real dnsmasq, so the Python API
page cannot drift.  The only thing filled in is the configuration ``TORROUTE_CONFIG`` names:

    example.org   pinned (text map) to the session sink's onion
    example.net   _onion-mx._tcp SRV to the same onion
    example.com   no SRV record (NXDOMAIN): no onion route
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.docs import python_blocks
from support.e2e import SRV

from torroute.testing.dnsmasq import SrvRecord

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "api.rst"


def test_the_page_has_the_promised_examples() -> None:
    code = "\n".join(python_blocks(DOC.read_text()))
    for call in ("torroute.load_config(", "torroute.Router(", "router.route(",
                 "torroute.parse_onion(", "torroute.dial(", "torroute.open_connection(",
                 "torroute.resolve_automap(", "torroute.send_message(", "torroute.SMTP("):
        assert call in code, call


@pytest.mark.testnet
def test_api_examples_run_as_written(testnet, onion_sink, dnsmasq_factory,
                                     tmp_path: Path) -> None:
    onion = onion_sink.onion
    dns = dnsmasq_factory([SrvRecord(SRV + "example.net", onion, 25)],
                          local_domains=["test", "example.org", "example.net", "example.com"])
    (tmp_path / "pins.txt").write_text(f"example.org {onion}\n")
    cfg = tmp_path / "torroute.toml"
    cfg.write_text(f'[routing]\nmaps = ["pins.txt"]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                   f'[tor]\nsocks = "127.0.0.1:{testnet.socks_extended[1]}"\n'
                   f'dns = "127.0.0.1:{testnet.dns[1]}"\n')
    code = "\n".join(python_blocks(DOC.read_text()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORROUTE_CONFIG": str(cfg)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path, env=env)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    # routing: a pin, an SRV record, no record
    assert f"user@example.org: {onion}:25 from map {tmp_path / 'pins.txt'}:1" in out, out
    assert f"example.net: {onion}:25 from srv" in out, out
    assert "example.com: no onion route: no SRV record (NXDOMAIN)" in out, out
    assert "not an onion: 'mx.example.org' is not an .onion address" in out, out
    # the dialers reached the onion MX's greeting; tor mapped the onion into its network
    assert "greeting: 220\nasync greeting: 220\n" in out, out
    assert re.search(r"^virtual address: 127\.(19[2-9]|2[0-5]\d)\.\d+\.\d+$", out, re.M), out
    # send_message: per-recipient results, the unroutable one not sent
    assert re.search(r"^bob@example\.org: delivered 2\.0\.0 host \S+:25 said: 250 ", out, re.M)
    assert re.search(r"^carol@example\.net: delivered 2\.0\.0 ", out, re.M), out
    assert re.search(r"^dave@example\.com: bounced 5\.4\.4 no onion route for example\.com: "
                     r".*not sent \(torroute never uses the clear net\)$", out, re.M), out
    assert "smtplib refused: {}" in out, out
    assert "overrides: ('127.0.0.1', " in out and "config error: load_config: unknown " \
        "setting 'tor_sock'" in out, out
    # the path: both messages in the sink's Maildir with the envelopes the examples gave
    first, second = onion_sink.sink.wait_for(2)
    assert first.mail_from == "alice@origin.example"
    assert first.rcpt_tos == ["bob@example.org", "carol@example.net"]
    assert second.rcpt_tos == ["erin@example.org"]
    for got in (first, second):
        path = onion_sink.sink.path_of(got)
        assert path.is_file() and b"Subject: over tor" in path.read_bytes()
    assert len(onion_sink.sink.messages) == 2
