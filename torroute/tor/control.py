"""Tor's control port, through stem: check and fix tor's settings, run onion services.

Every seed told the admin to hand-edit torrc, restart tor and ``cat hostname``.  :class:`Tor` does
it through the control port, safely: it only ever *adds* to tor's configuration (a SETCONF of a
multi-value option such as ``SocksPort`` or the ``HiddenService*`` lines replaces all of them, so
every existing value is sent again), and it refuses to publish an onion whose port 25 leads to an
smtpd that relays for 127.0.0.1 (:mod:`torroute.tor.relay_probe`).

This module is only the connection (connect, authenticate, commands, events); what it decides
with is pure and lives beside it: the control-protocol codec (:mod:`torroute.protocols.control`),
the settings checks and plan (:mod:`torroute.tor.settings`), onion service keys and directories
(:mod:`torroute.tor.onion_service`).
"""

from __future__ import annotations

import base64
import grp
import logging
import os
import pwd
import queue
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..endpoint import format_hostport, parse_hostport
from ..errors import (
    ConfigError,
    ControlAuthError,
    ControlError,
    DescriptorTimeout,
    OnionNotFound,
    OpenRelayRisk,
    SaveConfError,
    TorRefused,
)
from ..protocols.control import (
    Bootstrap,
    HsDescEvent,
    getinfo_value,
    parse_address_mappings,
    parse_bootstrap,
    parse_getconf,
    parse_hs_desc,
    parse_quoted_list,
    reverse_lookup,
    setconf_command,
)
from ..routing.onion import parse_onion
from .onion_service import (
    KEY_PREFIX,
    HsBlock,
    OnionService,
    address_from_expanded_key,
    directory_address,
    flatten_hidden_services,
    group_hidden_services,
    new_expanded_key,
    norm_dir,
    read_key_file,
    write_key_file,
)
from .relay_probe import relay_check, relay_refusal
from .settings import EnsureResult, Status, TorSettings, check_settings, plan_ensure
from .torrc import DEFAULT_VIRTUAL_NETWORK, PortMapping

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ControlEndpoint:
    """Where tor's control port is: a unix socket ``path`` or TCP ``host``:``port``."""

    path: str | None = None
    host: str = "127.0.0.1"
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> ControlEndpoint:
        """``unix:PATH``, ``inet:HOST:PORT``, ``/PATH``, ``HOST:PORT`` or ``PORT``."""
        text = text.strip()
        if text.startswith("unix:"):
            text = text[5:]
            if not text.startswith("/"):
                raise ConfigError(f"tor control socket {text!r}: expected unix:/ABSOLUTE/PATH")
            return cls(path=text)
        if text.startswith("/"):
            return cls(path=text)
        if text.startswith("inet:"):
            text = text[5:]
        if text.isdigit():
            text = f"127.0.0.1:{text}"
        host, port = parse_hostport(text)
        return cls(host=host, port=port)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"inet:{format_hostport((self.host, self.port))}"


class Tor:
    """An authenticated control connection to one tor.

    >>> with Tor.connect("unix:/run/tor/control") as tor:   # doctest: +SKIP
    ...     print(tor.status().ready)
    """

    def __init__(self, controller: Any, endpoint: ControlEndpoint) -> None:
        self._controller = controller
        self.endpoint = endpoint

    # -- connecting -------------------------------------------------------------------------

    @classmethod
    def connect(cls, control: str | ControlEndpoint = "unix:/run/tor/control",
                password: str | None = None) -> Tor:
        """Connect and authenticate (none, password, safecookie or cookie, as tor offers).

        A configured password is tried first and a wrong one is an error even if the cookie
        would work: a silently ignored setting is worse than a clear failure.
        """
        import stem
        import stem.control
        import stem.socket

        endpoint = control if isinstance(control, ControlEndpoint) else \
            ControlEndpoint.parse(control)
        try:
            if endpoint.path:
                sock = stem.socket.ControlSocketFile(endpoint.path)
            else:
                sock = stem.socket.ControlPort(endpoint.host, endpoint.port)
        except stem.SocketError as exc:
            raise _connect_error(endpoint, exc) from None
        controller = _controller_class()(sock)
        controller.set_caching(False)  # we SETCONF behind stem's back; never read stale values
        try:
            _authenticate(controller, endpoint, password)
        except BaseException:
            controller.close()
            raise
        return cls(controller, endpoint)

    @classmethod
    def from_config(cls, config: Config) -> Tor:
        return cls.connect(config.tor_control, config.tor_control_password)

    def close(self) -> None:
        self._controller.close()

    def __enter__(self) -> Tor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw commands -----------------------------------------------------------------------

    def command(self, line: str) -> list[str]:
        """Send one command; the reply's lines (without codes) or TorRefused."""
        import stem

        try:
            reply = self._controller.msg(line)
        except stem.SocketError as exc:
            raise ControlError(f"lost the connection to tor's control port {self.endpoint}: "
                               f"{exc}") from None
        name = line.split(" ", 1)[0]
        if not reply.is_ok():
            code, _, message = reply.content()[0]
            raise TorRefused(f"tor refused {name}: {code} {message}", code, name)
        return [content for _, _, content in reply.content()]

    def getconf(self, *keys: str) -> list[tuple[str, str | None]]:
        return parse_getconf(self.command("GETCONF " + " ".join(keys)))

    def getconf_values(self, key: str) -> list[str]:
        return [v for k, v in self.getconf(key) if v is not None]

    def getinfo(self, key: str) -> str:
        """One GETINFO value (multi-line values joined with newlines)."""
        import stem

        try:
            reply = self._controller.msg(f"GETINFO {key}")
        except stem.SocketError as exc:
            raise ControlError(f"lost the connection to tor's control port {self.endpoint}: "
                               f"{exc}") from None
        if not reply.is_ok():
            code, _, message = reply.content()[0]
            raise TorRefused(f"tor refused GETINFO {key}: {code} {message}", code, "GETINFO")
        value = getinfo_value([(divider, text) for _, divider, text in reply.content()], key)
        return "" if value is None else value

    def setconf(self, changes: Sequence[tuple[str, Sequence[str | None]]]) -> None:
        self.command(setconf_command(changes))

    def save(self) -> None:
        """SAVECONF: tor rewrites its torrc (comments are lost; tor keeps the old file as
        ``torrc.orig.1``).  Fails where tor may not write its torrc (Debian: /etc/tor/torrc is
        root's, and AppArmor forbids it).  Refused when torrc uses %include: tor 0.4.9 refuses
        SAVECONF then, but only until the first SETCONF; after one it copies the included files
        into torrc and drops the %include line."""
        path = self._getinfo_or("config-file", "")
        try:
            text = Path(path).read_text(errors="replace") if path else ""
        except OSError:
            text = ""
        if any(line.strip().lower().startswith("%include") for line in text.splitlines()):
            raise SaveConfError(
                f"not saving: {path} uses %include, and tor's SAVECONF would copy the included "
                "files into it and drop the %include line.  The change is active but lost when "
                "tor restarts: add the lines of 'torroute torrc' to a file it includes")
        try:
            self.command("SAVECONF")
        except TorRefused as exc:
            raise SaveConfError(
                f"tor could not save its configuration ({exc.code} {exc}): the change is "
                "active but lost when tor restarts.  Add the lines of 'torroute torrc' to "
                "torrc, or make the torrc writable for tor") from None

    # -- status / ensure --------------------------------------------------------------------

    def settings(self) -> TorSettings:
        conf = self.getconf("SocksPort", "DNSPort", "AutomapHostsOnResolve",
                            "AutomapHostsSuffixes", "VirtualAddrNetworkIPv4", "DisableNetwork")
        values: dict[str, list[str]] = {}
        for key, value in conf:
            values.setdefault(key.lower(), [])
            if value is not None:
                values[key.lower()].append(value)

        def one(key: str, default: str) -> str:
            got = values.get(key.lower()) or [default]
            return got[0]

        suffixes = ",".join(values.get("automaphostssuffixes") or [".onion,.exit"])
        return TorSettings(
            socks_ports=values.get("socksport", []),
            dns_ports=values.get("dnsport", []),
            socks_listeners=parse_quoted_list(self._getinfo_or("net/listeners/socks", "")),
            dns_listeners=parse_quoted_list(self._getinfo_or("net/listeners/dns", "")),
            automap=one("AutomapHostsOnResolve", "0") == "1",
            suffixes=[s for s in suffixes.split(",") if s],
            virtual_network=one("VirtualAddrNetworkIPv4", DEFAULT_VIRTUAL_NETWORK),
            disable_network=one("DisableNetwork", "0") == "1",
        )

    def _getinfo_or(self, key: str, default: str) -> str:
        try:
            return self.getinfo(key)
        except TorRefused:
            return default

    def bootstrap(self) -> Bootstrap:
        return parse_bootstrap(self._getinfo_or("status/bootstrap-phase", ""))

    def signal(self, name: str) -> None:
        """``SIGNAL name``, e.g. NEWNYM: new circuits for new streams, and the client's
        onion-service state (descriptors, intro point failures) purged -- what the daemon's
        self-healing sends (torroute.daemon.health)."""
        if not name.isalnum():
            raise ValueError(f"not a tor signal name: {name!r}")
        self.command(f"SIGNAL {name.upper()}")

    def status(self, config: Config | None = None) -> Status:
        config = config or Config()
        settings = self.settings()
        return Status(
            control=str(self.endpoint),
            version=self.getinfo("version").split()[0],
            bootstrap=self.bootstrap(),
            network_liveness=self._getinfo_or("network-liveness", "unknown"),
            circuit_established=self._getinfo_or("status/circuit-established", "0") == "1",
            settings=settings,
            problems=check_settings(settings, config),
        )

    def ensure(self, config: Config | None = None, *, save: bool = False,
               dry_run: bool = False) -> EnsureResult:
        """Set what torroute needs that is missing (see :func:`plan_ensure`), optionally
        SAVECONF.  A dry run only plans."""
        config = config or Config()
        settings = self.settings()
        changes = plan_ensure(settings, config)
        applied = saved = False
        if changes and not dry_run:
            try:
                self.setconf(changes)
            except TorRefused as exc:
                hint = ""
                if "bind" in str(exc).lower():
                    hint = " (is another program using the port?)"
                raise TorRefused(f"{exc}{hint}; tried: {setconf_command(changes)}",
                                 exc.code, exc.command) from None
            applied = True
        if save and not dry_run:
            self.save()
            saved = True
        remaining = [p for p in check_settings(self.settings() if applied else settings, config)
                     if not p.fixable]
        return EnsureResult(changes, applied, saved, remaining)

    def reverse(self, ip: str) -> str | None:
        """The .onion name behind an automap virtual address (``GETINFO address-mappings/all``),
        e.g. to make sense of a log line that only shows 127.2xx.x.x."""
        return reverse_lookup(parse_address_mappings(self.getinfo("address-mappings/all")), ip)

    # -- onion services ---------------------------------------------------------------------

    def hidden_service_blocks(self) -> list[HsBlock]:
        return group_hidden_services(self.getconf("HiddenServiceOptions"))

    def ephemeral_ids(self) -> list[str]:
        """Service ids of ADD_ONION services: detached ones and this connection's."""
        ids: list[str] = []
        for key in ("onions/detached", "onions/current"):
            ids += [line.strip() for line in self._getinfo_or(key, "").splitlines()
                    if line.strip()]
        return ids

    def list_onions(self) -> list[OnionService]:
        services: list[OnionService] = []
        for block in self.hidden_service_blocks():
            address, note = None, None
            try:
                address = directory_address(Path(block.directory))
            except ConfigError as exc:
                note = str(exc)
            services.append(OnionService(address, block.ports, block.directory,
                                         options=block.options, changed=False, note=note))
        for sid in self.ephemeral_ids():
            services.append(OnionService(f"{sid}.onion", [], None, changed=False,
                                         note="ephemeral (ADD_ONION): tor does not report its "
                                         "ports"))
        return services

    def create_onion(self, ports: Sequence[PortMapping | str], *,
                     directory: str | os.PathLike[str] | None = None,
                     key_file: str | os.PathLike[str] | None = None,
                     wait: bool = True, timeout: float = 120.0, force: bool = False,
                     save: bool = True, progress: Progress | None = None,
                     probe_timeout: float = 5.0) -> OnionService:
        """Publish an onion service.

        ``directory``: persistent (SETCONF HiddenServiceDir/Port with every existing service
        resent, then SAVECONF unless ``save=False``).  Otherwise ephemeral (ADD_ONION, detached
        so it outlives this connection): with ``key_file`` the key is created there (0600)
        *before* tor sees it, or reused, so the same address comes back after a tor restart.
        Unless ``force``, refuses ports 25/587 leading to an smtpd that relays for us.
        With ``wait`` it returns once tor uploaded the descriptor (HS_DESC UPLOADED) or raises
        DescriptorTimeout (the service stays).
        """
        mappings = [p if isinstance(p, PortMapping) else _parse_mapping(p) for p in ports]
        if not mappings:
            raise ConfigError("an onion service needs at least one --port")
        if directory is not None and key_file is not None:
            raise ConfigError("give a directory (persistent) or a key file (ephemeral), not both")
        verdicts = relay_check(mappings, probe_timeout)
        for v in verdicts:
            log.info("relay check: %s", v.line())
        refusal = relay_refusal(verdicts)
        if refusal and not force:
            raise OpenRelayRisk(refusal, verdicts)
        if refusal and progress:
            progress("warning (--force): " + refusal.split("\n", 1)[1].strip())
        for v in verdicts:
            if v.verdict == "no-listener" and progress:
                progress(f"warning: nothing answers at {v.mapping.target} yet ({v.detail}); "
                         "make sure the smtpd you put there does not relay for 127.0.0.1")
        watcher = _DescWatcher(self) if wait else None
        try:
            if directory is not None:
                service = self._create_persistent(str(directory), mappings, save)
            else:
                service = self._create_ephemeral(mappings, key_file)
            if watcher is not None and service.address and service.changed:
                try:
                    watcher.wait(service.address, timeout, progress, service)
                except DescriptorTimeout as exc:
                    service.uploaded = False
                    exc.service = service
                    raise
                service.uploaded = True
            return service
        finally:
            if watcher is not None:
                watcher.close()

    def _create_persistent(self, directory: str, mappings: list[PortMapping],
                           save: bool) -> OnionService:
        if not directory.startswith("/"):
            raise ConfigError(f"{directory!r}: the service directory must be an absolute path")
        blocks = self.hidden_service_blocks()
        mine = next((b for b in blocks if norm_dir(b.directory) == norm_dir(directory)), None)
        changed = True
        if mine is None:
            blocks.append(HsBlock(directory, [("HiddenServicePort", p.torrc_value)
                                              for p in mappings]))
        elif mine.ports == mappings:
            changed = False
        else:  # same directory, new ports: keep its other options
            mine.lines = mine.options + [("HiddenServicePort", p.torrc_value) for p in mappings]
        if changed:
            self.setconf(flatten_hidden_services(blocks))
        note = None
        try:
            address: str | None = directory_address(Path(directory), wait=5.0)
        except ConfigError as exc:
            address, note = None, str(exc)
        service = OnionService(address, mappings, directory, changed=changed, note=note)
        if save and changed:
            try:
                self.save()
            except SaveConfError as exc:
                from .torrc import onion_service_lines

                lines = "\n  ".join(onion_service_lines(directory, mappings))
                raise SaveConfError(f"the onion service {address or directory} runs now, but "
                                    f"{exc}.  The torrc lines:\n  {lines}") from None
        return service

    def _create_ephemeral(self, mappings: list[PortMapping],
                          key_file: str | os.PathLike[str] | None) -> OnionService:
        flags = ["Detach"]
        if key_file is None:
            key_arg = "NEW:ED25519-V3"
            flags.append("DiscardPK")
            address = None
        else:
            path = Path(key_file)
            if path.exists():
                key = read_key_file(path)
            else:
                key = new_expanded_key()
                try:
                    write_key_file(path, key)
                except OSError as exc:
                    raise ConfigError(f"cannot write the onion key file {path}: "
                                      f"{exc.strerror}") from None
            key_arg = KEY_PREFIX + base64.b64encode(key).decode("ascii")
            address = address_from_expanded_key(key)
            sid = address.removesuffix(".onion")
            if sid in self.ephemeral_ids():  # running already: replace (the ports may differ)
                self.command(f"DEL_ONION {sid}")
        ports = " ".join(f"Port={p.add_onion_value}" for p in mappings)
        lines = self.command(f"ADD_ONION {key_arg} Flags={','.join(flags)} {ports}")
        sid = next((ln.split("=", 1)[1] for ln in lines if ln.startswith("ServiceID=")), None)
        if sid is None:
            raise TorRefused("tor's ADD_ONION reply has no ServiceID", "", "ADD_ONION")
        got = f"{sid}.onion"
        if address is not None and got != address:
            raise TorRefused(f"tor made {got} from the key of {address}", "", "ADD_ONION")
        return OnionService(got, mappings, None,
                            key_file=str(key_file) if key_file is not None else None,
                            note=None if key_file else "no key file: the address is gone when "
                            "tor restarts")

    def remove_onion(self, which: str, *, save: bool = True) -> OnionService:
        """Remove a service by onion address or (persistent) directory.  A persistent
        service's directory (its key) is left on disk: delete it yourself if you mean it."""
        which = which.strip()
        if which.lower().rstrip(".").endswith(".onion"):
            address = parse_onion(which).host
            sid = address.removesuffix(".onion")
            if sid in self.ephemeral_ids():
                self.command(f"DEL_ONION {sid}")
                return OnionService(address, [], None)
            blocks = self.hidden_service_blocks()
            found = None
            for block in blocks:
                try:
                    if directory_address(Path(block.directory)) == address:
                        found = block
                except ConfigError:
                    continue
        else:
            if not which.startswith("/"):
                raise ConfigError(f"{which!r}: give an onion address or an absolute directory")
            blocks = self.hidden_service_blocks()
            found = next((b for b in blocks if norm_dir(b.directory) == norm_dir(which)), None)
        if found is None:
            raise OnionNotFound(f"tor runs no onion service {which}")
        rest = [b for b in blocks if b is not found]
        if rest:
            self.setconf(flatten_hidden_services(rest))
        else:
            self.command("RESETCONF HiddenServiceDir")
        service = OnionService(None, found.ports, found.directory, options=found.options)
        try:
            service.address = directory_address(Path(found.directory))
        except ConfigError:
            pass
        if save:
            self.save()
        return service


def _parse_mapping(text: str) -> PortMapping:
    from .torrc import parse_port_mapping

    try:
        return parse_port_mapping(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class _DescWatcher:
    """Collect HS_DESC events (subscribed before the service exists, so none is missed)."""

    def __init__(self, tor: Tor) -> None:
        from stem.control import EventType

        self.tor = tor
        self.events: queue.Queue[HsDescEvent] = queue.Queue()
        self._type = EventType.HS_DESC
        tor._controller.add_event_listener(self._on_event, self._type)

    def _on_event(self, event: Any) -> None:
        parsed = parse_hs_desc(str(event))
        if parsed is not None:
            self.events.put(parsed)

    def close(self) -> None:
        try:
            self.tor._controller.remove_event_listener(self._on_event)
        except Exception:  # the connection may be gone already
            pass

    def wait(self, address: str, timeout: float, progress: Progress | None,
             service: OnionService | None = None) -> None:
        sid = address.removesuffix(".onion")
        started = time.monotonic()
        deadline = started + timeout
        uploads = uploaded = failed = 0
        if progress:
            progress(f"waiting up to {timeout:.0f}s for tor to publish {address} "
                     "(HS_DESC UPLOADED)...")
        next_tick = started + 10
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                event = self.events.get(timeout=min(1.0, deadline - now))
            except queue.Empty:
                if progress and time.monotonic() >= next_tick:
                    next_tick += 10
                    boot = self.tor.bootstrap()
                    progress(f"  {time.monotonic() - started:.0f}s: {uploads} uploads started, "
                             f"{uploaded} done, {failed} failed (tor bootstrap "
                             f"{boot.progress}%: {boot.summary})")
                continue
            if event.address != sid:
                continue
            if event.action == "UPLOAD":
                uploads += 1
            elif event.action == "FAILED":
                failed += 1
                if progress:
                    progress(f"  upload to {event.hsdir or 'an HSDir'} failed "
                             f"({event.reason or 'no reason given'})")
            elif event.action == "UPLOADED":
                uploaded += 1
                if progress:
                    progress(f"  descriptor uploaded to {event.hsdir or 'an HSDir'} after "
                             f"{time.monotonic() - started:.1f}s")
                return
        boot = self.tor.bootstrap()
        why = "" if boot.done else (f"; tor is not connected to the Tor network "
                                    f"(bootstrap {boot.progress}%: {boot.summary}"
                                    f"{', ' + boot.warning if boot.warning else ''})")
        raise DescriptorTimeout(
            f"tor did not upload the descriptor of {address} within {timeout:.0f}s "
            f"({uploads} uploads started, {failed} failed){why}.  The service exists and is "
            "published once tor is online", service)


_CONTROLLER_CLASS: Any = None


def _controller_class() -> Any:
    """stem's Controller without TAKEOWNERSHIP: stem sends it when tor's
    __OwningControllerProcess is our pid, and tor then exits when this connection closes.
    torroute only visits tor; it must never own it."""
    global _CONTROLLER_CLASS
    if _CONTROLLER_CLASS is None:
        import stem.control

        class VisitingController(stem.control.Controller):
            def _post_authentication(self) -> None:
                stem.control.BaseController._post_authentication(self)

        _CONTROLLER_CLASS = VisitingController
    return _CONTROLLER_CLASS


def _connect_error(endpoint: ControlEndpoint, exc: Exception) -> Exception:
    text = str(exc)
    if endpoint.path:
        path = endpoint.path
        if "No such file" in text or "Errno 2]" in text:
            return ControlError(
                f"tor's control socket {path} does not exist: is tor running, with "
                f"'ControlSocket {path}' in torrc (Debian's tor has /run/tor/control)?  "
                "Or set [tor] control / --tor-control")
        if "Permission denied" in text or "Errno 13]" in text:
            return ControlAuthError(
                f"permission denied on tor's control socket {path}: "
                f"{_group_hint(path)}")
        if "Connection refused" in text:
            return ControlError(f"tor's control socket {path} refuses connections: tor is "
                                "not running (a stale socket file)")
    elif "refused" in text.lower():
        return ControlError(
            f"nothing listens on tor's control port {endpoint.host}:{endpoint.port}: is tor "
            f"running, with 'ControlPort {endpoint.host}:{endpoint.port}' in torrc?  "
            "Or set [tor] control / --tor-control")
    return ControlError(f"cannot connect to tor's control port {endpoint}: {text}")


def _group_hint(path: str) -> str:
    """Who may open a socket or read a cookie, in words an admin can act on."""
    try:
        st = os.stat(path)
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        return "run as root or as a member of tor's group (Debian: debian-tor)"
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return (f"it is {stat.filemode(st.st_mode)} group {group}: run as root or add this user to "
            f"that group (adduser {user} {group}, then log in again)")


def _authenticate(controller: Any, endpoint: ControlEndpoint, password: str | None) -> None:
    import stem
    import stem.connection as sc

    try:
        info = sc.get_protocolinfo(controller)
    except stem.ProtocolError:
        raise ControlError(f"{endpoint} is not a tor control port (no PROTOCOLINFO reply): "
                           "check [tor] control") from None
    except stem.SocketError as exc:
        raise ControlError(f"tor's control port {endpoint} closed the connection: {exc}"
                           ) from None
    methods = set(info.auth_methods)
    if password is not None and sc.AuthMethod.PASSWORD in methods:
        try:
            sc.authenticate_password(controller, password, suppress_ctl_errors=False)
            controller._post_authentication()
            return
        except (sc.IncorrectPassword, sc.PasswordAuthRejected):
            raise ControlAuthError(f"tor rejected the control password (tor.control_password) "
                                   f"on {endpoint}") from None
        except sc.AuthenticationFailure as exc:
            raise ControlAuthError(f"password authentication on {endpoint} failed: {exc}"
                                   ) from None
    if password is not None and sc.AuthMethod.PASSWORD not in methods:
        log.warning("tor at %s does not use password authentication; ignoring "
                    "tor.control_password", endpoint)
    try:
        sc.authenticate(controller, password=None, protocolinfo_response=info)
    except sc.UnreadableCookieFile as exc:
        cookie = exc.cookie_path
        raise ControlAuthError(
            f"cannot read tor's control cookie {cookie} ({_reason(exc)}): "
            f"{_group_hint(cookie)}; tor needs 'CookieAuthFileGroupReadable 1' for the group to "
            "read it (Debian's tor has it).  Or use a control password (HashedControlPassword "
            "in torrc, [tor] control_password)") from None
    except sc.MissingPassword:
        raise ControlAuthError(f"tor at {endpoint} wants a control password "
                               "(HashedControlPassword): set control_password in torroute's "
                               "[tor] table or give --tor-control-password-file") from None
    except (sc.IncorrectCookieValue, sc.IncorrectCookieSize) as exc:
        raise ControlAuthError(f"tor rejected its own cookie file ({exc}): is {endpoint} the "
                               "control port of the tor that wrote it?") from None
    except sc.AuthenticationFailure as exc:
        raise ControlAuthError(f"cannot authenticate to tor at {endpoint}: {exc}") from None
    except stem.SocketError as exc:
        raise ControlError(f"tor's control port {endpoint} closed the connection: {exc}"
                           ) from None


def _reason(exc: Exception) -> str:
    text = str(exc)
    return "permission denied" if "ermission denied" in text else text
