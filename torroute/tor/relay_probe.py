"""The open-relay trap: before an onion's port 25/587 is published, ask the smtpd behind it to
relay, as an onion client would.

Onion connections reach the target from 127.0.0.1, which Postfix's ``mynetworks`` trusts: an
onion in front of such an smtpd is an open relay for all of Tor.  The probe sends EHLO,
``MAIL FROM:<>`` and ``RCPT TO:<relay-probe@relay-check.invalid>``, then RSET and QUIT: no mail is
ever sent.  :class:`RelayProbe` is the dialogue (pure: replies in, the next command or a verdict
out); :func:`probe_relay` only moves its bytes.  SMTP replies are read by the one SMTP reply
parser, :class:`torroute.protocols.smtp.ReplyParser`.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from ..protocols.smtp import Reply, ReplyParser
from .torrc import PortMapping

__all__ = ["PROBE_HELO", "PROBE_RCPT", "RELAY_CHECK_PORTS", "RelayVerdict", "RelayProbe",
           "classify_rcpt_reply", "probe_relay", "relay_check", "relay_refusal"]

PROBE_HELO = "relay-check.torroute.invalid"
PROBE_RCPT = "relay-probe@relay-check.invalid"
RELAY_CHECK_PORTS = (25, 587)  # onion ports where an smtpd relaying for 127.0.0.1 is a trap
PROBE_MAX_REPLY = 65536  # bytes: a longer reply is not an smtpd's


def _shown(reply: Reply) -> str:
    """``250 a / b``: the code and every line, as the verdicts show a reply."""
    return f"{reply.code} {' / '.join(reply.lines)}"


def classify_rcpt_reply(reply: Reply) -> str:
    """``open`` (the smtpd takes mail for a foreign domain from us), ``closed`` (refused as
    relaying: enhanced code X.7.x or the word 'relay') or ``inconclusive`` (refused for another
    reason, e.g. the probe domain does not resolve: relaying may still be allowed)."""
    if reply.code in (250, 251, 252):
        return "open"
    text = re.sub(r"<[^>]*>", "", " / ".join(reply.lines).lower())  # the probe says "relay" too
    enhanced = reply.enhanced
    if (enhanced and enhanced.split(".")[1] == "7") or "relay" in text:
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


class RelayProbe:
    """The probe's SMTP dialogue: :meth:`receive` each reply (the banner first); it answers the
    command line to send next, or the :class:`RelayVerdict`.  After a verdict, :attr:`farewell`
    lists what to send (each awaiting its reply, failures ignored) before closing."""

    def __init__(self, mapping: PortMapping) -> None:
        self.mapping = mapping
        self.state = "banner"
        self.farewell: tuple[str, ...] = ()

    def _verdict(self, verdict: str, detail: str) -> RelayVerdict:
        self.state = "done"
        return RelayVerdict(self.mapping, verdict, detail)

    def receive(self, reply: Reply) -> str | RelayVerdict:
        state = self.state
        if state == "banner":
            if reply.code != 220:
                return self._verdict("not-smtp" if reply.code < 400 else "inconclusive",
                                     f"banner {_shown(reply)}")
            self.state = "ehlo"
            return f"EHLO {PROBE_HELO}"
        if state in ("ehlo", "helo") and reply.code != 250:
            if state == "ehlo":
                self.state = "helo"
                return f"HELO {PROBE_HELO}"
            return self._verdict("inconclusive", f"HELO: {_shown(reply)}")
        if state in ("ehlo", "helo"):
            self.state = "mail"
            return "MAIL FROM:<>"
        if state == "mail":
            if reply.code != 250:
                return self._verdict("inconclusive", f"MAIL FROM:<>: {_shown(reply)}")
            self.state = "rcpt"
            return f"RCPT TO:<{PROBE_RCPT}>"
        if state == "rcpt":
            self.farewell = ("RSET", "QUIT")
            return self._verdict(classify_rcpt_reply(reply),
                                 f"RCPT TO:<{PROBE_RCPT}>: {_shown(reply)}")
        raise RuntimeError("the probe is finished")

    def broken(self, why: str) -> RelayVerdict:
        """The verdict when the peer sent something that is not SMTP: ``not-smtp`` for the
        banner (nothing to protect there), ``inconclusive`` once it greeted like an smtpd (it
        may still relay: refuse)."""
        return self._verdict("not-smtp" if self.state == "banner" else "inconclusive", why)


def probe_relay(mapping: PortMapping, timeout: float = 5.0) -> RelayVerdict:
    """Probe the smtpd behind one onion port from 127.0.0.1 (``timeout`` per connect and read)."""
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
    parser = ReplyParser()
    pending: list[Reply] = []

    def reply() -> Reply:
        read = 0
        while not pending:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed")
            read += len(chunk)
            if read > PROBE_MAX_REPLY:
                raise ValueError("SMTP reply too long")
            pending.extend(parser.feed(chunk))
        return pending.pop(0)

    probe = RelayProbe(mapping)
    with sock:
        try:
            action = probe.receive(reply())
            while isinstance(action, str):
                sock.sendall(action.encode("ascii") + b"\r\n")
                action = probe.receive(reply())
        except ValueError as exc:  # ProtocolError: not SMTP
            return probe.broken(str(exc))
        except OSError as exc:  # timeouts, resets, closed connections
            return RelayVerdict(mapping, "inconclusive", f"SMTP dialogue failed: {exc}")
        for line in probe.farewell:
            try:
                sock.sendall(line.encode("ascii") + b"\r\n")
                reply()
            except (OSError, ValueError):
                break
        return action


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
