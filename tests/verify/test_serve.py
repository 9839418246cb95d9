"""reject_unverified_recipient end to end: a client, smtpgate (in process, and `smtpgate
serve` with two workers and dropped privileges), and an aiosmtpd backend that refuses
unknown users and counts the RCPTs it gets.

Issue 15's "done when": an unknown recipient is refused after one backend probe, and
the next ten attempts are answered from the cache (the backend sees no RCPT for them).
Both paths are played: the client's own RCPT as the probe (nothing after the restriction
can refuse), and a separate probe (``MAIL FROM:<double-bounce@...>``, ``RCPT``, ``RSET``)
where a later restriction could still refuse.
"""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import running_gate
from tests.shared_state.redis_server import RedisServer
from tests.verify.conftest import USER_UNKNOWN, rcpts

LOCKSTEP_CF = """\
mynetworks = 127.0.0.1/32
relay_domains = bar.org
unverified_recipient_reject_code = 550
smtpd_recipient_restrictions = reject_unauth_destination, reject_unverified_recipient
"""
# A table after the restriction may still refuse: the RCPT cannot be the probe.
SEPARATE_CF = LOCKSTEP_CF.replace(
    "reject_unverified_recipient\n",
    "reject_unverified_recipient,\n    check_recipient_access inline:{ trap@bar.org=REJECT }\n",
)
SAID = (
    "host 127.0.0.1[127.0.0.1] said: "
    + USER_UNKNOWN.format("nobody@bar.org")
    + " (in reply to RCPT TO command)"
)
REFUSED = f"550 5.1.1 <nobody@bar.org>: Recipient address rejected: undeliverable address: {SAID}"
LOG_LINE = (
    f"NOQUEUE: reject: RCPT from unknown[127.0.0.2]: {REFUSED}; from=<a@example.net> "
    "to=<nobody@bar.org> proto=ESMTP helo=<client.example.net>"
)
MESSAGE = "Subject: hi\r\n\r\nhello\r\n."


async def attack(client: LineClient, attempts: int = 11) -> list[list[str]]:
    """A dictionary attack's shape: the same unknown address again and again."""
    assert (await client.cmd("EHLO client.example.net"))[-1].startswith("250 ")
    assert await client.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
    return [await client.cmd("RCPT TO:<nobody@bar.org>") for _ in range(attempts)]


async def test_lockstep_the_clients_rcpt_is_the_probe(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with running_gate(tmp_path, LOCKSTEP_CF, backend, in_process="reads its log") as gate:
        client = await gate.connect()
        replies = await attack(client)
        assert replies == [[REFUSED]] * 11
        assert len(rcpts(backend, "nobody@bar.org")) == 1
        # the probe was the client's own transaction: no double-bounce sender
        assert [c for c in backend.connections[0].commands if c.startswith("MAIL")] == [
            "MAIL FROM:<a@example.net>"
        ]
        # a known recipient in the same transaction goes through, verified by its RCPT
        assert await client.cmd("RCPT TO:<alice@bar.org>") == ["250 2.1.5 Ok"]
        assert await client.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        final = await client.cmd(MESSAGE)
        assert final[0].startswith("250 2.0.0 Ok: queued as ")
        assert [m.rcpt_tos for m in backend.messages] == [["alice@bar.org"]]
        # answered from the cache now: a second transaction costs no RCPT for nobody
        assert await client.cmd("MAIL FROM:<b@example.net>") == ["250 2.1.0 Ok"]
        assert (await client.cmd("RCPT TO:<nobody@bar.org>"))[0].startswith("550 5.1.1 ")
        assert await client.cmd("RCPT TO:<alice@bar.org>") == ["250 2.1.5 Ok"]
        assert len(rcpts(backend, "nobody@bar.org")) == 1
        assert len(rcpts(backend, "alice@bar.org")) == 2  # accepted recipients are relayed
        await client.cmd("QUIT")
    log = gate.log
    assert log.count(LOG_LINE) == 11, log
    assert log.count(LOG_LINE.replace("<a@", "<b@")) == 1, log
    assert "proxy-reject" not in log
    # one queue id, announced once a recipient was accepted, and given to the backend
    ids = re.findall(r"(\w+): client=unknown\[127\.0\.0\.2\]", log)
    assert len(ids) == 2, log


async def test_separate_probe_when_a_later_restriction_could_refuse(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with running_gate(tmp_path, SEPARATE_CF, backend, in_process="reads its log") as gate:
        client = await gate.connect()
        assert await attack(client) == [[REFUSED]] * 11
        assert len(rcpts(backend, "nobody@bar.org")) == 1
        probe = backend.connections[0].commands
        assert probe[1:4] == [
            "MAIL FROM:<double-bounce@mx.example.org>",
            "RCPT TO:<nobody@bar.org>",
            "RSET",
        ]
        # a verified address that the table refuses never reaches the client's transaction
        trap = await client.cmd("RCPT TO:<trap@bar.org>")
        assert trap == ["554 5.7.1 <trap@bar.org>: Recipient address rejected: Access denied"]
        transactions = [c for conn in backend.connections for c in conn.commands]
        assert "MAIL FROM:<a@example.net>" not in transactions
        assert await client.cmd("RCPT TO:<alice@bar.org>") == ["250 2.1.5 Ok"]
        await client.cmd("QUIT")
    assert gate.log.count(LOG_LINE) == 11


async def test_a_backend_that_cannot_be_reached_defers(tmp_path: Path) -> None:
    async with RecordingBackend(down=True) as backend:
        async with running_gate(tmp_path, SEPARATE_CF, backend, in_process="reads its log") as g:
            client = await g.connect()
            replies = await attack(client, 2)
            assert (
                replies
                == [
                    [
                        "450 4.1.1 <nobody@bar.org>: Recipient address rejected: "
                        "address verification problem"
                    ]
                ]
                * 2
            )
            await client.cmd("QUIT")
        assert "warning: verify service failure" in g.log


WORKER = re.compile(r"\[(\d+)\]: NOQUEUE: reject: ")
MAX_CONNECTIONS = 64
"""Connections a test may open until both workers have served one (each lands on either
worker, by the kernel's SO_REUSEPORT hash: 11 all on one worker is a 1 in 1000 chance)."""


async def attack_both_workers(gate: Any, attempts: int) -> int:
    """Connections of ``attempts`` RCPTs each, at least 11, until both workers answered
    one; how many were opened."""
    for n in range(1, MAX_CONNECTIONS + 1):
        client = await gate.connect()
        assert await attack(client, attempts) == [[REFUSED]] * attempts
        await client.cmd("QUIT")
        if n >= 11 and len(set(WORKER.findall(gate.log))) == 2:
            return n
    raise AssertionError(f"{MAX_CONNECTIONS} connections, all to one worker:\n{gate.log}")


async def test_deployed_two_workers_share_the_cache_through_redis(
    tmp_path: Path, backend: RecordingBackend, redis_server: RedisServer
) -> None:
    shared = (f"smtpgate_shared_state={redis_server.url}",)
    async with running_gate(tmp_path, LOCKSTEP_CF, backend, overrides=shared) as gate:
        n = await attack_both_workers(gate, 1)
        # both workers answered, and the address was probed once in all
        assert len(rcpts(backend, "nobody@bar.org")) == 1
    assert gate.log.count(LOG_LINE) == n


async def test_deployed_workers_share_the_cache_without_redis(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with running_gate(tmp_path, SEPARATE_CF, backend) as gate:
        n = await attack_both_workers(gate, 2)
        # both workers answered from the supervisor's cache: one probe in all
        assert len(rcpts(backend, "nobody@bar.org")) == 1
    assert gate.log.count(LOG_LINE) == 2 * n


async def test_two_instances_share_the_cache(
    tmp_path: Path, backend: RecordingBackend, redis_server: RedisServer
) -> None:
    shared = (f"smtpgate_shared_state={redis_server.url}",)
    async with AsyncExitStack() as stack:
        gates = []
        for name in ("one", "two"):
            folder = tmp_path / name
            folder.mkdir()
            gates.append(
                await stack.enter_async_context(
                    running_gate(folder, SEPARATE_CF, backend, overrides=shared)
                )
            )
        for n in range(12):
            gate = gates[n % 2]
            client = await gate.connect()
            assert await attack(client, 1) == [[REFUSED]]
            await client.cmd("QUIT")
    assert len(rcpts(backend, "nobody@bar.org")) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_expiry_and_refresh_with_short_times(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    # The verifier's clock is the test's, so "a minute later" needs no waiting.
    times = (
        "address_verify_negative_refresh_time = 10s\naddress_verify_negative_expire_time = 60s\n"
        "address_verify_positive_refresh_time = 20s\naddress_verify_positive_expire_time = 90s\n"
    )
    async with running_gate(
        tmp_path, times + SEPARATE_CF, backend, in_process="sets the verifier's clock"
    ) as gate:
        verifier = gate.server.shared.generation.verifier
        verifier.clock = clock = Clock()
        client = await gate.connect()
        assert await attack(client, 2) == [[REFUSED]] * 2
        assert await client.cmd("RCPT TO:<alice@bar.org>") == ["250 2.1.5 Ok"]
        assert len(rcpts(backend, "nobody@bar.org")) == 1  # probed once
        assert len(rcpts(backend, "alice@bar.org")) == 2  # probed, then relayed
        clock.now += 11  # nobody is due for a refresh: answered, and probed behind
        assert (await client.cmd("RCPT TO:<nobody@bar.org>")) == [REFUSED]
        await backend.wait_for(lambda: len(rcpts(backend, "nobody@bar.org")) == 2)
        assert (await client.cmd("RCPT TO:<nobody@bar.org>")) == [REFUSED]
        assert len(rcpts(backend, "nobody@bar.org")) == 2  # refreshed: not again
        clock.now += 1100  # both expired (and past the probe TTL): probed before answering
        assert (await client.cmd("RCPT TO:<nobody@bar.org>")) == [REFUSED]
        assert len(rcpts(backend, "nobody@bar.org")) == 3
        assert await client.cmd("RCPT TO:<alice@bar.org>") == ["250 2.1.5 Ok"]
        assert len(rcpts(backend, "alice@bar.org")) == 4  # probed again, relayed again
        await client.cmd("QUIT")
