"""The man pages (docs/man/*.rst) match the code: every settings key of every table, with its
default, in torroute.toml(5); every command, action and flag of the CLI parser in torroute(1)
(or in the serve/deliver pages it points to).  Why: a hand-written reference drifts silently;
this fails the day a key, a default or a flag changes without its page."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from torroute.cli import build_parser
from torroute.config import ROUTING, TOR, Config, Section
from torroute.daemon.settings import KINDS, SERVE, ServeSettings
from torroute.delivery.settings import DELIVER, DeliverSettings
from torroute.inbox.settings import SINK, SinkSettings
from torroute.proxy.settings import PROXY, ProxySettings

MAN = Path(__file__).resolve().parents[2] / "docs" / "man"
SECTIONS: tuple[Section, ...] = (ROUTING, TOR, SERVE, DELIVER, SINK, PROXY)
#: an entry's term: ``key`` = ``TOML literal`` or ``key`` = *unset*
ENTRY = re.compile(r"^``(?P<key>[a-z_0-9]+)`` = (?:``(?P<literal>.+)``|\*unset\*)$")
UNSET = (None, "", (), [])


def toml_tables() -> dict[str, dict[str, str | None]]:
    """{table: {key: TOML literal, or None for *unset*}} of torroute.toml(5), by its
    ``[table]`` subsections (underlined with ~)."""
    lines = (MAN / "torroute.toml.rst").read_text().splitlines()
    tables: dict[str, dict[str, str | None]] = {}
    current: str | None = None
    for line, under in zip(lines, lines[1:] + [""], strict=True):
        if line and len(under) == len(line) and set(under) == {"~"}:
            table = re.fullmatch(r"\[([a-z_]+)\]", line)
            current = table.group(1) if table else None
            if current is not None:
                tables.setdefault(current, {})
        elif line and len(under) == len(line) and set(under) == {"-"}:
            current = None  # a section that is no table (Example, Files ...)
        m = ENTRY.match(line)
        if m and current is not None:
            assert m["key"] not in tables[current], f"[{current}] {m['key']} documented twice"
            tables[current][m["key"]] = m["literal"]
    return tables


def code_default(section: Section, key: str) -> Any:
    """The value a key has when the file does not set it (the settings class's default)."""
    attr = section.keys[key][0]
    if section is ROUTING or section is TOR:
        return getattr(Config(), attr)
    if section is SERVE:
        defaults = ServeSettings()
        return defaults.listeners.get(key, ()) if key in KINDS else getattr(defaults, attr)
    if section is DELIVER:
        return getattr(DeliverSettings, attr)
    if section is SINK:
        return getattr(SinkSettings(), attr)
    return getattr(ProxySettings(), attr)


def test_every_table_documented() -> None:
    assert set(toml_tables()) == {s.name for s in SECTIONS}


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.name)
def test_toml_keys_match_code(section: Section) -> None:
    documented = toml_tables()[section.name]
    assert sorted(set(section.keys) - set(documented)) == [], "keys missing from torroute.toml(5)"
    assert sorted(set(documented) - set(section.keys)) == [], "keys the code does not read"


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.name)
def test_toml_defaults_match_code(section: Section) -> None:
    """A documented default, read through the key's own coercer, is the code's default;
    *unset* stands for None or an empty value."""
    wrong = []
    for key, literal in toml_tables()[section.name].items():
        default = code_default(section, key)
        if literal is None:
            if default not in UNSET:
                wrong.append(f"{key}: documented unset, code {default!r}")
            continue
        value = tomllib.loads(f"v = {literal}")["v"]
        coerced = section.keys[key][1](value)
        if isinstance(coerced, list):
            coerced = tuple(coerced) if isinstance(default, tuple) else coerced
        if coerced != default:
            wrong.append(f"{key}: documented {literal} = {coerced!r}, code {default!r}")
    assert wrong == []


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
         ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) of the CLI, sub-actions included."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += walk(sub, path + (name,))
    return found


def man_text(*names: str) -> str:
    return "\n".join((MAN / f"{name}.rst").read_text() for name in names)


def test_every_command_in_torroute_1() -> None:
    text = man_text("torroute")
    commands = [path for path, _ in walk(build_parser()) if path]
    assert len(commands) >= 12
    missing = []
    for path in commands:
        if len(path) == 1:
            if not re.search(rf"^torroute {path[0]}$", text, re.MULTILINE):
                missing.append(path[0])  # a command is a definition-list term of Commands
        elif f"**{path[-1]}**" not in text:
            missing.append(" ".join(path))
    assert missing == []


def test_every_flag_documented() -> None:
    """Every option of every command is named in bold in torroute(1), or (serve, deliver) in
    its own page."""
    own = {"serve": "torroute-serve", "deliver": "torroute-deliver"}
    missing = []
    for path, parser in walk(build_parser()):
        text = man_text("torroute", *([own[path[0]]] if path and path[0] in own else []))
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help") and f"**{flag}**" not in text:
                    missing.append(f"{' '.join(path)} {flag}")
    assert missing == []


def test_the_three_part3_commands_are_listed() -> None:
    """postfix, exim and map have an entry whether or not this build has their modules."""
    text = man_text("torroute")
    for name in ("postfix", "exim", "map"):
        assert re.search(rf"^torroute {name}$", text, re.MULTILINE), name


def test_exit_statuses_in_torroute_1() -> None:
    from torroute import exitcodes

    text = man_text("torroute")
    section = text.split("Exit status\n-----------\n", 1)[1].split("\nEnvironment\n", 1)[0]
    documented = set(re.findall(r"^\*\*(\d+)\*\*$", section, re.MULTILINE))
    codes = {str(v) for k, v in vars(exitcodes).items() if k.isupper() and k != "SOFTWARE"}
    assert codes - {"69"} <= documented, "an exit status missing from torroute(1)"
    deliver = man_text("torroute-deliver").split("Exit status\n-----------\n", 1)[1]
    assert set(re.findall(r"^\*\*(\d+)\*\*$", deliver, re.MULTILINE)) == {"0", "69", "75"}


def test_conf_builds_the_four_pages() -> None:
    """docs/conf.py's man_pages: the four pages, each from an existing source kept out of the
    HTML toctree on purpose (:orphan:, or ``sphinx-build -W -b html`` fails)."""
    import runpy

    conf = runpy.run_path(str(MAN.parent / "conf.py"))
    pages = {(name, section) for _, name, _, _, section in conf["man_pages"]}
    assert pages == {("torroute", 1), ("torroute-serve", 8), ("torroute-deliver", 8),
                     ("torroute.toml", 5)}
    for source, *_ in conf["man_pages"]:
        path = MAN.parent / f"{source}.rst"
        assert path.read_text().startswith(":orphan:\n"), path
        assert path.read_text().isascii(), f"{path}: groff -Tutf8 warns on non-ASCII input"
    assert conf["man_make_section_directory"] is False  # OUT/torroute.1, as debian/ expects
