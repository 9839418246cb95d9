"""The main.cf lexer: text in, ``name = value`` entries with their locations out.

Theory of operation, after Postfix ``util/readlline.c`` and ``util/split_nameval.c``:

1. Physical lines are split at ``\\n``. A line that is empty, all white space, or whose first
   non-blank character is ``#`` is ignored; it does not end a logical line, so comments may
   sit between continuation lines. ``#`` anywhere else is ordinary text.
2. A logical line starts with a line whose first character is not white space; every
   following line that starts with white space is appended to it as is (no separator is
   added: the leading white space of the continuation separates the words). The logical
   line keeps the number of its first physical line.
3. White space at the start of the file (continuation text with nothing to continue) is
   dropped with a warning, as Postfix does ("logical line must not start with whitespace").
4. Each logical line is split into ``name = value``: the name runs up to white space or
   ``=``; white space around the value is trimmed (so the ``\\r`` of CRLF files goes too).
   A line without ``=`` is fatal in Postfix, so it raises :class:`ConfigError` here.
5. One difference: a CR right before LF is dropped (Postfix keeps it, where it acts as
   white space), so a CRLF file never puts a CR inside a continued value.

White space means the ASCII set Postfix's ``ISSPACE`` accepts: space, tab, CR, LF, VT, FF.

Lists (:func:`split_list`) follow ``util/mystrtok.c::mystrtokq`` with the separators
comma, space, tab, CR and LF, and ``{}`` as the grouping pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpgate.config.diagnostics import Diagnostic, Location
from smtpgate.errors import ConfigError

SPACE = " \t\r\n\v\f"
LIST_SEPARATORS = ", \t\r\n"


@dataclass(frozen=True)
class Entry:
    """One ``name = value`` logical line; ``value`` is trimmed but not expanded."""

    name: str
    value: str
    location: Location


def split_nameval(text: str) -> tuple[str, str] | str:
    """Split ``name = value``; return ``(name, value)`` or Postfix's error text."""
    rest = text.lstrip(SPACE)
    if not rest or rest[0] == "=":
        return "missing attribute name"
    end = 0
    while end < len(rest) and rest[end] not in SPACE and rest[end] != "=":
        end += 1
    name = rest[:end]
    after = rest[end:].lstrip(SPACE)
    if not after.startswith("="):
        return "missing '=' after attribute name"
    return name, after[1:].strip(SPACE)


def _quote(text: str, limit: int) -> str:
    return text[:limit] + ("..." if len(text) > limit else "")


def logical_lines(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Return ``(lines, orphans)``: logical lines and dropped leading-white-space lines."""
    lines: list[tuple[int, str]] = []
    orphans: list[tuple[int, str]] = []
    current: list[str] = []
    first = 0
    orphan = False

    def finish() -> None:
        if current:
            (orphans if orphan else lines).append((first, "".join(current)))

    for number, physical in enumerate(text.split("\n"), start=1):
        physical = physical.removesuffix("\r")
        stripped = physical.lstrip(SPACE)
        if not stripped or stripped[0] == "#":
            continue
        if physical[0] in SPACE and current:
            current.append(physical)
            continue
        finish()
        current = [physical]
        first = number
        orphan = physical[0] in SPACE
    finish()
    return lines, orphans


def parse_maincf(text: str, path: str = "main.cf") -> tuple[list[Entry], list[Diagnostic]]:
    """Lex main.cf text into entries, in file order (a repeated name appears twice)."""
    lines, orphans = logical_lines(text)
    diagnostics = [
        Diagnostic(
            "warning",
            f'logical line must not start with whitespace: "{_quote(orphan, 30)}" (ignored)',
            Location(path, number),
        )
        for number, orphan in orphans
    ]
    entries: list[Entry] = []
    for number, line in lines:
        result = split_nameval(line)
        if isinstance(result, str):
            raise ConfigError(f'{result}: "{_quote(line.strip(SPACE), 60)}"', path, number)
        entries.append(Entry(result[0], result[1], Location(path, number)))
    return entries, diagnostics


def split_list(value: str) -> list[str]:
    """Split a Postfix list value the way ``smtpd_check_parse`` does (``mystrtokq``).

    Separators are comma, space, tab, CR and LF; text between balanced ``{`` ``}`` is
    never split, so ``inline:{ a=b, {c = d e} }`` and ``{ hash:/x, search = ... }`` stay
    one entry each. Braces are kept: restriction lists hand ``{...}`` tokens to the table
    layer unchanged. Use :func:`strip_braces` where Postfix uses ``mail_parm_split``
    (``extpar`` with ``EXTPAR_FLAG_STRIP``) to unwrap a ``{ grouped text }`` entry.
    An unbalanced ``{`` swallows the rest of the value, as in Postfix.
    """
    tokens: list[str] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and value[i] in LIST_SEPARATORS:
            i += 1
        if i >= n:
            break
        start, level = i, 0
        while i < n:
            ch = value[i]
            if ch == "{":
                level += 1
            elif level > 0 and ch == "}":
                level -= 1
            elif level == 0 and ch in LIST_SEPARATORS:
                break
            i += 1
        tokens.append(value[start:i])
    return tokens


def strip_braces(token: str) -> str:
    """Unwrap ``{ text }`` to ``text`` (Postfix ``extpar`` with stripping); else unchanged.

    Raises :class:`ValueError` with Postfix's wording for ``{text`` without its ``}`` or
    text after the closing ``}``.
    """
    if not token.startswith("{"):
        return token
    level = 0
    for index, ch in enumerate(token):
        if ch == "{":
            level += 1
        elif ch == "}":
            level -= 1
            if level == 0:
                if index != len(token) - 1:
                    raise ValueError(f"syntax error after '}}' in \"{token}\"")
                return token[1:index].strip(SPACE)
    raise ValueError(f"missing '}}' in \"{token}\"")
