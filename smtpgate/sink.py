"""``smtpgate sink``: a small SMTP server that stores every message in a Maildir.

It is the demo's backend (``make run``), and a stand-in MTA for tests and benchmarks:
whatever it answers 250 to is on disk, one file per message, written to ``tmp/`` and
renamed into ``new/`` as Maildir requires, so a reader never sees half a message.  The
file starts with ``Return-Path:`` and ``X-Original-To:`` headers recording the envelope.

This is the second module that imports aiosmtpd (``smtpd.py`` is the front end); it is a
tool beside the gateway, not part of it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

_sequence = itertools.count(1)


class Maildir:
    """A Maildir folder (``tmp``, ``new``, ``cur``), created on first use."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def deliver(self, content: bytes) -> str:
        """Store one message; return its unique name."""
        name = f"{int(time.time())}.P{os.getpid()}Q{next(_sequence)}.{socket.gethostname()}"
        tmp = self.path / "tmp" / name
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path / "new" / name)
        return name

    def messages(self) -> list[Path]:
        return sorted((self.path / "new").iterdir())


class SinkHandler:
    """aiosmtpd handler: every recipient accepted, every message stored."""

    def __init__(self, maildir: Maildir) -> None:
        self.maildir = maildir

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        head = (
            f"Return-Path: <{envelope.mail_from or ''}>\r\n"
            + "".join(f"X-Original-To: <{rcpt}>\r\n" for rcpt in envelope.rcpt_tos)
        ).encode("utf-8", "replace")
        loop = asyncio.get_running_loop()
        name = await loop.run_in_executor(None, self.maildir.deliver, head + content)
        return f"250 2.0.0 Ok: queued as {name.split('.')[1]}"


async def run_sink(host: str, port: int, maildir: str, hostname: str = "sink.localdomain") -> None:
    """Serve until cancelled."""
    handler = SinkHandler(Maildir(maildir))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            hostname=hostname,
            ident="smtpgate sink",
            enable_SMTPUTF8=True,
            data_size_limit=None,
        ),
        host=host,
        port=port,
        reuse_address=True,
    )
    async with server:
        await server.serve_forever()
