"""One SMTP client connection to a backend, on a plain asyncio protocol.

Why not aiosmtplib: its protocol reads exactly one reply per command written and drops
reply bytes that arrive while an earlier reply waits to be picked up, so it cannot read
the replies to a pipelined group (RFC 2920: XFORWARD, MAIL and RCPT in one write, DATA
sent ahead); making it do so took a patched protocol class and its private attributes.
What the relay needs from an SMTP client is small -- connect, read replies, write
commands, STARTTLS -- and is written here against asyncio's public API only.

Theory of operation: :class:`BackendProtocol` parses every reply as its bytes arrive and
queues it, so replies to commands written in one group are read in order, one
:meth:`~BackendProtocol.read_reply` each, however the bytes were split; reading a reply
that is already queued costs no future and no timer. A reply that cannot be parsed, the
connection's end, and a timeout are :class:`Fault`s. :class:`Connection` is one session
(greeting, EHLO and STARTTLS done) with what its EHLO offered.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any, cast

from smtpgate.errors import RelayError
from smtpgate.relay.wire import XFORWARD_ORDER, printable, reply_from_backend
from smtpgate.reply import Reply

MAX_LINE_LENGTH = 8192
MAX_REPLY_LENGTH = MAX_LINE_LENGTH * 4
"""A whole reply (all its lines) may not exceed this (bounds memory for a babbling server)."""


class Fault(RelayError):
    """A backend failure: *detail* is for the log, the client gets the generic 451.

    *definite* means the backend gave a proper negative verdict (e.g. 421): nothing stored.
    """

    def __init__(self, detail: str, definite: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.definite = definite


class TLSHandshakeFault(Fault):
    """The TLS handshake failed (``may`` retries in plaintext on a new connection)."""


class BackendProtocol(asyncio.Protocol):
    """Reads SMTP replies into a queue of ``(code, text)``; writes what it is given."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._size = 0
        self._replies: collections.deque[tuple[int, str]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: Fault | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            if not self._line(bytes(buffer[start : end + 1])):
                return
            start = end + 1
        del buffer[:start]
        if len(buffer) > MAX_LINE_LENGTH:
            self._fail(Fault("reply line too long"))
        elif self._replies:
            self._wake()

    def _line(self, line: bytes) -> bool:
        """Take one reply line; False after a protocol error (reported, input dropped)."""
        self._size += len(line)
        code = line[:3]
        if len(line) > MAX_LINE_LENGTH or self._size > MAX_REPLY_LENGTH:
            self._fail(Fault("reply too long"))
            return False
        if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
            text = printable(line.decode("utf-8", "replace").rstrip("\r\n"))[:200]
            self._fail(Fault(f"bad reply: {text!r}"))
            return False
        self._lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
        if line[3:4] != b"-":
            self._replies.append((int(code), "\n".join(self._lines)))
            self._lines = []
            self._size = 0
        return True

    def eof_received(self) -> bool:
        self._fail(Fault("connection closed by the backend"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(Fault(f"connection lost: {exc}" if exc else "connection closed by the backend"))
        self._paused = False
        self._wake_drain()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    def _fail(self, fault: Fault) -> None:
        if self._error is None:
            self._error = fault
            if self.transport is not None:
                self.transport.abort()  # a reply that cannot be parsed: out of step
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- the interface -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing() and self._error is None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write now (asyncio buffers beyond the socket's room); a Fault when closed."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise self.fault()
        transport.write(data)

    def writelines(self, pieces: list[bytes | memoryview]) -> None:
        """Write *pieces* as one (uvloop: one system call without joining them)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise self.fault()
        transport.writelines(pieces)

    @property
    def must_drain(self) -> bool:
        """True when the transport asked to stop writing (its buffer is over the mark)."""
        return self._paused

    async def drain(self, timeout: float) -> None:
        """Wait until the transport takes more, at most *timeout* seconds."""
        while self._paused:
            if self.transport is None:
                raise self.fault()
            self._drain = self._loop.create_future()
            timer = self._loop.call_later(timeout, _expire, self._drain)
            try:
                await self._drain
            finally:
                timer.cancel()
                self._drain = None
        if self.transport is None:
            raise self.fault()

    async def read_reply(self, timeout: float) -> tuple[int, str]:
        """The next reply as ``(code, text)`` (lines joined by LF); a Fault on timeout,
        a lost connection or a reply that cannot be parsed."""
        if not self._replies and self._error is None:
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        assert self._error is not None
        raise self._error

    def fault(self) -> Fault:
        """Why the connection cannot be used (or a generic closed fault)."""
        return self._error or Fault("connection closed")

    def discard_input(self) -> None:
        """Forget input not read yet (STARTTLS: whatever came before the handshake)."""
        self._buffer.clear()
        self._lines = []
        self._size = 0
        self._replies.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Connection:
    """One backend SMTP session, owned by at most one transaction at a time."""

    __slots__ = (
        "chunking",
        "created",
        "dsn",
        "extensions",
        "hop",
        "last_used",
        "peer",
        "pipelining",
        "protocol",
        "reused",
        "tls",
        "transactions",
        "xforward",
    )

    def __init__(self, protocol: BackendProtocol, hop: Any, peer: str) -> None:
        self.protocol = protocol
        self.hop = hop
        """The next hop this connection belongs to (the key of its pool)."""
        self.peer = peer
        """``host[addr]:port``, for logs."""
        self.tls = False
        self.extensions: dict[str, str] = {}
        self.xforward: frozenset[str] = frozenset()
        self.dsn = self.pipelining = self.chunking = False
        self.created = self.last_used = time.monotonic()
        self.transactions = 0
        self.reused = False
        """True when it comes from the pool: probe it (RSET) before use."""

    @property
    def alive(self) -> bool:
        return self.protocol.connected

    def close(self) -> None:
        self.protocol.close()

    def transport_info(self, name: str) -> Any:
        transport = self.protocol.transport
        return None if transport is None else transport.get_extra_info(name)

    def offered(self, ehlo_text: str) -> None:
        """Record what the reply to EHLO (its text, lines joined by LF) offers."""
        extensions: dict[str, str] = {}
        for line in ehlo_text.split("\n")[1:]:
            keyword, _, params = line.strip().partition(" ")
            extensions[keyword.lower()] = params
        self.extensions = extensions
        words = extensions.get("xforward", "").upper().split()
        self.xforward = frozenset(words) & frozenset(XFORWARD_ORDER)
        self.dsn = "dsn" in extensions
        self.pipelining = "pipelining" in extensions
        self.chunking = "chunking" in extensions


async def open_protocol(
    host: str,
    port: int,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    preamble: bytes = b"",
) -> BackendProtocol:
    """Connect (TLS from the first byte when *tls* is given); the greeting is not read.

    *preamble* (a PROXY header) is written first, in plaintext, before any TLS handshake.
    """
    loop = asyncio.get_running_loop()
    protocol = BackendProtocol(loop)
    if preamble:
        await asyncio.wait_for(loop.create_connection(lambda: protocol, host, port), timeout)
        protocol.write(preamble)
        if tls is not None:
            try:
                await start_tls(protocol, tls, server_hostname, timeout)
            except BaseException:
                protocol.close()
                raise
        return protocol
    if tls is None:
        connecting = loop.create_connection(lambda: protocol, host, port)
    else:
        connecting = loop.create_connection(
            lambda: protocol, host, port, ssl=tls, server_hostname=server_hostname or ""
        )
    await asyncio.wait_for(connecting, timeout)
    return protocol


async def start_tls(
    protocol: BackendProtocol, context: ssl.SSLContext, server_hostname: str | None, timeout: float
) -> None:
    """Upgrade after the server's 220 to STARTTLS (RFC 3207): what came before the
    handshake is discarded (injected plaintext must not pass as encrypted replies)."""
    transport = protocol.transport
    if transport is None:
        raise protocol.fault()
    protocol.discard_input()
    loop = asyncio.get_running_loop()
    tls_transport = await loop.start_tls(
        transport,
        protocol,
        context,
        server_side=False,
        server_hostname=server_hostname or None,
        ssl_handshake_timeout=timeout,
    )
    if tls_transport is None:
        raise Fault("connection closed during the TLS handshake")
    protocol.transport = tls_transport


# -- exchanges -------------------------------------------------------------------------------


async def read_reply(conn: Connection, verb: str, timeout: float) -> tuple[int, str]:
    """The next reply on *conn*; a Fault naming *verb* when there is none. A fault leaves
    the connection out of step: it is closed."""
    try:
        return await conn.protocol.read_reply(timeout)
    except TimeoutError:
        conn.close()
        raise Fault(f"timeout after {verb} ({timeout:g}s)") from None
    except Fault as fault:
        conn.close()
        raise Fault(f"{fault.detail} (after {verb})") from None


def classify(verb: str, code: int, text: str, expect: int, passthrough: bool) -> Reply:
    """The reply to give for a backend reply, or a Fault (Postfix ``smtpd_proxy_cmd``
    rules): a reply of the *expect*ed class is the answer; a 4xx/5xx is passed through
    when *passthrough*, else a Fault; a 421 and anything else are Faults."""
    if not 200 <= code <= 599:
        raise Fault(f"garbled reply to {verb}: {printable(text)[:200]!r}")
    reply = reply_from_backend(code, text)
    if code // 100 == expect:
        return reply
    if code == 421:
        raise Fault(f"backend closed the session at {verb}: {reply}", definite=True)
    if code >= 400:
        if passthrough:
            return reply
        raise Fault(f"backend rejected {verb}: {reply}", definite=True)
    raise Fault(f"unexpected reply to {verb}: {reply}")


async def reply_to(
    conn: Connection, verb: str, timeout: float, expect: int = 2, passthrough: bool = True
) -> Reply:
    """Read and classify the next reply (of a command written before); a 421 closes."""
    code, text = await read_reply(conn, verb, timeout)
    if code == 421:
        conn.close()
    return classify(verb, code, text, expect, passthrough)


async def command(
    conn: Connection,
    verb: str,
    line: bytes,
    timeout: float,
    expect: int = 2,
    passthrough: bool = True,
) -> Reply:
    """Write one command *line* (CRLF included; its arguments checked by the caller) and
    classify its reply."""
    try:
        conn.protocol.write(line)
    except Fault as fault:
        conn.close()
        raise Fault(f"{fault.detail} (sending {verb})") from None
    return await reply_to(conn, verb, timeout, expect, passthrough)
