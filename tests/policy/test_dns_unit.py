"""The DNS restrictions against :class:`FakeResolver`: no sockets, no clock, no waiting.

tests/dns runs the same restrictions through the real resolver and a DNS server on
loopback; here every answer (listed, not found, SERVFAIL, a timeout) is a dict entry, so
each case is a line of data that runs in milliseconds.  Where it
matters, a test also asserts which queries were sent (``resolver.queries``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from smtpgate.policy.model import ClientInfo, Decision
from smtpgate.policy.peer import lookup_client
from smtpgate.policy.ports import (
    REFUSED,
    SERVFAIL,
    TIMEOUT,
    DnsStatus,
    FakeResolver,
    Resolver,
)
from smtpgate.policy.session import PolicySession
from smtpgate.resolver import DnsLookupError, mx_targets
from tests.policy.conftest import MakePlan

REASON = "Listed: see https://zen.test/lookup?ip=192.0.2.10"

WORLD: dict[str, Any] = {
    # block and allow lists
    "10.2.0.192.zen.test": {"A": "127.0.0.2", "TXT": REASON},
    "12.2.0.192.zen.test": {"A": "127.255.255.254"},  # a list error code
    "13.2.0.192.zen.test": {"A": "127.0.0.1"},  # a list error code
    "14.2.0.192.zen.test": {"A": "127.0.0.20"},
    "10.2.0.192.slow.test": {"A": TIMEOUT},
    "10.2.0.192.broken-list.test": SERVFAIL,
    "spam.test.dbl.test": {"A": "127.0.1.2", "TXT": "spam domain"},
    # domains and hosts
    "sender.test": {"MX": ["20 mx2.sender.test", "10 mx.sender.test"]},
    "mx.sender.test": {"A": "192.0.2.25", "AAAA": "2001:db8::25"},
    "mx2.sender.test": {"A": "192.0.2.26"},
    "mail.sender.test": {"A": "192.0.2.10"},
    "a-only.test": {"A": "192.0.2.27"},
    "null.test": {"MX": "0 "},
    "bad-mx.test": {"MX": "10 -bad-.test"},
    "spam.test": {"MX": "10 mx.spamhost.test", "NS": "ns1.spamhost.test"},
    "mx.spamhost.test": {"A": "198.51.100.7"},
    "ns1.spamhost.test": {"A": "198.51.100.53"},
    "sub.spam.test": {"A": "198.51.100.8"},
    "broken.test": SERVFAIL,
    "refused.test": REFUSED,
    "half.test": {"MX": TIMEOUT, "A": "192.0.2.28"},
    # reverse names
    "10.2.0.192.in-addr.arpa": {"PTR": "mail.sender.test"},
    "22.2.0.192.in-addr.arpa": {"PTR": "fake.sender.test"},
    "23.2.0.192.in-addr.arpa": {"PTR": "mail.sender.test"},  # resolves to .10, not .23
    "21.2.0.192.in-addr.arpa": SERVFAIL,
    "24.2.0.192.in-addr.arpa": {"PTR": "192.0.2.24"},  # a numeric PTR
    "25.2.0.192.in-addr.arpa": {"PTR": "tf.sender.test"},
    "tf.sender.test": {"A": TIMEOUT},
}

LISTED = ClientInfo("192.0.2.10", "mail.sender.test", "mail.sender.test", 0, "ok", "ok")
CLEAN = ClientInfo("192.0.2.11", "clean.sender.test", "clean.sender.test", 0, "ok", "ok")
TRUSTED = ClientInfo("127.0.0.1", "localhost", "localhost", 0, "ok", "ok")


@pytest.fixture
def dns() -> FakeResolver:
    return FakeResolver(WORLD)


def rcpt(
    plan: Any,
    resolver: Resolver | None,
    client: ClientInfo = LISTED,
    *,
    helo: str = "mail.sender.test",
    sender: str = "alice@sender.test",
    to: str = "bob@example.org",
) -> Decision:
    async def run() -> Decision:
        session = PolicySession(plan, client, resolver)
        assert (await session.helo(helo, esmtp=True)).reply is None
        assert (await session.mail(sender)).reply is None
        return await session.rcpt(to)

    return asyncio.run(run())


def reply(decision: Decision) -> str | None:
    return None if decision.reply is None else str(decision.reply)


def warnings(decision: Decision) -> list[str]:
    return [r.text for r in decision.logs if r.level == "warning"]


# -- the fake itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rdtype", "status", "records", "detail"),
    [
        ("mx.sender.test", "A", DnsStatus.OK, ("192.0.2.25",), ""),
        ("MX.Sender.Test.", "a", DnsStatus.OK, ("192.0.2.25",), ""),
        ("sender.test", "MX", DnsStatus.OK, ("20 mx2.sender.test", "10 mx.sender.test"), ""),
        ("null.test", "MX", DnsStatus.OK, ("0 ",), ""),
        ("10.2.0.192.zen.test", "TXT", DnsStatus.OK, (REASON,), ""),
        ("mx.sender.test", "MX", DnsStatus.NODATA, (), ""),
        ("nowhere.test", "A", DnsStatus.NXDOMAIN, (), ""),
        ("spamhost.test", "A", DnsStatus.NODATA, (), ""),  # an empty non-terminal
        ("broken.test", "A", DnsStatus.TEMPFAIL, (), "SERVFAIL"),
        ("broken.test", "MX", DnsStatus.TEMPFAIL, (), "SERVFAIL"),
        ("refused.test", "MX", DnsStatus.TEMPFAIL, (), "REFUSED"),
        ("half.test", "MX", DnsStatus.TEMPFAIL, (), "timeout"),
        ("half.test", "A", DnsStatus.OK, ("192.0.2.28",), ""),
    ],
)
def test_fake_answers(dns: FakeResolver, name, rdtype, status, records, detail):
    answer = asyncio.run(dns.lookup(name, rdtype))
    assert (answer.status, answer.records, answer.detail) == (status, records, detail)
    assert (answer.name, answer.rdtype) == (name, rdtype.upper())
    assert answer.ttl == {DnsStatus.OK: 300, DnsStatus.TEMPFAIL: 0}.get(status, 60)
    assert dns.queries == [(name, rdtype)]


def test_fake_add_and_fail():
    dns = FakeResolver(ttl=10, negative_ttl=5)
    dns.add("a.test", "A", "192.0.2.1")
    dns.add("a.test", "a", "192.0.2.2")
    dns.add("empty.test", "TXT")
    answers = [asyncio.run(dns.lookup(*q)) for q in [("a.test", "A"), ("empty.test", "TXT")]]
    assert [(a.status, a.records, a.ttl) for a in answers] == [
        (DnsStatus.OK, ("192.0.2.1", "192.0.2.2"), 10),
        (DnsStatus.NODATA, (), 5),
    ]
    dns.fail("a.test", "A", detail="timeout")
    assert asyncio.run(dns.lookup("a.test", "A")).summary() == "temporary failure: timeout"
    dns.fail("a.test")
    assert asyncio.run(dns.lookup("a.test", "TXT")).temporary
    dns.add("a.test", "A", "192.0.2.3")
    assert asyncio.run(dns.lookup("a.test", "A")).records == ("192.0.2.3",)


# -- reject_rbl_client --------------------------------------------------------------------

RBL = "smtpd_recipient_restrictions = reject_rbl_client {zone}, reject_unauth_destination\n"
RBL_DEFER = "450 4.7.1 <192.0.2.10>: Client host rejected: Service unavailable"


def test_rbl_listed(make_plan: MakePlan, dns: FakeResolver):
    decision = rcpt(make_plan(RBL.format(zone="zen.test")), dns)
    assert reply(decision) == (
        f"554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.test; {REASON}"
    )
    assert dns.queries == [("10.2.0.192.zen.test", "A"), ("10.2.0.192.zen.test", "TXT")]


def test_rbl_not_listed_asks_no_txt(make_plan: MakePlan, dns: FakeResolver):
    assert reply(rcpt(make_plan(RBL.format(zone="zen.test")), dns, CLEAN)) is None
    assert dns.queries == [("11.2.0.192.zen.test", "A")]


@pytest.mark.parametrize(
    ("zone", "action", "expected"),
    [
        ("broken-list.test", "", RBL_DEFER),
        ("slow.test", "", RBL_DEFER),
        ("slow.test", "rbl_tempfail_action = defer\n", RBL_DEFER),
        ("slow.test", "rbl_tempfail_action = dunno\n", None),
    ],
)
def test_rbl_temporary_failure(make_plan: MakePlan, dns: FakeResolver, zone, action, expected):
    decision = rcpt(make_plan(RBL.format(zone=zone) + action), dns)
    assert reply(decision) == expected
    query = f"10.2.0.192.{zone}"
    assert warnings(decision) == [
        f"{query}: RBL lookup error: Host or domain name not found. "
        f"Name service error for name={query} type=A: Host not found, try again"
    ]


def test_rbl_tempfail_is_defer_if_permit_a_later_reject_wins(make_plan: MakePlan, dns):
    plan = make_plan(
        "smtpd_recipient_restrictions = reject_rbl_client slow.test, reject_unauth_destination, "
        "reject\n"
    )
    assert reply(rcpt(plan, dns)) == (
        "554 5.7.1 <bob@example.org>: Recipient address rejected: Access denied"
    )


@pytest.mark.parametrize("address", ["192.0.2.12", "192.0.2.13"])
def test_rbl_error_codes_are_not_listings(make_plan: MakePlan, dns: FakeResolver, address):
    client = ClientInfo(address)
    decision = rcpt(make_plan(RBL.format(zone="zen.test")), dns, client)
    assert reply(decision) is None
    [warning] = warnings(decision)
    assert "RBL lookup error: zen.test answered 127." in warning and "not a listing" in warning


def test_rbl_reply_filter(make_plan: MakePlan, dns: FakeResolver):
    plan = make_plan(RBL.format(zone="zen.test=127.0.0.[2..11]"))
    assert reply(rcpt(plan, dns, ClientInfo("192.0.2.14"))) is None
    assert reply(rcpt(plan, dns)) is not None


def test_rhsbl_sender(make_plan: MakePlan, dns: FakeResolver):
    plan = make_plan("smtpd_sender_restrictions = reject_rhsbl_sender dbl.test\n")
    assert reply(rcpt(plan, dns, sender="x@spam.test")) == (
        "554 5.7.1 Service unavailable; Sender address [x@spam.test] blocked using dbl.test; "
        "spam domain"
    )
    dns.queries.clear()
    assert reply(rcpt(plan, dns, sender="")) is None
    assert dns.queries == []  # the null sender is never looked up


def test_no_resolver_is_a_temporary_failure(make_plan: MakePlan):
    assert reply(rcpt(make_plan(RBL.format(zone="zen.test")), None)) == RBL_DEFER


# -- reject_unknown_client_hostname, from the PTR lookup at connect -----------------------


@pytest.mark.parametrize(
    ("address", "name", "name_status", "reverse_name_status", "logged"),
    [
        ("192.0.2.10", "mail.sender.test", "ok", "ok", []),
        ("192.0.2.20", "unknown", "perm", "perm", []),  # no PTR record
        ("192.0.2.21", "unknown", "temp", "temp", []),  # PTR SERVFAIL
        (
            "192.0.2.22",
            "unknown",
            "forged",
            "ok",
            [
                "hostname fake.sender.test does not resolve to address 192.0.2.22: "
                "Name or service not known"
            ],
        ),
        (
            "192.0.2.23",
            "unknown",
            "forged",
            "ok",
            ["hostname mail.sender.test does not resolve to address 192.0.2.23"],
        ),
        (
            "192.0.2.25",
            "unknown",
            "temp",
            "ok",
            [
                "hostname tf.sender.test does not resolve to address 192.0.2.25: "
                "Temporary failure in name resolution"
            ],
        ),
        (
            "192.0.2.24",
            "unknown",
            "perm",
            "perm",
            ["sockaddr_to_hostname: numeric hostname: 192.0.2.24"],
        ),
    ],
)
def test_client_name_lookup(dns, address, name, name_status, reverse_name_status, logged):
    found = asyncio.run(lookup_client(dns, address))
    client = found.client
    assert (client.name, client.name_status, client.reverse_name_status) == (
        name,
        name_status,
        reverse_name_status,
    )
    assert [log.text for log in found.logs] == logged


@pytest.mark.parametrize(
    ("address", "code", "expected"),
    [
        ("192.0.2.10", "", None),
        (
            "192.0.2.20",
            "",
            "450 4.7.25 Client host rejected: cannot find your hostname, [192.0.2.20]",
        ),
        (
            "192.0.2.20",
            "unknown_client_reject_code = 550\n",
            "550 5.7.25 Client host rejected: cannot find your hostname, [192.0.2.20]",
        ),
        (
            "192.0.2.22",
            "unknown_client_reject_code = 550\n",
            "550 5.7.25 Client host rejected: cannot find your hostname, [192.0.2.22]",
        ),
        (
            "192.0.2.21",
            "unknown_client_reject_code = 550\n",
            "450 4.7.25 Client host rejected: cannot find your hostname, [192.0.2.21]",
        ),
    ],
)
def test_reject_unknown_client_hostname(make_plan: MakePlan, dns, address, code, expected):
    client = asyncio.run(lookup_client(dns, address)).client
    plan = make_plan("smtpd_client_restrictions = reject_unknown_client_hostname\n" + code)
    assert reply(rcpt(plan, dns, client)) == expected


# -- reject_unknown_sender_domain / recipient_domain / helo_hostname ----------------------


@pytest.mark.parametrize(
    ("sender", "extra", "expected", "queries"),
    [
        ("alice@sender.test", "", None, ["sender.test MX"]),
        ("alice@a-only.test", "", None, ["a-only.test MX", "a-only.test A"]),
        ("alice@mx.example.org", "", None, []),  # our own domain: no lookup
        ("alice@[192.0.2.1]", "", None, []),
        (
            "alice@nowhere.test",
            "",
            "450 4.1.8 <alice@nowhere.test>: Sender address rejected: Domain not found",
            ["nowhere.test MX", "nowhere.test A", "nowhere.test AAAA"],
        ),
        (
            "alice@nowhere.test",
            "unknown_address_reject_code = 550\n",
            "550 5.1.8 <alice@nowhere.test>: Sender address rejected: Domain not found",
            ["nowhere.test MX", "nowhere.test A", "nowhere.test AAAA"],
        ),
        (
            "alice@null.test",
            "",
            "550 5.7.27 <alice@null.test>: Sender address rejected: "
            "Domain null.test does not accept mail (nullMX)",
            ["null.test MX"],
        ),
        (
            "alice@bad-mx.test",
            "",
            "450 4.1.8 <alice@bad-mx.test>: Sender address rejected: Malformed DNS server reply",
            ["bad-mx.test MX"],
        ),
        (
            "alice@broken.test",
            "unknown_address_reject_code = 550\n",
            "450 4.1.8 <alice@broken.test>: Sender address rejected: Domain not found",
            ["broken.test MX", "broken.test A", "broken.test AAAA"],
        ),
        ("alice@half.test", "", None, ["half.test MX", "half.test A"]),  # A answers
    ],
)
def test_reject_unknown_sender_domain(
    make_plan: MakePlan, dns: FakeResolver, sender, extra, expected, queries
):
    plan = make_plan("smtpd_sender_restrictions = reject_unknown_sender_domain\n" + extra)
    assert reply(rcpt(plan, dns, sender=sender)) == expected
    assert [f"{name} {rdtype}" for name, rdtype in dns.queries] == queries


def test_unknown_domain_tempfail_action(make_plan: MakePlan, dns: FakeResolver):
    table = {"access": "alice@broken.test REJECT go away\n"}
    text = (
        "smtpd_sender_restrictions = reject_unknown_sender_domain, "
        "check_sender_access texthash:@DIR@/access\n"
    )
    assert reply(rcpt(make_plan(text, table), dns, sender="alice@broken.test")) == (
        "554 5.7.1 <alice@broken.test>: Sender address rejected: go away"
    )
    plan = make_plan(text + "unknown_address_tempfail_action = defer\n", table)
    assert reply(rcpt(plan, dns, sender="alice@broken.test")) == (
        "450 4.1.8 <alice@broken.test>: Sender address rejected: Domain not found"
    )


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("bob@sender.test", None),
        (
            "bob@nowhere.test",
            "450 4.1.2 <bob@nowhere.test>: Recipient address rejected: Domain not found",
        ),
        (
            "bob@null.test",
            "556 5.1.10 <bob@null.test>: Recipient address rejected: Domain "
            "null.test does not accept mail (nullMX)",
        ),
        (
            "bob@refused.test",
            "450 4.1.2 <bob@refused.test>: Recipient address rejected: Domain not found",
        ),
    ],
)
def test_reject_unknown_recipient_domain(make_plan: MakePlan, dns: FakeResolver, to, expected):
    plan = make_plan(
        "smtpd_recipient_restrictions = reject_unknown_recipient_domain, permit_mynetworks, "
        "reject_unauth_destination\n"
    )
    assert reply(rcpt(plan, dns, TRUSTED, to=to)) == expected


@pytest.mark.parametrize(
    ("helo", "expected"),
    [
        ("mail.sender.test", None),
        ("null.test", None),  # MTA names may have a null MX
        ("[192.0.2.1]", None),
        ("nowhere.test", "450 4.7.1 <nowhere.test>: Helo command rejected: Host not found"),
        ("broken.test", "450 4.7.1 <broken.test>: Helo command rejected: Host not found"),
    ],
)
def test_reject_unknown_helo_hostname(make_plan: MakePlan, dns: FakeResolver, helo, expected):
    plan = make_plan("smtpd_helo_restrictions = reject_unknown_helo_hostname\n")
    assert reply(rcpt(plan, dns, helo=helo)) == expected


# -- check_*_{mx,ns,a}_access -------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "table", "sender", "expected"),
    [
        ("mx", "mx.spamhost.test REJECT bad mx", "x@spam.test", "bad mx"),
        ("mx", "198.51.100 REJECT bad net", "x@spam.test", "bad net"),
        ("mx", "spamhost.test REJECT parent", "x@spam.test", "parent"),
        ("mx", "192.0.2.27 REJECT self", "x@a-only.test", "self"),  # no MX: the domain itself
        ("mx", "mx2.sender.test REJECT second", "x@sender.test", "second"),
        ("mx", "mx.spamhost.test REJECT bad mx", "x@sender.test", None),
        ("mx", "mx.spamhost.test REJECT bad mx", "x@broken.test", None),
        ("mx", "192.0.2.1 REJECT literal", "x@[192.0.2.1]", "literal"),
        ("ns", "ns1.spamhost.test REJECT bad ns", "x@spam.test", "bad ns"),
        ("ns", "198.51.100.53 REJECT bad ns ip", "x@sub.spam.test", "bad ns ip"),  # parent NS
        ("a", "198.51.100.8 REJECT bad a", "x@sub.spam.test", "bad a"),
        ("a", "sub.spam.test REJECT names are not checked", "x@sub.spam.test", None),
    ],
)
def test_check_sender_server_access(
    make_plan: MakePlan, dns: FakeResolver, check, table, sender, expected
):
    plan = make_plan(
        f"smtpd_sender_restrictions = check_sender_{check}_access texthash:@DIR@/servers\n",
        {"servers": table + "\n"},
    )
    got = reply(rcpt(plan, dns, sender=sender))
    assert got == (
        None if expected is None else f"554 5.7.1 <{sender}>: Sender address rejected: {expected}"
    )


def test_check_recipient_mx_access(make_plan: MakePlan, dns: FakeResolver):
    plan = make_plan(
        "smtpd_recipient_restrictions = check_recipient_mx_access texthash:@DIR@/t, "
        "permit_mynetworks, reject_unauth_destination\n",
        {"t": "192.0.2.25 REJECT backup mx only\n"},
    )
    assert reply(rcpt(plan, dns, TRUSTED, to="bob@sender.test")) == (
        "554 5.7.1 <bob@sender.test>: Recipient address rejected: backup mx only"
    )


def test_server_access_lookup_failure_is_logged(make_plan: MakePlan, dns: FakeResolver):
    plan = make_plan(
        "smtpd_sender_restrictions = check_sender_mx_access texthash:@DIR@/servers\n",
        {"servers": "x REJECT\n"},
    )
    decision = rcpt(plan, dns, sender="x@broken.test")
    assert decision.reply is None
    assert warnings(decision) == [
        "Unable to look up MX host for broken.test: Host not found, try again"
    ]


def test_server_access_may_not_allowlist(make_plan: MakePlan, dns: FakeResolver):
    plan = make_plan(
        "smtpd_sender_restrictions = check_sender_mx_access texthash:@DIR@/servers\n",
        {"servers": "mx.spamhost.test OK\n"},
    )
    decision = rcpt(plan, dns, sender="x@spam.test")
    assert reply(decision) == "451 4.3.5 Server configuration error"
    assert warnings(decision)[:2] == [
        "restriction check_sender_mx_access returns OK for x@spam.test",
        "this is not allowed for security reasons",
    ]


# -- relayhost MX resolution (smtpgate.resolver.mx_targets) -------------------------------


def test_mx_targets_in_preference_order(dns: FakeResolver):
    targets = asyncio.run(mx_targets(dns, "sender.test", 25))
    assert [(t.preference, t.host, t.address) for t in targets] == [
        (10, "mx.sender.test", "192.0.2.25"),
        (10, "mx.sender.test", "2001:db8::25"),
        (20, "mx2.sender.test", "192.0.2.26"),
    ]


def test_mx_targets_without_mx_is_the_domain(dns: FakeResolver):
    targets = asyncio.run(mx_targets(dns, "a-only.test", 2525))
    assert [(t.host, t.address, t.port) for t in targets] == [("a-only.test", "192.0.2.27", 2525)]


@pytest.mark.parametrize(
    ("domain", "temporary", "message"),
    [
        ("nowhere.test", False, "Host or domain name not found"),
        ("null.test", False, "Domain null.test does not accept mail (nullMX)"),
        ("broken.test", True, "broken.test: MX lookup failed: temporary failure: SERVFAIL"),
        ("half.test", True, "half.test: MX lookup failed: temporary failure: timeout"),
    ],
)
def test_mx_targets_errors(dns: FakeResolver, domain, temporary, message):
    with pytest.raises(DnsLookupError) as caught:
        asyncio.run(mx_targets(dns, domain))
    assert caught.value.temporary is temporary
    assert message in caught.value.message
