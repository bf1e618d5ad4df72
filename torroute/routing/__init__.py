"""Where mail goes: onion addresses, pinned maps, SRV ordering, the router and its decisions."""
