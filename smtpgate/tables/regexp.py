"""``regexp:`` and ``pcre:`` tables, both compiled with Python's :mod:`re`.

Format (regexp_table(5), pcre_table(5), ``util/dict_regexp.c``, ``util/dict_pcre.c``): one rule
per logical line, tried in order, first match wins.

* ``/pattern/flags result``: any character that is not a letter or digit may delimit the pattern
  (``#`` cannot: such a line is a comment); a backslash escapes the delimiter.
* ``!/pattern/flags result`` matches when the pattern does not; ``!`` may repeat, blanks allowed.
* regexp: only: ``/pattern1/!/pattern2/ result`` (match the first and not the second).
* ``if /pattern/flags`` ... ``endif`` (any case, may nest).
* The result may use ``$1``, ``${1}``, ``$(1)`` for matched groups (an unmatched group is empty)
  and ``$$`` for a literal ``$``.
* Matching is case-insensitive by default; flag ``i`` toggles that. Other flags, as registered in
  :data:`REGEXP_OPTIONS` and :data:`PCRE_OPTIONS`: regexp ``m`` (toggle ``REG_NEWLINE``) and ``x``
  (toggle extended syntax: off means POSIX basic syntax); pcre ``m`` ``s`` ``x`` as in Perl,
  ``A`` (anchored at the start), ``E`` (``$`` only at the very end), ``U`` (ungreedy) and the
  obsolete ``X`` (accepted with a warning, as Postfix 3.7 with PCRE2 does). Keys are never case
  folded before matching.

How the POSIX and PCRE dialects are translated to Python, and what still differs, is in
:mod:`smtpgate.tables._regex`.

Every rule that Postfix 3.7 logs and skips is skipped here too, with Postfix's words kept in
``table.warnings`` (checked against ``postmap``):

* ``FILE, line N: REASON: skipping this rule`` (unknown option, ``no regexp``, ``$number found
  in negative match replacement text``, ``out of range replacement index "N"``...); pcre words a
  missing delimiter ``no closing regexp delimiter "/": ignoring this rule``;
* a bad ``$`` reference logs its reason, then ``FILE, line N: bad replacement syntax: skipping
  this rule``; ``mac_parse``'s own reasons (``empty macro name: "..."``, ``truncated macro
  reference: "..."``) carry no file and line, as in Postfix;
* a pattern that does not compile logs only the compiler's message: for regexp the glibc
  ``regerror()`` text where smtpgate knows it (``Invalid range end``), for pcre ``error in
  regex at offset N: ...`` with Python's message and offset, which differ from PCRE2's;
* ``ignoring ENDIF without matching IF``, ``ignoring unrecognized request``. A skipped ``if``
  opens no block, so its ``endif`` is skipped as well.

Warnings for rules that are kept: text after ``if`` (plus ``do not prepend whitespace to
statements between IF and ENDIF``) or ``endif``, ``if`` without ``endif``, pcre option ``X``,
and ``no replacement text: using empty string``: such a rule's result is ``""``, which Postfix's
``dict_get`` returns as found (``postmap -q`` prints an empty line) and ``maps_find`` turns into
a lookup error, as :class:`~.maps.Maps` does. A result that is not UTF-8 fails the lookup that
produces it (Postfix's ``dict_utf8``).

``table.items()`` lists ``(pattern, result, line)`` of every match rule, for ``check``'s lint.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._regex import RegexSyntaxError, translate_pcre, translate_posix
from .base import SPACE, TableSource, check_utf8_result
from .lines import Rules


class RuleError(ValueError):
    """A rule that Postfix skips; ``str()`` is Postfix's whole warning after ``line N: ``."""


class MacroSyntaxError(RuleError):
    """A ``mac_parse`` error: Postfix logs it without file and line."""


#: glibc ``regerror()`` texts for what Python (or the POSIX translation) reports.
_GLIBC_MESSAGES = (
    ("missing ), unterminated subpattern", "Unmatched ( or \\("),
    ("unbalanced parenthesis", "Unmatched ( or \\("),  # glibc's words for a stray \\)
    ("unterminated character set", "Unmatched [, [^, [:, [., or [="),
    ("unmatched [", "Unmatched [, [^, [:, [., or [="),
    ("unterminated [", "Unmatched [, [^, [:, [., or [="),
    ("nothing to repeat", "Invalid preceding regular expression"),
    ("multiple repeat", "Invalid preceding regular expression"),
    ("invalid preceding regular expression", "Invalid preceding regular expression"),
    ("bad character range", "Invalid range end"),
    ("invalid group reference", "Invalid back reference"),
    ("min repeat greater than max repeat", "Invalid content of \\{\\}"),
    ("the repetition number is too large", "Regular expression too big"),
    ("invalid character class name", "Invalid character class name"),
    ("invalid collation character", "Invalid collation character"),
    ("trailing backslash", "Trailing backslash"),
)


def _posix_message(message: str) -> str | None:
    """glibc's words for a Python or translation error message, when known."""
    lowered = message.lower()
    return next((glibc for python, glibc in _GLIBC_MESSAGES if python in lowered), None)


@dataclass(frozen=True)
class Options:
    """The flags of one pattern, after toggling the defaults."""

    icase: bool = True
    newline: bool = False  # regexp m / pcre m
    extended: bool = True  # regexp x toggles this off
    dotall: bool = False  # pcre s
    verbose: bool = False  # pcre x
    anchored: bool = False  # pcre A
    dollar_endonly: bool = False  # pcre E
    ungreedy: bool = False  # pcre U
    obsolete: str = ""  # flags accepted with a warning


def _toggle(field: str) -> Callable[[Options], Options]:
    def apply(options: Options) -> Options:
        value: bool = getattr(options, field)
        changes: dict[str, Any] = {field: not value}
        return dataclasses.replace(options, **changes)

    return apply


def _obsolete(flag: str) -> Callable[[Options], Options]:
    def apply(options: Options) -> Options:
        return dataclasses.replace(options, obsolete=options.obsolete + flag)

    return apply


REGEXP_OPTIONS: Mapping[str, Callable[[Options], Options]] = {
    "i": _toggle("icase"),
    "m": _toggle("newline"),
    "x": _toggle("extended"),
}
PCRE_OPTIONS: Mapping[str, Callable[[Options], Options]] = {
    "i": _toggle("icase"),
    "m": _toggle("newline"),
    "s": _toggle("dotall"),
    "x": _toggle("verbose"),
    "A": _toggle("anchored"),
    "E": _toggle("dollar_endonly"),
    "U": _toggle("ungreedy"),
    "X": _obsolete("X"),
}


def _compile_posix(pattern: str, options: Options) -> re.Pattern[str]:
    text = translate_posix(pattern, extended=options.extended, newline=options.newline)
    flags = re.MULTILINE if options.newline else re.DOTALL
    return re.compile(text, flags | (re.IGNORECASE if options.icase else 0))


def _compile_pcre(pattern: str, options: Options) -> re.Pattern[str]:
    text = translate_pcre(
        pattern,
        dollar_endonly=options.dollar_endonly and not options.newline,
        ungreedy=options.ungreedy,
    )
    flags = 0
    for wanted, flag in (
        (options.icase, re.IGNORECASE),
        (options.newline, re.MULTILINE),
        (options.dotall, re.DOTALL),
        (options.verbose, re.VERBOSE),
    ):
        flags |= flag if wanted else 0
    return re.compile(text, flags)


@dataclass(frozen=True)
class Dialect:
    """What distinguishes ``regexp:`` from ``pcre:``: flags, compiler, ``/a/!/b/`` support."""

    kind: str
    options: Mapping[str, Callable[[Options], Options]]
    compiler: Callable[[str, Options], re.Pattern[str]]
    second_pattern: bool
    zero_index: str  # how Postfix words "$0" (the two modules differ)
    no_delimiter: str  # how Postfix says it skips a rule without closing delimiter


REGEXP = Dialect("regexp", REGEXP_OPTIONS, _compile_posix, True, "out-of-range", "skipping")
PCRE = Dialect("pcre", PCRE_OPTIONS, _compile_pcre, False, "out of range", "ignoring")


@dataclass(frozen=True)
class Pattern:
    """One compiled ``[!]/regex/flags``."""

    regex: re.Pattern[str]
    match: bool
    anchored: bool

    def search(self, key: str) -> re.Match[str] | None:
        return self.regex.match(key) if self.anchored else self.regex.search(key)

    def hit(self, key: str) -> bool:
        return (self.search(key) is not None) == self.match


def _is_alnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


def _split_pattern(text: str, dialect: Dialect) -> tuple[str, str, bool, str]:
    """Read ``[!]/regex/flags`` off ``text``; return (regex, flags, match, rest)."""
    match, i = True, 0
    while i < len(text) and (text[i] == "!" or text[i] in SPACE):
        match = match if text[i] != "!" else not match
        i += 1
    if i == len(text):
        raise RuleError("no regexp: skipping this rule")
    delim, start = text[i], i + 1
    i = start
    while i < len(text) and text[i] != delim:
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        elif text[i] == "\\":
            break
        i += 1
    if i >= len(text) or text[i] != delim:
        raise RuleError(f'no closing regexp delimiter "{delim}": {dialect.no_delimiter} this rule')
    regex, i = text[start:i], i + 1
    flags_end = i
    stops = SPACE + ("!" if dialect.second_pattern else "")
    while flags_end < len(text) and text[flags_end] not in stops:
        flags_end += 1
    return regex, text[i:flags_end], match, text[flags_end:]


def _compile(text: str, dialect: Dialect, warn: Callable[[str], None]) -> tuple[Pattern, str]:
    """Compile the ``[!]/regex/flags`` at the start of ``text``; return the rest as well.

    Raise RuleError with Postfix's warning when the rule is to be skipped.
    """
    regex, flags, match, rest = _split_pattern(text, dialect)
    options = Options()
    for flag in flags:
        toggle = dialect.options.get(flag)
        if toggle is None:
            raise RuleError(f'unknown regexp option "{flag}": skipping this rule')
        options = toggle(options)
    if options.obsolete:
        warn(f'ignoring obsolete regexp option "{options.obsolete}"')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compiled = dialect.compiler(regex, options)
    except RegexSyntaxError as exc:
        raise _regex_error(dialect, str(exc), None) from None
    except re.error as exc:
        raise _regex_error(dialect, exc.msg, exc.pos or 0) from None
    except Warning as exc:
        raise _regex_error(dialect, str(exc), None) from None
    return Pattern(compiled, match, options.anchored), rest


def _regex_error(dialect: Dialect, message: str, offset: int | None) -> RuleError:
    """The compiler's complaint, as Postfix logs it (no "skipping this rule")."""
    if dialect.kind == "regexp":
        glibc = _posix_message(message)
        if glibc is not None:
            return RuleError(glibc)
    if offset is None:
        return RuleError(f"error in regex: {message}")
    return RuleError(f"error in regex at offset {offset}: {message}")


Replacement = tuple[str | int, ...]


def _macro_name(text: str, i: int) -> tuple[str, int]:
    """The ``$`` reference starting after the ``$`` at ``text[i - 1]`` (``mac_parse``)."""
    if text[i : i + 1] in ("{", "("):
        opener, closer = text[i], "}" if text[i] == "{" else ")"
        depth, j = 1, i + 1
        while j < len(text) and depth:
            depth += (text[j] == opener) - (text[j] == closer)
            j += 1
        if depth:
            raise MacroSyntaxError(f'truncated macro reference: "{text}"')
        name = text[i + 1 : j - 1]
    else:
        j = i
        while j < len(text) and (_is_alnum(text[j]) or text[j] == "_"):
            j += 1
        name = text[i:j]
    if not name:
        raise MacroSyntaxError(f'empty macro name: "{text}"')
    return name, j


def parse_replacement(text: str, zero_index: str = "out-of-range") -> Replacement:
    """Split result text into literals and group numbers; ``$$`` is ``$``.

    Raise RuleError with the reason Postfix logs before ``bad replacement syntax``.
    """
    parts: list[str | int] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            literal.append(text[i])
            i += 1
        elif text[i + 1 : i + 2] == "$":
            literal.append("$")
            i += 2
        else:
            name, i = _macro_name(text, i + 1)
            if not (name.isascii() and name.isdigit()):
                raise RuleError(f'non-numeric replacement index "{name}"')
            if int(name) < 1:
                raise RuleError(f'{zero_index} replacement index "{name}"')
            if literal:
                parts.append("".join(literal))
                literal.clear()
            parts.append(int(name))
    if literal:
        parts.append("".join(literal))
    return tuple(parts)


@dataclass(frozen=True)
class MatchRule:
    first: Pattern
    second: Pattern | None
    replacement: Replacement
    pattern_text: str = ""  # the pattern(s) as written
    result_text: str = ""  # the result as written
    line: int = 0

    def apply(self, key: str) -> str | None:
        found = self.first.search(key)
        if (found is not None) != self.first.match:
            return None
        if self.second is not None and not self.second.hit(key):
            return None
        if found is None or not self.first.match:
            return "".join(str(part) for part in self.replacement)
        return "".join(
            part if isinstance(part, str) else (found.group(part) or "")
            for part in self.replacement
        )


@dataclass(frozen=True)
class IfRule:
    condition: Pattern
    skip_to: int  # index of the matching ENDIF, or len(rules)


@dataclass(frozen=True)
class EndifRule:
    pass


Rule = MatchRule | IfRule | EndifRule


class RegexpTable:
    """A ``regexp:`` or ``pcre:`` table: ordered rules, first match wins."""

    is_pattern = True

    def __init__(
        self,
        type: str,
        name: str,
        rules: list[Rule],
        warnings: list[str],
        path: str | None = None,
    ) -> None:
        self.type = type
        self.name = name
        self.rules = rules
        self.warnings = tuple(warnings)
        self.path = path

    def items(self) -> list[tuple[str, str, int]]:
        """Every match rule's ``(pattern, result, line)``, for ``check``'s lint of results."""
        return [
            (r.pattern_text, r.result_text, r.line) for r in self.rules if isinstance(r, MatchRule)
        ]

    def lookup(self, key: str) -> str | None:
        return check_utf8_result(self, key, self._find(key))

    def _find(self, key: str) -> str | None:
        i = 0
        while i < len(self.rules):
            rule = self.rules[i]
            if isinstance(rule, MatchRule):
                value = rule.apply(key)
                if value is not None:
                    return value
            elif isinstance(rule, IfRule) and not rule.condition.hit(key):
                i = rule.skip_to
            i += 1
        return None


def _keyword(line: str, word: str) -> str | None:
    if line[: len(word)].lower() == word and not _is_alnum(line[len(word) : len(word) + 1]):
        return line[len(word) :]
    return None


class _Parser:
    """Turns numbered rule lines into :data:`Rule` objects, tracking IF/ENDIF nesting."""

    def __init__(self, rules: Rules, dialect: Dialect) -> None:
        self.rules = rules
        self.dialect = dialect
        self.compiled: list[Rule] = []
        self.open_ifs: list[tuple[int, int]] = []  # (index in compiled, line number)
        self.number = 0

    def warn(self, message: str) -> None:
        self.rules.warn(self.number, message)

    def parse(self) -> list[Rule]:
        for number, raw in self.rules.lines:
            self.number = number
            line = raw.rstrip(SPACE)
            try:
                self.parse_line(line)
            except RuleError as exc:
                self.warn(str(exc))
        for index, number in reversed(self.open_ifs):
            self.rules.warn(number, "IF has no matching ENDIF")
            self.close_if(index)
        return self.compiled

    def parse_line(self, line: str) -> None:
        if not _is_alnum(line[:1]):
            self.compiled.append(self.match_rule(line))
        elif (condition := _keyword(line, "if")) is not None:
            pattern, rest = _compile(condition.lstrip(SPACE), self.dialect, self.warn)
            if rest.strip(SPACE):
                self.warn(f'ignoring extra text after IF statement: "{rest.strip(SPACE)}"')
                self.warn("do not prepend whitespace to statements between IF and ENDIF")
            self.open_ifs.append((len(self.compiled), self.number))
            self.compiled.append(IfRule(pattern, -1))
        elif (after := _keyword(line, "endif")) is not None:
            if not self.open_ifs:
                raise RuleError("ignoring ENDIF without matching IF")
            if after.strip(SPACE):
                self.warn("ignoring extra text after ENDIF")
            self.close_if(self.open_ifs.pop()[0])
            self.compiled.append(EndifRule())
        else:
            raise RuleError("ignoring unrecognized request")

    def close_if(self, index: int) -> None:
        if_rule = self.compiled[index]
        assert isinstance(if_rule, IfRule)
        self.compiled[index] = IfRule(if_rule.condition, len(self.compiled))

    def match_rule(self, line: str) -> MatchRule:
        first, rest = _compile(line, self.dialect, self.warn)
        second = None
        if self.dialect.second_pattern and rest.startswith("!"):
            second, rest = _compile(rest, self.dialect, self.warn)
        pattern_text = line[: len(line) - len(rest)]
        result = rest.strip(SPACE)
        if not result:
            self.warn("no replacement text: using empty string")
        try:
            replacement = parse_replacement(result, self.dialect.zero_index)
        except MacroSyntaxError as exc:
            self.rules.warnings.append(str(exc))
            raise RuleError("bad replacement syntax: skipping this rule") from None
        except RuleError as exc:
            self.warn(str(exc))
            raise RuleError("bad replacement syntax: skipping this rule") from None
        groups = max((p for p in replacement if isinstance(p, int)), default=0)
        if groups and not first.match:
            raise RuleError("$number found in negative match replacement text: skipping this rule")
        if groups > first.regex.groups:
            raise RuleError(f'out of range replacement index "{groups}": skipping this rule')
        return MatchRule(first, second, replacement, pattern_text, result, self.number)


def parse_regexp(rules: Rules, name: str, dialect: Dialect = REGEXP) -> RegexpTable:
    """Compile regexp/pcre rules; a bad rule is skipped with Postfix's warning."""
    compiled = _Parser(rules, dialect).parse()
    return RegexpTable(dialect.kind, name, compiled, rules.warnings, rules.path)


def parse_regexp_text(text: str, path: str, *, pcre: bool = False) -> RegexpTable:
    """Parse the text of a regexp (or, with ``pcre``, a pcre) table file named ``path``."""
    return parse_regexp(Rules.from_text(text, path), path, PCRE if pcre else REGEXP)


def open_regexp(name: str, source: TableSource) -> RegexpTable:
    return parse_regexp(Rules.from_source(source, "regexp"), name, REGEXP)


def open_pcre(name: str, source: TableSource) -> RegexpTable:
    return parse_regexp(Rules.from_source(source, "pcre"), name, PCRE)
