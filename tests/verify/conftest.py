"""Fixtures: a real redis-server per test that asks for one, and a recording backend
(aiosmtpd on 127.0.0.1) that refuses the unknown users of :data:`UNKNOWN`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.serve.backend import RecordingBackend
from tests.shared_state.redis_server import redis_server  # noqa: F401 (the fixture)

USER_UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown in virtual mailbox table"
UNKNOWN = ("nobody@bar.org", "ghost@bar.org")


def rcpts(backend: RecordingBackend, address: str | None = None) -> list[str]:
    """Every RCPT command the backend received (for ``address`` only, when given)."""
    return [
        command
        for connection in backend.connections
        for command in connection.commands
        if command.upper().startswith("RCPT ")
        and (address is None or f"<{address}>" in command.lower())
    ]


@pytest.fixture
async def backend() -> AsyncIterator[RecordingBackend]:
    replies = {address: USER_UNKNOWN.format(address) for address in UNKNOWN}
    async with RecordingBackend(rcpt_replies=replies) as b:
        yield b
