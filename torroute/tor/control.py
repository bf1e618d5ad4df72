"""Tor's control port (through stem): check and fix tor's settings, run onion services.

Every seed told the admin to hand-edit torrc, restart tor and ``cat hostname``.  This module does
it through the control port, safely: it only ever *adds* to tor's configuration (a SETCONF of a
multi-value option such as ``SocksPort`` or the ``HiddenService*`` lines replaces all of them, so
every existing value is sent again), and it refuses to publish an onion whose port 25 leads to an
smtpd that relays for 127.0.0.1 (onion connections arrive from 127.0.0.1, which Postfix's
``mynetworks`` trusts: that would be an open relay for all of Tor).

Pure parsing and planning functions (``parse_*``, :func:`check_settings`, :func:`plan_ensure`,
:func:`classify_rcpt_reply`) are separate from the I/O edges (:class:`Tor`, :func:`probe_relay`).
"""

from __future__ import annotations

import base64
import grp
import hashlib
import ipaddress
import logging
import os
import pwd
import queue
import re
import socket
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import (
    ConfigError,
    ControlAuthError,
    ControlError,
    DescriptorTimeout,
    OnionNotFound,
    OpenRelayRisk,
    SaveConfError,
    TorRefused,
)
from ..routing.onion import onion_from_pubkey, parse_onion
from .torrc import (
    ONION_SUFFIX,
    HostPort,
    PortMapping,
    format_hostport,
    parse_hidden_service_port,
)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

# --------------------------------------------------------------------------------------------
# Errors


# --------------------------------------------------------------------------------------------
# Pure parsing


@dataclass(frozen=True)
class ControlEndpoint:
    """Where tor's control port is: a unix socket ``path`` or TCP ``host``:``port``."""

    path: str | None = None
    host: str = "127.0.0.1"
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> ControlEndpoint:
        """``unix:PATH``, ``inet:HOST:PORT``, ``/PATH``, ``HOST:PORT`` or ``PORT``."""
        from ..endpoint import parse_hostport

        text = text.strip()
        if text.startswith("unix:"):
            text = text[5:]
            if not text.startswith("/"):
                raise ConfigError(f"tor control socket {text!r}: expected unix:/ABSOLUTE/PATH")
            return cls(path=text)
        if text.startswith("/"):
            return cls(path=text)
        if text.startswith("inet:"):
            text = text[5:]
        if text.isdigit():
            text = f"127.0.0.1:{text}"
        host, port = parse_hostport(text)
        return cls(host=host, port=port)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"inet:{format_hostport((self.host, self.port))}"


_TOKEN = re.compile(r'([A-Za-z_][\w-]*)=("(?:[^"\\]|\\.)*"|\S*)|("(?:[^"\\]|\\.)*"|\S+)')


def unquote(text: str) -> str:
    """Undo control-protocol quoting (``"a \\"b\\""`` -> ``a "b"``); unquoted text is kept."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def quote(value: str) -> str:
    """Quote a value for SETCONF/ADD_ONION (control-spec QuotedString)."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise ConfigError(f"{value!r}: line breaks are not allowed in tor options")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_keywords(text: str) -> tuple[list[str], dict[str, str]]:
    """Split a control-protocol line into positional words and ``KEY=value`` pairs."""
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for match in _TOKEN.finditer(text):
        if match.group(1):
            keywords[match.group(1).upper()] = unquote(match.group(2))
        else:
            positional.append(unquote(match.group(3)))
    return positional, keywords


@dataclass(frozen=True)
class Bootstrap:
    """``GETINFO status/bootstrap-phase``: how far tor is in connecting to the Tor network."""

    progress: int
    tag: str = ""
    summary: str = ""
    warning: str | None = None

    @property
    def done(self) -> bool:
        return self.progress >= 100


def parse_bootstrap(text: str) -> Bootstrap:
    """``NOTICE BOOTSTRAP PROGRESS=5 TAG=conn SUMMARY="Connecting to a relay" [WARNING=...]``."""
    _, kw = parse_keywords(text)
    try:
        progress = int(kw.get("PROGRESS", "0"))
    except ValueError:
        progress = 0
    return Bootstrap(progress, kw.get("TAG", ""), kw.get("SUMMARY", ""), kw.get("WARNING"))


def parse_quoted_list(text: str) -> list[str]:
    """``"127.0.0.1:9050" "127.0.0.1:9051"`` (GETINFO net/listeners/*) -> the addresses."""
    return [unquote(m.group(0)) for m in re.finditer(r'"(?:[^"\\]|\\.)*"|\S+', text)]


def parse_getconf(lines: Iterable[str]) -> list[tuple[str, str | None]]:
    """GETCONF reply lines (``Key=value`` or a bare ``Key`` for an unset option) in order."""
    out: list[tuple[str, str | None]] = []
    for line in lines:
        key, sep, value = line.partition("=")
        out.append((key, unquote(value) if sep else None))
    return out


@dataclass(frozen=True)
class PortOption:
    """One ``SocksPort``/``DNSPort`` value: an address and its flags."""

    address: str
    flags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: str) -> PortOption:
        words = value.split()
        return cls(words[0] if words else "", tuple(words[1:]))

    def has_flag(self, flag: str) -> bool:
        return any(f.lower() == flag.lower() for f in self.flags)

    def with_flag(self, flag: str) -> PortOption:
        return self if self.has_flag(flag) else PortOption(self.address, self.flags + (flag,))

    def __str__(self) -> str:
        return " ".join((self.address,) + self.flags)


def port_address(address: str) -> HostPort | None:
    """Where a port option listens, as tor reads it (``9050`` -> 127.0.0.1:9050); None for
    ``0`` (off), ``auto`` or unix sockets."""
    address = address.strip()
    if address.isdigit():
        return ("127.0.0.1", int(address)) if int(address) else None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or address.startswith("unix:"):
        return None
    host = host.strip("[]")
    if host.lower() == "localhost":
        host = "127.0.0.1"
    return host, int(port)


def _same_address(a: HostPort | None, b: HostPort) -> bool:
    if a is None or a[1] != b[1]:
        return False
    try:
        return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0])
    except ValueError:
        return a[0].lower() == b[0].lower()


@dataclass(frozen=True)
class AddressMapping:
    """One line of ``GETINFO address-mappings/all``."""

    address: str
    target: str
    expires: str  # "NEVER" or a UTC time


def parse_address_mappings(text: str) -> list[AddressMapping]:
    """``127.192.1.2 abc...xyz.onion NEVER`` lines (times may be quoted)."""
    out: list[AddressMapping] = []
    for line in text.splitlines():
        words, _ = parse_keywords(line)
        if len(words) >= 3:
            out.append(AddressMapping(words[0], words[1], " ".join(words[2:])))
    return out


def reverse_lookup(mappings: Iterable[AddressMapping], ip: str) -> str | None:
    """The .onion name tor automapped to ``ip`` (a virtual address), or None."""
    try:
        wanted = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        raise ConfigError(f"{ip!r} is not an IP address") from None
    for m in mappings:
        try:
            if ipaddress.ip_address(m.address) == wanted and m.target.endswith(".onion"):
                return m.target.lower()
        except ValueError:
            continue
    return None


@dataclass(frozen=True)
class HsDescEvent:
    """One HS_DESC event (``650 HS_DESC ACTION ADDRESS AUTH HSDIR ...``)."""

    action: str
    address: str  # without ".onion"
    hsdir: str = ""
    reason: str | None = None


def parse_hs_desc(text: str) -> HsDescEvent | None:
    words, kw = parse_keywords(text)
    if words and words[0] == "650":
        words = words[1:]
    if len(words) < 3 or words[0] != "HS_DESC":
        return None
    return HsDescEvent(words[1].upper(), words[2].lower().removesuffix(".onion"),
                       words[4] if len(words) > 4 else "", kw.get("REASON"))


# --------------------------------------------------------------------------------------------
# Tor's client settings: check and plan the missing ones (pure)


@dataclass
class TorSettings:
    """What torroute needs to know of tor's client configuration."""

    socks_ports: list[str] = field(default_factory=list)  # GETCONF SocksPort values
    dns_ports: list[str] = field(default_factory=list)
    socks_listeners: list[str] = field(default_factory=list)  # GETINFO net/listeners/socks
    dns_listeners: list[str] = field(default_factory=list)
    automap: bool = False
    suffixes: list[str] = field(default_factory=lambda: [".onion", ".exit"])
    virtual_network: str = "127.192.0.0/10"
    disable_network: bool = False


@dataclass(frozen=True)
class Problem:
    """Something in tor's setup that stops (``error``) or hampers (``warning``) torroute."""

    option: str
    problem: str
    fix: str
    severity: str = "error"
    fixable: bool = True  # ``torroute tor ensure`` fixes it

    def line(self) -> str:
        return f"{self.severity}: {self.option}: {self.problem}; fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        return {"option": self.option, "severity": self.severity, "problem": self.problem,
                "fix": self.fix, "fixable": self.fixable}


def suffixes_cover_onion(suffixes: Iterable[str]) -> bool:
    """Does ``AutomapHostsSuffixes`` automap ``.onion`` names (tor matches by string suffix;
    ``.`` means every name)?"""
    return any(s == "." or (s and "x.onion".endswith(s.lower())) for s in suffixes)


def _listens(values: Sequence[str], listeners: Sequence[str], address: HostPort) -> bool:
    return any(_same_address(port_address(v), address)
               for v in list(values) + list(listeners))


def _find_port(values: Sequence[str], address: HostPort) -> int | None:
    for i, value in enumerate(values):
        if _same_address(port_address(PortOption.parse(value).address), address):
            return i
    return None


def _socks_values(settings: TorSettings) -> list[str]:
    """The SocksPort values in force; an unset SocksPort means tor's default (9050), which
    listens although GETCONF shows nothing: keep it when adding ours."""
    if settings.socks_ports:
        return list(settings.socks_ports)
    return list(settings.socks_listeners)


def check_settings(settings: TorSettings, config: Config) -> list[Problem]:
    """Every way tor's client settings fail torroute, each with its fix."""
    problems: list[Problem] = []
    socks, dns = config.tor_socks, config.tor_dns
    socks_s, dns_s = format_hostport(socks), format_hostport(dns)
    socks_values = _socks_values(settings)
    index = _find_port(socks_values, socks)
    if index is None and not _listens([], settings.socks_listeners, socks):
        have = ", ".join(settings.socks_listeners) or "none"
        problems.append(Problem(
            "SocksPort", f"tor has no SocksPort at {socks_s} (it listens on: {have})",
            f"torroute tor ensure, or add 'SocksPort {socks_s} ExtendedErrors' to torrc "
            "(or point [tor] socks at one of tor's SocksPorts)"))
    elif index is not None and not PortOption.parse(socks_values[index]).has_flag(
            "ExtendedErrors"):
        problems.append(Problem(
            "SocksPort", f"SocksPort {socks_s} lacks ExtendedErrors: onion failures all look "
            "like 'general failure' (mail still defers, but the reason is lost)",
            f"torroute tor ensure, or add the ExtendedErrors flag to 'SocksPort {socks_s}'",
            severity="warning"))
    if not _listens(settings.dns_ports, settings.dns_listeners, dns):
        have = ", ".join(settings.dns_listeners) or "none"
        problems.append(Problem(
            "DNSPort", f"tor has no DNSPort at {dns_s} (it listens on: {have}); the automap "
            "lookups (Exim, tor resolve) fail",
            f"torroute tor ensure, or add 'DNSPort {dns_s}' to torrc"))
    if not settings.automap:
        problems.append(Problem(
            "AutomapHostsOnResolve", "is 0: tor's DNSPort answers .onion names with an error "
            "instead of a virtual address",
            "torroute tor ensure, or add 'AutomapHostsOnResolve 1' to torrc"))
    if not suffixes_cover_onion(settings.suffixes):
        problems.append(Problem(
            "AutomapHostsSuffixes", f"{','.join(settings.suffixes) or '(empty)'} does not "
            "include .onion", "torroute tor ensure, or add .onion to AutomapHostsSuffixes"))
    if settings.virtual_network.strip() != config.virtual_network.strip():
        problems.append(Problem(
            "VirtualAddrNetworkIPv4", f"tor maps onions into {settings.virtual_network}, "
            f"torroute expects {config.virtual_network}",
            f"set virtual_network = \"{settings.virtual_network}\" in torroute's [tor] table",
            fixable=False))
    return problems


def plan_ensure(settings: TorSettings, config: Config) -> list[tuple[str, list[str]]]:
    """The SETCONF changes (option -> complete new value list) that make tor fit torroute.

    Only adds: every existing SocksPort/DNSPort value is kept (SETCONF replaces the whole list),
    an existing SocksPort at torroute's address only gains the ExtendedErrors flag.
    """
    changes: list[tuple[str, list[str]]] = []
    socks = config.tor_socks
    values = _socks_values(settings)
    index = _find_port(values, socks)
    if index is None and not _listens([], settings.socks_listeners, socks):
        new = [v for v in values if v.strip() != "0"]
        changes.append(("SocksPort", new + [f"{format_hostport(socks)} ExtendedErrors"]))
    elif index is not None:
        option = PortOption.parse(values[index])
        if not option.has_flag("ExtendedErrors"):
            new = list(values)
            new[index] = str(option.with_flag("ExtendedErrors"))
            changes.append(("SocksPort", new))
    if not _listens(settings.dns_ports, settings.dns_listeners, config.tor_dns):
        new = [v for v in settings.dns_ports if v.strip() != "0"]
        changes.append(("DNSPort", new + [format_hostport(config.tor_dns)]))
    if not settings.automap:
        changes.append(("AutomapHostsOnResolve", ["1"]))
    if not suffixes_cover_onion(settings.suffixes):
        changes.append(("AutomapHostsSuffixes", [",".join(settings.suffixes + [ONION_SUFFIX])]))
    return changes


def setconf_command(changes: Sequence[tuple[str, Sequence[str | None]]],
                    verb: str = "SETCONF") -> str:
    """``SETCONF Key="v1" Key="v2" Other`` (a None value or an empty list unsets the option)."""
    words = [verb]
    for key, values in changes:
        if not values:
            words.append(key)
        for value in values:
            words.append(key if value is None else f"{key}={quote(value)}")
    return " ".join(words)


# --------------------------------------------------------------------------------------------
# Onion services (pure parts)


@dataclass
class OnionService:
    """An onion service of this tor: persistent (``directory``) or ephemeral (ADD_ONION)."""

    address: str | None  # "<56 chars>.onion"; None when the hostname file is unreadable
    ports: list[PortMapping] = field(default_factory=list)
    directory: str | None = None
    key_file: str | None = None
    options: list[tuple[str, str]] = field(default_factory=list)  # other HiddenService* lines
    uploaded: bool | None = None  # HS_DESC UPLOADED seen (None: did not wait)
    changed: bool = True  # False when create found it already configured like this
    note: str | None = None

    @property
    def ephemeral(self) -> bool:
        return self.directory is None

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "ephemeral": self.ephemeral,
                "directory": self.directory, "key_file": self.key_file,
                "ports": [str(p) for p in self.ports], "uploaded": self.uploaded,
                "changed": self.changed, "note": self.note}


@dataclass
class HsBlock:
    """The torrc lines of one persistent service, starting with its HiddenServiceDir."""

    directory: str
    lines: list[tuple[str, str]] = field(default_factory=list)  # everything after the Dir line

    @property
    def ports(self) -> list[PortMapping]:
        return [parse_hidden_service_port(v) for k, v in self.lines
                if k.lower() == "hiddenserviceport"]

    @property
    def options(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.lines if k.lower() != "hiddenserviceport"]


def group_hidden_services(lines: Iterable[tuple[str, str | None]]) -> list[HsBlock]:
    """GETCONF HiddenServiceOptions -> one block per HiddenServiceDir, in tor's order."""
    blocks: list[HsBlock] = []
    for key, value in lines:
        if value is None:
            continue
        if key.lower() == "hiddenservicedir":
            blocks.append(HsBlock(value))
        elif blocks:
            blocks[-1].lines.append((key, value))
    return blocks


def flatten_hidden_services(blocks: Iterable[HsBlock]) -> list[tuple[str, list[str]]]:
    """Blocks -> SETCONF items, every line of every service in order (tor replaces them all)."""
    items: list[tuple[str, list[str]]] = []
    for block in blocks:
        items.append(("HiddenServiceDir", [block.directory]))
        items.extend((k, [v]) for k, v in block.lines)
    return items


def _norm_dir(path: str) -> str:
    return os.path.normpath(path)


# Ephemeral service keys: tor's ADD_ONION "ED25519-V3:<base64 of the 64-byte expanded key>".

KEY_PREFIX = "ED25519-V3:"
_TOR_SECRET_HEADER = b"== ed25519v1-secret: type0 =="


def new_expanded_key() -> bytes:
    """A fresh 64-byte expanded ed25519 secret key, as tor makes one (clamped SHA-512 of a
    random seed).  Made here so that the key is on disk before tor ever sees it."""
    digest = bytearray(hashlib.sha512(os.urandom(32)).digest())
    digest[0] &= 248
    digest[31] &= 127
    digest[31] |= 64
    return bytes(digest)


def address_from_expanded_key(key: bytes) -> str:
    """The onion address of an expanded secret key: the public key is ``a*B``."""
    from ..routing.ed25519 import public_key_from_seed_scalar

    if len(key) != 64:
        raise ConfigError("an ED25519-V3 onion key is 64 bytes")
    return onion_from_pubkey(public_key_from_seed_scalar(int.from_bytes(key[:32], "little")))


def decode_key_file(data: bytes, where: str = "key file") -> bytes:
    """Accept torroute's/ADD_ONION's ``ED25519-V3:base64`` and tor's own
    ``hs_ed25519_secret_key`` (so a persistent service can move to an ephemeral one)."""
    if data.startswith(_TOR_SECRET_HEADER):
        if len(data) != 96:
            raise ConfigError(f"{where}: a tor hs_ed25519_secret_key file is 96 bytes")
        return data[32:]
    text = data.decode("ascii", "replace").strip()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(KEY_PREFIX):
            try:
                key = base64.b64decode(line[len(KEY_PREFIX):], validate=True)
            except ValueError:
                break
            if len(key) == 64:
                return key
            break
    raise ConfigError(f"{where}: not an onion key (expected a line 'ED25519-V3:<base64>' or "
                      "tor's hs_ed25519_secret_key)")


def encode_key_file(key: bytes) -> bytes:
    address = address_from_expanded_key(key)
    return (f"# torroute onion service key for {address}: keep it secret, keep it safe\n"
            f"{KEY_PREFIX}{base64.b64encode(key).decode('ascii')}\n").encode("ascii")


def read_key_file(path: Path) -> bytes:
    """Read an onion key, refusing one that others can read (the key *is* the address)."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except PermissionError:
        raise ConfigError(f"onion key file {path}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"onion key file {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"onion key file {path} is readable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
    return decode_key_file(data, str(path))


def write_key_file(path: Path, key: bytes) -> None:
    """Write the key 0600 atomically and durably; never overwrite an existing key."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(encode_key_file(key))
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # fails if the key appeared meanwhile: never replace a key
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def key_file_address(path: Path) -> str:
    """The onion address an ephemeral service made from this key file gets."""
    return address_from_expanded_key(read_key_file(path))


def directory_address(directory: Path, wait: float = 0.0) -> str:
    """The address of a persistent service: its ``hostname`` file (made by tor)."""
    hostname = directory / "hostname"
    deadline = time.monotonic() + wait
    while True:
        try:
            text = hostname.read_text(errors="replace").strip()
            return parse_onion(text).host
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise ConfigError(f"{hostname} does not exist: is {directory} a "
                                  "HiddenServiceDir of a running tor?") from None
            time.sleep(0.05)
        except PermissionError:
            raise ConfigError(f"{hostname}: permission denied (the directory belongs to tor's "
                              "user: run as root or as that user)") from None


# --------------------------------------------------------------------------------------------
# The open-relay trap: SMTP probe (pure reply handling + a small I/O edge)

PROBE_HELO = "relay-check.torroute.invalid"
PROBE_RCPT = "relay-probe@relay-check.invalid"
RELAY_CHECK_PORTS = (25, 587)  # onion ports where an smtpd relaying for 127.0.0.1 is a trap


@dataclass(frozen=True)
class SmtpReply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " / ".join(self.lines)


def parse_smtp_reply(buffer: bytes) -> tuple[SmtpReply | None, bytes]:
    """Take one complete (possibly multi-line) reply off ``buffer``: (reply or None, rest)."""
    lines: list[str] = []
    rest = buffer
    while b"\n" in rest:
        raw, rest = rest.split(b"\n", 1)
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if len(line) < 3 or not line[:3].isdigit():
            raise ValueError(f"not an SMTP reply: {line[:80]!r}")
        lines.append(line[4:])
        if len(line) == 3 or line[3] == " ":
            return SmtpReply(int(line[:3]), tuple(lines)), rest
    return None, buffer


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def classify_rcpt_reply(reply: SmtpReply) -> str:
    """``open`` (the smtpd takes mail for a foreign domain from us), ``closed`` (refused as
    relaying: enhanced code X.7.x or the word 'relay') or ``inconclusive`` (refused for another
    reason, e.g. the probe domain does not resolve: relaying may still be allowed)."""
    if reply.code in (250, 251, 252):
        return "open"
    text = re.sub(r"<[^>]*>", "", reply.text.lower())  # our probe address says "relay" too
    enhanced = _ENHANCED.match(reply.text)
    if (enhanced and enhanced.group(2) == "7") or "relay" in text:
        return "closed"
    return "inconclusive"


@dataclass(frozen=True)
class RelayVerdict:
    """What the probe of one onion port's target found."""

    mapping: PortMapping
    verdict: str  # open | closed | inconclusive | no-listener | not-smtp
    detail: str

    @property
    def refuse(self) -> bool:
        return self.verdict in ("open", "inconclusive")

    def line(self) -> str:
        return f"onion port {self.mapping.virtual} -> {self.mapping.target}: {self.verdict} " \
               f"({self.detail})"


def probe_relay(mapping: PortMapping, timeout: float = 5.0) -> RelayVerdict:
    """Ask the smtpd behind an onion port to relay, as an onion client would (it connects from
    127.0.0.1).  Sends EHLO, ``MAIL FROM:<>`` and ``RCPT TO:<relay-probe@relay-check.invalid>``,
    then RSET and QUIT: no mail is ever sent."""
    tcp = mapping.tcp_target
    try:
        if tcp is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(mapping.target[5:])
        else:
            sock = socket.create_connection(tcp, timeout=timeout)
    except OSError as exc:
        return RelayVerdict(mapping, "no-listener", f"cannot connect: {exc.strerror or exc}")
    buffer = b""

    def reply() -> SmtpReply:
        nonlocal buffer
        while True:
            parsed, buffer = parse_smtp_reply(buffer)
            if parsed is not None:
                return parsed
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed")
            buffer += chunk
            if len(buffer) > 65536:
                raise ValueError("SMTP reply too long")

    def command(line: str) -> SmtpReply:
        sock.sendall(line.encode("ascii") + b"\r\n")
        return reply()

    try:
        with sock:
            banner = reply()
            if banner.code != 220:
                return RelayVerdict(mapping, "not-smtp" if banner.code < 400 else "inconclusive",
                                    f"banner {banner.code} {banner.text}")
            hello = command(f"EHLO {PROBE_HELO}")
            if hello.code != 250:
                hello = command(f"HELO {PROBE_HELO}")
            if hello.code != 250:
                return RelayVerdict(mapping, "inconclusive", f"HELO: {hello.code} {hello.text}")
            mail = command("MAIL FROM:<>")
            if mail.code != 250:
                return RelayVerdict(mapping, "inconclusive",
                                    f"MAIL FROM:<>: {mail.code} {mail.text}")
            rcpt = command(f"RCPT TO:<{PROBE_RCPT}>")
            verdict = classify_rcpt_reply(rcpt)
            try:
                command("RSET")
                command("QUIT")
            except (OSError, ValueError):
                pass
            return RelayVerdict(mapping, verdict,
                                f"RCPT TO:<{PROBE_RCPT}>: {rcpt.code} {rcpt.text}")
    except ValueError as exc:
        return RelayVerdict(mapping, "not-smtp", str(exc))
    except OSError as exc:  # timeouts, resets, closed connections
        return RelayVerdict(mapping, "inconclusive", f"SMTP dialogue failed: {exc}")


def relay_check(ports: Sequence[PortMapping], timeout: float = 5.0) -> list[RelayVerdict]:
    """Probe every SMTP-ish onion port (25, 587)."""
    return [probe_relay(p, timeout) for p in ports if p.virtual in RELAY_CHECK_PORTS]


def relay_refusal(verdicts: Sequence[RelayVerdict]) -> str | None:
    """The explanation for refusing to publish, or None when every probed port is safe."""
    bad = [v for v in verdicts if v.refuse]
    if not bad:
        return None
    lines = ["refusing to publish this onion service (use --force if you are sure):"]
    for v in bad:
        lines.append("  " + v.line())
    lines.append(
        "  onion connections reach the target from 127.0.0.1, which the smtpd trusts "
        "(Postfix: mynetworks); it would relay mail for anyone on Tor.  Point the onion "
        "port at a dedicated smtpd that trusts nobody, e.g. in Postfix's master.cf: "
        "'127.0.0.1:2525 inet n - y - - smtpd -o mynetworks= "
        "-o smtpd_relay_restrictions=reject_unauth_destination', and use --port 25=127.0.0.1:2525")
    if any(v.verdict == "inconclusive" for v in bad):
        lines.append("  (inconclusive: the smtpd refused the probe for another reason than "
                     "relaying, so the probe could not tell; check its relay rules by hand)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The control connection (I/O edge)


@dataclass
class Status:
    """``torroute tor status``: tor's state and whether its settings suit torroute."""

    control: str
    version: str
    bootstrap: Bootstrap
    network_liveness: str
    circuit_established: bool
    settings: TorSettings
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        """No setting problem that breaks torroute (warnings allowed)."""
        return not any(p.severity == "error" for p in self.problems)

    @property
    def ready(self) -> bool:
        """Onion mail can flow now: settings fine and tor connected to the network."""
        return self.ok and self.bootstrap.done and not self.settings.disable_network

    def runtime_notes(self) -> list[str]:
        notes = []
        if self.settings.disable_network:
            notes.append("DisableNetwork is 1: tor does not connect to the Tor network "
                         "(fix: SETCONF DisableNetwork=0 or remove it from torrc)")
        elif not self.bootstrap.done:
            why = f"; {self.bootstrap.warning}" if self.bootstrap.warning else ""
            notes.append(f"tor is not connected to the Tor network yet ({self.bootstrap.progress}%"
                         f": {self.bootstrap.summary}{why}): onion mail defers until it is")
        return notes

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "control": self.control, "version": self.version,
            "bootstrap": {"progress": self.bootstrap.progress, "tag": self.bootstrap.tag,
                          "summary": self.bootstrap.summary, "warning": self.bootstrap.warning},
            "network_liveness": self.network_liveness,
            "circuit_established": self.circuit_established,
            "disable_network": s.disable_network,
            "socks_ports": s.socks_ports, "socks_listeners": s.socks_listeners,
            "dns_ports": s.dns_ports, "dns_listeners": s.dns_listeners,
            "automap_hosts_on_resolve": s.automap, "automap_hosts_suffixes": s.suffixes,
            "virtual_network": s.virtual_network,
            "problems": [p.to_dict() for p in self.problems],
            "notes": self.runtime_notes(), "ok": self.ok, "ready": self.ready,
        }


@dataclass
class EnsureResult:
    changes: list[tuple[str, list[str]]]
    applied: bool
    saved: bool
    remaining: list[Problem]  # problems ensure cannot fix

    def to_dict(self) -> dict[str, Any]:
        return {"changes": [{"option": k, "values": v} for k, v in self.changes],
                "command": setconf_command(self.changes) if self.changes else None,
                "applied": self.applied, "saved": self.saved,
                "remaining": [p.to_dict() for p in self.remaining]}


class Tor:
    """An authenticated control connection to one tor.

    >>> with Tor.connect("unix:/run/tor/control") as tor:   # doctest: +SKIP
    ...     print(tor.status().ready)
    """

    def __init__(self, controller: Any, endpoint: ControlEndpoint) -> None:
        self._controller = controller
        self.endpoint = endpoint

    # -- connecting -------------------------------------------------------------------------

    @classmethod
    def connect(cls, control: str | ControlEndpoint = "unix:/run/tor/control",
                password: str | None = None) -> Tor:
        """Connect and authenticate (none, password, safecookie or cookie, as tor offers).

        A configured password is tried first and a wrong one is an error even if the cookie
        would work: a silently ignored setting is worse than a clear failure.
        """
        import stem
        import stem.control
        import stem.socket

        endpoint = control if isinstance(control, ControlEndpoint) else \
            ControlEndpoint.parse(control)
        try:
            if endpoint.path:
                sock = stem.socket.ControlSocketFile(endpoint.path)
            else:
                sock = stem.socket.ControlPort(endpoint.host, endpoint.port)
        except stem.SocketError as exc:
            raise _connect_error(endpoint, exc) from None
        controller = _controller_class()(sock)
        controller.set_caching(False)  # we SETCONF behind stem's back; never read stale values
        try:
            _authenticate(controller, endpoint, password)
        except BaseException:
            controller.close()
            raise
        return cls(controller, endpoint)

    @classmethod
    def from_config(cls, config: Config) -> Tor:
        return cls.connect(config.tor_control, config.tor_control_password)

    def close(self) -> None:
        self._controller.close()

    def __enter__(self) -> Tor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw commands -----------------------------------------------------------------------

    def command(self, line: str) -> list[str]:
        """Send one command; the reply's lines (without codes) or TorRefused."""
        import stem

        try:
            reply = self._controller.msg(line)
        except stem.SocketError as exc:
            raise ControlError(f"lost the connection to tor's control port {self.endpoint}: "
                               f"{exc}") from None
        name = line.split(" ", 1)[0]
        if not reply.is_ok():
            code, _, message = reply.content()[0]
            raise TorRefused(f"tor refused {name}: {code} {message}", code, name)
        return [content for _, _, content in reply.content()]

    def getconf(self, *keys: str) -> list[tuple[str, str | None]]:
        return parse_getconf(self.command("GETCONF " + " ".join(keys)))

    def getconf_values(self, key: str) -> list[str]:
        return [v for k, v in self.getconf(key) if v is not None]

    def getinfo(self, key: str) -> str:
        """One GETINFO value (multi-line values joined with newlines)."""
        import stem

        try:
            reply = self._controller.msg(f"GETINFO {key}")
        except stem.SocketError as exc:
            raise ControlError(f"lost the connection to tor's control port {self.endpoint}: "
                               f"{exc}") from None
        if not reply.is_ok():
            code, _, message = reply.content()[0]
            raise TorRefused(f"tor refused GETINFO {key}: {code} {message}", code, "GETINFO")
        for _, divider, content in reply.content():
            name, _, value = content.partition("=")
            if name == key:
                if divider == "+":
                    return value.split("\n", 1)[1] if "\n" in value else ""
                return value
        return ""

    def setconf(self, changes: Sequence[tuple[str, Sequence[str | None]]]) -> None:
        self.command(setconf_command(changes))

    def save(self) -> None:
        """SAVECONF: tor rewrites its torrc (comments are lost; tor keeps the old file as
        ``torrc.orig.1``).  Fails where tor may not write its torrc (Debian: /etc/tor/torrc is
        root's, and AppArmor forbids it).  Refused when torrc uses %include: tor 0.4.9 refuses
        SAVECONF then, but only until the first SETCONF; after one it copies the included files
        into torrc and drops the %include line."""
        path = self._getinfo_or("config-file", "")
        try:
            text = Path(path).read_text(errors="replace") if path else ""
        except OSError:
            text = ""
        if any(line.strip().lower().startswith("%include") for line in text.splitlines()):
            raise SaveConfError(
                f"not saving: {path} uses %include, and tor's SAVECONF would copy the included "
                "files into it and drop the %include line.  The change is active but lost when "
                "tor restarts: add the lines of 'torroute torrc' to a file it includes")
        try:
            self.command("SAVECONF")
        except TorRefused as exc:
            raise SaveConfError(
                f"tor could not save its configuration ({exc.code} {exc}): the change is "
                "active but lost when tor restarts.  Add the lines of 'torroute torrc' to "
                "torrc, or make the torrc writable for tor") from None

    # -- status / ensure --------------------------------------------------------------------

    def settings(self) -> TorSettings:
        conf = self.getconf("SocksPort", "DNSPort", "AutomapHostsOnResolve",
                            "AutomapHostsSuffixes", "VirtualAddrNetworkIPv4", "DisableNetwork")
        values: dict[str, list[str]] = {}
        for key, value in conf:
            values.setdefault(key.lower(), [])
            if value is not None:
                values[key.lower()].append(value)

        def one(key: str, default: str) -> str:
            got = values.get(key.lower()) or [default]
            return got[0]

        suffixes = ",".join(values.get("automaphostssuffixes") or [".onion,.exit"])
        return TorSettings(
            socks_ports=values.get("socksport", []),
            dns_ports=values.get("dnsport", []),
            socks_listeners=parse_quoted_list(self._getinfo_or("net/listeners/socks", "")),
            dns_listeners=parse_quoted_list(self._getinfo_or("net/listeners/dns", "")),
            automap=one("AutomapHostsOnResolve", "0") == "1",
            suffixes=[s for s in suffixes.split(",") if s],
            virtual_network=one("VirtualAddrNetworkIPv4", "127.192.0.0/10"),
            disable_network=one("DisableNetwork", "0") == "1",
        )

    def _getinfo_or(self, key: str, default: str) -> str:
        try:
            return self.getinfo(key)
        except TorRefused:
            return default

    def bootstrap(self) -> Bootstrap:
        return parse_bootstrap(self._getinfo_or("status/bootstrap-phase", ""))

    def status(self, config: Config | None = None) -> Status:
        config = config or Config()
        settings = self.settings()
        return Status(
            control=str(self.endpoint),
            version=self.getinfo("version").split()[0],
            bootstrap=self.bootstrap(),
            network_liveness=self._getinfo_or("network-liveness", "unknown"),
            circuit_established=self._getinfo_or("status/circuit-established", "0") == "1",
            settings=settings,
            problems=check_settings(settings, config),
        )

    def ensure(self, config: Config | None = None, *, save: bool = False,
               dry_run: bool = False) -> EnsureResult:
        """Set what torroute needs that is missing (see :func:`plan_ensure`), optionally
        SAVECONF.  A dry run only plans."""
        config = config or Config()
        settings = self.settings()
        changes = plan_ensure(settings, config)
        applied = saved = False
        if changes and not dry_run:
            try:
                self.setconf(changes)
            except TorRefused as exc:
                hint = ""
                if "bind" in str(exc).lower():
                    hint = " (is another program using the port?)"
                raise TorRefused(f"{exc}{hint}; tried: {setconf_command(changes)}",
                                 exc.code, exc.command) from None
            applied = True
        if save and not dry_run:
            self.save()
            saved = True
        remaining = [p for p in check_settings(self.settings() if applied else settings, config)
                     if not p.fixable]
        return EnsureResult(changes, applied, saved, remaining)

    def reverse(self, ip: str) -> str | None:
        """The .onion name behind an automap virtual address (``GETINFO address-mappings/all``),
        e.g. to make sense of a log line that only shows 127.2xx.x.x."""
        return reverse_lookup(parse_address_mappings(self.getinfo("address-mappings/all")), ip)

    # -- onion services ---------------------------------------------------------------------

    def hidden_service_blocks(self) -> list[HsBlock]:
        return group_hidden_services(self.getconf("HiddenServiceOptions"))

    def ephemeral_ids(self) -> list[str]:
        """Service ids of ADD_ONION services: detached ones and this connection's."""
        ids: list[str] = []
        for key in ("onions/detached", "onions/current"):
            ids += [line.strip() for line in self._getinfo_or(key, "").splitlines()
                    if line.strip()]
        return ids

    def list_onions(self) -> list[OnionService]:
        services: list[OnionService] = []
        for block in self.hidden_service_blocks():
            address, note = None, None
            try:
                address = directory_address(Path(block.directory))
            except ConfigError as exc:
                note = str(exc)
            services.append(OnionService(address, block.ports, block.directory,
                                         options=block.options, changed=False, note=note))
        for sid in self.ephemeral_ids():
            services.append(OnionService(f"{sid}.onion", [], None, changed=False,
                                         note="ephemeral (ADD_ONION): tor does not report its "
                                         "ports"))
        return services

    def create_onion(self, ports: Sequence[PortMapping | str], *,
                     directory: str | os.PathLike[str] | None = None,
                     key_file: str | os.PathLike[str] | None = None,
                     wait: bool = True, timeout: float = 120.0, force: bool = False,
                     save: bool = True, progress: Progress | None = None,
                     probe_timeout: float = 5.0) -> OnionService:
        """Publish an onion service.

        ``directory``: persistent (SETCONF HiddenServiceDir/Port with every existing service
        resent, then SAVECONF unless ``save=False``).  Otherwise ephemeral (ADD_ONION, detached
        so it outlives this connection): with ``key_file`` the key is created there (0600)
        *before* tor sees it, or reused, so the same address comes back after a tor restart.
        Unless ``force``, refuses ports 25/587 leading to an smtpd that relays for us.
        With ``wait`` it returns once tor uploaded the descriptor (HS_DESC UPLOADED) or raises
        DescriptorTimeout (the service stays).
        """
        mappings = [p if isinstance(p, PortMapping) else _parse_mapping(p) for p in ports]
        if not mappings:
            raise ConfigError("an onion service needs at least one --port")
        if directory is not None and key_file is not None:
            raise ConfigError("give a directory (persistent) or a key file (ephemeral), not both")
        verdicts = relay_check(mappings, probe_timeout)
        for v in verdicts:
            log.info("relay check: %s", v.line())
        refusal = relay_refusal(verdicts)
        if refusal and not force:
            raise OpenRelayRisk(refusal, verdicts)
        if refusal and progress:
            progress("warning (--force): " + refusal.split("\n", 1)[1].strip())
        for v in verdicts:
            if v.verdict == "no-listener" and progress:
                progress(f"warning: nothing answers at {v.mapping.target} yet ({v.detail}); "
                         "make sure the smtpd you put there does not relay for 127.0.0.1")
        watcher = _DescWatcher(self) if wait else None
        try:
            if directory is not None:
                service = self._create_persistent(str(directory), mappings, save)
            else:
                service = self._create_ephemeral(mappings, key_file)
            if watcher is not None and service.address and service.changed:
                try:
                    watcher.wait(service.address, timeout, progress, service)
                except DescriptorTimeout as exc:
                    service.uploaded = False
                    exc.service = service
                    raise
                service.uploaded = True
            return service
        finally:
            if watcher is not None:
                watcher.close()

    def _create_persistent(self, directory: str, mappings: list[PortMapping],
                           save: bool) -> OnionService:
        if not directory.startswith("/"):
            raise ConfigError(f"{directory!r}: the service directory must be an absolute path")
        blocks = self.hidden_service_blocks()
        mine = next((b for b in blocks if _norm_dir(b.directory) == _norm_dir(directory)), None)
        changed = True
        if mine is None:
            blocks.append(HsBlock(directory, [("HiddenServicePort", p.torrc_value)
                                              for p in mappings]))
        elif mine.ports == mappings:
            changed = False
        else:  # same directory, new ports: keep its other options
            mine.lines = mine.options + [("HiddenServicePort", p.torrc_value) for p in mappings]
        if changed:
            self.setconf(flatten_hidden_services(blocks))
        note = None
        try:
            address: str | None = directory_address(Path(directory), wait=5.0)
        except ConfigError as exc:
            address, note = None, str(exc)
        service = OnionService(address, mappings, directory, changed=changed, note=note)
        if save and changed:
            try:
                self.save()
            except SaveConfError as exc:
                from .torrc import onion_service_lines

                lines = "\n  ".join(onion_service_lines(directory, mappings))
                raise SaveConfError(f"the onion service {address or directory} runs now, but "
                                    f"{exc}.  The torrc lines:\n  {lines}") from None
        return service

    def _create_ephemeral(self, mappings: list[PortMapping],
                          key_file: str | os.PathLike[str] | None) -> OnionService:
        flags = ["Detach"]
        if key_file is None:
            key_arg = "NEW:ED25519-V3"
            flags.append("DiscardPK")
            address = None
        else:
            path = Path(key_file)
            if path.exists():
                key = read_key_file(path)
            else:
                key = new_expanded_key()
                try:
                    write_key_file(path, key)
                except OSError as exc:
                    raise ConfigError(f"cannot write the onion key file {path}: "
                                      f"{exc.strerror}") from None
            key_arg = KEY_PREFIX + base64.b64encode(key).decode("ascii")
            address = address_from_expanded_key(key)
            sid = address.removesuffix(".onion")
            if sid in self.ephemeral_ids():  # running already: replace (the ports may differ)
                self.command(f"DEL_ONION {sid}")
        ports = " ".join(f"Port={p.add_onion_value}" for p in mappings)
        lines = self.command(f"ADD_ONION {key_arg} Flags={','.join(flags)} {ports}")
        sid = next((ln.split("=", 1)[1] for ln in lines if ln.startswith("ServiceID=")), None)
        if sid is None:
            raise TorRefused("tor's ADD_ONION reply has no ServiceID", "", "ADD_ONION")
        got = f"{sid}.onion"
        if address is not None and got != address:
            raise TorRefused(f"tor made {got} from the key of {address}", "", "ADD_ONION")
        return OnionService(got, mappings, None,
                            key_file=str(key_file) if key_file is not None else None,
                            note=None if key_file else "no key file: the address is gone when "
                            "tor restarts")

    def remove_onion(self, which: str, *, save: bool = True) -> OnionService:
        """Remove a service by onion address or (persistent) directory.  A persistent
        service's directory (its key) is left on disk: delete it yourself if you mean it."""
        which = which.strip()
        if which.lower().rstrip(".").endswith(".onion"):
            address = parse_onion(which).host
            sid = address.removesuffix(".onion")
            if sid in self.ephemeral_ids():
                self.command(f"DEL_ONION {sid}")
                return OnionService(address, [], None)
            blocks = self.hidden_service_blocks()
            found = None
            for block in blocks:
                try:
                    if directory_address(Path(block.directory)) == address:
                        found = block
                except ConfigError:
                    continue
        else:
            if not which.startswith("/"):
                raise ConfigError(f"{which!r}: give an onion address or an absolute directory")
            blocks = self.hidden_service_blocks()
            found = next((b for b in blocks if _norm_dir(b.directory) == _norm_dir(which)), None)
        if found is None:
            raise OnionNotFound(f"tor runs no onion service {which}")
        rest = [b for b in blocks if b is not found]
        if rest:
            self.setconf(flatten_hidden_services(rest))
        else:
            self.command("RESETCONF HiddenServiceDir")
        service = OnionService(None, found.ports, found.directory, options=found.options)
        try:
            service.address = directory_address(Path(found.directory))
        except ConfigError:
            pass
        if save:
            self.save()
        return service


def _parse_mapping(text: str) -> PortMapping:
    from .torrc import parse_port_mapping

    try:
        return parse_port_mapping(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class _DescWatcher:
    """Collect HS_DESC events (subscribed before the service exists, so none is missed)."""

    def __init__(self, tor: Tor) -> None:
        from stem.control import EventType

        self.tor = tor
        self.events: queue.Queue[HsDescEvent] = queue.Queue()
        self._type = EventType.HS_DESC
        tor._controller.add_event_listener(self._on_event, self._type)

    def _on_event(self, event: Any) -> None:
        parsed = parse_hs_desc(str(event))
        if parsed is not None:
            self.events.put(parsed)

    def close(self) -> None:
        try:
            self.tor._controller.remove_event_listener(self._on_event)
        except Exception:  # the connection may be gone already
            pass

    def wait(self, address: str, timeout: float, progress: Progress | None,
             service: OnionService | None = None) -> None:
        sid = address.removesuffix(".onion")
        started = time.monotonic()
        deadline = started + timeout
        uploads = uploaded = failed = 0
        if progress:
            progress(f"waiting up to {timeout:.0f}s for tor to publish {address} "
                     "(HS_DESC UPLOADED)...")
        next_tick = started + 10
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                event = self.events.get(timeout=min(1.0, deadline - now))
            except queue.Empty:
                if progress and time.monotonic() >= next_tick:
                    next_tick += 10
                    boot = self.tor.bootstrap()
                    progress(f"  {time.monotonic() - started:.0f}s: {uploads} uploads started, "
                             f"{uploaded} done, {failed} failed (tor bootstrap "
                             f"{boot.progress}%: {boot.summary})")
                continue
            if event.address != sid:
                continue
            if event.action == "UPLOAD":
                uploads += 1
            elif event.action == "FAILED":
                failed += 1
                if progress:
                    progress(f"  upload to {event.hsdir or 'an HSDir'} failed "
                             f"({event.reason or 'no reason given'})")
            elif event.action == "UPLOADED":
                uploaded += 1
                if progress:
                    progress(f"  descriptor uploaded to {event.hsdir or 'an HSDir'} after "
                             f"{time.monotonic() - started:.1f}s")
                return
        boot = self.tor.bootstrap()
        why = "" if boot.done else (f"; tor is not connected to the Tor network "
                                    f"(bootstrap {boot.progress}%: {boot.summary}"
                                    f"{', ' + boot.warning if boot.warning else ''})")
        raise DescriptorTimeout(
            f"tor did not upload the descriptor of {address} within {timeout:.0f}s "
            f"({uploads} uploads started, {failed} failed){why}.  The service exists and is "
            "published once tor is online", service)


_CONTROLLER_CLASS: Any = None


def _controller_class() -> Any:
    """stem's Controller without TAKEOWNERSHIP: stem sends it when tor's
    __OwningControllerProcess is our pid, and tor then exits when this connection closes.
    torroute only visits tor; it must never own it."""
    global _CONTROLLER_CLASS
    if _CONTROLLER_CLASS is None:
        import stem.control

        class VisitingController(stem.control.Controller):
            def _post_authentication(self) -> None:
                stem.control.BaseController._post_authentication(self)

        _CONTROLLER_CLASS = VisitingController
    return _CONTROLLER_CLASS


def _connect_error(endpoint: ControlEndpoint, exc: Exception) -> Exception:
    text = str(exc)
    if endpoint.path:
        path = endpoint.path
        if "No such file" in text or "Errno 2]" in text:
            return ControlError(
                f"tor's control socket {path} does not exist: is tor running, with "
                f"'ControlSocket {path}' in torrc (Debian's tor has /run/tor/control)?  "
                "Or set [tor] control / --tor-control")
        if "Permission denied" in text or "Errno 13]" in text:
            return ControlAuthError(
                f"permission denied on tor's control socket {path}: "
                f"{_group_hint(path)}")
        if "Connection refused" in text:
            return ControlError(f"tor's control socket {path} refuses connections: tor is "
                                "not running (a stale socket file)")
    elif "refused" in text.lower():
        return ControlError(
            f"nothing listens on tor's control port {endpoint.host}:{endpoint.port}: is tor "
            f"running, with 'ControlPort {endpoint.host}:{endpoint.port}' in torrc?  "
            "Or set [tor] control / --tor-control")
    return ControlError(f"cannot connect to tor's control port {endpoint}: {text}")


def _group_hint(path: str) -> str:
    """Who may open a socket or read a cookie, in words an admin can act on."""
    try:
        st = os.stat(path)
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        return "run as root or as a member of tor's group (Debian: debian-tor)"
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return (f"it is {stat.filemode(st.st_mode)} group {group}: run as root or add this user to "
            f"that group (adduser {user} {group}, then log in again)")


def _authenticate(controller: Any, endpoint: ControlEndpoint, password: str | None) -> None:
    import stem
    import stem.connection as sc

    try:
        info = sc.get_protocolinfo(controller)
    except stem.ProtocolError:
        raise ControlError(f"{endpoint} is not a tor control port (no PROTOCOLINFO reply): "
                           "check [tor] control") from None
    except stem.SocketError as exc:
        raise ControlError(f"tor's control port {endpoint} closed the connection: {exc}"
                           ) from None
    methods = set(info.auth_methods)
    if password is not None and sc.AuthMethod.PASSWORD in methods:
        try:
            sc.authenticate_password(controller, password, suppress_ctl_errors=False)
            controller._post_authentication()
            return
        except (sc.IncorrectPassword, sc.PasswordAuthRejected):
            raise ControlAuthError(f"tor rejected the control password (tor.control_password) "
                                   f"on {endpoint}") from None
        except sc.AuthenticationFailure as exc:
            raise ControlAuthError(f"password authentication on {endpoint} failed: {exc}"
                                   ) from None
    if password is not None and sc.AuthMethod.PASSWORD not in methods:
        log.warning("tor at %s does not use password authentication; ignoring "
                    "tor.control_password", endpoint)
    try:
        sc.authenticate(controller, password=None, protocolinfo_response=info)
    except sc.UnreadableCookieFile as exc:
        cookie = exc.cookie_path
        raise ControlAuthError(
            f"cannot read tor's control cookie {cookie} ({_reason(exc)}): "
            f"{_group_hint(cookie)}; tor needs 'CookieAuthFileGroupReadable 1' for the group to "
            "read it (Debian's tor has it).  Or use a control password (HashedControlPassword "
            "in torrc, [tor] control_password)") from None
    except sc.MissingPassword:
        raise ControlAuthError(f"tor at {endpoint} wants a control password "
                               "(HashedControlPassword): set control_password in torroute's "
                               "[tor] table or give --tor-control-password-file") from None
    except (sc.IncorrectCookieValue, sc.IncorrectCookieSize) as exc:
        raise ControlAuthError(f"tor rejected its own cookie file ({exc}): is {endpoint} the "
                               "control port of the tor that wrote it?") from None
    except sc.AuthenticationFailure as exc:
        raise ControlAuthError(f"cannot authenticate to tor at {endpoint}: {exc}") from None
    except stem.SocketError as exc:
        raise ControlError(f"tor's control port {endpoint} closed the connection: {exc}"
                           ) from None


def _reason(exc: Exception) -> str:
    text = str(exc)
    return "permission denied" if "ermission denied" in text else text
