"""DNS through dnspython: the adapter behind :class:`smtpgate.policy.ports.Resolver`.

:class:`DnsPythonResolver` is the only place smtpgate talks DNS.  It answers
:class:`~smtpgate.policy.ports.DnsAnswer` values the way Postfix's ``dns_lookup()`` sees
them through the system resolver:

- absolute names only (no search list, as Postfix's restrictions query);
- NXDOMAIN and NODATA are answers, kept apart, and cached for the negative TTL of the
  zone's SOA (RFC 2308), at most ``negative_ttl_max``;
- SERVFAIL, REFUSED, a malformed reply or no reply within ``timeout`` seconds is a
  temporary failure; a query that times out is sent again, ``tries`` times in all;
  temporary failures are never cached;
- positive answers are cached for their TTL (the smallest along a CNAME chain);
- at most ``concurrency`` queries are in flight at once, for every caller together;
- ``servers`` (the ``dns_servers`` parameter, e.g. ``127.0.0.1:5353``) replaces the
  name servers of ``/etc/resolv.conf``.

:func:`mx_targets` / :func:`mx_hosts` resolve an unbracketed ``relayhost`` the way
Postfix's SMTP client does: MX records in preference order, each host's A then AAAA
addresses; a domain without MX records is its own mail exchanger.

DnsPythonResolver's in-memory twin, :class:`smtpgate.policy.ports.FakeResolver`, answers
the same port from a dict, for tests; tests/dns/test_fake_resolver.py checks that both
answer alike.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from smtpgate.config.service import ServiceConfig
from smtpgate.errors import ConfigError
from smtpgate.policy.ports import DnsAnswer, DnsStatus, Resolver

DEFAULT_TIMEOUT = 5.0
DEFAULT_TRIES = 2
DEFAULT_CONCURRENCY = 100
DEFAULT_CACHE_SIZE = 10_000
NEGATIVE_TTL_DEFAULT = 60
NEGATIVE_TTL_MAX = 3 * 3600
POSITIVE_TTL_MAX = 86_400


def parse_dns_servers(values: Sequence[str]) -> list[tuple[str, int]]:
    """``["127.0.0.1:5353", "[::1]:53", "192.0.2.1"]`` -> ``[(addr, port), ...]``.

    Raises ValueError naming the bad entry.
    """
    servers: list[tuple[str, int]] = []
    for value in values:
        text = value.strip()
        port = 53
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f'{value!r}: expected "[ipv6]" or "[ipv6]:port"')
            port_text = rest[1:]
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        else:
            host, port_text = text, ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r}: a name server must be an IP address") from None
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"{value!r}: bad port {port_text!r}")
            port = int(port_text)
        servers.append((host, port))
    return servers


class DnsPythonResolver:
    """A caching, bounded, asynchronous stub resolver (implements ``ports.Resolver``)."""

    def __init__(
        self,
        servers: Sequence[tuple[str, int]] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tries: int = DEFAULT_TRIES,
        concurrency: int = DEFAULT_CONCURRENCY,
        cache_size: int = DEFAULT_CACHE_SIZE,
        negative_ttl_max: int = NEGATIVE_TTL_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in servers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=True)
        self._resolver.timeout = timeout
        self._resolver.cache = None
        self.servers = [str(ns) for ns in self._resolver.nameservers]
        self.timeout = timeout
        self.tries = max(1, tries)
        self.concurrency = max(1, concurrency)
        self.cache_size = cache_size
        self.negative_ttl_max = negative_ttl_max
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, DnsAnswer]] = OrderedDict()
        self._limits: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self.queries = 0
        """Queries sent (cache misses), for tests and statistics."""

    # -- the port ----------------------------------------------------------------------

    async def lookup(self, name: str, rdtype: str) -> DnsAnswer:
        name = name.rstrip(".") if name not in (".", "") else name
        key = (name.lower(), rdtype.upper())
        cached = self._cache.get(key)
        now = self._clock()
        if cached is not None:
            expires, answer = cached
            if expires > now:
                self._cache.move_to_end(key)
                return answer
            del self._cache[key]
        async with self._limit():
            answer = await self._query(name, rdtype.upper())
        if answer.status is not DnsStatus.TEMPFAIL and answer.ttl > 0 and self.cache_size > 0:
            self._cache[key] = (self._clock() + answer.ttl, answer)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return answer

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- internals ---------------------------------------------------------------------

    def _limit(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._limits.get(loop)
        if sem is None:
            for old in [lp for lp in self._limits if lp.is_closed()]:
                del self._limits[old]
            sem = self._limits[loop] = asyncio.Semaphore(self.concurrency)
        return sem

    async def _query(self, name: str, rdtype: str) -> DnsAnswer:
        try:
            qname = dns.name.from_text(name)
            qtype = dns.rdatatype.from_text(rdtype)
        except (dns.exception.DNSException, ValueError) as exc:
            return DnsAnswer(name, rdtype, DnsStatus.NXDOMAIN, detail=f"invalid name: {exc}")
        lifetime = self.timeout * max(1, len(self._resolver.nameservers))
        detail = "timeout"
        for _ in range(self.tries):
            self.queries += 1
            try:
                answer = await self._resolver.resolve(
                    qname, qtype, search=False, raise_on_no_answer=False, lifetime=lifetime
                )
            except dns.resolver.NXDOMAIN as exc:
                responses = list(exc.responses().values())  # type: ignore[no-untyped-call]
                ttl = _negative_ttl(responses[0] if responses else None)
                return DnsAnswer(name, rdtype, DnsStatus.NXDOMAIN, ttl=self._neg(ttl))
            except dns.resolver.LifetimeTimeout:
                detail = "timeout"
                continue
            except dns.resolver.NoNameservers as exc:
                return DnsAnswer(name, rdtype, DnsStatus.TEMPFAIL, detail=_servers_detail(exc))
            except dns.exception.DNSException as exc:
                return DnsAnswer(name, rdtype, DnsStatus.TEMPFAIL, detail=str(exc) or "error")
            if answer.rrset is None:
                ttl = _negative_ttl(answer.response)
                return DnsAnswer(name, rdtype, DnsStatus.NODATA, ttl=self._neg(ttl))
            records = tuple(_record_text(rdata) for rdata in answer.rrset)
            ttl = _answer_ttl(answer)
            return DnsAnswer(name, rdtype, DnsStatus.OK, records, min(ttl, POSITIVE_TTL_MAX))
        return DnsAnswer(name, rdtype, DnsStatus.TEMPFAIL, detail=detail)

    def _neg(self, ttl: int | None) -> int:
        return min(NEGATIVE_TTL_DEFAULT if ttl is None else ttl, self.negative_ttl_max)


def _record_text(rdata: Any) -> str:
    rdtype = rdata.rdtype
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return str(rdata.address)
    if rdtype == dns.rdatatype.MX:
        return f"{rdata.preference} {_host(rdata.exchange)}"
    if rdtype in (dns.rdatatype.NS, dns.rdatatype.PTR, dns.rdatatype.CNAME):
        return _host(rdata.target)
    if rdtype == dns.rdatatype.TXT:
        return rdata.strings[0].decode("latin-1") if rdata.strings else ""
    return str(rdata.to_text())


def _host(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return ""
    return str(name.to_text(omit_final_dot=True))


def _answer_ttl(answer: Any) -> int:
    chaining = getattr(answer, "chaining_result", None)
    ttl = getattr(chaining, "minimum_ttl", None)
    if ttl is None:
        ttl = answer.rrset.ttl
    return max(0, int(ttl))


def _negative_ttl(response: Any) -> int | None:
    """RFC 2308: the negative TTL is min(SOA TTL, SOA MINIMUM) from the authority section."""
    if response is None:
        return None
    for rrset in getattr(response, "authority", ()):
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return max(0, min(int(rrset.ttl), int(rrset[0].minimum)))
    return None


def _servers_detail(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    parts = []
    for entry in errors:
        server, error = entry[0], entry[3]
        parts.append(f"{server}: {error}")
    return "; ".join(parts) or "no name server answered"


# -- construction from settings ------------------------------------------------------------


def resolver_from_config(
    config: ServiceConfig, dns_servers: Sequence[str] | None = None
) -> DnsPythonResolver:
    """The resolver ``serve`` and ``explain`` use; ``dns_servers`` overrides the setting.

    Raises ConfigError for a bad ``dns_servers`` entry.
    """
    values = list(dns_servers) if dns_servers is not None else list(config.dns_servers)
    try:
        servers = parse_dns_servers(values)
    except ValueError as exc:
        raise ConfigError(f"dns_servers: {exc}") from None
    return DnsPythonResolver(
        servers or None,
        timeout=config.dns_timeout,
        tries=config.dns_tries,
        concurrency=config.dns_concurrency_limit,
        cache_size=config.dns_cache_size,
    )


# -- relayhost MX lookup ---------------------------------------------------------------------


class DnsLookupError(Exception):
    """A next hop that cannot be resolved; ``temporary`` says whether to try again later."""

    def __init__(self, message: str, temporary: bool) -> None:
        super().__init__(message)
        self.message = message
        self.temporary = temporary


@dataclass(frozen=True, slots=True)
class MxTarget:
    """One address to try: the MX host name (for TLS name checks), its address, the port."""

    host: str
    address: str
    port: int
    preference: int


async def mx_targets(resolver: Resolver, domain: str, port: int = 25) -> list[MxTarget]:
    """Addresses for ``domain``: MX hosts by preference, each host's A then AAAA.

    A domain without MX records (NODATA) is its own mail exchanger.  Raises
    :class:`DnsLookupError` when nothing can be reached: temporary when a lookup failed
    temporarily, permanent for NXDOMAIN, a null MX, or hosts without addresses.
    """
    domain = domain.rstrip(".")
    answer = await resolver.lookup(domain, "MX")
    hosts: list[tuple[int, str]]
    if answer.temporary:
        raise DnsLookupError(f"{domain}: MX lookup failed: {answer.summary()}", True)
    if answer.status is DnsStatus.NXDOMAIN:
        raise DnsLookupError(
            f"Host or domain name not found. Name service error for name={domain} type=MX: "
            "Host not found",
            False,
        )
    if answer.ok:
        hosts = []
        for record in answer.records:
            pref_text, _, host = record.partition(" ")
            if not host:
                raise DnsLookupError(f"Domain {domain} does not accept mail (nullMX)", False)
            hosts.append((int(pref_text) if pref_text.isdigit() else 0, host))
        hosts.sort(key=lambda item: item[0])  # stable: equal preferences keep DNS order
    else:
        hosts = [(0, domain)]
    targets: list[MxTarget] = []
    temporary = False
    for pref, host in hosts:
        for rdtype in ("A", "AAAA"):
            addrs = await resolver.lookup(host, rdtype)
            temporary = temporary or addrs.temporary
            if addrs.ok:
                targets.extend(MxTarget(host, a, port, pref) for a in addrs.records)
    if not targets:
        what = "temporary failure" if temporary else "no address"
        raise DnsLookupError(
            f"{domain}: {what} for mail exchanger(s) {', '.join(h for _, h in hosts)}", temporary
        )
    return targets


async def mx_hosts(resolver: Resolver, domain: str, port: int = 25) -> list[tuple[str, int]]:
    """``[(address, port), ...]`` in the order to try them (see :func:`mx_targets`)."""
    return [(t.address, t.port) for t in await mx_targets(resolver, domain, port)]


# The record types smtpgate asks for; dnspython imports a type's module on first use.
QUERIED_TYPES = ("A", "AAAA", "CNAME", "MX", "NS", "PTR", "TXT", "SOA")


def preload() -> None:
    """Import now the dnspython modules that would be imported at the first query or
    answer (the asyncio backend, a module per record type): ``serve`` calls this before
    it drops privileges, after which the files may be unreadable."""
    import dns.asyncbackend
    import dns.rdata
    import dns.rdataclass

    dns.asyncbackend.get_backend("asyncio")
    for name in QUERIED_TYPES:
        rdtype = dns.rdatatype.from_text(name)
        dns.rdata.get_rdata_class(dns.rdataclass.IN, rdtype)  # type: ignore[no-untyped-call]
