"""smtpgate_metrics_listen: /metrics, /healthz and /readyz of a deployed serve.

Sessions go through `smtpgate serve` as deployed (a supervisor, two workers that drop
their privileges); /metrics is parsed with prometheus_client's own parser and the counts
are those of what happened, whichever worker served which session.  A reload replaces
every worker: the counts stay.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.serve.backend import RecordingBackend
from tests.serve.conftest import (
    LOG_DEADLINE,
    SEED_MAIN_CF,
    SEED_TABLES,
    DeployedGate,
    Gate,
    running_gate,
)

METRICS_AT = re.compile(r"metrics and health checks on http://127\.0\.0\.1:(\d+)/")
METRICS_ON = ("smtpgate_metrics_listen = 127.0.0.1:0",)


async def http_get(port: int, path: str) -> tuple[int, str]:
    """One GET on 127.0.0.1: (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode()


async def metrics_port(gate: Gate) -> int:
    log = await gate.wait_log("metrics and health checks on http://")
    match = METRICS_AT.search(log)
    assert match, log
    return int(match.group(1))


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a /metrics answer: (name, sorted labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape_until(port: int, name: str, expected: float, **labels: str) -> Samples:
    """/metrics once ``name{labels}`` reached ``expected`` (the workers write their
    counts out once a second); fails after LOG_DEADLINE."""
    end = time.monotonic() + LOG_DEADLINE
    while True:
        status, body = await http_get(port, "/metrics")
        assert status == 200, body
        found = samples(body)
        if value(found, name, **labels) == expected:
            return found
        if time.monotonic() > end:
            raise AssertionError(f"{name}{labels} != {expected} within {LOG_DEADLINE}s:\n{body}")
        await asyncio.sleep(0.1)  # poll interval of a bounded wait for a condition


async def dialogue(gate: Gate, *lines: str, quit: bool = True) -> list[list[str]]:
    client = await gate.connect()
    replies = [await client.cmd(line) for line in lines]
    if quit:
        replies.append(await client.cmd("QUIT"))
    await client.close()
    return replies


async def send_the_sessions(gate: Gate) -> None:
    """One refused recipient, one message relayed, one client that drops the line."""
    refused = await dialogue(
        gate, "EHLO client.example", "MAIL FROM:<a@qq.com>", "RCPT TO:<foo@bar.org>"
    )
    assert refused[-2][0].startswith("554 5.7.1 "), refused
    relayed = await dialogue(
        gate,
        "EHLO client.example",
        "MAIL FROM:<a@example.com>",
        "RCPT TO:<foo@bar.org>",
        "DATA",
        "Subject: hi\r\n\r\nhello\r\n.",
    )
    assert relayed[-2][0].startswith("250 "), relayed
    await dialogue(gate, "EHLO client.example", quit=False)  # lost after EHLO


def expect_counts(found: Samples, tables: Path) -> None:
    sender_access = f"check_sender_access hash:{tables}/restricted_senders"
    expected: list[tuple[str, Mapping[str, str], float]] = [
        ("postfix_smtpd_connects_total", {}, 3),
        ("postfix_smtpd_disconnects_total", {}, 3),
        ("postfix_smtpd_messages_rejected_total", {"code": "554"}, 1),
        ("postfix_smtpd_messages_processed_total", {"sasl_method": ""}, 1),
        ("postfix_smtpd_connections_lost_total", {"after_stage": "EHLO"}, 1),
        ("smtpgate_smtpd_rejects_total", {"stage": "RCPT", "code": "554"}, 1),
        (
            "smtpgate_restriction_hits_total",
            {"stage": "RCPT", "restriction": sender_access, "result": "reject"},
            1,
        ),
        (
            "smtpgate_restriction_hits_total",
            {"stage": "RCPT", "restriction": "permit", "result": "permit"},
            1,
        ),
        ("smtpgate_smtpd_messages_total", {"result": "accepted"}, 1),
        ("smtpgate_backend_replies_total", {"command": "RCPT", "status": "2xx"}, 1),
        ("smtpgate_backend_replies_total", {"command": "END-OF-DATA", "status": "2xx"}, 1),
        ("smtpgate_backend_reply_seconds_count", {"command": "RCPT"}, 1),
        ("smtpgate_backend_reply_seconds_count", {"command": "END-OF-DATA"}, 1),
        ("smtpgate_backend_connections_total", {"result": "ok"}, 1),
        ("smtpgate_smtpd_sessions", {}, 0),
    ]
    wrong = [
        f"{name}{dict(labels)} = {value(found, name, **labels)}, expected {count}"
        for name, labels, count in expected
        if value(found, name, **labels) != count
    ]
    assert not wrong, "\n".join(wrong)
    latency = value(found, "smtpgate_backend_reply_seconds_sum", command="END-OF-DATA")
    assert 0 < latency < 10


async def test_metrics_count_what_happened(tmp_path: Path, backend: RecordingBackend) -> None:
    async with running_gate(
        tmp_path, SEED_MAIN_CF, backend, SEED_TABLES, overrides=METRICS_ON
    ) as gate:
        port = await metrics_port(gate)
        await send_the_sessions(gate)
        found = await scrape_until(port, "postfix_smtpd_disconnects_total", 3)
        expect_counts(found, tmp_path)
        assert value(found, "smtpgate_config_generation") == 1
        assert value(found, "smtpgate_config_last_reload_successful") == 1
        assert len(backend.messages) == 1


async def test_counts_survive_a_reload(tmp_path: Path, backend: RecordingBackend) -> None:
    """A reload replaces every worker (a generation swap): what the old ones counted
    stays, and the new ones add to it."""
    async with running_gate(
        tmp_path, SEED_MAIN_CF, backend, SEED_TABLES, overrides=METRICS_ON
    ) as gate:
        port = await metrics_port(gate)
        await send_the_sessions(gate)
        await scrape_until(port, "postfix_smtpd_disconnects_total", 3)
        assert isinstance(gate, DeployedGate)
        before = gate.log.count("metrics and health checks on")
        os.kill(gate.proc.pid, signal.SIGHUP)
        await gate.wait_log("reloaded ")
        end = time.monotonic() + LOG_DEADLINE
        while gate.log.count("metrics and health checks on") == before:
            assert time.monotonic() < end, gate.log
            await asyncio.sleep(0.05)  # poll interval of a bounded wait for a condition
        port = await metrics_port(gate)
        found = await scrape_until(port, "smtpgate_config_generation", 2)
        assert value(found, "postfix_smtpd_connects_total") == 3
        assert value(found, "smtpgate_config_reloads_total", result="ok") == 1
        await dialogue(gate, "EHLO client.example", "MAIL FROM:<a@qq.com>", "RCPT TO:<foo@bar.org>")
        found = await scrape_until(port, "postfix_smtpd_disconnects_total", 4)
        assert value(found, "postfix_smtpd_messages_rejected_total", code="554") == 2
        assert value(found, "smtpgate_smtpd_sessions") == 0


async def test_health_and_readiness(tmp_path: Path, backend: RecordingBackend) -> None:
    overrides = (*METRICS_ON, "smtpgate_readyz_backend_age = 0")
    async with running_gate(tmp_path, SEED_MAIN_CF, backend, overrides=overrides) as gate:
        port = await metrics_port(gate)
        assert await http_get(port, "/healthz") == (200, "ok\n")
        status, body = await http_get(port, "/readyz")
        assert status == 200, body
        assert (await http_get(port, "/nothing"))[0] == 404
        await backend.__aexit__(None, None, None)  # the backend goes away
        status, body = await http_get(port, "/readyz")
        assert status == 503, body
        assert body.startswith(f"not ready: relayhost {backend.relayhost} is not reachable")
        assert (await http_get(port, "/healthz"))[0] == 200
        found = samples((await http_get(port, "/metrics"))[1])
        assert value(found, "smtpgate_backend_last_failure_timestamp_seconds") > value(
            found, "smtpgate_backend_last_success_timestamp_seconds"
        )


async def test_not_ready_with_a_dead_backend(tmp_path: Path) -> None:
    async with RecordingBackend(down=True) as dead:
        async with running_gate(tmp_path, SEED_MAIN_CF, dead, overrides=METRICS_ON) as gate:
            port = await metrics_port(gate)
            status, body = await http_get(port, "/readyz")
            assert status == 503, body
            assert "Connection refused" in body
            assert (await http_get(port, "/healthz"))[0] == 200


async def test_ready_with_a_live_backend_it_has_not_used(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    """The start-up probe of relayhost counts as the backend answering."""
    async with running_gate(tmp_path, SEED_MAIN_CF, backend, overrides=METRICS_ON) as gate:
        port = await metrics_port(gate)
        status, body = await http_get(port, "/readyz")
        assert (status, body.split(":")[0]) == (200, "ready"), body


async def test_tls_sessions_are_counted_as_postfix_exporter_counts_them(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    from tests.serve.test_tls import inbound_tls, upgrade

    async with running_gate(tmp_path, inbound_tls("may"), backend, overrides=METRICS_ON) as gate:
        port = await metrics_port(gate)
        client = await gate.connect()
        await client.cmd("EHLO client.example")
        await upgrade(client)
        cipher = client.writer.get_extra_info("cipher")  # (name, protocol, secret bits)
        assert (await client.cmd("QUIT"))[0].startswith("221")
        await client.close()
        found = await scrape_until(port, "postfix_smtpd_disconnects_total", 1)
        tls = {
            labels: count
            for (name, labels), count in found.items()
            if name == "postfix_smtpd_tls_connections_total"
        }
        assert len(tls) == 1 and list(tls.values()) == [1], tls
        labels = dict(next(iter(tls)))
        assert labels["trust"] == "Anonymous"
        assert (labels["cipher"], labels["protocol"], labels["secret_bits"]) == (
            cipher[0],
            cipher[1],
            str(cipher[2]),
        )
        assert labels["algorithm_bits"].isdigit()
