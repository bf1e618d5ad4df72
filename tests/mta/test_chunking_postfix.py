"""BDAT (RFC 3030) against a real server: Postfix's smtpd (>= 3.4 offers CHUNKING by default) as
the onion MX on the private Tor network, behind the LMTP relay's pooled connections.

    Relay -> tor -> onion -> Postfix smtpd (CHUNKING, PIPELINING) -> smtp -> a plain sink
"""

from __future__ import annotations

import asyncio
import time

import pytest
from support.e2e import relay_from, srv_toml

from torroute.protocols.lmtp import Transaction
from torroute.testing.sink import MaildirSink

pytestmark = [pytest.mark.testnet]

BODY = b"From: a@origin.test\nSubject: chunk %d\nMessage-ID: <chunk-%d@origin.test>\n\n" \
       b".a line with a leading dot\nbody\n"


def test_relay_sends_bdat_to_a_real_postfix_and_keeps_per_recipient_replies(
        testnet, postfix_factory, dnsmasq_factory, serve_dir) -> None:
    """Three transactions over one pooled connection (RSET + MAIL + RCPT + BDAT LAST in one
    write each time): all accepted; one recipient refused (the other delivered); every one
    refused (Postfix's "no valid recipients" to BDAT, nothing delivered).  The message arrives
    whole and unstuffed (BDAT carries no dot-stuffing), and Postfix logged BDAT commands."""
    final = MaildirSink().start()
    mx = postfix_factory(f"inline:{{mx.test=smtp:[127.0.0.1]:{final.port}}}", name="mx",
                         main_extra="smtpd_recipient_restrictions = check_recipient_access "
                                    "inline:{bad@mx.test=REJECT}, permit_mynetworks, reject\n")
    onion = testnet.net.add_onion({25: ("127.0.0.1", mx.port)})
    try:
        cfg = srv_toml(serve_dir, dnsmasq_factory([]).port, testnet.socks_extended,
                       pins=f"mx.test {onion}\n")
        relay = relay_from(cfg)

        async def scenario() -> list[list[bytes]]:
            out = []
            for n, rcpts in enumerate(((b"u1@mx.test",), (b"u2@mx.test", b"bad@mx.test"),
                                       (b"bad@mx.test",))):
                out.append(await relay.relay(Transaction(b"a@origin.test", rcpts,
                                                         BODY % (n, n))))
            relay.close()  # QUIT: smtpd logs the session's command counts
            return out

        replies = asyncio.run(scenario())
        assert [[r[:4] for r in rs] for rs in replies] == [
            [b"250 "], [b"250 ", b"550 "], [b"550 "]], replies
        assert b"5.7.1" in replies[1][1] and b"in reply to RCPT TO" in replies[1][1]
        assert relay.stats["dialed"] == 1 and relay.stats["reused"] == 2, relay.stats
        got = final.wait_for(2, timeout=60)
        assert sorted(m.rcpt_tos[0] for m in got) == ["u1@mx.test", "u2@mx.test"]
        for m in got:
            assert b"\r\n.a line with a leading dot\r\nbody\r\n" in m.data, m.data
        def sessions() -> list[str]:  # not add_onion's reachability probes (commands=0/0)
            return [ln for ln in mx.log().splitlines()
                    if "smtpd" in ln and "disconnect from" in ln and " mail=" in ln]

        deadline = time.monotonic() + 20
        while not sessions() and time.monotonic() < deadline:
            time.sleep(0.2)
        # one session: 3 transactions, 3 BDAT of which the last refused (no valid recipient),
        # 2 RSETs (before the 2nd and 3rd), no DATA
        assert len(sessions()) == 1, mx.log()[-3000:]
        assert " mail=3 rcpt=2/4 bdat=2/3 rset=2 " in sessions()[0], sessions()
        assert " data=" not in sessions()[0]
        time.sleep(1)
        assert len(final.messages) == 2  # nothing for the refused recipient, no duplicate
    finally:
        testnet.net.remove_onion(onion)
        final.stop()
