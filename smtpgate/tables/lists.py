"""Postfix match lists: ``DomainList`` (relay_domains, mydestination...) and ``AddressList``
(mynetworks). Postfix ``util/match_list.c``, ``util/match_ops.c``, ``global/domain_list.c``,
``global/addr_match_list.c``.

Parsing (``match_list_parse``): each entry is ``[!...]pattern``; every ``!`` toggles the sense.
``/file/name`` is replaced by the patterns in that file (lines starting with ``#`` skipped, each
line split on commas and whitespace; ``!/file`` negates them all). ``type:table`` (an entry with
a ``:`` that does not start with ``[``) is opened with :func:`~.registry.open_table`. An entry
starting with ``#`` ends the list with a warning ("comment at end of line is not supported").

Matching (``match_list_match``): patterns are tried in order; the first that matches decides,
``True`` or, when negated, ``False``; no match is ``False``. Names and addresses compare case
insensitively. A table error raises :class:`~smtpgate.errors.TableLookupError`.

* Domains (``match_hostname``): exact match; with ``parent_matches_subdomains`` an entry also
  matches names below it, otherwise only ``.example.com`` does (and then only names below it).
  A table is asked for the name, then (non-pattern tables only) for each parent: ``b.c``, ``c``
  with ``parent_matches_subdomains``, else ``.b.c``, ``.c``.
* Addresses (``match_hostaddr``): an address with characters other than hex digits, ``.`` and
  ``:`` matches nothing; a table is asked for the address string; ``1.2.3.4`` and ``[::1]`` match
  literally; ``net/len``, ``[ipv6]/len`` and ``[ipv6]`` match by value. Postfix checks net/mask
  syntax at each match and fails temporarily; smtpgate checks it at load. A bare IPv6 address is
  read by Postfix as a ``type:table`` and is an error here with a hint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smtpgate.errors import TableOpenError

from .base import Table, decode_table_text
from .cidr import Address, CidrPattern, PatternError, parse_address, parse_cidr_pattern
from .lines import split_braced
from .registry import open_table

_V4_CHARS = frozenset("0123456789.")
_V6_CHARS = _V4_CHARS | frozenset("abcdefABCDEF:")
_NET_CHARS = _V6_CHARS | frozenset("[]/")

Location = tuple[str, int] | None


def _is_table(item: str) -> bool:
    """Postfix ``MATCH_DICTIONARY()``."""
    return not item.startswith("[") and ":" in item


@dataclass(frozen=True)
class _Entry:
    """One parsed pattern: literal text (case folded), a table, or an address pattern."""

    match: bool
    text: str
    table: Table | None = None
    cidr: CidrPattern | None = None


class _ListParser:
    """Expands entries into ``_Entry`` objects, shared by both list kinds."""

    def __init__(
        self,
        title: str,
        base_dir: str | os.PathLike[str] | None,
        location: Location,
        literal: Callable[[bool, str, _ListParser], _Entry],
    ) -> None:
        self.title = title
        self.base_dir = base_dir
        self.location = location
        self.literal = literal
        self.entries: list[_Entry] = []
        self.warnings: list[str] = []

    def error(self, message: str) -> TableOpenError:
        if self.location is None:
            return TableOpenError(f"{self.title}: {message}")
        return TableOpenError(f"{self.title}: {message}", *self.location)

    def parse(self, items: Sequence[str], init_match: bool = True) -> None:
        for index, raw in enumerate(items):
            item = raw.strip()
            if not item:
                continue
            if item.startswith("#"):
                rest = " ".join(items[index + 1 :])
                self.warnings.append(
                    f"{self.title}: comment at end of line is not supported: {item} {rest}"
                )
                return
            match = init_match
            while item.startswith("!"):
                match, item = not match, item[1:]
            if not item:
                raise self.error("no pattern after '!'")
            if item.startswith("/"):
                self.parse_file(item, match)
            elif _is_table(item):
                table = open_table(item, base_dir=self.base_dir, location=self.location)
                self.entries.append(_Entry(match, item, table=table))
            else:
                self.entries.append(self.literal(match, item.casefold(), self))

    def parse_file(self, path: str, match: bool) -> None:
        try:
            with open(path, "rb") as f:
                text = decode_table_text(f.read(), path)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise self.error(f"open file {path}: {reason}") from exc
        for line in text.split("\n"):
            if not line.startswith("#"):
                self.parse(split_braced(line), match)


def _check_address_pattern(match: bool, item: str, parser: _ListParser) -> _Entry:
    """Validate an address-list literal at load: ``match_hostaddr``'s tests, done once."""
    if (
        (":" not in item and "/" not in item)
        or set(item) <= _V4_CHARS
        or not set(item) <= _NET_CHARS
    ):
        if parse_address(item.removeprefix("[").removesuffix("]")) is None:
            parser.warnings.append(f'{parser.title}: "{item}" is not an address and never matches')
        return _Entry(match, item)
    try:
        return _Entry(match, item, cidr=parse_cidr_pattern(item))
    except PatternError as exc:
        raise parser.error(str(exc)) from None


def _domain_literal(match: bool, item: str, parser: _ListParser) -> _Entry:
    return _Entry(match, item)


def _parent_keys(name: str, parent: bool) -> list[str]:
    """The keys ``match_hostname`` tries in a non-pattern table, the name first."""
    keys: list[str] = []
    entry = name
    while entry:
        keys.append(entry)
        dot = entry.find(".", 1)
        if dot < 0:
            break
        entry = entry[dot + 1 :] if parent else entry[dot:]
    return keys


class DomainList:
    """A Postfix domain list such as ``relay_domains`` or ``mydestination``."""

    def __init__(self, title: str, entries: Sequence[_Entry], parent: bool, warnings: list[str]):
        self.title = title
        self.entries = tuple(entries)
        self.parent_matches_subdomains = parent
        self.warnings = tuple(warnings)

    @classmethod
    def parse(
        cls,
        entries: Sequence[str],
        *,
        base_dir: str | os.PathLike[str] | None = None,
        parent_matches_subdomains: bool,
        title: str,
        location: Location = None,
    ) -> DomainList:
        parser = _ListParser(title, base_dir, location, _domain_literal)
        parser.parse(entries)
        return cls(title, parser.entries, parent_matches_subdomains, parser.warnings)

    def _matches(self, name: str, entry: _Entry) -> bool:
        if entry.table is not None:
            keys = (
                [name]
                if entry.table.is_pattern
                else _parent_keys(name, self.parent_matches_subdomains)
            )
            return any(entry.table.lookup(key) is not None for key in keys)
        pattern = entry.text
        if name == pattern:
            return True
        if len(name) <= len(pattern) or not name.endswith(pattern):
            return False
        if self.parent_matches_subdomains:
            return name[-len(pattern) - 1] == "."
        return pattern.startswith(".")

    def match(self, domain: str) -> bool:
        """Whether ``domain`` is in the list; raise TableLookupError on a table error."""
        name = domain.casefold()
        for entry in self.entries:
            if self._matches(name, entry):
                return entry.match
        return False


ANSWERS_KEPT = 4096


class AddressList:
    """A Postfix address list such as ``mynetworks``."""

    def __init__(self, title: str, entries: Sequence[_Entry], warnings: list[str]):
        self.title = title
        self.entries = tuple(entries)
        self.warnings = tuple(warnings)
        # Without tables the answer depends on the address alone: remembered (bounded).
        self._answers: dict[str, bool] | None = (
            None if any(entry.table is not None for entry in self.entries) else {}
        )

    @classmethod
    def parse(
        cls,
        entries: Sequence[str],
        *,
        base_dir: str | os.PathLike[str] | None = None,
        title: str,
        location: Location = None,
    ) -> AddressList:
        parser = _ListParser(title, base_dir, location, _check_address_pattern)
        bare_v6 = [e.lstrip("!") for e in entries if _is_bare_ipv6(e.strip().lstrip("!"))]
        if bare_v6:
            item = bare_v6[0]
            address, slash, length = item.partition("/")
            raise parser.error(
                f'bare IPv6 pattern "{item}": write it as "[{address}]{slash}{length}"'
            )
        parser.parse(entries)
        return cls(title, parser.entries, parser.warnings)

    def match(self, address: str) -> bool:
        """Whether ``address`` is in the list; raise TableLookupError on a table error."""
        answers = self._answers
        if answers is None:
            return self._match(address)
        found = answers.get(address)
        if found is None:
            if len(answers) >= ANSWERS_KEPT:
                answers.clear()
            found = answers[address] = self._match(address)
        return found

    def _match(self, address: str) -> bool:
        addr = address.casefold()
        if not addr or not set(addr) <= _V6_CHARS:
            return False
        parsed = parse_address(addr)
        for entry in self.entries:
            if self._matches(addr, parsed, entry):
                return entry.match
        return False

    @staticmethod
    def _matches(addr: str, parsed: Address | None, entry: _Entry) -> bool:
        if entry.table is not None:
            return entry.table.lookup(addr) is not None
        if addr == entry.text or f"[{addr}]" == entry.text:
            return True
        if entry.cidr is None or parsed is None or (":" in addr) != (":" in entry.text):
            return False
        return entry.cidr.matches(parsed)


def _is_bare_ipv6(item: str) -> bool:
    address, _, length = item.partition("/")
    return (
        ":" in address and parse_address(address) is not None and (not length or length.isdigit())
    )
