"""``require_dnssec`` against a real validating resolver.

Zones are signed at test time (ldns-signzone), served by NSD and validated by unbound with a
private trust anchor (tests/fixtures_dnssec.py has the table of names).  Each test checks the
decision torroute makes and the path that led there: who set the AD bit, and why a bogus answer
is bogus.  The fake resolver in tests/test_routing.py still tests the AD branch in isolation.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from fixtures_dnssec import EXPIRED, INSECURE, SIGNED, UNSIGNED, DnssecLab, tool
from support.onions import ONION_A, ONION_B, ONION_C

from torroute.config import Config
from torroute.routing.router import NoRoute, Route, Router, TempFail, decide_srv, srv_query
from torroute.testing.dnsmasq import SrvRecord

SRV = "_onion-mx._tcp."
MODES = [pytest.param(True, id="require_dnssec"), pytest.param(False, id="no_require_dnssec")]


def router_for(server: tuple[str, int], require_dnssec: bool) -> Router:
    return Router(Config(nameservers=[server], require_dnssec=require_dnssec, dns_timeout=2.0))


def exchange(domain: str, server: tuple[str, int], require_dnssec: bool):
    """What the router does for one nameserver, step by step: torroute's own query, the raw
    response, and decide_srv's decision on it."""
    config = Config(nameservers=[server], require_dnssec=require_dnssec)
    query = srv_query(domain, config)
    response = dns.query.udp(query, server[0], port=server[1], timeout=2.0)
    if response.flags & dns.flags.TC:
        response = dns.query.tcp(query, server[0], port=server[1], timeout=2.0)
    decision, _ttl = decide_srv(domain, query, response, config)
    return response, decision


def ad(response: dns.message.Message) -> bool:
    return bool(response.flags & dns.flags.AD)


def types_in(section: list) -> set[str]:
    return {dns.rdatatype.to_text(rrset.rdtype) for rrset in section}


def srv_targets(response: dns.message.Message) -> set[str]:
    return {rr.target.to_text(omit_final_dot=True) for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.SRV for rr in rrset}


def ede(response: dns.message.Message) -> list[tuple[int, str]]:
    return [(e.code, e.text or "") for e in response.extended_errors()]


def verify_zone(path) -> tuple[int, str]:
    done = subprocess.run([tool("ldns-verify-zone"), str(path)], capture_output=True, text=True,
                          timeout=30)
    return done.returncode, done.stdout + done.stderr


# -- the lab itself -------------------------------------------------------------------------

def test_the_zones_are_really_signed_and_the_resolver_has_no_way_out(dnssec_lab: DnssecLab):
    assert dnssec_lab.started_in < 10
    rc, out = verify_zone(dnssec_lab.zones[SIGNED].signed_path)
    assert rc == 0 and "Zone is verified and complete" in out
    # trust anchors: exactly the two signed zones; insecure.dnssec.test and unsigned.test have none
    anchors = dnssec_lab.trust_anchors.read_text().split()
    assert [anchors[i - 2] for i, word in enumerate(anchors) if word == "DS"] == [
        f"{SIGNED}.", f"{EXPIRED}."]
    conf = (dnssec_lab.workdir / "unbound.conf").read_text()
    assert "forward-zone" not in conf and "root-hints" not in conf
    assert "outgoing-interface: 127.0.0.1" in conf
    stubs = [line.split()[1] for line in conf.splitlines() if "stub-addr:" in line]
    assert stubs and set(stubs) == {f"127.0.0.1@{dnssec_lab.nsd_port}"}
    assert 'stub-zone:\n  name: "."\n' in conf  # the built-in root hints are never used
    # a name outside the lab's zones: NSD refuses it, unbound fails at once (asks no one else)
    started = time.monotonic()
    reply = dnssec_lab.query("example.com", "A")
    assert reply.rcode() == dns.rcode.SERVFAIL and time.monotonic() - started < 2


# -- positive answers -----------------------------------------------------------------------

@pytest.mark.parametrize("require_dnssec", MODES)
def test_signed_srv_routes_with_the_ad_bit_set_by_the_validator(dnssec_lab: DnssecLab,
                                                                require_dnssec: bool) -> None:
    domain = f"signed.{SIGNED}"
    decision = router_for(dnssec_lab.resolver, require_dnssec).route(f"user@{domain}")
    assert isinstance(decision, Route), decision
    assert (decision.onion, decision.port, decision.source) == (ONION_A, 25, "srv")
    assert 0 < decision.ttl <= 300

    response, step = exchange(domain, dnssec_lab.resolver, require_dnssec)
    assert ad(response) and step == Route(domain, ONION_A, 25, "srv", step.ttl)
    # the AD bit is the validator's: NSD serves the same signed records without it, and the
    # same unbound without its validator module hands them on without it too
    direct = dnssec_lab.query(SRV + domain, server=dnssec_lab.authoritative)
    assert direct.flags & dns.flags.AA and not ad(direct)
    assert types_in(direct.answer) == {"SRV", "RRSIG"}
    passed_on = dnssec_lab.query(SRV + domain, server=dnssec_lab.nonvalidating_resolver)
    assert not ad(passed_on) and types_in(passed_on.answer) == {"SRV", "RRSIG"}
    unvalidated, unvalidated_step = exchange(domain, dnssec_lab.nonvalidating_resolver,
                                             require_dnssec)
    assert not ad(unvalidated) and srv_targets(unvalidated) == {ONION_A}
    if require_dnssec:
        assert isinstance(unvalidated_step, TempFail) and "AD bit" in unvalidated_step.reason
    else:
        assert isinstance(unvalidated_step, Route)


@pytest.mark.parametrize("domain", [INSECURE, UNSIGNED])
@pytest.mark.parametrize("require_dnssec", MODES)
def test_insecure_srv_is_tempfail_only_when_dnssec_is_required(dnssec_lab: DnssecLab, domain: str,
                                                               require_dnssec: bool) -> None:
    decision = router_for(dnssec_lab.resolver, require_dnssec).route(domain)
    if require_dnssec:
        assert isinstance(decision, TempFail) and "AD bit" in decision.reason
    else:
        assert isinstance(decision, Route) and decision.onion == ONION_B

    response, _ = exchange(domain, dnssec_lab.resolver, require_dnssec)
    assert response.rcode() == dns.rcode.NOERROR and not ad(response) and not ede(response)
    assert srv_targets(response) == {ONION_B} and "RRSIG" not in types_in(response.answer)


def test_the_insecure_delegation_is_proven_insecure_not_bogus(dnssec_lab: DnssecLab) -> None:
    # the validator knows insecure.dnssec.test is unsigned because the signed parent proves, with
    # a validated NSEC, that there is no DS: a secure "no DS" answer
    reply = dnssec_lab.query(INSECURE, "DS")
    assert reply.rcode() == dns.rcode.NOERROR and ad(reply) and not reply.answer
    nsec = [rrset for rrset in reply.authority if rrset.rdtype == dns.rdatatype.NSEC]
    assert nsec and nsec[0].name.to_text() == f"{INSECURE}."
    bitmap = nsec[0][0].to_text()
    assert " NS " in f" {bitmap} " and " DS " not in f" {bitmap} "


# -- bogus answers --------------------------------------------------------------------------

@pytest.mark.parametrize("require_dnssec", MODES)
def test_a_record_changed_after_signing_is_bogus_and_tempfail(dnssec_lab: DnssecLab,
                                                              require_dnssec: bool) -> None:
    domain = f"bogus.{SIGNED}"
    decision = router_for(dnssec_lab.resolver, require_dnssec).route(domain)
    assert isinstance(decision, TempFail) and "SERVFAIL" in decision.reason

    response, _ = exchange(domain, dnssec_lab.resolver, require_dnssec)
    assert response.rcode() == dns.rcode.SERVFAIL
    if require_dnssec:  # EDE needs EDNS: sent only with want_dnssec
        [(code, text)] = ede(response)
        assert code == dns.edns.EDECode.DNSSEC_BOGUS and "signature crypto failed" in text
    # bogus because of the signature: the record is there, with an RRSIG, when validation is off
    # (CD), and it is the edited one ...
    unchecked = dnssec_lab.query(SRV + domain, cd=True)
    assert unchecked.rcode() == dns.rcode.NOERROR and not ad(unchecked)
    assert types_in(unchecked.answer) == {"SRV", "RRSIG"} and srv_targets(unchecked) == {ONION_C}
    # ... and an independent verifier agrees: the signed zone verifies, the served one fails on
    # exactly that signature
    zone = dnssec_lab.zones[SIGNED]
    assert verify_zone(zone.signed_path)[0] == 0
    rc, out = verify_zone(zone.path)
    bad = [line for line in out.splitlines() if "Bogus DNSSEC signature" in line]
    assert rc != 0 and bad == [f"Error: Bogus DNSSEC signature for {SRV}{domain}.\tSRV"]
    assert "signature crypto failed" in dnssec_lab.log()
    # what validation stops: without it, the edited record routes mail to another onion
    forged = router_for(dnssec_lab.nonvalidating_resolver, False).route(domain)
    assert isinstance(forged, Route) and forged.onion == ONION_C


@pytest.mark.parametrize("require_dnssec", MODES)
def test_a_signed_record_served_without_its_rrsig_is_bogus_and_tempfail(
        dnssec_lab: DnssecLab, require_dnssec: bool) -> None:
    domain = f"nosig.{SIGNED}"
    decision = router_for(dnssec_lab.resolver, require_dnssec).route(domain)
    assert isinstance(decision, TempFail) and "SERVFAIL" in decision.reason

    [(code, text)] = ede(dnssec_lab.query(SRV + domain))
    assert code == dns.edns.EDECode.RRSIGS_MISSING and "no signatures" in text
    unchecked = dnssec_lab.query(SRV + domain, cd=True)
    assert types_in(unchecked.answer) == {"SRV"} and srv_targets(unchecked) == {ONION_A}
    rc, out = verify_zone(dnssec_lab.zones[SIGNED].path)
    assert rc != 0 and f"no signatures for {SRV}{domain}.\tSRV" in out


@pytest.mark.parametrize("require_dnssec", MODES)
def test_expired_signatures_are_bogus_and_tempfail(dnssec_lab: DnssecLab,
                                                   require_dnssec: bool) -> None:
    decision = router_for(dnssec_lab.resolver, require_dnssec).route(EXPIRED)
    assert isinstance(decision, TempFail) and "SERVFAIL" in decision.reason

    reply = dnssec_lab.query(SRV + EXPIRED)
    [(code, text)] = ede(reply)
    assert code == dns.edns.EDECode.SIGNATURE_EXPIRED and "signature expired" in text
    # the only fault is the date: NSD serves the SRV with an RRSIG that expired in the past
    direct = dnssec_lab.query(SRV + EXPIRED, server=dnssec_lab.authoritative)
    assert srv_targets(direct) == {ONION_A}
    [rrsig] = [rrset for rrset in direct.answer if rrset.rdtype == dns.rdatatype.RRSIG]
    assert rrsig[0].expiration < time.time() - 86400
    rc, out = verify_zone(dnssec_lab.zones[EXPIRED].path)
    assert rc != 0 and "DNSSEC signature has expired" in out and "Bogus" not in out


# -- negative answers -----------------------------------------------------------------------

@pytest.mark.parametrize(("label", "kind", "rcode"), [
    ("nothing", "NXDOMAIN", dns.rcode.NXDOMAIN), ("nodata", "NODATA", dns.rcode.NOERROR)])
@pytest.mark.parametrize("require_dnssec", MODES)
def test_validated_negative_answers_are_no_route(dnssec_lab: DnssecLab, label: str, kind: str,
                                                 rcode: int, require_dnssec: bool) -> None:
    domain = f"{label}.{SIGNED}"
    decision = router_for(dnssec_lab.resolver, require_dnssec).route(domain)
    assert isinstance(decision, NoRoute) and kind in decision.reason

    response, step = exchange(domain, dnssec_lab.resolver, require_dnssec)
    assert response.rcode() == rcode and not response.answer and ad(response)
    assert step == decision
    if require_dnssec:  # the proof comes along (DO): a signed NSEC
        assert {"NSEC", "RRSIG", "SOA"} <= types_in(response.authority)


@pytest.mark.parametrize("zone", [INSECURE, UNSIGNED])
@pytest.mark.parametrize(("label", "kind", "rcode"), [
    ("nothing", "NXDOMAIN", dns.rcode.NXDOMAIN), ("nodata", "NODATA", dns.rcode.NOERROR)])
@pytest.mark.parametrize("require_dnssec", MODES)
def test_insecure_negative_answers_are_no_route(dnssec_lab: DnssecLab, zone: str, label: str,
                                                kind: str, rcode: int,
                                                require_dnssec: bool) -> None:
    """A provably unsigned zone's "no SRV" carries no AD and cannot: torroute accepts it (see
    docs/routing.rst, "DNSSEC"): an unsigned domain is never onion-routed under require_dnssec,
    and deferring its mail for want of a proof no one can give would stop it for good."""
    domain = f"{label}.{zone}"
    decision = router_for(dnssec_lab.resolver, require_dnssec).route(domain)
    assert isinstance(decision, NoRoute) and kind in decision.reason

    response, _ = exchange(domain, dnssec_lab.resolver, require_dnssec)
    assert response.rcode() == rcode and not ad(response) and not ede(response)
    assert types_in(response.authority) == {"SOA"}  # no NSEC, no RRSIG: nothing to validate


@pytest.mark.parametrize(("label", "why", "kind"), [
    ("stripped", "nameerror proof failed", "NXDOMAIN"),
    ("stripped-nodata", "nodata proof failed", "NODATA")])
@pytest.mark.parametrize("require_dnssec", MODES)
def test_a_forged_negative_answer_for_a_signed_zone_is_tempfail(dnssec_lab: DnssecLab,
                                                                label: str, why: str, kind: str,
                                                                require_dnssec: bool) -> None:
    """The downgrade: strip the SRV so that mail goes out the clear net.  The authoritative
    really sends the forged "no SRV"; the validator turns it into SERVFAIL."""
    domain = f"{label}.{SIGNED}"
    decision = router_for(dnssec_lab.resolver, require_dnssec).route(domain)
    assert isinstance(decision, TempFail) and "SERVFAIL" in decision.reason

    on_the_wire = dnssec_lab.query(SRV + domain, server=dnssec_lab.authoritative)
    assert not on_the_wire.answer and on_the_wire.flags & dns.flags.AA
    assert on_the_wire.rcode() == (dns.rcode.NXDOMAIN if kind == "NXDOMAIN" else
                                   dns.rcode.NOERROR)
    [(code, text)] = ede(dnssec_lab.query(SRV + domain))
    assert code == dns.edns.EDECode.DNSSEC_BOGUS and why in text
    # only the validator stands between the forgery and the clear net: a resolver that does not
    # validate hands it on, without AD, as if the zone were unsigned, and torroute cannot tell
    passed_on = router_for(dnssec_lab.nonvalidating_resolver, require_dnssec).route(domain)
    assert isinstance(passed_on, NoRoute) and kind in passed_on.reason


# -- the async path and private labs --------------------------------------------------------

def test_async_lookups_through_the_validator(dnssec_lab: DnssecLab) -> None:
    router = router_for(dnssec_lab.resolver, True)

    async def lookups():
        return await asyncio.gather(*(router.aroute(d) for d in (
            f"signed.{SIGNED}", f"bogus.{SIGNED}", UNSIGNED, f"nothing.{SIGNED}")))

    signed, bogus, unsigned, nothing = asyncio.run(lookups())
    assert isinstance(signed, Route) and signed.onion == ONION_A
    assert isinstance(bogus, TempFail) and "SERVFAIL" in bogus.reason
    assert isinstance(unsigned, TempFail) and "AD bit" in unsigned.reason
    assert isinstance(nothing, NoRoute)


def test_a_private_lab_signs_extra_records(dnssec_lab_factory) -> None:
    lab = dnssec_lab_factory(
        signed_srv=[SrvRecord(f"{SRV}extra.{SIGNED}", f"mx.{ONION_B}", 2525, 0, 1),
                    SrvRecord(f"{SRV}extra.{SIGNED}", ONION_C, 25, 10, 1)],
        unsigned_srv=[SrvRecord(f"{SRV}extra.{UNSIGNED}", ONION_A)])
    router = router_for(lab.resolver, True)
    decision = router.route(f"extra.{SIGNED}")
    assert isinstance(decision, Route)
    assert (decision.onion, decision.port, decision.alternatives) == (ONION_B, 2525,
                                                                      ((ONION_C, 25),))
    assert isinstance(router.route(f"extra.{UNSIGNED}"), TempFail)
    assert router_for(lab.resolver, False).route(f"extra.{UNSIGNED}").onion == ONION_A
