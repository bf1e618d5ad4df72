"""``torroute send``: sendmail(8)-compatible submission over tor, for mail clients and scripts.

Standard library only at import time; the work is in torroute.delivery.submit (the message,
the recipients, delivery with the one core, the exit status) and torroute.delivery.spool
(``--queue`` / ``--flush``).  This module only turns flags into plain values and prints one
line per recipient on stderr.  Option groups: global (``--config``, ``-v``), routing, tor's
SocksPort, and sendmail's own (``-f -t -i -oi -F``, and the ones mail clients pass that change
nothing here: ``-oem -odi -B -N -R -V -G -U -bm``).
"""

from __future__ import annotations

import argparse
import sys

from ..exitcodes import CONFIG, TEMPFAIL, USAGE
from .options import global_options, routing_options, tor_options

DESCRIPTION = (
    "Read a message on stdin like sendmail(8) and deliver it over tor to the recipients' onion "
    "MXs (pins, SRV, user@<onion>.onion as is).  A recipient without an onion route is never "
    "sent in the clear: it is an error (exit 68) unless --fallback names a command for it.  "
    "Exit 0 all delivered (or queued with --queue), 75 some deferred (keep the message and "
    "retry), 65 bad address, 68 no onion route, 69 refused by the remote; one line per "
    "recipient on stderr."
)
EPILOG = ("precedence: 75 if any recipient is deferred and not queued, else the worst of "
          "65, 68, 69 (then a fallback's own status), else 0.  "
          "Ignored (accepted for mail clients): -oem -oee -oep -oeq -oew -om -odi -odb -odq "
          "-B TYPE -N DSN -R RET -V ENVID -G -U -bm.")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "send", parents=[global_options(), routing_options(),
                         tor_options(dns=False, control=False)],
        help="sendmail-compatible submission over tor (mail clients, scripts)",
        description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    p.set_defaults(run=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sendmail options")
    g.add_argument("-f", "-r", dest="sender", metavar="SENDER",
                   help="envelope sender (default: the Sender, else the From header; '<>' "
                   "the null sender)")
    g.add_argument("-t", dest="extract", action="store_true",
                   help="recipients from To, Cc and Bcc too (Bcc is never transmitted)")
    g.add_argument("-i", dest="ignore_dots", action="store_true",
                   help="a line with a single dot does not end the message (also -oi)")
    g.add_argument("-o", dest="o_options", action="append", default=[], metavar="OPT",
                   help="-oi as -i; -oem, -odi ... accepted and ignored")
    g.add_argument("-F", dest="full_name", metavar="NAME",
                   help="full name for the From header added when the message has none")
    g.add_argument("-b", dest="mode", metavar="MODE", help="only -bm (deliver mail)")
    for flag, what in (("-B", "TYPE"), ("-N", "DSN"), ("-R", "RET"), ("-V", "ENVID")):
        g.add_argument(flag, dest=f"ignored_{flag[1]}", metavar=what, help=argparse.SUPPRESS)
    for flag in ("-G", "-U"):
        g.add_argument(flag, dest=f"ignored_{flag[1]}", action="store_true",
                       help=argparse.SUPPRESS)
    s = p.add_argument_group("send options")
    s.add_argument("--fallback", metavar="CMD",
                   help="hand recipients without an onion route to CMD (e.g. /usr/sbin/sendmail;"
                   " run as CMD -i -f SENDER -- RCPT...); default: never, they are an error")
    s.add_argument("--queue", metavar="DIR",
                   help="keep deferred recipients in this spool (exit 0 once on disk); "
                   "retry with --flush DIR")
    s.add_argument("--flush", metavar="DIR",
                   help="retry the spool's due entries (no message on stdin)")
    s.add_argument("--now", action="store_true",
                   help="with --flush: retry every entry, not only those due by the backoff")
    p.add_argument("recipients", nargs="*", metavar="RECIPIENT")


def _say(line: str) -> None:
    data = ("torroute send: " + " ".join(line.split()) + "\n").encode("utf-8",
                                                                     "backslashreplace")
    sys.stderr.flush()
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def submit_options(args: argparse.Namespace):
    """The flags as :class:`torroute.delivery.submit.SubmitOptions` (BadInput 64 for an
    option that would change what sendmail does and that torroute send does not do)."""
    from ..delivery.submit import BadInput, SubmitOptions, sendmail_o_option

    if args.mode not in (None, "m"):
        raise BadInput(f"-b{args.mode}: only -bm (deliver a message) is supported", USAGE)
    ignore_dots = args.ignore_dots or any(sendmail_o_option(o) == "i" for o in args.o_options)
    return SubmitOptions(sender=args.sender, extract=args.extract, ignore_dots=ignore_dots,
                         full_name=args.full_name, fallback=args.fallback,
                         recipients=tuple(args.recipients))


def run(args: argparse.Namespace, config) -> int:
    from ..delivery.submit import BadInput, exit_status, fallback_argv
    from ..errors import ConfigError

    try:
        fallback = fallback_argv(args.fallback) if args.fallback else None
    except ConfigError as exc:
        _say(f"configuration error: {exc}")
        return CONFIG
    if args.flush:
        if args.recipients or args.queue or args.extract:
            _say("--flush DIR takes no recipients, -t or --queue")
            return USAGE
        return flush(args.flush, config, fallback, args.now)
    if args.now:
        _say("--now only goes with --flush DIR")
        return USAGE
    try:
        options = submit_options(args)
        results = send(options, config, fallback, args.queue)
    except BadInput as exc:
        _say(f"error: {exc}; nothing sent")
        return exc.exit_code
    for result in results:
        _say(result.line())
    return exit_status(results)


def submit_or_defer(data: bytes, sender: str, recipients, config, fallback):
    """torroute.delivery.submit.submit, with an unexpected error turned into "deferred" for
    every recipient (the caller, or the spool, keeps the message); a configuration error
    (a map that does not load: nothing was sent) still exits 78."""
    from ..delivery.submit import DEFERRED, RecipientResult, submit
    from ..errors import ConfigError

    try:
        return submit(data, sender, recipients, config, fallback=fallback)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the message must not be lost
        return [RecipientResult(r, DEFERRED, "4.3.0", f"internal error: {type(exc).__name__}: "
                                f"{exc}; not known to be delivered, try again", TEMPFAIL)
                for r in recipients]


def send(options, config, fallback, queue: str | None):
    """Read stdin, deliver, queue what was deferred (with ``queue``)."""
    from ..delivery.submit import DEFERRED, QUEUED, RecipientResult, prepare, stdin_bytes

    raw = stdin_bytes(sys.stdin.buffer if sys.stdin is not None else None)
    prepared = prepare(raw, options)
    results = submit_or_defer(prepared.data, prepared.sender, prepared.recipients, config,
                              fallback)
    deferred = {r.recipient: (r.dsn, r.text) for r in results if r.kind == DEFERRED}
    if queue and deferred:
        from ..delivery.spool import Spool

        try:
            path = Spool(queue).enqueue(prepared.data, prepared.sender, deferred)
        except OSError as exc:
            _say(f"cannot queue in {queue}: {exc}; the deferred recipients are not kept "
                 "(exit 75: the caller keeps the message)")
        else:
            results = [RecipientResult(r.recipient, QUEUED, r.dsn, f"{r.text}; queued in "
                                       f"{path} (torroute send --flush {queue})", 0)
                       if r.kind == DEFERRED else r for r in results]
    return results


def flush(directory: str, config, fallback, now: bool) -> int:
    from pathlib import Path

    from ..delivery.spool import Spool, SpoolBusy
    from ..delivery.submit import exit_status

    if not Path(directory).is_dir():
        _say(f"--flush {directory}: no such spool directory")
        return USAGE
    spool = Spool(directory)
    try:
        report = spool.flush(lambda data, sender, rcpts: submit_or_defer(
            data, sender, rcpts, config, fallback), now=now)
    except SpoolBusy as exc:
        _say(f"{exc}; nothing done")
        return TEMPFAIL
    for name, result in report.results:
        _say(f"{name}: {result.line()}")
    for problem in report.unreadable:
        _say(f"unreadable spool entry (left as is): {problem}")
    status = exit_status(r for _, r in report.results)
    return status if status or not report.unreadable else TEMPFAIL
