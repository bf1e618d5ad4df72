"""The pure SMTP client driven by hand, for its unit tests: what it sends, a client, a greeting."""

from __future__ import annotations

from torroute.protocols.smtp import Options, Send, SmtpClient


def sent(actions) -> bytes:
    """The bytes of every Send among ``actions``, in order."""
    return b"".join(a.data for a in actions if isinstance(a, Send))


def make_client(sender: bytes, rcpts, message: bytes, **opts) -> SmtpClient:
    """A client for ``o.onion:25``; ``opts`` are :class:`Options` fields."""
    return SmtpClient(sender, list(rcpts), message, Options(destination="o.onion:25", **opts))


def greet(c: SmtpClient, ehlo: bytes, greeting: bytes = b"220 mx\r\n") -> list:
    """Feed the greeting (the client must answer EHLO) and ``ehlo``: the actions after EHLO."""
    assert sent(c.receive(greeting)) == b"EHLO localhost\r\n"
    return c.receive(ehlo)
