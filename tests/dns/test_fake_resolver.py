"""The fake resolver answers as the real one does: the same data, both ways, compared.

``FakeResolver`` (smtpgate/policy/ports.py) stands in for ``DnsPythonResolver`` in the
unit tests of tests/policy/test_dns_unit.py; this test keeps the two honest by asking each
the same questions about the same records (the real one through the loopback server).
"""

from __future__ import annotations

import pytest

from smtpgate.policy.ports import REFUSED, SERVFAIL, TIMEOUT, FakeResolver
from smtpgate.resolver import DnsPythonResolver
from tests.dns.dnsserver import FakeDns

RECORDS = {
    "mx.sender.test": {"A": "192.0.2.25", "AAAA": "2001:db8::25"},
    "sender.test": {"MX": ["10 mx.sender.test", "20 mx2.sender.test"], "NS": "ns1.sender.test"},
    "null.test": {"MX": "0 "},
    "10.2.0.192.zen.test": {"A": "127.0.0.2", "TXT": "Listed: see https://zen.test/"},
    "10.2.0.192.in-addr.arpa": {"PTR": "mail.sender.test"},
}
QUERIES = [
    ("mx.sender.test", "A"),
    ("MX.sender.test", "AAAA"),
    ("mx.sender.test", "MX"),
    ("sender.test", "MX"),
    ("sender.test", "NS"),
    ("null.test", "MX"),
    ("10.2.0.192.zen.test", "A"),
    ("10.2.0.192.zen.test", "TXT"),
    ("10.2.0.192.in-addr.arpa", "PTR"),
    ("nowhere.test", "A"),
    ("broken.test", "A"),
    ("refused.test", "MX"),
    ("slow.test", "A"),
]


@pytest.mark.parametrize(("name", "rdtype"), QUERIES)
async def test_fake_answers_like_the_real_resolver(dns_server: FakeDns, name: str, rdtype: str):
    for host, types in RECORDS.items():
        for kind, values in types.items():
            for value in [values] if isinstance(values, str) else values:
                dns_server.add(host, kind, "0 ." if value == "0 " else value)
    dns_server.servfail.add("broken.test")
    dns_server.refused.add("refused.test")
    dns_server.drop.add("slow.test")
    real = DnsPythonResolver([dns_server.address], timeout=0.2, tries=1)
    fake = FakeResolver(
        {**RECORDS, "broken.test": SERVFAIL, "refused.test": REFUSED, "slow.test": TIMEOUT}
    )
    want = await real.lookup(name, rdtype)
    got = await fake.lookup(name, rdtype)
    # The records of an RRset have no order in DNS (dnspython may return any).
    assert (got.status, sorted(got.records), got.ok, got.not_found, got.temporary) == (
        want.status,
        sorted(want.records),
        want.ok,
        want.not_found,
        want.temporary,
    )
