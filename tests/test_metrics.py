"""smtpgate.metrics without a server: the counts kept in memory are what prometheus_client
would have counted, flushing twice counts nothing twice, labels from outside are bounded,
and the HTTP listener answers what it should to a bad request.

(The deployed server, its workers and /metrics are tested in tests/serve/test_metrics.py.)
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from prometheus_client import Histogram

from smtpgate.metrics import LATENCY_BUCKETS, HealthEndpoint, ServerMetrics


def _samples(metric: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metric.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_a_flushed_histogram_is_the_one_prometheus_client_would_have(tmp_path: Path) -> None:
    metrics = ServerMetrics(str(tmp_path))
    direct = Histogram("x_seconds", "x", ["command"], registry=None, buckets=LATENCY_BUCKETS)
    latencies = [0.001, 0.005, 0.0051, 0.3, 2.5, 7.0, 61.0, 0.1]
    for seconds in latencies:
        metrics.backend_reply("RCPT", 250, seconds)
        direct.labels("RCPT").observe(seconds)
    metrics.flush()
    metrics.flush()  # nothing new: nothing added
    ours = {
        (name.replace("smtpgate_backend_reply", "x"), labels): v
        for (name, labels), v in _samples(metrics._backend_seconds.metric).items()
    }
    assert ours == _samples(direct)
    metrics.backend_reply("RCPT", 250, 0.02)
    metrics.flush()
    count = _samples(metrics._backend_seconds.metric)
    assert count[("smtpgate_backend_reply_seconds_count", (("command", "RCPT"),))] == 9


def test_counters_add_up_across_flushes(tmp_path: Path) -> None:
    metrics = ServerMetrics(str(tmp_path))
    for _ in range(3):
        metrics.reject("RCPT", 554, False)
    metrics.reject("RCPT", 450, True)  # a recipient after one that passed: not NOQUEUE
    metrics.flush()
    metrics.reject("MAIL", 554, False)
    metrics.flush()
    noqueue = _samples(metrics._noqueue.metric)
    assert noqueue == {("postfix_smtpd_messages_rejected_total", (("code", "554"),)): 3.0}
    rejects = _samples(metrics._rejects.metric)
    assert rejects[("smtpgate_smtpd_rejects_total", (("code", "554"), ("stage", "RCPT")))] == 3
    assert rejects[("smtpgate_smtpd_rejects_total", (("code", "450"), ("stage", "RCPT")))] == 1
    assert rejects[("smtpgate_smtpd_rejects_total", (("code", "554"), ("stage", "MAIL")))] == 1


def test_labels_from_outside_are_bounded(tmp_path: Path) -> None:
    metrics = ServerMetrics(str(tmp_path))
    for action in ("DUNNO", "450", "random-word-1", "random-word-2", "error", "4500"):
        metrics.policy_reply("inet:127.0.0.1:9998", action, 0.01)
    metrics.milter_verdict("RCPT", "something-new")
    metrics.flush()
    actions = {
        dict(labels)["action"]: value
        for (name, labels), value in _samples(metrics._policy.metric).items()
    }
    assert actions == {"DUNNO": 1, "450": 1, "other": 3, "error": 1}
    verdicts = _samples(metrics._milter_verdicts.metric)
    assert list(verdicts.values()) == [1] and "other" in str(verdicts)


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_the_listener_answers_bad_requests(tmp_path: Path) -> None:
    async def ready() -> tuple[bool, str]:
        return False, "not ready: testing"

    endpoint = HealthEndpoint(ServerMetrics(str(tmp_path)), ready)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await endpoint.start(sock)
    try:
        assert (await _ask(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        assert (await _ask(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        answer = await _ask(port, b"GET /readyz?verbose HTTP/1.0\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(
            b"\r\n\r\nnot ready: testing\n"
        )
        head = await _ask(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        many = b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n"
        assert (await _ask(port, many)).startswith(b"HTTP/1.1 400 ")
    finally:
        endpoint.close()
