"""Each DNS restriction through the engine (PolicySession) and a real resolver.

Every restriction is tried listed / found, not listed / not found, and with the DNS
temporarily failing.  Reply texts are Postfix 3.7's (smtpd_check.c, postconf -d).
"""

from __future__ import annotations

from typing import Any

import pytest

from smtpgate.policy.model import ClientInfo, Decision
from smtpgate.policy.session import PolicySession
from smtpgate.resolver import DnsPythonResolver
from tests.dns.dnsserver import FakeDns

LISTED = ClientInfo("192.0.2.10", "mail.sender.test", "mail.sender.test", 0, "ok", "ok")
CLEAN = ClientInfo("192.0.2.11", "clean.sender.test", "clean.sender.test", 0, "ok", "ok")
LIST_ERROR = ClientInfo("192.0.2.12", "unknown", "unknown", 0, "perm", "perm")
LOOPBACK_ANSWER = ClientInfo("192.0.2.13", "unknown", "unknown", 0, "perm", "perm")
FILTERED = ClientInfo("192.0.2.14", "unknown", "unknown", 0, "perm", "perm")
NO_NAME = ClientInfo("192.0.2.20", "unknown", "unknown", 0, "perm", "perm")
TEMP_NAME = ClientInfo("192.0.2.21", "unknown", "unknown", 0, "temp", "temp")
FORGED = ClientInfo("192.0.2.22", "unknown", "fake.sender.test", 0, "forged", "ok")
TRUSTED = ClientInfo("127.0.0.1", "localhost", "localhost", 0, "ok", "ok")

REASON = "Listed: see https://zen.test/lookup?ip=192.0.2.10"


def populate(dns: FakeDns) -> None:
    dns.add("10.2.0.192.zen.test", "A", "127.0.0.2")
    dns.add("10.2.0.192.zen.test", "TXT", REASON)
    dns.add("12.2.0.192.zen.test", "A", "127.255.255.254")
    dns.add("13.2.0.192.zen.test", "A", "127.0.0.1")
    dns.add("14.2.0.192.zen.test", "A", "127.0.0.20")
    dns.add("10.2.0.192.wl.test", "A", "127.0.10.1")
    for name in ("mail.sender.test", "spam.test", "bad.helo.test", "spam.rcpt.test"):
        dns.add(f"{name}.dbl.test", "A", "127.0.1.2")
    dns.add("spam.test.dbl.test", "TXT", "spam domain")
    dns.add("mail.sender.test.swl.test", "A", "127.0.2.1")
    # domains
    dns.add("sender.test", "MX", "10 mx.sender.test")
    dns.add("mx.sender.test", "A", "192.0.2.25")
    dns.add("mail.sender.test", "A", "192.0.2.10")
    dns.add("a-only.test", "A", "192.0.2.26")
    dns.add("null.test", "MX", "0 .")
    dns.add("bad-mx.test", "MX", "10 -bad-.test")
    dns.add("spam.test", "MX", "10 mx.spamhost.test")
    dns.add("mx.spamhost.test", "A", "198.51.100.7")
    dns.add("spam.test", "NS", "ns1.spamhost.test")
    dns.add("sub.spam.test", "A", "198.51.100.8")
    dns.add("ns1.spamhost.test", "A", "198.51.100.53")
    dns.servfail.update({"broken.test", "10.2.0.192.tempfail.test", "mail.sender.test.tf.test"})


@pytest.fixture
def world(dns_server: FakeDns) -> FakeDns:
    populate(dns_server)
    return dns_server


async def rcpt(
    plan: Any,
    resolver: DnsPythonResolver | None,
    client: ClientInfo = LISTED,
    *,
    helo: str = "mail.sender.test",
    sender: str = "alice@sender.test",
    to: str = "bob@example.org",
) -> Decision:
    session = PolicySession(plan, client, resolver)
    assert (await session.helo(helo, esmtp=True)).reply is None
    assert (await session.mail(sender)).reply is None
    return await session.rcpt(to)


def reply(decision: Decision) -> str | None:
    return None if decision.reply is None else str(decision.reply)


def warnings(decision: Decision) -> list[str]:
    return [r.text for r in decision.logs if r.level == "warning"]


RBL = "smtpd_recipient_restrictions = reject_rbl_client {zone}, reject_unauth_destination\n"


# -- reject_rbl_client ------------------------------------------------------------------


async def test_rbl_listed(world: FakeDns, resolver: DnsPythonResolver, make_plan: Any) -> None:
    decision = await rcpt(make_plan(RBL.format(zone="zen.test")), resolver)
    assert reply(decision) == (
        f"554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.test; {REASON}"
    )
    assert [r.text for r in decision.logs] == [
        "NOQUEUE: reject: RCPT from mail.sender.test[192.0.2.10]: 554 5.7.1 Service "
        f"unavailable; Client host [192.0.2.10] blocked using zen.test; {REASON}; "
        "from=<alice@sender.test> to=<bob@example.org> proto=ESMTP helo=<mail.sender.test>"
    ]
    dns_steps = [(s.detail, s.result) for s in decision.steps if s.what == "dns"]
    assert dns_steps[0] == ("A 10.2.0.192.zen.test", "ok 127.0.0.2 (ttl 300)")


async def test_rbl_not_listed(world: FakeDns, resolver: DnsPythonResolver, make_plan: Any) -> None:
    assert reply(await rcpt(make_plan(RBL.format(zone="zen.test")), resolver, CLEAN)) is None


async def test_rbl_temporary_failure_defers(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    plan = make_plan(RBL.format(zone="tempfail.test"))
    decision = await rcpt(plan, resolver)
    assert reply(decision) == "450 4.7.1 <192.0.2.10>: Client host rejected: Service unavailable"
    assert warnings(decision) == [
        "10.2.0.192.tempfail.test: RBL lookup error: Host or domain name not found. "
        "Name service error for name=10.2.0.192.tempfail.test type=A: "
        "Host not found, try again"
    ]


async def test_rbl_outage_defers_instead_of_accepting(world: FakeDns, make_plan: Any) -> None:
    world.drop_all = True
    resolver = DnsPythonResolver([world.address], timeout=0.1, tries=1)
    plan = make_plan(
        "smtpd_recipient_restrictions = permit_mynetworks, reject_rbl_client zen.test, permit\n"
        "smtpd_relay_restrictions = reject_unauth_destination\n"
    )
    assert reply(await rcpt(plan, resolver)) == (
        "450 4.7.1 <192.0.2.10>: Client host rejected: Service unavailable"
    )


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("dunno", None),
        ("defer", "450 4.7.1 <192.0.2.10>: Client host rejected: Service unavailable"),
    ],
)
async def test_rbl_tempfail_action(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any, action: str, expected: Any
) -> None:
    plan = make_plan(RBL.format(zone="tempfail.test") + f"rbl_tempfail_action = {action}\n")
    assert reply(await rcpt(plan, resolver)) == expected


@pytest.mark.parametrize("client", [LIST_ERROR, LOOPBACK_ANSWER])
async def test_rbl_list_errors_are_logged_never_listings(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any, client: ClientInfo
) -> None:
    decision = await rcpt(make_plan(RBL.format(zone="zen.test")), resolver, client)
    assert reply(decision) is None
    [warning] = warnings(decision)
    assert "RBL lookup error: zen.test answered 127." in warning
    assert "not a listing" in warning


async def test_rbl_reply_filter(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    plan = make_plan(RBL.format(zone="zen.test=127.0.0.[2..11]"))
    assert reply(await rcpt(plan, resolver, FILTERED)) is None
    decision = await rcpt(plan, resolver, LISTED)
    assert reply(decision) == (
        f"554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.test; {REASON}"
    )


async def test_rbl_reply_maps_and_codes(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    plan = make_plan(
        RBL.format(zone="zen.test")
        + "rbl_reply_maps = texthash:@DIR@/replies\nmaps_rbl_reject_code = 550\n",
        {
            "replies": "zen.test $rbl_code 5.7.9 $client_address is on $rbl_domain "
            "(for $sender_domain): $rbl_txt\n"
        },
    )
    assert reply(await rcpt(plan, resolver)) == (
        f"550 5.7.9 192.0.2.10 is on zen.test (for sender.test): {REASON}"
    )


async def test_rbl_bad_template_falls_back_to_default(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    plan = make_plan(
        RBL.format(zone="zen.test") + "rbl_reply_maps = texthash:@DIR@/replies\n",
        {"replies": "zen.test $nonsense\n"},
    )
    decision = await rcpt(plan, resolver)
    assert reply(decision) is not None and "blocked using zen.test" in str(reply(decision))
    assert 'unknown macro name "nonsense" in expansion request' in warnings(decision)


async def test_rbl_reply_without_code(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    plan = make_plan(RBL.format(zone="zen.test") + "default_rbl_reply = go away\n")
    decision = await rcpt(plan, resolver)
    assert reply(decision) == "450 4.7.1 Service unavailable"
    assert "rbl response code configuration error: go away" in warnings(decision)


def test_bad_reply_filter_is_a_config_error(make_plan: Any) -> None:
    with pytest.raises(AssertionError, match="bad octet value"):
        make_plan(RBL.format(zone="zen.test=127.0.0.[2..300]"))


# -- permit_dnswl_client / permit_rhswl_client -------------------------------------------

WL = "smtpd_recipient_restrictions = {what} {zone}, reject\n"


@pytest.mark.parametrize(
    ("what", "zone", "client", "expected"),
    [
        ("permit_dnswl_client", "wl.test", LISTED, None),
        ("permit_dnswl_client", "wl.test", CLEAN, "554 5.7.1 <bob@example.org>: Recipient"),
        ("permit_dnswl_client", "tempfail.test", LISTED, "450 4.7.1 <192.0.2.10>: Client host"),
        ("permit_rhswl_client", "swl.test", LISTED, None),
        ("permit_rhswl_client", "swl.test", CLEAN, "554 5.7.1 <bob@example.org>: Recipient"),
        ("permit_rhswl_client", "tf.test", LISTED, "450 4.7.1 <mail.sender.test>: Client host"),
        ("permit_rhswl_client", "swl.test", NO_NAME, "554 5.7.1 <bob@example.org>: Recipient"),
    ],
)
async def test_allow_lists(
    world: FakeDns,
    resolver: DnsPythonResolver,
    make_plan: Any,
    what: str,
    zone: str,
    client: ClientInfo,
    expected: str | None,
) -> None:
    got = reply(await rcpt(make_plan(WL.format(what=what, zone=zone)), resolver, client))
    assert got == expected if expected is None else str(got).startswith(expected)
    if expected and expected.startswith("450"):
        assert str(got).endswith("rejected: Service unavailable")


async def test_dnswl_never_allows_relaying(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    plan = make_plan(
        "smtpd_relay_restrictions =\n"
        "smtpd_recipient_restrictions = permit_dnswl_client wl.test, reject_unauth_destination\n"
    )
    assert reply(await rcpt(plan, resolver, to="someone@elsewhere.test")) == (
        "554 5.7.1 <someone@elsewhere.test>: Relay access denied"
    )


# -- reject_rhsbl_* ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "kwargs", "client", "expected"),
    [
        ("reject_rhsbl_client", {}, LISTED, "Client host [mail.sender.test]"),
        ("reject_rhsbl_client", {}, CLEAN, None),
        ("reject_rhsbl_client", {}, NO_NAME, None),
        ("reject_rhsbl_reverse_client", {}, LISTED, "Unverified Client host [mail.sender.test]"),
        ("reject_rhsbl_helo", {"helo": "bad.helo.test"}, CLEAN, "Helo command [bad.helo.test]"),
        ("reject_rhsbl_helo", {"helo": "clean.sender.test"}, CLEAN, None),
        ("reject_rhsbl_sender", {"sender": "x@spam.test"}, CLEAN, "Sender address [x@spam.test]"),
        ("reject_rhsbl_sender", {}, CLEAN, None),
        ("reject_rhsbl_sender", {"sender": "x@[192.0.2.1]"}, CLEAN, None),
        (
            "reject_rhsbl_recipient",
            {"to": "y@spam.rcpt.test"},
            CLEAN,
            "Recipient address [y@spam.rcpt.test]",
        ),
        ("reject_rhsbl_recipient", {}, CLEAN, None),
    ],
)
async def test_rhsbl(
    world: FakeDns,
    resolver: DnsPythonResolver,
    make_plan: Any,
    what: str,
    kwargs: dict[str, str],
    client: ClientInfo,
    expected: str | None,
) -> None:
    plan = make_plan(f"smtpd_recipient_restrictions = {what} dbl.test, permit_mynetworks, permit\n")
    got = reply(await rcpt(plan, resolver, client, **kwargs))
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith("554 5.7.1 Service unavailable; ")
        assert got.startswith(f"554 5.7.1 Service unavailable; {expected} blocked using dbl.test")


async def test_rhsbl_reason_and_tempfail(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    plan = make_plan("smtpd_sender_restrictions = reject_rhsbl_sender dbl.test\n")
    assert reply(await rcpt(plan, resolver, sender="x@spam.test")) == (
        "554 5.7.1 Service unavailable; Sender address [x@spam.test] blocked using dbl.test; "
        "spam domain"
    )
    plan = make_plan("smtpd_client_restrictions = reject_rhsbl_client tf.test\n")
    assert reply(await rcpt(plan, resolver)) == (
        "450 4.7.1 <mail.sender.test>: Client host rejected: Service unavailable"
    )


# -- reject_unknown_* -------------------------------------------------------------------

SENDER_DOMAIN = "smtpd_sender_restrictions = reject_unknown_sender_domain\n"


@pytest.mark.parametrize(
    ("sender", "extra", "expected"),
    [
        ("alice@sender.test", "", None),
        ("alice@a-only.test", "", None),
        ("alice@mx.example.org", "", None),  # our own domain: no lookup
        ("alice@[192.0.2.1]", "", None),
        (
            "alice@nowhere.test",
            "",
            "450 4.1.8 <alice@nowhere.test>: Sender address rejected: Domain not found",
        ),
        (
            "alice@nowhere.test",
            "unknown_address_reject_code = 550\n",
            "550 5.1.8 <alice@nowhere.test>: Sender address rejected: Domain not found",
        ),
        (
            "alice@null.test",
            "",
            "550 5.7.27 <alice@null.test>: Sender address rejected: "
            "Domain null.test does not accept mail (nullMX)",
        ),
        (
            "alice@bad-mx.test",
            "",
            "450 4.1.8 <alice@bad-mx.test>: Sender address rejected: Malformed DNS server reply",
        ),
        (
            "alice@broken.test",
            "",
            "450 4.1.8 <alice@broken.test>: Sender address rejected: Domain not found",
        ),
        (
            "alice@broken.test",
            "unknown_address_reject_code = 550\n",
            "450 4.1.8 <alice@broken.test>: Sender address rejected: Domain not found",
        ),
    ],
)
async def test_reject_unknown_sender_domain(
    world: FakeDns,
    resolver: DnsPythonResolver,
    make_plan: Any,
    sender: str,
    extra: str,
    expected: str | None,
) -> None:
    plan = make_plan(SENDER_DOMAIN + extra)
    assert reply(await rcpt(plan, resolver, sender=sender)) == expected


async def test_unknown_domain_tempfail_is_defer_if_permit(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    # defer_if_permit: a later reject wins over the temporary failure ...
    table = {"access": "alice@broken.test REJECT go away\n"}
    plan = make_plan(
        "smtpd_sender_restrictions = reject_unknown_sender_domain, "
        "check_sender_access texthash:@DIR@/access\n",
        table,
    )
    assert reply(await rcpt(plan, resolver, sender="alice@broken.test")) == (
        "554 5.7.1 <alice@broken.test>: Sender address rejected: go away"
    )
    # ... and with unknown_address_tempfail_action = defer it does not.
    plan = make_plan(
        "smtpd_sender_restrictions = reject_unknown_sender_domain, "
        "check_sender_access texthash:@DIR@/access\n"
        "unknown_address_tempfail_action = defer\n",
        table,
    )
    assert reply(await rcpt(plan, resolver, sender="alice@broken.test")) == (
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
            "556 5.1.10 <bob@null.test>: Recipient address rejected: "
            "Domain null.test does not accept mail (nullMX)",
        ),
        (
            "bob@broken.test",
            "450 4.1.2 <bob@broken.test>: Recipient address rejected: Domain not found",
        ),
    ],
)
async def test_reject_unknown_recipient_domain(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any, to: str, expected: str | None
) -> None:
    plan = make_plan(
        "smtpd_recipient_restrictions = reject_unknown_recipient_domain, permit_mynetworks, "
        "reject_unauth_destination\n"
    )
    assert reply(await rcpt(plan, resolver, TRUSTED, to=to)) == expected


@pytest.mark.parametrize(
    ("helo", "expected"),
    [
        ("mail.sender.test", None),
        ("null.test", None),  # MTA names may have a null MX
        ("[192.0.2.1]", None),
        ("[192.0.2.999]", "501 5.5.2 <[192.0.2.999]>: Helo command rejected: invalid ip address"),
        ("nowhere.test", "450 4.7.1 <nowhere.test>: Helo command rejected: Host not found"),
        ("broken.test", "450 4.7.1 <broken.test>: Helo command rejected: Host not found"),
    ],
)
async def test_reject_unknown_helo_hostname(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any, helo: str, expected: str | None
) -> None:
    plan = make_plan("smtpd_helo_restrictions = reject_unknown_helo_hostname\n")
    assert reply(await rcpt(plan, resolver, helo=helo)) == expected


@pytest.mark.parametrize(
    ("restriction", "client", "code", "expected"),
    [
        ("reject_unknown_client_hostname", LISTED, "", None),
        (
            "reject_unknown_client_hostname",
            NO_NAME,
            "",
            "450 4.7.25 Client host rejected: cannot find your hostname, [192.0.2.20]",
        ),
        (
            "reject_unknown_client_hostname",
            NO_NAME,
            "unknown_client_reject_code = 550\n",
            "550 5.7.25 Client host rejected: cannot find your hostname, [192.0.2.20]",
        ),
        (
            "reject_unknown_client_hostname",
            FORGED,
            "unknown_client_reject_code = 550\n",
            "550 5.7.25 Client host rejected: cannot find your hostname, [192.0.2.22]",
        ),
        (
            "reject_unknown_client_hostname",
            TEMP_NAME,
            "unknown_client_reject_code = 550\n",
            "450 4.7.25 Client host rejected: cannot find your hostname, [192.0.2.21]",
        ),
        (
            "reject_unknown_reverse_client_hostname",
            FORGED,
            "unknown_client_reject_code = 550\n",
            None,
        ),
        (
            "reject_unknown_reverse_client_hostname",
            NO_NAME,
            "unknown_client_reject_code = 550\n",
            "550 5.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.20]",
        ),
        (
            "reject_unknown_reverse_client_hostname",
            TEMP_NAME,
            "unknown_client_reject_code = 550\n",
            "450 4.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.21]",
        ),
    ],
)
async def test_reject_unknown_client(
    make_plan: Any, restriction: str, client: ClientInfo, code: str, expected: str | None
) -> None:
    plan = make_plan(f"smtpd_client_restrictions = {restriction}\n" + code)
    assert reply(await rcpt(plan, None, client)) == expected


# -- check_*_{mx,ns,a}_access -----------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "table", "sender", "expected"),
    [
        ("mx", "mx.spamhost.test REJECT bad mx", "x@spam.test", "bad mx"),
        ("mx", "198.51.100 REJECT bad net", "x@spam.test", "bad net"),
        ("mx", "spamhost.test REJECT parent", "x@spam.test", "parent"),
        ("mx", "192.0.2.26 REJECT self", "x@a-only.test", "self"),  # no MX: the domain
        ("mx", "mx.spamhost.test REJECT bad mx", "x@sender.test", None),
        ("mx", "mx.spamhost.test REJECT bad mx", "x@broken.test", None),
        ("mx", "192.0.2.1 REJECT literal", "x@[192.0.2.1]", "literal"),
        ("ns", "ns1.spamhost.test REJECT bad ns", "x@spam.test", "bad ns"),
        ("ns", "198.51.100.53 REJECT bad ns ip", "x@sub.spam.test", "bad ns ip"),  # parent NS
        ("ns", "ns1.spamhost.test REJECT bad ns", "x@sender.test", None),
        ("a", "198.51.100.8 REJECT bad a", "x@sub.spam.test", "bad a"),
        ("a", "sub.spam.test REJECT names are not checked", "x@sub.spam.test", None),
        ("a", "192.0.2.1 REJECT literal", "x@[192.0.2.1]", "literal"),
    ],
)
async def test_check_sender_server_access(
    world: FakeDns,
    resolver: DnsPythonResolver,
    make_plan: Any,
    check: str,
    table: str,
    sender: str,
    expected: str | None,
) -> None:
    plan = make_plan(
        f"smtpd_sender_restrictions = check_sender_{check}_access texthash:@DIR@/servers\n",
        {"servers": table + "\n"},
    )
    got = reply(await rcpt(plan, resolver, sender=sender))
    if expected is None:
        assert got is None
    else:
        assert got == f"554 5.7.1 <{sender}>: Sender address rejected: {expected}"


async def test_server_access_lookup_failure_is_logged(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    plan = make_plan(
        "smtpd_sender_restrictions = check_sender_mx_access texthash:@DIR@/servers\n",
        {"servers": "x REJECT\n"},
    )
    decision = await rcpt(plan, resolver, sender="x@broken.test")
    assert decision.reply is None
    assert "Unable to look up MX host for broken.test: Host not found, try again" in warnings(
        decision
    )


async def test_server_access_may_not_allowlist(
    world: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    plan = make_plan(
        "smtpd_sender_restrictions = check_sender_mx_access texthash:@DIR@/servers\n",
        {"servers": "mx.spamhost.test OK\n"},
    )
    decision = await rcpt(plan, resolver, sender="x@spam.test")
    assert reply(decision) == "451 4.3.5 Server configuration error"
    assert warnings(decision)[:2] == [
        "restriction check_sender_mx_access returns OK for x@spam.test",
        "this is not allowed for security reasons",
    ]


@pytest.mark.parametrize(
    ("check", "client", "table", "expected"),
    [
        ("check_client_a_access", LISTED, "192.0.2.10 REJECT", "<mail.sender.test[192.0.2.10]>"),
        ("check_client_mx_access", LISTED, "192.0.2.10 REJECT", "<mail.sender.test[192.0.2.10]>"),
        ("check_client_mx_access", NO_NAME, "192.0.2.20 REJECT", None),
        ("check_helo_a_access", LISTED, "192.0.2.10 REJECT", "<mail.sender.test>"),
        ("check_helo_mx_access", LISTED, "192.0.2.10 REJECT", "<mail.sender.test>"),
        ("check_recipient_mx_access", LISTED, "192.0.2.25 REJECT", "<bob@sender.test>"),
        (
            "check_reverse_client_hostname_a_access",
            LISTED,
            "192.0.2.10 REJECT",
            "<mail.sender.test>",
        ),
    ],
)
async def test_other_server_checks(
    world: FakeDns,
    resolver: DnsPythonResolver,
    make_plan: Any,
    check: str,
    client: ClientInfo,
    table: str,
    expected: str | None,
) -> None:
    plan = make_plan(
        f"smtpd_recipient_restrictions = {check} texthash:@DIR@/t, permit\n",
        {"t": table + "\n"},
    )
    got = reply(await rcpt(plan, resolver, client, to="bob@sender.test"))
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith(f"554 5.7.1 {expected}: ")


async def test_no_resolver_is_a_temporary_failure(make_plan: Any) -> None:
    plan = make_plan(RBL.format(zone="zen.test"))
    decision = await rcpt(plan, None)
    assert reply(decision) == "450 4.7.1 <192.0.2.10>: Client host rejected: Service unavailable"
    assert any(s.result.endswith("no DNS resolver configured") for s in decision.steps)
