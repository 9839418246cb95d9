"""The site of issue 14's "done when": two `smtpgate serve` instances (workers, dropped
privileges) behind Debian's HAProxy with PROXY v2 and SMTP health checks, sharing one
redis-server, each with its metrics listener.

- the real client address reaches the restrictions and the logs;
- ``smtpd_client_connection_count_limit = 5`` admits exactly 5 of 12 simultaneous
  connections from one client, across both instances;
- HAProxy's health checks see both instances up, and count for no client;
- ``/metrics`` answers with postfix_exporter's names and counts what happened;
- when one instance dies, HAProxy takes it out and mail goes on through the other; no
  message a client was told 250 for is lost.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.postfix_instance import free_port
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import running_gate
from tests.serve.test_haproxy import (
    HAPROXY,
    both_up,
    checks_seen,
    running_haproxy,
    server_status,
    session,
)
from tests.shared_state.redis_server import RedisServer

GATE_CF = """\
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_upstream_proxy_protocol = haproxy
smtpgate_upstream_proxy_networks = 127.0.0.1/32
smtpd_client_restrictions = check_client_access cidr:$config_directory/clients
smtpd_client_connection_count_limit = 5
smtpd_client_event_limit_exceptions =
"""
TABLES = {"clients": "127.0.0.3 REJECT no thanks\n"}
CONNECTS = "postfix_smtpd_connects_total"
GREETING = "220 mx.example.org ESMTP Postfix"
TOO_MANY = "421 4.7.0 mx.example.org Error: too many connections from 127.0.0.2"


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` of one instance: sample name with labels -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


async def one_down(stats: Path, name: str) -> None:
    """Wait (bounded) until HAProxy's health checks mark *name* DOWN."""
    end = time.monotonic() + 30
    while (await server_status(stats)).get(name) != "DOWN":
        assert time.monotonic() < end, f"HAProxy did not mark {name} DOWN"
        await asyncio.sleep(0.1)  # poll interval of a bounded wait for a condition


def total(scrapes: list[dict[str, float]], name: str) -> float:
    return sum(v for s in scrapes for k, v in s.items() if k.split("{", 1)[0] == name)


@pytest.mark.skipif(not Path(HAPROXY).exists(), reason="HAProxy is not installed")
async def test_two_instances_behind_haproxy_share_one_redis(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    metrics_ports = [free_port(), free_port()]
    try:
        async with AsyncExitStack() as stack:
            gates = []
            for n, metrics_port in enumerate(metrics_ports, 1):
                folder = tmp_path / f"gate{n}"
                folder.mkdir()
                overrides = (
                    f"smtpgate_shared_state={redis.url}",
                    f"smtpgate_metrics_listen=127.0.0.1:{metrics_port}",
                )
                gates.append(
                    await stack.enter_async_context(
                        running_gate(folder, GATE_CF, backend, TABLES, overrides=overrides)
                    )
                )
            port, stats = await stack.enter_async_context(
                running_haproxy(tmp_path / "haproxy", [g.port for g in gates])
            )
            assert await both_up(stats) == {"gate1": "UP", "gate2": "UP", "BACKEND": "UP"}
            # the real client reaches the restrictions
            assert await session(port, "127.0.0.3") == [
                "554 5.7.1 <unknown[127.0.0.3]>: Client host rejected: no thanks"
            ]
            assert (await session(port, "127.0.0.2"))[0].startswith("250 2.0.0 Ok")
            # 12 at once from one client, round robin over both: 5 in all are greeted
            clients = [
                await LineClient.connect("127.0.0.1", port, source="127.0.0.2") for _ in range(12)
            ]
            firsts = sorted([(await c.reply())[0] for c in clients])
            assert firsts == [GREETING] * 5 + [TOO_MANY] * 7, firsts
            for c in clients:
                await c.close()
            logs = [await checks_seen(gate, 5) for gate in gates]
            assert await both_up(stats) == {"gate1": "UP", "gate2": "UP", "BACKEND": "UP"}
            # every worker writes its counts out once a second: wait for them (bounded)
            end = time.monotonic() + 10
            while total(scrapes := [scrape(p) for p in metrics_ports], CONNECTS) < 14:
                assert time.monotonic() < end, scrapes
                await asyncio.sleep(0.2)  # poll interval of a bounded wait for a condition
            # one instance dies: HAProxy takes it out, and mail goes on through the other;
            # every message a client was told 250 for is at the backend
            await gates[0].crash()
            await one_down(stats, "gate1")
            accepted = [await session(port, "127.0.0.2") for _ in range(4)]
            assert all(reply[0].startswith("250 2.0.0 Ok") for reply in accepted), accepted
    finally:
        redis.stop()
    both = "\n".join(logs)
    assert sum(log.count("Connection concurrency limit exceeded") for log in logs) == 7
    assert (
        "NOQUEUE: reject: RCPT from unknown[127.0.0.3]: 554 5.7.1 <unknown[127.0.0.3]>: "
        "Client host rejected: no thanks;"
    ) in both
    assert "using local counters" not in both
    # postfix_exporter's names; the health checks are no clients: 2 + 12 connections
    assert total(scrapes, CONNECTS) == 14
    assert total(scrapes, "postfix_smtpd_messages_rejected_total") == 1
    assert total(scrapes, "postfix_smtpd_messages_processed_total") == 1
    assert [m.xforward["ADDR"] for m in backend.messages] == ["127.0.0.2"] * 5
    queued = {reply[0].rsplit(" ", 1)[1] for reply in accepted}
    assert queued <= {m.queue_id for m in backend.messages}
