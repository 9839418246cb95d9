"""Key derivation and name syntax, table-driven (Postfix smtpd_check.c, valid_hostname.c)."""

import pytest

from smtpgate.policy.address import (
    AddressClass,
    Resolver,
    address_keys,
    domain_keys,
    dup_if_truncate,
    ip_keys,
    valid_hostaddr,
    valid_hostname,
    valid_mailhost_addr,
)


@pytest.mark.parametrize(
    ("address", "delim", "parent", "expected"),
    [
        (
            "318787866@qq.com",
            "",
            True,
            [("318787866@qq.com", False), ("qq.com", True), ("com", True), ("318787866@", True)],
        ),
        (
            "User+Ext@Mail.Example.COM",
            "+",
            True,
            [
                ("user+ext@mail.example.com", False),
                ("user@mail.example.com", True),
                ("mail.example.com", True),
                ("example.com", True),
                ("com", True),
                ("user+ext@", True),
                ("user@", True),
            ],
        ),
        (
            "a@sub.example.com",
            "",
            False,
            [
                ("a@sub.example.com", False),
                ("sub.example.com", True),
                (".example.com", True),
                (".com", True),
                ("a@", True),
            ],
        ),
        (
            "owner-list@example.com",
            "-",
            True,
            [
                ("owner-list@example.com", False),
                ("example.com", True),
                ("com", True),
                ("owner-list@", True),
            ],
        ),
    ],
)
def test_address_keys(address, delim, parent, expected):
    assert list(address_keys(address, delim, parent)) == expected


def test_domain_keys_stop_at_numeric_hosts():
    assert domain_keys("192.0.2.1", True) == [("192.0.2.1", False)]
    assert domain_keys("Mail.Example.org", True) == [
        ("mail.example.org", False),
        ("example.org", True),
        ("org", True),
    ]


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("203.0.113.82", ["203.0.113.82", "203.0.113", "203.0", "203"]),
        ("2001:db8::1", ["2001:db8::1", "2001:db8:", "2001:db8", "2001"]),
    ],
)
def test_ip_keys(addr, expected):
    keys = ip_keys(addr)
    assert [k for k, _ in keys] == expected
    assert [p for _, p in keys] == [False] + [True] * (len(expected) - 1)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("me.testing.example.com", True),
        ("localhost", True),
        ("under_score.example", True),
        ("-bad.example", False),
        ("bad-.example", False),
        ("a..b", False),
        ("trailing.", False),
        ("1.2.3.4", False),
        ("123", False),
        ("x" * 64 + ".example", False),
        ("sp ace.example", False),
        ("", False),
        ("ünicode.example", False),
    ],
)
def test_valid_hostname(name, ok):
    assert valid_hostname(name) is ok


def test_addresses_and_literals():
    assert valid_hostaddr("1.2.3.4")
    assert not valid_hostaddr("1.2.3")
    assert not valid_hostaddr("1.2.3.256")
    assert valid_hostaddr("::1")
    assert valid_mailhost_addr("IPv6:2001:db8::1")
    assert not valid_mailhost_addr("2001:db8::1")
    assert dup_if_truncate("a.example.") == "a.example"
    assert dup_if_truncate("a.example..") == "a.example.."


def _resolver():
    return Resolver(
        myorigin="mx.example.org",
        is_local_domain=lambda d: d in {"mx.example.org", "localhost"},
        is_relay_domain=lambda d: d == "bar.org",
    )


@pytest.mark.parametrize(
    ("address", "resolved", "klass", "routed"),
    [
        ("foo@bar.org", "foo@bar.org", AddressClass.RELAY, False),
        ("Foo@BAR.ORG.", "foo@bar.org", AddressClass.RELAY, False),
        ("postmaster", "postmaster@mx.example.org", AddressClass.LOCAL, False),
        ("x@elsewhere.example", "x@elsewhere.example", AddressClass.DEFAULT, False),
        # source routes through a local domain are unrolled, then judged
        ("x%elsewhere.example@mx.example.org", "x@elsewhere.example", AddressClass.DEFAULT, False),
        ("elsewhere.example!x@mx.example.org", "x@elsewhere.example", AddressClass.DEFAULT, False),
        # routing characters left in a non-local address mark it as routed
        ("x%elsewhere.example@bar.org", "x%elsewhere.example@bar.org", AddressClass.RELAY, True),
        (
            '"x@elsewhere.example"@bar.org',
            '"x@elsewhere.example"@bar.org',
            AddressClass.RELAY,
            True,
        ),
    ],
)
def test_resolve(address, resolved, klass, routed):
    r = _resolver().resolve(address)
    assert (r.address, r.klass, r.routed) == (resolved, klass, routed)
