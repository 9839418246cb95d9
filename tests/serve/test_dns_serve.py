"""DNS restrictions over a real socket: smtpgate serve, a loopback DNS server, a backend.

Issue 6's done-when: with reject_rbl_client on a test zone, a listed client gets
Postfix's `554 5.7.1 Service unavailable; Client host [ip] blocked using zone; reason`
at RCPT, an unlisted one passes, and a DNS outage defers instead of rejecting or
accepting.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dns.dnsserver import FakeDns
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import Gate, running_gate

MAIN_CF = """\
myhostname = mx.example.org
relay_domains = bar.org
mynetworks = 127.0.0.1/32
smtpd_recipient_restrictions = reject_unauth_destination, reject_rbl_client zen.test
"""


@pytest.fixture
def dns() -> Iterator[FakeDns]:
    server = FakeDns().start()
    yield server
    server.stop()


async def _rcpt(gate: Gate, source: str) -> list[str]:
    c = await gate.connect(source=source)
    await c.cmd("EHLO client.example.net")
    await c.cmd("MAIL FROM:<a@example.net>")
    reply = await c.cmd("RCPT TO:<foo@bar.org>")
    await c.cmd("QUIT")
    return reply


async def test_rbl_listed_unlisted_and_outage(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    dns.add("3.0.0.127.zen.test.", "A", "127.0.0.2")
    dns.add("3.0.0.127.zen.test.", "TXT", "listed for testing")
    host, port = dns.address
    overrides = (f"dns_servers={host}:{port}", "dns_timeout=1s", "dns_tries=1")
    async with running_gate(tmp_path, MAIN_CF, backend, overrides=overrides) as gate:
        assert await _rcpt(gate, "127.0.0.3") == [
            "554 5.7.1 Service unavailable; Client host [127.0.0.3] blocked using zen.test; "
            "listed for testing"
        ]
        assert await _rcpt(gate, "127.0.0.4") == ["250 2.1.5 Ok"]
        dns.drop_all = True  # the DNS server stops answering
        reply = await _rcpt(gate, "127.0.0.5")
        assert reply[0].startswith("450 4.7.1 "), reply
        assert (
            "NOQUEUE: reject: RCPT from unknown[127.0.0.3]: 554 5.7.1 Service unavailable; "
            "Client host [127.0.0.3] blocked using zen.test; listed for testing;"
        ) in gate.log
