"""``Maps``: an ordered search of several tables (Postfix ``global/maps.c``).

The first table that finds the key wins. ``partial=True`` marks a derived key (a parent domain,
``user@``, a shortened address): pattern tables (``is_pattern``: regexp, pcre, cidr) see only
whole keys, as Postfix's ``DICT_FLAG_PATTERN`` arranges. A table error ends the search: it is
raised as :class:`~smtpgate.errors.TableLookupError` naming the table and key, never turned
into *not found*; a :class:`~smtpgate.errors.TableUnavailableError` (a table that did not open)
stays one. An empty result (``inline:{a=}``, a regexp rule without result text) also ends the
search with a TableLookupError, as ``maps_find`` does (``DICT_ERR_RETRY``, Postfix's words
``TITLE lookup of KEY returns an empty string result``).
"""

from __future__ import annotations

from collections.abc import Sequence

from smtpgate.errors import TableLookupError

from .base import Table


class Maps:
    """Several tables searched in order under one title (usually the parameter name)."""

    def __init__(self, title: str, tables: Sequence[Table]) -> None:
        self.title = title
        self.tables: tuple[Table, ...] = tuple(tables)

    def find(self, key: str, *, partial: bool = False) -> str | None:
        """The first table's value for ``key``; ``None`` when no table has it."""
        for table in self.tables:
            if partial and table.is_pattern:
                continue
            try:
                value = table.lookup(key)
            except TableLookupError as exc:
                raise type(exc)(
                    f'{self.title}: {table.type}:{table.name} lookup error for "{key}": {exc}'
                ) from exc
            if value == "":
                raise TableLookupError(
                    f"{self.title} lookup of {key} returns an empty string result; "
                    f"{self.title} should return NO RESULT in case of NOT FOUND"
                )
            if value is not None:
                return value
        return None

    def __repr__(self) -> str:
        names = ", ".join(f"{t.type}:{t.name}" for t in self.tables)
        return f"Maps({self.title!r}, [{names}])"
