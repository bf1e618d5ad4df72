"""torroute.tor.control on the private Tor network: the descriptor upload wait succeeds, the
onion is reachable, and the client tor maps its automap address back to it."""

from __future__ import annotations

import time

import pytest

from torroute.errors import OpenRelayRisk, TemporaryError
from torroute.testing.sink import MaildirSink
from torroute.tor.automap import resolve_automap
from torroute.tor.control import Tor
from torroute.tor.dial import dial
from torroute.tor.onion_service import key_file_address

pytestmark = [pytest.mark.testnet,
              pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")]


def banner_through_tor(onion: str, proxy: tuple[str, int], deadline: float) -> bytes:
    """The first line of the onion's port 25; retries while the other HSDirs still get the
    descriptor (0xF0 right after the first upload, see the testnet recipe)."""
    while True:
        try:
            with dial(onion, 25, proxy=proxy, timeout=20) as sock:
                return sock.makefile("rb").readline(512)
        except TemporaryError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_create_waits_for_the_upload_and_the_onion_works(testnet) -> None:
    sink = MaildirSink(testnet.new_dir("ctlsink") / "Maildir").start()
    key = testnet.new_dir("ctlkey") / "mx.key"
    hs_control = f"inet:127.0.0.1:{testnet.net.node('hs').control_port}"
    target = f"25={sink.address[0]}:{sink.address[1]}"
    try:
        with Tor.connect(hs_control) as tor:
            # the sink accepts every recipient: it *is* an open relay, and the probe says so
            with pytest.raises(OpenRelayRisk):
                tor.create_onion([target], key_file=key, wait=False)
            assert not key.exists()  # refused before anything was made
            lines: list[str] = []
            started = time.monotonic()
            service = tor.create_onion([target], key_file=key, timeout=90, force=True,
                                       progress=lines.append)
            took = time.monotonic() - started
            assert service.uploaded is True
            assert service.address == key_file_address(key)
            assert any("descriptor uploaded to $" in line for line in lines), lines
            print(f"descriptor uploaded {took:.1f}s after ADD_ONION")
        try:
            banner = banner_through_tor(service.address, testnet.socks_extended,
                                        time.monotonic() + 60)
            assert banner.startswith(b"220 ")
            address = resolve_automap(service.address, testnet.dns, 5.0)
            with Tor.connect(f"inet:127.0.0.1:{testnet.control[1]}") as client:
                assert client.reverse(str(address)) == service.address
                status = client.status()
                assert status.bootstrap.done and status.network_liveness == "up"
        finally:
            with Tor.connect(hs_control) as tor:
                tor.remove_onion(service.address)
    finally:
        sink.stop()
