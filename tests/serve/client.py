"""A line-level SMTP client for tests: types what an admin types in telnet.

It sends raw lines (or raw bytes) and reads whole replies, so tests can check exact
codes, texts and whether the server closed the connection — things a library client
hides.  Every read has a deadline.
"""

from __future__ import annotations

import asyncio
import ssl

DEADLINE = 10.0


class LineClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, source: str | None = None) -> LineClient:
        local = (source, 0) if source else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local), DEADLINE
        )
        return cls(reader, writer)

    async def reply(self) -> list[str]:
        """One whole reply (all its lines), without CRLF."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), DEADLINE)
            if not raw:
                raise ConnectionError(f"connection closed; got so far: {lines}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    async def send(self, line: str) -> None:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> list[str]:
        """Send one command line and return its reply."""
        await self.send(line)
        return await self.reply()

    async def closed(self) -> bool:
        """True when the server has closed the connection (EOF within the deadline)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), DEADLINE)
        except (TimeoutError, ConnectionError):
            return isinstance(self.reader.exception(), ConnectionError)
        return data == b""

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        await self.writer.start_tls(context, server_hostname=server_hostname)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), DEADLINE)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
