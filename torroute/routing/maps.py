"""Pinned routes: domain -> onion, read from onionmx ``map.yml`` files or a plain text format.

onionmx ``map.yml`` (as published)::

    ---
    <56 chars>.onion:
      - example.org
      - example.net
    <56 chars>.onion:        # an onion with no domains (yet)

Text format, one pin per line (``#`` comments)::

    example.org   <56 chars>.onion[:port]

A mistake in a map may delay mail; it must never send it over the clear net.  So:

* a file that does not parse (YAML syntax, a shape that is not ``onion -> [domains]``, a text line
  that is not ``domain onion[:port]``, a domain name that is not one) is a :class:`MapError`
  naming ``FILE:LINE``: the daemon refuses to start, or keeps its old maps on reload;
* a pin whose onion is mistyped (length, checksum, not an ed25519 key, bad port) is kept as an
  :class:`InvalidPin`: its domain answers *temporary failure* ("invalid pin at FILE:LINE") until
  the map is fixed -- never *no route*, never SRV;
* a v2 pin is not a typo but a dead service (onionmx's published map still has a dozen): by
  default (``v2_pins = "unpinned"``) it is ignored with one warning per load and the domain is
  routed as if unpinned (SRV, else the MTA's usual way, as today for a v2-only domain); with
  ``v2_pins = "defer"`` it is an invalid pin.  An ignored v2 entry never replaces a v3 pin.

A domain listed twice: the last entry wins, with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import normalize_domain
from ..errors import InvalidOnion, MapError
from .onion import is_v2_onion, parse_onion

log = logging.getLogger(__name__)

MAX_MAP_BYTES = 64 * 1024 * 1024
YAML_SUFFIXES = (".yml", ".yaml")
V2_POLICIES = ("unpinned", "defer")
#: per-entry warnings logged one line each up to this many per load, then one summary line
MAX_LOGGED_PROBLEMS = 20


@dataclass(frozen=True, slots=True)
class Pin:
    domain: str
    onion: str
    port: int
    source: str  # "FILE:LINE"


@dataclass(frozen=True, slots=True)
class InvalidPin:
    """A pin the operator mistyped: its domain defers until the map is fixed."""

    domain: str
    source: str  # "FILE:LINE"
    message: str


@dataclass(frozen=True, slots=True)
class MapProblem:
    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


class PinMap:
    """domain -> Pin (or InvalidPin), built from map files.

    ``problems`` lists every entry that does not route as written (invalid pins, v2 pins,
    skipped entries), each with FILE:LINE."""

    def __init__(self, v2_pins: str = "unpinned") -> None:
        if v2_pins not in V2_POLICIES:
            raise MapError(f"v2_pins must be one of {', '.join(V2_POLICIES)}, not {v2_pins!r}")
        self.v2_pins = v2_pins
        self.pins: dict[str, Pin] = {}
        self.invalid: dict[str, InvalidPin] = {}
        self.v2: list[MapProblem] = []  # ignored v2 pins (v2_pins = "unpinned")
        self.problems: list[MapProblem] = []
        self.files: list[Path] = []
        #: (domain, earlier source, later source, same target?) of every domain listed twice
        self.duplicates: list[tuple[str, str, str, bool]] = []

    def __len__(self) -> int:
        return len(self.pins)

    def get(self, domain: str) -> Pin | None:
        return self.pins.get(domain)

    def lookup(self, domain: str) -> Pin | InvalidPin | None:
        """The pin of ``domain``: a route, a mistake (defer), or None (not pinned)."""
        pin = self.pins.get(domain)
        if pin is not None:
            return pin
        return self.invalid.get(domain) if self.invalid else None

    def _problem(self, source: str, message: str) -> None:
        problem = MapProblem(source, message)
        self.problems.append(problem)
        if len(self.problems) <= MAX_LOGGED_PROBLEMS:
            log.warning("map %s", problem)

    def add(self, domain: str, onion_text: str, source: str, default_port: int) -> None:
        """One ``domain -> onion[:port]`` entry; raises MapError if ``domain`` is no domain."""
        try:
            domain = normalize_domain(domain)
        except ValueError as exc:
            raise MapError(f"{source}: invalid domain: {exc}") from None
        if domain.endswith(".onion"):
            self._problem(source, f"{domain} skipped: .onion destinations route to themselves")
            return
        host, port_text = onion_text.strip(), ""
        if host.count(":") == 1:
            host, port_text = host.split(":")
        port = default_port
        try:
            if port_text:
                if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                    raise InvalidOnion(f"invalid port {port_text!r}")
                port = int(port_text)
            onion = parse_onion(host).host
        except InvalidOnion as exc:
            if is_v2_onion(host) and self.v2_pins == "unpinned":
                self.v2.append(MapProblem(source, f"{domain}: v2 onion {host[:80]}"))
                return  # as if the line were not there
            self._set_invalid(InvalidPin(domain, source, str(exc)))
            return
        self._replace(domain, source, f"{onion}:{port}")
        self.pins[domain] = Pin(domain, onion, port, source)

    def _set_invalid(self, bad: InvalidPin) -> None:
        self._problem(bad.source, f"invalid pin for {bad.domain} (mail for it defers): "
                                  f"{bad.message}")
        self._replace(bad.domain, bad.source, "an invalid onion")
        self.invalid[bad.domain] = bad

    def _replace(self, domain: str, source: str, what: str) -> None:
        """Later entries win: drop an earlier pin (valid or not) of ``domain``, with a warning."""
        previous: Pin | InvalidPin | None = self.pins.pop(domain, None) or \
            self.invalid.pop(domain, None)
        if previous is None:
            return
        before = (f"{previous.onion}:{previous.port}" if isinstance(previous, Pin)
                  else "an invalid onion")
        self.duplicates.append((domain, previous.source, source, before == what))
        if before != what:
            log.warning("map %s: %s was pinned to %s at %s; the later entry wins (%s)",
                        source, domain, before, previous.source, what)

    def summary(self) -> str:
        """One line for the log: what this load gives and what it refused."""
        parts = [f"{len(self.pins)} pinned domains from {len(self.files)} map files"]
        if self.invalid:
            parts.append(f"{len(self.invalid)} invalid pins deferred")
        if self.v2:
            parts.append(f"{len(self.v2)} v2 pins ignored")
        hidden = len(self.problems) - MAX_LOGGED_PROBLEMS
        if hidden > 0:
            parts.append(f"{hidden} more map problems not logged one by one")
        return "maps: " + ", ".join(parts)

    def log_load(self) -> None:
        """The per-load lines: the v2 warning (once) and the summary."""
        if self.v2:
            shown = "; ".join(str(p) for p in self.v2[:5])
            more = f" and {len(self.v2) - 5} more" if len(self.v2) > 5 else ""
            log.warning("map: %d v2 onion pins ignored (v2 onion services are dead since 2021; "
                        "those domains are routed as if unpinned; set routing.v2_pins = "
                        "\"defer\" to defer them instead): %s%s", len(self.v2), shown, more)
        level = logging.WARNING if self.invalid or len(self.problems) > MAX_LOGGED_PROBLEMS \
            else logging.INFO
        log.log(level, "%s", self.summary())


def load_maps(paths: Iterable[Path | str], default_port: int = 25,
              v2_pins: str = "unpinned") -> PinMap:
    """Load map files and directories in order (later pins win).

    Raises MapError (with FILE:LINE where there is one) when a path cannot be read or a file
    does not parse; a mistyped onion only makes its domain defer (see the module docstring)."""
    pinmap = PinMap(v2_pins)
    for path in paths:
        for file in _expand(Path(path)):
            pinmap.files.append(file)
            _load_file(pinmap, file, default_port)
    pinmap.log_load()
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
            raise MapError(f"{source}: expected 'domain onion[:port]', got {line[:80]!r}")
        pinmap.add(parts[0], parts[1], source, default_port)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _yaml_error(file: Path, exc: Exception) -> str:
    """PyYAML's six-line message as one line, at the line that needs fixing: where a token
    began for the scanner (an unclosed quote is reported at the end of the file), else where
    the parser stopped."""
    import yaml

    problem, problem_mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    mark = context_mark if isinstance(exc, yaml.scanner.ScannerError) and context_mark \
        else problem_mark or context_mark
    where = f"{file}:{mark.line + 1}" if mark else str(file)
    parts = []
    if context:
        at = f" (line {context_mark.line + 1})" if context_mark else ""
        parts.append(f"{context}{at}")
    if problem:
        at = f" (line {problem_mark.line + 1})" if problem_mark else ""
        parts.append(f"{problem}{at}")
    return f"{where}: YAML syntax error: {_one_line(', '.join(parts) or exc)}"


def _load_yaml(pinmap: PinMap, file: Path, text: str, default_port: int) -> None:
    import yaml  # only map loading needs it: keeps the delivery program's start fast

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise MapError(_yaml_error(file, exc)) from None
    if root is None:
        return
    if not isinstance(root, yaml.MappingNode):
        raise MapError(f"{file}:{root.start_mark.line + 1}: expected a mapping of onion -> "
                       "list of domains")
    for key_node, value_node in root.value:
        key_source = f"{file}:{key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode):
            raise MapError(f"{key_source}: an onion key must be a plain string")
        onion = key_node.value
        if isinstance(value_node, yaml.ScalarNode) and value_node.value in ("", "~", "null"):
            continue  # an onion with no domains: valid, routes nothing
        if isinstance(value_node, yaml.ScalarNode):
            items = [value_node]  # a single domain instead of a list: accept it
        elif isinstance(value_node, yaml.SequenceNode):
            items = value_node.value
        else:
            raise MapError(f"{key_source}: {onion[:80]}: expected a list of domains")
        for item in items:
            source = f"{file}:{item.start_mark.line + 1}"
            if not isinstance(item, yaml.ScalarNode):
                raise MapError(f"{source}: expected a domain name")
            if not item.value or item.value in ("~", "null"):
                pinmap._problem(source, "an empty list item skipped")
                continue
            pinmap.add(item.value, onion, source, default_port)
