"""``torroute sink``: an onion-only inbox (SMTP into a Maildir) with quotas that refuse
instead of dying.  settings ([sink] table), quota (pure accounting), maildir (durable
delivery), server (the asyncio driver), tls (STARTTLS with a self-signed key)."""

from .settings import SinkSettings

__all__ = ["SinkSettings"]
