"""Real parts for tests: a private Tor network, a Maildir sink (used by torroute's own tests)."""
