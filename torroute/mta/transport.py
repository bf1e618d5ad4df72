"""Static routing tables from onionmx maps, for sites that want no torroute daemon.

Pure: a loaded :class:`~torroute.routing.maps.PinMap` in, text out.  Three forms:

* :func:`postfix_transport`: a Postfix ``transport(5)`` file as onionmx's
  ``scripts/map2postfix-transport.rb`` makes it -- sorted by onion, then domain, the domain
  column padded to the longest domain, ``smtptor:[onion]`` (``NAME:[onion]:PORT`` with a
  transport name and a port, e.g. ``torroute:[onion]:25`` for the ``torroute deliver`` pipe);
* :func:`exim_lsearch`: ``domain: onion`` lines for an Exim ``lsearch`` lookup (a port, where
  one is written, as ``onion::PORT``: Exim's host-list form, usable as ``route_data``);
* :func:`cdbmake_input`: the same pairs as ``+klen,dlen:key->data`` records, the input of
  ``cdbmake`` (Debian package freecdb) and ``cdb -c`` (tinycdb), for an Exim ``cdb`` lookup.

What is left out, one warning each (:func:`left_out`): v2 pins (dead services), invalid pins
(a mistyped onion: the daemon would defer them; a static table cannot, so the domain gets no
line and takes the MTA's usual route -- the warning says so), and whatever the loader skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..routing.maps import InvalidPin, Pin, PinMap

__all__ = ["DEFAULT_TRANSPORT", "sorted_pins", "left_out", "postfix_transport", "exim_lsearch",
           "cdbmake_input", "render", "valid_transport_name"]

DEFAULT_TRANSPORT = "smtptor"  # onionmx's name for its SOCKS-wrapped smtp transport
FORMATS = ("postfix", "exim", "cdbmake")
SMTP_PORT = 25
_TRANSPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def sorted_pins(pinmap: PinMap) -> list[Pin]:
    """The valid pins, by onion then domain (onionmx's order: one onion's domains together)."""
    return sorted(pinmap.pins.values(), key=lambda pin: (pin.onion, pin.domain))


def left_out(pinmap: PinMap) -> list[str]:
    """One line per map entry that gets no route line, each with its FILE:LINE.  An invalid
    pin (a typo) gets a ``retry:`` line in the Postfix table instead of a route: without any
    line its mail would take the MTA's usual route, the clear net (fail closed)."""
    lines = [f"{problem.source}: left out: {problem.message} (v2 onion services are dead)"
             for problem in pinmap.v2]
    for problem in pinmap.problems:
        lines.append(f"{problem.source}: deferred: {problem.message}"
                     .replace(" (mail for it defers)", " (a retry:4.3.5 line: its mail waits "
                              "until the map is fixed)"))
    return sorted(lines, key=_source_order)


def deferrals(pinmap: PinMap) -> list[InvalidPin]:
    """The mistyped pins, by domain: each domain's mail must defer, never take the usual route."""
    return sorted(pinmap.invalid.values(), key=lambda bad: bad.domain)


def _source_order(line: str) -> tuple[str, int]:
    file, _, rest = line.partition(":")
    number = rest.split(":", 1)[0]
    return (file, int(number) if number.isdigit() else 0)


def _port_suffix(pin: Pin, always: bool, separator: str) -> str:
    return f"{separator}{pin.port}" if always or pin.port != SMTP_PORT else ""


def postfix_transport(pins: Iterable[Pin], transport: str = DEFAULT_TRANSPORT,
                      show_port: bool = False, deferred: Iterable[InvalidPin] = ()) -> str:
    """``domain  TRANSPORT:[onion]`` lines; ``:PORT`` when ``show_port`` or a pin's port is not
    25 (Postfix's smtp would otherwise use 25); then ``domain  retry:4.3.5 invalid pin at
    FILE:LINE`` for each mistyped pin (Postfix's retry transport defers the mail)."""
    pins, deferred = list(pins), list(deferred)
    width = max((len(entry.domain) for entry in [*pins, *deferred]), default=0)
    return "".join([f"{pin.domain:<{width}} {transport}:[{pin.onion}]"
                    f"{_port_suffix(pin, show_port, ':')}\n" for pin in pins]
                   + [f"{bad.domain:<{width}} retry:4.3.5 invalid pin at {bad.source}\n"
                      for bad in deferred])


def exim_lsearch(pins: Iterable[Pin], show_port: bool = False) -> str:
    """``domain: onion`` lines (``onion::PORT`` when a port is written)."""
    return "".join(f"{pin.domain}: {pin.onion}{_port_suffix(pin, show_port, '::')}\n"
                   for pin in pins)


def cdbmake_input(pins: Iterable[Pin], show_port: bool = False) -> str:
    """cdbmake records for the lsearch pairs, ending with the empty line cdbmake requires.
    Lengths count bytes; map domains and onions are ASCII (A-labels)."""
    records = []
    for pin in pins:
        key, data = pin.domain, f"{pin.onion}{_port_suffix(pin, show_port, '::')}"
        records.append(f"+{len(key.encode())},{len(data.encode())}:{key}->{data}\n")
    return "".join(records) + "\n"


def valid_transport_name(name: str) -> bool:
    """A master.cf service name: no blank, no colon, no bracket (it is the text before ':')."""
    return bool(_TRANSPORT_NAME.fullmatch(name))


def render(pinmap: PinMap, fmt: str = "postfix", transport: str = DEFAULT_TRANSPORT,
           show_port: bool = False) -> str:
    """The table of ``pinmap`` in ``fmt`` (one of :data:`FORMATS`)."""
    pins = sorted_pins(pinmap)
    if fmt == "postfix":
        return postfix_transport(pins, transport, show_port, deferrals(pinmap))
    if pinmap.invalid:  # an lsearch/cdb table has no "defer": refuse rather than leak
        sources = ", ".join(bad.source for bad in deferrals(pinmap))
        raise ValueError(f"invalid pins at {sources}: fix the map first (without a line, "
                         "their mail would take Exim's usual route)")
    if fmt == "exim":
        return exim_lsearch(pins, show_port)
    if fmt == "cdbmake":
        return cdbmake_input(pins, show_port)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
