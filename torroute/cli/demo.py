"""The demo (``./demo``): two domains routed over Tor onion services, end to end, on 127.0.0.1.

What it shows, with real parts only: a private Tor network (torroute.testing.testnet) serving
two onion MXes (SMTP sinks storing to Maildirs); a dnsmasq answering
``_onion-mx._tcp.example.test SRV`` with the first onion; a pinned map sending ``pinned.test``
to the second; ``torroute route`` for both (and for a domain with no route); then one message
to each, sent through Tor with the public API (torroute.Router + torroute.SMTP), and where each
landed.  Then it cleans up.
Nothing leaves 127.0.0.1.  ``python -m torroute.cli.demo [--keep]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..endpoint import format_hostport as hostport
from ..testing.dnsmasq import Dnsmasq, SrvRecord
from ..testing.sink import MaildirSink
from ..testing.testnet import PrivateNetwork

SRV_DOMAIN = "example.test"
PINNED_DOMAIN = "pinned.test"
PLAIN_DOMAIN = "plain.test"


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text}")


def run_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "torroute.cli", *args], capture_output=True,
                          text=True, timeout=60)
    return (proc.stdout + proc.stderr).strip() + f"    [exit {proc.returncode}]"


def send(config_path: Path, recipient: str, subject: str) -> tuple[str, float]:
    """Route ``recipient`` with the library and deliver one message through Tor."""
    from .. import SMTP, Router, load_config  # the public API, as a tool author would

    config = load_config(config_path)
    decision = Router.from_config(config).route(recipient)
    if decision.kind != "route":
        raise RuntimeError(f"no onion route for {recipient}: {decision}")
    message = (f"From: demo@sender.test\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
               f"Message-ID: <{time.time_ns()}@sender.test>\r\n\r\n"
               f"Delivered over a Tor onion service by torroute.\r\n").encode()
    started = time.monotonic()
    with SMTP(timeout=60, config=config) as smtp:
        smtp.connect(decision.onion, decision.port)
        smtp.ehlo("sender.test")
        smtp.sendmail("demo@sender.test", [recipient], message)
    return f"{decision.onion}:{decision.port} (from {decision.source})", \
        time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (Maildirs, logs) instead of removing it")
    args = parser.parse_args(argv)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="torroute-demo-"))
    work.chmod(0o755)
    sinks: list[MaildirSink] = []
    net: PrivateNetwork | None = None
    dnsmasq: Dnsmasq | None = None
    try:
        heading("1. Two onion MXes: SMTP sinks that store mail in Maildirs")
        sink_srv = MaildirSink(work / "mx-example" / "Maildir",
                               hostname=f"mx.{SRV_DOMAIN}").start()
        sink_pin = MaildirSink(work / "mx-pinned" / "Maildir",
                               hostname=f"mx.{PINNED_DOMAIN}").start()
        sinks += [sink_srv, sink_pin]
        say(f"   {SRV_DOMAIN:<14} MX sink on {hostport(sink_srv.address)}")
        say(f"   {PINNED_DOMAIN:<14} MX sink on {hostport(sink_pin.address)}")

        heading("2. A private Tor network on 127.0.0.1 (3 authorities, 2 relays, an onion "
                "service, a client)")
        net = PrivateNetwork(work / "testnet", {25: sink_srv.address},
                             progress=lambda m: say(f"   {m}"))
        net.up(timeout=90)
        onion_srv = net.onion
        onion_pin = net.add_onion({25: sink_pin.address}, timeout=60)
        say(f"   onion for {SRV_DOMAIN}:   {onion_srv}")
        say(f"   onion for {PINNED_DOMAIN}:    {onion_pin}  (ADD_ONION)")
        say(f"   client tor: SocksPort {hostport(net.socks)}, DNSPort {hostport(net.dns)}")

        heading("3. How the domains are published")
        dnsmasq = Dnsmasq(srv=[SrvRecord(f"_onion-mx._tcp.{SRV_DOMAIN}", onion_srv)]).start()
        dns_port = dnsmasq.port
        say(f"   dnsmasq on 127.0.0.1:{dns_port}:  _onion-mx._tcp.{SRV_DOMAIN}. SRV 0 5 25 "
            f"{onion_srv}.")
        pins = work / "pins.txt"
        pins.write_text(f"# domain  onion[:port]\n{PINNED_DOMAIN}  {onion_pin}:25\n")
        say(f"   map file {pins}:  {PINNED_DOMAIN}  {onion_pin}:25")
        config_path = work / "torroute.toml"
        config_path.write_text(
            "[routing]\n"
            f'maps = ["{pins}"]\n'
            f'nameservers = ["127.0.0.1:{dns_port}"]\n'
            "[tor]\n"
            f'socks = "{hostport(net.socks_extended)}"\n'
            f'dns = "{hostport(net.dns)}"\n')

        heading("4. torroute route")
        for domain in (SRV_DOMAIN, PINNED_DOMAIN, PLAIN_DOMAIN):
            say(f"   $ torroute route --config {config_path.name} {domain}")
            for line in run_cli("route", "--config", str(config_path), domain).splitlines():
                say(f"     {line}")

        heading("5. One message to each domain, through Tor, with the library")
        for sink, recipient in ((sink_srv, f"alice@{SRV_DOMAIN}"),
                                (sink_pin, f"bob@{PINNED_DOMAIN}")):
            where, seconds = send(config_path, recipient, f"hello {recipient} over Tor")
            (received,) = sink.wait_for(1, timeout=30)
            say(f"   {recipient:<20} -> {where}")
            say(f"   {'':<20}    SMTP over Tor took {seconds * 1000:.0f} ms; landed in")
            say(f"   {'':<20}    {sink.path_of(received)}")
        say()
        say("   The first message, as stored:")
        first = sink_srv.path_of(sink_srv.messages[0]).read_text()
        for line in first.strip().splitlines():
            say(f"   | {line}")

        heading(f"Done in {time.monotonic() - started:.1f}s; cleaning up"
                + ("" if args.keep else " (./demo --keep keeps the Maildirs and logs)"))
        return 0
    except Exception as exc:  # noqa: BLE001 - a demo reports and cleans up
        say(f"\ndemo failed: {exc}")
        return 1
    finally:
        if dnsmasq is not None:
            dnsmasq.stop()
        if net is not None:
            net.down(keep=args.keep)
        for sink in sinks:
            sink.stop()
        if args.keep:
            say(f"   kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        say(f"   total {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
