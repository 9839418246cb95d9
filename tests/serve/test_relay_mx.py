"""An unbracketed relayhost is looked up as MX (through the loopback DNS server)."""

from __future__ import annotations

from pathlib import Path

from tests.dns.dnsserver import FakeDns
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import running_gate

MAIN_CF = """\
myhostname = mx.example.org
relay_domains = bar.org
smtpd_recipient_restrictions = reject_unauth_destination
"""


async def _send_one(gate) -> list[str]:  # type: ignore[no-untyped-def]
    c = await gate.connect()
    await c.cmd("EHLO client.example.net")
    await c.cmd("MAIL FROM:<a@example.net>")
    reply = await c.cmd("RCPT TO:<foo@bar.org>")
    if reply[0].startswith("250"):
        await c.cmd("DATA")
        await c.send_raw(b"Subject: mx\r\n\r\nbody\r\n.\r\n")
        reply = await c.reply()
    await c.cmd("QUIT")
    return reply


async def test_relayhost_without_brackets_follows_the_mx_records(tmp_path: Path):
    dns = FakeDns().start()
    try:
        async with RecordingBackend() as backend:
            # a dead MX with a better preference first: smtpgate moves on to the next one
            dns.add("backend.test.", "MX", "5 dead.backend.test.", "10 live.backend.test.")
            dns.add("dead.backend.test.", "A", "127.0.0.9")
            dns.add("live.backend.test.", "A", "127.0.0.1")
            host, port = dns.address
            port_of_backend = backend.relayhost.rsplit(":", 1)[1]
            overrides = (
                f"relayhost=backend.test:{port_of_backend}",
                f"dns_servers={host}:{port}",
                "dns_timeout=1s",
                "smtp_connect_timeout=2s",
            )
            async with running_gate(tmp_path, MAIN_CF, backend, overrides=overrides) as gate:
                # the start-up probe follows the MX records too (it used to ask the
                # system's resolver for backend.test and warn that it was unreachable)
                await backend.wait_for(lambda: any(not c.commands for c in backend.connections))
                reply = await _send_one(gate)
                assert "is not reachable now" not in gate.log
            assert reply[0].startswith("250 2.0.0 Ok: queued as"), reply
            assert len(backend.messages) == 1
            assert dns.count("backend.test.", "MX") >= 1
    finally:
        dns.stop()


async def test_relayhost_that_does_not_resolve_defers(tmp_path: Path):
    dns = FakeDns().start()
    try:
        async with RecordingBackend() as backend:
            host, port = dns.address
            overrides = (
                "relayhost=nowhere.test:25",
                f"dns_servers={host}:{port}",
                "dns_timeout=1s",
            )
            async with running_gate(tmp_path, MAIN_CF, backend, overrides=overrides) as gate:
                reply = await _send_one(gate)
                log = await gate.wait_log("relayhost nowhere.test:25 is not reachable now (")
                assert "Unknown error" not in log
            assert reply == ["451 4.3.0 Error: queue file write error"]
            assert backend.messages == []
    finally:
        dns.stop()
