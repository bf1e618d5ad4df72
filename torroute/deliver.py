"""``torroute deliver``: a Postfix ``pipe(8)`` delivery program that speaks SMTP to an onion MX
through Tor's SocksPort.

Why a native program instead of Postfix's ``smtp`` under ``torsocks``: torsocks breaks Postfix
(IPv6 sockets, connection-cache descriptor passing, throttled transports).  This program is
started once per message (or per recipient with ``recipient_limit = 1``), so it imports only the
standard library on the success path: the SOCKS5 handshake is a few bytes done here, the SMTP
protocol is :mod:`torroute.smtp` (pure), and :mod:`torroute.socks` (tor's error table, asyncio)
is imported only when tor refuses.

Every path ends in an :class:`~torroute.smtp.Outcome`: exit 0 delivered, 75 deferred, 69
bounced, with the enhanced status code first on stdout (pipe(8): it wins over the exit status).
Nothing is ever sent except through Tor; anything unexpected defers.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from .smtp import Close, Options, Outcome, Send, SmtpClient, StartTLS, permanent, temporary

# ---- settings ([deliver] in the configuration, then command-line flags)

STARTTLS_MODES = ("no", "opportunistic", "required")


class DeliverSettings:
    """What one delivery needs; see docs/postfix.rst for the [deliver] table.  (A plain class:
    a dataclass costs ~0.5 ms at import, in a program started once per message.)"""

    proxy: tuple[str, int] = ("127.0.0.1", 9050)
    ehlo_name: str = "localhost"  # never the host's clear-net name by default
    starttls: str = "no"  # over an onion the address authenticates the server already
    tls_verify: bool = False
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
    def from_config(cls, config, args=None) -> DeliverSettings:
        """Read ``[deliver]``; flags in ``args`` (when not None) win."""
        from .errors import ConfigError

        table = dict(config.section("deliver"))
        settings = cls(proxy=tuple(config.tor_socks), isolate=bool(config.isolate_streams),
                       default_port=config.default_port,
                       connect_timeout=float(config.socks_timeout))
        kinds = {"ehlo_name": str, "starttls": str, "tls_verify": bool, "pipelining": bool,
                 "connect_timeout": float, "command_timeout": float, "data_timeout": float,
                 "time_limit": float, "isolate": bool, "require_onion": bool}
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
        if args is not None:
            for key in ("ehlo_name", "starttls", "connect_timeout", "command_timeout",
                        "data_timeout", "time_limit"):
                value = getattr(args, key, None)
                if value is not None:
                    setattr(settings, key, value)
        if settings.starttls not in STARTTLS_MODES:
            raise ConfigError(f"deliver.starttls: expected one of {', '.join(STARTTLS_MODES)}")
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


# ---- SOCKS5 to tor (pure codec + one blocking function)

SOCKS_VERSION = 5


def socks5_greeting(auth: bool) -> bytes:
    """Offer 'no authentication', or username/password (tor's IsolateSOCKSAuth)."""
    return bytes([SOCKS_VERSION, 1, 2 if auth else 0])


def socks5_userpass(username: bytes, password: bytes) -> bytes:
    return bytes([1, len(username)]) + username + bytes([len(password)]) + password


def socks5_connect(host: str, port: int) -> bytes:
    """CONNECT with the host name (ATYP 3): tor resolves it; nothing is resolved locally."""
    name = host.encode("ascii")
    if not 0 < len(name) < 256:
        raise ValueError("host name length")
    return bytes([SOCKS_VERSION, 1, 0, 3, len(name)]) + name + struct.pack(">H", port)


def socks5_reply_size(head: bytes) -> int:
    """Total size of a CONNECT reply, from its first 5 bytes."""
    atyp = head[3]
    if atyp == 1:
        return 10
    if atyp == 4:
        return 22
    if atyp == 3:
        return 7 + head[4]
    raise ValueError(f"SOCKS reply with address type {atyp}")


class SocksFailure(Exception):
    """Tor answered the CONNECT with a non-zero reply code (or garbage: code None)."""

    def __init__(self, code: int | None, detail: str = "") -> None:
        super().__init__(detail or f"SOCKS reply {code}")
        self.code = code


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise SocksFailure(None, "tor closed the SOCKS connection")
        data += chunk
    return data


def socks_dial(host: str, port: int, proxy: tuple[str, int], timeout: float,
               isolate: bool = False) -> socket.socket:
    """A socket connected to host:port through tor's SocksPort.  Raises OSError when the
    SocksPort is unreachable, SocksFailure when tor refuses, TimeoutError."""
    sock = socket.create_connection(proxy, timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(socks5_greeting(isolate))
        reply = _recv_exact(sock, 2)
        if reply[0] != SOCKS_VERSION or reply[1] != (2 if isolate else 0):
            raise SocksFailure(None, f"tor refused the SOCKS5 method ({reply.hex()})")
        if isolate:
            sock.sendall(socks5_userpass(f"torroute:{host}".encode(), b"torroute"))
            if _recv_exact(sock, 2)[1] != 0:
                raise SocksFailure(None, "tor refused SOCKS5 username/password")
        sock.sendall(socks5_connect(host, port))
        head = _recv_exact(sock, 5)
        if head[0] != SOCKS_VERSION:
            raise SocksFailure(None, f"not a SOCKS5 reply ({head.hex()})")
        if head[1] != 0:
            raise SocksFailure(head[1])
        _recv_exact(sock, socks5_reply_size(head) - 5)
    except BaseException:
        sock.close()
        raise
    return sock


def socks_outcome(exc: BaseException, destination: str, proxy: tuple[str, int],
                  timeout: float) -> Outcome:
    """Classify a failed dial: tor down / temporary refusals defer, a bad address bounces."""
    where = f"{proxy[0]}:{proxy[1]}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return temporary("4.4.1", f"{destination}: connect through tor timed out after "
                         f"{timeout:g}s")
    if isinstance(exc, SocksFailure):
        from .socks import socks_error  # tor's reply table (heavier imports: failures only)

        error = socks_error(exc.code, destination, str(exc))
        if error.temporary:
            return temporary("4.4.1", f"tor: {error}")
        dsn = "5.1.2" if exc.code == 0xF6 else "5.7.1" if exc.code in (0xF4, 0xF5) else "5.4.4"
        return permanent(dsn, f"tor: {error}")
    if isinstance(exc, ValueError):
        return temporary("4.4.1", f"{destination}: SOCKS5 with tor failed: {exc}")
    return temporary("4.4.1", f"tor SocksPort {where} unreachable: "
                     f"{getattr(exc, 'strerror', None) or exc}")


# ---- the session driver (I/O edge of torroute.smtp)


class _Clock:
    def __init__(self, limit: float) -> None:
        self.deadline = time.monotonic() + limit

    def budget(self, wanted: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("time limit")
        return min(wanted, left)


def _tls_wrap(sock: socket.socket, host: str, verify: bool) -> socket.socket:
    import ssl

    context = ssl.create_default_context()
    if not verify:  # the onion address already authenticates the server's key
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(sock, server_hostname=host)


def run_session(sock: socket.socket, client: SmtpClient, settings: DeliverSettings,
                clock: _Clock, host: str) -> Outcome:
    """Drive ``client`` over ``sock`` until it has an outcome."""
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
                        sock = _tls_wrap(sock, host, settings.tls_verify)
                    except OSError as exc:
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


def deliver(delivery: Delivery, message: bytes, settings: DeliverSettings) -> Outcome:
    """Deliver one message to the nexthop through tor; every failure becomes an Outcome."""
    clock = _Clock(settings.time_limit)
    try:
        host, port = parse_nexthop(delivery.nexthop, settings.default_port)
    except ValueError as exc:
        return temporary("4.3.5", f"torroute deliver: {exc} (check transport_maps)")
    destination = f"{host}:{port}"
    if settings.require_onion and not looks_like_onion(host):
        return temporary("4.3.5", f"torroute deliver: nexthop {delivery.nexthop!r} is not a v3 "
                         ".onion address; refusing to deliver (deliver.require_onion)")
    recipients = [os.fsencode(r) for r in delivery.recipients]
    if not recipients or any(not r for r in recipients):
        return temporary("4.3.5", "torroute deliver: no recipient (check the master.cf argv)")
    options = Options(ehlo_name=settings.ehlo_name, starttls=settings.starttls,
                      pipelining=settings.pipelining, destination=destination)
    client = SmtpClient(envelope_sender(delivery.sender), recipients, message, options)
    try:
        sock = socks_dial(host, port, settings.proxy, clock.budget(settings.connect_timeout),
                          settings.isolate)
    except (OSError, SocksFailure, ValueError) as exc:
        return socks_outcome(exc, destination, settings.proxy, settings.connect_timeout)
    try:
        return run_session(sock, client, settings, clock, host)
    finally:
        sock.close()
