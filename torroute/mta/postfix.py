"""`torroute postfix setup|check|remove`: the documented Postfix configuration, applied with
postconf(1) and undone exactly.

Why postconf and not our own main.cf editor: it is the tool Postfix admins trust, it keeps
comments and the layout, and it works on a configuration directory alone (``-c DIR``), with no
running or even checkable instance.  The plan is pure data computed from what ``postconf -n``
and ``postconf -M`` print (:func:`make_plan`); applying it runs ``postconf -e`` / ``-M`` and
writes a state file recording, for every parameter and service torroute set, the value before
and the value it set, plus byte copies of main.cf/master.cf taken before the first change.

Only three things are touched: ``transport_maps`` (torroute's socketmap prepended, so pins win;
every table already there is kept, in order), ``torroute_destination_recipient_limit`` (pipe
mode) and one master.cf service.  Nothing that decides where unknown domains go
(default_transport, relayhost, sender_dependent_*...) is ever changed: a domain the daemon does
not know keeps its old route.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError

POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
DEFAULT_CONFIG_DIR = "/etc/postfix"
DEFAULT_SOCKET = "unix:/run/torroute/socketmap.sock"
DEFAULT_PROGRAM = "/usr/bin/torroute"  # the Debian package's
DEFAULT_USER = "_torroute"  # the Debian package's system user
STATE_NAME = "torroute-postfix.json"
BACKUP_SUFFIX = ".torroute-backup"
FILES = ("main.cf", "master.cf")
PIPE_SERVICE = "torroute/unix"
LMTP_SERVICE = "torroute-lmtp/unix"
RECIPIENT_LIMIT = "torroute_destination_recipient_limit"
#: LMTP mode's main.cf settings for its transport (docs/postfix.rst, "Throughput and
#: fairness"): the daemon answers each onion its own nexthop (a link to its one socket,
#: daemon/lmtp_links.py), so these apply per onion: no slow start (the destination is our own
#: daemon), and at most lmtp_max_per_onion (48) agents for one onion -- never more than the
#: relay's per-onion gate takes, so a burst is queued by Postfix, not answered "busy", and a
#: slow onion leaves the other agents of the service's process limit (100) to the others
LMTP_PARAMETERS = {"torroute-lmtp_destination_concurrency_limit": "48",
                   "torroute-lmtp_initial_destination_concurrency": "48"}
#: parameters that decide the clear-net route of a domain torroute does not know: never touched
CLEAR_NET_PARAMETERS = ("default_transport", "relayhost", "relay_transport", "sender_dependent_"
                        "default_transport_maps", "sender_dependent_relayhost_maps",
                        "fallback_relay", "smtp_fallback_relay")


@dataclass(frozen=True)
class SetupOptions:
    """What to install: plain values (the CLI turns flags into these)."""

    mode: str = "pipe"  # "pipe" (torroute deliver) or "lmtp" (torroute serve --lmtp)
    socket: str = DEFAULT_SOCKET  # the daemon's socketmap listener, inet:HOST:PORT|unix:PATH
    program: str = DEFAULT_PROGRAM
    user: str = DEFAULT_USER  # pipe(8)'s user=: never root
    deliver_config: str = ""  # --config=FILE for `torroute deliver` ("" = its default)
    proxy: bool = True  # proxy: prefix (Debian's chrooted trivial-rewrite cannot see /run)

    def __post_init__(self) -> None:
        if self.mode not in ("pipe", "lmtp"):
            raise ConfigError(f"unknown mode {self.mode!r} (pipe or lmtp)")
        if not self.socket.startswith(("unix:", "inet:")) or len(self.socket) < 6:
            raise ConfigError(f"--socket {self.socket!r}: want unix:PATH or inet:HOST:PORT")
        if self.user in ("root", "0", ""):
            raise ConfigError("--user: pipe(8) must not run torroute deliver as root")
        if any(c.isspace() for c in self.program + self.deliver_config + self.socket):
            raise ConfigError("--program/--config/--socket: no whitespace (master.cf argv)")

    @property
    def table(self) -> str:
        return f"{'proxy:' if self.proxy else ''}socketmap:{self.socket}:transport"

    @property
    def service(self) -> str:
        return PIPE_SERVICE if self.mode == "pipe" else LMTP_SERVICE

    def service_entry(self) -> tuple[str, ...]:
        """The shipped plugins/postfix_pipe/master.cf (or master-lmtp.cf) entry, as fields."""
        if self.mode == "lmtp":
            return ("torroute-lmtp", "unix", "-", "-", "n", "-", "-", "lmtp")
        config = (f"--config={self.deliver_config}",) if self.deliver_config else ()
        return ("torroute", "unix", "-", "n", "n", "-", "-", "pipe", "flags=q",
                f"user={self.user}", "null_sender=", f"argv={self.program}", "deliver",
                *config, "--sender=${sender}", "--nexthop=${nexthop}", "--", "${recipient}")


# ---- parsing what postconf prints (pure)

def parse_postconf_n(text: str) -> dict[str, str]:
    """``postconf -n`` output -> {name: value}; ``config_directory`` (echoed by -c) left out."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, sep, value = line.partition(" =")
        if not sep or not name or " " in name:
            raise ValueError(f"unexpected postconf -n line: {line!r}")
        out[name] = value[1:] if value.startswith(" ") else value
    out.pop("config_directory", None)
    return out


def parse_unused(stderr: str) -> dict[str, str]:
    """postconf's ``warning: .../main.cf: unused parameter: name=value`` lines: ``-n`` hides a
    parameter no service uses (``torroute_destination_recipient_limit`` once the admin deleted
    the service), and drift must still see it."""
    out: dict[str, str] = {}
    for line in stderr.splitlines():
        _, sep, rest = line.partition("main.cf: unused parameter: ")
        name, eq, value = rest.partition("=")
        if sep and eq and name and " " not in name:
            out[name] = value
    return out


def parse_postconf_m(text: str) -> dict[str, tuple[str, ...]]:
    """``postconf -M`` output (one line per service) -> {"name/type": fields}."""
    out: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        fields = tuple(line.split())
        if not fields:
            continue
        if len(fields) < 8:
            raise ValueError(f"unexpected postconf -M line: {line!r}")
        out[f"{fields[0]}/{fields[1]}"] = fields
    return out


def split_maps(value: str) -> list[str]:
    """A Postfix table list (comma/space separated; ``{...}`` inline tables stay whole)."""
    tables: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        if depth == 0 and (char == "," or char.isspace()):
            if current:
                tables.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        tables.append("".join(current))
    return tables


def join_maps(tables: Sequence[str]) -> str:
    return ", ".join(tables)


# ---- the plan (pure)

@dataclass(frozen=True)
class Change:
    """One main.cf parameter or master.cf service: ``before`` None = not set."""

    kind: str  # "param" or "service"
    name: str
    before: str | None
    after: str | None

    def line(self, verb: str = "set", was: str = "was") -> str:
        where = "main.cf" if self.kind == "param" else "master.cf"
        if self.after is None:
            return f"{where}: {verb} {self.name} removed  ({was}: {self.before})"
        old = "not set" if self.before is None else self.before
        return f"{where}: {verb} {self.name} = {self.after}  ({was}: {old})"


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    adopted: tuple[str, ...] = ()  # edited by the admin since setup, recorded as they are now

    def __bool__(self) -> bool:
        return bool(self.changes)


def entry_text(fields: Sequence[str]) -> str:
    return " ".join(fields)


def wanted(options: SetupOptions, params: Mapping[str, str],
           replaces: Sequence[str] = ()) -> dict[str, str]:
    """The main.cf parameters torroute wants, given the current ones; ``replaces``: tables an
    earlier setup put there (another --socket), which go rather than stay behind ours."""
    ours = {options.table, *replaces}
    tables = [t for t in split_maps(params.get("transport_maps", "")) if t not in ours]
    out = {"transport_maps": join_maps([options.table, *tables])}
    if options.mode == "pipe":
        out[RECIPIENT_LIMIT] = "1"
    else:
        out.update(LMTP_PARAMETERS)
    return out


def make_plan(options: SetupOptions, params: Mapping[str, str],
              services: Mapping[str, Sequence[str]], replaces: Sequence[str] = ()) -> Plan:
    """What `setup` would change: nothing when the configuration is already as wanted."""
    changes: list[Change] = []
    entry = options.service_entry()
    current = services.get(options.service)
    if current is None or tuple(current) != entry:
        changes.append(Change("service", options.service,
                              None if current is None else entry_text(current),
                              entry_text(entry)))
    for name, value in wanted(options, params, replaces).items():
        if params.get(name) != value:
            changes.append(Change("param", name, params.get(name), value))
    return Plan(tuple(changes))


def conflicts(state: Mapping, params: Mapping[str, str],
              services: Mapping[str, Sequence[str]]) -> list[Change]:
    """What the admin changed since setup among what torroute set (before = torroute's value,
    after = now)."""
    out: list[Change] = []
    for change in state["changes"]:
        if change["kind"] == "param":
            now = params.get(change["name"])
        else:
            fields = services.get(change["name"])
            now = None if fields is None else entry_text(fields)
        if now != change["after"]:
            out.append(Change(change["kind"], change["name"], change["after"], now))
    return out


def earlier_tables(state: Mapping | None) -> tuple[str, ...]:
    """The socketmap table the recorded setup put in transport_maps."""
    return (SetupOptions(**state["options"]).table,) if state and state.get("options") else ()


def undo_value(state: Mapping, change: Mapping) -> str | None:
    """What `remove` puts back: the value before, except that transport_maps loses only
    torroute's table (tables the admin added since setup stay)."""
    if change["name"] != "transport_maps":
        return change["before"]
    table = SetupOptions(**state["options"]).table
    rest = [t for t in split_maps(change["after"] or "") if t != table]
    if not rest and change["before"] is None:
        return None
    return join_maps(rest) if rest != split_maps(change["before"] or "") else change["before"]


def conflict_diff(found: Sequence[Change]) -> str:
    """A unified diff: what torroute set (-) against what is there now (+)."""
    def lines(values: list[tuple[str, str | None]]) -> list[str]:
        return [f"{name} = {value}\n" for name, value in values if value is not None]
    ours = lines([(c.name, c.before) for c in found])
    now = lines([(c.name, c.after) for c in found])
    return "".join(difflib.unified_diff(ours, now, "set by torroute postfix setup",
                                        "now in the configuration"))


# ---- the configuration directory (postconf runs here)

@dataclass
class PostfixConfig:
    """One Postfix configuration directory, read and changed only through postconf(1)."""

    directory: Path = field(default_factory=lambda: Path(DEFAULT_CONFIG_DIR))
    postconf: str = POSTCONF

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        for name in FILES:
            if not (self.directory / name).is_file():
                raise ConfigError(f"{self.directory / name}: no such file (-c CONFIG_DIR?)")

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_NAME

    def _run(self, *args: str) -> str:
        return self._run_both(*args)[0]

    def _run_both(self, *args: str) -> tuple[str, str]:
        cmd = [self.postconf, "-c", str(self.directory), *args]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except OSError as exc:
            raise ConfigError(f"cannot run {self.postconf}: {exc}") from exc
        if result.returncode != 0:
            raise ConfigError(f"{' '.join(cmd)} failed ({result.returncode}): "
                              f"{result.stderr.strip()}")
        return result.stdout, result.stderr

    def params(self) -> dict[str, str]:
        out, err = self._run_both("-n")
        return {**parse_unused(err), **parse_postconf_n(out)}

    def services(self) -> dict[str, tuple[str, ...]]:
        return parse_postconf_m(self._run("-M"))

    def digests(self) -> dict[str, str]:
        return {name: hashlib.sha256((self.directory / name).read_bytes()).hexdigest()
                for name in FILES}

    def load_state(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.state_path}: unreadable ({exc})") from exc

    def _write_state(self, state: dict) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.state_path)

    def apply(self, changes: Sequence[Change]) -> None:
        """Services first: a ``<service>_destination_*`` parameter needs its service."""
        for c in sorted(changes, key=lambda c: c.kind != "service"):
            if c.kind == "service":
                if c.after is None:
                    self._run("-MX", c.name)
                else:
                    self._run("-M", f"{c.name}={c.after}")
        params = [c for c in changes if c.kind == "param"]
        if set_ := [f"{c.name}={c.after}" for c in params if c.after is not None]:
            self._run("-e", *set_)
        if unset := [c.name for c in params if c.after is None]:
            self._run("-X", *unset)

    def _apply_or_roll_back(self, changes: Sequence[Change]) -> None:
        """All or nothing: a postconf failing halfway (a full disk, a bad value) leaves the
        files as they were, so no half-done setup is ever taken for the original."""
        saved = {name: (self.directory / name).read_bytes() for name in FILES}
        try:
            self.apply(changes)
        except BaseException:
            for name, data in saved.items():
                tmp = self.directory / (name + ".torroute-tmp")
                tmp.write_bytes(data)
                shutil.copymode(self.directory / name, tmp)
                os.replace(tmp, self.directory / name)
            raise

    # ---- the three commands

    def plan(self, options: SetupOptions) -> Plan:
        return make_plan(options, self.params(), self.services(),
                         earlier_tables(self.load_state()))

    def setup(self, options: SetupOptions, dry_run: bool = False) -> Plan:
        """Apply the plan; back up main.cf/master.cf before the first change ever."""
        state = self.load_state()
        if state and state["options"]["mode"] != options.mode:
            raise ConfigError(f"{self.state_path}: set up in {state['options']['mode']} "
                              f"mode; run `torroute postfix remove` first")
        params, services = self.params(), self.services()
        plan = make_plan(options, params, services, earlier_tables(state))
        if dry_run:
            return plan
        if not plan:
            edited = conflicts(state, params, services) if state else []
            if edited:  # the admin's edits of what torroute set, still as torroute needs
                for record in state["changes"]:
                    for c in edited:
                        if (record["kind"], record["name"]) == (c.kind, c.name):
                            record["after"] = c.after
                state["digests"] = None
                self._write_state(state)
                return Plan((), tuple(c.name for c in edited))
            return plan
        first = state is None
        if state is None:
            for name in FILES:
                shutil.copy2(self.directory / name, self.directory / (name + BACKUP_SUFFIX))
            state = {"changes": [], "digests": self.digests()}
        elif state.get("digests") != self.digests():
            state["digests"] = None  # edited since: a byte restore would lose those edits
        try:
            self._apply_or_roll_back(plan.changes)
        except BaseException:
            if first:
                for name in FILES:
                    (self.directory / (name + BACKUP_SUFFIX)).unlink(missing_ok=True)
            raise
        earlier = {(c["kind"], c["name"]): c for c in state["changes"]}
        for c in plan.changes:
            before = earlier[(c.kind, c.name)]["before"] if (c.kind, c.name) in earlier \
                else c.before
            earlier[(c.kind, c.name)] = asdict(Change(c.kind, c.name, before, c.after))
        state["changes"] = list(earlier.values())
        state["options"] = asdict(options)
        if state["digests"] is not None:
            state["digests"] = self.digests()
        self._write_state(state)
        return plan

    def check(self, options: SetupOptions) -> list[str]:
        """One line per drift from what setup would leave (empty: clean)."""
        params, services = self.params(), self.services()
        state = self.load_state()
        plan = make_plan(options, params, services, earlier_tables(state))
        lines = [c.line("want", "now") for c in plan.changes]
        drifted = {c.name for c in plan.changes}
        for c in conflicts(state, params, services) if state else ():
            if c.name not in drifted:
                where = "main.cf" if c.kind == "param" else "master.cf"
                lines.append(f"{where}: {c.name} changed since setup: now {c.after}  "
                             f"(torroute set: {c.before}; remove refuses, setup adopts it)")
        return lines

    def remove(self, dry_run: bool = False) -> tuple[str, list[Change]]:
        """Undo setup: ("restored", []) byte copies back when nothing changed since; else
        ("reverted", changes) only torroute's values put back with postconf.  Raises
        :class:`RemoveRefused` when the admin changed what torroute set."""
        state = self.load_state()
        if state is None:
            return "not-set-up", []
        found = conflicts(state, self.params(), self.services())
        if found:
            raise RemoveRefused(found)
        undo = [Change(c["kind"], c["name"], c["after"], undo_value(state, c))
                for c in state["changes"]]
        if dry_run:
            return "dry-run", undo
        backups = [self.directory / (name + BACKUP_SUFFIX) for name in FILES]
        if state.get("digests") == self.digests() and all(b.is_file() for b in backups):
            for name, backup in zip(FILES, backups, strict=True):
                tmp = self.directory / (name + ".torroute-tmp")
                shutil.copy2(backup, tmp)
                os.replace(tmp, self.directory / name)
            how = "restored"
        else:
            self._apply_or_roll_back(undo)
            how = "reverted"
        for path in (*backups, self.state_path):
            path.unlink(missing_ok=True)
        return how, undo


class RemoveRefused(ConfigError):
    """The admin changed a parameter or service torroute set: undoing would lose that."""

    def __init__(self, found: Sequence[Change]) -> None:
        self.conflicts = list(found)
        names = ", ".join(c.name for c in found)
        super().__init__(f"changed since torroute postfix setup: {names}; not removing "
                         "(put them back or edit by hand)\n" + conflict_diff(found))
