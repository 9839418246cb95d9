"""A policy server on loopback for the tests, that answers or misbehaves on purpose.

``FakePolicyServer(behave)`` listens on 127.0.0.1 port 0 (or a unix socket) and, for
each request it reads (attributes up to the empty line), calls ``behave(attributes,
connection_index, request_index)``; the result says what to do:

- a string: send ``action=<it>`` and the empty line;
- :data:`SILENT`: send nothing (the client times out);
- :data:`CLOSE`: close the connection without a reply;
- ``Raw(b"...")``: send those bytes as they are (garbage, a partial reply), then
  ``close`` when asked.

It records every request (``requests``: (connection index, attributes dict)) and how
many connections it saw open and closed, with :meth:`wait_for` to await a condition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Raw:
    data: bytes
    close: bool = False


SILENT = object()
CLOSE = object()


class FakePolicyServer:
    def __init__(self, behave: Callable[[dict[str, str], int, int], Any] | str = "DUNNO") -> None:
        self.behave = behave
        self.requests: list[tuple[int, dict[str, str]]] = []
        self.opened = 0
        self.closed = 0
        self.address = ""
        self._server: asyncio.base_events.Server | None = None
        self._changed = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, unix_path: str | None = None) -> FakePolicyServer:
        if unix_path is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            port = self._server.sockets[0].getsockname()[1]
            self.address = f"127.0.0.1:{port}"
        else:
            self._server = await asyncio.start_unix_server(self._serve, unix_path)
            self.address = unix_path
        return self

    @property
    def endpoint(self) -> str:
        return ("unix:" if self.address.startswith("/") else "inet:") + self.address

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def __aenter__(self) -> FakePolicyServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Return once ``condition()`` holds (re-checked on every server event)."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.opened
        self.opened += 1
        self._writers.append(writer)
        self._changed.set()
        count = 0
        try:
            while True:
                attributes: dict[str, str] = {}
                while True:
                    line = await reader.readline()
                    if not line:
                        return
                    if line == b"\n":
                        break
                    name, _, value = line.decode().rstrip("\n").partition("=")
                    attributes[name] = value
                self.requests.append((index, attributes))
                self._changed.set()
                behave = self.behave
                result = behave if isinstance(behave, str) else behave(attributes, index, count)
                count += 1
                if result is SILENT:
                    await reader.read()  # until the client gives up and closes
                    return
                if result is CLOSE:
                    return
                if isinstance(result, Raw):
                    writer.write(result.data)
                    await writer.drain()
                    if result.close:
                        return
                    continue
                writer.write(f"action={result}\n\n".encode())
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()
            self.closed += 1
            self._changed.set()
