"""An SMTP load generator that binds each session to a chosen loopback source address.

smtp-source (the load of the classic rows) cannot choose its source address, does not
pipeline and does not time single replies. This generator does those three things:

* every session is bound to a source address from a list or a pool (all of 127/8 is local
  on Linux), so a DNS list can score clients, and a client can be kept out of mynetworks;
* ``pipeline`` sends EHLO, then MAIL + every RCPT + DATA in one write, then the message
  (as Postfix's and Exim's smtp clients do with a server that announces PIPELINING);
* for every message, the time from the write that ends with the final dot to the 250.

Modes (one session = connect, greeting, ..., QUIT):

``reject``    HELO/EHLO, MAIL, RCPT, one command at a time; the RCPT must be refused (5xx)
``relay``     EHLO, MAIL, RCPT..., DATA, message, one command at a time (``--msgs`` per session)
``pipeline``  EHLO, then MAIL+RCPT...+DATA in one write, then the message (``--msgs`` per session)
``zombie``    greeting; a 5xx greeting ends the session (postscreen's ``drop``); else EHLO,
              MAIL, RCPT: a 5xx RCPT ends it (``enforce``), else DATA and the message

Load: ``--sessions`` concurrent sessions in a closed loop (full load), or with ``--rate``
new sessions per second at most (open loop, still at most ``--sessions`` at once).
``--procs`` splits the work over several processes (each its own event loop), so that the
generator does not become the bottleneck; each reports its own CPU time.

Run by the benchmark (:func:`bench.harness.run_loadgen`): every process prints ``ready``,
waits for ``go`` on standard input, runs, and prints one JSON line with its counts, its
start and end on the monotonic clock (shared by all processes), its CPU seconds and the
latencies in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

IP_BIND_ADDRESS_NO_PORT = 24  # Linux: choose the port at connect(), not at bind()

MODES = ("reject", "relay", "pipeline", "zombie")


def pool_address(i: int) -> str:
    """The i-th address of the zombie pool: 127.100.0.1, 127.100.0.2, ... (within 127/8)."""
    n = i + 1
    return f"127.{100 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def message(size: int, sender: str, rcpt: str) -> bytes:
    """A message of about ``size`` bytes of body, CRLF lines, ending with the final dot."""
    head = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench\r\n"
        "Message-ID: <bench@client.example>\r\n\r\n"
    ).encode()
    line = b"x" * 78 + b"\r\n"
    body = line * (size // len(line)) + b"y" * (size % len(line)) + b"\r\n"
    return head + body + b".\r\n"


class Client(asyncio.Protocol):
    """One connection: complete replies are queued with the time they were complete."""

    def __init__(self) -> None:
        self.buf = b""
        self.replies: deque[tuple[int, bytes, float]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        start = 0
        done = False
        while True:
            end = buf.find(b"\r\n", start)
            if end < 0:
                break
            if end - start < 4 or buf[start + 3] != 45:  # not "NNN-": the last line
                try:
                    code = int(buf[start : start + 3])
                except ValueError:
                    code = 0
                self.replies.append((code, buf[start:end], time.perf_counter()))
                done = True
            start = end + 2
        self.buf = buf[start:]
        if done:
            self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def reply(self) -> tuple[int, bytes, float]:
        """The next reply; code 0 if the server closed the connection first."""
        while not self.replies:
            if self.closed:
                return 0, b"connection closed", time.perf_counter()
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        return self.replies.popleft()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.closed:
            self.transport.write(data)


class Session:
    """What one session saw: counted into the process's totals."""

    __slots__ = ("outcome", "latencies", "messages")

    def __init__(self) -> None:
        self.outcome = ""
        self.latencies: list[float] = []
        self.messages = 0


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.host, port = args.server.rsplit(":", 1)
        self.port = int(port)
        self.rcpts = [args.rcpt] + [
            f"{args.rcpt.split('@')[0]}{k}@{args.rcpt.split('@')[1]}" for k in range(1, args.rcpts)
        ]
        self.helo = (b"EHLO " if args.ehlo else b"HELO ") + args.helo.encode() + b"\r\n"
        self.mail = f"MAIL FROM:<{args.sender}>\r\n".encode()
        self.rcpt_lines = [f"RCPT TO:<{r}>\r\n".encode() for r in self.rcpts]
        self.content = message(args.size, args.sender, args.rcpt)
        self.sources = args.source or []
        self.counts: dict[str, int] = {}
        self.latencies: list[float] = []
        self.messages = 0
        self.next = args.first
        self.sessions = 0

    def source(self, index: int) -> str:
        if self.args.pool:
            return pool_address(index % self.args.pool)
        return self.sources[index % len(self.sources)] if self.sources else ""

    async def connect(self, index: int) -> tuple[asyncio.Transport, Client]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            src = self.source(index)
            if src:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((src, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        transport, client = await loop.create_connection(Client, sock=sock)
        return transport, client

    async def one(self, index: int) -> None:
        s = Session()
        try:
            transport, c = await self.connect(index)
        except OSError as exc:
            self.count(f"error: connect: {exc.strerror or exc}")
            return
        try:
            s.outcome = await asyncio.wait_for(self.dialogue(c, s), self.args.timeout)
        except TimeoutError:
            s.outcome = "error: timeout"
        except OSError as exc:
            s.outcome = f"error: {exc.strerror or exc}"
        finally:
            transport.close()
        self.count(s.outcome)
        self.latencies.extend(s.latencies)
        self.messages += s.messages

    def count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    async def expect(self, c: Client, what: str, first: str = "2") -> tuple[int, bytes, float]:
        reply = await c.reply()
        if not str(reply[0]).startswith(first):
            raise Unexpected(what, reply)
        return reply

    async def dialogue(self, c: Client, s: Session) -> str:
        mode = self.args.mode
        try:
            greeting = await c.reply()
            if greeting[0] != 220:
                if mode == "zombie" and greeting[0] >= 500:
                    return "rejected at connect"
                raise Unexpected("greeting", greeting)
            c.send(self.helo)
            await self.expect(c, "HELO")
            if mode == "reject":
                c.send(self.mail)
                await self.expect(c, "MAIL")
                c.send(self.rcpt_lines[0])
                await self.expect(c, "RCPT", "5")
                await self.quit(c)
                return "rejected at RCPT"
            for _ in range(self.args.msgs):
                if mode == "pipeline":
                    c.send(self.mail + b"".join(self.rcpt_lines) + b"DATA\r\n")
                    await self.expect(c, "MAIL")
                    for _ in self.rcpt_lines:
                        await self.expect(c, "RCPT")
                    await self.expect(c, "DATA", "3")
                else:
                    c.send(self.mail)
                    await self.expect(c, "MAIL")
                    for line in self.rcpt_lines:
                        c.send(line)
                        if mode == "zombie":
                            reply = await c.reply()
                            if reply[0] >= 500:
                                await self.quit(c)
                                return "rejected at RCPT"
                            if reply[0] // 100 != 2:
                                raise Unexpected("RCPT", reply)
                        else:
                            await self.expect(c, "RCPT")
                    c.send(b"DATA\r\n")
                    await self.expect(c, "DATA", "3")
                t0 = time.perf_counter()
                c.send(self.content)
                done = await self.expect(c, "end of data")
                s.latencies.append((done[2] - t0) * 1000.0)
                s.messages += 1
            await self.quit(c)
            return "accepted"
        except Unexpected as exc:
            return f"error: {exc}"

    async def quit(self, c: Client) -> None:
        if c.closed:
            return
        c.send(b"QUIT\r\n")
        await c.reply()  # 221, or the server closed first (after a 521)

    async def run(self) -> None:
        a = self.args
        sem = asyncio.Semaphore(a.sessions)
        tasks: set[asyncio.Task[None]] = set()
        if a.rate:
            # open loop: session k starts at k / rate (this process's share of the rate)
            start = time.perf_counter()
            for k in range(a.count):
                delay = start + k / a.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await sem.acquire()
                t = asyncio.ensure_future(self._limited(a.first + k * a.stride, sem))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
            return
        # closed loop: ``sessions`` tasks, each starts a new session when its last ends
        k = 0

        async def loop_task() -> None:
            nonlocal k
            while k < a.count:
                index = a.first + k * a.stride
                k += 1
                await self.one(index)

        await asyncio.gather(*(loop_task() for _ in range(min(a.sessions, a.count))))

    async def _limited(self, index: int, sem: asyncio.Semaphore) -> None:
        try:
            await self.one(index)
        finally:
            sem.release()


class Unexpected(Exception):
    def __init__(self, what: str, reply: tuple[int, bytes, float]) -> None:
        super().__init__(f"{what}: {reply[1].decode(errors='replace')[:80]}")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    ap.add_argument("--server", required=True, metavar="HOST:PORT")
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--sessions", type=int, default=10, help="concurrent sessions at most")
    ap.add_argument("--count", type=int, default=100, help="sessions to run")
    ap.add_argument("--rate", type=float, default=0.0, help="new sessions/s (0: closed loop)")
    ap.add_argument("--msgs", type=int, default=1, help="messages per session")
    ap.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    ap.add_argument("--size", type=int, default=1024, help="message body bytes")
    ap.add_argument("--sender", default="someone@example.com")
    ap.add_argument("--rcpt", default="foo@bar.org")
    ap.add_argument("--helo", default="client.example")
    ap.add_argument("--ehlo", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--source", action="append", help="source address (repeatable: round robin)")
    ap.add_argument("--pool", type=int, default=0, help="source addresses from the pool (N)")
    ap.add_argument("--first", type=int, default=0, help="index of this process's 1st session")
    ap.add_argument("--stride", type=int, default=1, help="index step (the number of processes)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per session at most")
    ap.add_argument("--wait-go", action="store_true", help="print ready, wait for a line")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - the bench's venv has it
        pass
    worker = Worker(args)
    if args.wait_go:
        print("ready", flush=True)
        sys.stdin.readline()
    cpu0, start = _cpu(), time.monotonic()
    asyncio.run(worker.run())
    end, cpu = time.monotonic(), _cpu() - cpu0
    return {
        "start": start,
        "end": end,
        "cpu": cpu,
        "counts": worker.counts,
        "messages": worker.messages,
        "latencies": worker.latencies,
    }


def main(argv: Sequence[str] | None = None) -> None:
    print(json.dumps(run(parse_args(argv))), flush=True)


if __name__ == "__main__":
    main()
