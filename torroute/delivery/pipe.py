"""``torroute deliver``: a Postfix ``pipe(8)`` delivery program that speaks SMTP to an onion MX
through Tor's SocksPort.

Why a native program instead of Postfix's ``smtp`` under ``torsocks``: torsocks breaks Postfix
(IPv6 sockets, connection-cache descriptor passing, throttled transports).  This program is
started once per message (or per recipient with ``recipient_limit = 1``), so it imports only the
standard library on the success path: the SOCKS5 handshake is :mod:`torroute.protocols.socks5`
(pure, with tor's error table) driven by :func:`torroute.tor.dial.connect`, the SMTP protocol is
:mod:`torroute.protocols.smtp` (pure); neither asyncio nor python-socks is imported.

Every path ends in an :class:`~torroute.protocols.smtp.Outcome`: exit 0 delivered, 75 deferred, 69
bounced, with the enhanced status code first on stdout (pipe(8): it wins over the exit status).
Nothing is ever sent except through Tor; anything unexpected defers.

Backup MXs: Postfix's ``${nexthop}`` names one onion, the first SRV target.  When it fails
before the message was sent (tor cannot reach it, no or a bad greeting, ...), the program routes
the recipients' domain itself, with the same configuration as the daemon, and tries the further
SRV targets in RFC 2782 order within the same ``time_limit``.  :mod:`torroute.routing.router`
(dnspython) is imported only then, so the start-up cost of a delivery that works is unchanged.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence

from ..errors import SocksError, TlsRefused
from ..protocols.smtp import (
    DEFERRED,
    Close,
    Options,
    Outcome,
    Send,
    SmtpClient,
    StartTLS,
    permanent,
    temporary,
)
from ..tor import dial as tordial

Target = tuple[str, int]  # (onion, port)

# ---- settings ([deliver] in the configuration, then command-line flags)

STARTTLS_MODES = ("no", "opportunistic", "required")
#: the settings DeliverSettings.from_config's overrides may set (the CLI's flags), by [deliver] key
OVERRIDABLE = ("ehlo_name", "starttls", "connect_timeout", "command_timeout", "data_timeout",
               "time_limit", "isolate", "tls_verify", "tls_ca_file", "pipelining",
               "require_onion")


class DeliverSettings:
    """What one delivery needs; see docs/postfix.rst for the [deliver] table.  (A plain class:
    a dataclass costs ~0.5 ms at import, in a program started once per message.)"""

    proxy: tuple[str, int] = ("127.0.0.1", 9050)
    ehlo_name: str = "localhost"  # never the host's clear-net name by default
    starttls: str = "no"  # over an onion the address authenticates the server already
    tls_verify: bool = False  # CA-verified certificate naming the recipient domain or the onion
    tls_ca_file: str | None = None  # CA certificates for tls_verify (default: the system's)
    pipelining: bool = True
    connect_timeout: float = 120.0  # SOCKS connect, includes building the onion circuit
    command_timeout: float = 300.0  # greeting, EHLO, MAIL, RCPT, DATA (RFC 5321 4.5.3.2)
    data_timeout: float = 600.0  # sending the message and waiting for the final reply
    time_limit: float = 900.0  # whole run; below pipe's default command_time_limit (1000 s)
    isolate: bool = False  # IsolateSOCKSAuth: own circuits per destination
    require_onion: bool = True  # a non-onion nexthop is a configuration error: defer
    default_port: int = 25

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

        table = dict(config.section("deliver"))
        settings = cls(proxy=tuple(config.tor_socks), isolate=bool(config.isolate_streams),
                       default_port=config.default_port,
                       connect_timeout=float(config.socks_timeout))
        kinds = {"ehlo_name": str, "starttls": str, "tls_verify": bool, "tls_ca_file": str,
                 "pipelining": bool, "connect_timeout": float, "command_timeout": float,
                 "data_timeout": float, "time_limit": float, "isolate": bool,
                 "require_onion": bool}
        for key, value in table.items():
            kind = kinds.get(key)
            if kind is None:
                raise ConfigError(f"unknown setting deliver.{key}")
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"deliver.{key}: expected true or false")
            if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or value <= 0):
                raise ConfigError(f"deliver.{key}: expected a positive number of seconds")
            if kind is str and not isinstance(value, str):
                raise ConfigError(f"deliver.{key}: expected a string")
            setattr(settings, key, kind(value))
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
            settings.starttls = "required"  # Postfix's verify level: TLS is mandatory
            tls_context(settings)  # a CA file that does not load is a configuration error now
        name = settings.ehlo_name
        if not name or not name.isascii() or any(c.isspace() for c in name):
            raise ConfigError(f"deliver.ehlo_name {name!r}: expected one ASCII word")
        return settings


# ---- nexthop and envelope (pure)


def parse_nexthop(nexthop: str, default_port: int = 25) -> tuple[str, int]:
    """``[onion]:port``, ``onion:port``, ``[onion]`` or ``onion`` (Postfix's ${nexthop} of a
    ``torroute:[<onion>]:<port>`` transport answer) -> (host, port).  Raises ValueError."""
    text = nexthop.strip()
    if text.startswith("torroute:"):  # tolerate the transport name left in
        text = text[len("torroute:"):]
    port = default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"nexthop {nexthop!r}: missing ']'")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nexthop {nexthop!r}: junk after ']'")
            port = _port(rest[1:], nexthop)
    else:
        host, sep, rest = text.rpartition(":")
        if sep:
            port = _port(rest, nexthop)
        else:
            host = text
    host = host.strip().rstrip(".").lower()
    if not host or any(c.isspace() or c in "[]:/@" for c in host) or len(host) > 255:
        raise ValueError(f"nexthop {nexthop!r}: no usable host name")
    return host, port


def _port(text: str, nexthop: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"nexthop {nexthop!r}: bad port {text!r}")
    return int(text)


def recipient_domains(recipients: Sequence[str | bytes]) -> list[str]:
    """The distinct domains of the recipients (IDNA A-labels, as certificates carry them), for
    ``tls_verify``.  Not torroute.routing.router's destination_domain: that module imports
    dnspython."""
    from ..config import normalize_domain

    domains: list[str] = []
    for rcpt in recipients:
        text = rcpt.decode("utf-8", "surrogateescape") if isinstance(rcpt, bytes) else rcpt
        try:
            domain = normalize_domain(text.rsplit("@", 1)[-1].strip(" <>"))
        except ValueError:
            continue  # no usable domain: it can only be matched by the onion name
        if domain not in domains:
            domains.append(domain)
    return domains


def looks_like_onion(host: str) -> bool:
    """A v3 onion name (56 base32 characters + .onion, subdomains allowed); tor checks the key."""
    if not host.endswith(".onion"):
        return False
    label = host[: -len(".onion")].rsplit(".", 1)[-1]
    return len(label) == 56 and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in label)


def envelope_sender(sender: str) -> bytes:
    """The MAIL FROM path.  pipe(8) expands the null sender to ``MAILER-DAEMON`` unless the
    master.cf entry says ``null_sender=``; an unqualified MAILER-DAEMON is never a real remote
    sender, so it means <> here too (a bounce must not get a bounce address)."""
    raw = os.fsencode(sender.strip())
    if raw in (b"<>", b"") or raw.upper() == b"MAILER-DAEMON":
        return b""
    return raw


# ---- SOCKS5 to tor: torroute.protocols.socks5 (codec) and torroute.tor.dial (drivers)


def socks_may_try_next(exc: BaseException, outcome: Outcome) -> bool:
    """Did this dial fail for this destination only, so another SRV target may work?  A
    timeout or a temporary tor reply (0xF0 no descriptor, 0xF2/0xF7 introduction, 0xF3
    rendezvous, 0x01 the service's port closed, ...): yes.  tor's SocksPort unreachable or
    speaking garbage (every target goes through it) or a permanent reply (0xF4..0xF6): no."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return True
    return isinstance(exc, SocksError) and exc.code is not None and \
        outcome.status == DEFERRED


def socks_outcome(exc: BaseException, destination: str, proxy: tuple[str, int],
                  timeout: float) -> Outcome:
    """Classify a failed dial: tor down / temporary refusals defer, a bad address bounces."""
    where = f"{proxy[0]}:{proxy[1]}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return temporary("4.4.1", f"{destination}: connect through tor timed out after "
                         f"{timeout:g}s")
    if isinstance(exc, SocksError):
        message = str(exc)
        if exc.temporary:
            return temporary("4.4.1", f"tor: {message}")
        dsn = "5.1.2" if exc.code == 0xF6 else "5.7.1" if exc.code in (0xF4, 0xF5) else "5.4.4"
        return permanent(dsn, f"tor: {message}")
    if isinstance(exc, ValueError):
        return temporary("4.4.1", f"{destination}: SOCKS5 with tor failed: {exc}")
    return temporary("4.4.1", f"tor SocksPort {where} unreachable: "
                     f"{getattr(exc, 'strerror', None) or exc}")


# ---- the session driver (I/O edge of torroute.protocols.smtp)


class _Clock:
    def __init__(self, limit: float) -> None:
        self.deadline = time.monotonic() + limit

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def budget(self, wanted: float) -> float:
        left = self.left()
        if left <= 0:
            raise TimeoutError("time limit")
        return min(wanted, left)


# ---- TLS (STARTTLS to the onion MX; torroute.delivery.relay uses the same helpers)


def tls_context(settings: DeliverSettings):
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


def tls_wrap(sock: socket.socket, onion: str, settings: DeliverSettings,
             domains: Sequence[str]) -> socket.socket:
    """STARTTLS on ``sock`` (which it consumes).  Raises OSError for a failed handshake,
    TlsRefused for a certificate ``tls_verify`` refuses."""
    tls = tls_context(settings).wrap_socket(sock, server_hostname=onion)
    if settings.tls_verify:
        problem = tls_check_peer(tls.getpeercert(), onion, domains)
        if problem is not None:
            tls.close()
            raise TlsRefused(problem)
    return tls


def run_session(sock: socket.socket, client: SmtpClient, settings: DeliverSettings,
                clock: _Clock, host: str, domains: Sequence[str] = ()) -> Outcome:
    """Drive ``client`` over ``sock`` until it has an outcome; closes the socket."""
    actions: list = []
    try:
        while True:
            while actions:
                action = actions.pop(0)
                if isinstance(action, Close):
                    assert client.outcome is not None
                    return client.outcome
                if isinstance(action, Send):
                    wanted = settings.data_timeout if action.bulk else settings.command_timeout
                    sock.settimeout(clock.budget(wanted))
                    try:
                        sock.sendall(action.data)
                    except OSError as exc:
                        return _after_send_error(sock, client, exc)
                elif isinstance(action, StartTLS):
                    sock.settimeout(clock.budget(settings.command_timeout))
                    try:
                        sock = tls_wrap(sock, host, settings, domains)
                    except TlsRefused as exc:
                        return client.tls_refused(str(exc))
                    except OSError as exc:
                        untrusted = tls_untrusted(exc)
                        if untrusted is not None:
                            return client.tls_refused(untrusted)
                        return client.tls_failed(str(exc))
                    actions = client.tls_started() + actions
            wanted = settings.data_timeout if client.phase == "data-end" else \
                settings.command_timeout
            timeout = clock.budget(wanted)
            sock.settimeout(timeout)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return client.timed_out(timeout)
            if not data:
                return client.connection_lost("connection closed by the server")
            actions = client.receive(data)
    except TimeoutError:
        return client.timed_out(settings.time_limit)
    except OSError as exc:
        return client.connection_lost(exc.strerror or str(exc))
    finally:
        sock.close()


def _after_send_error(sock: socket.socket, client: SmtpClient, exc: OSError) -> Outcome:
    """A send failed (reset, broken pipe): the server may have said why before closing."""
    try:
        sock.settimeout(1.0)
        data = sock.recv(65536)
        if data:
            client.receive(data)
    except OSError:
        pass
    if client.outcome is not None:
        return client.outcome
    return client.connection_lost(exc.strerror or str(exc))


# ---- one delivery


class Delivery:
    """What Postfix's argv says: ${sender}, ${nexthop}, ${recipient}..."""

    def __init__(self, sender: str, nexthop: str, recipients: list[str]) -> None:
        self.sender = sender
        self.nexthop = nexthop
        self.recipients = recipients


def next_targets(target_lists: Sequence[Sequence[Target]], failed: Target) -> list[Target]:
    """The targets to try after ``failed``: those every recipient's route lists (their SRV
    targets in RFC 2782 order, the first recipient's order), ``failed`` left out.  None when a
    route does not list ``failed``: the routing changed since Postfix asked, or the nexthop came
    from the operator's own table, and neither is ours to second-guess."""
    if not target_lists or any(failed not in targets for targets in target_lists):
        return []
    first, others = target_lists[0], target_lists[1:]
    return [t for t in first if t != failed and all(t in o for o in others)]


def backup_targets(config, recipients: Sequence[str], failed: Target, seconds: float
                   ) -> tuple[list[Target], str]:
    """Route the recipients' domains (the daemon's configuration, DNS at most ``seconds``) and
    return the further targets (:func:`next_targets`) and, if routing failed (DNS, an
    unreadable map), why -- worth a word in the deferral.  Never raises."""
    try:
        from ..routing.router import Route, Router, TempFail

        config.dns_timeout = max(0.1, min(config.dns_timeout, seconds))
        router = Router.from_config(config)
        lists: list[list[Target]] = []
        for rcpt in recipients:
            decision = router.route(rcpt)
            if isinstance(decision, TempFail):
                return [], f"{decision.domain}: {decision.reason}"
            if not isinstance(decision, Route):
                return [], ""  # no onion route (any more): Postfix routes it again on retry
            lists.append([(decision.onion, decision.port), *decision.alternatives])
    except Exception as exc:  # noqa: BLE001 - no backup is never worse than the first failure
        return [], f"routing failed: {type(exc).__name__}: {exc}"
    return next_targets(lists, failed), ""


def after_earlier(outcome: Outcome, earlier: Sequence[Outcome]) -> Outcome:
    """``outcome`` of a later SRV target, saying what the earlier ones answered.

    "via backup:" comes first because pipe(8) logs only the first 100 characters of a
    delivery's output (``status=sent (delivered via torroute service (%.100s))``); a deferral
    or bounce keeps the whole line."""
    if not earlier:
        return outcome
    said = " | ".join(o.text for o in earlier)
    plural = "s" if len(earlier) > 1 else ""
    return Outcome(outcome.status, outcome.dsn,
                   f"via backup: {outcome.text} (after the earlier SRV target{plural}: {said})")


def none_reached(failures: Sequence[Outcome]) -> Outcome:
    """Every target failed before the message was sent: the last one's code, all the reasons."""
    if len(failures) == 1:
        return failures[0]
    said = " | ".join(o.text for o in failures)
    return Outcome(failures[-1].status, failures[-1].dsn,
                   f"none of {len(failures)} SRV targets reached: {said}")


def _attempt(target: Target, sender: bytes, recipients: list[bytes], message: bytes,
             settings: DeliverSettings, clock: _Clock, domains: Sequence[str]
             ) -> tuple[Outcome, bool]:
    """One target: its outcome, and whether it failed before the message was sent in a way
    another target may not (:func:`socks_may_try_next`, ``SmtpClient.may_try_next``)."""
    host, port = target
    options = Options(ehlo_name=settings.ehlo_name, starttls=settings.starttls,
                      pipelining=settings.pipelining, destination=f"{host}:{port}")
    client = SmtpClient(sender, recipients, message, options)
    return attempt_with(target, client, settings, clock, domains)


def attempt_with(target: Target, client: SmtpClient, settings: DeliverSettings, clock: _Clock,
                 domains: Sequence[str] = ()) -> tuple[Outcome, bool]:
    """:func:`_attempt` with the caller's client (``torroute.send_message`` wants
    ``per_recipient`` outcomes): dial ``target`` through tor and run the session."""
    host, port = target
    destination = f"{host}:{port}"
    try:
        budget = clock.budget(settings.connect_timeout)
    except TimeoutError:
        return temporary("4.4.2", f"{destination}: not tried, time limit "
                         f"{settings.time_limit:g}s reached"), False
    try:
        sock = tordial.connect(host, port, settings.proxy, budget, settings.isolate)
    except (OSError, SocksError, ValueError) as exc:
        outcome = socks_outcome(exc, destination, settings.proxy, budget)
        return outcome, socks_may_try_next(exc, outcome)
    outcome = run_session(sock, client, settings, clock, host, domains)
    return outcome, client.may_try_next


def deliver(delivery: Delivery, message: bytes, settings: DeliverSettings,
            config=None) -> Outcome:
    """Deliver one message to the nexthop through tor; every failure becomes an Outcome.

    ``config`` (the loaded configuration) enables the backup targets: when the nexthop fails
    before the message was sent, the recipients are routed here and the further SRV targets
    tried, all within ``settings.time_limit``."""
    clock = _Clock(settings.time_limit)
    try:
        host, port = parse_nexthop(delivery.nexthop, settings.default_port)
    except ValueError as exc:
        return temporary("4.3.5", f"torroute deliver: {exc} (check transport_maps)")
    onion = host
    if host.endswith(".onion"):
        # checksum, key and version, as `torroute route` and tor do: a mistyped onion bounces
        # now, also on a SocksPort without ExtendedErrors (which would defer it until expiry)
        from ..errors import InvalidOnion
        from ..routing.onion import parse_onion

        try:
            onion = parse_onion(host).host
        except InvalidOnion as exc:
            return permanent("5.1.2", f"torroute deliver: nexthop {delivery.nexthop!r}: {exc}")
    elif settings.require_onion:
        return temporary("4.3.5", f"torroute deliver: nexthop {delivery.nexthop!r} is not a v3 "
                         ".onion address; refusing to deliver (deliver.require_onion)")
    recipients = [os.fsencode(r) for r in delivery.recipients]
    if not recipients or any(not r for r in recipients):
        return temporary("4.3.5", "torroute deliver: no recipient (check the master.cf argv)")
    domains = recipient_domains(delivery.recipients) if settings.tls_verify else []
    sender = envelope_sender(delivery.sender)
    outcome, again = _attempt((host, port), sender, recipients, message, settings, clock,
                              domains)
    if not again or config is None or clock.left() <= 0:
        return outcome
    backups, problem = backup_targets(config, delivery.recipients, (onion, port), clock.left())
    if problem:
        return Outcome(outcome.status, outcome.dsn,
                       f"{outcome.text} (further SRV targets unknown: {problem})")
    failures = [outcome]
    for target in backups:
        if clock.left() <= 0:
            break
        outcome, again = _attempt(target, sender, recipients, message, settings, clock,
                                  domains)
        if not again:
            return after_earlier(outcome, failures)
        failures.append(outcome)
    return none_reached(failures)
