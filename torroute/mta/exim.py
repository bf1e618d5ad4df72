"""``torroute exim setup|remove``: torroute's Exim plugin in a Debian exim4 configuration.

What setup changes, and nothing else:

* split config (``dc_use_split_config='true'``): the plugin's three files into
  ``CONFDIR/conf.d/{main,router,transport}/``;
* non-split config: the three files into ``CONFDIR/torroute/`` and three marked ``.include``
  lines into ``CONFDIR/exim4.conf.template``: the macros after Debian's
  ``main/01_exim4-config_listmacrosdefs`` (where split mode sorts them, after local macros and
  ``domainlist local_domains``), the router before ``router/200_exim4-config_primary``, the
  transport after ``begin transports``;
* ``torroute.pl`` into the Perl directory (the macros' default ``TORROUTE_PERL_SCRIPT``);

then runs ``update-exim4.conf`` (a failure there undoes the setup).  Everything it replaces is
backed up and everything it installs is recorded, with a copy, under
``CONFDIR/torroute/setup/`` (the state): so ``remove`` restores the configuration byte for byte
when nothing else changed, keeps the admin's other template edits, and refuses -- with a diff,
changing nothing -- when the admin edited what torroute installed.  ``setup`` twice changes
nothing the second time; after a torroute upgrade it replaces the files it installed if the
admin did not edit them, and refuses like ``remove`` if they did.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

__all__ = ["EximSetup", "SetupResult", "find_plugin_dir", "DEFAULT_CONFDIR", "DEFAULT_PERL_DIR"]

DEFAULT_CONFDIR = Path("/etc/exim4")
DEFAULT_PERL_DIR = Path("/usr/local/share/torroute/exim")  # the macros' TORROUTE_PERL_SCRIPT
#: plugin file -> conf.d section (and the non-split template anchor it goes to)
PLUGIN_FILES = (("main", "01_torroute_macros"), ("router", "190_torroute"),
                ("transport", "30_torroute"))
MARK = "# torroute exim setup added the next line (torroute exim remove removes it)"
ANCHORS = {  # non-split: where each .include goes (after=True: after the anchor line)
    "01_torroute_macros": (re.compile(r"^### end main/01_exim4-config_listmacrosdefs\s*$"), True),
    "190_torroute": (re.compile(r"^### router/200_exim4-config_primary\s*$"), False),
    "30_torroute": (re.compile(r"^begin transports\s*$"), True),
}
STATE_VERSION = 1


@dataclass
class SetupResult:
    changed: bool
    messages: list[str] = field(default_factory=list)


def find_plugin_dir() -> Path:
    """The plugin's files: a source checkout's plugins/exim_perl, else the package's copy."""
    here = Path(__file__).resolve().parents[2] / "plugins" / "exim_perl"
    for candidate in (here, Path("/usr/share/torroute/exim_perl"),
                      Path("/usr/share/torroute/plugins/exim_perl")):
        if (candidate / "conf.d" / "router" / "190_torroute").is_file():
            return candidate
    raise ConfigError("torroute's Exim plugin files (exim_perl/conf.d) are not installed; "
                      "give --plugin-dir")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _diff(old: bytes, new: bytes, old_name: str, new_name: str) -> str:
    lines = difflib.unified_diff(old.decode("utf-8", "replace").splitlines(True),
                                 new.decode("utf-8", "replace").splitlines(True),
                                 old_name, new_name)
    return "".join(lines)


@dataclass
class EximSetup:
    """One Debian exim4 configuration directory and what torroute puts into it.

    ``update_command``: the ``update-exim4.conf`` argv to run after a change (``--confdir``
    is added), or None not to run it."""

    confdir: Path = DEFAULT_CONFDIR
    plugin_dir: Path | None = None
    perl_dir: Path = DEFAULT_PERL_DIR
    split: bool | None = None  # None: dc_use_split_config of update-exim4.conf.conf
    update_command: list[str] | None = field(default_factory=lambda: ["update-exim4.conf"])

    def __post_init__(self) -> None:
        self.confdir = Path(self.confdir)
        self.perl_dir = Path(self.perl_dir)
        self.plugin_dir = Path(self.plugin_dir) if self.plugin_dir else find_plugin_dir()

    # -- paths ---------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.confdir / "torroute" / "setup"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def template(self) -> Path:
        return self.confdir / "exim4.conf.template"

    def detect_split(self) -> bool:
        if self.split is not None:
            return self.split
        conf = self.confdir / "update-exim4.conf.conf"
        try:
            text = conf.read_text()
        except OSError as exc:
            raise ConfigError(f"{conf}: {exc.strerror or exc} (give --split or --non-split)"
                              ) from None
        return bool(re.search(r"^dc_use_split_config=['\"]?true", text, re.M))

    def _targets(self, split: bool) -> dict[Path, bytes]:
        """Every file setup installs -> its content."""
        assert self.plugin_dir is not None
        files: dict[Path, bytes] = {}
        for section, name in PLUGIN_FILES:
            source = self.plugin_dir / "conf.d" / section / name
            dest = (self.confdir / "conf.d" / section / name if split
                    else self.confdir / "torroute" / name)
            files[dest] = source.read_bytes()
        files[self.perl_dir / "torroute.pl"] = (self.plugin_dir / "torroute.pl").read_bytes()
        return files

    def _include_lines(self) -> dict[str, str]:
        return {name: f".include {self.confdir / 'torroute' / name}" for _, name in PLUGIN_FILES}

    def edited_template(self, text: str) -> str:
        """``text`` with torroute's marked .include lines at the anchors (ConfigError naming
        a missing anchor: add the lines by hand then, see docs/exim.rst)."""
        lines = text.splitlines(True)
        out: list[str] = []
        placed: set[str] = set()
        includes = self._include_lines()
        for line in lines:
            for name, (rx, after) in ANCHORS.items():
                if name not in placed and not after and rx.match(line):
                    out += [MARK + "\n", includes[name] + "\n"]
                    placed.add(name)
            out.append(line if line.endswith("\n") else line + "\n")
            for name, (rx, after) in ANCHORS.items():
                if name not in placed and after and rx.match(line):
                    out += [MARK + "\n", includes[name] + "\n"]
                    placed.add(name)
        missing = [ANCHORS[n][0].pattern for n in ANCHORS if n not in placed]
        if missing:
            raise ConfigError(f"{self.template}: no line matching {', '.join(missing)}: not "
                              "Debian's template? add the .include lines by hand "
                              "(docs/exim.rst)")
        if not text.endswith("\n") and text:
            out[-1] = out[-1][:-1]
        return "".join(out)

    @staticmethod
    def strip_marked(text: str) -> tuple[str, int]:
        """``text`` without the marked pairs; how many pairs were removed."""
        lines = text.splitlines(True)
        out, count, skip = [], 0, False
        for line in lines:
            if skip:
                skip = False
                if line.startswith(".include "):
                    count += 1
                    continue
            if line.rstrip("\n") == MARK:
                skip = True
                continue
            out.append(line)
        return "".join(out), count

    # -- state -----------------------------------------------------------------------------
    def _load_state(self) -> dict | None:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.state_file}: unreadable setup state: {exc}") from None
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"{self.state_file}: unknown state version {state.get('version')}")
        return state

    def _save_state(self, state: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.state_file)

    def _installed_copy(self, index: int) -> Path:
        return self.state_dir / "installed" / str(index)

    # -- setup -----------------------------------------------------------------------------
    def setup(self) -> SetupResult:
        split = self.detect_split()
        mode = "split" if split else "nonsplit"
        if split and not (self.confdir / "conf.d").is_dir():
            raise ConfigError(f"{self.confdir}/conf.d: no such directory (split config)")
        if not split and not self.template.is_file():
            raise ConfigError(f"{self.template}: no such file (non-split config)")
        state = self._load_state()
        if state is not None:
            if state["mode"] != mode:
                raise ConfigError(f"{self.confdir}: torroute was set up for the {state['mode']} "
                                  f"config; the config is now {mode}: run torroute exim remove "
                                  "first")
            self._check_unedited(state)
            if self._up_to_date(state, split):
                return SetupResult(False, [f"torroute is already set up in {self.confdir} "
                                           f"({mode} config): nothing changed"])
            self._undo(state)  # unedited, outdated: replace with this version's files
        messages = self._install(split)
        self._update("setup")
        return SetupResult(True, messages)

    def _up_to_date(self, state: dict, split: bool) -> bool:
        wanted = {str(p): _sha(data) for p, data in self._targets(split).items()}
        recorded = {f["path"]: f["sha256"] for f in state["files"]}
        if wanted != recorded:
            return False
        if split:
            return True
        return self.template.read_bytes() == self._template_after(state)

    def _template_after(self, state: dict) -> bytes:
        backup = self.state_dir / "backup" / "exim4.conf.template"
        return self.edited_template(backup.read_text()).encode()

    def _install(self, split: bool) -> list[str]:
        state: dict = {"version": STATE_VERSION, "mode": "split" if split else "nonsplit",
                       "confdir": str(self.confdir), "files": [], "created_dirs": []}
        created_dirs: list[Path] = []
        torroute_dir = self.confdir / "torroute"
        edited = b""
        if not split:  # before anything is written: a template without the anchors refuses
            original = self.template.read_bytes()
            edited = self.edited_template(original.decode("utf-8", "surrogateescape")
                                          ).encode("utf-8", "surrogateescape")
        if not torroute_dir.exists():
            created_dirs.append(torroute_dir)
        (self.state_dir / "backup").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "installed").mkdir(parents=True, exist_ok=True)
        try:
            for index, (dest, data) in enumerate(self._targets(split).items()):
                entry = {"path": str(dest), "sha256": _sha(data), "backup": None}
                for parent in reversed(dest.parents):
                    if not parent.exists():
                        created_dirs.append(parent)
                        parent.mkdir(mode=0o755)
                if dest.exists():
                    backup = self.state_dir / "backup" / f"file-{index}"
                    shutil.copy2(dest, backup)
                    entry["backup"] = backup.name
                _write(dest, data, 0o644)
                shutil.copyfile(dest, self._installed_copy(index))
                state["files"].append(entry)
            if not split:
                shutil.copy2(self.template, self.state_dir / "backup" / "exim4.conf.template")
                state["template_sha256"] = _sha(edited)
                _write_in_place(self.template, edited)
            state["created_dirs"] = [str(d) for d in created_dirs if d != torroute_dir]
            state["created_torroute_dir"] = torroute_dir in created_dirs
            self._save_state(state)
        except BaseException:
            state["created_dirs"] = [str(d) for d in created_dirs if d != torroute_dir]
            state["created_torroute_dir"] = torroute_dir in created_dirs
            self._undo(state, partial=True)
            raise
        where = (f"{self.confdir}/conf.d/{{main,router,transport}}" if split
                 else f"{self.confdir}/torroute and 3 .include lines in {self.template}")
        return [f"torroute set up in {self.confdir} ({state['mode']} config): {where}; "
                f"torroute.pl in {self.perl_dir}"]

    # -- remove ------------------------------------------------------------------------------
    def remove(self) -> SetupResult:
        state = self._load_state()
        if state is None:
            return SetupResult(False, [f"torroute is not set up in {self.confdir} (no "
                                       f"{self.state_file}): nothing to remove"])
        self._check_unedited(state)
        messages = self._undo(state)
        self._update("remove")
        return SetupResult(True, messages + [f"torroute removed from {self.confdir}"])

    def _check_unedited(self, state: dict) -> None:
        """Refuse (ConfigError with diffs) when the admin edited what torroute installed."""
        problems = []
        for index, entry in enumerate(state["files"]):
            path = Path(entry["path"])
            installed = self._installed_copy(index)
            current = path.read_bytes() if path.exists() else b""
            if not path.exists() or _sha(current) != entry["sha256"]:
                original = installed.read_bytes() if installed.exists() else b""
                what = "deleted" if not path.exists() else "edited"
                problems.append(f"{path} was {what} since torroute installed it:\n"
                                + _diff(original, current, f"{path} (installed by torroute)",
                                        f"{path} (now)"))
        if state["mode"] == "nonsplit":
            text = self.template.read_text(errors="surrogateescape") \
                if self.template.exists() else ""
            _, pairs = self.strip_marked(text)
            wanted = set(self._include_lines().values())
            present = {ln for ln in text.splitlines() if ln in wanted}
            if _sha(text.encode(errors="surrogateescape")) != state["template_sha256"] and (
                    pairs != len(wanted) or present != wanted):
                expected = self._template_after(state)
                problems.append(f"torroute's lines in {self.template} were edited:\n"
                                + _diff(expected, text.encode(errors="surrogateescape"),
                                        f"{self.template} (after torroute exim setup)",
                                        f"{self.template} (now)"))
        if problems:
            raise ConfigError("refusing: the admin changed what torroute installed; undo those "
                              "changes or remove torroute's parts by hand (docs/exim.rst):\n"
                              + "\n".join(problems))

    def _undo(self, state: dict, partial: bool = False) -> list[str]:
        messages = []
        backups = self.state_dir / "backup"
        for entry in state.get("files", []):
            path = Path(entry["path"])
            if entry.get("backup"):
                shutil.copy2(backups / entry["backup"], path)
            else:
                path.unlink(missing_ok=True)
        saved = backups / "exim4.conf.template"
        if state.get("mode") == "nonsplit" and "template_sha256" in state or (
                partial and saved.exists()):
            current = self.template.read_bytes()
            if _sha(current) == state.get("template_sha256") or partial:
                _write_in_place(self.template, saved.read_bytes())
            else:  # the admin edited elsewhere: keep that, drop only torroute's lines
                text, _ = self.strip_marked(current.decode("utf-8", "surrogateescape"))
                _write_in_place(self.template, text.encode("utf-8", "surrogateescape"))
                messages.append(f"{self.template} changed since setup: removed only "
                                "torroute's lines, kept the rest")
        for directory in sorted(state.get("created_dirs", []), key=len, reverse=True):
            try:
                Path(directory).rmdir()
            except OSError:
                pass
        shutil.rmtree(self.state_dir, ignore_errors=True)
        torroute_dir = self.confdir / "torroute"
        if state.get("created_torroute_dir", partial):
            try:
                torroute_dir.rmdir()
            except OSError:
                pass
        return messages

    # -- update-exim4.conf ------------------------------------------------------------------
    def _update(self, action: str) -> None:
        if self.update_command is None:
            return
        argv = [*self.update_command, "--confdir", str(self.confdir)]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except OSError as exc:
            failure = f"{argv[0]}: {exc.strerror or exc}"
        else:
            if r.returncode == 0:
                return
            failure = f"{' '.join(argv)} exited {r.returncode}: {(r.stderr or r.stdout).strip()}"
        if action == "setup":  # leave the configuration as it was
            state = self._load_state()
            if state is not None:
                self._undo(state)
            raise ConfigError(f"{failure}; torroute's setup was undone")
        raise ConfigError(f"{failure} (torroute's files are removed; fix and rerun "
                          "update-exim4.conf)")


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.torroute-tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _write_in_place(path: Path, data: bytes) -> None:
    """Keep the file's owner and mode (the admin's template): rewrite its contents."""
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())
