"""Translation of POSIX and PCRE regular expressions to Python :mod:`re` syntax.

Python's engine stands in for both glibc ``regcomp()`` (``regexp:``) and PCRE2 (``pcre:``).
What is translated:

* bracket expressions: POSIX classes ``[[:alpha:]]`` (both dialects), ``[=c=]``, ``[.c.]``; in
  POSIX a backslash inside brackets is a literal backslash; ``[``, ``&``, ``~``, ``|`` and
  stray ``-`` are escaped so Python never reads them as set operations;
* POSIX ERE: ``\\<`` ``\\>`` (word start/end), ``\\``` ``\\'``, ``$`` (end of string only,
  unless ``m``), ``\\c`` for any other ``c`` is a literal ``c``; POSIX BRE (``regexp:`` flag
  ``x``): ``\\( \\) \\{ \\} \\| \\+ \\?`` are the operators and their bare forms literals;
* PCRE: ``(?<name>`` and ``(?'name'``, ``\\k<name>``, ``\\z``, ``\\Z``, ``\\Q...\\E``, ``\\h``,
  flag ``E`` (``$`` at the very end only) and ``U`` (swap greedy and lazy quantifiers).

Known differences that remain: POSIX picks the leftmost-*longest* match, Python the
leftmost-first (this changes ``$n`` only for alternations whose first branch is a prefix of a
later one); ``\\w``, ``\\d`` and case folding follow Unicode, not the C locale; PCRE-only syntax
Python lacks (recursion ``(?R)``, ``\\K``, callouts, ``\\p{..}``) is reported as an error
at load time.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

_PUNCT = "".join("\\" + c for c in string.punctuation)
POSIX_CLASSES = {
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "a-zA-Z0-9",
    "upper": "A-Z",
    "lower": "a-z",
    "space": " \\t\\n\\r\\f\\v",
    "blank": " \\t",
    "punct": _PUNCT,
    "print": "\\x20-\\x7e",
    "graph": "\\x21-\\x7e",
    "cntrl": "\\x00-\\x1f\\x7f",
    "xdigit": "0-9A-Fa-f",
    "word": "\\w",
}


class RegexSyntaxError(ValueError):
    """A pattern that cannot be translated; ``str()`` says why."""


def _class_char(c: str) -> str:
    if c.isascii() and not c.isalnum():
        return "\\" + c
    return c


@dataclass(frozen=True)
class _Item:
    text: str
    single: bool  # one character (may be a range end point)


def _bracket_item(p: str, j: int, *, posix: bool) -> tuple[_Item | None, int]:
    """One element of a bracket expression at ``p[j]``: a class, a character, or a dash."""
    c = p[j]
    if c == "[" and p[j + 1 : j + 2] in (":", "=", "."):
        kind = p[j + 1]
        end = p.find(kind + "]", j + 2)
        if end < 0:
            raise RegexSyntaxError(f"unterminated [{kind} in bracket expression")
        name = p[j + 2 : end]
        if kind == ":":
            if name not in POSIX_CLASSES:
                raise RegexSyntaxError(f"invalid character class name: [:{name}:]")
            return _Item(POSIX_CLASSES[name], False), end + 2
        if len(name) == 1:
            return _Item(_class_char(name), True), end + 2
        raise RegexSyntaxError(f"invalid collation character: [{kind}{name}{kind}]")
    if c == "\\" and not posix:
        if j + 1 >= len(p):
            raise RegexSyntaxError("\\ at end of pattern")
        return _Item(p[j : j + 2], p[j + 1] not in "dDsSwWhHvVpPN"), j + 2
    if c == "-":
        return None, j + 1
    return _Item(_class_char(c), True), j + 1


def translate_bracket(p: str, i: int, *, posix: bool) -> tuple[str, int]:
    """Translate the bracket expression starting at ``p[i] == "["``; return (text, next index)."""
    j = i + 1
    negate = ""
    if p[j : j + 1] == "^":
        negate, j = "^", j + 1
    items: list[_Item | None] = []  # None is a range dash
    first = True
    while True:
        if j >= len(p):
            raise RegexSyntaxError("unmatched [ or [^")
        if p[j] == "]" and not first:
            j += 1
            break
        first = False
        item, j = _bracket_item(p, j, posix=posix)
        items.append(item)
    out: list[str] = []
    for k, item in enumerate(items):
        if item is not None:
            out.append(item.text)
            continue
        before = items[k - 1] if k > 0 else None
        after = items[k + 1] if k + 1 < len(items) else None
        is_range = before is not None and after is not None and before.single and after.single
        out.append("-" if is_range else "\\-")
    return "[" + negate + "".join(out) + "]", j


_ERE_ESCAPES = {"<": r"\b(?=\w)", ">": r"\b(?<=\w)", "`": r"\A", "'": r"\Z"}
_BRE_OPERATORS = {"(": "(", ")": ")", "{": "{", "}": "}", "|": "|", "+": "+", "?": "?"}


def translate_posix(p: str, *, extended: bool, newline: bool) -> str:
    """Translate a POSIX ERE (or BRE when not ``extended``) to Python syntax."""
    out: list[str] = []
    i = 0
    at_start = True  # where a BRE "*" is literal
    while i < len(p):
        c = p[i]
        was_start, at_start = at_start, False
        if c == "\\":
            if i + 1 >= len(p):
                raise RegexSyntaxError("trailing backslash (\\)")
            nxt = p[i + 1]
            i += 2
            if not extended and nxt in _BRE_OPERATORS:
                out.append(_BRE_OPERATORS[nxt])
                at_start = nxt in "(|"
            elif nxt in _ERE_ESCAPES:
                out.append(_ERE_ESCAPES[nxt])
            elif nxt in "wWsSbB123456789":
                out.append("\\" + nxt)
            else:
                out.append(_class_char(nxt))
            continue
        if c == "[":
            text, i = translate_bracket(p, i, posix=True)
            out.append(text)
            continue
        i += 1
        if c == "$" and not newline:
            out.append(r"\Z")
        elif not extended and (c in "(){}|+?" or (c == "*" and was_start)):
            out.append("\\" + c)
        elif extended and c == "(" and p[i : i + 1] in ("?", "*", "+"):
            raise RegexSyntaxError("invalid preceding regular expression")
        else:
            out.append(c)
            at_start = c == "^" and was_start or (extended and c in "(|")
    return "".join(out)


def _quantifier_end(p: str, i: int) -> int:
    """If a quantifier starts at ``p[i]``, the index after it, else ``i``."""
    if p[i] in "*+?":
        return i + 1
    if p[i] == "{":
        close = p.find("}", i)
        body = p[i + 1 : close] if close > 0 else ""
        low, _, high = body.partition(",")
        if low.isdigit() and (not high or high.isdigit()):
            return close + 1
    return i


def _pcre_escape(p: str, i: int) -> tuple[str, int]:
    """Translate the escape at ``p[i] == "\\\\"``; return (text, next index)."""
    if i + 1 >= len(p):
        raise RegexSyntaxError("\\ at end of pattern")
    c = p[i + 1]
    if c == "z":
        return r"\Z", i + 2
    if c == "Z":
        return r"(?=\n?\Z)", i + 2
    if c == "h":
        return r"[ \t\xa0]", i + 2
    if c == "Q":
        end = p.find("\\E", i + 2)
        end = len(p) if end < 0 else end
        quoted = "".join(_class_char(ch) for ch in p[i + 2 : end])
        return quoted, min(end + 2, len(p))
    if c == "k" and p[i + 2 : i + 3] in ("<", "'", "{"):
        close = {"<": ">", "'": "'", "{": "}"}[p[i + 2]]
        end = p.find(close, i + 3)
        if end < 0:
            raise RegexSyntaxError("\\k is not followed by a group name")
        return f"(?P={p[i + 3 : end]})", end + 1
    return p[i : i + 2], i + 2


def translate_pcre(p: str, *, dollar_endonly: bool, ungreedy: bool) -> str:
    """Translate PCRE syntax that Python spells differently (see the module docstring)."""
    out: list[str] = []
    i = 0
    while i < len(p):
        c = p[i]
        if c == "\\":
            text, i = _pcre_escape(p, i)
            out.append(text)
        elif c == "[":
            text, i = translate_bracket(p, i, posix=False)
            out.append(text)
        elif p.startswith("(?<", i) and p[i + 3 : i + 4] not in ("=", "!"):
            out.append("(?P<")
            i += 3
        elif p.startswith("(?'", i):
            end = p.find("'", i + 3)
            if end < 0:
                raise RegexSyntaxError("unterminated group name")
            out.append(f"(?P<{p[i + 3 : end]}>")
            i = end + 1
        elif p.startswith("(?", i):
            out.append("(?")
            i += 2
        elif c == "$" and dollar_endonly:
            out.append(r"\Z")
            i += 1
        elif ungreedy and _quantifier_end(p, i) > i and out:
            end = _quantifier_end(p, i)
            out.append(p[i:end])
            i = end
            if p[i : i + 1] == "?":
                i += 1
            elif p[i : i + 1] != "+":
                out.append("?")
        else:
            out.append(c)
            i += 1
    return "".join(out)
