"""`torroute map transport` output in the real MTAs: Postfix's postmap builds and answers it,
Postfix delivers over the private Tor network with it and no daemon, Exim looks it up
(lsearch, and cdb built by tinycdb's `cdb -c`)."""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest
from support.e2e import message
from support.onions import ONION_A, ONION_B
from support.pipe import TORROUTE
from support.postfix import POSTMAP

V2 = "wy6zk3pmcwiyhiao.onion"


def transport(*argv: str) -> subprocess.CompletedProcess:
    """The installed-style program (this checkout's `torroute`), as an admin runs it."""
    return subprocess.run([str(TORROUTE), "map", "transport", *argv], capture_output=True,
                          text=True, timeout=60)


def write_map(directory: Path) -> Path:
    path = directory / "map.yml"
    path.write_text(f"---\n{ONION_B}:\n  - b.example\n  - a.example\n{V2}:\n  - old.example\n"
                    f"{ONION_A}:\n  - c.example\n")
    return path


def test_postmap_builds_and_answers_the_transport_file(postmap, serve_dir: Path) -> None:
    r = transport("--transport", "torroute", "--port", "25", str(write_map(serve_dir)))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("warning:") == 1 and "old.example" in r.stderr
    table = serve_dir / "transport"
    table.write_text(r.stdout)
    built = subprocess.run([POSTMAP, "-c", str(postmap.confdir), f"hash:{table}"],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0 and built.stderr == "", built.stderr
    for domain, onion in (("a.example", ONION_B), ("b.example", ONION_B),
                          ("c.example", ONION_A)):
        q = postmap.query(domain, f"hash:{table}")
        assert (q.returncode, q.stdout) == (0, f"torroute:[{onion}]:25\n"), q.stderr
    for domain in ("old.example", "nothing.example"):
        q = postmap.query(domain, f"hash:{table}")
        assert q.returncode == 1 and q.stdout == "", (domain, q.stdout, q.stderr)


def test_static_table_delivers_over_tor_without_the_daemon(testnet, onion_mx, postfix_factory,
                                                           postfix_dir: Path,
                                                           clear_sink) -> None:
    """The no-daemon site: a postmapped table names the onion, the pipe dials it over tor."""
    m = postfix_dir / "map.txt"
    typo = ONION_A[:-13] + "aaaaaaa.onion"  # 56 characters, not a v3 address
    m.write_text(f"pinned.test {onion_mx.onion}\ntypo.test {typo}\n")
    r = transport("--transport", "torroute", "--port", "25", str(m))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("warning:") == 1 and f"{m}:2: deferred" in r.stderr, r.stderr
    assert f"typo.test   retry:4.3.5 invalid pin at {m}:2\n" in r.stdout
    table = postfix_dir / "transport"
    table.write_text(r.stdout)
    socks = testnet.socks_extended
    pf = postfix_factory(f"hash:{table}",
                         deliver_config=f'[tor]\nsocks = "{socks[0]}:{socks[1]}"\n')
    built = subprocess.run([POSTMAP, "-c", str(pf.confdir), f"hash:{table}"],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    pf.reload()
    pf.submit("alice@origin.test", ["user@pinned.test"], message("static", "user@pinned.test"))
    got = onion_mx.sink.wait_for(1, timeout=90)
    assert got[0].rcpt_tos == ["user@pinned.test"]
    pf.wait_empty(30)
    # the mistyped pin: Postfix's smtpd looks the transport up at RCPT and answers 450 4.3.5
    # with the FILE:LINE (the sender retries); never the usual (clear-net) route
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        pf.submit("alice@origin.test", ["user@typo.test"], message("typo", "user@typo.test"))
    code, text = refused.value.recipients["user@typo.test"]
    assert code == 450 and text.startswith(b"4.3.5 ") and f"invalid pin at {m}:2".encode() in text
    assert "relay=torroute" in pf.log() and "status=sent" in pf.log()
    assert clear_sink.messages == []


def test_exim_lsearch_and_cdb_lookups(exim_factory, serve_dir: Path) -> None:
    m = write_map(serve_dir)
    r = transport("--format", "exim", str(m))
    assert r.returncode == 0, r.stderr
    lsearch = serve_dir / "onions"
    lsearch.write_text(r.stdout)
    exim = exim_factory("dummy:\n  driver = redirect\n  data = :blackhole:\n")
    cdb_tool = shutil.which("cdb")
    if cdb_tool is None:
        pytest.fail("tinycdb's cdb missing: apt-get install tinycdb (scripts/install-deps.sh)")
    r = transport("--format", "cdbmake", str(m))
    assert r.returncode == 0, r.stderr
    cdb = serve_dir / "onions.cdb"
    made = subprocess.run([cdb_tool, "-c", str(cdb)], input=r.stdout, capture_output=True,
                          text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    for domain, onion in (("a.example", ONION_B), ("c.example", ONION_A)):
        for lookup in (f"lsearch{{{lsearch}}}", f"cdb{{{cdb}}}"):
            e = exim.expand(f"${{lookup{{{domain}}}{lookup}{{$value}}{{NONE}}}}")
            assert (e.returncode, e.stdout) == (0, f"{onion}\n"), e.stderr
    for domain in ("old.example", "nothing.example"):
        for lookup in (f"lsearch{{{lsearch}}}", f"cdb{{{cdb}}}"):
            e = exim.expand(f"${{lookup{{{domain}}}{lookup}{{$value}}{{NONE}}}}")
            assert (e.returncode, e.stdout) == (0, "NONE\n"), e.stderr
