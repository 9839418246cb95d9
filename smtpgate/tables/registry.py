"""The table-type registry and ``open_table()``: Postfix ``util/dict_open.c`` for smtpgate.

:data:`TABLE_TYPES` maps each supported Postfix type name to its opener; adding a type is one
opener and one entry. :func:`open_table` splits ``type:name``, finds the opener and lets it
parse; anything else is ``unsupported dictionary type: X``, as Postfix words it, at the place
where the spec was written. That covers the Postfix types smtpgate does not implement
(:data:`UNSUPPORTED_TYPES`: databases it cannot read without their libraries, and network or
system lookups, which the core must not do).

``proxy:TYPE:NAME`` opens ``TYPE:NAME`` directly: proxymap(8) only changes who opens the table
(privileges, shared connections), not what a lookup returns, and smtpgate reads every table
in-process.

:func:`open_table_or_surrogate` is the daemon's variant (``dict_surrogate``): a table that does
not open becomes a :class:`~.base.SurrogateTable` whose every lookup fails temporarily, and the
error is handed back for logging; ``check`` uses :func:`open_table` and stops on the error.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from smtpgate.errors import TableOpenError

from .base import SurrogateTable, Table, TableSource
from .cidr import open_cidr
from .inline import open_inline, open_static
from .regexp import open_pcre, open_regexp
from .text import open_hash, open_texthash

Opener = Callable[[str, TableSource], Table]


def open_proxy(name: str, source: TableSource) -> Table:
    """``proxy:TYPE:NAME`` is ``TYPE:NAME`` read in-process."""
    return open_table(name, base_dir=source.base_dir, location=source.location)


TABLE_TYPES: dict[str, Opener] = {
    "hash": open_hash,
    "texthash": open_texthash,
    "cidr": open_cidr,
    "regexp": open_regexp,
    "pcre": open_pcre,
    "inline": open_inline,
    "static": open_static,
    "proxy": open_proxy,
}

#: Postfix 3.7 table types that smtpgate knows of and does not support.
UNSUPPORTED_TYPES = frozenset(
    "btree lmdb cdb dbm sdbm ldap mysql pgsql sqlite tcp socketmap unix memcache nis nisplus"
    " fail environ randmap pipemap unionmap internal netinfo".split()
)


def _error(message: str, location: tuple[str, int] | None) -> TableOpenError:
    if location is None:
        return TableOpenError(message)
    return TableOpenError(message, location[0], location[1])


def split_spec(spec: str, *, location: tuple[str, int] | None = None) -> tuple[str, str]:
    """Split ``"hash:/x"`` into ``("hash", "/x")``; raise TableOpenError when not type:name."""
    type_, sep, name = spec.partition(":")
    if not sep or not type_ or not name:
        raise _error(f'expecting "type:name" form instead of "{spec}"', location)
    return type_, name


def open_table(
    spec: str,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    location: tuple[str, int] | None = None,
) -> Table:
    """Open the table ``type:name``; a relative file name is resolved from ``base_dir``."""
    type_, name = split_spec(spec, location=location)
    opener = TABLE_TYPES.get(type_)
    if opener is None:
        raise _error(f"unsupported dictionary type: {type_}", location)
    folder = None if base_dir is None else os.fspath(base_dir)
    return opener(name, TableSource(type_, name, folder, location))


def open_table_or_surrogate(
    spec: str,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    location: tuple[str, int] | None = None,
) -> tuple[Table, TableOpenError | None]:
    """Open ``spec``, or stand in a SurrogateTable that fails every lookup, with the error."""
    try:
        return open_table(spec, base_dir=base_dir, location=location), None
    except TableOpenError as exc:
        type_, _, name = spec.partition(":")
        return SurrogateTable(type_, name, str(exc)), exc
