"""Handing mail to an onion MX: the pipe program's core, the LMTP relay, the Python client."""
