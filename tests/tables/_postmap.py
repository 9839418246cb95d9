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
        errors="replace",
        timeout=20,
        check=False,
    )
    if proc.returncode not in (0, 1):
        raise AssertionError(f"postmap failed for {spec}: {proc.stderr}")
    value = proc.stdout.removesuffix("\n") if proc.returncode == 0 else None
    return value, proc.stderr


def postmap_warnings(stderr: str) -> list[str]:
    """postmap's load-time warnings as smtpgate words them: without ``postmap: warning: `` and
    the ``TYPE map `` prefix, each once (postmap may open a table twice), lookup-time
    complaints (``table TYPE:NAME: ...``) left out."""
    found: dict[str, None] = {}
    for line in stderr.splitlines():
        if not line.startswith("postmap: warning: "):
            continue
        text = re.sub(r"^(cidr|regexp|pcre) map ", "", line.removeprefix("postmap: warning: "))
        if not text.startswith("table "):
            found[text] = None
    return list(found)


def postmap_build(path: str) -> str:
    """Run ``postmap hash:path`` (makes ``path.db``); return its stderr."""
    proc = subprocess.run(
        [POSTMAP, f"hash:{path}"], capture_output=True, text=True, check=True, timeout=20
    )
    past = os.stat(path).st_mtime
    os.utime(f"{path}.db", (past, past))
    return proc.stderr


def write_table(path: os.PathLike[str] | str, text: str | bytes) -> None:
    """Write a table file dated a minute ago: Postfix waits for files changed within a second."""
    data = text.encode() if isinstance(text, str) else text
    with open(path, "wb") as f:
        f.write(data)
    past = os.stat(path).st_mtime - 60
    os.utime(path, (past, past))


def build_hash(path: str) -> None:
    """Run ``postmap hash:path`` to make ``path.db``."""
    postmap_build(path)
