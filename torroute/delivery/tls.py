"""STARTTLS to an onion MX: the client context and the certificate check of ``tls_verify``.

Shared by both session drivers (:mod:`torroute.delivery.session`, :mod:`torroute.delivery.relay`).
``ssl`` is imported only when a context is made or a handshake failed: the pipe program's
success path without STARTTLS never loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import ssl


class TlsSettings(Protocol):
    """What the context needs of :class:`~torroute.delivery.settings.DeliverSettings`."""

    tls_verify: bool
    tls_ca_file: str | None


def tls_context(settings: TlsSettings) -> ssl.SSLContext:
    """The client TLS context, made once per settings object (the relay opens many
    connections; loading the system CA store costs ~10-20 ms).

    Without ``tls_verify`` nothing is checked: the onion address already authenticates the
    server's key.  With it the chain must verify against ``tls_ca_file`` (else the system
    store); the host name is matched by :func:`tls_check_peer`, against the recipient domain,
    not by ``ssl`` against the onion.  Raises ConfigError for an unusable CA file."""
    context = settings.__dict__.get("_tls_context")
    if context is None:
        import ssl

        if settings.tls_verify:
            try:
                context = ssl.create_default_context(cafile=settings.tls_ca_file)
            except (OSError, ssl.SSLError) as exc:
                from ..errors import ConfigError

                raise ConfigError(f"deliver.tls_ca_file {settings.tls_ca_file}: {exc}") from None
            context.check_hostname = False
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        settings._tls_context = context  # type: ignore[attr-defined]
    return context


def certificate_names(cert: dict | None) -> list[str]:
    """The DNS names a certificate (``getpeercert()``) is for: its subjectAltName DNS entries,
    else its subject common names (RFC 6125 6.4.4)."""
    if not cert:
        return []
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        names = [value for rdn in cert.get("subject", ()) for key, value in rdn
                 if key == "commonName"]
    return [n.lower().rstrip(".") for n in names]


def _name_matches(name: str, reference: str) -> bool:
    """Postfix's ``smtp_tls_verify_cert_match = nexthop, dot-nexthop``: the name is the
    reference domain or a host under it (``mx.example.org``, ``*.example.org``); a wildcard
    also stands for one label of the reference (``*.example.org`` for ``a.example.org``),
    never a whole registered domain (``*.org``)."""
    if name == reference or name.endswith("." + reference):
        return True
    if name.startswith("*."):
        parent = name[2:]
        return "." in parent and reference.partition(".")[2] == parent
    return False


def tls_check_peer(cert: dict | None, onion: str, domains: Sequence[str]) -> str | None:
    """None if the verified certificate names the onion, or every recipient domain; else why
    not (one line).  What a postmaster expects of ``verify``: the MX proves it serves the
    recipient's domain, as Postfix checks the nexthop domain of an MX lookup."""
    names = certificate_names(cert)
    if onion.endswith(".onion"):
        onion = ".".join(onion.split(".")[-2:])  # the service, without a subdomain
    if any(_name_matches(n, onion) for n in names):
        return None
    missing = [d for d in domains if not any(_name_matches(n, d) for n in names)]
    if domains and not missing:
        return None
    shown = ", ".join(names[:5]) or "no DNS name"
    wanted = ", ".join(missing or domains) or "the recipient domain"
    return (f"TLS certificate is for {shown}, not {wanted} nor {onion} (deliver.tls_verify); "
            "the message was not sent")


def tls_untrusted(exc: BaseException) -> str | None:
    """The text for a certificate that failed verification during the handshake, else None
    (another TLS error: a handshake failure, reported as such)."""
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message or exc} (deliver.tls_verify)"
    return None
