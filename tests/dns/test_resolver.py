"""DnsPythonResolver against the loopback server: statuses, TTL cache, TCP, limits, MX."""

from __future__ import annotations

import asyncio

import pytest

from smtpgate.config import parse_settings
from smtpgate.config.service import ServiceConfig
from smtpgate.errors import ConfigError
from smtpgate.policy.ports import DnsStatus
from smtpgate.resolver import (
    DnsLookupError,
    DnsPythonResolver,
    mx_hosts,
    mx_targets,
    parse_dns_servers,
    resolver_from_config,
)
from tests.dns.dnsserver import FakeDns


async def test_answer_statuses(dns_server: FakeDns, resolver: DnsPythonResolver) -> None:
    dns_server.add("host.test", "A", "192.0.2.1", "192.0.2.2")
    dns_server.add("host.test", "AAAA", "2001:db8::1")
    dns_server.add("alias.test", "CNAME", "host.test")
    dns_server.servfail.add("broken.test")
    dns_server.refused.add("refused.test")
    ok = await resolver.lookup("host.test", "A")
    assert (ok.status, sorted(ok.records), ok.ttl) == (
        DnsStatus.OK,
        ["192.0.2.1", "192.0.2.2"],
        300,
    )
    assert (await resolver.lookup("host.test.", "AAAA")).records == ("2001:db8::1",)
    assert sorted((await resolver.lookup("alias.test", "A")).records) == ["192.0.2.1", "192.0.2.2"]
    nodata = await resolver.lookup("host.test", "MX")
    assert (nodata.status, nodata.ttl) == (DnsStatus.NODATA, 60)
    assert (await resolver.lookup("nowhere.test", "A")).status is DnsStatus.NXDOMAIN
    servfail = await resolver.lookup("broken.test", "A")
    assert servfail.status is DnsStatus.TEMPFAIL and "SERVFAIL" in servfail.detail
    assert (await resolver.lookup("refused.test", "A")).status is DnsStatus.TEMPFAIL


async def test_record_formats(dns_server: FakeDns, resolver: DnsPythonResolver) -> None:
    dns_server.add("mail.test", "MX", "10 mx1.test", "20 mx2.test")
    dns_server.add("null.test", "MX", "0 .")
    dns_server.add("mail.test", "NS", "ns1.test")
    dns_server.add("1.2.0.192.in-addr.arpa", "PTR", "Host.Example.test")
    dns_server.add("mail.test", "TXT", "v=spf1 -all")
    mx = await resolver.lookup("mail.test", "MX")
    assert sorted(mx.records) == ["10 mx1.test", "20 mx2.test"]
    assert (await resolver.lookup("null.test", "MX")).records == ("0 ",)
    assert (await resolver.lookup("mail.test", "NS")).records == ("ns1.test",)
    ptr = await resolver.lookup("1.2.0.192.in-addr.arpa", "PTR")
    assert ptr.records == ("Host.Example.test",)
    assert (await resolver.lookup("mail.test", "TXT")).records == ("v=spf1 -all",)


async def test_timeout_is_retried_then_temporary(dns_server: FakeDns) -> None:
    dns_server.drop.add("slow.test")
    resolver = DnsPythonResolver([dns_server.address], timeout=0.2, tries=3)
    answer = await resolver.lookup("slow.test", "A")
    assert answer.status is DnsStatus.TEMPFAIL and answer.detail == "timeout"
    assert dns_server.count("slow.test") == 3


async def test_server_that_never_answers() -> None:
    import socket

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = DnsPythonResolver([silent.getsockname()], timeout=0.1, tries=2)
        answer = await resolver.lookup("anything.test", "A")
        assert answer.temporary
    finally:
        silent.close()


async def test_positive_and_negative_answers_are_cached(dns_server: FakeDns) -> None:
    now = [1000.0]
    resolver = DnsPythonResolver([dns_server.address], timeout=0.3, clock=lambda: now[0])
    dns_server.add("cached.test", "A", "192.0.2.7", ttl=30)
    dns_server.negative_ttl = 10
    for _ in range(3):
        assert (await resolver.lookup("CACHED.test", "A")).ok
        assert (await resolver.lookup("missing.test", "A")).status is DnsStatus.NXDOMAIN
        assert (await resolver.lookup("cached.test", "MX")).status is DnsStatus.NODATA
    assert dns_server.count("cached.test", "A") == 1
    assert dns_server.count("missing.test") == 1
    assert dns_server.count("cached.test", "MX") == 1
    now[0] += 11  # the negative answers expire, the positive one not yet
    await resolver.lookup("missing.test", "A")
    await resolver.lookup("cached.test", "A")
    assert dns_server.count("missing.test") == 2
    assert dns_server.count("cached.test", "A") == 1
    now[0] += 30
    await resolver.lookup("cached.test", "A")
    assert dns_server.count("cached.test", "A") == 2


async def test_temporary_failures_are_not_cached(
    dns_server: FakeDns, resolver: DnsPythonResolver
) -> None:
    dns_server.servfail.add("flaky.test")
    dns_server.add("flaky.test", "A", "192.0.2.9")
    assert (await resolver.lookup("flaky.test", "A")).temporary
    dns_server.servfail.clear()
    assert (await resolver.lookup("flaky.test", "A")).ok


async def test_large_answer_falls_back_to_tcp(
    dns_server: FakeDns, resolver: DnsPythonResolver
) -> None:
    dns_server.add("big.test", "TXT", *[f"{i:02d}" + "x" * 200 for i in range(10)])
    answer = await resolver.lookup("big.test", "TXT")
    assert answer.ok and len(answer.records) == 10
    assert ("big.test", "TXT", "tcp") in dns_server.queries


async def test_concurrency_is_bounded(dns_server: FakeDns) -> None:
    dns_server.delay = 0.1
    for i in range(8):
        dns_server.add(f"h{i}.test", "A", f"192.0.2.{i + 1}")
    resolver = DnsPythonResolver([dns_server.address], timeout=2, concurrency=2)
    answers = await asyncio.gather(*(resolver.lookup(f"h{i}.test", "A") for i in range(8)))
    assert all(a.ok for a in answers)
    assert dns_server.max_in_flight == 2


def test_parse_dns_servers() -> None:
    assert parse_dns_servers(["127.0.0.1:5353", "[::1]:53", "192.0.2.1", "::1"]) == [
        ("127.0.0.1", 5353),
        ("::1", 53),
        ("192.0.2.1", 53),
        ("::1", 53),
    ]
    for bad in ("ns.example:53", "127.0.0.1:0", "[::1", "1.2.3.4:x"):
        with pytest.raises(ValueError):
            parse_dns_servers([bad])


def test_resolver_from_config() -> None:
    text = "dns_servers = 127.0.0.1:5353\ndns_timeout = 2s\ndns_tries = 3\n"
    settings, _ = parse_settings(text, "main.cf", hostname="mx.example.org")
    config = ServiceConfig.from_settings(settings)
    resolver = resolver_from_config(config)
    assert (resolver.servers, resolver.timeout, resolver.tries) == (
        ["Do53:127.0.0.1@5353"],
        2.0,
        3,
    )
    override = resolver_from_config(config, ["[::1]:53"])
    assert override.servers == ["Do53:::1@53"]
    with pytest.raises(ConfigError, match="dns_servers"):
        resolver_from_config(config, ["not-an-ip"])


# -- relayhost MX lookup ----------------------------------------------------------------


async def test_mx_hosts_in_preference_order(
    dns_server: FakeDns, resolver: DnsPythonResolver
) -> None:
    dns_server.add("dest.test", "MX", "20 backup.test", "10 primary.test")
    dns_server.add("primary.test", "A", "192.0.2.10")
    dns_server.add("primary.test", "AAAA", "2001:db8::10")
    dns_server.add("backup.test", "A", "192.0.2.20")
    assert await mx_hosts(resolver, "dest.test", 2525) == [
        ("192.0.2.10", 2525),
        ("2001:db8::10", 2525),
        ("192.0.2.20", 2525),
    ]
    targets = await mx_targets(resolver, "dest.test")
    assert [(t.host, t.preference) for t in targets] == [
        ("primary.test", 10),
        ("primary.test", 10),
        ("backup.test", 20),
    ]


async def test_mx_hosts_without_mx_use_the_domain(
    dns_server: FakeDns, resolver: DnsPythonResolver
) -> None:
    dns_server.add("plain.test", "A", "192.0.2.30")
    assert await mx_hosts(resolver, "plain.test") == [("192.0.2.30", 25)]


@pytest.mark.parametrize(
    ("setup", "temporary", "text"),
    [
        ("nxdomain", False, "Host or domain name not found"),
        ("nullmx", False, "does not accept mail (nullMX)"),
        ("servfail", True, "MX lookup failed"),
        ("no address", False, "no address"),
        ("address servfail", True, "temporary failure"),
    ],
)
async def test_mx_hosts_errors(
    dns_server: FakeDns, resolver: DnsPythonResolver, setup: str, temporary: bool, text: str
) -> None:
    if setup == "nullmx":
        dns_server.add("dest.test", "MX", "0 .")
    elif setup == "servfail":
        dns_server.servfail.add("dest.test")
    elif setup == "no address":
        dns_server.add("dest.test", "MX", "10 gone.test")
    elif setup == "address servfail":
        dns_server.add("dest.test", "MX", "10 sf.test")
        dns_server.servfail.add("sf.test")
    with pytest.raises(DnsLookupError) as info:
        await mx_hosts(resolver, "dest.test")
    assert info.value.temporary is temporary
    assert text in info.value.message
