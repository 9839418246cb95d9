"""DNS block and allow lists without I/O: query names, reply filters, answers, replies.

Ported from Postfix 3.7 ``smtpd_check.c`` (``find_dnsxl_addr``, ``find_dnsxl_domain``,
``rbl_pagein``, ``rbl_reject_reply``, ``rbl_expand_lookup``) and ``util/ip_match.c``
(the ``zone=127.0.0.[2..11]`` reply filters).

One difference from Postfix, on purpose: only A records in 127.0.0.0/8 are listings,
and 127.0.0.1 and 127.255.255.0/24 are list *errors* (Spamhaus answers 127.255.255.254
to queries through public resolvers, and others answer 127.0.0.1 when blocked).  Such
answers are logged and never reject or permit anything.  Postfix 3.7 treats every A
record as a listing unless a reply filter says otherwise.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from smtpgate.config.expand import ExpansionError, expand
from smtpgate.policy.address import valid_hostname, valid_ipv4_hostaddr, valid_ipv6_hostaddr

RBL_TXT_LIMIT = 500


class ZoneError(ValueError):
    """A malformed ``zone=filter`` argument (Postfix: "RBL reply error")."""


# -- zone arguments and reply filters (ip_match.c) -------------------------------------------

_OCTET = re.compile(r"\d{1,3}")


@dataclass(frozen=True, slots=True)
class Zone:
    """``reject_rbl_client zen.example=127.0.0.[2..11]``: the zone and its reply filter."""

    text: str
    """The argument as written (the rbl_reply_maps key)."""
    domain: str
    """The zone without the filter (``$rbl_domain``)."""
    pattern: str | None
    octets: tuple[frozenset[int], ...] | None

    def matches(self, address: str) -> bool:
        """Whether an IPv4 answer passes the reply filter (no filter: every answer)."""
        if self.octets is None:
            return True
        parts = address.split(".")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            return False
        return all(int(p) in allowed for p, allowed in zip(parts, self.octets, strict=True))


def _octet(text: str, pattern: str) -> int:
    if not _OCTET.fullmatch(text) or int(text) > 255:
        raise ZoneError(f'in "{pattern}": bad octet value: "{text}"')
    return int(text)


def _parse_filter(pattern: str) -> tuple[frozenset[int], ...]:
    """``127.0.0.[2..11]``, ``127.0.0.[1;3;5..7]`` -> one set of allowed values per octet."""
    fields: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(pattern):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "." and depth == 0:
            fields.append(pattern[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ZoneError(f'in "{pattern}": misplaced "{ch}"')
    fields.append(pattern[start:])
    if depth != 0:
        raise ZoneError(f'in "{pattern}": missing "]"')
    if len(fields) != 4:
        raise ZoneError(f'in "{pattern}": need 4 octets, found {len(fields)}')
    result: list[frozenset[int]] = []
    for field in fields:
        if field.startswith("[") and field.endswith("]"):
            allowed: set[int] = set()
            for item in field[1:-1].split(";"):
                low, dots, high = item.partition("..")
                lo = _octet(low, pattern)
                hi = _octet(high, pattern) if dots else lo
                if hi < lo:
                    raise ZoneError(f'in "{pattern}": bad range "{item}"')
                allowed.update(range(lo, hi + 1))
            result.append(frozenset(allowed))
        else:
            result.append(frozenset({_octet(field, pattern)}))
    return tuple(result)


@lru_cache(maxsize=1024)
def parse_zone(text: str) -> Zone:
    """Split ``zone[=filter]``; raise :class:`ZoneError` for a bad filter or zone."""
    domain, eq, pattern = text.partition("=")
    domain = domain.rstrip(".")
    if not domain or not valid_hostname(domain):
        raise ZoneError(f'bad DNS list zone "{text}"')
    if not eq:
        return Zone(text, domain, None, None)
    return Zone(text, domain, pattern, _parse_filter(pattern))


# -- query names ------------------------------------------------------------------------------


def address_query(address: str, zone: Zone) -> str | None:
    """``1.2.3.4`` -> ``4.3.2.1.zone``; IPv6 as 32 reversed nibbles; None: not an address."""
    if valid_ipv4_hostaddr(address):
        return ".".join(reversed(address.split("."))) + "." + zone.domain
    if valid_ipv6_hostaddr(address):
        packed = ipaddress.IPv6Address(address).exploded.replace(":", "")
        return ".".join(reversed(packed)) + "." + zone.domain
    return None


def domain_query(what: str, zone: Zone) -> str | None:
    """The query for a name or the domain of an address; None when Postfix skips it.

    Skipped: address literals, empty domains, names whose last label is all digits
    (RHSBLs refuse IP-like queries), and names that are not valid host names.
    """
    _, at, domain = what.rpartition("@")
    if not at:
        domain = what
    if domain.startswith("["):
        return None
    if not domain:
        return None
    last = domain.rsplit(".", 1)[-1]
    if last.isdigit():
        return None
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not valid_hostname(domain):
        return None
    return f"{domain}.{zone.domain}"


# -- answers ------------------------------------------------------------------------------------


_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_NOT_LISTED = ipaddress.IPv4Network("127.255.255.0/24")
_LOCALHOST = ipaddress.IPv4Address("127.0.0.1")


@lru_cache(maxsize=1024)  # lists answer with a handful of codes
def is_list_error(address: str) -> bool:
    """An A record that is not a listing: outside 127/8, 127.0.0.1, 127.255.255.x."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return True
    return ip not in _LOOPBACK or ip == _LOCALHOST or ip in _NOT_LISTED


def split_answers(records: Sequence[str]) -> tuple[list[str], list[str]]:
    """(listing codes, list errors) of a DNSxL A answer."""
    good: list[str] = []
    bad: list[str] = []
    for record in records:
        (bad if is_list_error(record) else good).append(record)
    return good, bad


def txt_reason(records: Sequence[str]) -> str:
    """Postfix's TXT concatenation: non-printables as spaces, " / " between, 500 max."""
    buf = ""
    for i, record in enumerate(records):
        space_left = RBL_TXT_LIMIT - len(buf)
        if space_left <= 0:
            break
        text = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in record)
        buf += text[:space_left]
        space_left = RBL_TXT_LIMIT - len(buf)
        if i + 1 < len(records) and space_left > 3:
            buf += " / "
    return buf


# -- reply templates ---------------------------------------------------------------------------


def unescape(text: str) -> str:
    """Postfix ``unescape()``: ``\\t``, ``\\n``, ``\\\\``, octal ``\\040``..."""
    simple = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\" or i + 1 >= len(text):
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in simple:
            out.append(simple[nxt])
            i += 2
        elif nxt in "01234567":
            j = i + 1
            while j < len(text) and j < i + 4 and text[j] in "01234567":
                j += 1
            out.append(chr(int(text[i + 1 : j], 8)))
            i = j
        else:
            out.append(nxt)
            i += 2
    return "".join(out)


class TemplateError(ValueError):
    """A reply template that cannot be expanded (syntax error or unknown $name)."""


def expand_template(
    template: str,
    values: Callable[[str], str | None],
    allowed: str | None,
    warn: Callable[[str], None],
) -> str:
    """Postfix ``mac_expand`` of a reply template; ``$name`` values pass ``allowed``.

    Characters of a value not in ``allowed`` (smtpd_expansion_filter; None: keep all)
    become ``_``.  An
    unknown name is logged (``unknown macro name``) and makes the template bad.
    """
    undefined: list[str] = []
    allowed_set = frozenset(allowed) if allowed is not None else None

    def lookup(name: str, test: bool) -> str | None:
        value = values(name)
        if value is None:
            warn(f'unknown macro name "{name}" in expansion request')
            undefined.append(name)
            return None
        if test or allowed_set is None:
            return value
        return "".join(ch if ch in allowed_set else "_" for ch in value)

    try:
        result = expand(template, lookup)
    except ExpansionError as exc:
        raise TemplateError(exc.message) from None
    if undefined:
        raise TemplateError(f"unknown name ${undefined[0]}")
    return result


def split_reply(text: str) -> tuple[int, str] | None:
    """``"554 text"`` -> (554, "text"); None unless it starts with 4xx/5xx and a space."""
    if len(text) < 4 or text[0] not in "45" or not text[1:3].isdigit() or text[3] != " ":
        return None
    return int(text[:3]), text[4:]
