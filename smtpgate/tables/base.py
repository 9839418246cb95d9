"""The table abstraction: what every lookup table is, and where its text comes from.

This is Postfix's ``util/dict.h`` as a :class:`typing.Protocol`. A lookup has three outcomes,
as ``DICT_ERR_*`` does: a value (``str``), *not found* (``None``), or a temporary failure
(:class:`~smtpgate.errors.TableLookupError`), which callers must never treat as a miss.

:class:`TableSource` is the only place in the tables layer that reads a file: an opener calls
``source.read()`` (or gets in-line text from the name) and hands plain ``str`` to its parser.
:class:`SurrogateTable` is ``util/dict_surrogate.c``: a table that could not be opened, kept in
place so that a daemon runs on with every lookup failing with
:class:`~smtpgate.errors.TableUnavailableError` (the engine answers ``451 4.3.5``).

A table file is decoded as UTF-8 with ``surrogateescape``: bytes that are not UTF-8 survive
as lone surrogates, so each parser can do what Postfix (SMTPUTF8 on) does with them, per line
(hash/texthash warn and ignore the line; regexp/pcre/cidr keep it and fail a lookup whose
result is not UTF-8, see :func:`check_utf8_result`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from smtpgate.errors import TableLookupError, TableOpenError, TableUnavailableError

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
    """The load-time warnings of ``table``, worded like Postfix 3.7 (``postmap``'s stderr).

    Besides notices about lines that are kept (duplicate keys, ``IF`` without ``ENDIF``...),
    these name every line or rule that Postfix skips and smtpgate skipped too, e.g.
    ``/etc/x/helos, line 2: out of range replacement index "1": skipping this rule``.
    """
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
        """The file's text, UTF-8 with ``surrogateescape``; raise TableOpenError when unreadable."""
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
        return data.decode("utf-8", "surrogateescape")

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


def is_utf8(text: str) -> bool:
    """Whether ``text`` holds no undecodable bytes (no ``surrogateescape`` surrogates)."""
    return not any("\udc80" <= ch <= "\udcff" for ch in text)


def printable(text: str) -> str:
    """``text`` as Postfix's logging shows it: each undecodable byte becomes ``?``."""
    return "".join("?" if "\udc80" <= ch <= "\udcff" else ch for ch in text)


def check_utf8_result(table: Table, key: str, value: str | None) -> str | None:
    """Return ``value``; raise TableLookupError as Postfix's ``dict_utf8`` when not UTF-8."""
    if value is None or is_utf8(value):
        return value
    raise TableLookupError(
        f'{table.type}:{table.name}: key "{key}": non-UTF-8 value "{printable(value)}": '
        "malformed UTF-8 or invalid codepoint"
    )


class SurrogateTable:
    """A table that fails every lookup with ``reason`` (Postfix ``dict_surrogate``).

    Every lookup raises :class:`~smtpgate.errors.TableUnavailableError`, a TableLookupError
    that says the table could not be opened: Postfix answers such a lookup with ``451 4.3.5
    Server configuration error``, not with a temporary lookup failure.
    """

    is_pattern = False

    def __init__(self, type: str, name: str, reason: str) -> None:
        self.type = type
        self.name = name
        self.reason = reason
        self.warnings: tuple[str, ...] = ()

    def lookup(self, key: str) -> str | None:
        raise TableUnavailableError(self.reason)

    def __repr__(self) -> str:
        return f"SurrogateTable({self.type!r}, {self.name!r}, {self.reason!r})"
