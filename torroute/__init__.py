"""torroute: deliver mail for ordinary domains over Tor onion services."""

__version__ = "0.1.0"
