"""The doctor's report: one :class:`Check` per line, and the one rule that turns them into an
exit status.

The rule (docs/operating/doctor.inc): an ``error`` caused by the setup (``temporary`` False:
a wrong setting, a missing service, an open relay) makes the exit status 78 (EX_CONFIG); else
an ``error`` that may pass by itself (``temporary`` True: tor not bootstrapped yet, the daemon
not answering, an onion unreachable now) makes it 75 (EX_TEMPFAIL); else 0.  A ``warn`` never
fails the run: it is worth reading, mail still flows.  Why misconfiguration wins: waiting
does not fix it, so monitoring must page for it even while tor is also still starting.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import exitcodes

OK, WARN, ERROR = "ok", "warn", "error"
STATUSES = (OK, WARN, ERROR)


@dataclass(frozen=True)
class Check:
    """One line of the doctor: what was checked, how it went, why, and how to fix it."""

    name: str
    status: str
    why: str
    fix: str = ""
    temporary: bool = False  # an error that may pass by itself (exit 75, not 78)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r}: not one of {', '.join(STATUSES)}")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "why": self.why, "fix": self.fix}

    def lines(self) -> list[str]:
        """The human form: ``status name: why`` and an indented ``fix:`` line."""
        out = [f"{self.status} {self.name}: {_one_line(self.why)}"]
        if self.fix and self.status != OK:
            out.append(f"    fix: {_one_line(self.fix)}")
        return out


def ok(name: str, why: str) -> Check:
    return Check(name, OK, why)


def warn(name: str, why: str, fix: str) -> Check:
    return Check(name, WARN, why, fix)


def error(name: str, why: str, fix: str, temporary: bool = False) -> Check:
    return Check(name, ERROR, why, fix, temporary)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def exit_status(checks: Iterable[Check]) -> int:
    """78 if any error is a misconfiguration, else 75 if any error is temporary, else 0."""
    errors = [c for c in checks if c.status == ERROR]
    if any(not c.temporary for c in errors):
        return exitcodes.CONFIG
    if errors:
        return exitcodes.TEMPFAIL
    return exitcodes.OK


@dataclass
class Report:
    """Every check in data-path order."""

    checks: list[Check] = field(default_factory=list)

    def add(self, checks: Check | Iterable[Check]) -> None:
        if isinstance(checks, Check):
            self.checks.append(checks)
        else:
            self.checks.extend(checks)

    @property
    def ok(self) -> bool:
        return not any(c.status == ERROR for c in self.checks)

    @property
    def exit_status(self) -> int:
        return exit_status(self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "exit": self.exit_status,
                "checks": [c.to_dict() for c in self.checks]}

    def text(self) -> str:
        lines = [line for c in self.checks for line in c.lines()]
        counts = {s: sum(c.status == s for c in self.checks) for s in STATUSES}
        lines.append(f"{counts[OK]} ok, {counts[WARN]} warn, {counts[ERROR]} error: exit "
                     f"{self.exit_status}")
        return "\n".join(lines) + "\n"
