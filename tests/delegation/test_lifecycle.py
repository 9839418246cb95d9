"""The policy client lives as long as its generation: a server that stops (at shutdown, or
a worker retired by a reload) closes its connections to the policy servers."""

from __future__ import annotations

from pathlib import Path

from tests.delegation.fakeserver import FakePolicyServer
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import running_gate


async def test_stopping_the_server_closes_its_policy_connections(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with FakePolicyServer("DUNNO") as policy:
        main_cf = (
            "relay_domains = bar.org\nmynetworks = 127.0.0.1/32\n"
            "smtpd_recipient_restrictions = reject_unauth_destination,\n"
            f"    check_policy_service {policy.endpoint}\n"
        )
        async with running_gate(
            tmp_path, main_cf, backend, in_process="the test sees the server stop"
        ) as gate:
            c = await gate.connect()
            await c.cmd("EHLO client.example.net")
            await c.cmd("MAIL FROM:<a@example.net>")
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            await c.cmd("QUIT")
            assert (policy.opened, policy.closed) == (1, 0)  # kept for the next request
        await policy.wait_for(lambda: policy.closed == 1)
