"""regexp: and pcre: tables, checked against regexp_table(5), pcre_table(5) and postmap -q."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.errors import TableLookupError, TableOpenError
from smtpgate.tables import open_table, table_warnings
from smtpgate.tables.regexp import RegexpTable, parse_regexp_text, parse_replacement

from ._postmap import postmap_query, postmap_warnings, requires_postmap, write_table

# (type, rule, key, expected): one-rule tables; every case is also asked of postmap.
LOOKUPS = [
    ("regexp", "/^(a)(b)?/ x$1-$2-${1}-$$-$(1)", "aC", "xa--a-$-a"),
    ("regexp", "/^a/i x", "Ab", None),  # "i" toggles the default case-insensitivity
    ("regexp", "/^a/ x", "Ab", "x"),
    ("regexp", "!/^a/ x", "bb", "x"),
    ("regexp", "!!/^a/ x", "ab", "x"),
    ("regexp", "/^[[:upper:]]b/ x", "Ab", "x"),
    ("regexp", "/^[[:upper:]]b/i x", "ab", None),
    ("regexp", "/^[[:digit:][:space:]]+$/ x", "1 2", "x"),
    ("regexp", "/a/!/b/ x", "ac", "x"),
    ("regexp", "/a/!/b/ x", "ab", None),
    ("regexp", "/a/ !/b/ x", "ac", "!/b/ x"),
    ("regexp", r"/^a\.b$/ x", "a.b", "x"),
    ("regexp", r"/^a\.b$/ x", "axb", None),
    ("regexp", r"/^a[\.]b$/ x", "a\\b", "x"),  # a POSIX backslash in brackets is literal
    ("regexp", r"/^a\wb$/ x", "a_b", "x"),
    ("regexp", r"/\<ab/ x", "x ab", "x"),
    ("regexp", r"/\<ab/ x", "xab", None),
    ("regexp", "/^a+$/x x", "a+", "x"),  # "x": POSIX basic syntax
    ("regexp", r"/^\(a\)b$/x <$1>", "ab", "<a>"),
    ("regexp", "/^ab{2}$/ x", "abb", "x"),
    ("regexp", "/(a|ab)(c|bcd)(d*)/ [$1|$2|$3]", "abcd", "[a|bcd|]"),
    ("regexp", "|^a/b$| slash", "a/b", "slash"),  # any non-alphanumeric delimiter
    ("regexp", r"/^a\/b$/ esc", "a/b", "esc"),
    ("regexp", "/^(.+)@example\\.com$/ user $1", "Joe@EXAMPLE.com", "user Joe"),
    ("regexp", "/^(.*)$/ <$1>", "", "<>"),
    ("pcre", "/^(a)(b)?/ x$1-$2-${1}-$$", "aC", "xa--a-$"),
    ("pcre", r"/^a\d$/ x", "a1", "x"),
    ("pcre", "/b/A x", "ab", None),
    ("pcre", "/^a/A x", "ab", "x"),
    ("pcre", "/(a.*)/U [$1]", "aaa", "[a]"),
    ("pcre", "/(a.*?)/U [$1]", "aaa", "[aaa]"),
    ("pcre", r"/(?<n>a)\k<n>/ x", "aa", "x"),
    ("pcre", r"/a\z/ x", "a", "x"),
    ("pcre", "/a/X x", "a", "x"),
    ("pcre", "/(?i)A/i x", "a", "x"),
    ("pcre", "/[[:alpha:]]/ x", "1a", "x"),
    ("pcre", "/(?:a)(b)?(c)/ [$1][$2]", "ac", "[][c]"),
    ("pcre", "/a b/x x", "ab", "x"),
    ("pcre", "!/a/ x", "b", "x"),
    ("pcre", r"/^\Qa.b\E$/ x", "a.b", "x"),
    ("pcre", r"/^\Qa.b\E$/ x", "axb", None),
]


def _table(kind: str, rule: str) -> object:
    return parse_regexp_text(rule + "\n", "/t", pcre=kind == "pcre")


@pytest.mark.parametrize(("kind", "rule", "key", "expected"), LOOKUPS)
def test_lookup(kind: str, rule: str, key: str, expected: str | None) -> None:
    table = parse_regexp_text(rule + "\n", "/t", pcre=kind == "pcre")
    assert table.lookup(key) == expected


@requires_postmap
@pytest.mark.parametrize(("kind", "rule", "key", "expected"), [c for c in LOOKUPS if c[2]])
def test_lookup_agrees_with_postmap(
    tmp_path: Path, kind: str, rule: str, key: str, expected: str | None
) -> None:
    path = tmp_path / "t"
    write_table(path, rule + "\n")
    assert postmap_query(f"{kind}:{path}", key)[0] == expected


MULTI = """\
# regexp table with if/endif and continuation lines
/^postmaster@/     OK
if /@example\\.com$/
/^(sales|info)@/   REJECT no $1
/^bad/             REJECT bad
  user
endif
IF !/@/
/./                REJECT no domain
ENDIF
/(.)/              DUNNO $1
"""


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("postmaster@x.org", "OK"),
        ("Sales@Example.com", "REJECT no Sales"),
        ("bad@example.com", "REJECT bad  user"),
        ("bad@example.org", "DUNNO b"),
        ("local", "REJECT no domain"),
        ("", None),
    ],
)
def test_if_endif_and_continuations(key: str, expected: str | None) -> None:
    assert parse_regexp_text(MULTI, "/t").lookup(key) == expected
    assert parse_regexp_text(MULTI, "/t", pcre=True).lookup(key) == expected


@requires_postmap
@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_if_endif_agrees_with_postmap(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "t"
    write_table(path, MULTI)
    table = open_table(f"{kind}:{path}")
    for key in ("postmaster@x.org", "Sales@Example.com", "bad@example.com", "bad@x", "local"):
        assert table.lookup(key) == postmap_query(f"{kind}:{path}", key)[0], key


SKIP = ": skipping this rule"
BAD = "/t, line 1: bad replacement syntax" + SKIP

# (type, rule, warnings): Postfix 3.7 skips the rule with these warnings (table file "/t").
BAD_RULES = [
    ("regexp", "/^a/ $x", ('/t, line 1: non-numeric replacement index "x"', BAD)),
    ("regexp", "/^a/ $1", ('/t, line 1: out of range replacement index "1"' + SKIP,)),
    ("regexp", "/^(a)/ $1a", ('/t, line 1: non-numeric replacement index "1a"', BAD)),
    ("regexp", "/^(a)/ $1_", ('/t, line 1: non-numeric replacement index "1_"', BAD)),
    ("regexp", "/a/ ${x}", ('/t, line 1: non-numeric replacement index "x"', BAD)),
    ("regexp", "/a/ $((1))", ('/t, line 1: non-numeric replacement index "(1)"', BAD)),
    ("regexp", "/^(a)/ $ b", ('empty macro name: "$ b"', BAD)),  # mac_parse names no line
    ("regexp", "/^(a)/ ${1", ('truncated macro reference: "${1"', BAD)),
    ("regexp", "/^(a)/ $1$", ('empty macro name: "$1$"', BAD)),
    ("regexp", "/^a/z x", ('/t, line 1: unknown regexp option "z"' + SKIP,)),
    ("regexp", "/^a/X x", ('/t, line 1: unknown regexp option "X"' + SKIP,)),
    ("regexp", "/^a x", ('/t, line 1: no closing regexp delimiter "/"' + SKIP,)),
    (
        "regexp",
        "!/^(a)/ $1",
        ("/t, line 1: $number found in negative match replacement text" + SKIP,),
    ),
    ("regexp", "endif", ("/t, line 1: ignoring ENDIF without matching IF",)),
    ("regexp", "foo", ("/t, line 1: ignoring unrecognized request",)),
    ("regexp", "if", ("/t, line 1: no regexp" + SKIP,)),
    ("regexp", "if foo", ('/t, line 1: no closing regexp delimiter "f"' + SKIP,)),
    ("regexp", "/^(a)/ $0", ('/t, line 1: out-of-range replacement index "0"', BAD)),
    # regexp compile errors: glibc's regerror() text, and no "skipping this rule"
    ("regexp", "/a(/ x", ("/t, line 1: Unmatched ( or \\(",)),
    ("regexp", "if /a(/", ("/t, line 1: Unmatched ( or \\(",)),
    ("regexp", "/^\\(a/x x", ("/t, line 1: Unmatched ( or \\(",)),
    ("regexp", "/^a\\)/x x", ("/t, line 1: Unmatched ( or \\(",)),
    ("regexp", "/[a/ x", ("/t, line 1: Unmatched [, [^, [:, [., or [=",)),
    ("regexp", "/a{2,1}/ x", ("/t, line 1: Invalid content of \\{\\}",)),
    ("regexp", "/[b-a]/ x", ("/t, line 1: Invalid range end",)),
    ("regexp", "/(a)\\2/ x", ("/t, line 1: Invalid back reference",)),
    ("regexp", "/*a/ x", ("/t, line 1: Invalid preceding regular expression",)),
    ("regexp", "/(?i)a/ x", ("/t, line 1: Invalid preceding regular expression",)),
    ("regexp", "/[[:nope:]]/ x", ("/t, line 1: Invalid character class name",)),
    ("regexp", "/[[.ab.]]/ x", ("/t, line 1: Invalid collation character",)),
    ("pcre", "/^a/z x", ('/t, line 1: unknown regexp option "z"' + SKIP,)),
    ("pcre", "/a/!/b/ x", ('/t, line 1: unknown regexp option "!"' + SKIP,)),
    ("pcre", "/^a x", ('/t, line 1: no closing regexp delimiter "/": ignoring this rule',)),
    ("pcre", "/^(a)/ $2", ('/t, line 1: out of range replacement index "2"' + SKIP,)),
    (
        "pcre",
        "!/^(a)/ $1",
        ("/t, line 1: $number found in negative match replacement text" + SKIP,),
    ),
    ("pcre", "/^(a)/ $0", ('/t, line 1: out of range replacement index "0"', BAD)),
    ("pcre", "/^(a)/ ${0}", ('/t, line 1: out of range replacement index "0"', BAD)),
    ("pcre", "/^a/ $x", ('/t, line 1: non-numeric replacement index "x"', BAD)),
    ("pcre", "/^(a)/ ${1", ('truncated macro reference: "${1"', BAD)),
    ("pcre", "endif", ("/t, line 1: ignoring ENDIF without matching IF",)),
    ("pcre", "foo", ("/t, line 1: ignoring unrecognized request",)),
]


@pytest.mark.parametrize(("kind", "rule", "warnings"), BAD_RULES)
def test_a_bad_rule_is_skipped_with_postfix_warnings(
    kind: str, rule: str, warnings: tuple[str, ...]
) -> None:
    table = parse_regexp_text(f"{rule}\n/./ fallback\n", "/t", pcre=kind == "pcre")
    assert table.warnings == warnings
    assert table.lookup("a") == "fallback"
    assert [line for _, _, line in table.items()] == [2]


@requires_postmap
@pytest.mark.parametrize(("kind", "rule", "warnings"), BAD_RULES)
def test_skipped_rules_agree_with_postmap(
    tmp_path: Path, kind: str, rule: str, warnings: tuple[str, ...]
) -> None:
    path = tmp_path / "t"
    write_table(path, f"{rule}\n/./ fallback\n")
    value, stderr = postmap_query(f"{kind}:{path}", "a")
    table = open_table(f"{kind}:{path}")
    assert list(table_warnings(table)) == postmap_warnings(stderr)
    assert table.lookup("a") == value == "fallback"


# pcre compile errors: skipped as in Postfix, but worded by Python's re, not by PCRE2.
PCRE_COMPILE_ERRORS = [
    ("/a(/ x", "error in regex at offset 1: missing ), unterminated subpattern"),
    (r"/a\q/ x", r"error in regex at offset 1: bad escape \q"),
    ("/[[:nope:]]/ x", "error in regex: invalid character class name: [:nope:]"),
    ("/*a/ x", "error in regex at offset 0: nothing to repeat"),
]


@pytest.mark.parametrize(("rule", "message"), PCRE_COMPILE_ERRORS)
def test_pcre_compile_errors_skip_the_rule(rule: str, message: str) -> None:
    table = parse_regexp_text(f"{rule}\n/./ fallback\n", "/t", pcre=True)
    assert table.warnings == (f"/t, line 1: {message}",)
    assert table.lookup("a") == "fallback"


@requires_postmap
@pytest.mark.parametrize(("rule", "message"), PCRE_COMPILE_ERRORS)
def test_postmap_also_skips_the_pcre_rule(tmp_path: Path, rule: str, message: str) -> None:
    path = tmp_path / "t"
    write_table(path, f"{rule}\n/./ fallback\n")
    value, stderr = postmap_query(f"pcre:{path}", "a")
    assert value == "fallback"
    assert [w.split(": error in regex")[0] for w in postmap_warnings(stderr)] == [f"{path}, line 1"]


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_no_replacement_text_is_an_empty_result(kind: str) -> None:
    table = parse_regexp_text("/^a/\n/./ fallback\n", "/t", pcre=kind == "pcre")
    assert table.warnings == ("/t, line 1: no replacement text: using empty string",)
    assert table.lookup("ab") == ""
    assert table.lookup("b") == "fallback"
    assert table.items() == [("/^a/", "", 1), ("/./", "fallback", 2)]


@requires_postmap
@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_no_replacement_text_agrees_with_postmap(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "t"
    write_table(path, "/^a/\n/./ fallback\n")
    table = open_table(f"{kind}:{path}")
    for key in ("ab", "b"):
        value, stderr = postmap_query(f"{kind}:{path}", key)
        assert table.lookup(key) == value
        assert list(table_warnings(table)) == postmap_warnings(stderr)


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_a_non_utf8_result_fails_the_lookup(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "t"
    write_table(path, b"/a/ 1\n/\xff/ x\n/b/ \xff\n")
    table = open_table(f"{kind}:{path}")
    assert table.warnings == ()
    assert table.lookup("a") == "1"
    with pytest.raises(TableLookupError) as info:
        table.lookup("b")
    assert str(info.value) == (
        f'{kind}:{path}: key "b": non-UTF-8 value "?": malformed UTF-8 or invalid codepoint'
    )


def test_warnings_for_rules_postfix_keeps() -> None:
    text = "if /a/ extra\n/b/ x\nendif junk\nif /c/\n/d/X y\n"
    table = parse_regexp_text(text, "/t", pcre=True)
    assert table.warnings == (
        '/t, line 1: ignoring extra text after IF statement: "extra"',
        "/t, line 1: do not prepend whitespace to statements between IF and ENDIF",
        "/t, line 3: ignoring extra text after ENDIF",
        '/t, line 5: ignoring obsolete regexp option "X"',
        "/t, line 4: IF has no matching ENDIF",
    )
    assert table.lookup("ab") == "x"
    assert table.lookup("cd") == "y"
    assert table.lookup("d") is None


@requires_postmap
@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_warnings_for_rules_postfix_keeps_agree_with_postmap(tmp_path: Path, kind: str) -> None:
    text = "if /a/ extra\n/b/ x\nendif junk\nif /c/\n/d/ y\nif /a/\n  /b/ z\nendif\n"
    path = tmp_path / "t"
    write_table(path, text)
    table = open_table(f"{kind}:{path}")
    for key in ("ab", "cd", "d"):
        value, stderr = postmap_query(f"{kind}:{path}", key)
        assert table.lookup(key) == value, key
        assert list(table_warnings(table)) == postmap_warnings(stderr)


def test_items_list_match_rules() -> None:
    text = "/^a/i  OK  \nif /b/\n!/c/ R $$1\nendif\n/x/!/y/ two\n/bad/z x\n"
    table = parse_regexp_text(text, "/t")
    assert table.items() == [("/^a/i", "OK", 1), ("!/c/", "R $$1", 3), ("/x/!/y/", "two", 5)]
    assert table.path == "/t"
    inline = open_table("pcre:{{/a/ x}}")
    assert isinstance(inline, RegexpTable)
    assert inline.items() == [("/a/", "x", 1)]
    assert inline.path is None


def test_inline_rule_warnings_point_at_the_config() -> None:
    table = open_table("regexp:{{/^a/ $1}, {/./ ok}}", location=("main.cf", 4))
    assert table_warnings(table) == (
        'main.cf, line 4: regexp:{{/^a/ $1}, {/./ ok}}, rule 1: out of range replacement index "1"'
        ": skipping this rule",
    )
    assert table.lookup("a") == "ok"
    with pytest.raises(TableOpenError, match="regexp map: no '{' at start of text"):
        open_table("regexp:{/a/ b}")


@requires_postmap
def test_inline_rule_lists_agree_with_postmap() -> None:
    for spec, key in [
        ("regexp:{{/a/ x}, {/b/ y}}", "b"),
        ("regexp:{{/a/ x}, {if /b/}, {/c/ y}, {endif}}", "bc"),
        ("pcre:{{/^(a)/ yes $1}}", "Ab"),
        ("regexp:{{/^a/ $1}, {/./ ok}}", "a"),  # a skipped in-line rule
        ("pcre:{{/^a/ $x}, {/./ ok}}", "a"),
    ]:
        assert open_table(spec).lookup(key) == postmap_query(spec, key)[0], spec


def test_is_pattern_and_names() -> None:
    table = open_table("pcre:{{/a/ x}}")
    assert (table.type, table.name, table.is_pattern) == ("pcre", "{{/a/ x}}", True)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("plain", ("plain",)),
        ("a$$b", ("a$b",)),
        ("$1", (1,)),
        ("x${12}y$(3)", ("x", 12, "y", 3)),
        ("$$1", ("$1",)),
    ],
)
def test_parse_replacement(text: str, parts: tuple[str | int, ...]) -> None:
    assert parse_replacement(text) == parts


rule_chars = st.sampled_from(list("/!|^$()[]{}*+?.\\:ab1 $ifendIFx\n#-=<>"))


@given(st.text(rule_chars, max_size=80), st.booleans())
def test_any_text_parses(text: str, pcre: bool) -> None:
    table = parse_regexp_text(text, "/t", pcre=pcre)
    for warning in table.warnings:
        assert warning.startswith(("/t", "empty macro name", "truncated macro reference"))
    table.lookup("ab")
    table.lookup("")


@given(st.text(max_size=40))
def test_literal_patterns_match_themselves(literal: str) -> None:
    escaped = "".join("\\" + c if c in "\\/^$.[]()*+?{}|" else c for c in literal)
    if any(c in literal for c in "\n\0") or literal.strip() != literal:
        return
    table = parse_regexp_text(f"/^{escaped}$/ hit\n", "/t", pcre=True)
    assert table.lookup(literal) == "hit"
