"""smtpgate.verify.RelayVerifier against a real SMTP backend on 127.0.0.1: the probe on
the wire, Postfix's cache rules (expiry and refresh, on a clock the test moves), one probe
for concurrent queries, failures, and the cache shared through a real redis-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from smtpgate.config import parse_settings
from smtpgate.config.policyconf import VerifyConfig
from smtpgate.policy.ports import VerifyResult, VerifyStatus
from smtpgate.relay import Relay, relay_config
from smtpgate.shared_state import RedisStore
from smtpgate.verify import Entry, RelayVerifier, probe_sender
from tests.serve.backend import RecordingBackend
from tests.shared_state.redis_server import RedisServer
from tests.verify.conftest import USER_UNKNOWN, rcpts

CONFIG = VerifyConfig(
    sender="double-bounce@mx.example.org",
    positive_expire=100.0,
    positive_refresh=10.0,
    negative_expire=50.0,
    negative_refresh=5.0,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def verifier_for(
    backend: RecordingBackend, config: VerifyConfig = CONFIG, **kwargs: object
) -> AsyncIterator[RelayVerifier]:
    settings, _ = parse_settings(
        f"relayhost = {backend.relayhost}\nsmtpd_proxy_timeout = 2s\nsmtp_connect_timeout = 2s\n",
        "main.cf",
        hostname="mx.example.org",
    )
    relay = Relay.from_config(relay_config(settings))
    verifier = RelayVerifier(relay, config, **kwargs)  # type: ignore[arg-type]
    try:
        yield verifier
    finally:
        await verifier.close()
        await relay.close()


SAID = (
    "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <nobody@bar.org>: Recipient address rejected: "
    "User unknown in virtual mailbox table (in reply to RCPT TO command)"
)


async def test_a_probe_is_mail_rcpt_rset_and_its_answer_is_remembered(
    backend: RecordingBackend,
) -> None:
    async with verifier_for(backend, clock=Clock()) as verifier:
        result = await verifier.query("nobody@bar.org")
        assert result == VerifyResult(VerifyStatus.BOUNCE, SAID, probed=True)
        conn = backend.connections[0]
        await backend.wait_for(lambda: conn.commands[-1:] == ["RSET"])
        assert conn.commands[1:] == [
            "MAIL FROM:<double-bounce@mx.example.org>",
            "RCPT TO:<nobody@bar.org>",
            "RSET",
        ]
        for _ in range(10):
            assert await verifier.query("nobody@bar.org") == VerifyResult(VerifyStatus.BOUNCE, SAID)
        assert len(rcpts(backend)) == 1 and verifier.probes == 1
        ok = await verifier.query("alice@bar.org")
        assert ok is not None and ok.status is VerifyStatus.OK and ok.probed
        # the pooled connection is reused for the next probe
        assert len(backend.connections) == 1 and len(rcpts(backend)) == 2


async def test_concurrent_queries_share_one_probe(tmp_path: object) -> None:
    hold = asyncio.Event()
    async with RecordingBackend(
        rcpt_replies={"nobody@bar.org": USER_UNKNOWN.format("nobody@bar.org")},
        holds={"RCPT": hold},
    ) as backend:
        async with verifier_for(backend, clock=Clock()) as verifier:
            queries = [asyncio.ensure_future(verifier.query("nobody@bar.org")) for _ in range(5)]
            await backend.wait_for(lambda: "RCPT" in backend.held)
            hold.set()
            results = await asyncio.gather(*queries)
        assert {r.status for r in results if r} == {VerifyStatus.BOUNCE}
        assert len(rcpts(backend)) == 1


async def test_expiry_and_refresh(backend: RecordingBackend) -> None:
    clock = Clock()
    async with verifier_for(backend, clock=clock) as verifier:
        await verifier.query("alice@bar.org")
        clock.now += 9  # fresh
        assert (await verifier.query("alice@bar.org")).probed is False  # type: ignore[union-attr]
        assert verifier.probes == 1
        clock.now += 2  # older than positive_refresh: used, and probed again behind
        result = await verifier.query("alice@bar.org")
        assert result == VerifyResult(VerifyStatus.OK, result.text)  # type: ignore[union-attr]
        await verifier.close()  # the background probe
        assert verifier.probes == 2
        clock.now += 500  # refreshed 500s ago... but expired only after 100s: probe now
        assert (await verifier.query("alice@bar.org")).probed  # type: ignore[union-attr]
        assert verifier.probes == 3
        # negative: expires after 50s
        await verifier.query("nobody@bar.org")
        clock.now += 49
        assert (await verifier.query("nobody@bar.org")).probed is False  # type: ignore[union-attr]
        await verifier.close()  # a refresh (after 5s) ran in the background
        assert verifier.probes == 5
        clock.now += 1002  # past the probe TTL and the expiry
        assert (await verifier.query("nobody@bar.org")).probed  # type: ignore[union-attr]
    assert len(rcpts(backend, "nobody@bar.org")) == 3


async def test_without_negative_cache_every_query_probes(backend: RecordingBackend) -> None:
    async with verifier_for(backend, replace(CONFIG, negative_cache=False), clock=Clock()) as v:
        for _ in range(3):
            result = await v.query("nobody@bar.org")
            assert result is not None and result.status is VerifyStatus.BOUNCE and result.probed
        assert (await v.query("alice@bar.org")).probed  # type: ignore[union-attr]
        assert not (await v.query("alice@bar.org")).probed  # type: ignore[union-attr]
    assert len(rcpts(backend, "nobody@bar.org")) == 3


async def test_a_failed_probe_never_replaces_a_success(backend: RecordingBackend) -> None:
    clock = Clock()
    async with verifier_for(backend, clock=clock) as verifier:
        await verifier.query("alice@bar.org")
        await verifier.record("alice@bar.org", VerifyStatus.BOUNCE, "gone")
        assert (await verifier.query("alice@bar.org")).status is VerifyStatus.OK  # type: ignore[union-attr]


async def test_an_unreachable_backend_is_a_failure_and_is_not_remembered() -> None:
    async with RecordingBackend(down=True) as backend:
        async with verifier_for(backend, clock=Clock()) as verifier:
            assert await verifier.query("alice@bar.org") == VerifyResult(None, probed=True)
            assert await verifier.query("alice@bar.org") == VerifyResult(None, probed=True)
            assert verifier.probes == 2


async def test_a_refused_mail_from_is_the_probes_answer() -> None:
    async with RecordingBackend(
        replies={"MAIL": "553 5.7.1 <double-bounce@mx.example.org>: no"}
    ) as b:
        async with verifier_for(b, clock=Clock()) as verifier:
            result = await verifier.query("alice@bar.org")
    assert result is not None and result.status is VerifyStatus.BOUNCE
    assert result.text == (
        "host 127.0.0.1[127.0.0.1] said: 553 5.7.1 <double-bounce@mx.example.org>: no "
        "(in reply to MAIL FROM command)"
    )
    assert rcpts(b) == []


def test_the_probe_sender_with_a_ttl() -> None:
    # Postfix's make_verify_sender_addr: now/ttl in base 31 with safe_ultostr's digits
    # "0123456789BCDFGHJKLMNPQRSTVWXYZ...": 1.8e9/3600 = 500000 = 16*31^3 + 24*31^2 + 9*31
    # + 1 -> J S 9 1.
    config = replace(CONFIG, sender_ttl=3600.0)
    assert probe_sender(config, 1_800_000_000.0) == "double-bounceJS91@mx.example.org"
    assert probe_sender(replace(config, sender=""), 1.0) == ""
    assert probe_sender(CONFIG, 1.0) == "double-bounce@mx.example.org"


def test_entries_are_postfixs_records() -> None:
    entry = Entry(VerifyStatus.BOUNCE, 0.0, 1_800_000_000.0, "host x said: 550 a:b")
    assert entry.encode() == "2:0:1800000000:host x said: 550 a:b"
    assert Entry.decode(entry.encode()) == entry
    for bad in ("", "2:0:0:x", "9:0:1:x", "a:0:1:x", "2:0:1"):
        assert Entry.decode(bad) is None


async def test_two_verifiers_share_the_cache_through_redis(
    backend: RecordingBackend, redis_server: RedisServer
) -> None:
    one, two = RedisStore(redis_server.url), RedisStore(redis_server.url)
    try:
        async with (
            verifier_for(backend, store=one) as first,
            verifier_for(backend, store=two) as second,
        ):
            assert (await first.query("nobody@bar.org")).probed  # type: ignore[union-attr]
            for _ in range(10):
                result = await second.query("nobody@bar.org")
                assert result == VerifyResult(VerifyStatus.BOUNCE, SAID)
            raw = await one.get("verify:nobody@bar.org")
            assert raw is not None and raw.decode().endswith(":" + SAID)
            assert raw.startswith(b"2:0:")
            ttl = await one.redis.pttl("smtpgate:verify:nobody@bar.org")
            assert 0 < ttl <= 50_000  # the negative entry's life
        assert len(rcpts(backend)) == 1
    finally:
        await one.close()
        await two.close()


async def test_redis_away_falls_back_to_the_workers_memory(
    backend: RecordingBackend, redis_server: RedisServer
) -> None:
    store = RedisStore(redis_server.url)
    try:
        redis_server.kill()
        async with verifier_for(backend, store=store, clock=Clock()) as verifier:
            await verifier.query("nobody@bar.org")
            assert not (await verifier.query("nobody@bar.org")).probed  # type: ignore[union-attr]
        assert len(rcpts(backend)) == 1
    finally:
        await store.close()


async def test_an_address_that_is_not_utf8_does_not_break_the_store(
    backend: RecordingBackend, redis_server: RedisServer
) -> None:
    store = RedisStore(redis_server.url)
    try:
        async with verifier_for(backend, store=store) as verifier:
            address = "caf\udce9@bar.org"  # a byte 0xE9 alone, kept by surrogateescape
            assert (await verifier.query(address)).probed  # type: ignore[union-attr]
            assert not (await verifier.query(address)).probed  # type: ignore[union-attr]
            assert store.available and store.failures == 0
            assert await store.get("verify:caf\\xe9@bar.org") is not None
    finally:
        await store.close()
