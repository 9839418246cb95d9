"""The examples of docs/filters.md, for the tests that run them against the real
daemons: a ```main.cf block is found by its first line (``# postgrey``), an untagged
block by a word it holds."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "filters.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", re.M | re.S)


def _blocks() -> list[tuple[str, str]]:
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(DOC.read_text())]


def main_cf(name: str) -> str:
    """The main.cf block that starts with ``# name``."""
    found = [text for tag, text in _blocks() if tag == "main.cf" and text.startswith(f"# {name}\n")]
    assert len(found) == 1, f"{DOC}: no single main.cf block '# {name}'"
    return found[0]


def block(holding: str) -> str:
    """The untagged block that holds ``holding``."""
    found = [text for tag, text in _blocks() if not tag and holding in text]
    assert len(found) == 1, f"{DOC}: no single untagged block with {holding!r}"
    return found[0]


def line(start: str) -> str:
    """The one line of the untagged blocks that starts with ``start``."""
    found = [
        ln for tag, text in _blocks() if not tag for ln in text.splitlines() if ln.startswith(start)
    ]
    assert len(found) == 1, f"{DOC}: no single example line starting {start!r}"
    return found[0]
