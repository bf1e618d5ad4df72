"""SOCKS5 CONNECT to tor's SocksPort as a pure machine: it says what to send and how many bytes
to read next; the drivers (:mod:`torroute.tor.dial`) only move bytes and enforce deadlines.

Why our own and not python-socks' ``_protocols.socks5``: tor's ``ExtendedErrors`` (0xF0..0xF7,
the onion-service codes that decide defer or bounce) are outside RFC 1928, and python-socks
turns them into a generic error whose text had to be parsed for the code.  Here the code is the
result.  Cost (``-X importtime``, cumulative, after what ``torroute deliver`` loads anyway):
this package, module and the blocking driver ~0.6 ms, python-socks' sync dialer ~24 ms; per
dial CPU in bench/socks_dial.py (ours 88 us, python-socks 96 us, sync, loopback).

Only what torroute sends: the host name goes to tor (ATYP 3, resolved by tor, never locally),
auth is "none" or username/password (``IsolateSOCKSAuth``: a distinct username gets its own
circuits).  :meth:`Socks5Client.feed` never raises: any reply bytes end in ``connected`` or a
:class:`~torroute.errors.SocksError` in ``failure``; only a request that cannot be encoded
(:class:`Socks5RequestError`, at construction) raises.
"""

from __future__ import annotations

from ..errors import PermanentSocksError, ProtocolError, SocksError, TemporarySocksError

__all__ = [
    "SOCKS_REPLIES",
    "Socks5Client",
    "Socks5RequestError",
    "socks_error",
    "describe",
]

VERSION = 5

#: reply code -> (meaning, temporary?).  Unknown codes are temporary: defer, don't bounce.
SOCKS_REPLIES: dict[int, tuple[str, bool]] = {
    0x01: ("general SOCKS server failure", True),
    0x02: ("connection not allowed by ruleset", True),
    0x03: ("network unreachable", True),
    0x04: ("host unreachable", True),
    0x05: ("connection refused by the destination", True),
    0x06: ("TTL expired (tor: connection attempt timed out)", True),
    0x07: ("command not supported (local tor configuration?)", True),
    0x08: ("address type not supported (local tor configuration?)", True),
    # tor's ExtendedErrors for onion services (tor 0.4.3+, proposal 304)
    0xF0: ("onion service descriptor not found (offline, or not yet published)", True),
    0xF1: ("onion service descriptor is invalid", True),
    0xF2: ("onion service introduction failed", True),
    0xF3: ("onion service rendezvous failed", True),
    0xF4: ("onion service requires client authorization, none configured", False),
    0xF5: ("onion service client authorization was rejected", False),
    0xF6: ("invalid onion address", False),
    0xF7: ("onion service introduction timed out", True),
}


def describe(code: int | None, destination: str, detail: str = "") -> tuple[str, bool]:
    """(message, temporary?) for a reply code; ``None`` (no usable reply) is temporary."""
    if code is None:
        return f"SOCKS connect to {destination} failed: {detail}", True
    meaning, temporary = SOCKS_REPLIES.get(code, (f"unknown SOCKS reply code {code:#04x}", True))
    return f"{destination}: {meaning} (SOCKS reply {code:#04x})", temporary


class Socks5RequestError(ProtocolError):
    """The CONNECT cannot be encoded (host name not 1..255 ASCII bytes, port, credentials)."""


def socks_error(code: int | None, destination: str, detail: str = "") -> SocksError:
    """The error for a reply code (unknown codes are temporary: defer, don't bounce)."""
    message, temporary = describe(code, destination, detail)
    cls = TemporarySocksError if temporary else PermanentSocksError
    return cls(message, code)


# states: what the next bytes from tor are
_METHOD, _AUTH, _HEAD, _NAME_LENGTH, _ADDRESS, _DONE = range(6)
_ADDRESS_SIZE = {1: 4 + 2, 4: 16 + 2}  # ATYP -> BND.ADDR + BND.PORT (3: length byte first)


class Socks5Client:
    """One CONNECT: send :meth:`initial`, then read up to :attr:`want` bytes, :meth:`feed`
    them and send what it returns, until :attr:`done` (:attr:`connected`, or :attr:`failure`).
    Partial reads are fine (``want`` shrinks); bytes after the reply (early data from the
    destination) are kept in :attr:`extra`.  The reply code is known from the first 4 bytes of
    the reply, so a refusal needs no more (the testnet probe has always read only those).

    ``pipeline=True`` sends greeting, auth and CONNECT in one write (one round trip less; tor
    reads them in order): how the testnet probe talks to tor."""

    __slots__ = ("_auth", "_connect", "_pipeline", "_buf", "_need", "_state",
                 "failure", "destination", "extra", "bound")

    def __init__(self, host: str, port: int, username: bytes | None = None,
                 password: bytes = b"", pipeline: bool = False) -> None:
        try:
            name = host.encode("ascii")
        except (UnicodeError, AttributeError):
            raise Socks5RequestError(f"host name {host!r} is not ASCII") from None
        if not 0 < len(name) < 256:
            raise Socks5RequestError("host name length")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise Socks5RequestError(f"port {port!r}")
        if username is not None and not (0 < len(username) < 256 and len(password) < 256):
            raise Socks5RequestError("username/password length")
        self._auth = (None if username is None else
                      bytes([1, len(username)]) + username + bytes([len(password)]) + password)
        self._connect = bytes([VERSION, 1, 0, 3, len(name)]) + name + port.to_bytes(2, "big")
        self._pipeline = pipeline
        self._buf = b""
        self._need = 2  # size of the message being read
        self._state = _METHOD
        self.failure: SocksError | None = None
        self.destination = f"{host}:{port}"
        self.extra = b""
        self.bound = b""  # ATYP + BND.ADDR + BND.PORT of the reply, raw

    @property
    def want(self) -> int:
        """How many bytes to read next (at most; never more than the reply holds); 0: done."""
        return 0 if self._state == _DONE else self._need - len(self._buf)

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def connected(self) -> bool:
        return self._state == _DONE and self.failure is None

    def initial(self) -> bytes:
        """The greeting (with ``pipeline``: greeting, auth and CONNECT in one)."""
        greeting = bytes([VERSION, 1, 0 if self._auth is None else 2])
        if self._pipeline:
            return greeting + (self._auth or b"") + self._connect
        return greeting

    def eof(self) -> None:
        """Tor closed the connection before the reply was complete."""
        if self._state != _DONE:
            self._fail(None, "tor closed the SOCKS connection")

    def feed(self, data: bytes) -> bytes:
        """Consume reply bytes; returns what to send now (possibly ``b""``).  Never raises."""
        if self._state == _DONE:
            self.extra += data
            return b""
        buf = self._buf + data
        out = b""
        while self._state != _DONE and len(buf) >= self._need:
            chunk, buf = buf[: self._need], buf[self._need:]
            out += self._step(chunk)
        if self._state == _DONE:
            self.extra, buf = buf, b""
        self._buf = buf
        return out

    def _fail(self, code: int | None, detail: str = "") -> bytes:
        self.failure = socks_error(code, self.destination, detail)
        self._state = _DONE
        return b""

    def _next(self, state: int, need: int, send: bytes = b"") -> bytes:
        self._state, self._need = state, need
        return b"" if self._pipeline else send

    def _step(self, chunk: bytes) -> bytes:
        """One complete message part of ``self._need`` bytes."""
        state = self._state
        if state == _METHOD:
            method = 0 if self._auth is None else 2
            if chunk[0] != VERSION or chunk[1] != method:
                return self._fail(None, f"tor refused the SOCKS5 method ({chunk.hex()})")
            if self._auth is None:
                return self._next(_HEAD, 4, self._connect)
            return self._next(_AUTH, 2, self._auth)
        if state == _AUTH:
            if chunk[1] != 0:
                return self._fail(None, "tor refused SOCKS5 username/password")
            return self._next(_HEAD, 4, self._connect)
        if state == _HEAD:
            if chunk[0] != VERSION:
                return self._fail(None, f"not a SOCKS5 reply ({chunk.hex()})")
            if chunk[1] != 0:
                return self._fail(chunk[1])
            self.bound = chunk[3:]
            if chunk[3] == 3:
                self._state, self._need = _NAME_LENGTH, 1
                return b""
            size = _ADDRESS_SIZE.get(chunk[3])
            if size is None:
                return self._fail(None, f"SOCKS reply with address type {chunk[3]}")
            self._state, self._need = _ADDRESS, size
            return b""
        if state == _NAME_LENGTH:
            self.bound += chunk
            self._state, self._need = _ADDRESS, chunk[0] + 2
            return b""
        self.bound += chunk  # _ADDRESS: the reply is complete
        self._state = _DONE
        return b""
