"""Talking to tor: dial (SocksPort), automap (DNSPort), control (the control port, via stem) and
control_socket (a raw one), settings, onion_service, relay_probe (the open-relay trap), torrc."""
