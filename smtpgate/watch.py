"""The live view (``smtpgate_watch``; docs/metrics.md, "Live view").

Theory of operation:

1. **A row per session, built beside the machine.**  When someone watches, a new
   session gets a :class:`SessionWatch`: it is the machine's
   :class:`~smtpgate.smtp.ports.Observer` (commands and replies), wraps its
   :class:`~smtpgate.smtp.ports.Metrics` port (restriction hits, milter verdicts, refusals;
   every call is passed on) and its backend (the backend's replies and how long they
   took).  The machine is not changed.  After every reply the row is sent, whole (a few
   hundred bytes; recipients and rule hits are capped).
2. **One datagram socket pair for all workers.**  The supervisor makes a
   ``socketpair(AF_UNIX, SOCK_DGRAM)`` and a one-byte shared memory flag before it forks
   (:class:`WatchChannel`); every worker inherits both.  A worker sends rows on one end
   without blocking; the first worker (slot 0), which answers HTTP, reads the other end
   while at least one page is open.  The kernel's socket buffer bounds the memory: when it
   is full (nobody reads, or the reader is slow) a row is dropped, never waited for.
3. **Nothing when nobody watches.**  The flag counts the open pages (slot 0 adds one per
   page, takes it off when the page goes); a new session reads that byte once and, when
   it is 0, gets the plain ports: no row, no datagram.  Sessions that began before the
   page opened are not shown.
4. **Slow watchers lose rows, not memory.**  Each page has a queue of at most
   :data:`QUEUE_ROWS` rows; when it is full, rows for that page are dropped until it
   catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import ipaddress
import itertools
import json
import mmap
import os
import socket
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from smtpgate.metrics import HealthEndpoint, Readiness, ServerMetrics
from smtpgate.policy.model import Decision, TlsInfo
from smtpgate.reply import Reply
from smtpgate.smtp.ports import Backend, BackendTransaction, Metrics

QUEUE_ROWS = 1000
"""Rows waiting for one page at most (then that page loses rows)."""
RECENT_ROWS = 200
"""Rows a page that opens is shown first (those slot 0 relayed to earlier pages)."""
MAX_RECIPIENTS = 20
MAX_HITS = 20
MAX_TEXT = 200
DATAGRAM_LIMIT = 16384
KEEPALIVE = 15.0
"""Seconds between two comment lines on an idle stream (proxies close silent ones)."""


def _cut(text: str | None) -> str:
    if text is None:
        return ""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _reply_text(reply: Reply) -> str:
    parts = [str(reply.code)]
    if reply.dsn:
        parts.append(reply.dsn)
    parts.append(reply.text.splitlines()[0] if reply.text else "")
    return _cut(" ".join(p for p in parts if p))


# -- the channel (made by the supervisor before the fork) ------------------------------


class WatchChannel:
    """The datagram socket pair and the "someone watches" flag shared by all workers."""

    def __init__(self) -> None:
        self.flag = mmap.mmap(-1, 1)  # anonymous and shared: the workers see one byte
        self.sender, self.receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sender.setblocking(False)
        self.receiver.setblocking(False)
        self.dropped = 0

    @property
    def watched(self) -> bool:
        return self.flag[0] != 0

    def set_watched(self, on: bool) -> None:
        """A page opened (or closed) in a slot 0.  The byte counts them (at most 255), so
        that during a reload the old slot 0 closing its pages does not hide the new
        one's; only slot 0 workers change it, each on its own event loop."""
        count = self.flag[0]
        self.flag[0] = min(count + 1, 255) if on else max(count - 1, 0)

    def send(self, row: dict[str, Any]) -> None:
        """Hand a row to slot 0; never blocks (a full buffer drops the row)."""
        data = json.dumps(row, separators=(",", ":")).encode()
        if len(data) > DATAGRAM_LIMIT:
            self.dropped += 1
            return
        try:
            self.sender.send(data)
        except OSError:  # BlockingIOError: the buffer is full
            self.dropped += 1

    def receive(self, limit: int = 256) -> list[dict[str, Any]]:
        """The rows waiting (at most ``limit``), in the order sent; bad ones skipped."""
        out = []
        for _ in range(limit):
            try:
                data = self.receiver.recv(DATAGRAM_LIMIT + 1)
            except OSError:
                break
            with contextlib.suppress(ValueError):
                row = json.loads(data)
                if isinstance(row, dict):
                    out.append(row)
        return out

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()
        self.flag.close()


# -- one session's row (in every worker) -----------------------------------------------

_ids = itertools.count(1)

_RESULT = {2: "accepted", 4: "deferred", 5: "rejected"}


class SessionWatch:
    """A session's row: the machine's Observer and Metrics port (passed on to ``inner``),
    and a wrapper of its backend (:meth:`backend`).  See the module docstring, rule 1."""

    def __init__(self, channel: WatchChannel, inner: Metrics, address: str, port: int | None):
        self.channel = channel
        self.inner = inner
        self.started = time.time()
        self._clock = time.monotonic
        self._t0 = self._clock()
        self.row: dict[str, Any] = {
            "id": f"{os.getpid()}-{next(_ids)}",
            "pid": os.getpid(),
            "start": round(self.started, 3),
            "client": f"unknown[{address}]" + (f":{port}" if port else ""),
            "helo": "",
            "sender": "",
            "recipients": [],
            "more_recipients": 0,
            "hits": [],
            "milters": [],
            "backend": [],
            "decided": "",
            "reply": "",
            "messages": [],
            "outcome": "open",
            "ms": 0,
            "done": False,
        }
        self._command = ""  # the command the next reply answers ("" : none, e.g. greeting)
        self._in_data = False  # 354 was sent: the next reply is the message's
        self._rejected = 0  # 5xx refusals by the restrictions, milters or backend
        self._deferred = 0
        self._discarded = False
        self._decided_against = False  # "decided" names a refusal: a permit does not hide it
        self._machine: Any = None

    def attach(self, machine: Any) -> None:
        """The session's machine (for the client's name once it is looked up)."""
        self._machine = machine

    def _ms(self) -> float:
        return round((self._clock() - self._t0) * 1000, 1)

    def _send(self) -> None:
        row = self.row
        machine = self._machine
        if machine is not None:
            with contextlib.suppress(Exception):
                row["client"] = _cut(machine.namaddr)
        row["ms"] = self._ms()
        row["outcome"] = self._outcome()
        self.channel.send(row)

    def _outcome(self) -> str:
        results = [m["result"] for m in self.row["messages"]]
        if "accepted" in results:
            return "accepted"
        if self._discarded or "discarded" in results:
            return "discarded"
        if self._rejected or "rejected" in results:
            return "rejected"
        if self._deferred or "deferred" in results:
            return "deferred"
        return "done" if self.row["done"] else "open"

    # -- Observer ---------------------------------------------------------------------

    def command(self, line: str) -> None:
        self._command = line
        verb = line.split(None, 1)[0].upper() if line.strip() else ""
        if verb in ("HELO", "EHLO"):
            self.row["helo"] = _cut(line[5:].strip())

    def decision(self, decision: Decision) -> None:
        pass

    def reply(self, reply: Reply) -> None:
        row, line = self.row, self._command
        self._command = ""
        text = _reply_text(reply)
        upper = line[:10].upper()
        if not upper.startswith("QUIT"):
            row["reply"] = text  # the last that said something (not QUIT's Bye)
        if self._in_data or upper.startswith("BDAT") and "LAST" in line.upper():
            self._in_data = False
            if reply.code != 354:
                result = _RESULT.get(reply.code // 100, "rejected")
                if result == "accepted" and self._discarded:
                    result = "discarded"
                row["messages"].append({"result": result, "reply": text, "ms": self._ms()})
        elif upper.startswith("MAIL"):
            if reply.code // 100 == 2:
                row["sender"] = _cut(_address(line[5:]))
            self._count(reply)
        elif upper.startswith("RCPT"):
            if len(row["recipients"]) < MAX_RECIPIENTS:
                row["recipients"].append({"address": _cut(_address(line[3:])), "reply": text})
            else:
                row["more_recipients"] += 1
            self._count(reply)
        elif upper.startswith("DATA"):
            if reply.code == 354:
                self._in_data = True
            else:
                self._count(reply)
        elif not line and reply.code >= 400 and not row["helo"]:
            self._count(reply)  # the greeting: a refused connection
        self._send()

    def _count(self, reply: Reply) -> None:
        if reply.code >= 500:
            self._rejected += 1
        elif reply.code >= 400:
            self._deferred += 1

    # -- Metrics (each call passed on) ------------------------------------------------

    def connect(self) -> None:
        self.inner.connect()

    def disconnect(self) -> None:
        self.inner.disconnect()
        self.row["done"] = True
        self._send()

    def lost(self, where: str) -> None:
        self.inner.lost(where)

    def reject(self, where: str, code: int, queued: bool) -> None:
        self.inner.reject(where, code, queued)

    def queued(self) -> None:
        self.inner.queued()

    def message(self, code: int) -> None:
        self.inner.message(code)

    def tls(self, info: TlsInfo | None) -> None:
        self.inner.tls(info)

    def refused(self, limit: str) -> None:
        self.inner.refused(limit)
        self.row["decided"] = f"limit {limit}"
        self._decided_against = True

    def restriction(self, stage: str, restriction: str, result: str) -> None:
        self.inner.restriction(stage, restriction, result)
        hits = self.row["hits"]
        if len(hits) < MAX_HITS:
            hits.append({"stage": stage, "rule": _cut(restriction), "result": result})
        if result != "permit" or not self._decided_against:
            self.row["decided"] = _cut(f"{restriction} ({stage} {result})")
            self._decided_against = result != "permit"

    def milter_verdict(self, where: str, action: str) -> None:
        self.inner.milter_verdict(where, action)
        if action != "continue":
            milters = self.row["milters"]
            if len(milters) < MAX_HITS:
                milters.append({"stage": where, "action": action})
            self.row["decided"] = f"milter {action} ({where})"
            self._decided_against = True
            if action == "discard":
                self._discarded = True

    def milter_reply(self, milter: str, event: str, seconds: float) -> None:
        self.inner.milter_reply(milter, event, seconds)

    def policy_reply(self, service: str, action: str, seconds: float) -> None:
        self.inner.policy_reply(service, action, seconds)

    def backend_connect(self, ok: bool, seconds: float) -> None:
        self.inner.backend_connect(ok, seconds)

    def backend_reply(self, command: str, code: int, seconds: float) -> None:
        self.inner.backend_reply(command, code, seconds)

    def backend_error(self, command: str) -> None:
        self.inner.backend_error(command)

    # -- the backend ------------------------------------------------------------------

    def backend(self, backend: Backend) -> Backend:
        return _WatchedBackend(backend, self)

    def backend_answer(self, command: str, reply: Reply, seconds: float) -> None:
        answers = self.row["backend"]
        if len(answers) < MAX_HITS:
            answers.append(
                {"command": command, "reply": _reply_text(reply), "ms": round(seconds * 1000, 1)}
            )


def _address(arg: str) -> str:
    """The address of ``FROM:<a> PARAMS`` or ``TO:<a>``."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        return rest[1:].split(">", 1)[0] or "<>"
    return rest.split(None, 1)[0] if rest else ""


class _WatchedBackend:
    def __init__(self, inner: Backend, watch: SessionWatch) -> None:
        self.inner, self.watch = inner, watch

    async def begin(
        self,
        client: Any,
        sender: str,
        mail_params: Sequence[str],
        *,
        filter: str | None = None,
        hold: bool = False,
    ) -> BackendTransaction:
        txn = await self.inner.begin(client, sender, mail_params, filter=filter, hold=hold)
        return _WatchedTransaction(txn, self.watch)

    def holds_elsewhere(self) -> bool:
        return self.inner.holds_elsewhere()


class _WatchedTransaction:
    def __init__(self, inner: BackendTransaction, watch: SessionWatch) -> None:
        self.inner, self.watch = inner, watch

    @property
    def backend_peer(self) -> str:
        return self.inner.backend_peer

    @property
    def outcome_unknown(self) -> bool:
        return self.inner.outcome_unknown

    async def rcpt(self, recipient: str, params: Sequence[str] = ()) -> Reply:
        started = time.monotonic()
        reply = await self.inner.rcpt(recipient, params)
        self.watch.backend_answer("RCPT", reply, time.monotonic() - started)
        return reply

    def start_data(self) -> None:
        self.inner.start_data()

    async def data(self, message: bytes | Iterable[bytes]) -> Reply:
        started = time.monotonic()
        reply = await self.inner.data(message)
        self.watch.backend_answer("END-OF-DATA", reply, time.monotonic() - started)
        return reply

    async def abort(self) -> None:
        await self.inner.abort()


# -- slot 0: the page and the stream ------------------------------------------------


def page() -> bytes:
    """The page (one HTML file, its script and style inline)."""
    return importlib.resources.files("smtpgate").joinpath("watch.html").read_bytes()


def loopback(peer: Any) -> bool:
    """Whether an HTTP client's address (``peername``) is a loopback address."""
    if isinstance(peer, tuple) and peer:
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            return address.is_loopback
        return False
    return isinstance(peer, str)  # a unix socket: local


class Watchers:
    """Slot 0's open pages: reads the channel while there is one, fans rows out."""

    def __init__(self, channel: WatchChannel) -> None:
        self.channel = channel
        self.queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ROWS)
        self._reading = False

    def open(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_ROWS)
        for row in self.recent:
            queue.put_nowait(row)
        self.queues.add(queue)
        self.channel.set_watched(True)
        if not self._reading:
            self.channel.receive(10**6)  # rows from an earlier watcher's time: stale
            asyncio.get_running_loop().add_reader(self.channel.receiver.fileno(), self._read)
            self._reading = True
        return queue

    def close(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        if queue not in self.queues:
            return
        self.queues.discard(queue)
        self.channel.set_watched(False)
        if not self.queues:
            if self._reading:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(self.channel.receiver.fileno())
                self._reading = False

    def _read(self) -> None:
        for row in self.channel.receive():
            if row.get("done"):
                self.recent.append(row)
            for queue in self.queues:
                with contextlib.suppress(asyncio.QueueFull):  # a slow page loses rows
                    queue.put_nowait(row)


class WatchEndpoint(HealthEndpoint):
    """The health endpoint plus ``/watch`` (the page) and ``/watch/events`` (the rows as
    server-sent events), for loopback clients only unless ``mode`` is ``on``."""

    def __init__(
        self, metrics: ServerMetrics, ready: Readiness, channel: WatchChannel, mode: str
    ) -> None:
        super().__init__(metrics, ready)
        self.mode = mode
        self.watchers = Watchers(channel)

    async def route(self, path: str, peer: Any) -> tuple[int, str, bytes] | None:
        if path not in ("/watch", "/watch/", "/watch/events"):
            return None
        if self.mode != "on" and not loopback(peer):
            return 403, "text/plain; charset=utf-8", b"the live view is for loopback clients\n"
        if path == "/watch/events":
            return 0, "text/event-stream", b""
        return 200, "text/html; charset=utf-8", page()

    async def stream(self, writer: asyncio.StreamWriter) -> None:
        queue = self.watchers.open()  # before "hello": a session after it is shown
        try:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-store\r\nConnection: close\r\n\r\n"
                b"retry: 2000\n\nevent: hello\ndata: {}\n\n"
            )
            await writer.drain()
            while not writer.is_closing():
                try:
                    async with asyncio.timeout(KEEPALIVE):
                        row = await queue.get()
                except TimeoutError:
                    writer.write(b": idle\n\n")
                else:
                    data = json.dumps(row, separators=(",", ":"))
                    writer.write(f"event: session\ndata: {data}\n\n".encode())
                await writer.drain()
        finally:
            self.watchers.close(queue)
