"""Test setup: torroute's pytest plugin (torroute.testing: tor, dnsmasq, sinks, testnet), every
tests/fixtures_*.py as a plugin (each area owns its fixtures), and the grouping rule.

The groups (directories) say what a test needs:

  unit/      pure code: no tor, no DNS server, no MTA, no testnet
  tor/       real local servers: tor in bridge mode, dnsmasq, NSD/unbound, the daemon -- no
             testnet, no MTA
  testnet/   the private Tor network (boots once per session), no MTA
  mta/       a real Postfix or Exim (and maybe tor or the testnet)

A test that uses a fixture of a heavier group than its directory fails at collection.  The
markers ``testnet``, ``postfix`` and ``exim`` are added from the fixtures a test uses, so
``-m "not testnet"`` or ``-m "not exim"`` select exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = sorted(
    f"fixtures_{p.stem[len('fixtures_'):]}" for p in Path(__file__).parent.glob("fixtures_*.py")
)

TOR = {"tor", "tor_factory", "control_tor_factory", "dnsmasq_factory", "silent_udp",
       "dnssec_lab", "dnssec_lab_factory", "daemon_factory"}
TESTNET = {"testnet", "onion_sink", "onion_sink_factory", "onion_mx", "mx_pair", "mxs",
           "stopped_onion", "silent_onion"}
POSTFIX = {"postfix_factory", "postmap", "postfix_smtpds"}
EXIM = {"exim_factory", "exim_plugin_factory", "debian_exim_factory", "exim_binary"}
#: group -> the fixtures its tests may not use
FORBIDDEN = {"unit": TOR | TESTNET | POSTFIX | EXIM, "tor": TESTNET | POSTFIX | EXIM,
             "testnet": POSTFIX | EXIM, "mta": set()}
TESTS = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    """Fail clearly when torroute's plugin is not there (a fresh clone before ``pip install``),
    unless it was turned off on purpose (``-p no:torroute``)."""
    manager = config.pluginmanager
    if manager.has_plugin("torroute") or manager.has_plugin("torroute.testing.pytest_plugin"):
        return
    if manager.is_blocked("torroute"):
        return  # -p no:torroute: the unit tests still run; the others lack their fixtures
    raise pytest.UsageError(
        "torroute's pytest plugin (entry point 'torroute' in group 'pytest11') is not "
        "registered: install this checkout into the test venv (scripts/install-deps.sh, or "
        "pip install --no-deps .), or run pytest with -p torroute.testing.pytest_plugin")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & POSTFIX:
            item.add_marker(pytest.mark.postfix)
        if used & EXIM:
            item.add_marker(pytest.mark.exim)
        if used & TESTNET:
            item.add_marker(pytest.mark.testnet)
        try:
            group = item.path.relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if used & FORBIDDEN.get(group, set()):
            wrong.append(f"{item.nodeid}: uses {sorted(used & FORBIDDEN[group])}")
    if wrong:
        raise pytest.UsageError("tests in the wrong group (see tests/conftest.py):\n"
                                + "\n".join(wrong))
