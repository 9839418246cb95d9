"""Hostile-input cases (reliability.md section 8) over a real socket.

Every case runs against a fresh smtpgate (``running_gate``) in front of a
:class:`~tests.serve.backend.RecordingBackend` and asserts three things: the reply (code,
and Postfix's text where it is known), whether the server closed the connection, and what
the backend stored. Each case ends with :meth:`Env.finish`: the control message C01 still
goes through the same server, no reply leaked a traceback or the backend's address, and
no stored message carries a sender the client did not send in its own MAIL command.

Clients connect from 127.0.0.2 (outside ``mynetworks = 127.0.0.1/32``): untrusted.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.serve.backend import RecordingBackend, StoredMessage
from tests.serve.client import LineClient
from tests.serve.conftest import WORKERS, Gate, running_gate

MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = our.example
smtpd_proxy_timeout = 1s
smtp_connect_timeout = 1s
"""
UNTRUSTED = "127.0.0.2"
TRUSTED = "127.0.0.1"
GO_AHEAD = ["354 End data with <CR><LF>.<CR><LF>"]
R451_PROXY = "451 4.3.0 Error: queue file write error"
_serial = itertools.count(1)


def body(tag: str, text: bytes = b"hello\r\n") -> bytes:
    """A CRLF message with a unique Message-ID that names *tag*."""
    return (
        b"From: sender@ext.example\r\nTo: u@our.example\r\nSubject: "
        + tag.encode()
        + b"\r\nMessage-ID: <"
        + tag.encode()
        + b"@test>\r\n\r\n"
        + text
    )


def code(reply: list[str]) -> int:
    return int(reply[-1][:3])


class Env:
    """One gate and its backend, plus the checks every case shares."""

    def __init__(self, gate: Gate, backend: RecordingBackend) -> None:
        self.gate = gate
        self.backend = backend
        self.replies: list[list[str]] = []
        self.senders: set[str] = set()

    async def connect(self, source: str = UNTRUSTED, greet: bool = True) -> LineClient:
        if greet:
            return await self.gate.connect(source)
        client = await LineClient.connect(self.gate.host, self.gate.port, source=source)
        self.gate.clients.append(client)
        return client

    async def cmd(self, c: LineClient, line: str) -> list[str]:
        """A command and its reply (recorded for the leak check); MAIL senders recorded."""
        if line.upper().startswith("MAIL FROM:"):
            self.senders.add(line[10:].strip().split(" ")[0].strip("<>").lower())
        reply = await c.cmd(line)
        self.replies.append(reply)
        return reply

    async def reply(self, c: LineClient) -> list[str]:
        reply = await c.reply()
        self.replies.append(reply)
        return reply

    async def session(self, source: str = UNTRUSTED, ehlo: bool = True) -> LineClient:
        c = await self.connect(source)
        verb = "EHLO" if ehlo else "HELO"
        assert code(await self.cmd(c, f"{verb} client.example")) == 250
        return c

    async def transaction(
        self, c: LineClient, content: bytes, rcpt: str = "u@our.example", sender: str = ""
    ) -> list[str]:
        """MAIL, RCPT, DATA, *content* + the dot; the reply to the dot."""
        sender = sender or "sender@ext.example"
        assert await self.cmd(c, f"MAIL FROM:<{sender}>") == ["250 2.1.0 Ok"]
        assert await self.cmd(c, f"RCPT TO:<{rcpt}>") == ["250 2.1.5 Ok"]
        assert await self.cmd(c, "DATA") == GO_AHEAD
        await c.send_raw(content + b".\r\n")
        return await self.reply(c)

    def stored(self, tag: str) -> list[StoredMessage]:
        needle = f"<{tag}@test>".encode()
        return [m for m in self.backend.messages if needle in m.content]

    async def c01(self) -> None:
        """C01: a normal message from an untrusted client to the relay domain is stored."""
        tag = f"c01-{next(_serial)}"
        c = await self.session()
        final = await self.transaction(c, body(tag))
        assert final[0].startswith("250 2.0.0 Ok: queued as "), final
        assert len(self.stored(tag)) == 1
        assert await self.cmd(c, "QUIT") == ["221 2.0.0 Bye"]
        await c.close()

    async def finish(self) -> None:
        """The invariants of section 8, then C01 through the same server."""
        await self.c01()
        leaks = (
            "Traceback",
            "Exception",
            "Error: (",
            f":{self.backend.port}",
            "backend.test",
            "RecordingBackend",
        )
        for reply in self.replies:
            for line in reply:
                assert not any(leak in line for leak in leaks), line
        own = {"sender@ext.example", ""} | self.senders
        for message in self.backend.messages:
            assert message.mail_from.lower() in own, f"smuggled sender {message.mail_from}"


@asynccontextmanager
async def open_env(
    tmp_path: Path,
    extra: str = "",
    overrides: tuple[str, ...] = (),
    tables: dict[str, str] | None = None,
    in_process: str = "",
    workers: int = WORKERS,
    **backend_kwargs: Any,
) -> AsyncIterator[Env]:
    """A deployed gate (see tests/serve/conftest.py) in front of a RecordingBackend;
    ``in_process`` (the reason) runs the Server in this event loop instead."""
    async with RecordingBackend(**backend_kwargs) as backend:
        async with running_gate(
            tmp_path,
            MAIN_CF + extra,
            backend,
            tables,
            overrides,
            workers=workers,
            in_process=in_process,
        ) as gate:
            yield Env(gate, backend)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with open_env(tmp_path) as e:
        yield e


async def read_until_closed(c: LineClient, deadline: float = 3.0) -> tuple[list[str], bool]:
    """Every reply line until the server closes (True) or *deadline* passes (False)."""
    lines: list[str] = []
    try:
        async with asyncio.timeout(deadline):
            while True:
                raw = await c.reader.readline()
                if not raw:
                    return lines, True
                lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
    except TimeoutError:
        return lines, False
    except ConnectionError:
        return lines, True
