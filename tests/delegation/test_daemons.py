"""docs/filters.md's examples, run: each main.cf of the document through a deployed
`smtpgate serve` (two workers, privileges dropped when run as root) in front of a real
aiosmtpd backend, with the real policy daemon from Debian on loopback -- postgrey
greylists, postfwd rejects by a rule, policyd-spf rejects a ``-all`` sender and
prepends Received-SPF to a passing one -- and the replies and log lines the document
shows.  Then the faults a deployed server meets: the policy server down, a unix socket.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.delegation import docs
from tests.delegation.daemons import policyd_spf, postfwd, postgrey, private_folder
from tests.delegation.fakeserver import FakePolicyServer
from tests.dns.dnsserver import FakeDns
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, running_gate

DOC_CLIENT = "203.0.113.7"
"""The client address the document's examples show; the tests' clients are 127.0.0.2."""
COARSE_TICK = 0.05
"""More than one tick of the kernel's coarse clock (CLOCK_REALTIME_COARSE: 1-10 ms)."""
RCPT = "foo@example.org"


def shown(text: str) -> str:
    """A reply or log line of the document, as the test's client gets it."""
    return text.replace(DOC_CLIENT, "127.0.0.2")


def address(endpoint: str) -> str:
    return endpoint.split(":", 1)[1]


async def envelope(gate: Gate, sender: str) -> tuple[LineClient, list[str]]:
    c = await gate.connect()  # from 127.0.0.2, outside mynetworks
    await c.cmd("EHLO client.example.net")
    assert (await c.cmd(f"MAIL FROM:<{sender}>"))[0].startswith("250"), sender
    return c, await c.cmd(f"RCPT TO:<{RCPT}>")


async def message(c: LineClient, body: str = "Subject: hi\r\n\r\nhello\r\n") -> list[str]:
    assert (await c.cmd("DATA"))[0].startswith("354")
    await c.send_raw(body.encode() + b".\r\n")
    reply = await c.reply()
    await c.cmd("QUIT")
    return reply


async def after_postgrey_delay(seen: float) -> None:
    """Wait until postgrey's clock is a whole second past ``seen``: it counts whole
    seconds of Perl's time(), which reads the kernel's coarse clock (up to a tick behind),
    and saw the triplet first at a second <= ``seen`` (a clock condition, not a guess)."""
    await asyncio.sleep(max(0.0, math.floor(seen) + 1 + COARSE_TICK - time.time()))


async def test_postgrey_defers_the_first_attempt_and_passes_a_retry(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with postgrey(delay=1) as endpoint:
        main_cf = docs.main_cf("postgrey").replace("127.0.0.1:10023", address(endpoint))
        async with running_gate(tmp_path, main_cf, backend) as gate:
            c, reply = await envelope(gate, "someone@example.net")
            seen = time.time()
            assert reply == [
                docs.line(
                    "450 4.2.0 <foo@example.org>: Recipient address rejected: Greylisted, see"
                )
            ]
            await c.cmd("QUIT")
            await gate.wait_log(
                shown(docs.line("NOQUEUE: reject: RCPT from unknown[203.0.113.7]: 450 4.2.0"))
            )
            await after_postgrey_delay(seen)
            c, reply = await envelope(gate, "someone@example.net")
            assert reply == ["250 2.1.5 Ok"]
            assert (await message(c))[0].startswith("250 ")
            await backend.wait_for(lambda: len(backend.messages) == 1)
            first = backend.messages[0].content.decode().splitlines()[0]
            assert first.startswith("X-Greylist: delayed "), first  # postgrey's PREPEND
            assert "by postgrey-1.37 at postgrey.test;" in first


async def test_postfwd_rejects_by_a_rule_and_prepends_by_another(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with postfwd(docs.block("id=R001;")) as endpoint:
        main_cf = docs.main_cf("postfwd").replace("127.0.0.1:10040", address(endpoint))
        async with running_gate(tmp_path, main_cf, backend) as gate:
            c, reply = await envelope(gate, "spammer@bad.example")
            assert reply == [
                "554 5.7.1 <foo@example.org>: Recipient address rejected: go away spammer"
            ]
            await c.cmd("QUIT")
            await gate.wait_log(
                "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1 <foo@example.org>: "
                "Recipient address rejected: go away spammer; from=<spammer@bad.example>"
            )
            c, reply = await envelope(gate, "nice@good.example")
            assert reply == ["250 2.1.5 Ok"]
            assert (await message(c))[0].startswith("250 ")
            await backend.wait_for(lambda: len(backend.messages) == 1)
            assert backend.messages[0].content.startswith(b"X-Postfwd: hello from R002\r\n")
            assert [m.mail_from for m in backend.messages] == ["nice@good.example"]


@pytest.fixture
def dns() -> Iterator[FakeDns]:
    server = FakeDns().start()
    server.add("fail.example", "TXT", "v=spf1 -all")
    server.add("pass.example", "TXT", "v=spf1 ip4:127.0.0.2 -all")
    yield server
    server.stop()


RECEIVED_SPF_PASS = (
    "Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=127.0.0.2; "
    "helo=client.example.net; envelope-from={}; receiver=example.org "
)


async def test_policyd_spf_rejects_a_fail_and_prepends_a_pass(
    tmp_path: Path, backend: RecordingBackend, dns: FakeDns
) -> None:
    async with policyd_spf(dns.address[1]) as endpoint:
        main_cf = docs.main_cf("policyd-spf").replace("127.0.0.1:10046", address(endpoint))
        async with running_gate(tmp_path, main_cf, backend) as gate:
            c, reply = await envelope(gate, "someone@fail.example")
            assert reply == [shown(docs.line("550 5.7.23 <foo@example.org>"))]
            await c.cmd("QUIT")
            c, reply = await envelope(gate, "someone@pass.example")
            assert reply == ["250 2.1.5 Ok"]
            assert (await message(c))[0].startswith("250 ")
            await backend.wait_for(lambda: len(backend.messages) == 1)
            first = backend.messages[0].content.decode().splitlines()[0]
            assert first == RECEIVED_SPF_PASS.format("someone@pass.example")
            assert ("fail.example", "TXT", "udp") in dns.queries  # policyd-spf asked our DNS


async def test_all_three_in_one_list(
    tmp_path: Path, backend: RecordingBackend, dns: FakeDns
) -> None:
    async with (
        postfwd(docs.block("id=R001;")) as fwd,
        policyd_spf(dns.address[1]) as spf,
        postgrey(delay=1) as grey,
    ):
        main_cf = (
            docs.main_cf("all three")
            .replace("127.0.0.1:10040", address(fwd))
            .replace("127.0.0.1:10046", address(spf))
            .replace("127.0.0.1:10023", address(grey))
        )
        async with running_gate(tmp_path, main_cf, backend) as gate:
            _, reply = await envelope(gate, "spammer@bad.example")  # postfwd first
            assert reply[0].endswith("Recipient address rejected: go away spammer")
            _, reply = await envelope(gate, "someone@fail.example")  # then SPF
            assert reply[0].startswith("550 5.7.23 ")
            c, reply = await envelope(gate, "new@pass.example")  # SPF passes, postgrey defers
            seen = time.time()
            assert reply[0].startswith(
                "450 4.2.0 <foo@example.org>: Recipient address rejected: Greylisted"
            )
            await c.cmd("QUIT")
            await after_postgrey_delay(seen)
            c, reply = await envelope(gate, "new@pass.example")
            assert reply == ["250 2.1.5 Ok"]
            assert (await message(c))[0].startswith("250 ")
            await backend.wait_for(lambda: len(backend.messages) == 1)
            head = backend.messages[0].content.decode().splitlines()[:2]
            assert head[0] == RECEIVED_SPF_PASS.format("new@pass.example")
            assert head[1].startswith("X-Greylist: delayed ")


async def test_a_policy_server_that_is_down_gets_the_default_action(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with FakePolicyServer() as server:
        dead = server.address  # nothing listens there any more
    main_cf = docs.main_cf("postgrey").replace("127.0.0.1:10023", dead)
    async with running_gate(tmp_path, main_cf, backend) as gate:
        c, reply = await envelope(gate, "someone@example.net")
        assert reply == [
            "451 4.3.5 <foo@example.org>: Recipient address rejected: Server configuration problem"
        ]
        await c.cmd("QUIT")
        log = await gate.wait_log("Server configuration problem; from=<someone@example.net>")
    lines = [ln.split(": ", 1)[1] for ln in log.splitlines() if dead in ln or "NOQUEUE" in ln]
    expected = docs.block("warning: connect to 127.0.0.1:10023").replace("127.0.0.1:10023", dead)
    assert lines == shown(expected).splitlines()
    assert backend.connections == []  # nothing reached the backend


async def test_a_unix_socket_policy_server_behind_dropped_privileges(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    folder = private_folder(None)  # the workers (nobody) must reach the socket
    server = await FakePolicyServer(
        lambda attrs, conn, n: "DUNNO" if attrs["sender"] == "ok@example.net" else "REJECT no"
    ).start(str(folder / "policy.sock"))
    (folder / "policy.sock").chmod(0o666)
    main_cf = docs.main_cf("postgrey").replace("inet:127.0.0.1:10023", server.endpoint)
    try:
        async with running_gate(tmp_path, main_cf, backend) as gate:
            c, reply = await envelope(gate, "bad@example.net")
            assert reply == ["554 5.7.1 <foo@example.org>: Recipient address rejected: no"]
            await c.cmd("QUIT")
            c, reply = await envelope(gate, "ok@example.net")
            assert reply == ["250 2.1.5 Ok"]
            await c.cmd("QUIT")
        (_, attrs) = server.requests[-1]
        assert (attrs["protocol_state"], attrs["client_address"], attrs["recipient"]) == (
            "RCPT",
            "127.0.0.2",
            RCPT,
        )
        assert attrs["instance"] != server.requests[0][1]["instance"]
    finally:
        await server.stop()
        shutil.rmtree(folder, ignore_errors=True)
