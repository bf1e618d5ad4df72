"""The lookup daemon: settings, answers, lookup and LMTP sessions, lifecycle, logging."""
