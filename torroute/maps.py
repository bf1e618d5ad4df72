"""Pinned routes: domain -> onion, read from onionmx ``map.yml`` files or a plain text format.

onionmx ``map.yml`` (as published)::

    ---
    <56 chars>.onion:
      - example.org
      - example.net
    <56 chars>.onion:        # an onion with no domains (yet)

Text format, one pin per line (``#`` comments)::

    example.org   <56 chars>.onion[:port]

Every entry is validated.  A bad entry is logged with file:line and skipped: it never routes, and
it never aborts the rest of the load.  A domain listed twice: the last entry wins, with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import normalize_domain
from .errors import InvalidOnion, MapError
from .onion import parse_onion

log = logging.getLogger(__name__)

MAX_MAP_BYTES = 64 * 1024 * 1024
YAML_SUFFIXES = (".yml", ".yaml")


@dataclass(frozen=True, slots=True)
class Pin:
    domain: str
    onion: str
    port: int
    source: str  # "FILE:LINE"


@dataclass(frozen=True, slots=True)
class MapProblem:
    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


class PinMap:
    """domain -> Pin, built from map files; ``problems`` lists every skipped entry."""

    def __init__(self) -> None:
        self.pins: dict[str, Pin] = {}
        self.problems: list[MapProblem] = []
        self.files: list[Path] = []

    def __len__(self) -> int:
        return len(self.pins)

    def get(self, domain: str) -> Pin | None:
        return self.pins.get(domain)

    def _problem(self, source: str, message: str) -> None:
        problem = MapProblem(source, message)
        self.problems.append(problem)
        log.warning("map entry skipped: %s", problem)

    def add(self, domain: str, onion_text: str, source: str, default_port: int) -> None:
        try:
            domain = normalize_domain(domain)
        except ValueError as exc:
            self._problem(source, f"invalid domain: {exc}")
            return
        host, port_text = onion_text.strip(), ""
        if host.count(":") == 1:
            host, port_text = host.split(":")
        port = default_port
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                self._problem(source, f"invalid port {port_text!r}")
                return
            port = int(port_text)
        try:
            onion = parse_onion(host).host
        except InvalidOnion as exc:
            self._problem(source, str(exc))
            return
        if domain.endswith(".onion"):
            self._problem(source, f"{domain}: .onion destinations route to themselves")
            return
        previous = self.pins.get(domain)
        if previous is not None and (previous.onion, previous.port) != (onion, port):
            log.warning(
                "%s: %s was pinned to %s:%d at %s; the later entry wins",
                source, domain, previous.onion, previous.port, previous.source,
            )
        self.pins[domain] = Pin(domain, onion, port, source)


def load_maps(paths: Iterable[Path | str], default_port: int = 25) -> PinMap:
    """Load map files and directories in order (later pins win).

    Raises MapError only when a path cannot be read at all; bad entries are skipped."""
    pinmap = PinMap()
    for path in paths:
        for file in _expand(Path(path)):
            pinmap.files.append(file)
            _load_file(pinmap, file, default_port)
    return pinmap


def _expand(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for entry in sorted(path.iterdir()):
            if entry.name.startswith(".") or entry.name.endswith(("~", ".dpkg-old", ".bak")):
                continue
            if entry.is_file():
                yield entry
    elif path.exists():
        yield path
    else:
        raise MapError(f"map {path} does not exist")


def _read_text(file: Path) -> str:
    try:
        size = os.stat(file).st_size
        if size > MAX_MAP_BYTES:
            raise MapError(f"map {file} is {size} bytes; the limit is {MAX_MAP_BYTES}")
        with open(file, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise MapError(f"map {file} is not UTF-8: {exc}") from None
    except OSError as exc:
        raise MapError(f"map {file}: {exc.strerror or exc}") from None


def _load_file(pinmap: PinMap, file: Path, default_port: int) -> None:
    text = _read_text(file)
    if file.suffix in YAML_SUFFIXES:
        _load_yaml(pinmap, file, text, default_port)
    else:
        _load_text(pinmap, file, text, default_port)


def _load_text(pinmap: PinMap, file: Path, text: str, default_port: int) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        source = f"{file}:{number}"
        parts = line.split()
        if len(parts) != 2:
            pinmap._problem(source, f"expected 'domain onion[:port]', got {line[:80]!r}")
            continue
        pinmap.add(parts[0], parts[1], source, default_port)


def _load_yaml(pinmap: PinMap, file: Path, text: str, default_port: int) -> None:
    import yaml  # only map loading needs it: keeps the delivery program's start fast

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        pinmap._problem(where, f"YAML syntax error, whole file skipped: {exc}")
        return
    if root is None:
        return
    if not isinstance(root, yaml.MappingNode):
        pinmap._problem(f"{file}:{root.start_mark.line + 1}",
                        "expected a mapping of onion -> list of domains; whole file skipped")
        return
    for key_node, value_node in root.value:
        key_source = f"{file}:{key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode):
            pinmap._problem(key_source, "an onion key must be a plain string")
            continue
        onion = key_node.value
        if isinstance(value_node, yaml.ScalarNode) and value_node.value in ("", "~", "null"):
            continue  # an onion with no domains: valid, routes nothing
        if isinstance(value_node, yaml.ScalarNode):
            items = [value_node]  # a single domain instead of a list: accept it
        elif isinstance(value_node, yaml.SequenceNode):
            items = value_node.value
        else:
            pinmap._problem(key_source, f"{onion}: expected a list of domains")
            continue
        for item in items:
            source = f"{file}:{item.start_mark.line + 1}"
            if not isinstance(item, yaml.ScalarNode) or not item.value:
                pinmap._problem(source, "expected a domain name")
                continue
            pinmap.add(item.value, onion, source, default_port)
