"""What counting for Prometheus costs per SMTP session (smtpgate_metrics_listen).

    .venv/bin/python bench/metrics_cost.py [--sessions N]

No socket, no server: it measures (1) the metric calls one session makes, alone:
with the no-op port, with smtpgate's in-memory counts (smtpgate.metrics.ServerMetrics,
what serve uses), and with prometheus_client's multiprocess values written on every
call (what smtpgate avoids); (2) the flush that writes the counts out once a second;
(3) whole sessions through the SMTP machine (as explain drives it: restrictions,
log lines, an accepting backend), with and without ServerMetrics.  Figures are the best
of several repeats, in microseconds per session.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="smtpgate-metrics-bench-")

from smtpgate.config import parse_settings
from smtpgate.generation import Generation
from smtpgate.metrics import LATENCY_BUCKETS, ServerMetrics
from smtpgate.smtp.machine import SmtpMachine
from smtpgate.smtp.ports import NO_METRICS, AcceptingBackend, LocalCounters, Metrics

MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_peername_lookup = no
relayhost = [127.0.0.1]:9
smtpd_recipient_restrictions = permit_mynetworks,
    check_sender_access inline:{{qq.com=REJECT 521}}, reject_unauth_destination
"""
RELAY = [b"EHLO c.example\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<u@bar.org>\r\n",
         b"DATA\r\n", b"Subject: x\r\n\r\nhello\r\n.\r\n", b"QUIT\r\n"]  # fmt: skip
REJECT = [b"EHLO c.example\r\n", b"MAIL FROM:<a@qq.com>\r\n", b"RCPT TO:<u@bar.org>\r\n",
          b"QUIT\r\n"]  # fmt: skip


def relay_calls(m: Metrics) -> None:
    """The calls of one relayed message (as serve makes them)."""
    m.connect()
    m.restriction("RCPT", "permit_mynetworks", "permit")  # not in this config: a typical hit
    m.queued()
    m.backend_reply("RCPT", 250, 0.0012)
    m.backend_reply("END-OF-DATA", 250, 0.0031)
    m.message(250)
    m.disconnect()


def reject_calls(m: Metrics) -> None:
    m.connect()
    m.restriction("RCPT", "check_sender_access inline:{{qq.com=REJECT 521}}", "reject")
    m.reject("RCPT", 554, False)
    m.disconnect()


class Direct:
    """prometheus_client's children, written on every call (for comparison)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        def counter(name: str, *labels: str) -> Any:
            return Counter(name, name, labels, registry=None)

        self.connects = counter("d_connects_total")
        self.disconnects = counter("d_disconnects_total")
        self.processed = counter("d_processed_total", "sasl_method").labels("")
        self.hits = counter("d_hits_total", "stage", "restriction", "result")
        self.rejects = counter("d_rejects_total", "stage", "code")
        self.noqueue = counter("d_noqueue_total", "code")
        self.messages = counter("d_messages_total", "result")
        self.replies = counter("d_replies_total", "command", "status")
        self.seconds = Histogram(
            "d_seconds", "d", ["command"], registry=None, buckets=LATENCY_BUCKETS
        )

    def connect(self) -> None:
        self.connects.inc()

    def disconnect(self) -> None:
        self.disconnects.inc()

    def queued(self) -> None:
        self.processed.inc()

    def restriction(self, stage: str, restriction: str, result: str) -> None:
        self.hits.labels(stage, restriction, result).inc()

    def reject(self, where: str, code: int, queued: bool) -> None:
        self.rejects.labels(where, str(code)).inc()
        self.noqueue.labels(str(code)).inc()

    def message(self, code: int) -> None:
        self.messages.labels("accepted").inc()

    def backend_reply(self, command: str, code: int, seconds: float) -> None:
        self.replies.labels(command, "2xx").inc()
        self.seconds.labels(command).observe(seconds)


def best(run: Callable[[], None], sessions: int, repeats: int = 5) -> float:
    """Microseconds per session (CPU time), the best of ``repeats``."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return min(times) / sessions * 1e6


def calls(metrics: Any, session: Callable[[Any], None], sessions: int) -> float:
    def run() -> None:
        for _ in range(sessions):
            session(metrics)

    return best(run, sessions)


async def machine_sessions(gen: Generation, metrics: Metrics, script: list[bytes], n: int) -> None:
    counter = itertools.count()
    for _ in range(n):
        machine = SmtpMachine(
            plan=gen.plan,
            config=gen.config,
            backend=AcceptingBackend(),
            anvil=LocalCounters(),
            log=_Sink(),
            address="192.0.2.1",
            port=4321,
            queue_ids=lambda: f"{next(counter):010X}",
            known_client=None,
            metrics=metrics,
        )
        await machine.open()
        machine.greet()
        for write in script:
            machine.receive(write)
            await machine.advance()
        await machine.close()


class _Sink:
    def info(self, text: str) -> None:
        pass

    def warning(self, text: str) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20000)
    n = parser.parse_args().sessions
    ours = ServerMetrics()
    direct = Direct()
    print(f"metric calls of one session, microseconds per session ({n} sessions, best of 5)")
    print(f"{'session':<22} {'no-op port':>10} {'smtpgate':>10} {'every call written':>20}")
    for name, session in (("relay 1 message", relay_calls), ("reject at RCPT", reject_calls)):
        base = calls(NO_METRICS, session, n)
        mine = calls(ours, session, n)
        theirs = calls(direct, session, n)
        print(f"{name:<22} {base:>10.2f} {mine:>10.2f} {theirs:>20.2f}")
    ours.flush()
    for _ in range(100):
        relay_calls(ours)
        reject_calls(ours)
    start = time.perf_counter()
    ours.flush()
    print(f"one flush after a second of traffic (every series changed): "
          f"{(time.perf_counter() - start) * 1e6:.0f} us, once a second per worker")  # fmt: skip

    settings, _ = parse_settings(MAIN_CF, "/nonexistent/main.cf", (), hostname="mx.example.org")
    gen = Generation.from_settings(settings)
    m = max(n // 10, 200)
    print(f"\nthe same sessions through the SMTP machine, no socket, no metrics ({m} sessions,")
    print("best of 7, CPU time): what the calls above add to, before any socket I/O")
    for name, script, session in (
        ("relay 1 message", RELAY, relay_calls),
        ("reject at RCPT", REJECT, reject_calls),
    ):
        loop = asyncio.new_event_loop()
        try:
            run = lambda: loop.run_until_complete(machine_sessions(gen, NO_METRICS, script, m))  # noqa: E731, B023
            machine = best(run, m, repeats=7)
        finally:
            loop.close()
        extra = calls(ours, session, n) - calls(NO_METRICS, session, n)
        print(f"{name:<22} machine {machine:8.1f} us   metric calls {extra:5.2f} us "
              f"({extra / machine * 100:.1f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
