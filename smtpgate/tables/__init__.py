"""Postfix lookup tables and match lists, read from their text sources; no network I/O.

This package is Postfix's dictionary layer: the :class:`Table` protocol and surrogate
(``base``), the type registry and ``open_table`` (``registry``), one module per table type
(``text``: hash/texthash, ``cidr``, ``regexp``: regexp/pcre, ``inline``: inline/static),
the ordered multi-table search ``Maps`` (``maps``) and the match lists ``DomainList`` and
``AddressList`` (``lists``). Only ``open_table`` (through ``TableSource``) and the match-list
``/file/name`` expansion read files, at load time; the parsers take ``str``.
"""

from .base import SurrogateTable, Table, TableSource, table_warnings
from .lists import AddressList, DomainList
from .maps import Maps
from .registry import (
    TABLE_TYPES,
    UNSUPPORTED_TYPES,
    open_table,
    open_table_or_surrogate,
    split_spec,
)

__all__ = [
    "TABLE_TYPES",
    "UNSUPPORTED_TYPES",
    "AddressList",
    "DomainList",
    "Maps",
    "SurrogateTable",
    "Table",
    "TableSource",
    "open_table",
    "open_table_or_surrogate",
    "split_spec",
    "table_warnings",
]
