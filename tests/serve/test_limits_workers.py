"""The limits hold for the whole server, whatever the number of workers.

Each worker here is an in-process ``Server`` on its own event loop in its own thread, with
a ``RemoteAnvil`` on one ``AnvilService``, which the test's event loop runs as the
supervisor does (a ``selectors`` selector whose keys carry zero-argument callbacks).  The
workers either share one port with SO_REUSEPORT (``bind_listeners``, as ``serve`` binds
them: the kernel picks the worker) or listen on a port each, so that a test can send
every other client to the other worker.  Counts are exact: with a limit of 5, exactly 5
of 12 connections are greeted.
"""

from __future__ import annotations

import asyncio
import io
import selectors
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from smtpgate.anvil import AnvilService, RemoteAnvil
from smtpgate.config import parse_settings
from smtpgate.config.service import ListenAddress
from smtpgate.generation import Generation
from smtpgate.logs import MailLog
from smtpgate.server import Server, bind_listeners
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient

MAIN_CF = """\
smtpd_peername_lookup = no
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
listen = 127.0.0.1:0
"""
EHLO = "EHLO client.example.net"
MAIL = "MAIL FROM:<sender@example.net>"
RCPT = "RCPT TO:<bob@bar.org>"
BOUND = 10.0


def too_many(address: str = "127.0.0.2") -> str:
    return f"421 4.7.0 mx.example.org Error: too many connections from {address}"


class Worker(threading.Thread):
    """One worker: a Server with a RemoteAnvil, on its own event loop."""

    def __init__(self, tmp_path: Path, relayhost: str, overrides: tuple[str, ...], sock, sockets):  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        text = f"{MAIN_CF}relayhost = {relayhost}\n"
        settings, _ = parse_settings(
            text, str(tmp_path / "main.cf"), overrides, hostname="mx.example.org"
        )
        self.log = io.StringIO()
        self.anvil = RemoteAnvil(sock)
        self.server = Server(
            Generation.from_settings(settings),
            MailLog("mx.example.org", stream=self.log),
            anvil=self.anvil,
        )
        self.sockets = sockets
        self.started = threading.Event()
        self.failure: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.done: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by the test
            self.failure = exc
            self.started.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.done = asyncio.Event()
        await self.server.start(self.sockets)
        self.started.set()
        await self.done.wait()
        await self.server.stop(drain_timeout=2)
        self.anvil.close()

    def stop(self) -> None:
        if self.loop is not None and self.done is not None:
            self.loop.call_soon_threadsafe(self.done.set)
        self.join(BOUND)


class Workers:
    """N workers and the anvil service the test's event loop runs."""

    def __init__(self, workers: list[Worker], service: AnvilService, ports: list[int]) -> None:
        self.workers = workers
        self.service = service
        self.ports = ports
        self.clients: list[LineClient] = []

    @property
    def log(self) -> str:
        return "".join(w.log.getvalue() for w in self.workers)

    def port(self, n: int) -> int:
        """The port of worker ``n % N`` (all the same when they share one)."""
        return self.ports[n % len(self.ports)]

    async def open(self, n: int = 0, source: str = "127.0.0.2") -> tuple[LineClient, str]:
        """A connection (to worker n's port) and the first line of its greeting."""
        client = await LineClient.connect("127.0.0.1", self.port(n), source=source)
        self.clients.append(client)
        return client, (await client.reply())[0]


@asynccontextmanager
async def running_workers(
    tmp_path: Path,
    backend: RecordingBackend,
    count: int,
    *overrides: str,
    same_port: bool = True,
) -> AsyncIterator[Workers]:
    selector = selectors.DefaultSelector()
    service = AnvilService(selector, MailLog("mx.example.org", stream=io.StringIO()))
    loop = asyncio.get_running_loop()

    def turn() -> None:  # the supervisor's loop: for key, _ in select(): key.data()
        for key, _ in selector.select(0):
            key.data()

    loop.add_reader(selector.fileno(), turn)
    address = [ListenAddress("127.0.0.1", 0)]
    if same_port:
        socket_sets = bind_listeners(address, copies=count)
    else:
        socket_sets = [bind_listeners(address)[0] for _ in range(count)]
    ports = sorted({s[0].getsockname()[1] for s in socket_sets})
    workers = [
        Worker(tmp_path, backend.relayhost, overrides, service.attach(), sockets)
        for sockets in socket_sets
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            assert await asyncio.to_thread(worker.started.wait, BOUND)
            assert worker.failure is None, worker.failure
        running = Workers(workers, service, ports)
        try:
            yield running
        finally:
            for client in running.clients:
                await client.close()
    finally:
        for worker in workers:
            await asyncio.to_thread(worker.stop)
        loop.remove_reader(selector.fileno())
        service.close()
        selector.close()
        for sockets in socket_sets:
            for sock in sockets:
                sock.close()


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll a condition of the service (this event loop runs it), within BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # poll interval of a bounded wait for a condition


@pytest.mark.parametrize("count", [1, 2, 3])
async def test_connection_count_limit(
    tmp_path: Path, backend: RecordingBackend, count: int
) -> None:
    """12 simultaneous connections from one address, a limit of 5: exactly 5 greetings."""
    async with running_workers(
        tmp_path, backend, count, "smtpd_client_connection_count_limit=5"
    ) as w:
        greetings = await asyncio.gather(*(w.open(n) for n in range(12)))
        firsts = sorted(line for _, line in greetings)
        assert firsts[:5] == ["220 mx.example.org ESMTP Postfix"] * 5
        assert firsts[5:] == [too_many()] * 7
        assert "warning: Connection concurrency limit exceeded: 6 from unknown[127.0.0.2]" in w.log
        assert w.service.anvil.clients["127.0.0.2"].connections >= 5
        # One leaves: the next one gets in, wherever it lands.
        held = [c for c, line in greetings if line.startswith("220")]
        assert await held[0].cmd("QUIT") == ["221 2.0.0 Bye"]
        await wait_until(lambda: w.service.total == 4, "the disconnects")
        _, line = await w.open(1)
        assert line.startswith("220 ")
        assert all(worker.anvil.fallbacks == 0 for worker in w.workers)


async def test_connection_count_limit_on_separate_workers(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    """Every other connection to the other worker: still exactly 5 of 12."""
    async with running_workers(
        tmp_path, backend, 2, "smtpd_client_connection_count_limit=5", same_port=False
    ) as w:
        firsts = [(await w.open(n))[1] for n in range(12)]
        assert firsts.count("220 mx.example.org ESMTP Postfix") == 5
        assert firsts[5:] == [too_many()] * 7
        for worker in w.workers:  # both workers took some
            assert "connect from unknown[127.0.0.2]" in worker.log.getvalue()


async def test_connection_rate_limit(tmp_path: Path, backend: RecordingBackend) -> None:
    async with running_workers(
        tmp_path, backend, 2, "smtpd_client_connection_rate_limit=10", same_port=False
    ) as w:
        greeted = 0
        for n in range(20):
            client, line = await w.open(n)
            if line.startswith("220 "):
                greeted += 1
                assert await client.cmd("QUIT") == ["221 2.0.0 Bye"]
            else:
                assert line == too_many()
        assert greeted == 10
        assert "warning: Connection rate limit exceeded: 11 from unknown[127.0.0.2]" in w.log


async def test_message_rate_limit(tmp_path: Path, backend: RecordingBackend) -> None:
    async with running_workers(
        tmp_path, backend, 2, "smtpd_client_message_rate_limit=5", same_port=False
    ) as w:
        answers = []
        for n in range(9):
            client, line = await w.open(n)
            assert line.startswith("220 ")
            await client.cmd(EHLO)
            answers += await client.cmd(MAIL)
            await client.cmd("QUIT")
        assert answers.count("250 2.1.0 Ok") == 5
        assert answers[5:] == ["450 4.7.1 Error: too much mail from 127.0.0.2"] * 4
        assert "warning: Message delivery request rate limit exceeded: 6 from" in w.log


async def test_global_connection_limit(tmp_path: Path, backend: RecordingBackend) -> None:
    """smtpgate_connection_limit counts the connections of every worker."""
    async with running_workers(tmp_path, backend, 2, "smtpgate_connection_limit=4") as w:
        sources = [f"127.0.0.{n}" for n in range(2, 10)]
        greetings = await asyncio.gather(*(w.open(n, s) for n, s in enumerate(sources)))
        firsts = [line for _, line in greetings]
        assert sum(line.startswith("220 ") for line in firsts) == 4
        refused = [line for line in firsts if not line.startswith("220 ")]
        assert all(
            line.startswith("421 4.7.0 mx.example.org Error: too many connections from ")
            for line in refused
        ), refused
        assert "(smtpgate_connection_limit)" in w.log
        # mynetworks (the exceptions) still get in, and count in the total.
        _, line = await w.open(0, "127.0.0.1")
        assert line.startswith("220 ")
        await wait_until(lambda: w.service.total == 5, "the refused ones to leave")


async def start_data(w: Workers, n: int) -> tuple[LineClient, str]:
    client, line = await w.open(n, f"127.0.0.{2 + n}")
    assert line.startswith("220 ")
    await client.cmd(EHLO)
    assert await client.cmd(MAIL) == ["250 2.1.0 Ok"]
    assert await client.cmd(RCPT) == ["250 2.1.5 Ok"]
    return client, (await client.cmd("DATA"))[0]


async def test_memory_budget_at_data(tmp_path: Path, backend: RecordingBackend) -> None:
    """Room for four DATA reservations (64 KiB each) among all workers: exactly four."""
    limit = 4 * 65536
    async with running_workers(
        tmp_path, backend, 2, f"smtpgate_data_memory_limit={limit}", same_port=False
    ) as w:
        started = [await start_data(w, n) for n in range(6)]
        replies = [line for _, line in started]
        assert [r[:3] for r in replies] == ["354"] * 4 + ["451"] * 2
        assert replies[4] == "451 4.3.1 Insufficient system resources"
        assert f"smtpgate_data_memory_limit reached ({limit} bytes in flight)" in w.log
        for client, _ in started[:4]:
            await client.send_raw(b"Subject: t\r\n\r\nhello\r\n.\r\n")
            assert (await client.reply())[0].startswith("250 2.0.0 Ok: queued as")
        await wait_until(lambda: w.service.budget.in_flight == 0, "the bytes to come back")
        assert w.service.budget.peak == limit
        client, _ = started[4]
        assert (await client.cmd("DATA"))[0].startswith("354")  # room again
        await client.send_raw(b"Subject: t\r\n\r\nhello\r\n.\r\n")
        assert (await client.reply())[0].startswith("250 2.0.0 Ok")


async def test_memory_budget_holds_for_big_messages(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    """Six 300 kB messages at once against a 1 MB budget: never more than 1 MB reserved
    among all workers; what does not fit is refused after the dot (451), the rest relayed.
    (Which ones fit depends on how the reads interleave: when all grow at the same pace,
    none may.)  Alone, the same message fits."""
    limit = 1_000_000
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 300
    async with running_workers(
        tmp_path, backend, 2, f"smtpgate_data_memory_limit={limit}", same_port=False
    ) as w:
        started = [await start_data(w, n) for n in range(6)]
        assert all(line.startswith("354") for _, line in started)
        for client, _ in started:
            await client.send_raw(body)
        for client, _ in started:
            await client.send_raw(b".\r\n")
        replies = [(await client.reply())[0][:3] for client, _ in started]
        assert set(replies) <= {"250", "451"} and replies.count("250") <= 3, replies
        assert len(backend.messages) == replies.count("250")
        assert 0 < w.service.budget.peak <= limit
        await wait_until(lambda: w.service.budget.in_flight == 0, "the bytes to come back")
        for client, _ in started[:2]:  # one worker each
            await client.cmd("RSET")
            await client.cmd(MAIL)
            await client.cmd(RCPT)
            assert (await client.cmd("DATA"))[0].startswith("354")
            await client.send_raw(body + b".\r\n")
            assert (await client.reply())[0].startswith("250 2.0.0 Ok: queued as")
        assert w.service.budget.peak <= limit
        assert all(worker.anvil.fallbacks == 0 for worker in w.workers)
