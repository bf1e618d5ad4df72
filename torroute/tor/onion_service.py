"""Onion services of a tor, the pure and file parts: what a service is (:class:`OnionService`),
the ``HiddenService*`` lines grouped per service (GETCONF/SETCONF resend them all), ephemeral
service keys (made and written here, 0600, *before* tor sees them) and a persistent service's
``hostname`` file.  The control-port calls are :class:`~torroute.tor.control.Tor`'s.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..routing.onion import onion_from_pubkey, parse_onion
from .torrc import PortMapping, parse_hidden_service_port

__all__ = ["OnionService", "HsBlock", "group_hidden_services", "flatten_hidden_services",
           "norm_dir", "KEY_PREFIX", "new_expanded_key", "address_from_expanded_key",
           "decode_key_file", "encode_key_file", "read_key_file", "write_key_file",
           "key_file_address", "directory_address"]


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


def norm_dir(path: str) -> str:
    """The form two HiddenServiceDir values are compared in."""
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

