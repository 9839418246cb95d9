"""Addresses and names as Postfix sees them: syntax checks, lookup keys, resolution.

* ``valid_hostname`` / ``valid_hostaddr`` / ``valid_mailhost_addr`` follow Postfix's
  ``util/valid_hostname.c`` and ``global/valid_mailhost_addr.c``.
* ``address_keys``, ``domain_keys`` and ``ip_keys`` give the access(5) key sequences of
  ``smtpd_check.c`` (``check_mail_access``, ``check_domain_access``,
  ``check_addr_access``); each key says whether it is a *partial* key, which pattern
  tables (regexp, pcre, cidr) never see.
* ``resolve`` is the part of trivial-rewrite that the restrictions depend on: it
  qualifies, strips the local domain from source routes, and classifies the
  destination (local, relay, other), flagging addresses that still route.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

VALID_LABEL_LEN = 63
VALID_HOSTNAME_LEN = 255


def valid_ipv4_hostaddr(addr: str) -> bool:
    parts = addr.split(".")
    if len(parts) != 4:
        return False
    for part in parts:
        if not part or not part.isascii() or not part.isdigit() or int(part) > 255:
            return False
    return True


def valid_ipv6_hostaddr(addr: str) -> bool:
    if "%" in addr or not addr.isascii():
        return False
    try:
        ipaddress.IPv6Address(addr)
    except ValueError:
        return False
    return True


def valid_hostaddr(addr: str) -> bool:
    """A bare IPv4 or IPv6 address (no brackets)."""
    if ":" in addr:
        return valid_ipv6_hostaddr(addr)
    return valid_ipv4_hostaddr(addr)


def valid_mailhost_addr(addr: str) -> bool:
    """The inside of an address literal: ``1.2.3.4`` or ``IPv6:...``."""
    if addr[:5].lower() == "ipv6:":
        return valid_ipv6_hostaddr(addr[5:])
    return valid_ipv4_hostaddr(addr)


@functools.lru_cache(maxsize=4096)
def valid_hostname(name: str) -> bool:
    """Postfix's host name syntax: letters, digits, ``_`` and inner ``-``; not all-numeric.

    Cached: the same few domains come back in every session.
    """
    if not name or len(name) > VALID_HOSTNAME_LEN:
        return False
    label_length = 0
    non_numeric = False
    last = len(name) - 1
    for i, ch in enumerate(name):
        if ch.isascii() and (ch.isalnum() or ch == "_"):
            label_length += 1
            if label_length > VALID_LABEL_LEN:
                return False
            if not ch.isdigit():
                non_numeric = True
        elif ch == ".":
            if label_length == 0 or i == last:
                return False
            label_length = 0
        elif ch == "-":
            non_numeric = True
            label_length += 1
            if label_length == 1 or i == last or name[i + 1] == ".":
                return False
        else:
            return False
    return non_numeric


def dup_if_truncate(name: str) -> str:
    """Drop one trailing dot, but not from ``..`` (Postfix ``dup_if_truncate``)."""
    if len(name) > 1 and name[-1] == "." and name[-2] != ".":
        return name[:-1]
    return name


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` split at the last ``@``; the domain is empty when there is none."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def strip_extension(local: str, delimiters: str) -> str | None:
    """The local part without its address extension, or None when it has none."""
    if not delimiters:
        return None
    for i, ch in enumerate(local):
        if ch in delimiters and i > 0:
            if ch == "-" and (
                local.lower().startswith("owner-") or local.lower().endswith("-request")
            ):
                return None
            return local[:i]
    return None


def parent_domains(domain: str, parent_style: bool) -> list[str]:
    """Parent domain keys after ``domain`` itself (Postfix ``check_domain_access`` loop)."""
    keys: list[str] = []
    name = domain
    while True:
        dot = name.find(".", 1)
        if dot < 0:
            break
        name = name[dot + 1 :] if parent_style else name[dot:]
        if not name:
            break
        keys.append(name)
    return keys


Key = tuple[str, bool]
"""A lookup key and whether it is partial (never shown to pattern tables)."""


def domain_keys(domain: str, parent_style: bool, first_partial: bool = False) -> list[Key]:
    """Keys for a host or domain name: the name, then its parents (not for IP addresses)."""
    low = domain.lower()
    if not low:
        return []
    keys: list[Key] = [(low, first_partial)]
    if valid_hostaddr(domain):
        return keys
    keys.extend((parent, True) for parent in parent_domains(low, parent_style))
    return keys


def ip_keys(address: str) -> list[Key]:
    """Keys for a client address: ``1.2.3.4``, ``1.2.3``, ``1.2``, ``1`` (``:`` for IPv6)."""
    delim = ":" if ":" in address else "."
    keys: list[Key] = [(address.lower(), False)]
    addr = address.lower()
    while True:
        cut = addr.rfind(delim)
        if cut < 0:
            break
        addr = addr[:cut]
        keys.append((addr, True))
    return keys


@functools.lru_cache(maxsize=1024)  # bounded: an address gives up to ~10 keys
def address_keys(address: str, delimiters: str, parent_style: bool) -> Sequence[Key]:
    """access(5) keys for a mail address, in Postfix's order.

    ``user+ext@domain``, ``user@domain``, ``domain`` and its parents, ``user+ext@``,
    ``user@``.  Only the first key is a full key.  Cached, so read-only.
    """
    low = address.lower()
    local, domain = split_address(low)
    keys: list[Key] = [(low, False)]
    bare = strip_extension(local, delimiters)
    if bare is not None and domain:
        keys.append((f"{bare}@{domain}", True))
    if domain:
        keys.append((domain, True))
        keys.extend((parent, True) for parent in parent_domains(domain, parent_style))
    keys.append((f"{local}@", True))
    if bare is not None:
        keys.append((f"{bare}@", True))
    return tuple(keys)


class AddressClass(StrEnum):
    """Postfix RESOLVE_CLASS_*: where an address is delivered."""

    LOCAL = "local"
    RELAY = "relay"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class Resolved:
    """An address after trivial-rewrite: canonical form, class, and the routed flag."""

    address: str
    domain: str
    klass: AddressClass
    routed: bool

    @property
    def final(self) -> bool:
        return self.klass is AddressClass.LOCAL


RESOLVE_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Resolver:
    """What address resolution needs from the configuration."""

    myorigin: str
    is_local_domain: Callable[[str], bool]
    is_relay_domain: Callable[[str], bool]
    allow_percent_hack: bool = True
    swap_bangpath: bool = True
    # Answers so far: a plan's tables do not change (a reload builds a new Resolver).
    _cache: dict[str, Resolved] = field(default_factory=dict, compare=False, repr=False)

    def resolve(self, address: str) -> Resolved:
        """:meth:`resolve_uncached`, remembered for the next few thousand addresses."""
        cache = self._cache
        found = cache.get(address)
        if found is None:
            found = self.resolve_uncached(address)
            if len(cache) >= RESOLVE_CACHE_SIZE:
                cache.clear()
            cache[address] = found
        return found

    def resolve_uncached(self, address: str) -> Resolved:
        """Resolve as trivial-rewrite does for the SMTP server's checks.

        One deliberate difference from Postfix: an address that reaches a relay domain
        only after routing was unrolled (``user%relay.example@ourhost``,
        ``relay.example!user``, ``user%relay.example``) is flagged ``routed``. smtpgate
        forwards the address as the client wrote it, and the backend resolves that
        itself (its own local domains, percent hack and bang path settings), so a relay
        decision taken on the unrolled address would not be a decision on the address
        that is forwarded. Postfix, which delivers the unrolled address, permits these.
        """
        addr = address
        unrolled = False
        for _ in range(64):
            local, domain = split_address(addr)
            if not domain:
                rerouted = self._unroute(local)
                if rerouted is None:
                    addr = f"{local}@{self.myorigin}"
                    continue
                addr, unrolled = rerouted, True
                continue
            domain = dup_if_truncate(domain).lower()
            if self.is_local_domain(domain):
                inner = self._unroute(local)
                if inner is not None:
                    addr, unrolled = inner, True
                    continue
                return Resolved(f"{local}@{domain}".lower(), domain, AddressClass.LOCAL, False)
            klass = AddressClass.RELAY if self.is_relay_domain(domain) else AddressClass.DEFAULT
            routed = any(c in local for c in "@!%") or (unrolled and klass is AddressClass.RELAY)
            return Resolved(f"{local}@{domain}".lower(), domain, klass, routed)
        local, domain = split_address(addr)
        return Resolved(addr.lower(), domain.lower(), AddressClass.DEFAULT, True)

    def _unroute(self, local: str) -> str | None:
        """The next hop hidden in a local part (``a@b``, ``a%b``, ``b!a``), or None."""
        if "@" in local:
            return local
        if self.allow_percent_hack and "%" in local:
            cut = local.rfind("%")
            return f"{local[:cut]}@{local[cut + 1 :]}"
        if self.swap_bangpath and "!" in local:
            host, _, rest = local.partition("!")
            return f"{rest}@{host}"
        return None


def header_safe(text: str, neuter: bool = False) -> str:
    """Client-supplied text made fit for a message header: Postfix's ``printable(text, '?')``.

    Each ASCII control character (CR, LF, TAB, ESC, NUL...) and DEL becomes ``?``; UTF-8
    text is kept (a command line is valid UTF-8 by then, as with Postfix's
    smtputf8_enable).  With ``neuter`` also Postfix's NEUTER_CHARACTERS `` <>()\\";@``:
    smtpd.c's helo_cmd() keeps the HELO name in this form, and so every later use of it
    (delayed helo restrictions, log lines, XFORWARD, the Received: header) sees it.
    """
    return (_NEUTERED if neuter else _UNPRINTABLE).sub("?", text)


def quote_822_local(address: str) -> str:
    """An internal-form address in Postfix's external (RFC 822) form, for log lines.

    Postfix keeps addresses unquoted inside (``a b@x.org``) and writes the ``from=<>``
    and ``to=<>`` fields of its smtpd log lines through ``quote_822_local()``
    (info_log_address_format = external): a local part that is not a dot-string is put in
    double quotes, with ``"``, ``\\`` and CR escaped by a backslash.  Observed with Postfix
    3.7: ``"a b"@x.org``, ``"a@b"@x.org``, ``"a."@x.org`` (a trailing dot), ``"a\\"b"@x.org``;
    ``ab@x.org`` stays as it is, and so does the null address ``""`` (logged ``<>``).
    The reply texts keep the internal form (``<a b@x.org>: Sender address rejected``).
    """
    if not address:
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if _dot_string(local):
        return address
    quoted = "".join("\\" + ch if ch in '"\\\r' else ch for ch in local)
    return f'"{quoted}"{at}{domain}'


def _dot_string(local: str) -> bool:
    """RFC 822 dot-atoms: atoms of printable non-special characters joined by single dots."""
    if not local or local[0] == "." or local[-1] == "." or ".." in local:
        return False
    return not _NOT_ATOM.search(local)


_NOT_ATOM = re.compile(r'[\x00-\x20\x7f()<>@,;:\\"\[\]]')
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
_NEUTERED = re.compile(r'[\x00-\x20\x7f<>()\\";@]')
