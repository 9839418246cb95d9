"""``smtpgate sink``: a small SMTP server that stores mail in a Maildir as Postfix would.

It is the demo's backend (``make run``), and a stand-in MTA for tests and benchmarks:
whatever it answers 250 to is on disk, written to ``tmp/`` and renamed into ``new/`` as
Maildir requires, so a reader never sees half a message.  A file is what Postfix's
smtpd(8) then virtual(8) or local(8) delivery writes: one file per recipient, starting
with ``Return-Path: <sender>``, ``X-Original-To: recipient`` and ``Delivered-To:
recipient`` (``mail_copy()``; local parts quoted as in RFC 822 when they must be), then
the sink's own ``Received:`` header naming the SMTP client it talked to (smtpd's form),
then the message; LF line ends throughout -- CRLF is SMTP's line end on the wire, a
Maildir file is a Unix text file.  (Compared with Postfix 3.7's virtual(8) delivery.)

Lines are not limited to SMTP's 1,000 characters: ``serve`` relays a content line of
any length (Postfix too; only the message size is bounded), so the sink takes lines as
long as a message of Postfix's default ``message_size_limit``.

This is the second module that imports aiosmtpd (``smtpd.py`` is the front end); it is a
tool beside the gateway, not part of it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from smtpgate.config import POSTFIX_DEFAULTS
from smtpgate.policy.address import header_safe
from smtpgate.policy.address import quote_822_local as external_form

_sequence = itertools.count(1)

LINE_LIMIT = int(POSTFIX_DEFAULTS["message_size_limit"]) + len("\r\n")
"""The longest line the sink takes (command or content), CRLF included."""


class Maildir:
    """A Maildir folder (``tmp``, ``new``, ``cur``), created on first use."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def deliver(self, content: bytes, unique: str | None = None) -> str:
        """Store one file; return its name (``unique`` is its middle part)."""
        unique = unique or f"P{os.getpid()}Q{next(_sequence)}"
        name = f"{int(time.time())}.{unique}.{socket.gethostname()}"
        tmp = self.path / "tmp" / name
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path / "new" / name)
        return name

    def messages(self) -> list[Path]:
        return sorted((self.path / "new").iterdir())


def quote_822_local(address: str) -> str:
    """Postfix's quote_822_local() of an address as the client wrote it.

    aiosmtpd does not unquote (``"a b"@x``): the address is read into Postfix's internal
    form (``a b@x``) first.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return external_form(f"{local}{at}{domain}")


def delivery_headers(sender: str, recipient: str) -> bytes:
    """What Postfix's maildir delivery puts above the message (sender "" is ``<>``)."""
    sender = quote_822_local(header_safe(sender)) if sender else ""
    recipient = quote_822_local(header_safe(recipient))
    return (
        f"Return-Path: <{sender}>\nX-Original-To: {recipient}\nDelivered-To: {recipient}\n"
    ).encode()


class SinkHandler:
    """aiosmtpd handler: every recipient accepted, every message stored."""

    def __init__(self, maildir: Maildir, hostname: str = "sink.localdomain") -> None:
        self.maildir = maildir
        self.hostname = hostname

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = (envelope.original_content or b"").replace(b"\r\n", b"\n")
        sender = envelope.mail_from or ""
        sender = "" if sender == "<>" else sender  # aiosmtpd keeps the null sender's brackets
        queue_id = f"P{os.getpid()}Q{next(_sequence)}"
        received = self._received(session, envelope, queue_id)
        files = [
            (delivery_headers(sender, rcpt) + received + content, f"{queue_id}R{n}")
            for n, rcpt in enumerate(envelope.rcpt_tos, 1)
        ]
        loop = asyncio.get_running_loop()
        for data, unique in files:
            await loop.run_in_executor(None, self.maildir.deliver, data, unique)
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _received(self, session: Session, envelope: Envelope, queue_id: str) -> bytes:
        """Postfix smtpd's Received: header: the HELO name and the peer's address."""
        address = str(session.peer[0]) if session.peer else "unknown"
        helo = header_safe(session.host_name, neuter=True) if session.host_name else "unknown"
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        date = formatdate(localtime=True)
        lines = [
            f"Received: from {helo} (unknown [{address}])",
            f"\tby {self.hostname} (smtpgate sink) with {proto} id {queue_id}",
        ]
        if len(envelope.rcpt_tos) == 1:
            lines.append(f"\tfor <{quote_822_local(header_safe(envelope.rcpt_tos[0]))}>; {date}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{date}")
        return ("\n".join(lines) + "\n").encode()


class SinkSMTP(SMTP):
    """aiosmtpd with lines up to :data:`LINE_LIMIT` (aiosmtpd's own limit is 1,001)."""

    line_length_limit = LINE_LIMIT


async def start_sink(
    host: str, port: int, maildir: str | os.PathLike[str], hostname: str = "sink.localdomain"
) -> asyncio.Server:
    """A listening sink (port 0: any free port, see ``server.sockets``)."""
    handler = SinkHandler(Maildir(maildir), hostname)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SinkSMTP(
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


async def run_sink(host: str, port: int, maildir: str, hostname: str = "sink.localdomain") -> None:
    """Serve until cancelled."""
    server = await start_sink(host, port, maildir, hostname)
    async with server:
        await server.serve_forever()
