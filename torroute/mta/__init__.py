"""Setting up the MTAs: Postfix (postconf) and Exim (Debian conf.d) for torroute, reversibly."""
