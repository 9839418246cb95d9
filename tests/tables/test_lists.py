"""DomainList and AddressList: Postfix match_list semantics (match_ops.c)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.errors import TableLookupError, TableOpenError
from smtpgate.tables import AddressList, DomainList

from ._postmap import write_table

LOC = ("/etc/smtpgate/main.cf", 4)

# (entries, parent_matches_subdomains, domain, expected)
DOMAIN_CASES = [
    (["example.com"], False, "example.com", True),
    (["example.com"], False, "EXAMPLE.Com", True),
    (["example.com"], False, "mail.example.com", False),
    (["example.com"], True, "mail.example.com", True),
    (["example.com"], True, "badexample.com", False),
    ([".example.com"], False, "mail.example.com", True),
    ([".example.com"], False, "example.com", False),
    ([".example.com"], True, "mail.example.com", False),  # match_hostname: pd[-1] must be "."
    (["!mail.example.com", "example.com"], True, "mail.example.com", False),
    (["!mail.example.com", "example.com"], True, "www.example.com", True),
    (["!!example.com"], False, "example.com", True),
    (["inline:{example.com=x}"], True, "a.b.example.com", True),
    (["inline:{example.com=x}"], False, "a.b.example.com", False),
    (["inline:{.example.com=x}"], False, "a.b.example.com", True),
    (["inline:{.example.com=x}"], True, "a.b.example.com", False),
    (["inline:{com=x}"], True, "example.com", True),
    (["!inline:{bad.example.com=x}", "example.com"], True, "bad.example.com", False),
    (["regexp:{{/^example\\.com$/ x}}"], True, "a.example.com", False),  # patterns: whole name
    (["regexp:{{/example\\.com$/ x}}"], True, "a.example.com", True),
    (["pcre:{{/^a\\./ x}}"], True, "A.example.com", True),
    (["example.com", "#", "other.org"], False, "other.org", False),
    ([], True, "example.com", False),
]


@pytest.mark.parametrize(("entries", "parent", "domain", "expected"), DOMAIN_CASES)
def test_domain_list(entries: list[str], parent: bool, domain: str, expected: bool) -> None:
    domains = DomainList.parse(entries, parent_matches_subdomains=parent, title="relay_domains")
    assert domains.match(domain) is expected


def test_domain_table_keys_follow_match_hostname() -> None:
    seen: list[str] = []

    class Recorder:
        type, name, is_pattern = "hash", "/rec", False

        def lookup(self, key: str) -> str | None:
            seen.append(key)
            return None

    for parent, keys in [(True, ["a.b.c", "b.c", "c"]), (False, ["a.b.c", ".b.c", ".c"])]:
        seen.clear()
        domains = DomainList.parse([], parent_matches_subdomains=parent, title="t")
        domains.entries = domains.entries + _entries_with(Recorder())
        assert domains.match("A.b.C") is False
        assert seen == keys


def _entries_with(table: object) -> tuple:  # type: ignore[type-arg]
    from smtpgate.tables.lists import _Entry

    return (_Entry(True, "rec", table=table),)  # type: ignore[arg-type]


def test_domain_list_file(tmp_path: Path) -> None:
    write_table(tmp_path / "domains", "# our domains\nexample.com, example.net\n!bad.example.org\n"
                "example.org # trailing comment\nnot.reached\n")  # fmt: skip
    domains = DomainList.parse(
        [str(tmp_path / "domains")], parent_matches_subdomains=True, title="relay_domains"
    )
    assert [domains.match(d) for d in ("x.example.net", "bad.example.org", "a.example.org")] == [
        True, False, True
    ]  # fmt: skip
    assert domains.match("not.reached") is True  # the comment only ends its own line
    assert domains.warnings == (
        "relay_domains: comment at end of line is not supported: # trailing comment",
    )
    negated = DomainList.parse(
        ["!" + str(tmp_path / "domains"), "example.com", "other.org"],
        parent_matches_subdomains=False,
        title="t",
    )
    assert negated.match("example.com") is False
    assert negated.match("other.org") is True


def test_domain_list_errors() -> None:
    with pytest.raises(TableOpenError) as info:
        DomainList.parse(["!"], parent_matches_subdomains=True, title="relay_domains", location=LOC)
    assert str(info.value) == f"{LOC[0]}, line 4: relay_domains: no pattern after '!'"
    with pytest.raises(TableOpenError, match="unsupported dictionary type: btree"):
        DomainList.parse(["btree:/x"], parent_matches_subdomains=True, title="t", location=LOC)
    with pytest.raises(TableOpenError, match="open file /nonexistent/domains"):
        DomainList.parse(["/nonexistent/domains"], parent_matches_subdomains=True, title="t")


def test_domain_list_table_error_is_raised() -> None:
    domains = DomainList.parse(["example.com"], parent_matches_subdomains=True, title="t")
    from smtpgate.tables import SurrogateTable

    domains.entries = _entries_with(SurrogateTable("hash", "/x", "boom"))
    with pytest.raises(TableLookupError):
        domains.match("example.com")


MYNETWORKS = [
    "127.0.0.0/8",
    "[::1]/128",
    "!192.168.1.13",
    "192.168.0.0/16",
    "[2001:db8::]/32",
    "10.0.0.1",
    "[fe80::1]",
    "cidr:{{172.16.0.0/12 x}}",
]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("0:0::1", True),
        ("192.168.1.13", False),
        ("192.168.1.14", True),
        ("2001:DB8::25", True),
        ("10.0.0.1", True),
        ("10.0.0.2", False),
        ("fe80::1", True),
        ("FE80:0::1", True),
        ("172.16.5.5", True),
        ("8.8.8.8", False),
        ("::ffff:127.0.0.1", False),
        ("localhost", False),
        ("", False),
    ],
)
def test_address_list(address: str, expected: bool) -> None:
    networks = AddressList.parse(MYNETWORKS, title="mynetworks")
    assert networks.match(address) is expected


def test_address_list_file_and_tables(tmp_path: Path) -> None:
    write_table(tmp_path / "nets", "1.2.3.0/24 [2001:db8::]/32\n")
    write_table(tmp_path / "table", "5.6.7.8 OK\n")
    networks = AddressList.parse(
        [str(tmp_path / "nets"), "texthash:table"], base_dir=tmp_path, title="mynetworks"
    )
    assert [networks.match(a) for a in ("1.2.3.4", "2001:db8::1", "5.6.7.8", "5.6.7.9")] == [
        True, True, True, False
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("1.2.3.4/33", 'mynetworks: bad mask length in "1.2.3.4/33"'),
        ("1.2.3.4/24", 'mynetworks: non-null host address bits in "1.2.3.4/24", '
                       'perhaps you should use "1.2.3.0/24" instead'),
        ("[::1/128", "mynetworks: missing ']' character after \"[::1/128\""),
        ("::1/128", 'mynetworks: bare IPv6 pattern "::1/128": write it as "[::1]/128"'),
        ("!2001:db8::1", 'mynetworks: bare IPv6 pattern "2001:db8::1": '
                         'write it as "[2001:db8::1]"'),
        ("foo:bar", "unsupported dictionary type: foo"),
    ],
)  # fmt: skip
def test_address_list_errors(entry: str, message: str) -> None:
    with pytest.raises(TableOpenError) as info:
        AddressList.parse(["127.0.0.0/8", entry], title="mynetworks", location=LOC)
    assert str(info.value) == f"{LOC[0]}, line 4: {message}"


def test_address_list_warns_about_names() -> None:
    networks = AddressList.parse(["localhost", "1.2.3"], title="mynetworks")
    assert networks.warnings == (
        'mynetworks: "localhost" is not an address and never matches',
        'mynetworks: "1.2.3" is not an address and never matches',
    )
    assert networks.match("127.0.0.1") is False


octet = st.integers(0, 255)


@given(st.tuples(octet, octet, octet, octet), st.integers(0, 32))
def test_address_list_agrees_with_ipaddress(parts: tuple[int, ...], length: int) -> None:
    import ipaddress

    address = ".".join(map(str, parts))
    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    networks = AddressList.parse([str(network)], title="t")
    assert networks.match(address) is True
    other = ipaddress.ip_address((int(network.network_address) - 1) % 2**32)
    assert networks.match(str(other)) is (other in network)


@given(st.lists(st.text(st.sampled_from(list("0123456789abcdef.:/[]!x")), max_size=20), max_size=5))
def test_any_entries_parse_or_raise_table_open_error(entries: list[str]) -> None:
    try:
        networks = AddressList.parse(entries, title="t")
    except TableOpenError:
        return
    networks.match("1.2.3.4")
    networks.match("::1")
