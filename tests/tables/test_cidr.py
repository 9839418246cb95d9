"""cidr: tables, checked against cidr_table(5) and postmap -q."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.errors import TableOpenError
from smtpgate.tables import open_table
from smtpgate.tables.cidr import parse_cidr_text

from ._postmap import postmap_query, postmap_skip_reason, requires_postmap, write_table

TABLE = """\
# comment
1.2.3.0/24   OK one
1.2.0.0/16  two
!10.0.0.0/8  notten
10.1.2.3 exact
2001:db8::/32 six
[2001:db9::]/32 sixbr
[2001:dba::1] sixhost
[5.6.7.0/24] bracketed
0.0.0.0/0 default
if 192.168.0.0/16
192.168.1.0/24 inner
endif
IF ::/0
! 2001:db8::/32   negated six
ENDIF
"""

LOOKUPS = [
    ("1.2.3.4", "OK one"),
    ("1.2.4.4", "two"),
    ("10.1.2.3", "exact"),
    ("10.9.9.9", "default"),
    ("11.1.1.1", "notten"),  # a negated IPv4 rule matches any other IPv4 address
    ("5.6.7.8", "notten"),
    ("192.168.1.1", "notten"),
    ("2001:db8::1", "six"),
    ("2001:DB8::1", "six"),
    ("2001:db9::1", "sixbr"),
    ("2001:dba::1", "sixhost"),
    ("::1", "negated six"),  # ... and never an IPv6 one
    ("2001:dbf::1", "negated six"),
    ("::ffff:1.2.3.4", "negated six"),  # IPv4-mapped is IPv6 here
    ("[1.2.3.4]", None),  # not an address: not found
    ("foo", None),
    ("1.2.3", None),
    ("01.2.3.4", None),  # inet_pton refuses leading zeros
    ("fe80::1%eth0", None),
    ("", None),
]


@pytest.fixture
def cidr_file(tmp_path: Path) -> Path:
    path = tmp_path / "clients.cidr"
    write_table(path, TABLE)
    return path


@pytest.mark.parametrize(("key", "expected"), LOOKUPS)
def test_lookup(key: str, expected: str | None) -> None:
    assert parse_cidr_text(TABLE, "/t").lookup(key) == expected


@requires_postmap
def test_lookups_agree_with_postmap(cidr_file: Path) -> None:
    table = open_table(f"cidr:{cidr_file}")
    for key, expected in LOOKUPS:
        if key:
            assert postmap_query(f"cidr:{cidr_file}", key)[0] == expected, key
            assert table.lookup(key) == expected


def test_if_blocks_nest_and_skip() -> None:
    text = (
        "if !1.2.3.0/24\n0.0.0.0/0 out\nendif\n"
        "if 1.2.3.0/24\nif 1.2.3.4\n0.0.0.0/0 in\nendif\nendif\n"
    )
    table = parse_cidr_text(text, "/t")
    assert [table.lookup(k) for k in ("1.2.3.4", "1.2.3.5", "9.9.9.9")] == ["in", None, "out"]


def test_if_without_endif_is_a_warning() -> None:
    table = parse_cidr_text("0.0.0.0/0 a\nif 1.2.3.0/24\n0.0.0.0/0 b\n", "/t")
    assert table.warnings == ("/t, line 2: IF has no matching ENDIF",)
    assert table.lookup("1.2.3.4") == "a"


BAD_RULES = [
    ("1.2.3.4/33 x", 'bad mask length in "1.2.3.4/33"'),
    (
        "1.2.3.4/24 x",
        'non-null host address bits in "1.2.3.4/24", perhaps you should use "1.2.3.0/24" instead',
    ),
    (
        "1.2.3.4/0 x",
        'non-null host address bits in "1.2.3.4/0", perhaps you should use "0.0.0.0/0" instead',
    ),
    (
        "2001:db8::1/64 x",
        'non-null host address bits in "2001:db8::1/64", '
        'perhaps you should use "2001:db8::/64" instead',
    ),
    ("[2001:db8::]/129 x", 'bad mask length in "2001:db8::/129"'),
    ("1.2.3.0/24", "no lookup result"),
    ("foo x", 'bad address pattern: "foo"'),
    ("foo/24 x", 'bad network value in "foo/24"'),
    ("foo/33 x", 'bad mask length in "foo/33"'),
    ("1.2.3.0/ x", 'bad mask value in "1.2.3.0/"'),
    ("1.2.3.0/+24 x", 'bad mask value in "1.2.3.0/+24"'),
    ("1.2.3.4/32x x", 'bad mask value in "1.2.3.4/32x"'),
    ("1.2.3.0/24/1 x", 'bad mask value in "1.2.3.0/24/1"'),
    ("1.2.3.4/99999999999 x", 'bad mask length in "1.2.3.4/99999999999"'),
    ("1.2.3.4:5 x", 'bad address pattern: "1.2.3.4:5"'),
    ("[1.2.3.4 x", "missing ']' character after \"[1.2.3.4\""),
    ("[1.2.3.4]x x", 'garbage after "[1.2.3.4]"'),
    ("[] x", 'bad address pattern: ""'),
    ("! ", "no address pattern"),
    ("if", "no address pattern"),
    ("if 1.2.3.4 x", 'bad address pattern: "1.2.3.4 x"'),
    ("if 1.2.3.0/24 x", 'bad mask value in "1.2.3.0/24 x"'),
    ("ifx", 'bad address pattern: "ifx"'),
    ("endif", "ENDIF without IF"),
    ("ENDIF   ", "ENDIF without IF"),
    ("foo", 'bad address pattern: "foo"'),
]


@pytest.mark.parametrize(("rule", "reason"), BAD_RULES)
def test_bad_rule_names_file_and_line(rule: str, reason: str) -> None:
    with pytest.raises(TableOpenError) as info:
        parse_cidr_text(f"0.0.0.0/0 ok\n{rule}\n", "/etc/x/cidr_table")
    assert str(info.value) == f"/etc/x/cidr_table, line 2: {reason}"


@requires_postmap
@pytest.mark.parametrize(("rule", "reason"), BAD_RULES)
def test_bad_rule_reason_agrees_with_postmap(tmp_path: Path, rule: str, reason: str) -> None:
    path = tmp_path / "t"
    write_table(path, rule + "\n")
    _, stderr = postmap_query(f"cidr:{path}", "1.2.3.4")
    assert postmap_skip_reason(stderr, "cidr") == reason


def test_garbage_after_endif() -> None:
    with pytest.raises(TableOpenError, match=r"line 3: garbage after ENDIF$"):
        parse_cidr_text("if 1.2.3.0/24\n1.2.3.4 x\nendif x\n", "/t")


@pytest.mark.parametrize(
    ("rule", "key", "expected"),
    [
        ("1.2.3.0/024 x", "1.2.3.4", "x"),  # atoi() accepts leading zeros in the length
        ("[1.2.3.4] x", "1.2.3.4", "x"),
        ("[1.2.3.4/32] x", "1.2.3.4", "x"),
        ("[::1/128] x", "::1", "x"),
        ("!!1.2.3.4 x", "1.2.3.4", "x"),
        ("! ! 1.2.3.4 x", "1.2.3.4", "x"),
        ("! 1.2.3.4 x", "1.2.3.5", "x"),
        ("1.2.3.0/24\ttab  value  ", "1.2.3.4", "tab  value"),
        ("1.2.3.0/24\t  # not a comment", "1.2.3.4", "# not a comment"),
        ("0.0.0.0/0 x", "::1", None),
        ("::/0 x", "::1", "x"),
    ],
)
def test_rule_forms(tmp_path: Path, rule: str, key: str, expected: str | None) -> None:
    assert parse_cidr_text(rule + "\n", "/t").lookup(key) == expected


@requires_postmap
def test_inline_rules_agree_with_postmap() -> None:
    spec = "cidr:{{1.2.3.0/24 OK x}, {0.0.0.0/0 no}}"
    table = open_table(spec)
    for key in ("1.2.3.4", "9.2.3.4", "::1"):
        assert table.lookup(key) == postmap_query(spec, key)[0]


def test_inline_rule_errors_point_at_the_config() -> None:
    with pytest.raises(TableOpenError) as info:
        open_table("cidr:{{1.2.3.4 OK}, {foo x}}", location=("/etc/smtpgate/main.cf", 7))
    assert str(info.value) == (
        "/etc/smtpgate/main.cf, line 7: "
        'cidr:{{1.2.3.4 OK}, {foo x}}, rule 2: bad address pattern: "foo"'
    )
    with pytest.raises(TableOpenError) as info:
        open_table("cidr:{1.2.3.4 OK}")
    assert str(info.value) == "cidr map: no '{' at start of text in \"1.2.3.4\""


octet = st.integers(0, 255)
ipv4 = st.tuples(octet, octet, octet, octet).map(lambda t: ".".join(map(str, t)))


@given(st.text(alphabet=st.sampled_from(list("0123456789./:[]!abcdefif x\n#")), max_size=200))
def test_any_text_parses_or_raises_table_open_error(text: str) -> None:
    try:
        table = parse_cidr_text(text, "/t")
    except TableOpenError as exc:
        assert str(exc).startswith("/t, line ")
    else:
        table.lookup("1.2.3.4")
        table.lookup("::1")


@given(st.text(max_size=60))
def test_any_key_is_found_or_not(key: str) -> None:
    assert parse_cidr_text(TABLE, "/t").lookup(key) in {v for _, v in LOOKUPS} | {"default"}


@given(ipv4, st.integers(0, 32))
def test_a_network_contains_its_own_addresses(address: str, length: int) -> None:
    import ipaddress

    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    table = parse_cidr_text(f"{network} in\n", "/t")
    assert table.lookup(address) == "in"
    assert table.lookup(str(network.broadcast_address)) == "in"
