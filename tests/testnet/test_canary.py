"""Canaries of `torroute serve` ([serve] canary) against the private Tor network: a live onion
sink is up, the same onion with its SMTP server stopped is down with tor's reason; the
transitions are logged once each."""

from __future__ import annotations

import time

import pytest
from support.daemon import wait_socket


@pytest.mark.testnet
def test_canary_up_then_down_with_reason(testnet, onion_sink_factory, dnsmasq_factory,
                                         daemon_factory, serve_dir) -> None:
    item = onion_sink_factory()
    target = f"{item.onion}:{item.port}"
    cfg = serve_dir / "torroute.toml"
    cfg.write_text(f'[routing]\nnameservers = ["127.0.0.1:{dnsmasq_factory([]).port}"]\n'
                   f'[tor]\nsocks = "127.0.0.1:{testnet.socks_extended[1]}"\n'
                   f'control = "inet:127.0.0.1:{testnet.control[1]}"\n'
                   f'[serve]\ncanary = ["{target}"]\ncanary_interval = 1\n'
                   f'canary_timeout = 30\n')
    sock = serve_dir / "lmtp.sock"
    daemon = daemon_factory("--config", str(cfg), "--lmtp", f"unix:{sock}")
    wait_socket(str(sock), proc=daemon.proc)
    log = daemon.wait_log(f"health: canary {target} up (220 banner in ", timeout=60)
    assert f"health: canary {target} down" not in log
    # the canary read the banner and said QUIT: the sink saw sessions but no message
    assert not item.sink.messages
    item.sink.stop()  # the onion stays published; its SMTP port is closed now
    log = daemon.wait_log(f"health: canary {target} down (", timeout=60)
    down = [ln for ln in log.splitlines() if f"health: canary {target} down (" in ln]
    assert len(down) == 1, down
    # what tor's client answers when the onion's port leads nowhere: 0x01 (the service's
    # RELAY_END), class "other" -- not a path failure
    assert "down (other, " in down[0] and "(SOCKS reply 0x01)" in down[0], down[0]
    # a closed port is the MX's doing, not tor's client: never a NEWNYM
    assert "NEWNYM" not in log
    # later checks (every second) fail too, and are not logged again: one line per transition
    time.sleep(3)
    log = daemon.log()
    assert log.count(f"health: canary {target} down") == 1
    assert log.count(f"health: canary {target} up") == 1
    assert "health: tor's control port" not in log  # it answered: bootstrap known
    assert daemon.stop() == 0
    daemon.check_log()


def test_a_bad_canary_refuses_start_and_reload_keeps_the_old(daemon_factory, serve_dir,
                                                             dnsmasq_factory) -> None:
    """`serve` with a canary that is no v3 onion exits 78 naming the setting; the same
    mistake in a reload is one ERROR line and the old configuration keeps serving."""
    import signal
    import subprocess
    import sys

    from support.paths import REPO

    cfg = serve_dir / "torroute.toml"
    base = f'[routing]\nnameservers = ["127.0.0.1:{dnsmasq_factory([]).port}"]\n[serve]\n'
    cfg.write_text(base + 'canary = ["mx.example.onion"]\n')
    proc = subprocess.run([sys.executable, "-m", "torroute.cli", "serve", "--config", str(cfg),
                           "--lmtp", f"unix:{serve_dir / 'l.sock'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 78, proc
    assert "serve.canary: canary 'mx.example.onion'" in proc.stderr, proc.stderr
    cfg.write_text(base + "heal = false\n")
    daemon = daemon_factory("--config", str(cfg))
    cfg.write_text(base + 'canary = ["mx.example.onion:25"]\n')
    daemon.signal(signal.SIGHUP)
    log = daemon.wait_log("reload failed, keeping the old configuration: serve.canary: ")
    assert "health: canary" not in log
    daemon.expect_errors = True
    assert daemon.error_lines() == [ln for ln in log.splitlines() if "reload failed" in ln]
    assert daemon.stop() == 0
