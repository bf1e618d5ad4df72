"""Talking to tor: the SOCKS dialer, automap, the control port, torrc, onion services."""
