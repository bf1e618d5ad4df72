"""Real parts for testing a torroute setup, all on loopback (like aiosmtpd's testing helpers).

* :mod:`torroute.testing.tor` -- one real tor in bridge mode that never bootstraps (SocksPort,
  DNSPort automap and ControlPort work; nothing leaves 127.0.0.1);
* :mod:`torroute.testing.dnsmasq` -- a real dnsmasq serving SRV records on loopback;
* :mod:`torroute.testing.sink` -- an SMTP sink (aiosmtpd) keeping what it receives, in a Maildir;
* :mod:`torroute.testing.testnet` -- a private Tor network with real onion services;
* :mod:`torroute.testing.ports` -- free loopback ports, waiting for a listener;
* :mod:`torroute.testing.pytest_plugin` -- all of it as pytest fixtures (entry point
  ``torroute`` in ``pytest11``).

Only the plugin imports pytest; nothing is imported eagerly here.
"""
