"""Two `smtpgate serve` instances (supervisor, two workers each, privileges dropped when
run as root) sharing one real redis-server through smtpgate_shared_state.

The per-client limits hold across both instances; Redis going away stops no mail (the
instances count alone meanwhile) and the shared counts are right again once it is back;
an instance that dies stops counting after one lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from smtpgate.shared_state import conn_key
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import DeployedGate, running_gate
from tests.shared_state.redis_server import RedisServer

MAIN_CF = """\
mynetworks = 127.0.0.1/32
relay_domains = bar.org
"""
CLIENT = "127.0.0.2"
GREETING = "220 mx.example.org ESMTP Postfix"
TOO_MANY = f"421 4.7.0 mx.example.org Error: too many connections from {CLIENT}"
LEASE = 3.0  # the shortest: renewed every second
BOUND = 15.0


@asynccontextmanager
async def two_instances(
    tmp_path: Path,
    backend: RecordingBackend,
    redis: RedisServer,
    *overrides: str,
) -> AsyncIterator[list[DeployedGate]]:
    shared = (f"smtpgate_shared_state={redis.url}", f"smtpgate_shared_state_lease={LEASE:g}s")
    async with AsyncExitStack() as stack:
        gates = []
        for name in ("one", "two"):
            folder = tmp_path / name
            folder.mkdir()
            gate = await stack.enter_async_context(
                running_gate(folder, MAIN_CF, backend, overrides=(*shared, *overrides))
            )
            gates.append(gate)
        yield gates


async def open_session(gate: DeployedGate) -> tuple[LineClient, str]:
    """A connection from CLIENT and the first line of what it is told first."""
    client = await LineClient.connect(gate.host, gate.port, source=CLIENT)
    gate.clients.append(client)
    return client, (await client.reply())[0]


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while True:
        result = predicate()
        if result if isinstance(result, bool) else await result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # poll interval of a bounded wait for a condition


async def send_mail(client: LineClient, n: int) -> list[str]:
    """One message through an open session; the reply to its end of data."""
    assert (await client.cmd("EHLO client.example.net"))[-1].startswith("250 ")
    assert await client.cmd(f"MAIL FROM:<s{n}@example.net>") == ["250 2.1.0 Ok"]
    assert await client.cmd("RCPT TO:<bob@bar.org>") == ["250 2.1.5 Ok"]
    assert await client.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    return await client.cmd(f"Subject: {n}\r\n\r\nbody {n}\r\n.")


def open_in_redis(redis: RedisServer) -> int:
    """CLIENT's connections counted in Redis now: those whose lease has not ended
    (an ended one stays in the set until the next connect of that client drops it)."""
    seconds, micros = redis.command("TIME").split()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return int(redis.command("ZCOUNT", conn_key(CLIENT), str(now_ms), "+inf"))


async def test_connection_count_limit_holds_across_instances(
    tmp_path: Path, backend: RecordingBackend, redis_server: RedisServer
) -> None:
    """12 simultaneous connections from one client, half to each instance, a limit of 5:
    exactly 5 are greeted (each instance alone would greet 5: 10 in all)."""
    async with two_instances(
        tmp_path, backend, redis_server, "smtpd_client_connection_count_limit=5"
    ) as gates:
        sessions = await asyncio.gather(*(open_session(gates[n % 2]) for n in range(12)))
        firsts = sorted(line for _, line in sessions)
        assert firsts == [GREETING] * 5 + [TOO_MANY] * 7, firsts
        log = gates[0].log + gates[1].log
        assert f"warning: Connection concurrency limit exceeded: 6 from unknown[{CLIENT}]" in log
        assert "using local counters" not in log
        assert open_in_redis(redis_server) == 5
        # one leaves: the next one gets in, on either instance
        held = [client for client, line in sessions if line == GREETING]
        assert await held[0].cmd("QUIT") == ["221 2.0.0 Bye"]
        await eventually(lambda: open_in_redis(redis_server) == 4, "the disconnect")
        _, line = await open_session(gates[0])
        assert line == GREETING
        _, line = await open_session(gates[1])
        assert line == TOO_MANY


async def test_rates_are_counted_across_instances(
    tmp_path: Path, backend: RecordingBackend, redis_server: RedisServer
) -> None:
    async with two_instances(
        tmp_path,
        backend,
        redis_server,
        "smtpd_client_connection_rate_limit=3",
        "smtpd_client_message_rate_limit=2",
        "smtpd_client_recipient_rate_limit=3",
    ) as gates:
        one, line = await open_session(gates[0])
        assert line == GREETING
        two, line = await open_session(gates[1])
        assert line == GREETING
        assert (await open_session(gates[0]))[1] == GREETING
        assert (await open_session(gates[1]))[1] == TOO_MANY  # the 4th connection
        assert "warning: Connection rate limit exceeded: 4 from" in gates[1].log

        for client in (one, two):
            assert (await client.cmd("EHLO client.example.net"))[-1].startswith("250 ")
        assert await one.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
        assert await two.cmd("MAIL FROM:<b@example.net>") == ["250 2.1.0 Ok"]
        assert await one.cmd("RCPT TO:<bob@bar.org>") == ["250 2.1.5 Ok"]
        assert await two.cmd("RCPT TO:<bob@bar.org>") == ["250 2.1.5 Ok"]
        assert await two.cmd("RCPT TO:<alice@bar.org>") == ["250 2.1.5 Ok"]
        assert await one.cmd("RCPT TO:<carol@bar.org>") == [
            f"450 4.7.1 Error: too many recipients from {CLIENT}"
        ]
        assert await one.cmd("RSET") == ["250 2.0.0 Ok"]
        assert await one.cmd("MAIL FROM:<c@example.net>") == [
            f"450 4.7.1 Error: too much mail from {CLIENT}"
        ]
        assert "warning: Recipient address rate limit exceeded: 4 from" in gates[0].log
        assert "warning: Message delivery request rate limit exceeded: 3 from" in gates[0].log


async def test_redis_going_away_stops_no_mail(
    tmp_path: Path, backend: RecordingBackend, redis_server: RedisServer
) -> None:
    """Killed mid-session: the sessions get their replies and their mail is relayed, new
    clients are counted by each instance alone; once Redis is back the instances count
    their open connections there again and the shared limit holds once more."""
    async with two_instances(
        tmp_path, backend, redis_server, "smtpd_client_connection_count_limit=5"
    ) as gates:
        before = [await open_session(gates[n % 2]) for n in range(2)]
        assert [line for _, line in before] == [GREETING] * 2
        assert open_in_redis(redis_server) == 2

        redis_server.kill()
        for n, (client, _) in enumerate(before):
            reply = await send_mail(client, n)
            assert reply[0].startswith("250 2.0.0 Ok: queued as "), reply
        during = [await open_session(gates[n % 2]) for n in range(4)]
        assert [line for _, line in during] == [GREETING] * 4  # 6 open: each has 3 of 5
        reply = await send_mail(during[0][0], 2)
        assert reply[0].startswith("250 2.0.0 Ok: queued as "), reply
        log = gates[0].log + gates[1].log
        warning = f"warning: smtpgate_shared_state {redis_server.url}: "
        assert warning in log and "; using local counters" in log, log

        redis_server.start()  # an empty Redis: the instances must count again
        await eventually(lambda: open_in_redis(redis_server) == 6, "the open connections")
        _, line = await open_session(gates[0])
        assert line == TOO_MANY  # 7 > 5: shared again
        await gates[0].wait_log("answering again; counting shared")
        assert len(backend.messages) == 3


async def test_a_crashed_instance_stops_counting_after_its_lease(
    tmp_path: Path, backend: RecordingBackend, redis_server: RedisServer
) -> None:
    async with two_instances(
        tmp_path, backend, redis_server, "smtpd_client_connection_count_limit=5"
    ) as (one, two):
        sessions = [await open_session(one) for _ in range(3)]
        assert [line for _, line in sessions] == [GREETING] * 3
        assert open_in_redis(redis_server) == 3
        await one.crash()
        assert open_in_redis(redis_server) == 3  # nobody said goodbye
        assert [(await open_session(two))[1] for _ in range(3)] == [GREETING] * 2 + [TOO_MANY]
        # one lease later the dead instance's connections no longer count
        await eventually(lambda: open_in_redis(redis_server) == 2, "the leases to end")
        assert [(await open_session(two))[1] for _ in range(4)] == [GREETING] * 3 + [TOO_MANY]


async def test_redis_down_at_start_stops_nothing(tmp_path: Path, backend: RecordingBackend) -> None:
    """Redis not there when serve starts: serve starts, the limits hold per instance,
    mail goes through; once Redis starts the instance counts there."""
    redis = RedisServer(tmp_path / "redis")  # not started yet
    overrides = (
        f"smtpgate_shared_state={redis.url}",
        f"smtpgate_shared_state_lease={LEASE:g}s",
        "smtpd_client_connection_count_limit=2",
    )
    try:
        async with running_gate(tmp_path, MAIN_CF, backend, overrides=overrides) as gate:
            sessions = [await open_session(gate) for _ in range(3)]
            assert [line for _, line in sessions] == [GREETING] * 2 + [TOO_MANY]
            reply = await send_mail(sessions[0][0], 0)
            assert reply[0].startswith("250 2.0.0 Ok: queued as "), reply
            assert f"warning: smtpgate_shared_state {redis.url}: Connection refused; " in gate.log
            redis.start()
            await eventually(lambda: open_in_redis(redis) == 2, "the open connections")
            await gate.wait_log("answering again; counting shared")
            assert len(backend.messages) == 1
    finally:
        redis.stop()
