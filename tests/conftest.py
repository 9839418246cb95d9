"""Fixtures shared by the test folders."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder another user (nobody, after a privilege drop) can read, unlike tmp_path."""
    folder = Path(tempfile.mkdtemp(prefix="smtpgate-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
