"""torroute: deliver mail for ordinary domains over Tor onion services.

The public Python API (docs/api.rst) is the names in ``__all__``; everything else is private.
They load lazily (module ``__getattr__``, PEP 562): ``torroute deliver`` imports this package
once per message and must not pay for dnspython, asyncio or smtplib it does not use.
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_config": "config", "Config": "config",
    "Router": "api", "dial": "api", "open_connection": "api", "resolve_automap": "api",
    "Route": "routing.decisions", "NoRoute": "routing.decisions", "TempFail": "routing.decisions",
    "Reject": "routing.decisions",
    "parse_onion": "routing.onion", "OnionAddress": "routing.onion",
    "SMTP": "delivery.client", "SendResult": "delivery.client", "send_message": "delivery.client",
    "TorrouteError": "errors", "TemporaryError": "errors", "PermanentError": "errors",
    "InvalidOnion": "errors", "ConfigError": "errors", "MapError": "errors",
    "DNSTemporaryError": "errors", "TorUnavailable": "errors", "AutomapError": "errors",
    "SocksError": "errors", "TemporarySocksError": "errors", "PermanentSocksError": "errors",
    "ProtocolError": "errors", "TlsRefused": "errors",
}

__all__ = sorted(_EXPORTS)

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers and IDEs only; at run time names load on first use
    from .api import Router, dial, open_connection, resolve_automap  # noqa: F401
    from .config import Config, load_config  # noqa: F401
    from .delivery.client import SMTP, SendResult, send_message  # noqa: F401
    from .errors import (  # noqa: F401
        AutomapError,
        ConfigError,
        DNSTemporaryError,
        InvalidOnion,
        MapError,
        PermanentError,
        PermanentSocksError,
        ProtocolError,
        SocksError,
        TemporaryError,
        TemporarySocksError,
        TlsRefused,
        TorrouteError,
        TorUnavailable,
    )
    from .routing.decisions import NoRoute, Reject, Route, TempFail  # noqa: F401
    from .routing.onion import OnionAddress, parse_onion  # noqa: F401


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torroute' has no attribute {name!r}")
    import sys

    __import__(f"{__name__}.{module}")
    value = getattr(sys.modules[f"{__name__}.{module}"], name)
    globals()[name] = value  # later look-ups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
