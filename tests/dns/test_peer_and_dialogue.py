"""Client name lookup (smtpd_peer.c), the pure DNSBL helpers, and whole dialogues."""

from __future__ import annotations

from typing import Any

import pytest

from smtpgate.config import parse_settings
from smtpgate.config.service import ServiceConfig
from smtpgate.policy.dnsbl import (
    TemplateError,
    ZoneError,
    address_query,
    domain_query,
    expand_template,
    is_list_error,
    parse_zone,
    txt_reason,
    unescape,
)
from smtpgate.policy.model import ClientInfo
from smtpgate.policy.peer import lookup_client
from smtpgate.resolver import DnsPythonResolver
from smtpgate.smtp.explain import run_dialogue
from tests.dns.conftest import BASE
from tests.dns.dnsserver import FakeDns

# -- lookup_client ----------------------------------------------------------------------


@pytest.fixture
def names(dns_server: FakeDns) -> FakeDns:
    dns_server.add("10.2.0.192.in-addr.arpa", "PTR", "mail.sender.test")
    dns_server.add("mail.sender.test", "A", "192.0.2.99", "192.0.2.10")
    dns_server.add("11.2.0.192.in-addr.arpa", "PTR", "liar.test")
    dns_server.add("liar.test", "A", "198.51.100.1")
    dns_server.add("12.2.0.192.in-addr.arpa", "PTR", "gone.test")
    dns_server.add("13.2.0.192.in-addr.arpa", "PTR", "flaky.test")
    dns_server.servfail.add("flaky.test")
    dns_server.servfail.add("14.2.0.192.in-addr.arpa")
    dns_server.add("15.2.0.192.in-addr.arpa", "PTR", "192.0.2.15")
    rev6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    dns_server.add(rev6, "PTR", "v6.sender.test")
    dns_server.add("v6.sender.test", "AAAA", "2001:db8::1")
    dns_server.add("v6.sender.test", "A", "192.0.2.66")
    return dns_server


@pytest.mark.parametrize(
    ("address", "name", "reverse", "status", "reverse_status", "warning"),
    [
        ("192.0.2.10", "mail.sender.test", "mail.sender.test", "ok", "ok", None),
        ("2001:db8::1", "v6.sender.test", "v6.sender.test", "ok", "ok", None),
        (
            "192.0.2.11",
            "unknown",
            "liar.test",
            "forged",
            "ok",
            "hostname liar.test does not resolve to address 192.0.2.11",
        ),
        (
            "192.0.2.12",
            "unknown",
            "gone.test",
            "forged",
            "ok",
            "hostname gone.test does not resolve to address 192.0.2.12: Name or service not known",
        ),
        (
            "192.0.2.13",
            "unknown",
            "flaky.test",
            "temp",
            "ok",
            "hostname flaky.test does not resolve to address 192.0.2.13: "
            "Temporary failure in name resolution",
        ),
        ("192.0.2.14", "unknown", "unknown", "temp", "temp", None),
        (
            "192.0.2.15",
            "unknown",
            "unknown",
            "perm",
            "perm",
            "sockaddr_to_hostname: numeric hostname: 192.0.2.15",
        ),
        ("192.0.2.16", "unknown", "unknown", "perm", "perm", None),
    ],
)
async def test_lookup_client(
    names: FakeDns,
    resolver: DnsPythonResolver,
    address: str,
    name: str,
    reverse: str,
    status: str,
    reverse_status: str,
    warning: str | None,
) -> None:
    found = await lookup_client(resolver, address, 4321)
    client = found.client
    assert (client.address, client.port) == (address, 4321)
    assert (client.name, client.reverse_name) == (name, reverse)
    assert (client.name_status, client.reverse_name_status) == (status, reverse_status)
    assert [r.text for r in found.logs] == ([warning] if warning else [])
    assert found.steps and found.steps[0].what == "dns"


async def test_lookup_client_disabled(names: FakeDns, resolver: DnsPythonResolver) -> None:
    found = await lookup_client(resolver, "192.0.2.10", peername_lookup=False)
    assert (found.client.name, found.client.name_status) == ("unknown", "perm")
    assert names.queries == []
    found = await lookup_client(None, "192.0.2.10")
    assert (found.client.name, found.client.name_status) == ("unknown", "temp")


# -- pure helpers ---------------------------------------------------------------------------


def test_zone_filters() -> None:
    zone = parse_zone("zen.test=127.0.0.[2..11]")
    assert (zone.domain, zone.text) == ("zen.test", "zen.test=127.0.0.[2..11]")
    assert [zone.matches(f"127.0.0.{i}") for i in (1, 2, 11, 12)] == [False, True, True, False]
    multi = parse_zone("list.test=127.[0;1].0.[2;4..5]")
    assert multi.matches("127.1.0.4") and not multi.matches("127.0.0.3")
    assert parse_zone("plain.test").matches("127.0.0.99")
    for bad in (
        "zen.test=127.0.0",
        "zen.test=127.0.0.[2..300]",
        "zen.test=127.0.0.[5..2]",
        "zen.test=127.0.0.[2",
        "-bad-.test",
        "zen.test=a.b.c.d",
    ):
        with pytest.raises(ZoneError):
            parse_zone(bad)


def test_query_names() -> None:
    zone = parse_zone("zen.test=127.0.0.2")
    assert address_query("192.0.2.10", zone) == "10.2.0.192.zen.test"
    assert address_query("2001:db8::1", zone) == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.test"
    )
    assert address_query("unknown", zone) is None
    assert domain_query("user@Example.COM", zone) == "Example.COM.zen.test"
    assert domain_query("host.example", zone) == "host.example.zen.test"
    assert domain_query("user@[192.0.2.1]", zone) is None
    assert domain_query("user@", zone) is None
    assert domain_query("host.123", zone) is None
    assert domain_query("bad_name..test", zone) is None
    assert domain_query("bücher.test", zone) == "xn--bcher-kva.test.zen.test"


def test_answer_validation() -> None:
    assert not is_list_error("127.0.0.2")
    assert not is_list_error("127.0.1.255")
    for bad in ("127.0.0.1", "127.255.255.254", "127.255.255.252", "10.0.0.2", "nonsense"):
        assert is_list_error(bad)


def test_txt_reason() -> None:
    assert txt_reason(["one", "two\x07"]) == "one / two "
    assert len(txt_reason(["x" * 400, "y" * 400])) == 500


def test_expand_template() -> None:
    values = {"rbl_code": "554", "rbl_what": "a\tb", "rbl_reason": ""}.get
    warned: list[str] = []
    out = expand_template(
        "$rbl_code [$rbl_what]${rbl_reason?; $rbl_reason}", values, "ab[]0123456789", warned.append
    )
    assert out == "554 [a_b]"
    with pytest.raises(TemplateError):
        expand_template("$nope", values, None, warned.append)
    assert warned == ['unknown macro name "nope" in expansion request']
    assert unescape("\\t\\40x\\\\") == "\t x\\"


# -- whole dialogues (what serve and explain answer) ---------------------------------------


MAIN_CF = (
    "smtpd_recipient_restrictions = permit_mynetworks, reject_rbl_client zen.test, "
    "reject_unauth_destination\n"
)


def _service() -> ServiceConfig:
    """The front end's configuration of the dialogues: Postfix's defaults."""
    settings, _ = parse_settings(BASE, "main.cf", hostname="mx.example.org")
    return ServiceConfig.from_settings(settings)


async def test_dialogue_rbl_reject_lines(
    dns_server: FakeDns, resolver: DnsPythonResolver, make_plan: Any
) -> None:
    dns_server.add("10.2.0.192.in-addr.arpa", "PTR", "mail.sender.test")
    dns_server.add("mail.sender.test", "A", "192.0.2.10")
    dns_server.add("10.2.0.192.zen.test", "A", "127.0.0.2")
    dns_server.add("10.2.0.192.zen.test", "TXT", "https://zen.test/q?192.0.2.10")
    exchanges = await run_dialogue(
        make_plan(MAIN_CF),
        ClientInfo("192.0.2.10"),
        config=_service(),
        helo="mail.sender.test",
        sender="alice@sender.test",
        recipients=["bob@example.org"],
        esmtp=True,
        resolver=resolver,
        lookup_client_name=True,
    )
    greeting, _, _, rcpt = exchanges
    assert [s.detail for s in greeting.decision.steps[:2]] == [  # type: ignore[union-attr]
        "PTR 10.2.0.192.in-addr.arpa",
        "A mail.sender.test",
    ]
    assert rcpt.reply.lines() == [
        "554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.test; "
        "https://zen.test/q?192.0.2.10"
    ]
    assert rcpt.log_lines == [
        "NOQUEUE: reject: RCPT from mail.sender.test[192.0.2.10]: 554 5.7.1 Service "
        "unavailable; Client host [192.0.2.10] blocked using zen.test; "
        "https://zen.test/q?192.0.2.10; from=<alice@sender.test> to=<bob@example.org> "
        "proto=ESMTP helo=<mail.sender.test>"
    ]


async def test_dialogue_unlisted_and_outage(dns_server: FakeDns, make_plan: Any) -> None:
    plan = make_plan(MAIN_CF)
    resolver = DnsPythonResolver([dns_server.address], timeout=0.1, tries=1)
    kwargs: dict[str, Any] = {
        "helo": "mail.sender.test",
        "sender": "alice@sender.test",
        "recipients": ["bob@example.org"],
        "resolver": resolver,
        "lookup_client_name": True,
        "config": _service(),
    }
    passed = await run_dialogue(plan, ClientInfo("192.0.2.11"), **kwargs)
    assert passed[-1].reply.lines() == ["250 2.1.5 Ok"]
    dns_server.drop_all = True
    resolver.clear_cache()
    deferred = await run_dialogue(plan, ClientInfo("192.0.2.11"), **kwargs)
    assert deferred[-1].reply.lines() == [
        "450 4.7.1 <192.0.2.11>: Client host rejected: Service unavailable"
    ]
    assert deferred[-1].log_lines == [
        "NOQUEUE: reject: RCPT from unknown[192.0.2.11]: 450 4.7.1 <192.0.2.11>: Client host "
        "rejected: Service unavailable; from=<alice@sender.test> to=<bob@example.org> "
        "proto=SMTP helo=<mail.sender.test>"
    ]
