"""``inline:`` and ``static:`` tables: the table is in the spec itself.

* ``inline:{ key=value, { key = value with spaces } }`` (Postfix 3.0, ``util/dict_inline.c``):
  elements are separated by commas or whitespace; an element in braces may contain blanks and
  has blanks trimmed around ``=``. A bare ``a = b`` is three elements and an error, as in
  Postfix. Keys are case folded; a repeated key keeps the *last* value (checked with ``postmap``).
* ``static:value`` and ``static:{ value with spaces }`` (``util/dict_static.c``): every lookup
  finds ``value``.

Errors are Postfix's words (all fatal in Postfix too), reported at the place where the spec
was written.

An empty value (``inline:{a=}``, ``static:{}``) opens, as in Postfix, and a lookup returns it,
``""``, as Postfix's ``dict_get`` does; the load warning repeats what ``postmap -q`` says at
such a lookup (``table inline:{a=}: key a: empty string result is not allowed``). Searched
through :class:`~.maps.Maps` (Postfix ``maps_find``), an empty result is a lookup error.

The inline table is a :class:`~.text.TextHashTable`: ``items()`` gives ``(key, value, 0)`` (it
has no file; ``path`` is ``None``).
"""

from __future__ import annotations

from .base import SPACE, TableSource
from .lines import split_braced, unbrace
from .text import TextHashTable


def parse_inline(name: str, source: TableSource) -> dict[str, str]:
    """Parse the ``{...}`` of an inline: spec into its entries; raise TableOpenError.

    Empty values are kept (see the module docstring).
    """
    need = f'"inline:{name}"; need "inline:{{name=value...}}"'
    body = name.strip(SPACE)
    if not (body.startswith("{") and body.endswith("}")):
        raise source.error(f"bad syntax: {need}")
    try:
        inner = unbrace(body)
    except ValueError:
        raise source.error(f"bad syntax: {need}") from None
    entries: dict[str, str] = {}
    for token in split_braced(inner):
        try:
            element = unbrace(token)
        except ValueError as exc:
            raise source.error(f'{exc}; need "inline:{{name=value...}}"') from None
        key, sep, value = element.partition("=")
        if not sep:
            raise source.error(f"missing '=' after attribute name: {need}")
        key, value = key.strip(SPACE), value.strip(SPACE)
        entries[key.casefold()] = value
    if not entries:
        raise source.error(f"bad syntax: {need}")
    return entries


def _empty_result(spec: str, key: str | None = None) -> str:
    where = f"table {spec}: " if key is None else f"table {spec}: key {key}: "
    return where + "empty string result is not allowed"


def open_inline(name: str, source: TableSource) -> TextHashTable:
    entries = parse_inline(name, source)
    warnings = [_empty_result(source.spec, key) for key, value in entries.items() if not value]
    return TextHashTable("inline", name, entries, warnings, {key: 0 for key in entries}, None)


class StaticTable:
    """``static:value``: every key finds the same value."""

    type = "static"
    is_pattern = False

    def __init__(self, name: str, value: str, warnings: tuple[str, ...] = ()) -> None:
        self.name = name
        self.value = value
        self.warnings = warnings

    def lookup(self, key: str) -> str | None:
        return self.value

    def __repr__(self) -> str:
        return f"StaticTable({self.name!r})"


def open_static(name: str, source: TableSource) -> StaticTable:
    value = name
    if name.startswith("{"):
        try:
            value = unbrace(name)
        except ValueError as exc:
            raise source.error(f"bad static:name syntax: {exc}") from None
    return StaticTable(name, value, () if value else (_empty_result(source.spec),))
