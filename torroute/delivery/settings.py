"""The ``[deliver]`` settings: what one delivery needs (the pipe, the LMTP relay, send_message)."""

from __future__ import annotations

import os
from typing import Any

from ..config import Section, boolean, domain_matches, domain_pattern, seconds, text
from ..errors import ConfigError
from ..protocols.smtp import Options

STARTTLS_MODES = ("no", "opportunistic", "required")
#: the settings DeliverSettings.from_config's overrides may set (the CLI's flags), by [deliver] key
OVERRIDABLE = ("ehlo_name", "starttls", "connect_timeout", "command_timeout", "data_timeout",
               "time_limit", "isolate", "tls_verify", "tls_ca_file", "pipelining",
               "chunking", "require_onion")


def _patterns(value: Any) -> tuple[str, ...]:
    """Sender domain patterns, as the [routing] domain lists: ``d`` or ``.d`` (subdomains)."""
    if not isinstance(value, list):
        raise ConfigError("expected a list of domain patterns")
    return tuple(domain_pattern(text(v)) for v in value)


def _header_names(value: Any) -> tuple[str, ...]:
    """Header field names (``X-*``: every name with that prefix, as Exim's headers_remove)."""
    if not isinstance(value, list):
        raise ConfigError("expected a list of header names")
    names = tuple(text(v).strip() for v in value)
    for name in names:
        if not name or not name.isascii() or any(c <= " " or c == ":" for c in name) \
                or "*" in name[:-1]:
            raise ConfigError(f"{name!r} is not a header field name")
    return names


#: the [deliver] table (the defaults are DeliverSettings' class attributes)
DELIVER = Section("deliver", {
    "ehlo_name": text, "starttls": text, "tls_verify": boolean, "tls_ca_file": text,
    "pipelining": boolean, "chunking": boolean, "connect_timeout": seconds,
    "command_timeout": seconds, "data_timeout": seconds, "time_limit": seconds, "isolate": boolean,
    "require_onion": boolean,
    # the header policy for mail from onion identities (docs/scrub.rst)
    "scrub_senders": _patterns, "scrub_headers": _header_names, "scrub_message_id": boolean,
})


class DeliverSettings:
    """What one delivery needs; see docs/postfix.rst for the [deliver] table.  (A plain class:
    a dataclass costs ~0.5 ms at import, in a program started once per message.)"""

    proxy: tuple[str, int] = ("127.0.0.1", 9050)
    ehlo_name: str = "localhost"  # never the host's clear-net name by default
    starttls: str = "no"  # over an onion the address authenticates the server already
    tls_verify: bool = False  # CA-verified certificate naming the recipient domain or the onion
    tls_ca_file: str | None = None  # CA certificates for tls_verify (default: the system's)
    pipelining: bool = True
    #: BDAT when the MX offers CHUNKING (Postfix >= 3.4 and Exim >= 4.88 do): the message goes
    #: with its envelope instead of after DATA's 354, one onion round trip less per message
    chunking: bool = True
    connect_timeout: float = 120.0  # SOCKS connect, includes building the onion circuit
    command_timeout: float = 300.0  # greeting, EHLO, MAIL, RCPT, DATA (RFC 5321 4.5.3.2)
    data_timeout: float = 600.0  # sending the message and waiting for the final reply
    time_limit: float = 900.0  # whole run; below pipe's default command_time_limit (1000 s)
    isolate: bool = False  # IsolateSOCKSAuth: own circuits per destination
    require_onion: bool = True  # a non-onion nexthop is a configuration error: defer
    default_port: int = 25
    #: scrub_*: whose mail is scrubbed (sender domain patterns; () = nobody's), which headers
    #: (None: torroute.delivery.scrub.DEFAULT_HEADERS), whether a new Message-ID replaces the old
    scrub_senders: tuple[str, ...] = (".onion",)
    scrub_headers: tuple[str, ...] | None = None
    scrub_message_id: bool = True

    def __init__(self, **values) -> None:
        for key, value in values.items():
            if not hasattr(DeliverSettings, key):
                raise TypeError(f"unknown setting {key}")
            setattr(self, key, value)

    @classmethod
    def from_config(cls, config, overrides: dict | None = None) -> DeliverSettings:
        """Read ``[deliver]``; ``overrides`` (``{key: value}``, a None value = not given) win:
        the CLI passes its flags so, the library never sees argparse."""
        from ..errors import ConfigError

        settings = cls(proxy=tuple(config.tor_socks), isolate=bool(config.isolate_streams),
                       default_port=config.default_port,
                       connect_timeout=float(config.socks_timeout))
        for key, value in DELIVER.read(config).items():
            setattr(settings, key, value)
        for key, value in (overrides or {}).items():
            if key not in OVERRIDABLE:
                raise ConfigError(f"unknown deliver override {key}")
            if value is not None:
                setattr(settings, key, value)
        if settings.starttls not in STARTTLS_MODES:
            raise ConfigError(f"deliver.starttls: expected one of {', '.join(STARTTLS_MODES)}")
        if settings.tls_ca_file is not None and not os.access(settings.tls_ca_file, os.R_OK):
            raise ConfigError(f"deliver.tls_ca_file {settings.tls_ca_file}: not readable")
        if settings.tls_verify:
            from .tls import tls_context

            settings.starttls = "required"  # Postfix's verify level: TLS is mandatory
            tls_context(settings)  # a CA file that does not load is a configuration error now
        name = settings.ehlo_name
        if not name or not name.isascii() or any(c.isspace() for c in name):
            raise ConfigError(f"deliver.ehlo_name {name!r}: expected one ASCII word")
        return settings

    def scrub_domain(self, sender: str | bytes) -> str | None:
        """The envelope sender's domain (lower case) if its mail is to be scrubbed, else None
        (also for the null sender).  Cheap: the scrubber is imported only for such mail."""
        if isinstance(sender, bytes):
            sender = sender.decode("utf-8", "replace")
        domain = sender.rpartition("@")[2].strip().rstrip(".").lower() if "@" in sender else ""
        if not domain:
            return None
        if not domain.isascii():  # the patterns are A-labels (config.domain_pattern)
            try:
                domain = domain.encode("idna").decode("ascii")
            except UnicodeError:
                pass
        return domain if domain_matches(domain, self.scrub_senders) else None

    def scrubbed(self, sender: str | bytes, message: bytes) -> bytes:
        """``message`` as it may leave for ``sender`` (docs/scrub.rst): unchanged unless the
        sender's domain matches ``scrub_senders``.  Before the SMTP client's CRLF and
        dot-stuffing, on every path the same.  Never raises."""
        domain = self.scrub_domain(sender)
        if domain is None:
            return message
        from .scrub import DEFAULT_HEADERS, message_id_domain, scrub

        names = DEFAULT_HEADERS if self.scrub_headers is None else self.scrub_headers
        return scrub(message, names, message_id_domain(domain) if self.scrub_message_id
                     else None)

    def client_options(self, destination: str, per_recipient: bool = False,
                       keep_alive: bool = False) -> Options:
        """The SMTP client's options for one target (``destination``: "<onion>:<port>")."""
        return Options(ehlo_name=self.ehlo_name, starttls=self.starttls,
                       pipelining=self.pipelining, destination=destination,
                       per_recipient=per_recipient, keep_alive=keep_alive,
                       chunking=self.chunking)
