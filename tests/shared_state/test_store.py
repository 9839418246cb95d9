"""RedisStore and SharedAnvil against a real redis-server (no fake Redis).

The scripts are atomic (concurrent clients never get the same count), leases and rate
windows expire by Redis's clock, and an unreachable Redis costs each call at most the
timeout once, then nothing until it is back.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from smtpgate.anvil import LocalAnvil
from smtpgate.logs import MailLog, route_python_logging
from smtpgate.shared_state import (
    RedisStore,
    SharedAnvil,
    StoreUnavailable,
    conn_key,
    display_url,
    rate_key,
)
from tests.shared_state.redis_server import RedisServer

BOUND = 10.0
UNIT = 60.0


@pytest.fixture
def maillog() -> io.StringIO:
    stream = io.StringIO()
    route_python_logging(MailLog("mx.example.org", stream=stream))
    return stream


@asynccontextmanager
async def store(server: RedisServer, **kwargs: float) -> AsyncIterator[RedisStore]:
    s = RedisStore(server.url, **kwargs)
    try:
        yield s
    finally:
        await s.close()


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll a condition (a lease or window ending by Redis's clock) within BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # poll interval of a bounded wait for a condition


def test_display_url_hides_the_password() -> None:
    assert display_url("redis://user:secret@10.0.0.1:6380/2") == "redis://10.0.0.1:6380/2"
    assert display_url("rediss://:pw@[::1]/0") == "rediss://[::1]/0"


async def test_concurrent_connects_get_distinct_counts(redis_server: RedisServer) -> None:
    """Two clients (two instances) count 40 connections at once: 1..40, each once."""
    async with store(redis_server) as a, store(redis_server) as b:
        calls = [(a if n % 2 else b).connect("192.0.2.1", f"m{n}", 30, UNIT) for n in range(40)]
        results = await asyncio.gather(*calls)
        assert sorted(count for count, _ in results) == list(range(1, 41))
        assert sorted(rate for _, rate in results) == list(range(1, 41))
        assert redis_server.command("ZCARD", conn_key("192.0.2.1")) == "40"
        await a.disconnect("192.0.2.1", "m1")
        await b.disconnect("192.0.2.1", "m0")
        assert redis_server.command("ZCARD", conn_key("192.0.2.1")) == "38"
        assert await a.connect("192.0.2.1", "m99", 30, UNIT) == (39, 41)
        # another address counts alone
        assert await b.connect("192.0.2.2", "x", 30, UNIT) == (1, 1)


async def test_a_lease_that_is_not_renewed_ends(redis_server: RedisServer) -> None:
    async with store(redis_server) as s:
        assert await s.connect("192.0.2.1", "dead", 0.3, UNIT) == (1, 1)
        assert await s.connect("192.0.2.1", "alive", 0.3, UNIT) == (2, 2)
        ttl = int(redis_server.command("PTTL", conn_key("192.0.2.1")))
        assert 0 < ttl <= 300

        async def only_the_renewed_one_counts() -> bool:
            await s.renew([("192.0.2.1", "alive")], 0.3)
            count, _ = await s.connect("192.0.2.1", "probe", 0.3, UNIT)
            await s.disconnect("192.0.2.1", "probe")
            return count == 2  # alive and the probe; dead has gone

        await eventually(only_the_renewed_one_counts, "the unrenewed lease to end")
        members = redis_server.command("ZRANGE", conn_key("192.0.2.1"), "0", "-1")
        assert members.split() == ["alive"]


async def test_renew_adds_what_redis_lost(redis_server: RedisServer) -> None:
    async with store(redis_server) as s:
        await s.renew([("192.0.2.1", "a"), ("192.0.2.1", "b"), ("192.0.2.3", "c")], 30)
        assert redis_server.command("ZCARD", conn_key("192.0.2.1")) == "2"
        assert await s.connect("192.0.2.3", "d", 30, UNIT) == (2, 1)
        assert 29_000 < int(redis_server.command("PTTL", conn_key("192.0.2.1"))) <= 30_000


async def test_rates_count_in_a_window_from_the_first_event(redis_server: RedisServer) -> None:
    async with store(redis_server) as s:
        assert await s.connect("192.0.2.1", "m", 30, 0.5) == (1, 1)
        assert await s.event("192.0.2.1", "mail", 0.5) == 1
        assert await s.event("192.0.2.1", "rcpt", 0.5) == 1
        assert await s.event("192.0.2.1", "rcpt", 0.5) == 2
        assert await s.event("192.0.2.1", "mail", 0.5) == 2
        ttl = int(redis_server.command("PTTL", rate_key("192.0.2.1")))
        assert 0 < ttl <= 500  # from the first event, not pushed on by the later ones
        with pytest.raises(ValueError):
            await s.event("192.0.2.1", "helo", 0.5)

        async def new_window() -> bool:
            return await s.event("192.0.2.9", "mail", 0.5) >= 1 and (
                redis_server.command("EXISTS", rate_key("192.0.2.1")) == "0"
            )

        await eventually(new_window, "the window to pass")
        assert await s.event("192.0.2.1", "mail", 0.5) == 1
        assert await s.connect("192.0.2.1", "n", 30, 0.5) == (2, 1)


async def test_values_and_counters_with_a_time_to_live(redis_server: RedisServer) -> None:
    async with store(redis_server) as s:
        assert await s.get("dnsbl:zen:2.0.0.127") is None
        await s.set("dnsbl:zen:2.0.0.127", "127.0.0.2", 30)
        assert await s.get("dnsbl:zen:2.0.0.127") == b"127.0.0.2"
        assert 29_000 < int(redis_server.command("PTTL", "smtpgate:dnsbl:zen:2.0.0.127"))
        assert [await s.incr("grey:x", 30) for _ in range(3)] == [1, 2, 3]
        ttl = int(redis_server.command("PTTL", "smtpgate:grey:x"))
        assert 29_000 < ttl <= 30_000


async def test_redis_gone_fails_fast_logs_once_and_recovers(
    redis_server: RedisServer, maillog: io.StringIO
) -> None:
    recovered = asyncio.Event()
    async with store(redis_server, probe_every=0.1) as s:
        s.on_recover(recovered.set)
        assert await s.connect("192.0.2.1", "m", 30, UNIT) == (1, 1)
        redis_server.kill()
        for _ in range(20):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await s.connect("192.0.2.1", "n", 30, UNIT)
            assert time.monotonic() - start < 1.0
        assert not s.available
        lines = [line for line in maillog.getvalue().splitlines() if "warning:" in line]
        assert len(lines) == 1, lines
        assert f"warning: smtpgate_shared_state {redis_server.url}: " in lines[0]
        assert lines[0].endswith("; using local counters")
        redis_server.start()
        await asyncio.wait_for(recovered.wait(), BOUND)
        assert s.available
        assert await s.connect("192.0.2.1", "n", 30, UNIT) == (1, 1)  # a new Redis: empty
        assert f"smtpgate_shared_state {redis_server.url}: answering again" in maillog.getvalue()


async def test_a_silent_redis_costs_one_timeout(redis_server: RedisServer) -> None:
    """SIGSTOP: connections stay open, nothing answers; the timeout bounds the wait."""
    recovered = asyncio.Event()
    async with store(redis_server, timeout=0.2, probe_every=0.1) as s:
        s.on_recover(recovered.set)
        await s.connect("192.0.2.1", "m", 30, UNIT)
        redis_server.freeze()
        try:
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await s.event("192.0.2.1", "mail", UNIT)
            assert 0.15 < time.monotonic() - start < 1.0
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await s.event("192.0.2.1", "mail", UNIT)
            assert time.monotonic() - start < 0.05  # down: no second wait
        finally:
            redis_server.thaw()
        await asyncio.wait_for(recovered.wait(), BOUND)
        assert await s.connect("192.0.2.1", "n", 30, UNIT) == (2, 2)


# --------------------------------------------------------------------------- SharedAnvil


@asynccontextmanager
async def instance(
    server: RedisServer, lease: float = 30, name: str | None = None
) -> AsyncIterator[SharedAnvil]:
    anvil = SharedAnvil(RedisStore(server.url, probe_every=0.1), LocalAnvil(), lease, name)
    anvil.start()
    try:
        yield anvil
    finally:
        await anvil.close()


async def test_two_instances_share_one_count(redis_server: RedisServer) -> None:
    async with instance(redis_server) as one, instance(redis_server) as two:
        counts = await asyncio.gather(
            *((one if n % 2 else two).connect("192.0.2.1", UNIT) for n in range(12))
        )
        assert sorted(c.connections for c in counts) == list(range(1, 13))
        assert {c.total for c in counts} <= set(range(1, 7))  # the total is per instance
        assert one.fallbacks == two.fallbacks == 0
        for _ in range(6):
            one.disconnect("192.0.2.1")
        await one.settle()
        assert redis_server.command("ZCARD", conn_key("192.0.2.1")) == "6"
        assert (await two.connect("192.0.2.1", UNIT)).connections == 7
        assert await one.mail("192.0.2.1", UNIT) == 1
        assert await two.mail("192.0.2.1", UNIT) == 2
        assert await two.rcpt("192.0.2.1", UNIT) == 1
        # excepted clients and the DATA budget stay with the instance
        assert (await one.connect(None, UNIT)).connections == 0
        one.disconnect(None)
        assert await one.reserve(100, 150) == (True, 100)
        assert (await two.reserve(100, 150)).granted
        one.release(100)


async def test_redis_away_counts_locally_then_shared_again(redis_server: RedisServer) -> None:
    async with instance(redis_server) as one, instance(redis_server) as two:
        await one.connect("192.0.2.1", UNIT)
        await two.connect("192.0.2.1", UNIT)
        redis_server.kill()
        counts = [await one.connect("192.0.2.1", UNIT) for _ in range(2)]
        assert [c.connections for c in counts] == [2, 3]  # the instance's own counts
        assert one.fallbacks == 2
        assert await two.mail("192.0.2.1", UNIT) == 1
        redis_server.start()  # empty: every open connection must be counted again

        async def recounted() -> bool:
            return redis_server.command("ZCARD", conn_key("192.0.2.1")) == "4"

        await eventually(recounted, "the instances to renew their connections")
        assert (await two.connect("192.0.2.1", UNIT)).connections == 5
        assert two.fallbacks == 1


async def test_a_crashed_instance_stops_counting_after_its_lease(
    redis_server: RedisServer,
) -> None:
    async with instance(redis_server, lease=0.6) as survivor:
        crashed = SharedAnvil(RedisStore(redis_server.url), LocalAnvil(), 0.6, "crashed")
        crashed.start()
        for _ in range(3):
            await crashed.connect("192.0.2.1", UNIT)
        await survivor.connect("192.0.2.1", UNIT)
        assert redis_server.command("ZCARD", conn_key("192.0.2.1")) == "4"
        assert crashed._renewer is not None
        crashed._renewer.cancel()  # it dies: no renewal, no disconnect

        async def only_the_survivor() -> bool:
            count = (await survivor.connect("192.0.2.1", UNIT)).connections
            survivor.disconnect("192.0.2.1")
            return count == 2

        await eventually(only_the_survivor, "the crashed instance's leases to end")
        await survivor.settle()
        # the survivor's connection outlived several leases: renewed
        members = redis_server.command("ZRANGE", conn_key("192.0.2.1"), "0", "-1").split()
        assert len(members) == 1 and members[0].startswith(survivor.instance)
        await crashed.store.close()


async def test_connections_that_end_while_redis_is_away_are_removed_after(
    redis_server: RedisServer,
) -> None:
    """A Redis cut off (stalled), not restarted: it still holds the connections that
    ended meanwhile; they are removed when it answers again, not a lease later."""
    async with instance(redis_server) as one:
        for _ in range(3):
            await one.connect("192.0.2.1", UNIT)
        assert redis_server.command("ZCARD", conn_key("192.0.2.1")) == "3"
        redis_server.freeze()
        try:
            assert (await one.connect("192.0.2.1", UNIT)).connections == 4  # local
            for _ in range(3):
                one.disconnect("192.0.2.1")
            await one.settle()
        finally:
            redis_server.thaw()

        async def one_left() -> bool:
            return redis_server.command("ZCARD", conn_key("192.0.2.1")) == "1"

        await eventually(one_left, "the ended connections to be removed")
        assert (await one.connect("192.0.2.1", UNIT)).connections == 2
