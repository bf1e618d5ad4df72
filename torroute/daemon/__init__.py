"""The lookup daemon, in data-path order: settings (``[serve]``), lookup connections and their
answers, LMTP sessions, the service (listeners, reload, signals, systemd), logging."""
