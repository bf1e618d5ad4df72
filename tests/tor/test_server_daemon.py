"""The daemon in-process: single-flight DNS under concurrency, settings, endpoints."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest
from support.onions import ONION_A, ONION_B

from torroute.config import Config, ConfigError, load_config
from torroute.daemon.service import LookupDaemon
from torroute.daemon.settings import ServeSettings
from torroute.endpoint import Endpoint
from torroute.protocols import tcptable
from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port


def settings(port: int, **kw) -> ServeSettings:
    return ServeSettings(listeners={"tcp_table": (Endpoint("inet", "127.0.0.1", port),)}, **kw)


async def ask(port: int, key: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(tcptable.encode_get(key))
    line = await reader.readline()
    writer.close()
    return line


def test_concurrent_lookups_of_one_domain_share_one_dns_query(dnsmasq_factory,
                                                              daemon_records) -> None:
    dns = dnsmasq_factory([SrvRecord(f"_onion-mx._tcp.d{i}.test", ONION_A) for i in range(5)])
    port = free_port()
    daemon = LookupDaemon(Config(nameservers=[dns.address], dns_timeout=2.0), settings(port))

    async def main() -> list[bytes]:
        await daemon.start()
        try:
            keys = [f"user{n}@d{n % 5}.test" for n in range(200)]
            return await asyncio.gather(*(ask(port, k) for k in keys))
        finally:
            await daemon.stop()

    answers = asyncio.run(main())
    assert set(answers) == {f"200 torroute:[{ONION_A}]:25\n".encode()}
    assert daemon.router.dns_queries == 5  # 200 concurrent lookups, 5 domains, 5 queries


def test_settings_from_config(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text("""
[serve]
socketmap = "unix:/run/torroute/socketmap.sock"
tcp_table = ["inet:127.0.0.1:10026", "inet:[::1]:10026"]
socket_mode = "0640"
socket_group = "postfix"
postfix_answer = "onionmx"
""")
    s = ServeSettings.from_config(load_config(cfg))
    assert s.listeners["socketmap"] == (Endpoint("unix", path="/run/torroute/socketmap.sock"),)
    assert [str(e) for e in s.listeners["tcp_table"]] == ["inet:127.0.0.1:10026",
                                                          "inet:[::1]:10026"]
    assert s.socket_mode == 0o640 and s.postfix_answer == "smtptor:[{onion}]{colon_port_unless_25}"
    for bad in ['tcp_table = "inet:10.0.0.1:25"', 'exim = "unix:relative"',
                'postfix_answer = "{onion} x"', "nonsense = 1", 'tcp_table = "inet:host:1"']:
        cfg.write_text(f"[serve]\n{bad}\n")
        with pytest.raises(ConfigError):
            ServeSettings.from_config(load_config(cfg))
    cfg.write_text('[serve]\ntcp_table = "inet:10.0.0.1:25"\nallow_remote = true\n')
    assert ServeSettings.from_config(load_config(cfg)).allow_remote


@pytest.mark.parametrize("text,loopback", [
    ("inet:127.0.0.1:1", True), ("inet:127.5.5.5:1", True), ("inet:[::1]:1", True),
    ("inet:localhost:1", True), ("inet:0.0.0.0:1", False), ("inet:example.org:1", False),
    ("unix:/x", True),
])
def test_endpoint_loopback(text: str, loopback: bool) -> None:
    assert Endpoint.parse(text).is_loopback() is loopback


def test_contrib_example_config_is_valid() -> None:
    repo = Path(__file__).resolve().parents[2]
    config = load_config(repo / "contrib" / "torroute.toml")
    s = ServeSettings.from_config(config)
    assert [str(e) for e in s.listeners["socketmap"]] == ["unix:/run/torroute/socketmap.sock"]
    assert [str(e) for e in s.listeners["exim"]] == ["unix:/run/torroute/exim.sock"]
    assert (s.socket_mode, s.socket_group, s.transport) == (0o660, "torroute", "torroute")
    assert (s.max_connections, s.lmtp_session_idle_timeout) == (4096, 10.0)
    assert config.tor_dns == ("127.0.0.1", 9053)
    unit = (repo / "contrib" / "torroute.service").read_text()
    assert "User=torroute" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_max_connections_and_bad_flags(tmp_path: Path, daemon_records) -> None:
    port = free_port()
    daemon = LookupDaemon(Config(), settings(port, max_connections=2))

    async def main() -> list[bytes]:
        await daemon.start()
        try:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await asyncio.sleep(0.05)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            refused = await reader.read()  # closed at once, nothing answered
            writer.close()
            for _, w in held:
                w.write(tcptable.encode_get("u@x.onion"))
            answers = [await r.readline() for r, _ in held]
            for _, w in held:
                w.close()
            return [refused, *answers]
        finally:
            await daemon.stop()

    refused, *answers = asyncio.run(main())
    assert refused == b""
    assert answers == [b"200 error:5.1.2%20invalid%20.onion%20address\n"] * 2
    overrides = {"socket_mode": "rw", "tcp_table": ["inet:127.0.0.1:1"]}
    with pytest.raises(ConfigError, match="not octal"):
        ServeSettings.from_config(Config(), overrides)


def test_reload_state_one_error_line_and_old_configuration_kept(tmp_path: Path,
                                                                daemon_records) -> None:
    """A reload that fails is one ERROR record naming the error (no traceback), keeps the old
    pins and is recorded in ``reload_state``; the next good one clears it."""
    from torroute.daemon.service import ReloadState

    (tmp_path / "map.txt").write_text(f"a.test {ONION_A}\n")
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[routing]\nmaps = ["{tmp_path / "map.txt"}"]\n')
    config = load_config(cfg)
    daemon = LookupDaemon(config, settings(free_port()), reload_config=lambda: load_config(cfg))
    assert daemon.reload_state.ok and daemon.reload_state.pinned == 1
    daemon_records.clear()
    daemon_records.expect_errors = True  # the one below, checked exactly
    cfg.write_text('[routing]\nmaps = "not a list"\nbogus = 1\n')
    assert daemon.reload() is False
    state = daemon.reload_state
    assert (state.ok, state.pinned) == (False, 1) and str(cfg) in state.message
    assert state.status() == (f"serving 1 pinned domains; last reload failed: {state.message}; "
                              "old configuration kept")
    [record] = [r for r in daemon_records.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == ("reload failed, keeping the old configuration: "
                                   f"{state.message}")
    assert record.exc_info is None and "\n" not in record.getMessage()
    assert daemon.quick_decision("u@a.test").onion == ONION_A  # the old pins answer
    (tmp_path / "map.txt").write_text(f"a.test {ONION_B}\nb.test {ONION_A}\n")
    cfg.write_text(f'[routing]\nmaps = ["{tmp_path / "map.txt"}"]\n')
    daemon_records.clear()
    assert daemon.reload() is True
    assert daemon.reload_state == ReloadState(True, daemon.reload_state.when, "reloaded", 2)
    assert daemon.reload_state.status() == "serving 2 pinned domains"
    assert [r.getMessage() for r in daemon_records.records if r.levelno >= logging.WARNING] == [
        "reloaded configuration: 2 pinned domains"]
    assert daemon.quick_decision("u@a.test").onion == ONION_B


def test_sd_notify_reaches_an_abstract_socket(monkeypatch) -> None:
    """NOTIFY_SOCKET may name an abstract socket ('@...'), as systemd's own does."""
    import os
    import socket

    from torroute.daemon.service import sd_notify

    name = f"torroute-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        sd_notify("READY=1\nSTATUS=serving 0 pinned domains")
        assert sock.recv(1024) == b"READY=1\nSTATUS=serving 0 pinned domains"
    monkeypatch.delenv("NOTIFY_SOCKET")
    sd_notify("READY=1")  # outside systemd: nothing, no error


def test_bad_deliver_section_binds_no_listener(tmp_path: Path, caplog) -> None:
    """`serve --socketmap ... --lmtp ...` with a broken [deliver]: a ConfigError naming the
    setting before anything is bound (the socketmap listener came first and used to be left
    bound, if only briefly, before the exit 78)."""
    port = free_port()
    cfg = tmp_path / "torroute.toml"
    cfg.write_text('[deliver]\nstarttls = "maybe"\n')
    config = load_config(cfg)
    overrides = {"tcp_table": [f"inet:127.0.0.1:{port}"],
                 "lmtp": [f"unix:{tmp_path}/lmtp.sock"]}
    daemon = LookupDaemon(config, ServeSettings.from_config(config, overrides))

    async def main() -> None:
        await daemon.start()

    caplog.set_level(logging.INFO, logger="torroute.daemon")
    with pytest.raises(ConfigError, match="starttls"):
        asyncio.run(main())
    assert daemon.servers == []
    assert [r.message for r in caplog.records if r.message.startswith("listening")] == []
    with socket.socket() as probe:  # nothing listens there
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert not (tmp_path / "lmtp.sock").exists()


def test_sighup_while_starting_is_held_until_started(tmp_path: Path, monkeypatch) -> None:
    """A SIGHUP that arrives while the daemon starts (its first sockets already answer, a side
    service still starting) used to kill it (SIGHUP's default action): now it is held and the
    reload runs once the daemon has started."""
    import os
    import signal as signals

    from torroute.daemon import service as service_module

    port = free_port()
    reloads: list[str] = []

    class HupWhileStarting:  # a side service that receives the SIGHUP during its own start
        async def start(self) -> None:
            os.kill(os.getpid(), signals.SIGHUP)
            await asyncio.sleep(0.2)
            reloads.append("started")

        async def stop(self) -> None:
            pass

    monkeypatch.setattr(service_module, "side_services",
                        lambda: [lambda daemon: HupWhileStarting()])

    def reload_config() -> Config:
        reloads.append("reload")
        return Config()

    daemon = LookupDaemon(Config(), settings(port), reload_config=reload_config)

    async def main() -> None:
        task = asyncio.create_task(service_module.run_daemon(daemon))
        while daemon.reload_state.message != "reloaded":
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signals.SIGTERM)
        await task

    asyncio.run(asyncio.wait_for(main(), 10))
    assert reloads == ["started", "reload"]
