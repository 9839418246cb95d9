"""check_policy_service through a deployed `smtpgate serve` (two workers, privileges
dropped when run as root) in front of a real aiosmtpd backend, with the real policy
daemons from Debian: postgrey greylists, postfwd rejects by a rule, policyd-spf rejects a
``-all`` sender and prepends Received-SPF to a passing one.  Then the faults a deployed
server meets: the policy server down, and a unix socket.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.delegation.daemons import policyd_spf, postfwd, postgrey, private_folder
from tests.delegation.fakeserver import FakePolicyServer
from tests.dns.dnsserver import FakeDns
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, running_gate

COARSE_TICK = 0.05
"""More than one tick of the kernel's coarse clock (CLOCK_REALTIME_COARSE: 1-10 ms)."""
BASE = """\
myhostname = mx.example.org
relay_domains = bar.org
mynetworks = 127.0.0.1/32
"""


def main_cf(endpoint: str) -> str:
    return BASE + (
        "smtpd_recipient_restrictions = reject_unauth_destination,\n"
        f"    check_policy_service {endpoint}\n"
    )


async def envelope(
    gate: Gate, sender: str, rcpt: str = "foo@bar.org"
) -> tuple[LineClient, list[str]]:
    c = await gate.connect()  # from 127.0.0.2, outside mynetworks
    await c.cmd("EHLO client.example.net")
    assert (await c.cmd(f"MAIL FROM:<{sender}>"))[0].startswith("250"), sender
    return c, await c.cmd(f"RCPT TO:<{rcpt}>")


async def message(c: LineClient, body: str = "Subject: hi\r\n\r\nhello\r\n") -> list[str]:
    assert (await c.cmd("DATA"))[0].startswith("354")
    await c.send_raw(body.encode() + b".\r\n")
    reply = await c.reply()
    await c.cmd("QUIT")
    return reply


async def test_postgrey_defers_the_first_attempt_and_passes_a_retry(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with (
        postgrey(delay=1) as endpoint,
        running_gate(tmp_path, main_cf(endpoint), backend) as gate,
    ):
        c, reply = await envelope(gate, "someone@example.net")
        seen = time.time()
        assert reply == [
            "450 4.2.0 <foo@bar.org>: Recipient address rejected: Greylisted, see "
            "http://postgrey.schweikert.ch/help/bar.org.html"
        ]
        await c.cmd("QUIT")
        await gate.wait_log(
            "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 450 4.2.0 <foo@bar.org>: "
            "Recipient address rejected: Greylisted, see "
            "http://postgrey.schweikert.ch/help/bar.org.html; from=<someone@example.net> "
            "to=<foo@bar.org> proto=ESMTP helo=<client.example.net>"
        )
        # postgrey counts whole seconds of Perl's time(), which reads the kernel's coarse
        # clock (up to a tick behind): it saw the triplet first at a second <= `seen`, so
        # the delay has passed once that clock is a whole second past it.
        await asyncio.sleep(max(0.0, math.floor(seen) + 1 + COARSE_TICK - time.time()))
        c, reply = await envelope(gate, "someone@example.net")
        assert reply == ["250 2.1.5 Ok"]
        assert (await message(c))[0].startswith("250 ")
        await backend.wait_for(lambda: len(backend.messages) == 1)
        stored = backend.messages[0].content.decode()
        assert stored.startswith("X-Greylist: delayed "), stored  # postgrey's PREPEND
        assert "by postgrey-1.37 at postgrey.test;" in stored.splitlines()[0]


POSTFWD_RULES = """\
id=R001; sender==spammer@bad.test; action=REJECT go away spammer
id=R002; sender==nice@good.test; action=PREPEND X-Postfwd: hello from R002
"""


async def test_postfwd_rejects_by_a_rule_and_prepends_by_another(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with (
        postfwd(POSTFWD_RULES) as endpoint,
        running_gate(tmp_path, main_cf(endpoint), backend) as gate,
    ):
        c, reply = await envelope(gate, "spammer@bad.test")
        assert reply == ["554 5.7.1 <foo@bar.org>: Recipient address rejected: go away spammer"]
        await c.cmd("QUIT")
        await gate.wait_log(
            "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1 <foo@bar.org>: "
            "Recipient address rejected: go away spammer; from=<spammer@bad.test>"
        )
        c, reply = await envelope(gate, "nice@good.test")
        assert reply == ["250 2.1.5 Ok"]
        assert (await message(c))[0].startswith("250 ")
        await backend.wait_for(lambda: len(backend.messages) == 1)
        assert backend.messages[0].content.startswith(b"X-Postfwd: hello from R002\r\n")
        assert [m.mail_from for m in backend.messages] == ["nice@good.test"]


@pytest.fixture
def dns() -> Iterator[FakeDns]:
    server = FakeDns().start()
    server.add("fail.test", "TXT", "v=spf1 -all")
    server.add("pass.test", "TXT", "v=spf1 ip4:127.0.0.2 -all")
    yield server
    server.stop()


async def test_policyd_spf_rejects_a_fail_and_prepends_a_pass(
    tmp_path: Path, backend: RecordingBackend, dns: FakeDns
) -> None:
    _, dns_port = dns.address
    async with (
        policyd_spf(dns_port) as endpoint,
        running_gate(tmp_path, main_cf(endpoint), backend) as gate,
    ):
        c, reply = await envelope(gate, "someone@fail.test")
        assert reply == [
            "550 5.7.23 <foo@bar.org>: Recipient address rejected: Message rejected due to: "
            "SPF fail - not authorized. Please see "
            "http://www.openspf.net/Why?s=mfrom;id=someone@fail.test;ip=127.0.0.2;r=bar.org"
        ]
        await c.cmd("QUIT")
        c, reply = await envelope(gate, "someone@pass.test")
        assert reply == ["250 2.1.5 Ok"]
        assert (await message(c))[0].startswith("250 ")
        await backend.wait_for(lambda: len(backend.messages) == 1)
        first = backend.messages[0].content.decode().splitlines()[0]
        assert first == (
            "Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=127.0.0.2; "
            "helo=client.example.net; envelope-from=someone@pass.test; receiver=bar.org "
        )
        assert ("fail.test", "TXT", "udp") in dns.queries  # policyd-spf asked our DNS


async def test_a_policy_server_that_is_down_gets_the_default_action(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with FakePolicyServer() as server:
        endpoint, address = server.endpoint, server.address
    async with running_gate(tmp_path, main_cf(endpoint), backend) as gate:
        c, reply = await envelope(gate, "someone@example.net")
        assert reply == [
            "451 4.3.5 <foo@bar.org>: Recipient address rejected: Server configuration problem"
        ]
        await c.cmd("QUIT")
        log = await gate.wait_log("Server configuration problem; from=<someone@example.net>")
        lines = [line.split(": ", 1)[1] for line in log.splitlines() if address in line]
        assert (
            lines
            == [
                f"warning: connect to {address}: Connection refused",
                f"warning: problem talking to server {address}: Connection refused",
            ]
            * 2
        )
        assert backend.connections == []  # nothing reached the backend


async def test_a_unix_socket_policy_server_behind_dropped_privileges(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    folder = private_folder(None)  # the workers (nobody) must reach the socket
    server = await FakePolicyServer(
        lambda attrs, conn, n: "DUNNO" if attrs["sender"] == "ok@example.net" else "REJECT no"
    ).start(str(folder / "policy.sock"))
    (folder / "policy.sock").chmod(0o666)
    try:
        async with running_gate(tmp_path, main_cf(server.endpoint), backend) as gate:
            c, reply = await envelope(gate, "bad@example.net")
            assert reply == ["554 5.7.1 <foo@bar.org>: Recipient address rejected: no"]
            await c.cmd("QUIT")
            c, reply = await envelope(gate, "ok@example.net")
            assert reply == ["250 2.1.5 Ok"]
            await c.cmd("QUIT")
        (_, attrs) = server.requests[-1]
        assert (attrs["protocol_state"], attrs["client_address"], attrs["recipient"]) == (
            "RCPT",
            "127.0.0.2",
            "foo@bar.org",
        )
        assert attrs["instance"] != server.requests[0][1]["instance"]
    finally:
        await server.stop()
        shutil.rmtree(folder, ignore_errors=True)
