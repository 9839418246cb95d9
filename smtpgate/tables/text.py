"""``hash:`` and ``texthash:`` tables, read from the postmap source file (never a ``.db``).

Format (postmap(1), ``util/dict_thash.c``): logical lines as :func:`~.lines.logical_lines`;
each is split at its first whitespace into ``key`` and ``value``, both trimmed. Keys are case
folded (Postfix with SMTPUTF8 folds UTF-8 fully, so ``STRASSE`` finds ``straße``); values are
kept as written. Behaviour checked against ``postmap`` on Postfix 3.7; no line is ever an
error, each problem is a warning in ``table.warnings``, worded as Postfix does:

* a duplicate key keeps the *first* value and warns ``FILE, line N: duplicate entry: "Key"``
  (texthash; hash words it as ``postmap`` does: ``FILE.db: duplicate entry: "key"``);
* a ``key:`` ending in a colon is kept and warns that the file may be an alias file;
* a line with a key and no value is skipped: texthash warns ``expected format: key whitespace
  value -- ignoring this line`` (``dict_thash``), hash warns ``expected format: key whitespace
  value`` (what ``postmap hash:file`` says when it builds the ``.db``, which then lacks it);
* a logical line that is not UTF-8 is skipped: ``non-UTF-8 input "..." -- ignoring this line``
  (both types; undecodable bytes are shown as ``?``).

``hash:`` and ``texthash:`` differ in Postfix only in storage, so they share one parser.
"""

from __future__ import annotations

from .base import SPACE, TableSource, is_utf8, printable
from .lines import Rules


class TextHashTable:
    """An in-memory ``key -> value`` table with case-folded keys."""

    is_pattern = False

    def __init__(
        self,
        type: str,
        name: str,
        entries: dict[str, str],
        warnings: list[str],
        lines: dict[str, int] | None = None,
        path: str | None = None,
    ) -> None:
        self.type = type
        self.name = name
        self.entries = entries
        self.warnings = tuple(warnings)
        self.lines = lines or {}
        self.path = path

    def items(self) -> list[tuple[str, str, int]]:
        """Every ``(key, value, line)``, for ``check``'s lint of table values."""
        return [(k, v, self.lines.get(k, 0)) for k, v in self.entries.items()]

    def lookup(self, key: str) -> str | None:
        return self.entries.get(key.casefold())

    def __repr__(self) -> str:
        return f"<{self.type}:{self.name} ({len(self.entries)} entries)>"


def split_key_value(text: str) -> tuple[str, str]:
    """Split at the first whitespace; trim both halves (postmap's ``key whitespace value``)."""
    for i, ch in enumerate(text):
        if ch in SPACE:
            return text[:i], text[i + 1 :].strip(SPACE)
    return text, ""


def parse_text_table(
    rules: Rules, lines: dict[str, int] | None = None, *, type: str = "texthash"
) -> dict[str, str]:
    """Parse postmap source lines into a dict; warnings are appended to ``rules.warnings``.

    ``lines``, when given, receives the line number of each key. ``type`` picks the wording
    of the "expected format" warning (``hash`` words it as ``postmap`` does).
    """
    entries: dict[str, str] = {}
    ignoring = "" if type == "hash" else " -- ignoring this line"
    for number, line in rules.lines:
        if not is_utf8(line):
            rules.warn(number, f'non-UTF-8 input "{printable(line)}" -- ignoring this line')
            continue
        key, value = split_key_value(line)
        if not key or not value:
            rules.warn(number, f"expected format: key whitespace value{ignoring}")
            continue
        if key.endswith(":"):
            rules.warn(number, 'record is in "key: value" format; is this an alias file?')
        folded = key.casefold()
        if folded in entries:
            if type == "hash":  # postmap's words: Berkeley DB knows no line numbers
                rules.warnings.append(f'{rules.where}.db: duplicate entry: "{folded}"')
            else:
                rules.warn(number, f'duplicate entry: "{key}"')
            continue
        entries[folded] = value
        if lines is not None:
            lines[folded] = number
    return entries


def parse_texthash(text: str, path: str, *, type: str = "texthash") -> TextHashTable:
    """Parse the text of a hash/texthash source file named ``path``."""
    rules = Rules.from_text(text, path)
    lines: dict[str, int] = {}
    entries = parse_text_table(rules, lines, type=type)
    return TextHashTable(type, path, entries, rules.warnings, lines, path)


def open_hash(name: str, source: TableSource) -> TextHashTable:
    table = parse_texthash(source.read(), source.path, type=source.type)
    table.name = name
    return table


open_texthash = open_hash
