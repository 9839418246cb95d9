"""What the policy core asks of the outside world: DNS and policy servers, as protocols
with no I/O here.

The restrictions never import a DNS library.  They call :class:`Resolver` (which
``smtpgate.resolver.DnsPythonResolver`` implements with dnspython, and
:class:`FakeResolver` here from a dict, for tests) and get a :class:`DnsAnswer` back.
An answer says what Postfix's ``dns_lookup()`` distinguishes: records found, the name
does not exist (NXDOMAIN), the name exists but has no record of that type (NODATA), or a
temporary failure (SERVFAIL, REFUSED, no answer in time).  Every answer, negative ones
included, carries a TTL for caching.

Records are text, one string per resource record:

- ``A``/``AAAA``: the address (``127.0.0.2``, ``2001:db8::1``);
- ``MX``: ``"preference host"`` (``"10 mx.example.org"``); a null MX is ``"0 "`` with an
  empty host (RFC 7505);
- ``NS``, ``PTR``, ``CNAME``: the host name;
- ``TXT``: the first character-string of the record (as Postfix's ``dns_get_rr``),
  decoded as Latin-1 so that every byte survives.

Host names carry no trailing dot and keep the case the server sent.

Policy delegation (``check_policy_service``) goes through :class:`PolicyClient`
(``smtpgate.delegation.DelegationClient`` speaks Postfix's attribute protocol over
sockets; :class:`FakePolicyClient` here answers from a function, for tests).  The core
hands it the service and the request's attributes, in Postfix's order, and gets a
:class:`PolicyAnswer`: the server's ``action`` text, or None when there is no usable
answer after every try (the service's default action then applies), with the warnings
Postfix would have logged on the way.

Recipient verification (``reject_unverified_recipient``) goes through
:class:`AddressVerifier` (``smtpgate.verify.RelayVerifier`` probes the backend and keeps
Postfix's verify(8) cache; :class:`FakeVerifier` here answers from a dict, for tests).
It answers with a :class:`VerifyResult`: Postfix's recipient status (deliverable,
deferred, bounced) and the reason, or a failure when no answer could be had.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Protocol

from smtpgate.config.policyconf import PolicyService


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


@dataclass(frozen=True, slots=True)
class PolicyAnswer:
    """A policy server's answer to one request."""

    action: str | None
    """The ``action=`` value; None: no usable answer (down, timeout, garbage, closed)."""
    warnings: tuple[str, ...] = ()
    """Postfix's warning lines for the trouble met on the way, in order (without the
    ``warning: `` prefix): ``connect to 127.0.0.1:9998: Connection refused``,
    ``problem talking to server 127.0.0.1:9998: Connection refused``..."""


Attributes = Sequence[tuple[str, str]]
"""A request: (name, value) pairs in the order they are sent."""


class PolicyClient(Protocol):
    """Asks policy servers (Postfix's policy delegation protocol)."""

    async def ask(self, service: PolicyService, attributes: Attributes) -> PolicyAnswer:
        """Send ``attributes`` to ``service`` and return its answer; never raises for
        trouble with the server (that is an answer with ``action`` None)."""
        ...


class FakePolicyClient:
    """An in-memory :class:`PolicyClient`: ``answer(service, attributes)`` decides.

    ``answer`` returns the action text, or a :class:`PolicyAnswer` (for a failure with
    its warnings); a text or PolicyAnswer in its place is the answer to every request.
    Every request is appended to :attr:`requests` as ``(service, dict(attributes),
    list(attributes))``.
    """

    def __init__(
        self,
        answer: Callable[[PolicyService, dict[str, str]], str | PolicyAnswer]
        | str
        | PolicyAnswer = "DUNNO",
    ) -> None:
        self.answer = answer
        self.requests: list[tuple[PolicyService, dict[str, str], list[tuple[str, str]]]] = []

    async def ask(self, service: PolicyService, attributes: Attributes) -> PolicyAnswer:
        pairs = list(attributes)
        self.requests.append((service, dict(pairs), pairs))
        answer = self.answer
        result = answer if isinstance(answer, str | PolicyAnswer) else answer(service, dict(pairs))
        return result if isinstance(result, PolicyAnswer) else PolicyAnswer(result)


class VerifyStatus(IntEnum):
    """An address's verification status (Postfix ``DEL_RCPT_STAT_*``, the numbers its
    verify cache stores)."""

    OK = 0
    DEFER = 1
    BOUNCE = 2
    TODO = 3


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What the verifier knows of one address."""

    status: VerifyStatus | None
    """None: verification failed (no probe could be made or answered; nothing cached)."""
    text: str = ""
    """The reason, as Postfix's verify cache keeps it: ``host mx[192.0.2.1] said: 550
    5.1.1 <u@example.com>: ... (in reply to RCPT TO command)``."""
    probed: bool = False
    """True when this answer comes from a probe made for this query (not the cache)."""


class AddressVerifier(Protocol):
    """Knows which addresses the backend accepts: a cache, and probes for the rest."""

    async def query(self, address: str, *, probe: bool = True) -> VerifyResult | None:
        """The status of ``address``: from the cache while it is fresh (refreshed in the
        background when it is due), else from a probe made now (concurrent queries for
        one address share it).  With ``probe`` False, None instead of a probe.  Never
        raises for trouble with the backend (that is a result with status None)."""
        ...

    async def record(self, address: str, status: VerifyStatus, text: str) -> None:
        """Remember an answer the backend gave in another way (the client's own RCPT in
        lock-step), with the cache's rules (a failure never replaces a success)."""
        ...


class FakeVerifier:
    """An in-memory :class:`AddressVerifier`: ``backend`` maps an address to the status
    and reason a probe finds (an address not in it is deliverable; a ``None`` value is
    a failed probe).  Probed addresses are appended to :attr:`probes`, and answers are
    remembered in :attr:`cache` (negative ones too), without expiry."""

    def __init__(
        self, backend: Mapping[str, tuple[VerifyStatus, str] | None] | None = None
    ) -> None:
        self.backend = dict(backend or {})
        self.cache: dict[str, tuple[VerifyStatus, str]] = {}
        self.probes: list[str] = []
        self.recorded: list[tuple[str, VerifyStatus, str]] = []

    async def query(self, address: str, *, probe: bool = True) -> VerifyResult | None:
        known = self.cache.get(address)
        if known is not None:
            return VerifyResult(*known)
        if not probe:
            return None
        self.probes.append(address)
        found = self.backend.get(address, (VerifyStatus.OK, "250 2.1.5 Ok"))
        if found is None:
            return VerifyResult(None, probed=True)
        self.cache[address] = found
        return VerifyResult(*found, probed=True)

    async def record(self, address: str, status: VerifyStatus, text: str) -> None:
        self.recorded.append((address, status, text))
        known = self.cache.get(address)
        if status is VerifyStatus.OK or known is None or known[0] is not VerifyStatus.OK:
            self.cache[address] = (status, text)


# -- the fake resolver ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fail:
    """A temporary failure the fake answers in place of records (see :class:`FakeResolver`)."""

    detail: str


SERVFAIL = Fail("SERVFAIL")
TIMEOUT = Fail("timeout")
REFUSED = Fail("REFUSED")

Records = str | Sequence[str] | Fail
"""One type's records: a string is one record, a sequence several, a Fail a failure."""
Zone = Mapping[str, Mapping[str, Records] | Fail]


class FakeResolver:
    """An in-memory :class:`Resolver`: answers from a dict, at once, without I/O.

    ``records`` maps a name to its records by type, in the text forms above::

        FakeResolver({
            "10.2.0.192.zen.test": {"A": "127.0.0.2", "TXT": "Listed, see https://zen.test"},
            "sender.test": {"MX": ["10 mx.sender.test", "20 mx2.sender.test"]},
            "mx.sender.test": {"A": "192.0.2.25", "AAAA": "2001:db8::25"},
            "1.2.0.192.in-addr.arpa": {"PTR": "mail.sender.test"},
            "null.test": {"MX": "0 "},         # a null MX (RFC 7505)
            "broken.test": SERVFAIL,           # every query for the name fails
            "slow.test": {"A": TIMEOUT},       # only the A query fails
        })

    The answers are what :class:`DnsAnswer` distinguishes:

    - records found: ``OK`` with them, ``ttl`` seconds;
    - a name that is not in ``records`` and has no name below it: ``NXDOMAIN``;
    - a name in ``records`` (or with a name below it, an empty non-terminal) that lacks
      the type: ``NODATA``; negative answers carry ``negative_ttl``;
    - :data:`SERVFAIL`, :data:`TIMEOUT` or :data:`REFUSED` (any :class:`Fail`), in place
      of a name's types or of one type's records: ``TEMPFAIL`` with that detail, answered
      at once (a timeout costs no time);
    - names compare case-insensitively and without a trailing dot; a CNAME is returned
      as a record of its own type, never followed.

    Every query is appended to :attr:`queries` as ``(name, rdtype)``, for tests that
    assert what was (or was not) looked up.  :meth:`add` and :meth:`fail` change the data
    between queries.
    """

    def __init__(
        self, records: Zone | None = None, *, ttl: int = 300, negative_ttl: int = 60
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.queries: list[tuple[str, str]] = []
        self._names: dict[str, dict[str, tuple[str, ...] | Fail] | Fail] = {}
        for name, types in (records or {}).items():
            if isinstance(types, Fail):
                self.fail(name, detail=types.detail)
                continue
            self._names.setdefault(_key(name), {})
            for rdtype, value in types.items():
                if isinstance(value, Fail):
                    self.fail(name, rdtype, detail=value.detail)
                else:
                    self.add(name, rdtype, *([value] if isinstance(value, str) else value))

    def add(self, name: str, rdtype: str, *records: str) -> None:
        """Add records of ``rdtype`` to ``name`` (no records: the name exists, NODATA)."""
        types = self._names.setdefault(_key(name), {})
        if isinstance(types, Fail):
            types = self._names[_key(name)] = {}
        kept = types.get(rdtype.upper(), ())
        types[rdtype.upper()] = (() if isinstance(kept, Fail) else kept) + tuple(records)

    def fail(self, name: str, rdtype: str | None = None, *, detail: str = "SERVFAIL") -> None:
        """Make queries for ``name`` (of ``rdtype`` only, when given) fail temporarily."""
        if rdtype is None:
            self._names[_key(name)] = Fail(detail)
            return
        types = self._names.setdefault(_key(name), {})
        if isinstance(types, Fail):
            types = self._names[_key(name)] = {}
        types[rdtype.upper()] = Fail(detail)

    async def lookup(self, name: str, rdtype: str) -> DnsAnswer:
        self.queries.append((name, rdtype))
        rdtype = rdtype.upper()
        types = self._names.get(_key(name))
        if isinstance(types, Fail):
            return DnsAnswer(name, rdtype, DnsStatus.TEMPFAIL, detail=types.detail)
        if types is None:
            below = "." + _key(name)
            if any(known.endswith(below) for known in self._names):
                return DnsAnswer(name, rdtype, DnsStatus.NODATA, ttl=self.negative_ttl)
            return DnsAnswer(name, rdtype, DnsStatus.NXDOMAIN, ttl=self.negative_ttl)
        found = types.get(rdtype, ())
        if isinstance(found, Fail):
            return DnsAnswer(name, rdtype, DnsStatus.TEMPFAIL, detail=found.detail)
        if not found:
            return DnsAnswer(name, rdtype, DnsStatus.NODATA, ttl=self.negative_ttl)
        return DnsAnswer(name, rdtype, DnsStatus.OK, found, self.ttl)


def _key(name: str) -> str:
    return name.rstrip(".").lower()
