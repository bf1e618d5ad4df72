"""A small, strict decoder of the DNS responses the router reads (pure: bytes in, values out).

Why: on a cold cache dnspython's ``Message.from_wire`` was the daemon's largest single cost
(75 us for a one-SRV answer, 28 us for a bare NXDOMAIN, measured in-process on CPython 3.11;
this decoder: see :func:`decode`'s docstring).  The router needs little of a response: the
header (id, flags with TC/AD, rcode), the question, the answer section's SRV and CNAME records
and the authority section's SOA (negative caching).  :func:`decode` reads exactly that and
returns None for anything else -- EDNS (OPT), TSIG, DNSSEC records, classes other than IN,
opcodes other than QUERY, truncation, any record type it does not know -- so dnspython stays
the decoder, and the judge, of every unusual answer.  What it accepts, dnspython accepts too
and reads the same way (tested differentially, tests/unit/test_routing_dns_wire.py): its name
decompression follows dnspython's rules (pointers strictly backwards, at most 16 hops, a
pointed-to name may not overlap the name pointing at it, 255 octets at most), every rdata must
fill its rdlength exactly, and nothing may follow the last record.

:func:`srv_answer` and :func:`negative_soa` give what ``Message.resolve_chaining`` and the
router's negative TTL would find in the same message, with dnspython's rrset semantics
(records of one owner and type are one rrset whose TTL is the smallest; SRV duplicates are
dropped, first kept; of CNAME and SOA, singleton types, the last record wins).
"""

from __future__ import annotations

import struct

QR = 0x8000
TC = 0x0200
AD = 0x0020
NOERROR = 0
NXDOMAIN = 3

A, NS, CNAME, SOA, AAAA, SRV = 1, 2, 5, 6, 28, 33
IN = 1
#: dnspython reads a TTL above 2**31 - 1 as 0 (RFC 2181 section 8)
MAX_TTL = 0x7FFFFFFF
#: dnspython's dns.name.MAX_COMPRESSION_POINTER_CHAIN
MAX_POINTERS = 16
#: dnspython's dns.message.MAX_CHAIN (CNAMEs followed before ChainTooLong)
MAX_CHAIN = 16

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_SRV = struct.Struct("!HHH")
_SOA_MINIMUM = struct.Struct("!I")
#: bytes Name.to_text leaves unescaped in a label, so that "."-joined labels are its text
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class Response:
    """What the router reads of one response.

    ``flags``: the 16-bit header flags (rcode in the low 4 bits: no OPT record, so no
    extended rcode).  ``qname``: the question's name, lower-cased wire labels.  ``answer`` and
    ``authority``: ``(owner, type, ttl, rdata)`` in wire order, owner as lower-cased wire
    labels; rdata is ``(priority, weight, port, target labels as sent)`` for SRV, the target
    (lower-cased) for CNAME, the SOA's MINIMUM for SOA, None for the others.  ``wire``: the
    datagram, for the dnspython fallback.
    """

    __slots__ = ("id", "flags", "qname", "qtype", "qclass", "answer", "authority", "wire")

    def __init__(self, qid: int, flags: int, qname: bytes, qtype: int, qclass: int,
                 answer: list[tuple], authority: list[tuple], wire: bytes) -> None:
        self.id = qid
        self.flags = flags
        self.qname = qname
        self.qtype = qtype
        self.qclass = qclass
        self.answer = answer
        self.authority = authority
        self.wire = wire

    def rcode(self) -> int:
        return self.flags & 0x000F


class _Decline(Exception):
    """Not for this decoder: dnspython decides (or rejects) it."""


def _name(data: bytes, pos: int, end: int) -> tuple[list[bytes], int]:
    """The labels of the name at ``pos`` (not beyond ``end``) and the offset after it, with
    dnspython's decompression rules (``dns.name.from_wire_parser``)."""
    labels: list[bytes] = []
    after = -1
    start = biggest = pos
    hops = 0
    total = 1
    while True:
        if pos >= end:
            raise _Decline
        count = data[pos]
        pos += 1
        if count == 0:
            break
        if count < 64:
            stop = pos + count
            if stop > end:
                raise _Decline
            labels.append(data[pos:stop])
            total += count + 1
            pos = stop
        elif count >= 192:
            if pos >= end:
                raise _Decline
            target = ((count & 0x3F) << 8) | data[pos]
            pos += 1
            if target >= biggest:
                raise _Decline
            hops += 1
            if hops > MAX_POINTERS:
                raise _Decline
            if after < 0:
                after = pos
            biggest = target
            end = start  # the pointed-to part may not overlap what points at it
            pos = start = target
        else:
            raise _Decline  # label types 0x40/0x80
    if total > 255:
        raise _Decline
    return labels, (pos if after < 0 else after)


def _key(labels: list[bytes]) -> bytes:
    """A name as lower-cased wire labels: equal exactly when dnspython's Names are equal
    (ASCII case-insensitive; length octets are < 64, so lower() leaves them alone)."""
    return b"".join(bytes((len(label),)) + label for label in labels).lower()


def _records(data: bytes, pos: int, count: int, out: list[tuple]) -> int:
    size = len(data)
    for _ in range(count):
        labels, pos = _name(data, pos, size)
        if pos + 10 > size:
            raise _Decline
        rdtype, rdclass, ttl, rdlen = _RR.unpack_from(data, pos)
        pos += 10
        end = pos + rdlen
        if rdclass != IN or end > size:
            raise _Decline
        if ttl > MAX_TTL:
            ttl = 0
        if rdtype == SRV:
            if rdlen < 7:
                raise _Decline
            priority, weight, port = _SRV.unpack_from(data, pos)
            target, after = _name(data, pos + 6, end)
            rdata: object = (priority, weight, port, target)
        elif rdtype == CNAME or rdtype == NS:
            target, after = _name(data, pos, end)
            rdata = _key(target) if rdtype == CNAME else None
        elif rdtype == SOA:
            _mname, after = _name(data, pos, end)
            _rname, after = _name(data, after, end)
            if after + 20 != end:
                raise _Decline
            rdata = _SOA_MINIMUM.unpack_from(data, after + 16)[0]
            after = end
        elif (rdtype == A and rdlen == 4) or (rdtype == AAAA and rdlen == 16):
            rdata, after = None, end
        else:
            raise _Decline  # OPT, TSIG, RRSIG, anything else: dnspython's
        if after != end:
            raise _Decline
        out.append((_key(labels), rdtype, ttl, rdata))
        pos = end
    return pos


def decode(data: bytes) -> Response | None:
    """The response in ``data``, or None when it is not a plain one this decoder reads (then
    ``dns.message.from_wire`` decides).  Never raises.

    For a one-SRV answer as dnsmasq sends it: 9 us, an NXDOMAIN: 2.5 us (dnspython: 75 and 28;
    in-process, CPython 3.11)."""
    try:
        return _decode(data)
    except (_Decline, IndexError, struct.error):
        return None


def _decode(data: bytes) -> Response | None:
    if len(data) < 12:
        return None
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if not flags & QR or flags & 0x7A00 or qdcount != 1:  # a response, opcode QUERY, no TC
        return None
    labels, pos = _name(data, 12, len(data))
    if pos + 4 > len(data):
        return None
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    answer: list[tuple] = []
    authority: list[tuple] = []
    pos = _records(data, pos + 4, ancount, answer)
    pos = _records(data, pos, nscount, authority)
    pos = _records(data, pos, arcount, [])
    if pos != len(data):
        return None  # trailing junk
    return Response(qid, flags, _key(labels), qtype, qclass, answer, authority, data)


def srv_answer(response: Response) -> tuple[list[tuple[int, int, int, str]] | None, int] | None:
    """What ``resolve_chaining`` finds for an SRV question: the SRV records of the name the
    CNAME chain ends at (``(priority, weight, port, target text)`` in dnspython's rrset order),
    or None when there are none, and the smallest TTL along the chain.  None when dnspython
    must decide: the question is not IN SRV, the chain is too long (ChainTooLong), or a
    target's text would need escapes."""
    if response.qtype != SRV or response.qclass != IN:
        return None
    answer = response.answer
    qname = response.qname
    min_ttl = MAX_TTL
    for _ in range(MAX_CHAIN):
        ttl = -1
        for owner, rdtype, rttl, _rdata in answer:
            if rdtype == SRV and owner == qname and (ttl < 0 or rttl < ttl):
                ttl = rttl
        if ttl >= 0:
            records = _srv_records(answer, qname)
            return None if records is None else (records, min(min_ttl, ttl))
        target = None
        for owner, rdtype, rttl, rdata in answer:
            if rdtype == CNAME and owner == qname:
                target = rdata  # a singleton type: the last record wins
                min_ttl = min(min_ttl, rttl)
        if target is None:
            return None, min_ttl
        qname = target
    return None  # ChainTooLong: dnspython's words for it


def _srv_records(answer: list[tuple], qname: bytes) -> list[tuple[int, int, int, str]] | None:
    """The SRV rrset of ``qname``, duplicates dropped (dnspython's rdata equality: the
    canonical, lower-cased form; the first is kept); None if a target would need escapes."""
    records: list[tuple[int, int, int, str]] = []
    seen: set[tuple] = set()
    for owner, rdtype, _ttl, rdata in answer:
        if rdtype != SRV or owner != qname:
            continue
        priority, weight, port, target = rdata
        same = (priority, weight, port, _key(target))
        if same in seen:
            continue
        seen.add(same)
        for label in target:
            if not _PLAIN.issuperset(label):
                return None
        records.append((priority, weight, port, b".".join(target).decode() if target else "."))
    return records


def negative_soa(response: Response) -> tuple[int, int] | None:
    """``(ttl, minimum)`` of the authority section's first SOA rrset (dnspython's grouping:
    the smallest TTL of that owner's SOA records, the MINIMUM of the last one), or None."""
    owner = None
    ttl = minimum = 0
    for name, rdtype, rttl, rdata in response.authority:
        if rdtype != SOA:
            continue
        if owner is None:
            owner, ttl, minimum = name, rttl, rdata
        elif name == owner:
            ttl = min(ttl, rttl)
            minimum = rdata
    return None if owner is None else (ttl, minimum)
