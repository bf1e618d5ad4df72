"""A memo table bounded in bytes, not entries: what the daemon's memory bound rests on.

A count bound says nothing about memory when keys come from the network (a 50 000-entry table
of 4 KB keys is 200 MB).  :class:`ByteMemo` charges every entry the size of its key and value
plus a fixed overhead (dict slot, objects), is emptied when the next entry would pass the
limit (a memo: everything in it can be recomputed), and never stores an entry whose key is
longer than ``max_key`` -- those are recomputed each time.  Reads are plain ``dict.get``.
"""

from __future__ import annotations

from typing import Any

#: bytes charged per entry on top of the key's and value's lengths: the dict slot, the key and
#: value objects' headers (measured with sys.getsizeof on CPython 3.11, rounded up)
ENTRY_OVERHEAD = 160


class ByteMemo(dict):
    """``dict`` whose :meth:`put` keeps the charged size (key + value + overhead) <= limit."""

    __slots__ = ("limit", "max_key", "charged")

    def __init__(self, limit: int, max_key: int) -> None:
        super().__init__()
        self.limit = limit
        self.max_key = max_key
        self.charged = 0  # bytes charged for the entries now held

    def put(self, key: Any, value: Any, key_size: int, value_size: int) -> bool:
        """Store ``key -> value`` (sizes in bytes, the caller's estimate); False when the key
        is too long to be memoised."""
        if key_size > self.max_key:
            return False
        cost = key_size + value_size + ENTRY_OVERHEAD
        if cost > self.limit:
            return False
        if self.charged + cost > self.limit:  # a replaced entry is charged twice: still bounded
            self.clear()
        dict.__setitem__(self, key, value)
        self.charged += cost
        return True

    def clear(self) -> None:
        dict.clear(self)
        self.charged = 0
