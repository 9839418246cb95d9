"""A scriptable milter on 127.0.0.1 for the client's tests (the filter side, by hand).

:class:`FakeMilter` listens on a loopback port, answers SMFIC_OPTNEG with the version,
actions, protocol flags and macro lists it was given, records every packet of every
connection (:attr:`FakeMilter.connections`), and answers each event with what its
``handler`` returns: raw reply bytes (build them with :func:`reply` and the helpers),
``None`` for no reply, or :data:`CLOSE` to drop the connection; it may be a coroutine
(to be slow) and may write to ``conn.writer`` itself. The default handler
answers SMFIR_CONTINUE to every event that expects a reply (none to SMFIC_MACRO, ABORT,
QUIT, nor to an event whose SMFIP_NR_* flag it negotiated): :meth:`FakeMilter.default`,
which a test's handler calls (``conn.milter.default(conn, packet)``) for the packets it
does not care about; :func:`answering` builds the usual one.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from smtpgate.milter import protocol as p

CLOSE = object()
"""Returned by a handler: close the connection instead of answering."""

NO_REPLY = {p.SMFIC_MACRO, p.SMFIC_ABORT, p.SMFIC_QUIT, p.SMFIC_QUIT_NC}
NR_FLAG = {
    p.SMFIC_CONNECT: p.SMFIP_NR_CONN,
    p.SMFIC_HELO: p.SMFIP_NR_HELO,
    p.SMFIC_MAIL: p.SMFIP_NR_MAIL,
    p.SMFIC_RCPT: p.SMFIP_NR_RCPT,
    p.SMFIC_DATA: p.SMFIP_NR_DATA,
    p.SMFIC_UNKNOWN: p.SMFIP_NR_UNKN,
    p.SMFIC_HEADER: p.SMFIP_NR_HDR,
    p.SMFIC_EOH: p.SMFIP_NR_EOH,
    p.SMFIC_BODY: p.SMFIP_NR_BODY,
}


def reply(code: bytes, data: bytes = b"") -> bytes:
    """One reply packet."""
    return p.packet(code, data)


def cstr(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\0"


CONTINUE = reply(p.SMFIR_CONTINUE)
ACCEPT = reply(p.SMFIR_ACCEPT)
REJECT = reply(p.SMFIR_REJECT)
TEMPFAIL = reply(p.SMFIR_TEMPFAIL)
DISCARD = reply(p.SMFIR_DISCARD)
PROGRESS = reply(p.SMFIR_PROGRESS)
SKIP = reply(p.SMFIR_SKIP)
SHUTDOWN = reply(p.SMFIR_SHUTDOWN)


def replycode(text: str) -> bytes:
    return reply(p.SMFIR_REPLYCODE, cstr(text))


def quarantine(reason: str) -> bytes:
    return reply(p.SMFIR_QUARANTINE, cstr(reason))


def addheader(name: str, value: str) -> bytes:
    return reply(p.SMFIR_ADDHEADER, cstr(name) + cstr(value))


def insheader(index: int, name: str, value: str) -> bytes:
    return reply(p.SMFIR_INSHEADER, struct.pack("!I", index) + cstr(name) + cstr(value))


def chgheader(index: int, name: str, value: str) -> bytes:
    return reply(p.SMFIR_CHGHEADER, struct.pack("!I", index) + cstr(name) + cstr(value))


def replbody(data: bytes) -> bytes:
    return reply(p.SMFIR_REPLBODY, data)


def addrcpt(rcpt: str, args: str | None = None) -> bytes:
    if args is None:
        return reply(p.SMFIR_ADDRCPT, cstr(rcpt))
    return reply(p.SMFIR_ADDRCPT_PAR, cstr(rcpt) + cstr(args))


def delrcpt(rcpt: str) -> bytes:
    return reply(p.SMFIR_DELRCPT, cstr(rcpt))


def chgfrom(sender: str, args: str | None = None) -> bytes:
    return reply(p.SMFIR_CHGFROM, cstr(sender) + (b"" if args is None else cstr(args)))


@dataclass
class Packet:
    """One packet the MTA sent."""

    command: bytes
    data: bytes

    @property
    def strings(self) -> list[str]:
        """The data's NUL-terminated strings (for MACRO: after the event byte)."""
        data = self.data[1:] if self.command == p.SMFIC_MACRO else self.data
        return [s.decode("utf-8", "surrogateescape") for s in data.split(b"\0")[:-1]]

    @property
    def macros(self) -> dict[str, str]:
        """SMFIC_MACRO: name -> value."""
        items = self.strings
        return dict(zip(items[::2], items[1::2], strict=True))


Handler = Callable[
    ["Connection", Packet], "bytes | object | None | Awaitable[bytes | object | None]"
]


@dataclass
class Connection:
    """One MTA connection to the fake milter, and what it sent."""

    milter: FakeMilter
    writer: asyncio.StreamWriter
    """For a handler that writes replies itself (SMFIR_PROGRESS while it works)."""
    packets: list[Packet] = field(default_factory=list)
    closed: bool = False
    optneg: tuple[int, int, int] | None = None

    def commands(self) -> bytes:
        """Every command byte received, in order (MACRO included)."""
        return b"".join(pk.command for pk in self.packets)

    def events(self) -> bytes:
        """The command bytes without SMFIC_MACRO."""
        return b"".join(pk.command for pk in self.packets if pk.command != p.SMFIC_MACRO)

    def of(self, command: bytes) -> list[Packet]:
        return [pk for pk in self.packets if pk.command == command]

    def macros_for(self, event: bytes) -> list[dict[str, str]]:
        """The macros sent before each ``event``."""
        return [
            pk.macros for pk in self.packets if pk.command == p.SMFIC_MACRO and pk.data[:1] == event
        ]


class FakeMilter:
    """A milter whose every answer a test chooses; see the module docstring."""

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        version: int = 6,
        actions: int = p.MTA_ACTIONS,
        protocol: int = 0,
        symlists: dict[int, str] | None = None,
        optneg_reply: bytes | None = None,
        unix_path: str = "",
    ) -> None:
        self.handler: Handler = handler or self.default
        self.version = version
        self.actions = actions
        self.protocol = protocol
        self.symlists = symlists or {}
        self.optneg_reply = optneg_reply
        self.connections: list[Connection] = []
        self.server: asyncio.Server | None = None
        self.changed = asyncio.Condition()
        self.port = 0
        self.unix_path = unix_path
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        """The smtpd_milters endpoint."""
        if self.unix_path:
            return f"unix:{self.unix_path}"
        return f"inet:127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeMilter:
        if self.unix_path:
            self.server = await asyncio.start_unix_server(self._serve, self.unix_path)
        else:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:  # closing their sockets ends them (cancelling would log an error in 3.11)
            await asyncio.wait(tasks, timeout=5)
        await self.server.wait_closed()

    async def _note(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until ``check()`` holds (checked after each packet and each disconnect)."""

        async def waiting() -> None:
            async with self.changed:
                await self.changed.wait_for(check)

        await asyncio.wait_for(waiting(), timeout)

    def _optneg(self) -> bytes:
        if self.optneg_reply is not None:
            return self.optneg_reply
        data = struct.pack("!III", self.version, self.actions, self.protocol)
        for stage, names in self.symlists.items():
            data += struct.pack("!I", stage) + cstr(names)
        return reply(p.SMFIC_OPTNEG, data)

    def default(self, conn: Connection, packet: Packet) -> bytes | None:
        """SMFIR_CONTINUE to an event that expects a reply, nothing to the others."""
        if packet.command in NO_REPLY:
            return None
        flag = NR_FLAG.get(packet.command, 0)
        if flag and self.protocol & flag:
            return None
        return CONTINUE

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections.append(conn)
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readexactly(5)
                (length,) = struct.unpack("!I", head[:4])
                data = await reader.readexactly(length - 1)
                packet = Packet(head[4:5], data)
                conn.packets.append(packet)
                await self._note()
                if packet.command == p.SMFIC_OPTNEG:
                    conn.optneg = struct.unpack("!III", data[:12])
                    writer.write(self._optneg())
                    await writer.drain()
                    continue
                if packet.command in (p.SMFIC_QUIT, p.SMFIC_QUIT_NC):
                    break
                answer = self.handler(conn, packet)
                if asyncio.iscoroutine(answer):
                    answer = await answer
                if answer is CLOSE:
                    break
                if isinstance(answer, bytes) and answer:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            conn.closed = True
            writer.close()
            await self._note()


def answering(command: bytes, answer: bytes | object) -> Handler:
    """A handler that answers ``command`` with ``answer`` and the rest by default."""

    def handler(conn: Connection, packet: Packet) -> bytes | object | None:
        if packet.command == command:
            return answer
        return conn.milter.default(conn, packet)

    return handler
