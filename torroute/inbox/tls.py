"""STARTTLS for the sink: a self-signed key and certificate, made once with openssl(1).

Why self-signed and why openssl: an onion address already authenticates the server (the
address is its key), so TLS inside the onion circuit only adds what some senders insist on;
nobody can get a CA certificate for a .onion cheaply.  Python's ssl module cannot make keys;
openssl(1) is in every Debian (package openssl), so no new dependency.  The key is written
0600 before it holds anything.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

from ..errors import ConfigError


def make_self_signed(key: Path, cert: Path, name: str, days: int = 3650) -> None:
    """Write an EC P-256 key and a self-signed certificate for ``name``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("--starttls: openssl(1) not found to make the key (apt-get install "
                          "openssl), or give an existing --tls-key/--tls-cert")
    key.parent.mkdir(parents=True, exist_ok=True)
    cert.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    cn = name[:64] or "localhost"
    result = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", str(days),
         "-subj", f"/CN={cn}", "-addext", f"subjectAltName=DNS:{cn}"],
        capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise ConfigError(f"--starttls: openssl could not make {key}: "
                          f"{result.stderr.strip()[-300:]}")
    os.chmod(key, 0o600)


def server_context(key: Path, cert: Path, name: str) -> ssl.SSLContext:
    """The server TLS context; key and certificate are made first if both are missing."""
    if not key.exists() and not cert.exists():
        make_self_signed(key, cert, name)
    elif not key.exists() or not cert.exists():
        raise ConfigError(f"--starttls: {key if not key.exists() else cert} is missing "
                          "(remove both to have new ones made)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--starttls: cannot load {cert} / {key}: {exc}") from None
    return context
