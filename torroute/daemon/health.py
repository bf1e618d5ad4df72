"""The daemon's per-onion health from real traffic, canary dials, self-healing (NEWNYM).

Three parts (docs/operating/healing.inc):

* the per-onion table, fed by every :class:`~torroute.delivery.relay.Attempt` of the LMTP relay
  (``Relay.on_attempt``: the hot path, so :meth:`HealthService.observe` only updates a dict);
* canaries: the ``[serve] canary`` onions (ours by definition: the setting is for onions the
  operator runs, e.g. the own onion MX) dialed every ``canary_interval``, their 220 banner read;
* healing: :class:`HealPolicy` (pure: fed attempts, canary results, the clock and tor's
  bootstrap state) says when tor's client looks stuck -- at least two distinct onions that
  worked within ``heal_window`` now fail with circuit/descriptor errors, or a canary fails with
  one -- and the service then sends ``SIGNAL NEWNYM`` through tor's control port (which also
  purges the client's onion-service state: cached descriptors, intro point failures), at most
  once per ``heal_interval``.  A single dead onion never heals: that is the remote's problem.

Tor's control port is blocking stem (:class:`torroute.tor.control.Tor`): every use runs in a
thread with a timeout, so a hanging or absent control port never touches mail; its outages are
logged once per state change, at WARNING.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..delivery.relay import TOR_PATH_FAILURES, Attempt
from ..endpoint import parse_hostport
from ..errors import ConfigError, InvalidOnion, SocksError, TorrouteError
from ..routing.onion import parse_onion

if TYPE_CHECKING:
    from .service import LookupDaemon

log = logging.getLogger(__package__)  # torroute.daemon, as every daemon line

#: the per-onion table keeps at most this many (onion, port) entries; the least recently
#: used is dropped first, so memory stays bounded whatever the traffic
MAX_ONIONS = 10_000
#: the healing evidence keeps at most this many failing onions (the oldest dropped)
MAX_EVIDENCE = 1_000
#: how often tor's bootstrap state is asked for, and how long a control-port call may take
TOR_POLL_INTERVAL = 60.0
CONTROL_TIMEOUT = 10.0
#: bytes of a canary's banner read at most
MAX_BANNER = 4096


def parse_canary(text: str) -> tuple[str, int]:
    """``ONION.onion[:PORT]`` (port 25 by default) -> (onion, port); ConfigError otherwise."""
    if not isinstance(text, str):
        raise ConfigError(f"canary {text!r}: expected a string ONION.onion[:PORT]")
    try:
        host, port = parse_hostport(text, 25)
        onion = parse_onion(host)
    except (ConfigError, InvalidOnion, ValueError) as exc:
        raise ConfigError(f"canary {text!r}: {exc}") from None
    if onion.host != host.strip().lower().rstrip("."):
        raise ConfigError(f"canary {text!r}: give the onion service itself ({onion.host})")
    if not 0 < port < 65536:
        raise ConfigError(f"canary {text!r}: port {port} out of range")
    return onion.host, port


def check_canaries(targets: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """Every canary target parsed (ServeSettings.check: a bad one refuses start/reload)."""
    return tuple(parse_canary(t) for t in targets)


# ---- the pure part -------------------------------------------------------------------------


@dataclass
class OnionHealth:
    """What real traffic says about one (onion, port)."""

    onion: str
    port: int
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_success: float | None = None
    last_failure: float | None = None
    last_reason: str | None = None
    last_reason_class: str | None = None
    last_socks_code: int | None = None
    latency_seconds: float | None = None  # the last success's dial + session

    def record(self, attempt: Attempt, now: float) -> None:
        """A success is any attempt where tor reached the onion and the MX did not defer
        (delivered or bounced: the path works); everything else is a failure."""
        self.last_reason = attempt.reason[:300]
        self.last_reason_class = attempt.reason_class
        self.last_socks_code = attempt.socks_code
        if attempt.reached and attempt.reason_class in ("delivered", "bounced"):
            self.successes += 1
            self.consecutive_failures = 0
            self.last_success = now
            self.latency_seconds = attempt.seconds
        else:
            self.failures += 1
            self.consecutive_failures += 1
            self.last_failure = now

    def to_json(self) -> dict[str, Any]:
        return {"onion": self.onion, "port": self.port, "successes": self.successes,
                "failures": self.failures, "consecutive_failures": self.consecutive_failures,
                "last_success": self.last_success, "last_failure": self.last_failure,
                "last_reason": self.last_reason, "last_reason_class": self.last_reason_class,
                "last_socks_code": self.last_socks_code,
                "latency_seconds": self.latency_seconds}


class OnionTable:
    """The per-(onion, port) table, bounded to ``limit`` entries (least recently seen
    dropped)."""

    def __init__(self, limit: int = MAX_ONIONS) -> None:
        self.limit = limit
        self.entries: OrderedDict[tuple[str, int], OnionHealth] = OrderedDict()
        self.dropped = 0

    def record(self, attempt: Attempt, now: float) -> OnionHealth:
        key = (attempt.onion, attempt.port)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = OnionHealth(attempt.onion, attempt.port)
            if len(self.entries) > self.limit:
                self.entries.popitem(last=False)
                self.dropped += 1
        else:
            self.entries.move_to_end(key)
        entry.record(attempt, now)
        return entry

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class Failure:
    """One piece of healing evidence: an onion failing on tor's side after it worked."""

    onion: str
    reason_class: str
    socks_code: int | None
    when: float
    canary: bool = False

    def describe(self) -> str:
        code = f" 0x{self.socks_code:02X}" if self.socks_code is not None else ""
        kind = "canary " if self.canary else ""
        return f"{kind}{self.onion} {self.reason_class}{code}"


@dataclass(frozen=True)
class Verdict:
    """What :meth:`HealPolicy.decide` says: ``heal`` now or not; ``evidence`` (one line) when
    the evidence suffices; ``held`` why a NEWNYM is held back although it does."""

    heal: bool
    evidence: str | None = None
    held: str | None = None  # "heal = false", "bootstrap" or "rate limit"
    detail: str | None = None


@dataclass
class HealPolicy:
    """When to send NEWNYM: pure (no I/O, no clock of its own), so it is tested alone.

    Evidence is a failure with a class in ``TOR_PATH_FAILURES`` (descriptor, introduction,
    rendezvous, timeout) of an onion whose last success is within ``window`` -- "worked
    recently" -- or of a canary (ours by definition), newer than the last NEWNYM and than the
    onion's last success, within ``window``.  It heals when the evidence holds >= 2 distinct
    onions, or one canary; tor reports bootstrap 100 %; the last NEWNYM is at least
    ``interval`` ago; and ``enabled``.
    """

    interval: float = 600.0
    window: float = 900.0
    enabled: bool = True
    last_heal: float | None = None
    failing: OrderedDict[str, Failure] = field(default_factory=OrderedDict)

    def attempt(self, attempt: Attempt, last_success: float | None, now: float) -> None:
        """Feed one attempt; ``last_success``: the onion's last success before it (any port)."""
        self._feed(attempt.onion, attempt.reason_class, attempt.socks_code, last_success, now)

    def canary(self, onion: str, reason_class: str, socks_code: int | None,
               now: float) -> None:
        """Feed one canary check (``reason_class`` "delivered" when its banner came)."""
        self._feed(onion, reason_class, socks_code, None, now, canary=True)

    def _feed(self, onion: str, reason_class: str, socks_code: int | None,
              last_success: float | None, now: float, canary: bool = False) -> None:
        key = ("canary:" if canary else "") + onion
        if reason_class not in TOR_PATH_FAILURES:
            self.failing.pop(key, None)  # it works (or fails for the remote's reasons)
            return
        if not canary and (last_success is None or now - last_success > self.window):
            return  # never worked, or long ago: likely the remote's problem
        self.failing.pop(key, None)
        self.failing[key] = Failure(onion, reason_class, socks_code, now, canary)
        while len(self.failing) > MAX_EVIDENCE:
            self.failing.popitem(last=False)

    def evidence(self, now: float) -> list[Failure]:
        """The failures that count now (and forget the ones that no longer can)."""
        since = now - self.window
        if self.last_heal is not None:
            since = max(since, self.last_heal)
        for key in [k for k, f in self.failing.items() if f.when <= since]:
            del self.failing[key]
        return list(self.failing.values())

    def decide(self, now: float, bootstrap: int | None) -> Verdict:
        failures = self.evidence(now)
        canaries = [f for f in failures if f.canary]
        onions = {f.onion for f in failures if not f.canary}
        if not canaries and len(onions) < 2:
            return Verdict(False)
        shown = canaries + sorted((f for f in failures if not f.canary),
                                  key=lambda f: -f.when)
        evidence = (f"{len(onions)} onion(s) that worked within {self.window:g}s and "
                    f"{len(canaries)} canary(ies) fail on tor's side: " +
                    ", ".join(f.describe() for f in shown[:8]) +
                    (f" and {len(shown) - 8} more" if len(shown) > 8 else ""))
        if not self.enabled:
            return Verdict(False, evidence, "heal = false", "heal = false")
        if bootstrap != 100:
            shown_boot = "unknown" if bootstrap is None else f"{bootstrap}%"
            return Verdict(False, evidence, "bootstrap",
                           f"tor's bootstrap is {shown_boot}, not 100%")
        if self.last_heal is not None and now - self.last_heal < self.interval:
            return Verdict(False, evidence, "rate limit",
                           f"rate limit: last NEWNYM {now - self.last_heal:.0f}s ago, "
                           f"heal_interval {self.interval:g}s")
        return Verdict(True, evidence)

    def healed(self, now: float) -> None:
        """A NEWNYM was sent (or tried) at ``now``: the evidence so far is used up."""
        self.last_heal = now
        self.failing.clear()


# ---- the service ---------------------------------------------------------------------------


@dataclass
class CanaryState:
    target: str
    onion: str
    port: int
    up: bool | None = None
    last_check: float | None = None
    last_ok: float | None = None
    reason: str | None = None
    seconds: float | None = None
    checks: int = 0
    failures: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "up": self.up, "last_check": self.last_check,
                "last_ok": self.last_ok, "reason": self.reason, "seconds": self.seconds,
                "checks": self.checks, "failures": self.failures}


class HealthService:
    """Per-onion health, canaries and healing of one daemon (``daemon.health``)."""

    def __init__(self, daemon: LookupDaemon, clock: Callable[[], float] = time.time) -> None:
        self.daemon = daemon
        self.clock = clock
        self.table = OnionTable()
        settings = daemon.settings
        self.policy = HealPolicy(settings.heal_interval, settings.heal_window, settings.heal)
        self.canaries: dict[tuple[str, int], CanaryState] = {}
        self.newnym_total = 0
        self.last_newnym: float | None = None
        self.last_evidence: str | None = None
        self.suppressed_total = 0
        self.bootstrap: int | None = None
        self.tor_checked: float | None = None
        self.tor_error: str | None = None
        self._tor_reported: str | None = ""  # the control-port state last logged
        self._tasks: list[asyncio.Task] = []
        self._healing: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._held: str | None = None  # the last "held back" reason logged
        self._apply_settings()
        daemon.on_reload.append(self._apply_settings)

    # -- settings ---------------------------------------------------------------------------

    def _apply_settings(self) -> None:
        s = self.daemon.settings
        self.policy.interval, self.policy.window = s.heal_interval, s.heal_window
        self.policy.enabled = s.heal
        wanted = {}
        for text in s.canary:
            onion, port = parse_canary(text)  # checked by ServeSettings.check already
            wanted[(onion, port)] = self.canaries.get((onion, port)) or \
                CanaryState(f"{onion}:{port}", onion, port)
        self.canaries = wanted
        self._wake.set()  # a new interval or target list counts from now

    @property
    def config(self) -> Any:
        return self.daemon.router.config

    # -- real traffic (the hot path) ---------------------------------------------------------

    def observe(self, attempt: Attempt) -> None:
        """One relay attempt: update the table; a tor-side failure may start a NEWNYM."""
        now = self.clock()
        entry = self.table.entries.get((attempt.onion, attempt.port))
        last_success = entry.last_success if entry is not None else None
        self.table.record(attempt, now)
        self.policy.attempt(attempt, last_success, now)
        if attempt.reason_class in TOR_PATH_FAILURES:
            self._consider(now)

    # -- healing ----------------------------------------------------------------------------

    def _consider(self, now: float) -> None:
        """Evaluate the evidence; with enough, check tor's bootstrap afresh and NEWNYM."""
        if self._healing is not None and not self._healing.done():
            return
        # bootstrap None: unknown yet; ask tor before deciding (the heal task asks again)
        verdict = self.policy.decide(now, 100 if self.bootstrap is None else self.bootstrap)
        if verdict.evidence is None:
            self._held = None
            return
        if not verdict.heal:
            self._hold(verdict)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._healing = loop.create_task(self._heal(verdict.evidence))

    def _hold(self, verdict: Verdict) -> None:
        self.suppressed_total += 1
        if verdict.held != self._held:  # once per reason, not per attempt
            self._held = verdict.held
            log.warning("health: tor's client looks stuck (%s), but no NEWNYM: %s",
                        verdict.evidence, verdict.detail)

    async def _heal(self, evidence: str) -> None:
        bootstrap = await self._poll_tor()
        now = self.clock()
        verdict = self.policy.decide(now, bootstrap)
        if not verdict.heal:
            if verdict.evidence is not None:
                self._hold(verdict)
            return
        self.policy.healed(now)  # rate-limited even if tor refuses: never hammer tor
        self.last_evidence = verdict.evidence
        self._held = None
        log.warning("health: tor's client looks stuck: %s; asking tor for fresh client state "
                    "(SIGNAL NEWNYM; at most once per %gs)", verdict.evidence,
                    self.policy.interval)
        try:
            await self._control(lambda tor: tor.signal("NEWNYM"))
        except Exception as exc:  # noqa: BLE001 - any control failure only costs healing
            self._tor_state(f"NEWNYM failed: {_one_line(exc)}")
            return
        self.newnym_total += 1
        self.last_newnym = self.clock()
        log.warning("health: NEWNYM sent (%d since start)", self.newnym_total)

    # -- tor's control port -----------------------------------------------------------------

    async def _control(self, call: Callable[[Any], Any]) -> Any:
        from ..tor.control import Tor

        config = self.config

        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def run() -> None:
            result, error = None, None
            try:
                with Tor.from_config(config) as tor:
                    result = call(tor)
            except BaseException as exc:  # noqa: BLE001 - handed to the loop
                error = exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass

        # a daemon thread, not asyncio.to_thread: a control port that accepts and never
        # answers must not hold up the daemon's exit (the default executor is joined)
        threading.Thread(target=run, daemon=True, name="torroute-health-control").start()
        async with asyncio.timeout(CONTROL_TIMEOUT):  # not wait_for (see _canary_loop)
            return await future

    async def _poll_tor(self) -> int | None:
        """tor's bootstrap percent now (None: the control port did not answer)."""
        try:
            progress = await self._control(lambda tor: tor.bootstrap().progress)
        except Exception as exc:  # noqa: BLE001 - an outage is expected, never an error
            self.bootstrap = None
            self.tor_checked = self.clock()
            self._tor_state(_one_line(exc))
            return None
        self.bootstrap = int(progress) if progress is not None else None
        self.tor_checked = self.clock()
        self._tor_state(None)
        return self.bootstrap

    def _tor_state(self, error: str | None) -> None:
        self.tor_error = error
        if error == self._tor_reported:
            return
        if error is None:
            if self._tor_reported:
                log.warning("health: tor's control port answers again (bootstrap %s%%)",
                            self.bootstrap)
        else:
            log.warning("health: tor's control port: %s (healing and tor's state unavailable; "
                        "mail is not affected)", error)
        self._tor_reported = error

    async def _tor_loop(self) -> None:
        while True:
            await self._poll_tor()
            await asyncio.sleep(TOR_POLL_INTERVAL)

    # -- canaries ---------------------------------------------------------------------------

    async def _canary_loop(self) -> None:
        while True:
            self._wake.clear()
            if self.canaries:
                await asyncio.gather(*(self.check_canary(c) for c in list(self.canaries.values())))
            try:  # not wait_for: on 3.11 it can swallow a cancel that meets a set() (stop hung)
                async with asyncio.timeout(self.daemon.settings.canary_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def check_canary(self, state: CanaryState) -> bool:
        """Dial one canary, read its 220 banner, QUIT; record and log up/down transitions."""
        from ..delivery.targets import socks_outcome
        from ..errors import ProtocolError
        from ..protocols.smtp import ReplyParser
        from ..tor.dial import open_connection

        s = self.daemon.settings
        proxy = tuple(self.config.tor_socks)
        started = time.monotonic()
        code: int | None = None
        timed_out = reached = False
        try:
            async with asyncio.timeout(s.canary_timeout):
                try:
                    reader, writer = await open_connection(state.onion, state.port, proxy,
                                                           s.canary_timeout)
                except (OSError, SocksError, ValueError) as exc:
                    code = exc.code if isinstance(exc, SocksError) else None
                    reason = socks_outcome(exc, state.target, proxy, s.canary_timeout).text
                else:
                    reached = True
                    try:
                        parser, replies = ReplyParser(), []
                        while not replies:
                            data = await reader.read(MAX_BANNER)
                            if not data:
                                break
                            replies = parser.feed(data)
                        if replies and replies[0].code == 220:
                            reason = None
                            writer.write(b"QUIT\r\n")
                            await writer.drain()
                        elif replies:
                            reason = f"banner {replies[0].code} {replies[0].text[:200]}"
                        else:
                            reason = "connection closed before the banner"
                    except ProtocolError as exc:
                        reason = f"not an SMTP banner: {exc}"
                    except OSError as exc:
                        reason = f"connection lost before the banner: {exc}"
                    finally:
                        writer.close()
        except TimeoutError:
            timed_out = True
            reason = f"no banner within canary_timeout {s.canary_timeout:g}s"
        seconds = time.monotonic() - started
        ok = reason is None
        self._record_canary(state, ok, reason, seconds, reached, code, timed_out)
        return ok

    def _record_canary(self, state: CanaryState, ok: bool, reason: str | None, seconds: float,
                       reached: bool, code: int | None, timed_out: bool) -> None:
        now = self.clock()
        was = state.up
        state.checks += 1
        state.last_check, state.seconds, state.reason, state.up = now, seconds, reason, ok
        probe = Attempt(state.onion, state.port, reached, "delivered" if ok else "deferred",
                        code, timed_out, reason or "banner", seconds, False)
        if ok:
            state.last_ok = now
            if was is not True:
                (log.warning if was is False else log.info)(
                    "health: canary %s up (220 banner in %.2fs)", state.target, seconds)
        else:
            state.failures += 1
            if was is not False:
                log.warning("health: canary %s down (%s, %s after %.2fs)", state.target,
                            probe.reason_class, reason, seconds)
        self.policy.canary(state.onion, probe.reason_class, code, now)
        if not ok and probe.reason_class in TOR_PATH_FAILURES:
            self._consider(now)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.daemon.settings
        # tor's bootstrap state matters only where there is evidence to weigh: relays (LMTP)
        # or canaries; a lookup-only daemon need not talk to the control port at all
        if (s.heal and getattr(self.daemon, "lmtp", None) is not None) or s.canary:
            self._tasks.append(loop.create_task(self._tor_loop()))
        self._tasks.append(loop.create_task(self._canary_loop()))

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._healing] if self._healing else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "onions": [e.to_json() for e in self.table.entries.values()],
            "canaries": [c.to_json() for c in self.canaries.values()],
            "healing": {"enabled": self.policy.enabled, "newnym_total": self.newnym_total,
                        "last_newnym": self.last_newnym, "last_evidence": self.last_evidence,
                        "suppressed_total": self.suppressed_total},
            "tor": {"bootstrap": self.bootstrap, "checked": self.tor_checked,
                    "error": self.tor_error},
        }


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, TorrouteError) else f"{type(exc).__name__}: {text}"


def make_service(daemon: LookupDaemon) -> HealthService:
    """The health service (always: tracking real traffic is cheap), as ``daemon.health``."""
    service = HealthService(daemon)
    lmtp = getattr(daemon, "lmtp", None)
    if lmtp is not None:
        lmtp.relay.on_attempt.append(service.observe)
    daemon.health = service  # type: ignore[attr-defined]
    return service
