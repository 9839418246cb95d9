"""A real SMTP backend for tests: aiosmtpd on 127.0.0.1, port 0, in the test's own loop.

It records everything smtpgate sends it and misbehaves on demand::

    async with RecordingBackend(rcpt_replies={"bad@x.test": "550 5.1.1 no such user"}) as backend:
        settings = f"relayhost = [127.0.0.1]:{backend.port}"
        ...
        assert backend.messages[0].content == b"Subject: hi\\r\\n\\r\\nbody\\r\\n"
        assert backend.connections[0].commands[0].startswith("EHLO ")

Stages -- the names used by ``replies``, ``close_at``, ``delays`` and ``garbled``:
``GREETING``, ``EHLO``, ``HELO``, ``STARTTLS``, ``TLS`` (the handshake after 220; only
``garbled``: send plaintext junk instead of a handshake), ``XFORWARD``, ``MAIL``, ``RCPT``,
``DATA`` (the reply to the DATA command), ``CONTENT`` (only ``close_at``: close after the
first content line, before the dot), ``DOT`` (the reply to the final dot), ``RSET``,
``NOOP``, ``QUIT``.

- ``replies[stage]`` -- answer with this reply instead (wire text; ``\\n`` separates the
  lines of a multi-line reply). A reply to GREETING is followed by closing.
- ``rcpt_replies[address]`` -- per-recipient reply (address compared case-insensitively).
- ``close_at`` -- close the connection at that stage without replying. ``DOT``: the message
  is stored first (the client cannot know: the duplicate case).
- ``delays[stage]`` -- wait that many seconds before the reply; ``math.inf`` hangs until the
  backend is shut down (a dead backend that keeps the socket open).
- ``garbled`` -- answer with a line that is not an SMTP reply.
- ``holds[stage]`` -- an :class:`asyncio.Event`: wait until the test sets it before the
  reply (bounded by the backend's shutdown). The stage is appended to :attr:`held` when
  the wait begins, so ``await backend.wait_for(lambda: "DOT" in backend.held)`` tells the
  test that the backend is now sitting on that reply.

The message is stored when the final dot arrives unless ``replies["DOT"]`` is a 4xx/5xx
reply. All behaviour attributes are plain mutable attributes: a test may change them
between transactions. ``down=True`` reserves a port with nothing listening on it.
``lenient_data_end=True`` ends DATA at a ``.`` line after a bare LF too (pre-3.9 Postfix,
sendmail): a smuggling victim. ``await backend.wait_for(predicate)`` waits for an event
(a command, a stored message, a closed connection) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.serve.certs import test_pki

STAGES = frozenset(
    "GREETING EHLO HELO STARTTLS TLS XFORWARD MAIL RCPT DATA CONTENT DOT RSET NOOP QUIT".split()
)
DEFAULT_XFORWARD = "NAME ADDR PROTO HELO SOURCE PORT IDENT"  # what Postfix's smtpd offers
GARBAGE = "this is not an SMTP reply"


@dataclass
class StoredMessage:
    """One message the backend accepted (as an MTA would have queued it)."""

    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[list[str]]
    content: bytes
    """The content as stored: CRLF lines, dot-unstuffed, without the final dot line."""
    raw: bytes
    """Every byte received after the 354 reply, up to and including the final dot line."""
    xforward: dict[str, str]
    """XFORWARD attributes in effect for this transaction (values as sent, xtext)."""
    tls: bool
    helo: str | None
    connection: int
    """Index into :attr:`RecordingBackend.connections`."""
    queue_id: str


@dataclass
class ConnectionRecord:
    """One client connection the backend saw."""

    index: int
    peer: Any
    commands: list[str] = field(default_factory=list)
    """Command lines as received (decoded, without CRLF); content is not included."""
    tls: bool = False
    client_cert: dict[str, Any] | None = None
    closed: bool = False
    closed_by_backend: bool = False


class _Handler:
    """aiosmtpd hooks: Postfix-like replies, per-recipient verdicts, EHLO keywords."""

    def __init__(self, backend: RecordingBackend) -> None:
        self.backend = backend

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        backend = self.backend
        keywords = [r[4:] for r in responses[1:-1] if not r[4:].upper().startswith("AUTH")]
        if backend.pipelining:
            keywords.append("PIPELINING")
        if backend.xforward is not None:
            keywords.append(f"XFORWARD {backend.xforward}".strip())
        keywords += ["ENHANCEDSTATUSCODES", "DSN"] if backend.dsn else ["ENHANCEDSTATUSCODES"]
        lines = [responses[0][4:], *keywords]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.backend.rcpt_replies.get(address.lower())
        if reply is not None:
            return _wire(reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)  # type: ignore[arg-type]  # one list per RCPT
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "221 2.0.0 Bye"


def _wire(reply: str) -> str:
    return "\r\n".join(reply.replace("\r\n", "\n").split("\n"))


class _BackendSMTP(SMTP):
    """One backend session: aiosmtpd plus recording, XFORWARD and fault injection."""

    def __init__(self, backend: RecordingBackend, **kwargs: Any) -> None:
        super().__init__(_Handler(backend), **kwargs)
        self.backend = backend
        self.record: ConnectionRecord | None = None
        self.xforward_attrs: dict[str, str] = {}

    # -- bookkeeping -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.record is None
        super().connection_made(transport)
        if first:
            backend = self.backend
            assert self.session is not None
            self.record = ConnectionRecord(len(backend.connections), self.session.peer)
            backend.connections.append(self.record)
            backend._sessions.append(self)
            backend._notify()
        else:
            assert self.record is not None
            self.record.tls = True
            assert self.session is not None
            ssl_info = self.session.ssl or {}
            self.record.client_cert = ssl_info.get("peercert") or None

    def connection_lost(self, error: Exception | None) -> None:
        if self.record is not None:
            self.record.closed = True
            self.backend._notify()
        super().connection_lost(error)

    def _set_rset_state(self) -> None:
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self.xforward_attrs = {}

    def _log(self, command: str, arg: str | None) -> None:
        assert self.record is not None
        self.record.commands.append(command if arg is None else f"{command} {arg}")
        self.backend._notify()

    def _close(self) -> None:
        assert self.record is not None
        self.record.closed_by_backend = True
        if self.transport is not None:
            self.transport.close()

    async def _inject(self, stage: str) -> bool:
        """Apply the behaviour configured for *stage*; True when it replaced the reply."""
        backend = self.backend
        delay = backend.delays.get(stage)
        if delay:
            await backend._pause(delay)
        hold = backend.holds.get(stage)
        if hold is not None:
            backend.held.append(stage)
            backend._notify()
            await backend._hold(hold)
        if stage in backend.close_at:
            self._close()
            return True
        if stage in backend.garbled:
            await self.push(GARBAGE)
            return True
        reply = backend.replies.get(stage)
        if reply is not None:
            await self.push(_wire(reply))
            return True
        return False

    # -- commands ------------------------------------------------------------------------

    async def _handle_client(self) -> None:
        if await self._inject("GREETING"):
            if "GREETING" in self.backend.replies:
                self._close()
            return
        await super()._handle_client()

    async def smtp_EHLO(self, hostname: str) -> None:
        self._log("EHLO", hostname)
        if not await self._inject("EHLO"):
            await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        self._log("HELO", hostname)
        if not await self._inject("HELO"):
            await super().smtp_HELO(hostname)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._log("MAIL", arg)
        if not await self._inject("MAIL"):
            await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._log("RCPT", arg)
        if not await self._inject("RCPT"):
            await super().smtp_RCPT(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self._log("RSET", arg)
        if not await self._inject("RSET"):
            await super().smtp_RSET(arg)

    async def smtp_NOOP(self, arg: str) -> None:
        self._log("NOOP", arg)
        if not await self._inject("NOOP"):
            await super().smtp_NOOP(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self._log("QUIT", arg)
        if not await self._inject("QUIT"):
            await super().smtp_QUIT(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        self._log("STARTTLS", arg)
        if await self._inject("STARTTLS"):
            return
        if "TLS" in self.backend.garbled and self.tls_context and self.transport:
            await self.push("220 2.0.0 Ready to start TLS")
            self.transport.write(b"\x15\x03\x01\x00\x02\x02\x28 definitely not TLS\r\n")  # type: ignore[attr-defined]
            self._close()
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        """Postfix's XFORWARD: NAME=value ... outside a transaction; values kept as sent."""
        self._log("XFORWARD", arg)
        if await self._inject("XFORWARD"):
            return
        offered = set((self.backend.xforward or "").upper().split())
        assert self.envelope is not None
        if not offered:
            await self.push('500 5.5.2 Error: command "XFORWARD" not recognized')
            return
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        attrs: dict[str, str] = {}
        for item in (arg or "").split():
            name, eq, value = item.partition("=")
            if not eq or name.upper() not in offered or len(value) > 255:
                await self.push(f"501 5.5.4 Bad XFORWARD attribute: {name}")
                return
            attrs[name.upper()] = value
        if not attrs:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        self.xforward_attrs.update(attrs)
        await self.push("250 2.0.0 Ok")

    async def smtp_DATA(self, arg: str) -> None:
        self._log("DATA", arg)
        if await self._inject("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        received = await self._receive_content()
        if received is None:
            return
        await self._end_of_data(envelope, *received)

    async def _read_line(self) -> bytes:
        line = bytearray()
        while True:
            try:
                line += await self._reader.readuntil(b"\n")
                return bytes(line)
            except asyncio.LimitOverrunError as exc:
                line += await self._reader.read(exc.consumed)

    async def _receive_content(self) -> tuple[bytes, bytes] | None:
        """(raw, content) up to the end of data; None when the connection went away."""
        raw = bytearray()
        content = bytearray()
        after_crlf = True
        while True:
            try:
                line = await self._read_line()
            except asyncio.IncompleteReadError:
                return None
            raw += line
            if self._is_end(line, after_crlf):
                return bytes(raw), bytes(content)
            if "CONTENT" in self.backend.close_at:
                self._close()
                return None
            content += line[1:] if line.startswith(b".") else line
            after_crlf = line.endswith(b"\r\n")

    def _is_end(self, line: bytes, after_crlf: bool) -> bool:
        if self.backend.lenient_data_end:
            return line in (b".\r\n", b".\n")  # LF is a line end: pre-3.9 Postfix, sendmail
        return line == b".\r\n" and after_crlf

    async def _end_of_data(self, envelope: Envelope, raw: bytes, content: bytes) -> None:
        backend = self.backend
        reply = backend.replies.get("DOT")
        refused = reply is not None and reply[:1] in ("4", "5")
        queue_id = f"Q{len(backend.messages) + 1:05d}"
        if not refused:
            assert self.record is not None and self.session is not None
            backend.messages.append(
                StoredMessage(
                    mail_from=envelope.mail_from or "",
                    mail_options=list(envelope.mail_options),
                    rcpt_tos=list(envelope.rcpt_tos),
                    rcpt_options=[list(o) for o in envelope.rcpt_options],
                    content=content,
                    raw=raw,
                    xforward=dict(self.xforward_attrs),
                    tls=self.record.tls,
                    helo=self.session.host_name,
                    connection=self.record.index,
                    queue_id=queue_id,
                )
            )
            backend._notify()
        self._set_rset_state()
        if not await self._inject("DOT"):
            await self.push(f"250 2.0.0 Ok: queued as {queue_id}")


class RecordingBackend:
    """An SMTP server on 127.0.0.1 that records what it receives; see the module docstring.

    Use as ``async with RecordingBackend(**behaviour) as backend``; ``backend.port``,
    ``backend.messages`` (list of :class:`StoredMessage`), ``backend.connections`` (list of
    :class:`ConnectionRecord`).
    """

    def __init__(
        self,
        *,
        down: bool = False,
        replies: dict[str, str] | None = None,
        rcpt_replies: dict[str, str] | None = None,
        close_at: set[str] | frozenset[str] = frozenset(),
        delays: dict[str, float] | None = None,
        garbled: set[str] | frozenset[str] = frozenset(),
        xforward: str | None = DEFAULT_XFORWARD,
        pipelining: bool = True,
        size: int | None = 10_240_000,
        dsn: bool = False,
        starttls: bool = False,
        certificate: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
        lenient_data_end: bool = False,
        smtputf8: bool = True,
        holds: dict[str, asyncio.Event] | None = None,
    ) -> None:
        self.down = down
        self.replies = dict(replies or {})
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.close_at = set(close_at)
        self.delays = dict(delays or {})
        self.garbled = set(garbled)
        self.holds = dict(holds or {})
        self.held: list[str] = []
        """Stages whose reply is (or was) held back by :attr:`holds`, in order."""
        for stage in (*self.replies, *self.close_at, *self.delays, *self.garbled, *self.holds):
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r} (one of {sorted(STAGES)})")
        self.xforward = xforward
        self.pipelining = pipelining
        self.size = size
        self.dsn = dsn
        self.starttls = starttls
        self.certificate = certificate
        self.client_ca = client_ca
        self.lenient_data_end = lenient_data_end
        self.smtputf8 = smtputf8
        self.messages: list[StoredMessage] = []
        self.connections: list[ConnectionRecord] = []
        self.port = 0
        self.host = "127.0.0.1"
        self._sessions: list[_BackendSMTP] = []
        self._server: asyncio.Server | None = None
        self._closing: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None

    @property
    def relayhost(self) -> str:
        """The ``relayhost`` value that points at this backend."""
        return f"[{self.host}]:{self.port}"

    def tls_context(self) -> ssl.SSLContext:
        """The server-side context used for STARTTLS."""
        pki = test_pki()
        cert, key = self.certificate or (pki.server_cert, pki.server_key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(self.client_ca)
        return context

    async def __aenter__(self) -> RecordingBackend:
        loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        self._changed = asyncio.Event()
        if self.down:
            with socket.socket() as sock:
                sock.bind((self.host, 0))
                self.port = sock.getsockname()[1]
            return self
        tls_context = self.tls_context() if self.starttls else None

        def factory() -> _BackendSMTP:
            return _BackendSMTP(
                self,
                hostname="backend.test",
                ident="RecordingBackend",
                loop=loop,
                tls_context=tls_context,
                data_size_limit=self.size,
                enable_SMTPUTF8=self.smtputf8,
                timeout=60,
            )

        self._server = await loop.create_server(factory, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._closing is not None
        self._closing.set()
        if self._server is not None:
            self._server.close()
        tasks = []
        for session in self._sessions:
            if session.transport is not None:
                session.transport.close()
            task = session._handler_coroutine
            if task is not None and not task.done():
                task.cancel()  # e.g. stuck in a TLS handshake the client abandoned
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        if self._server is not None:
            await self._server.wait_closed()

    async def _pause(self, seconds: float) -> None:
        assert self._closing is not None
        if math.isinf(seconds):
            await self._closing.wait()
            return
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            pass

    async def _hold(self, event: asyncio.Event) -> None:
        assert self._closing is not None
        closing = asyncio.ensure_future(self._closing.wait())
        released = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({closing, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            released.cancel()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until *predicate()* holds (re-checked after every recorded event)."""
        assert self._changed is not None
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
