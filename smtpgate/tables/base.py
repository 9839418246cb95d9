"""The table abstraction: what every lookup table is, and where its text comes from.

This is Postfix's ``util/dict.h`` as a :class:`typing.Protocol`. A lookup has three outcomes,
as ``DICT_ERR_*`` does: a value (``str``), *not found* (``None``), or a temporary failure
(:class:`~smtpgate.errors.TableLookupError`), which callers must never treat as a miss.

:class:`TableSource` is the only place in the tables layer that reads a file: an opener calls
``source.read()`` (or gets in-line text from the name) and hands plain ``str`` to its parser.
:class:`SurrogateTable` is ``util/dict_surrogate.c``: a table that could not be opened, kept in
place so that a daemon runs on with every lookup failing temporarily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from smtpgate.errors import TableLookupError, TableOpenError

#: C ``isspace()`` in the C locale; Postfix splits and trims with exactly these.
SPACE = " \t\n\v\f\r"


class Table(Protocol):
    """A Postfix lookup table (``DICT``): one ``lookup`` plus names for diagnostics."""

    type: str
    name: str
    is_pattern: bool

    def lookup(self, key: str) -> str | None:
        """Return the value for ``key``, ``None`` when not found; raise TableLookupError."""
        ...


def table_warnings(table: Table) -> tuple[str, ...]:
    """The load-time warnings of ``table`` (duplicate keys and the like), worded like Postfix."""
    warnings: Sequence[str] = getattr(table, "warnings", ())
    return tuple(warnings)


@dataclass(frozen=True)
class TableSource:
    """Where a table's text comes from: a file (resolved from ``base_dir``) or given ``text``.

    ``location`` is where the ``type:name`` spec was written (config file, line); errors that
    are not inside a table file, such as an unreadable file or bad in-line text, point there.
    """

    type: str
    name: str
    base_dir: str | None = None
    location: tuple[str, int] | None = None
    text: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.type}:{self.name}"

    @property
    def path(self) -> str:
        """The table file name, made absolute from ``base_dir`` when relative."""
        if self.base_dir is None or os.path.isabs(self.name):
            return self.name
        return os.path.join(self.base_dir, self.name)

    def read(self) -> str:
        """The file's text, decoded as UTF-8; raise TableOpenError naming what failed."""
        if self.text is not None:
            return self.text
        path = self.path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except ValueError as exc:  # a NUL byte in the name
            raise self.error(f"open {path!r}: {exc}") from exc
        except OSError as exc:
            hint = ""
            if not os.path.exists(path) and os.path.exists(path + ".db"):
                hint = f" (smtpgate reads the postmap source file, not {path}.db)"
            raise self.error(f"open {path}: {exc.strerror or exc}{hint}") from exc
        return decode_table_text(data, path)

    def error(self, message: str) -> TableOpenError:
        """An error about the spec itself, at the place the spec was written."""
        if self.location is None:
            return TableOpenError(message)
        return TableOpenError(message, self.location[0], self.location[1])


def decode_table_text(data: bytes, path: str) -> str:
    """Decode a table file as UTF-8, naming the first line that is not (Postfix SMTPUTF8)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        start = data.rfind(b"\n", 0, exc.start) + 1
        end = data.find(b"\n", exc.start)
        text = data[start : end if end >= 0 else len(data)]
        shown = text.decode("utf-8", "replace")[:30]
        raise TableOpenError(f'non-UTF-8 input "{shown}"', path, line) from exc


class SurrogateTable:
    """A table that fails every lookup with ``reason`` (Postfix ``dict_surrogate``)."""

    is_pattern = False

    def __init__(self, type: str, name: str, reason: str) -> None:
        self.type = type
        self.name = name
        self.reason = reason
        self.warnings: tuple[str, ...] = ()

    def lookup(self, key: str) -> str | None:
        raise TableLookupError(self.reason)

    def __repr__(self) -> str:
        return f"SurrogateTable({self.type!r}, {self.name!r}, {self.reason!r})"
