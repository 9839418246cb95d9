"""What the policy core asks of the outside world: DNS, as a protocol with no I/O here.

The restrictions never import a DNS library.  They call :class:`Resolver` (which
``smtpgate.resolver.DnsPythonResolver`` implements with dnspython, and tests may fake)
and get a :class:`DnsAnswer` back.  An answer says what Postfix's ``dns_lookup()``
distinguishes: records found, the name does not exist (NXDOMAIN), the name exists but
has no record of that type (NODATA), or a temporary failure (SERVFAIL, REFUSED, no
answer in time).  Every answer, negative ones included, carries a TTL for caching.

Records are text, one string per resource record:

- ``A``/``AAAA``: the address (``127.0.0.2``, ``2001:db8::1``);
- ``MX``: ``"preference host"`` (``"10 mx.example.org"``); a null MX is ``"0 "`` with an
  empty host (RFC 7505);
- ``NS``, ``PTR``, ``CNAME``: the host name;
- ``TXT``: the first character-string of the record (as Postfix's ``dns_get_rr``),
  decoded as Latin-1 so that every byte survives.

Host names carry no trailing dot and keep the case the server sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class DnsStatus(StrEnum):
    """The outcome of one query (Postfix DNS_OK / DNS_NOTFOUND / DNS_RETRY)."""

    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """One query's answer, positive or negative."""

    name: str
    rdtype: str
    status: DnsStatus
    records: tuple[str, ...] = ()
    ttl: int = 0
    detail: str = ""
    """Why a temporary failure happened (for logs): "SERVFAIL", "timeout"..."""

    @property
    def ok(self) -> bool:
        return self.status is DnsStatus.OK

    @property
    def not_found(self) -> bool:
        return self.status in (DnsStatus.NXDOMAIN, DnsStatus.NODATA)

    @property
    def temporary(self) -> bool:
        return self.status is DnsStatus.TEMPFAIL

    def summary(self) -> str:
        """One line for explain: ``ok 127.0.0.2 (ttl 300)``, ``NXDOMAIN``..."""
        if self.status is DnsStatus.OK:
            return f"ok {', '.join(self.records)} (ttl {self.ttl})"
        if self.status is DnsStatus.TEMPFAIL:
            return f"temporary failure{': ' + self.detail if self.detail else ''}"
        return self.status.value.upper()


class Resolver(Protocol):
    """An asynchronous DNS stub resolver (absolute names, no search list)."""

    async def lookup(self, name: str, rdtype: str) -> DnsAnswer:
        """Look up ``name`` (absolute, without trailing dot) for ``rdtype`` ("A", "MX"...)."""
        ...


def no_resolver_answer(name: str, rdtype: str) -> DnsAnswer:
    """What a lookup gives when no resolver is configured: a temporary failure."""
    return DnsAnswer(name, rdtype, DnsStatus.TEMPFAIL, detail="no DNS resolver configured")
