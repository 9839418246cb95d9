"""The main.cf lexer and list splitting, table-driven (Postfix readlline.c / mystrtok.c)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.config import Location, split_list, strip_braces
from smtpgate.config.maincf import LIST_SEPARATORS, parse_maincf, split_nameval
from smtpgate.errors import ConfigError

LEXER_CASES = [
    # (text, [(name, value, line)])
    ("", []),
    ("\n\n   \n\t\n", []),
    ("a = b\n", [("a", "b", 1)]),
    ("a=b", [("a", "b", 1)]),
    ("a  =   b  c  \n", [("a", "b  c", 1)]),
    ("a =\n", [("a", "", 1)]),
    ("a = b # not a comment\n", [("a", "b # not a comment", 1)]),
    ("# comment\na = b\n  # indented comment\n", [("a", "b", 2)]),
    # continuation lines are appended as is, leading white space included
    ("a = b\n  c\n\td\n", [("a", "b  c\td", 1)]),
    # comments and blank lines inside a logical line do not end it
    ("a = b\n#x\n\n  c\n   # y\n d\ne = f\n", [("a", "b  c d", 1), ("e", "f", 7)]),
    ("a =\n  b\n", [("a", "b", 1)]),
    # CRLF files
    ("a = b\r\nc = d \r\n", [("a", "b", 1), ("c", "d", 2)]),
    ("a = b\r\n  c\r\n", [("a", "b  c", 1)]),
    # the name ends at white space or '='
    ("a=b=c\n", [("a", "b=c", 1)]),
    ("x.y-z = 1\n", [("x.y-z", "1", 1)]),
    # white space, even on the next line, may come before '='
    ("foo\n  = x\n", [("foo", "x", 1)]),
    # repeated names are all returned, in order
    ("a = 1\na = 2\n", [("a", "1", 1), ("a", "2", 2)]),
    # no trailing newline
    ("a = 1\n  2", [("a", "1  2", 1)]),
]


@pytest.mark.parametrize(("text", "expected"), LEXER_CASES)
def test_lexer(text: str, expected: list[tuple[str, str, int]]) -> None:
    entries, diagnostics = parse_maincf(text, "main.cf")
    assert [(e.name, e.value, e.location.line) for e in entries] == expected
    assert all(e.location.path == "main.cf" for e in entries)
    assert diagnostics == []


def test_leading_whitespace_is_dropped_with_a_warning() -> None:
    entries, diagnostics = parse_maincf("  lost = 1\n  more\nkept = 2\n", "/etc/main.cf")
    assert [(e.name, e.value) for e in entries] == [("kept", "2")]
    assert [str(d) for d in diagnostics] == [
        "/etc/main.cf, line 1: warning: logical line must not start with whitespace: "
        '"  lost = 1  more" (ignored)'
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo\n", "main.cf, line 1: missing '=' after attribute name: \"foo\""),
        ("a = 1\n\nfoo bar\n", "main.cf, line 3: missing '=' after attribute name: \"foo bar\""),
        ("my host = b\n", "main.cf, line 1: missing '=' after attribute name: \"my host = b\""),
        ("= b\n", 'main.cf, line 1: missing attribute name: "= b"'),
        ("a = 1\nfoo\n  bar\n", "main.cf, line 2: missing '=' after attribute name: \"foo  bar\""),
    ],
)
def test_syntax_errors_name_file_and_line(text: str, message: str) -> None:
    # Postfix: "postconf: fatal: /x/main.cf, line 1: missing '=' after attribute name: "foo""
    with pytest.raises(ConfigError) as info:
        parse_maincf(text, "main.cf")
    assert str(info.value) == message
    assert info.value.path == "main.cf"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=b", ("a", "b")),
        ("  a  =  b  ", ("a", "b")),
        ("a", "missing '=' after attribute name"),
        ("", "missing attribute name"),
        ("=x", "missing attribute name"),
    ],
)
def test_split_nameval(text: str, expected: object) -> None:
    assert split_nameval(text) == expected


def test_location_str() -> None:
    assert str(Location("main.cf", 3)) == "main.cf, line 3"
    assert str(Location("command line", 0)) == "command line"


SPLIT_CASES = [
    ("", []),
    (" ,, \t\n", []),
    ("a", ["a"]),
    ("a,b c\td\ne\rf", ["a", "b", "c", "d", "e", "f"]),
    (
        "permit_mynetworks,  reject_unauth_destination",
        ["permit_mynetworks", "reject_unauth_destination"],
    ),
    ("check_sender_access hash:/etc/x, reject", ["check_sender_access", "hash:/etc/x", "reject"]),
    # {} groups are never split and keep their braces (smtpd_check_parse)
    ("inline:{ a=b, {c = d e} } x", ["inline:{ a=b, {c = d e} }", "x"]),
    (
        "check_client_access inline:{1.2.3.4=REJECT, 5.6.7.8=OK}, permit",
        ["check_client_access", "inline:{1.2.3.4=REJECT, 5.6.7.8=OK}", "permit"],
    ),
    ("{ hash:/x, search = a }, b", ["{ hash:/x, search = a }", "b"]),
    ("a{b c}d e", ["a{b c}d", "e"]),
    # an unbalanced { swallows the rest; a stray } is ordinary text
    ("a {b c, d", ["a", "{b c, d"]),
    ("a} b", ["a}", "b"]),
]


@pytest.mark.parametrize(("value", "expected"), SPLIT_CASES)
def test_split_list(value: str, expected: list[str]) -> None:
    assert split_list(value) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [("plain", "plain"), ("{ a b }", "a b"), ("{{x}}", "{x}"), ("{}", "")],
)
def test_strip_braces(token: str, expected: str) -> None:
    assert strip_braces(token) == expected


@pytest.mark.parametrize(
    ("token", "message"),
    [("{a", "missing '}' in \"{a\""), ("{a}b", "syntax error after '}' in \"{a}b\"")],
)
def test_strip_braces_errors(token: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("{", r"\{").replace("}", r"\}")):
        strip_braces(token)


MAINCF_ALPHABET = st.sampled_from(list("ab_= \t\r\n#{}$():?,.<>!-1\\")) | st.characters()


@settings(max_examples=300, deadline=None)
@given(st.text(MAINCF_ALPHABET, max_size=200))
def test_lexer_raises_only_config_error(text: str) -> None:
    try:
        entries, _ = parse_maincf(text, "main.cf")
    except ConfigError as exc:
        assert exc.path == "main.cf" and exc.line is not None and exc.line >= 1
    else:
        for entry in entries:
            assert entry.name and "=" not in entry.name
            assert entry.location.line >= 1


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(list("ab{} ,\t\n\r:=")) | st.characters(), max_size=100))
def test_split_list_keeps_every_non_separator_character(value: str) -> None:
    tokens = split_list(value)
    assert all(tokens)

    def kept(text: str) -> list[str]:
        return [c for c in text if c not in LIST_SEPARATORS]

    assert kept("".join(tokens)) == kept(value)
    for token in tokens:
        assert token in value
