"""The envelope as the SMTP client sends it: the MAIL FROM path and the recipients' domains."""

from __future__ import annotations

import os
from collections.abc import Sequence


def envelope_sender(sender: str) -> bytes:
    """The MAIL FROM path.  pipe(8) expands the null sender to ``MAILER-DAEMON`` unless the
    master.cf entry says ``null_sender=``; an unqualified MAILER-DAEMON is never a real remote
    sender, so it means <> here too (a bounce must not get a bounce address)."""
    raw = os.fsencode(sender.strip())
    if raw in (b"<>", b"") or raw.upper() == b"MAILER-DAEMON":
        return b""
    return raw


def recipient_domains(recipients: Sequence[str | bytes]) -> list[str]:
    """The distinct domains of the recipients (IDNA A-labels, as certificates carry them), for
    ``tls_verify``; a recipient without a usable domain is left out (only the onion name can
    match it).  The router's own rule (``destination_domain``, ``normalize_domain``)."""
    from ..config import normalize_domain
    from ..routing.decisions import destination_domain

    domains: list[str] = []
    for rcpt in recipients:
        text = rcpt.decode("utf-8", "surrogateescape") if isinstance(rcpt, bytes) else rcpt
        try:
            domain = normalize_domain(destination_domain(text.strip(" <>")))
        except ValueError:
            continue
        if domain not in domains:
            domains.append(domain)
    return domains
