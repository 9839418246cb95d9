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

Errors are Postfix 3.7's messages (``bad mask length in "1.2.3.4/33"``, ``non-null host address
bits in ...``, ``ENDIF without IF``...). Postfix logs them and skips the rule; smtpgate refuses
to load the table. An ``if`` without ``endif`` is a warning, as in Postfix.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .base import SPACE, TableSource
from .lines import Rules

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class PatternError(ValueError):
    """A cidr pattern that does not parse; ``str()`` is Postfix's reason."""


def parse_address(text: str) -> Address | None:
    """``inet_pton()``: the family follows from a ``:``; anything else is ``None``."""
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


def _keyword(line: str, word: str) -> str | None:
    """The text after ``word`` when ``line`` starts with it (any case) as a whole word."""
    if line[: len(word)].lower() == word and not line[len(word) : len(word) + 1].isalnum():
        return line[len(word) :].strip(SPACE)
    return None


class CidrTable:
    """A ``cidr:`` table: ordered rules, first match wins."""

    type = "cidr"
    is_pattern = True

    def __init__(self, name: str, rules: list[_Rule], warnings: list[str]) -> None:
        self.name = name
        self.rules = rules
        self.warnings = tuple(warnings)

    def lookup(self, key: str) -> str | None:
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


def _parse_rule(line: str) -> tuple[str, CidrPattern | None, str | None]:
    """Classify one rule as ("if"|"endif"|"match", pattern, value); raise PatternError."""
    condition = _keyword(line, "if")
    if condition is not None:
        return "if", parse_cidr_pattern(condition), None
    after_endif = _keyword(line, "endif")
    if after_endif is not None:
        if after_endif:
            raise PatternError("garbage after ENDIF")
        return "endif", None, None
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
    return "match", parsed, value


def parse_cidr(rules: Rules, name: str) -> CidrTable:
    """Compile cidr rules; raise TableOpenError naming the file (or in-line rule) and line."""
    compiled: list[_Rule] = []
    open_ifs: list[tuple[int, int]] = []  # (index in compiled, line number)
    for number, raw in rules.lines:
        line = raw.rstrip(SPACE)
        try:
            kind, pattern, value = _parse_rule(line)
        except PatternError as exc:
            raise rules.error(number, str(exc)) from None
        if kind == "endif":
            if not open_ifs:
                raise rules.error(number, "ENDIF without IF")
            index, _ = open_ifs.pop()
            compiled[index] = _Rule(compiled[index].pattern, None, len(compiled))
            compiled.append(_Rule(None, None))
            continue
        if kind == "if":
            open_ifs.append((len(compiled), number))
        compiled.append(_Rule(pattern, value))
    for index, number in reversed(open_ifs):
        rules.warn(number, "IF has no matching ENDIF")
        compiled[index] = _Rule(compiled[index].pattern, None, len(compiled))
    return CidrTable(name, compiled, rules.warnings)


def parse_cidr_text(text: str, path: str) -> CidrTable:
    """Parse the text of a cidr table file named ``path``."""
    return parse_cidr(Rules.from_text(text, path), path)


def open_cidr(name: str, source: TableSource) -> CidrTable:
    return parse_cidr(Rules.from_source(source, "cidr"), name)
