"""The daemon's logging: one line per decision, cheaply.

One log line per decision is wanted, but the logging machinery (a record, the caller's frame,
a write(2) per line) costs more than the lookup itself.  So: records without caller, thread or
process lookups, a stderr handler that flushes at most every 0.2 s, and a direct writer of the
decision lines when that changes nothing visible.  Every daemon module logs to one logger,
``torroute.daemon``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__package__)  # one logger for all the daemon's lines: torroute.daemon


class DeferredFlushHandler(logging.StreamHandler):
    """A stream handler that writes to a buffer and flushes it at most every ``delay`` seconds.

    One log line per decision is wanted, but a write(2) per line costs more than the lookup
    itself.  Warnings and errors flush at once; without a running loop (start-up, shutdown)
    every record is flushed at once.
    """

    def __init__(self, stream, delay: float = 0.2) -> None:
        super().__init__(stream)
        self.delay = delay
        self._pending = False

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            super().flush()

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (any more): write everything now
            self._pending = False
            super().flush()
            return
        if self._pending:
            return
        self._pending = True
        loop.call_later(self.delay, self._flush_now)

    def _flush_now(self) -> None:
        self._pending = False
        super().flush()

    def line_writer(self, logger: logging.Logger) -> Callable[[str], None] | None:
        """A fast writer of INFO lines for ``logger`` formatted exactly as this handler would,
        or None if the format is not constant (e.g. it has a timestamp)."""
        fmt = self.formatter or logging.Formatter()
        if "asctime" in getattr(fmt, "_fmt", "") or "created" in getattr(fmt, "_fmt", ""):
            return None
        marker = "\x00message\x00"
        record = logging.LogRecord(logger.name, logging.INFO, "", 0, marker, None, None)
        text = fmt.format(record)
        if text.count(marker) != 1:
            return None
        prefix, suffix = text.split(marker)
        suffix += self.terminator
        write = self.stream.write

        def line(message: str) -> None:
            write(prefix + message + suffix)
            if not self._pending:  # flush() asks for the running loop: a getpid(2) each time
                self.flush()

        return line


def install_fast_logging() -> DeferredFlushHandler | None:
    """Cheaper log records for the daemon (no caller/thread/process lookups per record) and a
    buffered stderr handler in place of the root's line-buffered one."""
    import sys

    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented switch: skip the stack walk that finds the caller
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
            stream = open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8",
                          errors="backslashreplace", closefd=False)
            fast = DeferredFlushHandler(stream)
            fast.setFormatter(handler.formatter)
            fast.setLevel(handler.level)
            root.removeHandler(handler)
            root.addHandler(fast)
            return fast
    return None


def decision_line_writer(handler: DeferredFlushHandler | None) -> Callable[[str], None] | None:
    """Bypass the logging machinery for decision lines when that changes nothing visible:
    the decision logger has no handlers or filters of its own and the root has only ``handler``.
    """
    if handler is None or not log.isEnabledFor(logging.INFO):
        return None
    chain = [log, *[logging.getLogger(n) for n in ("torroute",)]]
    if any(lg.handlers or lg.filters or not lg.propagate for lg in chain):
        return None
    root = logging.getLogger()
    if root.handlers != [handler] or handler.filters or handler.level > logging.INFO:
        return None
    return handler.line_writer(log)
