"""Ask the real Postfix: ``postmap -q KEY type:name``, for differential tests."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

POSTMAP = "/usr/sbin/postmap"

requires_postmap = pytest.mark.skipif(
    not os.path.exists(POSTMAP), reason="needs Postfix's postmap (CI installs postfix)"
)


def postmap_query(spec: str, key: str) -> tuple[str | None, str]:
    """Return (value or None when not found, stderr) of ``postmap -q key spec``."""
    proc = subprocess.run(
        [POSTMAP, "-q", key, spec],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if proc.returncode not in (0, 1):
        raise AssertionError(f"postmap failed for {spec}: {proc.stderr}")
    value = proc.stdout.removesuffix("\n") if proc.returncode == 0 else None
    return value, proc.stderr


def postmap_skip_reason(stderr: str, kind: str) -> str | None:
    """The reason of the first "MAP map PATH, line N: REASON: skipping this rule" warning."""
    found = re.search(rf"{kind} map .*?, line \d+: (.*?)(?:: skipping this rule)?$", stderr, re.M)
    return found.group(1) if found else None


def write_table(path: os.PathLike[str] | str, text: str | bytes) -> None:
    """Write a table file dated a minute ago: Postfix waits for files changed within a second."""
    data = text.encode() if isinstance(text, str) else text
    with open(path, "wb") as f:
        f.write(data)
    past = os.stat(path).st_mtime - 60
    os.utime(path, (past, past))


def build_hash(path: str) -> None:
    """Run ``postmap hash:path`` to make ``path.db``."""
    subprocess.run([POSTMAP, f"hash:{path}"], capture_output=True, check=True, timeout=20)
    past = os.stat(path).st_mtime
    os.utime(f"{path}.db", (past, past))
