"""Postfix's text conventions, shared by every table parser.

* :func:`logical_lines` is ``util/readlline.c`` (``readllines``): a logical line starts with
  non-whitespace text; a line that starts with whitespace continues it; lines whose first
  non-blank character is ``#`` and all-blank lines are dropped *without* ending the logical line.
  The number kept is that of the first physical line. A logical line that would start with
  whitespace (text before any key) is dropped with a warning, as Postfix does. Text after a NUL
  byte is invisible to Postfix's C strings, so it is cut off here too.
* :func:`split_braced` is ``mystrtokq(..., ", \\t\\r\\n", "{}")``: split on commas and
  whitespace, keeping ``{...}`` groups whole; :func:`unbrace` is ``extpar()``.
* :class:`Rules` carries numbered rule text from a file or from an in-line ``type:{ {rule}, ... }``
  list (Postfix 3.7 accepts in-line cidr, regexp and pcre rules) and words warnings as
  ``file, line N: message`` (Postfix's own words after its ``TYPE map`` prefix), or for an
  in-line list ``config file, line L: type:{...}, rule N: message``. A bad rule is a warning
  and is skipped, as in Postfix; only a malformed in-line ``{...}`` list is an error (fatal in
  Postfix too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smtpgate.errors import TableOpenError

from .base import SPACE, TableSource

_DELIMS = ", \t\r\n"


def logical_lines(text: str, path: str) -> tuple[list[tuple[int, str]], list[str]]:
    """Join ``text`` into ``(first line number, logical line)`` pairs, plus warnings."""
    result: list[tuple[int, str]] = []
    warnings: list[str] = []
    current: list[str] = []
    first = 0

    def flush() -> None:
        if not current:
            return
        joined = "".join(current).split("\0", 1)[0]
        if joined[:1] in tuple(SPACE):
            shown = joined[:30] + ("..." if len(joined) > 30 else "")
            warnings.append(f'{path}: logical line must not start with whitespace: "{shown}"')
        else:
            result.append((first, joined))
        current.clear()

    for number, line in enumerate(text.split("\n"), start=1):
        body = line.lstrip(SPACE)
        if not body or body.startswith("#"):
            continue
        if line[0] not in SPACE:
            flush()
        if not current:
            first = number
        current.append(line)
    flush()
    return result, warnings


def split_braced(text: str) -> list[str]:
    """Split on commas and whitespace, keeping each ``{...}`` group (nesting allowed) whole."""
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in _DELIMS:
            i += 1
            continue
        start, depth = i, 0
        while i < n and (depth > 0 or text[i] not in _DELIMS):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}" and depth > 0:
                depth -= 1
            i += 1
        tokens.append(text[start:i])
    return tokens


def unbrace(text: str) -> str:
    """Strip one ``{...}`` pair and the blanks inside it; raise ValueError worded like extpar()."""
    if not text.startswith("{"):
        return text
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                if text[i + 1 :].strip(SPACE):
                    raise ValueError(f"syntax error after '}}' in \"{text}\"")
                return text[1:i].strip(SPACE)
    raise ValueError(f"missing '}}' in \"{text}\"")


@dataclass
class Rules:
    """Numbered logical lines of one table, with the means to report on them."""

    where: str
    lines: list[tuple[int, str]]
    location: tuple[str, int] | None = None
    inline: bool = False
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_text(cls, text: str, path: str) -> Rules:
        lines, warnings = logical_lines(text, path)
        return cls(path, lines, warnings=warnings)

    @classmethod
    def from_source(cls, source: TableSource, map_kind: str) -> Rules:
        """Rules from the table file, or from an in-line ``{ {rule}, {rule} }`` name."""
        if not source.name.startswith("{"):
            return cls.from_text(source.read(), source.path)
        try:
            inner = unbrace(source.name)
        except ValueError as exc:
            raise source.error(f"{map_kind} map: {exc}") from exc
        lines: list[tuple[int, str]] = []
        for number, token in enumerate(split_braced(inner), start=1):
            if not token.startswith("{"):
                raise source.error(f"{map_kind} map: no '{{' at start of text in \"{token}\"")
            try:
                lines.append((number, unbrace(token)))
            except ValueError as exc:
                raise source.error(f"{map_kind} map: {exc}") from exc
        return cls(source.spec, lines, location=source.location, inline=True)

    def error(self, line: int, message: str) -> TableOpenError:
        if self.inline and self.location is not None:
            return TableOpenError(f"{self.where}, rule {line}: {message}", *self.location)
        return TableOpenError(message, self.where, line)

    def warn(self, line: int, message: str) -> None:
        if not self.inline:
            self.warnings.append(f"{self.where}, line {line}: {message}")
        elif self.location is None:
            self.warnings.append(f"{self.where}, rule {line}: {message}")
        else:
            file, number = self.location
            self.warnings.append(f"{file}, line {number}: {self.where}, rule {line}: {message}")

    @property
    def path(self) -> str | None:
        """The table file, or ``None`` for an in-line rule list."""
        return None if self.inline else self.where
