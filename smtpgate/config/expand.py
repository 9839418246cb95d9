"""``$name`` expansion, ported from Postfix ``util/mac_parse.c`` and ``util/mac_expand.c``.

Supported forms (``$(...)`` is the legacy spelling of ``${...}``; ``$$`` is a literal ``$``):

``$name``, ``${name}``
    the value of *name*, itself expanded (empty if *name* is undefined);
``${name?text}``, ``${name?{text}}``
    *text* (expanded) if the **unexpanded** value of *name* is non-empty, else empty;
``${name:text}``, ``${name:{text}}``
    *text* if the value of *name* is empty or undefined, else empty;
``${name?{text1}:{text2}}``, ``${name?{text1}:text2}``
    one or the other;
``${{text1} OP {text2} ? {text3} : {text4}}``
    relational form (Postfix 3.0+). OP is ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``,
    comparing numerically when both sides are all digits, else as strings; with the
    ``level`` suffix (``<level`` ...) both sides are compatibility levels such as ``3.6``
    (``compat_level.c``: major.minor.patch, compared number by number).
    ``${{a} == {b}}`` alone yields ``true`` or empty.

White space around ``{text}`` operands is ignored; inside the braces it is kept. Syntax
errors raise :class:`ExpansionError` with Postfix's message text (Postfix aborts with
"macro processing error" after the same warning).

The caller supplies ``lookup(name, test)``: with ``test`` true it returns the raw value
(for ``?`` and ``:``), otherwise the fully expanded value; ``None`` means undefined.
Recursion and cycle detection are the lookup's business; this module bounds the
nesting of one value at :data:`MAX_NESTING`, as Postfix does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from smtpgate.config.maincf import SPACE

Lookup = Callable[[str, bool], "str | None"]

MAX_NESTING = 100
TRUE = "true"
FALSE = ""
OPERATOR_CHARS = "<>!=?+-*/~&|%"
OPERATORS = ("==", "!=", "<", "<=", ">=", ">")
OPERATOR_SUFFIXES = ("level",)
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
ALNUM = NAME_CHARS - {"_"}


class ExpansionError(ValueError):
    """A value cannot be expanded (syntax error, bad operand, too deep or looping).

    ``param`` names the parameter whose text holds the problem, when the caller knows it.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _parse(value: str) -> Iterator[tuple[bool, str]]:
    """Split *value* into ``(is_macro, text)`` pieces (``mac_parse``)."""
    literal: list[str] = []
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if ch != "$":
            literal.append(ch)
            i += 1
            continue
        if i + 1 < n and value[i + 1] == "$":
            literal.append("$")
            i += 2
            continue
        if literal:
            yield False, "".join(literal)
            literal = []
        i += 1
        if i < n and value[i] in "({":
            opening = value[i]
            closing = ")" if opening == "(" else "}"
            level, start = 1, i + 1
            j = start
            while level > 0:
                if j >= n:
                    raise ExpansionError(f'truncated macro reference: "{value}"')
                if value[j] == opening:
                    level += 1
                elif value[j] == closing:
                    level -= 1
                j += 1
            macro = value[start : j - 1]
            i = j
        else:
            j = i
            while j < n and value[j] in NAME_CHARS:
                j += 1
            macro = value[i:j]
            i = j
        if not macro:
            raise ExpansionError(f'empty macro name: "{value}"')
        yield True, macro
    if literal:
        yield False, "".join(literal)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in SPACE:
        i += 1
    return i


def _curly(text: str, i: int) -> tuple[str, int]:
    """Extract the balanced ``{payload}`` starting at ``text[i] == '{'``."""
    level, j = 1, i + 1
    while True:
        if j >= len(text):
            raise ExpansionError(f'unbalanced {{}} in attribute expression: "{text[i:]}"')
        if text[j] == "{":
            level += 1
        elif text[j] == "}":
            level -= 1
            if level == 0:
                break
        j += 1
    return text[i + 1 : j], _skip_space(text, j + 1)


def _strtol(text: str) -> tuple[int | None, str]:
    """C ``strtol`` base 10: leading white space and a sign allowed; rest returned."""
    i = _skip_space(text, 0)
    j = i + 1 if i < len(text) and text[i] in "+-" else i
    k = j
    while k < len(text) and text[k].isascii() and text[k].isdigit():
        k += 1
    if k == j:
        return None, text
    return int(text[i:k]), text[k:]


def compat_level(text: str) -> tuple[int, int, int]:
    """Parse a compatibility level ``major[.minor[.patch]]`` (``compat_level.c``)."""
    parts: list[int] = []
    rest = text
    for limit in (None, 1023, 1023):
        number, after = _strtol(rest)
        if number is None or number < 0 or (limit is not None and number > limit):
            break
        if after and not after.startswith("."):
            break
        parts.append(number)
        if not after:
            return (parts + [0, 0])[0], (parts + [0, 0])[1], (parts + [0, 0])[2]
        if len(parts) == 3:
            break
        rest = after[1:]
    raise ExpansionError(f'malformed compatibility level syntax: "{text}"')


def _compare(left: str, op: str, right: str, suffix: str) -> bool:
    delta: int | tuple[int, int, int]
    if suffix == "level":
        lv, rv = compat_level(left), compat_level(right)
        delta = (lv > rv) - (lv < rv)
    elif left.isascii() and right.isascii() and left.isdigit() and right.isdigit():
        delta = int(left) - int(right)
    else:
        delta = (left > right) - (left < right)
    return {
        "==": delta == 0,
        "!=": delta != 0,
        "<": delta < 0,
        "<=": delta <= 0,
        ">=": delta >= 0,
        ">": delta > 0,
    }[op]


class _Expander:
    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup
        self.level = 0

    def expand(self, value: str) -> str:
        out: list[str] = []
        for is_macro, text in _parse(value):
            if not is_macro:
                out.append(text)
                continue
            self.level += 1
            if self.level > MAX_NESTING:
                raise ExpansionError(f'unreasonable macro call nesting: "{text}"')
            out.append(self._macro(text))
            self.level -= 1
        return "".join(out)

    def _relational(self, text: str, i: int) -> tuple[str, int]:
        left, i = _curly(text, i)
        j = i
        while j < len(text) and text[j] in OPERATOR_CHARS:
            j += 1
        op = text[i:j]
        if op not in OPERATORS:
            expected = " or ".join(f'"{o}"' for o in OPERATORS)
            raise ExpansionError(f'{expected} expected at: "...{left}}}>>>{text[i : i + 20]}"')
        k = j
        while k < len(text) and text[k] in ALNUM:
            k += 1
        suffix = text[j:k]
        if suffix and suffix not in OPERATOR_SUFFIXES:
            raise ExpansionError(f'bad operator suffix at: "...{op}>>>{suffix}"')
        k = _skip_space(text, k)
        if k >= len(text) or text[k] != "{":
            raise ExpansionError(
                f'"{{expression}}" expected at: "...{{{left}}} {op}{suffix}>>>{text[k : k + 20]}"'
            )
        right, k = _curly(text, k)
        result = _compare(self.expand(left), op, self.expand(right), suffix)
        return (TRUE if result else FALSE), k

    def _name(self, text: str) -> tuple[str | None, str, int]:
        """Parse ``name``, ``name?...`` or ``name:...``; return (lookup, operator, index)."""
        start = i = _skip_space(text, 0)
        while True:
            j = _skip_space(text, i)
            if j >= len(text):
                return self.lookup(text[start:i], False), "", len(text)
            if text[j] in "?:":
                return self.lookup(text[start:i], True), text[j], j + 1
            if text[i] not in NAME_CHARS:
                raise ExpansionError(
                    f'attribute name syntax error at: "...{text[:i]}>>>{text[i:]}"'
                )
            i += 1

    def _operand(self, text: str, i: int) -> tuple[str, int]:
        j = _skip_space(text, i)
        if j < len(text) and text[j] == "{":
            return _curly(text, j)
        return text[i:], len(text)

    def _macro(self, text: str) -> str:
        i = _skip_space(text, 0)
        lookup: str | None
        if i < len(text) and text[i] == "{":
            lookup, i = self._relational(text, i)
            op = text[i] if i < len(text) else ""
            if op and op not in "?:":
                raise ExpansionError(f'"?" or ":" expected at: "...}}>>>{text[i : i + 20]}"')
            i += 1
        else:
            lookup, op, i = self._name(text)
        if op == "":
            return lookup or ""
        out = ""
        if op == "?":
            iftrue, i = self._operand(text, i)
            if lookup:
                out = self.expand(iftrue)
            if i >= len(text):
                return out
            if text[i] != ":":
                raise ExpansionError(f'":" expected at: "...{iftrue}}}>>>{text[i : i + 20]}"')
            i += 1
        iffalse, i = self._operand(text, i)
        if not lookup:
            out = self.expand(iffalse)
        if i < len(text):
            raise ExpansionError(f'unexpected input at: "...{iffalse}}}>>>{text[i : i + 20]}"')
        return out


def expand(value: str, lookup: Lookup) -> str:
    """Expand every ``$`` form in *value*; see the module docstring."""
    return _Expander(lookup).expand(value)


def references(value: str) -> set[str]:
    """Names that *value* mentions as ``$name``, ``${name...}`` or ``$(name...)``.

    Used for Postfix's "unused parameter" rule (``postconf_unused.c``): a user-defined
    parameter that another value refers to is not unused. Never raises.
    """
    names: set[str] = set()
    i, n = 0, len(value)
    while i < n:
        if value[i] != "$":
            i += 1
            continue
        if value.startswith("$$", i):
            i += 2
            continue
        j = i + 1
        if j < n and value[j] in "({":
            j = _skip_space(value, j + 1)
        k = j
        while k < n and value[k] in NAME_CHARS:
            k += 1
        if k > j:
            names.add(value[j:k])
        i = max(k, i + 1)
    return names
