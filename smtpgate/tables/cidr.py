"""``cidr:`` tables and the address/mask patterns they share with ``mynetworks``.

Format (cidr_table(5), ``util/dict_cidr.c``, ``util/cidr_match.c``): one rule per logical line,
first match wins.

* ``pattern result``: ``pattern`` is an address (``/32`` or ``/128``) or ``network/length``;
  either may be written in brackets (``[2001:db8::]/32``, ``[1.2.3.4]``, ``[::1/128]``).
  A pattern with ``:`` is IPv6; it only ever matches IPv6 keys, and IPv4 likewise.
* ``!pattern result`` negates (``!`` may repeat and be followed by blanks).
* ``if pattern`` ... ``endif`` (case-insensitive, may nest): the rules inside are tried only
  when the key matches ``pattern``.
* A key that is not an IP address (``inet_pton`` rules: no leading zeros, no ``%scope``) is
  simply not found.

A bad rule is skipped with Postfix 3.7's warning, kept in ``table.warnings``: ``FILE, line N:
REASON: skipping this rule`` (``bad mask length in "1.2.3.4/33"``, ``non-null host address bits
in ...``, ``no lookup result``, ``ENDIF without IF``...). A skipped ``if`` does not open a block,
so its ``endif`` is skipped as ``ENDIF without IF``, as in Postfix. An ``if`` without ``endif``
is a warning and closes at the end of the table. A result that is not UTF-8 fails the lookup
that finds it, as in Postfix. Only an unreadable file or a malformed in-line ``{...}`` list is
a TableOpenError.

``table.items()`` lists ``(pattern, result, line)`` of every match rule, for ``check``'s lint.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from .base import SPACE, TableSource, check_utf8_result
from .lines import Rules

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class PatternError(ValueError):
    """A cidr pattern that does not parse; ``str()`` is Postfix's reason."""


@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> Address | None:
    """``inet_pton()``: the family follows from a ``:``; anything else is ``None``.

    Cached: the same client address is parsed at every RCPT of every session.
    """
    if "%" in text:
        return None
    try:
        if ":" in text:
            return ipaddress.IPv6Address(text)
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class CidrPattern:
    """One parsed ``[!]address[/length]`` pattern."""

    network: Network
    match: bool = True

    def matches(self, address: Address) -> bool:
        if address.version != self.network.version:
            return False
        return (address in self.network) == self.match


def _strip_brackets(pattern: str) -> str:
    if not pattern.startswith("["):
        return pattern
    inner, sep, after = pattern[1:].partition("]")
    if not sep:
        raise PatternError(f"missing ']' character after \"{pattern}\"")
    if after and not after.startswith("/"):
        raise PatternError(f'garbage after "[{inner}]"')
    return inner + after


def _parse_net_mask(pattern: str, mask: str) -> Network:
    whole = f"{pattern}/{mask}"
    bits = 128 if ":" in pattern else 32
    if not mask.isascii() or not mask.isdigit():
        raise PatternError(f'bad mask value in "{whole}"')
    length = int(mask)
    if length > bits:
        raise PatternError(f'bad mask length in "{whole}"')
    address = parse_address(pattern)
    if address is None:
        raise PatternError(f'bad network value in "{whole}"')
    network = ipaddress.ip_network((address, length), strict=False)
    if network.network_address != address:
        raise PatternError(
            f'non-null host address bits in "{whole}", '
            f'perhaps you should use "{network.network_address}/{length}" instead'
        )
    return network


def parse_cidr_pattern(text: str) -> CidrPattern:
    """Parse ``[!]...address[/length]``; raise PatternError worded like Postfix."""
    match = True
    rest = text
    while rest[:1] == "!" or rest[:1] in tuple(SPACE):
        if rest[0] == "!":
            match = not match
        rest = rest[1:]
    if not rest:
        raise PatternError("no address pattern")
    pattern = _strip_brackets(rest)
    address_part, slash, mask = pattern.partition("/")
    if slash:
        return CidrPattern(_parse_net_mask(address_part, mask), match)
    address = parse_address(pattern)
    if address is None:
        raise PatternError(f'bad address pattern: "{pattern}"')
    return CidrPattern(ipaddress.ip_network(address), match)


@dataclass(frozen=True)
class _Rule:
    pattern: CidrPattern | None  # None for ENDIF
    value: str | None  # None for IF and ENDIF
    skip_to: int = -1  # IF: index of its ENDIF (len(rules) when unmatched)
    text: str = ""  # the pattern as written
    line: int = 0


def _keyword(line: str, word: str) -> str | None:
    """The text after ``word`` when ``line`` starts with it (any case) as a whole word."""
    if line[: len(word)].lower() == word and not line[len(word) : len(word) + 1].isalnum():
        return line[len(word) :].strip(SPACE)
    return None


class CidrTable:
    """A ``cidr:`` table: ordered rules, first match wins."""

    type = "cidr"
    is_pattern = True

    def __init__(
        self, name: str, rules: list[_Rule], warnings: list[str], path: str | None = None
    ) -> None:
        self.name = name
        self.rules = rules
        self.warnings = tuple(warnings)
        self.path = path

    def items(self) -> list[tuple[str, str, int]]:
        """Every match rule's ``(pattern, result, line)``, for ``check``'s lint of results."""
        return [(r.text, r.value, r.line) for r in self.rules if r.value is not None]

    def lookup(self, key: str) -> str | None:
        return check_utf8_result(self, key, self._find(key))

    def _find(self, key: str) -> str | None:
        address = parse_address(key)
        if address is None:
            return None
        i = 0
        while i < len(self.rules):
            rule = self.rules[i]
            if rule.pattern is not None:
                hit = rule.pattern.matches(address)
                if rule.value is not None and hit:
                    return rule.value
                if rule.value is None and not hit:
                    i = rule.skip_to
            i += 1
        return None


def _parse_rule(line: str) -> tuple[str, CidrPattern | None, str | None, str]:
    """Classify one rule as ("if"|"endif"|"match", pattern, value, pattern text).

    Raise PatternError with Postfix's reason for skipping the rule.
    """
    condition = _keyword(line, "if")
    if condition is not None:
        return "if", parse_cidr_pattern(condition), None, condition
    after_endif = _keyword(line, "endif")
    if after_endif is not None:
        if after_endif:
            raise PatternError("garbage after ENDIF")
        return "endif", None, None, ""
    negations = len(line) - len(line.lstrip("!" + SPACE))
    first_space = next((i for i, ch in enumerate(line[negations:]) if ch in SPACE), None)
    if first_space is None:
        pattern, value = line[negations:], ""
    else:
        pattern = line[negations : negations + first_space]
        value = line[negations + first_space :].strip(SPACE)
    if not pattern:
        raise PatternError("no address pattern")
    parsed = parse_cidr_pattern(line[:negations] + pattern)
    if not value:
        raise PatternError("no lookup result")
    return "match", parsed, value, line[: negations + len(pattern)]


def parse_cidr(rules: Rules, name: str) -> CidrTable:
    """Compile cidr rules; a bad rule is skipped with Postfix's warning."""
    compiled: list[_Rule] = []
    open_ifs: list[int] = []  # indexes in compiled
    for number, raw in rules.lines:
        line = raw.rstrip(SPACE)
        try:
            kind, pattern, value, text = _parse_rule(line)
            if kind == "endif" and not open_ifs:
                raise PatternError("ENDIF without IF")
        except PatternError as exc:
            rules.warn(number, f"{exc}: skipping this rule")
            continue
        if kind == "endif":
            _close_if(compiled, open_ifs.pop())
            compiled.append(_Rule(None, None, line=number))
            continue
        if kind == "if":
            open_ifs.append(len(compiled))
        compiled.append(_Rule(pattern, value, text=text, line=number))
    for index in reversed(open_ifs):
        rules.warn(compiled[index].line, "IF has no matching ENDIF")
        _close_if(compiled, index)
    return CidrTable(name, compiled, rules.warnings, rules.path)


def _close_if(compiled: list[_Rule], index: int) -> None:
    """Point the IF at ``compiled[index]`` past the rules compiled so far."""
    rule = compiled[index]
    compiled[index] = _Rule(rule.pattern, None, len(compiled), rule.text, rule.line)


def parse_cidr_text(text: str, path: str) -> CidrTable:
    """Parse the text of a cidr table file named ``path``."""
    return parse_cidr(Rules.from_text(text, path), path)


def open_cidr(name: str, source: TableSource) -> CidrTable:
    return parse_cidr(Rules.from_source(source, "cidr"), name)
