"""Exit statuses shared by every torroute program (sysexits.h where one fits)."""

OK = 0  # found / delivered / ok
NO_ROUTE = 1  # no onion route for this destination
USAGE = 64  # EX_USAGE: bad command line
DATAERR = 65  # EX_DATAERR: bad input (invalid onion, malformed address)
NOINPUT = 66  # EX_NOINPUT: the input (stdin) cannot be read
NOHOST = 68  # EX_NOHOST: no onion route for a recipient (torroute send: never the clear net)
UNAVAILABLE = 69  # EX_UNAVAILABLE: permanent failure (used by the delivery program: bounce)
SOFTWARE = 70  # EX_SOFTWARE: never used on purpose; internal errors defer instead (75)
CONFIG = 78  # EX_CONFIG: unusable configuration
TEMPFAIL = 75  # EX_TEMPFAIL: temporary failure, try again later (mail defers)
