"""Option groups: each subcommand lists and accepts only the flags it uses (issue 11).

Real processes (``python -m torroute.cli``), no mocks: --help text, exit statuses, and which
modules a fresh interpreter imports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.onions import ONION_B

TORROUTE = [sys.executable, "-m", "torroute.cli"]
REPO = Path(__file__).resolve().parents[2]

ROUTING = ["--map", "--nameserver", "--local-domain", "--ignore-domain", "--require-dnssec",
           "--dns-timeout"]
TOR = ["--tor-socks", "--tor-dns", "--tor-control"]
GLOBAL = ["--config", "--verbose"]
EVERY = GLOBAL + ROUTING + TOR

#: command -> (option group headings, the shared flags it takes)
EXPECTED: dict[tuple[str, ...], tuple[set[str], list[str]]] = {
    ("route",): ({"global", "routing", "tor"}, EVERY),
    ("serve",): ({"global", "routing", "tor", "serve"}, EVERY),
    ("resolve",): ({"global", "tor"}, GLOBAL + TOR),
    ("dial",): ({"global", "tor"}, GLOBAL + TOR),
    ("deliver",): ({"global", "routing", "tor", "deliver"}, GLOBAL + ROUTING + ["--tor-socks"]),
    ("send",): ({"global", "routing", "tor", "sendmail", "send"},
                GLOBAL + ROUTING + ["--tor-socks"]),
    ("sink",): ({"global", "tor", "sink"}, GLOBAL + ["--tor-control"]),
    ("proxy",): ({"global", "routing", "tor", "proxy"}, GLOBAL + ROUTING + ["--tor-socks"]),
    ("torrc",): ({"global", "tor"}, GLOBAL + ["--tor-socks", "--tor-dns"]),
    ("tor", "status"): ({"global", "tor", "control"}, GLOBAL + TOR),
    ("tor", "ensure"): ({"global", "tor", "control"}, GLOBAL + TOR),
    ("onion", "create"): ({"global", "tor", "control"}, GLOBAL + TOR),
    ("onion", "list"): ({"global", "tor", "control"}, GLOBAL + TOR),
    ("testnet",): (set(), []),
    ("testnet", "up"): (set(), []),
}


def run(*args: str, env: dict[str, str] | None = None, stdin: str = ""
        ) -> subprocess.CompletedProcess:
    return subprocess.run(TORROUTE + list(args), capture_output=True, text=True, timeout=60,
                          input=stdin, cwd=REPO, env={"PATH": "/usr/bin:/bin", **(env or {})})


def headings(text: str) -> set[str]:
    """The '<name> options:' sections of a --help text, without argparse's own 'options'."""
    return {line.split()[0] for line in text.splitlines()
            if line.endswith(" options:") and not line.startswith(" ")}


@pytest.mark.parametrize("command", list(EXPECTED), ids=" ".join)
def test_help_lists_exactly_the_groups_a_command_uses(command: tuple[str, ...]) -> None:
    groups, flags = EXPECTED[command]
    r = run(*command, "--help")
    assert r.returncode == 0, r.stderr
    assert headings(r.stdout) == groups, r.stdout
    words = set(r.stdout.replace(",", " ").replace("[", " ").replace("]", " ").split())
    for flag in EVERY:
        assert (flag in words) == (flag in flags), (command, flag, r.stdout)


@pytest.mark.parametrize("command, flag", [
    (("testnet", "status"), "--map=x"),
    (("testnet", "status"), "--config=x"),
    (("torrc",), "--map=x"),
    (("torrc",), "--tor-control=unix:/x"),
    (("resolve", ONION_B), "--nameserver=127.0.0.1:53"),
    (("dial", "127.0.0.1", "25"), "--local-domain=example.org"),
    (("tor", "status"), "--require-dnssec"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else v)
def test_a_flag_a_command_does_not_use_is_a_usage_error(command: tuple[str, ...],
                                                        flag: str) -> None:
    r = run(*command, flag)
    assert r.returncode == 64, (r.returncode, r.stderr)
    assert "unrecognized arguments" in r.stderr or "error" in r.stderr


@pytest.mark.parametrize("flag", ["--tor-dns=127.0.0.1:9053", "--tor-control=unix:/x"])
def test_deliver_defers_on_a_flag_it_does_not_use(flag: str) -> None:
    """pipe(8) bounces on 64: an unused flag in master.cf must defer with a 4.3.5 line."""
    r = run("deliver", flag, "--sender=a@origin.test", f"--nexthop=[{ONION_B}]:25", "--",
            "bob@example.test", stdin="Subject: x\n\nx\n")
    assert r.returncode == 75, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.startswith("4.3.5 ") and "unrecognized arguments" in r.stdout


def bad_config(tmp_path: Path) -> Path:
    """A file any command that reads it reports: proof the command read *this* file."""
    cfg = tmp_path / "marked.toml"
    cfg.write_text('[tor]\nsocks = "no-port-marker"\n')
    return cfg


def test_config_after_the_command_name_and_torroute_config(tmp_path: Path) -> None:
    cfg = bad_config(tmp_path)
    for how in ("flag", "env"):
        args = ["--config", str(cfg)] if how == "flag" else []
        env = {"TORROUTE_CONFIG": str(cfg)} if how == "env" else {}
        route = run("route", *args, "example.org", env=env)
        assert route.returncode == 78 and "no-port-marker" in route.stderr, (how, route.stderr)
        serve = run("serve", *args, "--socketmap", "inet:127.0.0.1:1", env=env)
        assert serve.returncode == 78 and "no-port-marker" in serve.stderr, (how, serve.stderr)
        deliver = run("deliver", *args, "--sender=a@origin.test", f"--nexthop=[{ONION_B}]:25",
                      "--", "bob@example.test", env=env, stdin="Subject: x\n\nx\n")
        assert deliver.returncode == 75, (how, deliver.stdout)
        assert deliver.stdout.startswith("4.3.5 ") and "no-port-marker" in deliver.stdout


def test_flags_still_win_over_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text('[tor]\nsocks = "127.0.0.1:9050"\n')
    r = run("route", "--config", str(cfg), "--tor-socks", "flag-marker", "example.org")
    assert r.returncode == 78 and "--tor-socks" in r.stderr and "flag-marker" in r.stderr


def test_library_modules_do_not_import_argparse() -> None:
    code = ("import sys; import torroute.config, torroute.daemon.service, torroute.delivery.pipe, "
            "torroute.routing.router; print('argparse' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_library_signatures_take_plain_overrides() -> None:
    """No Namespace in the library: plain dicts for the settings, plain kwargs for config."""
    from torroute.config import Config
    from torroute.daemon.settings import ServeSettings
    from torroute.delivery.settings import DeliverSettings

    s = ServeSettings.from_config(Config(), {"socketmap": ["inet:127.0.0.1:1"],
                                             "transport": "tr"})
    assert [str(e) for e in s.listeners["socketmap"]] == ["inet:127.0.0.1:1"]
    assert s.transport == "tr"
    d = DeliverSettings.from_config(Config(), {"ehlo_name": "mx.test", "pipelining": None})
    assert d.ehlo_name == "mx.test" and d.pipelining is True
