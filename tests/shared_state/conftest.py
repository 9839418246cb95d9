"""Fixtures: a real redis-server per test (tests/shared_state/redis_server.py), and the
serve tests' recording backend (tests/serve/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.serve.backend import RecordingBackend
from tests.shared_state.redis_server import redis_server  # noqa: F401 (the fixture)


@pytest.fixture
async def backend() -> AsyncIterator[RecordingBackend]:
    async with RecordingBackend() as b:
        yield b
