"""A real DNSSEC chain on loopback: zones signed at test time, an authoritative server, and a
validating resolver with a private trust anchor.

* ``ldns-keygen``/``ldns-signzone`` (ldnsutils) make keys and sign the zones (ECDSA P-256, NSEC);
* NSD serves every zone on 127.0.0.1 (it serves what it is given: it never checks signatures);
* unbound resolves through stub zones to that NSD only, and validates with a trust anchor (the
  DS of each signed zone's KSK) written at test time.  It has no forwarder; the stub for ``.``
  also points at NSD, so unbound's built-in root hints are never used, and its queries leave from
  127.0.0.1 (``outgoing-interface``), so it could not reach another network even if it tried.
  With ``val-bogus-ttl: 0`` every query is validated afresh, so each SERVFAIL carries an
  extended DNS error (RFC 8914) with the reason, and ``val-log-level: 2`` logs it.
* a second unbound, ``nonvalidating_resolver``, is the same recursive resolver without the
  validator module: what a resolver that does not do DNSSEC hands on.

The zones (``_onion-mx._tcp.<domain>`` is what torroute asks for):

=================================  ============================================================
domain                             what ``_onion-mx._tcp.<domain>`` gives
=================================  ============================================================
``signed.dnssec.test``             SRV to ``ONION_A``, validly signed (secure: AD)
``nodata.dnssec.test``             a TXT record only: signed NODATA (secure: AD)
``nothing.dnssec.test``            nothing: signed NXDOMAIN (secure: AD)
``bogus.dnssec.test``              signed for ``ONION_A``; the served zone was then edited to
                                   ``ONION_C``, keeping the signature (bogus: SERVFAIL)
``nosig.dnssec.test``              SRV signed, then its RRSIG removed from the served zone
                                   (bogus: SERVFAIL)
``stripped.dnssec.test``           signed SRV, then removed from the served zone with its RRSIG
                                   and NSEC: a forged NXDOMAIN (bogus: SERVFAIL)
``stripped-nodata.dnssec.test``    SRV and TXT signed, then the SRV and its RRSIG removed: a
                                   forged NODATA, the NSEC still lists SRV (bogus: SERVFAIL)
``insecure.dnssec.test``           a delegation without DS to an unsigned zone: SRV to
                                   ``ONION_B`` (insecure: no AD); ``nodata.`` and ``nothing.``
                                   below it as above
``unsigned.test``                  a separate unsigned zone, no trust anchor: SRV to ``ONION_B``
                                   (insecure: no AD); ``nodata.`` and ``nothing.`` below it
``expired.test``                   signed and anchored, every RRSIG expired 30 days ago (bogus)
=================================  ============================================================

``dnssec_lab`` starts all of it once per session; ``dnssec_lab_factory(signed_srv=[...],
unsigned_srv=[...])`` makes a private one with extra SRV records (names under ``dnssec.test`` or
``unsigned.test``), e.g. for a test network's real onion.  A missing tool fails the test: it is
never skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from support.onions import ONION_A, ONION_B, ONION_C

from torroute.testing.dnsmasq import SrvRecord
from torroute.testing.ports import free_port, wait_tcp

SIGNED = "dnssec.test"
INSECURE = "insecure.dnssec.test"  # delegated from SIGNED without a DS record
UNSIGNED = "unsigned.test"  # a zone of its own, no trust anchor
EXPIRED = "expired.test"  # signed and anchored, all signatures expired
SRV = "_onion-mx._tcp."
ALGORITHM = "ECDSAP256SHA256"
TOOLS = ("nsd", "nsd-checkconf", "unbound", "unbound-checkconf", "ldns-keygen", "ldns-signzone",
         "ldns-verify-zone")
PACKAGES = "nsd unbound ldnsutils"

SOA_NS = """\
@ IN SOA ns.dnssec.test. hostmaster.dnssec.test. 1 3600 600 86400 120
@ IN NS ns.dnssec.test.
"""


def tool(name: str) -> str:
    """The path of a DNS tool, or a test failure that says how to install it."""
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None)
    if path is None:
        pytest.fail(f"{name} is not installed: the DNSSEC tests need the Debian packages "
                    f"{PACKAGES} (scripts/install-deps.sh installs them)", pytrace=False)
    return path


def _srv_line(record: SrvRecord) -> str:
    target = record.target if record.target.endswith(".") else record.target + "."
    return f"{record.name}. IN SRV {record.priority} {record.weight} {record.port} {target}"


def _stamp(t: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(t))


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}",
                    pytrace=False)
    return done.stdout


def _drop(lines: list[str], owner: str, types: set[str] | None = None,
          signatures_only: bool = False) -> list[str]:
    """The signed zone's lines without ``owner``'s records (all, or only ``types``; an RRSIG
    goes with the type it covers), or without only their RRSIGs."""
    kept = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and fields[0] == owner:
            rtype = fields[3]
            covered = fields[4] if rtype == "RRSIG" else rtype
            if ((types is None or covered in types)
                    and (rtype == "RRSIG" or not signatures_only)):
                continue
        kept.append(line)
    return kept


@dataclass
class SignedZone:
    """One zone file; signed (and given a trust anchor) or not."""

    origin: str
    body: str
    sign: bool = True
    expired: bool = False
    path: Path | None = None  # the file NSD serves
    signed_path: Path | None = None  # as ldns-signzone wrote it, before any edit
    ds: str = ""  # the KSK's DS record: the trust anchor

    def build(self, directory: Path, now: float) -> None:
        source = directory / f"{self.origin}.zone"
        source.write_text(f"$ORIGIN {self.origin}.\n$TTL 300\n{SOA_NS}{self.body}")
        if not self.sign:
            self.path = source
            return
        ksk = _run([tool("ldns-keygen"), "-a", ALGORITHM, "-k", self.origin], directory).strip()
        zsk = _run([tool("ldns-keygen"), "-a", ALGORITHM, self.origin], directory).strip()
        inception, expiration = (now - 60 * 86400, now - 30 * 86400) if self.expired else (
            now - 86400, now + 30 * 86400)
        _run([tool("ldns-signzone"), "-i", _stamp(inception), "-e", _stamp(expiration),
              str(source), ksk, zsk], directory)
        self.signed_path = directory / f"{self.origin}.zone.signed"
        self.path = self.signed_path
        self.ds = next(line for line in (directory / f"{ksk}.ds").read_text().splitlines()
                       if " DS " in line.replace("\t", " "))

    def served(self, lines: list[str]) -> None:
        """Serve an edited copy of the signed zone (signatures untouched)."""
        assert self.signed_path is not None
        self.path = self.signed_path.with_suffix(".served")
        self.path.write_text("\n".join(lines) + "\n")


@dataclass
class DnssecLab:
    """NSD serving signed and unsigned zones, a validating unbound in front of it, and a
    non-validating unbound for comparison.  Loopback only."""

    workdir: Path
    signed_srv: list[SrvRecord] = field(default_factory=list)
    unsigned_srv: list[SrvRecord] = field(default_factory=list)
    nsd_port: int = 0
    resolver_port: int = 0
    nonvalidating_port: int = 0
    zones: dict[str, SignedZone] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    started_in: float = 0.0  # seconds from nothing to answering

    # -- addresses -------------------------------------------------------------------------
    @property
    def authoritative(self) -> tuple[str, int]:
        """NSD: authoritative answers, never an AD bit."""
        return ("127.0.0.1", self.nsd_port)

    @property
    def resolver(self) -> tuple[str, int]:
        """unbound, validating with the private trust anchors."""
        return ("127.0.0.1", self.resolver_port)

    @property
    def nonvalidating_resolver(self) -> tuple[str, int]:
        """unbound without its validator module: passes on whatever NSD says."""
        return ("127.0.0.1", self.nonvalidating_port)

    @property
    def trust_anchors(self) -> Path:
        return self.workdir / "trust-anchors"

    # -- zones -----------------------------------------------------------------------------
    def _zones(self) -> list[SignedZone]:
        signed = SignedZone(SIGNED, "\n".join([
            "ns IN A 127.0.0.1",
            f"{SRV}signed IN SRV 0 5 25 {ONION_A}.",
            f"{SRV}bogus IN SRV 0 5 25 {ONION_A}.",
            f'{SRV}nodata IN TXT "no SRV here"',
            f"{SRV}nosig IN SRV 0 5 25 {ONION_A}.",
            f"{SRV}stripped IN SRV 0 5 25 {ONION_A}.",
            f"{SRV}stripped-nodata IN SRV 0 5 25 {ONION_A}.",
            f'{SRV}stripped-nodata IN TXT "the SRV next to me is removed after signing"',
            "insecure IN NS ns.dnssec.test.",  # no DS: an insecure delegation
            *(_srv_line(r) for r in self.signed_srv),
        ]) + "\n")
        insecure = SignedZone(INSECURE, "\n".join([
            f"{SRV.rstrip('.')} IN SRV 0 5 25 {ONION_B}.",
            f'{SRV}nodata IN TXT "no SRV here"',
        ]) + "\n", sign=False)
        unsigned = SignedZone(UNSIGNED, "\n".join([
            f"{SRV.rstrip('.')} IN SRV 0 5 25 {ONION_B}.",
            f'{SRV}nodata IN TXT "no SRV here"',
            *(_srv_line(r) for r in self.unsigned_srv),
        ]) + "\n", sign=False)
        expired = SignedZone(EXPIRED, f"{SRV.rstrip('.')} IN SRV 0 5 25 {ONION_A}.\n",
                             expired=True)
        return [signed, insecure, unsigned, expired]

    def _tamper(self, zone: SignedZone) -> None:
        """What an attacker on the wire would send, put in the served zone after signing."""
        assert zone.signed_path is not None
        lines = zone.signed_path.read_text().splitlines()
        bogus = f"{SRV}bogus.{SIGNED}."
        edited = []
        for line in lines:
            fields = line.split()
            if len(fields) >= 5 and fields[0] == bogus and fields[3] == "SRV":
                line = line.replace(ONION_A, ONION_C)  # another onion, the old signature
            edited.append(line)
        assert edited != lines, "the bogus SRV record was not found in the signed zone"
        edited = _drop(edited, f"{SRV}nosig.{SIGNED}.", {"SRV"}, signatures_only=True)
        edited = _drop(edited, f"{SRV}stripped.{SIGNED}.")
        edited = _drop(edited, f"{SRV}stripped-nodata.{SIGNED}.", {"SRV"})
        zone.served(edited)

    # -- configuration ---------------------------------------------------------------------
    def nsd_conf(self) -> str:
        d = self.workdir
        zones = "".join(f"zone:\n  name: {z.origin}\n  zonefile: \"{z.path}\"\n"
                        for z in self.zones.values())
        return f"""server:
  ip-address: 127.0.0.1@{self.nsd_port}
  port: {self.nsd_port}
  do-ip4: yes
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: "{d}"
  database: ""
  pidfile: "{d}/nsd.pid"
  xfrdfile: "{d}/nsd-xfrd.state"
  zonelistfile: "{d}/nsd-zone.list"
  xfrdir: "{d}"
  logfile: "{d}/nsd.log"
  server-count: 1
  verbosity: 1
remote-control:
  control-enable: no
{zones}"""

    def unbound_conf(self, port: int, validating: bool) -> str:
        d = self.workdir
        stubs = "".join(f'stub-zone:\n  name: "{name}"\n  stub-addr: 127.0.0.1@{self.nsd_port}\n'
                        for name in [".", *self.zones])
        if validating:
            dnssec = (f'  module-config: "validator iterator"\n'
                      f'  trust-anchor-file: "{self.trust_anchors}"\n'
                      "  val-log-level: 2\n  ede: yes\n  val-bogus-ttl: 0\n")
        else:
            dnssec = '  module-config: "iterator"\n'
        name = "unbound" if validating else "unbound-nonvalidating"
        return f"""server:
  interface: 127.0.0.1
  port: {port}
  do-ip4: yes
  do-ip6: no
  outgoing-interface: 127.0.0.1
  do-not-query-localhost: no
  access-control: 127.0.0.0/8 allow
  username: ""
  chroot: ""
  directory: "{d}"
  pidfile: "{d}/{name}.pid"
  logfile: "{d}/{name}.log"
  use-syslog: no
  verbosity: 1
  log-servfail: yes
  num-threads: 1
  so-reuseport: no
  qname-minimisation: no
  trust-anchor-signaling: no
  root-key-sentinel: no
  local-zone: "test." nodefault
{dnssec}remote-control:
  control-enable: no
{stubs}"""

    # -- processes -------------------------------------------------------------------------
    def start(self) -> DnssecLab:
        for name in TOOLS:
            tool(name)
        started = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()  # nothing left running when a step fails
            raise
        self.started_in = time.monotonic() - started
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        zonedir = self.workdir / "zones"
        zonedir.mkdir(exist_ok=True)
        now = time.time()
        for zone in self._zones():
            zone.build(zonedir, now)
            self.zones[zone.origin] = zone
        self._tamper(self.zones[SIGNED])
        self.trust_anchors.write_text("".join(z.ds + "\n" for z in self.zones.values() if z.ds))
        self.nsd_port = self.nsd_port or free_port()
        self.resolver_port = self.resolver_port or free_port()
        self.nonvalidating_port = self.nonvalidating_port or free_port()

        conf = self.workdir / "nsd.conf"
        conf.write_text(self.nsd_conf())
        _run([tool("nsd-checkconf"), str(conf)], self.workdir)
        self._spawn("nsd", [tool("nsd"), "-d", "-c", str(conf)], self.nsd_port)
        for zone in self.zones:  # NSD answers authoritatively for every zone: it has loaded them
            self._wait_answer(self.authoritative, zone, "nsd")
        unbounds = [("unbound", self.resolver_port, True),
                    ("unbound-nonvalidating", self.nonvalidating_port, False)]
        for name, port, validating in unbounds:
            conf = self.workdir / f"{name}.conf"
            conf.write_text(self.unbound_conf(port, validating))
            _run([tool("unbound-checkconf"), str(conf)], self.workdir)
            self._spawn(name, [tool("unbound"), "-d", "-c", str(conf)], port)
        self._wait_answer(self.resolver, SIGNED, "unbound")
        self._wait_answer(self.nonvalidating_resolver, SIGNED, "unbound-nonvalidating")

    def _spawn(self, name: str, args: list[str], port: int) -> None:
        with open(self.workdir / f"{name}.stderr", "wb") as stderr:
            self.procs[name] = subprocess.Popen(args, cwd=self.workdir, stdout=subprocess.DEVNULL,
                                                stderr=stderr)
        try:
            wait_tcp(port, 15, self.procs[name], name)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{name} did not start: {exc}\n{self.log(name)}", pytrace=False)

    def _wait_answer(self, server: tuple[str, int], zone: str, name: str) -> None:
        deadline = time.monotonic() + 15
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                reply = self.query(zone, "SOA", server, timeout=0.5)
                if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                    return
                last = dns.rcode.to_text(reply.rcode())
            except (dns.exception.DNSException, OSError) as exc:  # still starting: retry
                last = repr(exc)
            time.sleep(0.05)
        pytest.fail(f"{name} did not answer SOA {zone} within 15 s ({last})\n{self.log(name)}",
                    pytrace=False)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    # -- helpers for tests -----------------------------------------------------------------
    def query(self, name: str, rdtype: str = "SRV", server: tuple[str, int] | None = None,
              cd: bool = False, dnssec: bool = True, timeout: float = 2.0) -> dns.message.Message:
        """One UDP query (TCP if truncated) to ``server`` (default: the validating resolver)."""
        host, port = server or self.resolver
        query = dns.message.make_query(name, dns.rdatatype.from_text(rdtype), want_dnssec=dnssec)
        query.flags |= dns.flags.AD
        if cd:
            query.flags |= dns.flags.CD
        reply = dns.query.udp(query, host, port=port, timeout=timeout, ignore_unexpected=True)
        if reply.flags & dns.flags.TC:
            reply = dns.query.tcp(query, host, port=port, timeout=timeout)
        return reply

    def log(self, name: str = "unbound") -> str:
        """``name``'s log file (unbound logs every validation failure with its reason)."""
        text = ""
        for path in (self.workdir / f"{name}.log", self.workdir / f"{name}.stderr"):
            if path.exists():
                text += path.read_text(errors="replace")
        return text or f"(no {name} log)"


@pytest.fixture(scope="session")
def dnssec_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnssecLab]:
    """Signed zones in NSD behind a validating unbound (see this module's table), per session."""
    lab = DnssecLab(tmp_path_factory.mktemp("dnssec")).start()
    yield lab
    lab.stop()


@pytest.fixture
def dnssec_lab_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Private labs with extra SRV records: ``dnssec_lab_factory(signed_srv=[SrvRecord(...)])``."""
    made: list[DnssecLab] = []

    def make(**kwargs) -> DnssecLab:
        lab = DnssecLab(tmp_path_factory.mktemp("dnssec"), **kwargs).start()
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab.stop()
