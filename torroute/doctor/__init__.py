"""``torroute doctor``: every part of the onion mail path checked in data-path order, each
check one ok/warn/error line with why and fix (:mod:`.report` has the exit-status rule).

The doctor is made for a half-configured machine: no tor, no Postfix, no permission, a broken
file.  Each check catches its own failures and every probe has a deadline, so the doctor
never raises and never hangs (docs/operating/doctor.inc).
"""

from __future__ import annotations

from .checks import (
    AREAS,
    Facts,
    Options,
    check_config,
    check_daemon,
    check_exim,
    check_onion_mx,
    check_pins_dns,
    check_postfix,
    check_send_test,
    check_tor,
    guarded,
)
from .report import Check, Report, exit_status, warn

__all__ = ["AREAS", "Check", "Options", "Report", "exit_status", "run_doctor"]


def run_doctor(opts: Options) -> Report:
    """Read the configuration, then run every area not in ``opts.skip``; when the
    configuration does not load, each area says so in its own line."""
    report = Report()
    facts = Facts()
    # a safety net for a whole area (each probe has its own deadline): an area of many
    # probes (several onion services, many pins) must not be cut off by it
    budget = max(opts.timeout * 20, 60.0)
    report.add(guarded("config", lambda: check_config(opts, facts), budget))
    if facts.config is None:
        if not any(c.status == "error" for c in report.checks):
            report.add(warn("config", "the configuration did not load", "see above"))
        for area in AREAS:
            if area not in opts.skip and (area != "send-test" or opts.send_test):
                report.add(warn(area, "not checked: the configuration does not load",
                                "fix the config line first"))
        return report
    if "dns" not in opts.skip:
        report.add(guarded("pins-dns", lambda: check_pins_dns(opts, facts), budget))
    steps = [("tor", check_tor), ("daemon", check_daemon), ("postfix", check_postfix),
             ("exim", check_exim), ("onion-mx", check_onion_mx)]
    if opts.send_test:
        steps.append(("send-test", check_send_test))
    for area, fn in steps:
        if area in opts.skip:
            continue
        report.add(guarded(area, lambda fn=fn: fn(opts, facts), budget))
    return report
