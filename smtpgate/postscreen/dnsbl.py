"""postscreen_dnsbl_sites: weighted DNS lists, asked at once, combined into one score.

Ported from Postfix 3.7 ``postscreen_dnsbl.c``:

* A site is ``domain[=filter][*weight]`` (weight 1 by default; negative for an allow
  list).  The filter is the ``reject_rbl_client`` one (``127.0.0.[2..11]``,
  :class:`smtpgate.policy.dnsbl.Zone`).  One domain may appear several times with
  different filters and weights: it is asked once, and every site whose filter matches
  one of the answers adds its weight.
* The score is the sum of the matching weights.  The name in the reply is the domain of
  the matching site with the largest weight (the first, at equal weights), through
  ``postscreen_dnsbl_reply_map`` when set.
* The TTL of a result: a failing client (score > 0) is remembered for the smallest TTL
  of the answers that listed it on a positive list (or did not list it on an allow
  list); a passing one for the smallest of the others; both clamped to
  ``postscreen_dnsbl_min_ttl`` .. ``postscreen_dnsbl_max_ttl``.

As smtpgate's ``reject_rbl_client`` (see :mod:`smtpgate.policy.dnsbl`), answers outside
127.0.0.0/8, 127.0.0.1 and 127.255.255.0/24 are list errors: they never count.

:func:`query_sites` asks every domain at once and waits at most ``timeout`` for all; a
list that has not answered by then counts as not listing the client.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from smtpgate.policy.dnsbl import Zone, ZoneError, address_query, parse_zone, split_answers
from smtpgate.policy.ports import DnsAnswer, Resolver

_WEIGHT = re.compile(r"-?\d+")


@dataclass(frozen=True, slots=True)
class Site:
    """One ``postscreen_dnsbl_sites`` entry."""

    text: str
    zone: Zone
    weight: int

    @property
    def domain(self) -> str:
        return self.zone.domain


def parse_site(text: str) -> Site:
    """``zen.spamhaus.org=127.0.0.[2..11]*3`` -> Site; raise ZoneError when malformed."""
    head, star, weight_text = text.partition("*")
    weight = 1
    if star:
        if not _WEIGHT.fullmatch(weight_text):
            raise ZoneError(f'bad DNSBL weight "{weight_text}" in "{text}"')
        weight = int(weight_text)
    return Site(text, parse_zone(head), weight)


def parse_sites(items: Sequence[str]) -> tuple[Site, ...]:
    return tuple(parse_site(item) for item in items if item.strip())


@dataclass(frozen=True, slots=True)
class Score:
    """The combined result for one client."""

    total: int
    name: str | None
    """The domain of the heaviest matching site (the reply's "blocked using")."""
    ttl: int
    """Seconds to remember the result, already clamped to the min/max TTL."""
    complete: bool = True
    """False when some list had not answered by the deadline."""


def score(
    sites: Sequence[Site],
    answers: Mapping[str, DnsAnswer | None],
    min_ttl: int,
    max_ttl: int,
) -> Score:
    """Combine the answers (domain -> its A answer, None: no answer in time)."""
    total, name, best = 0, None, 0
    fail_ttl: int | None = None
    pass_ttl: int | None = None
    complete = True
    for site in sites:
        answer = answers.get(site.domain)
        if answer is None:
            complete = False
            continue
        if answer.temporary:
            continue
        listed = answer.ok and bool(split_answers(answer.records)[0])
        ttl = max(answer.ttl, 0)
        if listed:
            codes = split_answers(answer.records)[0]
            if any(site.zone.matches(code) for code in codes):
                if name is None or best < site.weight:
                    name, best = site.domain, site.weight
                total += site.weight
            if site.weight > 0:
                fail_ttl = ttl if fail_ttl is None else min(fail_ttl, ttl)
            else:
                pass_ttl = ttl if pass_ttl is None else min(pass_ttl, ttl)
        elif site.weight > 0:
            pass_ttl = ttl if pass_ttl is None else min(pass_ttl, ttl)
        else:
            fail_ttl = ttl if fail_ttl is None else min(fail_ttl, ttl)
    chosen = fail_ttl if total > 0 else pass_ttl
    result_ttl = -1 if chosen is None else chosen
    if not complete:
        result_ttl = min_ttl  # a partial result is not kept long
    result_ttl = min(max(result_ttl, min_ttl), max_ttl)
    return Score(total, name, result_ttl, complete)


def dnsblog_lines(address: str, domain: str, answer: DnsAnswer) -> list[str]:
    """What Postfix's dnsblog(8) logs for one list's answer: a line per A record."""
    if not answer.ok:
        return []
    return [f"addr {address} listed by domain {domain} as {record}" for record in answer.records]


async def query_sites(
    resolver: Resolver,
    sites: Sequence[Site],
    address: str,
    timeout: float,
    answers: dict[str, DnsAnswer | None] | None = None,
    on_answer: Callable[[str, DnsAnswer], None] | None = None,
) -> dict[str, DnsAnswer | None]:
    """Ask every list about ``address`` at once; wait at most ``timeout`` for them all.

    Each answer goes into ``answers`` (domain -> answer) as it arrives, so a caller that
    stops waiting earlier still has those that came.  A domain that did not answer in
    time (or whose lookup failed) is None at the end; lookups still running at the
    deadline are cancelled.  ``on_answer(domain, answer)`` is called as each arrives.
    Nothing is asked when the address is not an IP address.
    """
    found: dict[str, DnsAnswer | None] = {} if answers is None else answers
    names: dict[str, str] = {}
    for site in sites:
        if site.domain not in names:
            query = address_query(address, site.zone)
            if query is not None:
                names[site.domain] = query
    if not names:
        return found

    async def ask(domain: str, name: str) -> None:
        try:
            answer = await resolver.lookup(name, "A")
        except Exception:  # an adapter that raises: no answer from this list
            found[domain] = None
            return
        found[domain] = answer
        if on_answer is not None:
            on_answer(domain, answer)

    tasks = [asyncio.ensure_future(ask(domain, name)) for domain, name in names.items()]
    try:
        await asyncio.wait(tasks, timeout=max(timeout, 0.0))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    for domain in names:
        found.setdefault(domain, None)
    return found
