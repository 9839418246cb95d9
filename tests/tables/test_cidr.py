"""cidr: tables, checked against cidr_table(5) and postmap -q."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.errors import TableLookupError, TableOpenError
from smtpgate.tables import open_table, table_warnings
from smtpgate.tables.cidr import CidrTable, parse_cidr_text

from ._postmap import postmap_query, postmap_warnings, requires_postmap, write_table

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
def test_a_bad_rule_is_skipped_with_postfix_warning(rule: str, reason: str) -> None:
    table = parse_cidr_text(f"{rule}\n0.0.0.0/0 fallback\n", "/etc/x/cidr_table")
    assert table.warnings == (f"/etc/x/cidr_table, line 1: {reason}: skipping this rule",)
    assert table.lookup("1.2.3.4") == "fallback"
    assert [line for _, _, line in table.items()] == [2]


@requires_postmap
@pytest.mark.parametrize(("rule", "reason"), BAD_RULES)
def test_skipped_rules_agree_with_postmap(tmp_path: Path, rule: str, reason: str) -> None:
    path = tmp_path / "t"
    write_table(path, f"{rule}\n0.0.0.0/0 fallback\n")
    value, stderr = postmap_query(f"cidr:{path}", "1.2.3.4")
    table = open_table(f"cidr:{path}")
    assert list(table.warnings) == postmap_warnings(stderr)
    assert table.lookup("1.2.3.4") == value == "fallback"


# Tables whose skipped IF/ENDIF rules change what the rest means: (text, key, expected).
SKIPPED_BLOCKS = [
    ("if 1.2.3.0/24\n1.2.3.4 x\nendif x\n0.0.0.0/0 after\n", "1.2.3.5", "after"),
    ("if 1.2.3.0/33\n1.2.3.4 x\nendif\n0.0.0.0/0 after\n", "1.2.3.4", "x"),  # a skipped IF
    ("if 9.0.0.0/8\nif 1.2.3.0/33\n0.0.0.0/0 in\nendif\nendif\n0.0.0.0/0 out\n", "1.2.3.4", "out"),
    ("0.0.0.0/0 a\nif 1.2.3.0/24\n0.0.0.0/0 b\n", "1.2.3.4", "a"),
]


@pytest.mark.parametrize(("text", "key", "expected"), SKIPPED_BLOCKS)
def test_skipped_if_and_endif(text: str, key: str, expected: str) -> None:
    assert parse_cidr_text(text, "/t").lookup(key) == expected


@requires_postmap
@pytest.mark.parametrize(("text", "key", "expected"), SKIPPED_BLOCKS)
def test_skipped_if_and_endif_agree_with_postmap(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    path = tmp_path / "t"
    write_table(path, text)
    value, stderr = postmap_query(f"cidr:{path}", key)
    table = open_table(f"cidr:{path}")
    assert list(table.warnings) == postmap_warnings(stderr)
    assert table.lookup(key) == value == expected


def test_garbage_after_endif() -> None:
    table = parse_cidr_text("if 1.2.3.0/24\n1.2.3.4 x\nendif x\n", "/t")
    assert table.warnings == (
        "/t, line 3: garbage after ENDIF: skipping this rule",
        "/t, line 1: IF has no matching ENDIF",
    )


def test_a_non_utf8_result_fails_the_lookup(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_table(path, b"1.2.3.4 \xff\n0.0.0.0/0 ok\n")
    table = open_table(f"cidr:{path}")
    assert table.lookup("1.2.3.5") == "ok"
    with pytest.raises(TableLookupError) as info:
        table.lookup("1.2.3.4")
    assert str(info.value) == (
        f'cidr:{path}: key "1.2.3.4": non-UTF-8 value "?": malformed UTF-8 or invalid codepoint'
    )


def test_items_list_match_rules() -> None:
    text = "1.2.3.0/24  OK one\nif 10.0.0.0/8\n! [::1]  two  \nendif\nbad x\n"
    table = parse_cidr_text(text, "/t")
    assert table.items() == [("1.2.3.0/24", "OK one", 1), ("! [::1]", "two", 3)]
    assert table.path == "/t"
    assert open_table("cidr:{{1.2.3.4 x}}").items() == [("1.2.3.4", "x", 1)]


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


def test_inline_rule_warnings_point_at_the_config() -> None:
    table = open_table("cidr:{{1.2.3.4 OK}, {foo x}}", location=("/etc/smtpgate/main.cf", 7))
    assert table_warnings(table) == (
        "/etc/smtpgate/main.cf, line 7: "
        'cidr:{{1.2.3.4 OK}, {foo x}}, rule 2: bad address pattern: "foo": skipping this rule',
    )
    assert table.lookup("1.2.3.4") == "OK"
    assert isinstance(table, CidrTable) and table.path is None


# A malformed in-line list is fatal in Postfix ("postmap: fatal: ..."), so an error here.
INLINE_FATAL = [
    ("cidr:{1.2.3.4 OK}", "cidr map: no '{' at start of text in \"1.2.3.4\""),
    ("cidr:{{1.2.3.4 OK}", "cidr map: missing '}' in \"{{1.2.3.4 OK}\""),
    ("cidr:{{1.2.3.4 OK}x}", "cidr map: syntax error after '}' in \"{1.2.3.4 OK}x\""),
    ("cidr:{{1.2.3.4 OK} x}", "cidr map: no '{' at start of text in \"x\""),
]


@pytest.mark.parametrize(("spec", "message"), INLINE_FATAL)
def test_malformed_inline_list_is_an_error(spec: str, message: str) -> None:
    with pytest.raises(TableOpenError) as info:
        open_table(spec)
    assert str(info.value) == message


@requires_postmap
@pytest.mark.parametrize(("spec", "message"), INLINE_FATAL)
def test_postmap_refuses_the_same_inline_lists(spec: str, message: str) -> None:
    assert f"postmap: fatal: {message}" in postmap_query(spec, "1.2.3.4")[1]


octet = st.integers(0, 255)
ipv4 = st.tuples(octet, octet, octet, octet).map(lambda t: ".".join(map(str, t)))


@given(st.text(alphabet=st.sampled_from(list("0123456789./:[]!abcdefif x\n#")), max_size=200))
def test_any_text_parses(text: str) -> None:
    table = parse_cidr_text(text, "/t")
    assert all(w.startswith("/t") for w in table.warnings)
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
