"""``torroute deliver``: a Postfix ``pipe(8)`` delivery program that speaks SMTP to an onion MX
through Tor's SocksPort.

Why a native program instead of Postfix's ``smtp`` under ``torsocks``: torsocks breaks Postfix
(IPv6 sockets, connection-cache descriptor passing, throttled transports).  This program is
started once per message (or per recipient with ``recipient_limit = 1``), so it imports only the
standard library on the success path: the SOCKS5 handshake is :mod:`torroute.protocols.socks5`
(pure, with tor's error table) driven by :func:`torroute.tor.dial.connect`, the SMTP protocol is
:mod:`torroute.protocols.smtp` (pure) driven by :mod:`torroute.delivery.session`; neither
asyncio nor python-socks is imported.

Every path ends in an :class:`~torroute.protocols.smtp.Outcome`: exit 0 delivered, 75 deferred, 69
bounced, with the enhanced status code first on stdout (pipe(8): it wins over the exit status).
Nothing is ever sent except through Tor; anything unexpected defers.

Backup MXs: Postfix's ``${nexthop}`` names one onion, the first SRV target.  When it fails
before the message was sent (tor cannot reach it, no or a bad greeting, ...), the program routes
the recipients' domain itself, with the same configuration as the daemon, and tries the further
SRV targets in RFC 2782 order within the same ``time_limit`` (:class:`~.targets.TargetPlan`).
:mod:`torroute.routing.router` (dnspython) is imported only then, so the start-up cost of a
delivery that works is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..protocols.smtp import Outcome, SmtpClient, permanent, temporary
from .envelope import envelope_sender, recipient_domains
from .session import Clock, attempt_with
from .settings import DeliverSettings
from .targets import Target, TargetPlan, next_targets

__all__ = ["Delivery", "deliver", "parse_nexthop", "backup_targets"]


class Delivery:
    """What Postfix's argv says: ${sender}, ${nexthop}, ${recipient}..."""

    def __init__(self, sender: str, nexthop: str, recipients: list[str]) -> None:
        self.sender = sender
        self.nexthop = nexthop
        self.recipients = recipients


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


def backup_targets(config, recipients: Sequence[str], failed: Target, seconds: float
                   ) -> tuple[list[Target], str]:
    """Route the recipients' domains (the daemon's configuration, DNS at most ``seconds``) and
    return the further targets (:func:`~.targets.next_targets`) and, if routing failed (DNS, an
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


def deliver(delivery: Delivery, message: bytes, settings: DeliverSettings,
            config=None) -> Outcome:
    """Deliver one message to the nexthop through tor; every failure becomes an Outcome.

    ``config`` (the loaded configuration) enables the backup targets: when the nexthop fails
    before the message was sent, the recipients are routed here and the further SRV targets
    tried, all within ``settings.time_limit``."""
    clock = Clock(settings.time_limit)
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
    # [deliver] scrub_*: once, on the message as Postfix gave it (LF), before the client's
    # CRLF and dot-stuffing -- the relay and send_message do the same (docs/scrub.rst)
    message = settings.scrubbed(delivery.sender, message)
    # all or nothing: one outcome for every recipient (the plan counts one)
    plan = TargetPlan([(host, port)], backups_known=config is None)
    while (target := plan.next(clock.left())) is not None:
        client = SmtpClient(sender, recipients, message,
                            settings.client_options(f"{target[0]}:{target[1]}"))
        outcome, may_try_next = attempt_with(target, client, settings, clock, domains)
        plan.record([outcome], may_try_next)
        if plan.wants_backups(clock.left()):
            plan.add_backups(*backup_targets(config, delivery.recipients, (onion, port),
                                             clock.left()))
    return plan.outcomes()[0]
