"""Decisions -> reply bytes, one class per wire protocol (socketmap, tcp_table, Exim's line).

The codecs (:mod:`torroute.protocols`) encode; these classes choose what to encode for each
decision and keep the reply bytes of routes memoised (a found answer is a pure function of the
onion, the port and the settings), so a cached or pinned route costs a dict lookup.  Exim's
routes are the exception: their automap address must come fresh from tor's DNSPort.

Fail closed: a temporary failure and anything unexpected answer TEMP / 400 / ``temp``, never
"not found" (the MTA would use its default, clear-net transport).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import TorrouteError
from ..protocols import ProtocolError, eximline, postfix_value, socketmap, tcptable
from ..routing.decisions import Decision, NoRoute, Reject, Route
from ..routing.memo import ByteMemo
from ..tor.automap import aresolve_automap

if TYPE_CHECKING:
    from .service import LookupDaemon

#: Entry bound of the decision log-text memo (LookupDaemon); cleared when full.  Small: each
#: entry keeps a decision (up to a 4 KB domain) alive, and the memo only pays for decisions
#: met again (pins, cached answers), which a few thousand cover.
MEMO_SIZE = 5_000
#: Bound in bytes (key + value, :class:`~torroute.routing.memo.ByteMemo`) of the reply-bytes
#: memo of each Postfix protocol; cleared when full and on reload.
FOUND_MEMO_BYTES = 4 * 1024 * 1024


class Answers:
    """How one wire protocol turns decisions into reply bytes."""

    name = ""

    def __init__(self, daemon: LookupDaemon) -> None:
        self.daemon = daemon

    def parser(self, max_request: int):
        raise NotImplementedError

    def answer_now(self, decision: Decision) -> bytes | None:
        """Reply bytes if no I/O is needed, else None (then :meth:`answer` is awaited)."""
        raise NotImplementedError

    async def answer(self, decision: Decision) -> tuple[bytes, str]:
        reply = self.answer_now(decision)
        assert reply is not None
        return reply, ""

    def temp(self, reason: str) -> bytes:
        raise NotImplementedError


class PostfixAnswers(Answers):
    codec: Any = None

    def __init__(self, daemon: LookupDaemon) -> None:
        super().__init__(daemon)
        # (onion, port) -> reply bytes; onions are 62 characters (validated routes)
        self.found_cache = ByteMemo(FOUND_MEMO_BYTES, max_key=80)
        daemon.on_reload.append(self.found_cache.clear)

    def answer_now(self, decision: Decision) -> bytes:
        codec = self.codec
        if decision.__class__ is Route:
            key = (decision.onion, decision.port)
            reply = self.found_cache.get(key)
            if reply is not None:
                return reply
            s = self.daemon.settings
            lmtp = s.lmtp_answer
            if lmtp is not None:  # validated at start-up; the relay routes each recipient
                service = self.daemon.lmtp
                links = service.links if service is not None else None
                link = links.path(decision.onion) if links is not None else None
                if link is not None:  # the same socket, a Postfix destination of its own
                    lmtp = f"{s.lmtp_transport}:unix:{link}"
                reply = self.found_raw(lmtp.encode("ascii"))
            else:
                try:
                    value = postfix_value(s.postfix_answer, s.transport, decision.onion,
                                          decision.port)
                except ProtocolError as exc:  # cannot happen for validated routes: defer
                    return codec.temp(f"unusable route: {exc}")
                reply = codec.found(value)
            self.found_cache.put(key, reply, len(decision.onion) + 8, len(reply))
            return reply
        if isinstance(decision, NoRoute):
            return codec.notfound()
        if isinstance(decision, Reject):
            return codec.reject()
        return codec.temp(decision.reason)

    def temp(self, reason: str) -> bytes:
        return self.codec.temp(reason)

    def found_raw(self, value: bytes) -> bytes:
        raise NotImplementedError


class SocketmapAnswers(PostfixAnswers):
    name = "socketmap"
    codec = socketmap

    def found_raw(self, value: bytes) -> bytes:
        return socketmap.encode_netstring(b"OK " + value)

    def parser(self, max_request: int) -> socketmap.SocketmapParser:
        return socketmap.SocketmapParser(max_request)


class TcpTableAnswers(PostfixAnswers):
    name = "tcp_table"
    codec = tcptable

    def found_raw(self, value: bytes) -> bytes:
        return b"200 " + tcptable.encode(value) + b"\n"

    def parser(self, max_request: int) -> tcptable.TcpTableParser:
        return tcptable.TcpTableParser(max_request)


class EximAnswers(Answers):
    name = "exim"

    def parser(self, max_request: int) -> eximline.EximLineParser:
        return eximline.EximLineParser(max_request)

    def answer_now(self, decision: Decision) -> bytes | None:
        if isinstance(decision, Route):
            return None  # the automap address must come fresh from tor's DNSPort
        if isinstance(decision, NoRoute):
            return eximline.notfound()
        if isinstance(decision, Reject):
            return eximline.fail(decision.reason)
        return eximline.temp(decision.reason)

    async def answer(self, decision: Decision) -> tuple[bytes, str]:
        if not isinstance(decision, Route):
            return await super().answer(decision)
        config = self.daemon.router.config
        try:
            ip = await aresolve_automap(
                decision.onion,
                config.tor_dns,
                self.daemon.settings.automap_timeout,
                config.virtual_network,
            )
        except TorrouteError as exc:  # tor down, automap off: defer
            return eximline.temp(f"automap: {exc}"), f"automap failed: {exc}"
        return eximline.found(ip, decision.port), f"via {ip}"

    def temp(self, reason: str) -> bytes:
        return eximline.temp(reason)


#: listener kind -> its answers (lmtp sessions are torroute.daemon.lmtp's)
ANSWERS: dict[str, type[Answers]] = {
    "socketmap": SocketmapAnswers,
    "tcp_table": TcpTableAnswers,
    "exim": EximAnswers,
}
