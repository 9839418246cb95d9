"""Prometheus metrics and health checks for ``serve`` (``smtpgate_metrics_listen``).

Theory of operation (docs/metrics.md lists every metric):

1. **One folder, every process.**  prometheus_client's multiprocess mode: each process
   writes its values to its own memory-mapped files in one folder, and whoever answers
   ``/metrics`` reads and adds up all of them.  The supervisor makes the folder as root
   before the first fork (:func:`prepare_directory`: owned by ``smtpgate_user``, emptied
   of metric files, named in ``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is
   first imported), and tells prometheus_client when a worker is gone
   (:meth:`SupervisorMetrics.worker_gone`: its live gauges go; its counters stay, so a
   restarted or retired worker loses no count).
2. **Counting costs a dictionary update.**  A counter increment in multiprocess mode
   is a pid check (a system call), a lock and a write to the map, several microseconds;
   a session makes a dozen.  :class:`ServerMetrics` (the machine's
   :class:`~smtpgate.smtp.ports.Metrics` port) adds to plain Python numbers instead,
   and :meth:`ServerMetrics.flush` writes what changed to prometheus_client's values
   once a second, before every scrape, and when the worker stops.  A worker killed
   outright loses at most the last second.
3. **Postfix's names where they mean the same.**  The ``postfix_smtpd_*`` counters are
   postfix_exporter's (kumina/postfix_exporter, ``postfix_exporter.go``), counted at the
   moments Postfix writes the log lines that exporter reads, so a dashboard made for it
   works unchanged; smtpgate's own are ``smtpgate_*``.
4. **One worker answers HTTP.**  The supervisor binds the metrics listener as root and
   hands it to the first worker (``slot 0``), which serves ``/metrics``, ``/healthz``
   and ``/readyz`` on its event loop (:class:`HealthEndpoint`); the supervisor, which
   keeps root, reads nothing from the network.  The files are read in a thread, so a
   scrape does not hold up that worker's sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import sys
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smtpgate.policy.model import TlsInfo

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_INTERVAL = 1.0
"""Seconds between two writes of a worker's counts to its metric files."""
REQUEST_TIMEOUT = 10.0
"""How long the HTTP listener waits for a request's head."""
MAX_HEADER_LINES = 100

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the latency histograms; +Inf is added."""

# Labels whose values come from outside (a policy server's action, a milter's verdict)
# are mapped to these, so that a misbehaving peer cannot grow the series without bound.
ACCESS_VERBS = frozenset(
    {
        "OK", "DUNNO", "REJECT", "DEFER", "DEFER_IF_REJECT", "DEFER_IF_PERMIT", "BCC",
        "DISCARD", "FILTER", "HOLD", "PREPEND", "REDIRECT", "WARN", "INFO", "RELAY",
    }
)  # fmt: skip
MILTER_ACTIONS = frozenset({"continue", "accept", "reject", "tempfail", "discard", "quarantine"})


# -- the folder (supervisor, as root) -------------------------------------------------


def prepare_directory(configured: str, owner: tuple[int, int] | None) -> tuple[str, bool]:
    """Make the metric files' folder and name it in ``PROMETHEUS_MULTIPROC_DIR``.

    ``configured``: smtpgate_metrics_directory (made if missing, emptied of metric
    files); empty: a new private folder under $TMPDIR.  ``owner``: (uid, gid) of the
    workers when serve runs as root.  Returns (the folder, whether it is temporary: to
    remove at the end).  Must run before prometheus_client is imported.
    """
    from smtpgate.workdirs import worker_directory

    path, temporary = worker_directory(
        "smtpgate_metrics_directory", configured, owner, "smtpgate-metrics-"
    )
    if not temporary:  # the files of an earlier run
        for name in glob.glob(os.path.join(glob.escape(path), "*.db")):
            os.unlink(name)
    os.environ[MULTIPROC_ENV] = path
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        # imported before the folder was named: choose multiprocess values now, as
        # prometheus_client itself does at import (values.get_value_class)
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    return path, temporary


def remove_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- counts kept in memory --------------------------------------------------------------


class _Counter:
    """A counter family's values per label tuple, written to prometheus_client at flush."""

    __slots__ = ("metric", "values", "flushed")

    def __init__(self, metric: Any, touch: Sequence[tuple[str, ...]] = ()) -> None:
        self.metric = metric
        self.values: dict[tuple[str, ...], float] = {}
        self.flushed: dict[tuple[str, ...], float] = {}
        for key in touch:  # the series exists (at 0) from the start
            self._child(key)
            self.values[key] = self.flushed[key] = 0.0

    def inc(self, key: tuple[str, ...]) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + 1.0

    def _child(self, key: tuple[str, ...]) -> Any:
        return self.metric.labels(*key) if key else self.metric

    def flush(self) -> None:
        flushed = self.flushed
        for key, value in self.values.items():
            done = flushed.get(key, 0.0)
            if value != done:
                self._child(key).inc(value - done)
                flushed[key] = value


class _Histogram:
    """A histogram family's bucket counts and sums per label tuple (flushed the same way).

    prometheus_client keeps a histogram's buckets uncumulated, one value each (the
    collector adds them up); a flush adds each bucket's new observations to its value.
    """

    __slots__ = ("metric", "bounds", "series", "flushed")

    def __init__(self, metric: Any, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.metric = metric
        self.bounds = (*bounds, float("inf"))
        self.series: dict[tuple[str, ...], list[float]] = {}
        self.flushed: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0.0] * (len(self.bounds) + 1)
        series[bisect_left(self.bounds, value)] += 1.0
        series[-1] += value

    def flush(self) -> None:
        for key, series in self.series.items():
            done = self.flushed.get(key)
            if done == series:
                continue
            done = done or [0.0] * len(series)
            child = self.metric.labels(*key) if key else self.metric
            for index, count in enumerate(series[:-1]):
                if count != done[index]:
                    child._buckets[index].inc(count - done[index])
            if series[-1] != done[-1]:
                child._sum.inc(series[-1] - done[-1])
            self.flushed[key] = list(series)


class _Gauge:
    """A gauge's value in memory (set or added to), written at flush when it changed."""

    __slots__ = ("metric", "value", "flushed")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.value = 0.0
        self.flushed: float | None = None

    def flush(self) -> None:
        if self.value != self.flushed:
            self.metric.set(self.value)
            self.flushed = self.value


_STATUS = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_MESSAGE_RESULT = {2: "accepted", 4: "deferred", 5: "rejected"}


class ServerMetrics:
    """A worker's counts (the :class:`~smtpgate.smtp.ports.Metrics` port); see the module
    docstring, rule 2.  Build it in the worker, after the fork."""

    def __init__(self, directory: str | None = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.directory = directory or os.environ[MULTIPROC_ENV]
        c, h = _Counter, _Histogram

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Any:
            return Counter(name, doc, labels, registry=None)

        def histogram(name: str, doc: str, labels: Sequence[str] = ()) -> Any:
            return Histogram(name, doc, labels, registry=None, buckets=LATENCY_BUCKETS)

        # postfix_exporter's names, labels and help texts
        self._connects = c(
            counter("postfix_smtpd_connects_total", "Total number of incoming connections."), [()]
        )
        self._disconnects = c(
            counter("postfix_smtpd_disconnects_total", "Total number of incoming disconnections."),
            [()],
        )
        self._lost = c(
            counter(
                "postfix_smtpd_connections_lost_total",
                "Total number of connections lost.",
                ["after_stage"],
            )
        )
        self._processed = c(
            counter(
                "postfix_smtpd_messages_processed_total",
                "Total number of messages processed.",
                ["sasl_method"],
            ),
            [("",)],
        )
        self._noqueue = c(
            counter(
                "postfix_smtpd_messages_rejected_total",
                "Total number of NOQUEUE rejects.",
                ["code"],
            )
        )
        self._tls = c(
            counter(
                "postfix_smtpd_tls_connections_total",
                "Total number of incoming TLS connections.",
                ["trust", "protocol", "cipher", "secret_bits", "algorithm_bits"],
            )
        )
        # smtpgate's own
        self._rejects = c(
            counter(
                "smtpgate_smtpd_rejects_total",
                "Commands the restrictions refused, by stage and reply code.",
                ["stage", "code"],
            )
        )
        self._messages = c(
            counter(
                "smtpgate_smtpd_messages_total",
                "Replies to the end of a message: accepted (2xx), deferred (4xx), rejected (5xx).",
                ["result"],
            ),
            [("accepted",), ("deferred",), ("rejected",)],
        )
        self._refused = c(
            counter(
                "smtpgate_anvil_refusals_total",
                "Connections and commands refused by a client or server limit.",
                ["limit"],
            )
        )
        self._hits = c(
            counter(
                "smtpgate_restriction_hits_total",
                "Restriction lists ended by a restriction, by stage, restriction and result.",
                ["stage", "restriction", "result"],
            )
        )
        self._milter_verdicts = c(
            counter(
                "smtpgate_milter_verdicts_total",
                "What the milters together decided, by stage and action.",
                ["stage", "action"],
            )
        )
        self._milter_seconds = h(
            histogram(
                "smtpgate_milter_reply_seconds",
                "How long one milter took to answer one event.",
                ["milter", "event"],
            )
        )
        self._policy = c(
            counter(
                "smtpgate_policy_replies_total",
                "Policy server answers by service and action (error: no usable answer).",
                ["service", "action"],
            )
        )
        self._policy_seconds = h(
            histogram(
                "smtpgate_policy_reply_seconds",
                "How long a policy server took to answer, retries included.",
                ["service"],
            )
        )
        self._backend_connects = c(
            counter(
                "smtpgate_backend_connections_total",
                "New backend connections opened (ok) or not (failed).",
                ["result"],
            ),
            [("ok",), ("failed",)],
        )
        self._backend_connect_seconds = h(
            histogram(
                "smtpgate_backend_connect_seconds",
                "How long opening a backend connection took (connect, greeting, EHLO, STARTTLS).",
            )
        )
        self._backend_replies = c(
            counter(
                "smtpgate_backend_replies_total",
                "Backend replies to RCPT and to the end of data, by class.",
                ["command", "status"],
            )
        )
        self._backend_seconds = h(
            histogram(
                "smtpgate_backend_reply_seconds",
                "How long the client waited for the backend: RCPT (the first with connection "
                "and MAIL), END-OF-DATA (DATA, the content and the final reply).",
                ["command"],
            )
        )
        self._backend_errors = c(
            counter(
                "smtpgate_backend_errors_total",
                "Backend faults (timeout, lost connection, bad reply) answered 451, by command.",
                ["command"],
            )
        )
        self._sessions = _Gauge(
            Gauge(
                "smtpgate_smtpd_sessions",
                "Client sessions open now.",
                registry=None,
                multiprocess_mode="livesum",
            )
        )
        self._last_ok = _Gauge(
            Gauge(
                "smtpgate_backend_last_success_timestamp_seconds",
                "When a backend connection (or a probe of relayhost) last succeeded.",
                registry=None,
                multiprocess_mode="max",
            )
        )
        self._last_failed = _Gauge(
            Gauge(
                "smtpgate_backend_last_failure_timestamp_seconds",
                "When opening a backend connection (or a probe of relayhost) last failed.",
                registry=None,
                multiprocess_mode="max",
            )
        )
        kinds = (_Counter, _Histogram, _Gauge)
        self._families = [value for value in vars(self).values() if isinstance(value, kinds)]
        self._timer: asyncio.TimerHandle | None = None
        self._algorithm_bits: dict[str, str] | None = None

    # -- the port (hot: keep these small) ------------------------------------------------

    def connect(self) -> None:
        self._connects.inc(())
        self._sessions.value += 1

    def disconnect(self) -> None:
        self._disconnects.inc(())
        self._sessions.value -= 1

    def lost(self, where: str) -> None:
        self._lost.inc((where,))

    def reject(self, where: str, code: int, queued: bool) -> None:
        self._rejects.inc((where, str(code)))
        if where == "RCPT" and not queued:
            self._noqueue.inc((str(code),))

    def queued(self) -> None:
        self._processed.inc(("",))

    def message(self, code: int) -> None:
        self._messages.inc((_MESSAGE_RESULT.get(code // 100, "rejected"),))

    def tls(self, info: TlsInfo | None) -> None:
        if info is None:
            return
        bits = str(info.keysize)
        # smtpgate asks clients for no certificate: Postfix logs such a session Anonymous
        key = ("Anonymous", info.protocol, info.cipher, bits, self._alg_bits(info.cipher, bits))
        self._tls.inc(key)

    def refused(self, limit: str) -> None:
        self._refused.inc((limit,))

    def restriction(self, stage: str, restriction: str, result: str) -> None:
        self._hits.inc((stage, restriction, result))

    def milter_verdict(self, where: str, action: str) -> None:
        self._milter_verdicts.inc((where, action if action in MILTER_ACTIONS else "other"))

    def milter_reply(self, milter: str, event: str, seconds: float) -> None:
        self._milter_seconds.observe((milter, event), seconds)

    def policy_reply(self, service: str, action: str, seconds: float) -> None:
        if action != "error" and action not in ACCESS_VERBS:
            action = action if len(action) == 3 and action.isdigit() else "other"
        self._policy.inc((service, action))
        self._policy_seconds.observe((service,), seconds)

    def backend_connect(self, ok: bool, seconds: float) -> None:
        self._backend_connects.inc(("ok",) if ok else ("failed",))
        self._backend_connect_seconds.observe((), seconds)
        self.backend_seen(ok)

    def backend_reply(self, command: str, code: int, seconds: float) -> None:
        self._backend_replies.inc((command, _STATUS.get(code // 100, "5xx")))
        self._backend_seconds.observe((command,), seconds)

    def backend_error(self, command: str) -> None:
        self._backend_errors.inc((command,))

    # -- the rest -------------------------------------------------------------------------

    def backend_seen(self, ok: bool) -> None:
        """The backend answered (or could not be reached) now: for /readyz."""
        (self._last_ok if ok else self._last_failed).value = time.time()

    def backend_times(self) -> tuple[float, float]:
        """(last success, last failure) of any worker, in seconds since the epoch (0:
        never), as flushed (reads the files: may run in a thread)."""
        from prometheus_client.multiprocess import MultiProcessCollector

        files = glob.glob(os.path.join(glob.escape(self.directory), "gauge_max_*.db"))
        found = {"ok": 0.0, "failed": 0.0}
        names = {
            "smtpgate_backend_last_success_timestamp_seconds": "ok",
            "smtpgate_backend_last_failure_timestamp_seconds": "failed",
        }
        for metric in MultiProcessCollector.merge(files, accumulate=False):  # type: ignore[no-untyped-call]
            which = names.get(metric.name)
            if which is not None and metric.samples:
                found[which] = max(sample.value for sample in metric.samples)
        return found["ok"], found["failed"]

    def _alg_bits(self, cipher: str, secret_bits: str) -> str:
        """The cipher's algorithm bits (Postfix logs ``secret/algorithm bits``)."""
        if self._algorithm_bits is None:
            import ssl

            ciphers = ssl.create_default_context().get_ciphers()
            self._algorithm_bits = {c["name"]: str(c.get("alg_bits", "")) for c in ciphers}
        return self._algorithm_bits.get(cipher) or secret_bits

    def flush(self) -> None:
        """Write what changed since the last flush to the metric files."""
        for family in self._families:
            family.flush()

    def start(self) -> None:
        """Flush every FLUSH_INTERVAL seconds from now on (in the worker's event loop)."""
        self.flush()
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.flush()
            self._timer = loop.call_later(FLUSH_INTERVAL, tick)

        self._timer = loop.call_later(FLUSH_INTERVAL, tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()

    def exposition(self) -> bytes:
        """Every process's metrics in Prometheus text format (reads the files)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


class SupervisorMetrics:
    """What the supervisor counts: configuration generations, reloads, worker deaths."""

    def __init__(self, directory: str, generation: int) -> None:
        from prometheus_client import Counter, Gauge

        self.directory = directory
        self.generation = Gauge(
            "smtpgate_config_generation",
            "The number of the configuration being served (1 at start, +1 per reload).",
            registry=None,
            multiprocess_mode="max",
        )
        self.last_ok = Gauge(
            "smtpgate_config_last_reload_successful",
            "1 when the last reload (or the start) succeeded, 0 when it failed.",
            registry=None,
            multiprocess_mode="mostrecent",
        )
        self.last_ok_time = Gauge(
            "smtpgate_config_last_reload_success_timestamp_seconds",
            "When the configuration being served was loaded.",
            registry=None,
            multiprocess_mode="max",
        )
        self.reloads = Counter(
            "smtpgate_config_reloads_total",
            "Reloads by result (failed: the running configuration was kept).",
            ["result"],
            registry=None,
        )
        self.deaths = Counter(
            "smtpgate_worker_deaths_total",
            "Worker processes that died unexpectedly (each was replaced).",
            registry=None,
        )
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        self.loaded(generation)

    def loaded(self, generation: int) -> None:
        self.generation.set(generation)
        self.last_ok.set(1)
        self.last_ok_time.set(time.time())

    def reloaded(self, generation: int | None) -> None:
        """A reload succeeded (the new generation's number) or failed (None)."""
        self.reloads.labels("ok" if generation is not None else "failed").inc()
        if generation is None:
            self.last_ok.set(0)
        else:
            self.loaded(generation)

    def worker_gone(self, pid: int, died: bool) -> None:
        """A worker was reaped: its live gauges go (its counters stay)."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]
        if died:
            self.deaths.inc()


# -- the HTTP listener (the first worker) ---------------------------------------------

Readiness = Callable[[], Awaitable[tuple[bool, str]]]
"""Whether the server is ready, and why (or why not), in a line of text."""

_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 503: "Service Unavailable"}  # fmt: skip


class HealthEndpoint:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP/1.1, one request per
    connection (Prometheus and Kubernetes probes ask nothing more)."""

    def __init__(self, metrics: ServerMetrics, ready: Readiness) -> None:
        self.metrics = metrics
        self.ready = ready
        self.server: asyncio.base_events.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_server(self._handle, sock=sock)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                status, content_type, body, head = await self._answer(reader, writer)
            if status == 0 and not head:  # a stream (route() said so): its own answer
                await self.stream(writer)
                return
            status = status or 200
            writer.write(
                (
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode("ascii")
                + (b"" if head else body)
            )
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def route(self, path: str, peer: Any) -> tuple[int, str, bytes] | None:
        """Another path's (status, content type, body), or None: not found.  Status 0:
        answer with :meth:`stream` (no time limit).  ``peer``: the client's address."""
        return None

    async def stream(self, writer: asyncio.StreamWriter) -> None:
        """Write a streamed answer (see :meth:`route`)."""

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, str, bytes, bool]:
        text = "text/plain; charset=utf-8"
        words = (await reader.readline()).decode("latin-1").split()
        for _ in range(MAX_HEADER_LINES):
            if (await reader.readline()).strip() == b"":
                break
        else:
            return 400, text, b"too many header lines\n", False
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            return 400, text, b"bad request\n", False
        method, path = words[0], words[1].split("?", 1)[0]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return 405, text, b"GET or HEAD only\n", False
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            self.metrics.flush()
            body = await asyncio.to_thread(self.metrics.exposition)
            return 200, CONTENT_TYPE_LATEST, body, head
        if path == "/healthz":
            return 200, text, b"ok\n", head
        if path == "/readyz":
            ready, why = await self.ready()
            return (200 if ready else 503), text, f"{why}\n".encode(), head
        other = await self.route(path, writer.get_extra_info("peername"))
        if other is not None:
            return *other, head
        return 404, text, b"not found (try /metrics, /healthz, /readyz)\n", head
