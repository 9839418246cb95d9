"""Fixtures: the serve tests' recording backend (tests/serve/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.serve.backend import RecordingBackend


@pytest.fixture
async def backend() -> AsyncIterator[RecordingBackend]:
    async with RecordingBackend() as b:
        yield b
