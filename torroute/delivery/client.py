"""Mail for tool authors: :func:`send_message` (route, group, deliver over tor) and
:class:`SMTP` (``smtplib.SMTP`` whose connection goes through tor).

Why on the pipe program's core and not smtplib for :func:`send_message`: one SMTP client
(:mod:`torroute.protocols.smtp`, pure), one blocking driver
(:func:`torroute.delivery.session.attempt_with`) and one target plan
(:class:`torroute.delivery.targets.TargetPlan`), so a library send and a Postfix delivery
classify every reply, timeout and tor refusal the same way, and try the backup SRV targets the
same way.  :class:`SMTP` is for code that wants smtplib's own interface; only its socket is
ours.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import Message

from ..config import Config, load_config
from ..errors import InvalidOnion
from ..protocols.smtp import BOUNCED, DEFERRED, Outcome, SmtpClient
from ..routing.onion import is_onion_name
from ..routing.router import NoRoute, Reject, Route, TempFail
from .envelope import envelope_sender, recipient_domains
from .session import Clock, attempt_with
from .settings import DeliverSettings
from .targets import Target, TargetPlan

__all__ = ["SMTP", "SendResult", "send_message"]

#: the text of a recipient without an onion route (torroute never falls back to the clear net)
NOT_SENT = "not sent (torroute never uses the clear net)"


@dataclass(frozen=True, slots=True)
class SendResult:
    """What happened to one recipient: ``status`` is ``"delivered"``, ``"deferred"`` (try again
    later: :attr:`temporary`) or ``"bounced"`` (permanent); ``dsn`` the RFC 3463 code
    (``"2.0.0"``, the remote's own when it gives one); ``text`` one line, with the remote's
    reply when there was one."""

    status: str
    dsn: str
    text: str

    @property
    def temporary(self) -> bool:
        """A retry later may succeed (tor down, a 4xx, DNS failing)."""
        return self.status == DEFERRED

    @property
    def delivered(self) -> bool:
        """The remote accepted the message for this recipient (2xx)."""
        return self.status == "delivered"

    @classmethod
    def _of(cls, outcome: Outcome) -> SendResult:
        return cls(outcome.status, outcome.dsn, outcome.text)


def _not_routed(decision: NoRoute | TempFail | Reject) -> SendResult:
    """A recipient that gets no onion route: never sent.  NoRoute is permanent (5.4.4): the
    domain publishes no onion MX and a retry will not make torroute use the clear net; a DNS
    failure defers (4.4.3); an invalid onion bounces (5.1.2), as ``torroute deliver`` does."""
    if isinstance(decision, TempFail):
        return SendResult(DEFERRED, "4.4.3", f"route for {decision.domain} unknown now: "
                          f"{decision.reason}; not sent, try again later")
    if isinstance(decision, Reject):
        return SendResult(BOUNCED, "5.1.2", f"{decision.domain}: {decision.reason}")
    return SendResult(BOUNCED, "5.4.4", f"no onion route for {decision.domain or '(none)'}: "
                      f"{decision.reason}; {NOT_SENT}")


def _addresses(msg: Message, names: Sequence[str]) -> list[str]:
    from email.utils import getaddresses

    values = [str(v) for name in names for v in msg.get_all(name, [])]
    return [addr for _, addr in getaddresses(values) if addr]


def _flatten(msg: Message | bytes | str) -> bytes:
    """The message with LF line ends (the SMTP client writes CRLF), Bcc removed as smtplib
    does."""
    if isinstance(msg, str):
        msg = msg.encode("utf-8")
    if isinstance(msg, bytes):
        return msg.replace(b"\r\n", b"\n")
    import copy
    import io
    from email.generator import BytesGenerator

    msg = copy.copy(msg)
    del msg["Bcc"]
    del msg["Resent-Bcc"]
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False).flatten(msg, linesep="\n")
    return out.getvalue()


def _deliver_group(targets: Sequence[Target], sender: bytes, recipients: list[str],
                   data: bytes, settings: DeliverSettings) -> list[Outcome]:
    """One message to the recipients that share an onion MX: its targets in RFC 2782 order,
    the next only after a failure before MAIL (deliver's rule); one outcome per recipient."""
    clock = Clock(settings.time_limit)
    raw = [r.encode("utf-8") for r in recipients]
    domains = recipient_domains(recipients) if settings.tls_verify else []
    plan = TargetPlan(targets, len(raw))
    while (target := plan.next(clock.left())) is not None:
        options = settings.client_options(f"{target[0]}:{target[1]}", per_recipient=True)
        client = SmtpClient(sender, raw, data, options)
        outcome, may_try_next = attempt_with(target, client, settings, clock, domains)
        # the client's own per-recipient outcomes, unless it never ran (tor refused the dial)
        each = client.recipient_outcomes() if client.outcome is not None else [outcome] * len(raw)
        plan.record(each, may_try_next)
    return plan.outcomes()


def send_message(msg: Message | bytes | str, from_addr: str | None = None,
                 to_addrs: str | Iterable[str] | None = None, *,
                 config: Config | None = None) -> dict[str, SendResult]:
    """Route every recipient and deliver ``msg`` over tor; returns recipient -> :class:`SendResult`.

    Like :meth:`smtplib.SMTP.send_message`: ``from_addr`` defaults to the Sender or From
    header, ``to_addrs`` to To, Cc and Bcc (Bcc is not transmitted); a bytes or str message
    needs both.  Each recipient is routed with the :class:`Router` (pins, SRV, a
    ``user@<onion>.onion`` as is); recipients with the same onion MX get one SMTP transaction,
    and their own results (a refused RCPT does not fail the others).  A temporary failure
    before MAIL tries the domain's further SRV targets.  Settings: ``config``'s ``[deliver]``
    table (ehlo_name, timeouts, time_limit per transaction, starttls) and ``tor_socks``; the
    ``scrub_*`` header policy for senders with an onion identity (docs/scrub.rst: by
    default mail from a ``.onion`` sender leaves without Received, Message-ID, X-Mailer and
    User-Agent, with a new Message-ID).

    Never sent in the clear: a recipient without an onion route gets ``bounced`` 5.4.4 ("no
    onion route ... not sent"); a DNS failure ``deferred`` 4.4.3; an invalid onion ``bounced``
    5.1.2.  Raises ConfigError for an unusable configuration (a map that does not load),
    ValueError when no sender or recipient can be found."""
    from ..api import Router

    cfg = load_config() if config is None else config
    if isinstance(msg, Message):
        if from_addr is None:
            found = _addresses(msg, ["Sender"]) or _addresses(msg, ["From"])
            from_addr = found[0] if found else None
        if to_addrs is None:
            to_addrs = _addresses(msg, ["To", "Cc", "Bcc"])
    if from_addr is None or to_addrs is None:
        raise ValueError("send_message: no sender or recipients (give from_addr and to_addrs "
                         "for a bytes message)")
    recipients = [to_addrs] if isinstance(to_addrs, str) else list(to_addrs)
    recipients = list(dict.fromkeys(recipients))  # once each, in order
    if not recipients:
        raise ValueError("send_message: no recipients")
    router = Router(cfg)
    results: dict[str, SendResult] = {}
    groups: dict[tuple[Target, tuple[Target, ...]], list[str]] = {}
    for rcpt in recipients:
        decision = router.route(rcpt)
        if isinstance(decision, Route):
            key = ((decision.onion, decision.port), decision.alternatives)
            groups.setdefault(key, []).append(rcpt)
        else:
            results[rcpt] = _not_routed(decision)
    if groups:
        settings = DeliverSettings.from_config(cfg)
        # [deliver] scrub_*: once for all groups, on the LF message, before the client's CRLF
        # and dot-stuffing -- as the pipe and the LMTP relay (docs/scrub.rst)
        data = settings.scrubbed(from_addr, _flatten(msg))
        sender = envelope_sender(from_addr)
        for (first, alternatives), rcpts in groups.items():
            outcomes = _deliver_group([first, *alternatives], sender, rcpts, data, settings)
            for rcpt, outcome in zip(rcpts, outcomes, strict=True):
                results[rcpt] = SendResult._of(outcome)
    return {rcpt: results[rcpt] for rcpt in recipients}


class SMTP(smtplib.SMTP):
    """:class:`smtplib.SMTP` connected through tor: ``with torroute.SMTP(onion) as s: ...``.

    Only the socket differs (``_get_socket``): it is :func:`torroute.dial` to the host, which
    must be a v3 ``.onion`` (validated here, resolved by tor, never locally; anything else
    raises :class:`InvalidOnion` -- route a domain first with :class:`Router`).  The EHLO name
    defaults to ``[deliver] ehlo_name`` ("localhost"), not this host's name; the timeout
    defaults to ``socks_timeout``.  Tor's refusals raise torroute's errors
    (:class:`TemporaryError` / :class:`PermanentError`), not :class:`OSError`."""

    def __init__(self, host: str = "", port: int = 0, local_hostname: str | None = None,
                 timeout: float = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
                 source_address: tuple[str, int] | None = None, *,
                 config: Config | None = None) -> None:
        self.config = load_config() if config is None else config
        if local_hostname is None:
            local_hostname = DeliverSettings.from_config(self.config).ehlo_name
        super().__init__(host, port, local_hostname, timeout, source_address)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        from ..api import dial

        if not is_onion_name(host):
            raise InvalidOnion(f"torroute.SMTP: {host!r} is not an .onion address (route a "
                               "domain with torroute.Router first)")
        if not isinstance(timeout, int | float):  # smtplib's "no timeout given"
            timeout = self.config.socks_timeout
        return dial(host, port, config=self.config, timeout=timeout)
