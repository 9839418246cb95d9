"""regexp: and pcre: tables, checked against regexp_table(5), pcre_table(5) and postmap -q."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.errors import TableOpenError
from smtpgate.tables import open_table
from smtpgate.tables.regexp import parse_regexp_text, parse_replacement

from ._postmap import postmap_query, postmap_skip_reason, requires_postmap, write_table

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


# (type, rule, reason): Postfix's reason for skipping; smtpgate refuses to load.
BAD_RULES = [
    ("regexp", "/^a/ $x", 'non-numeric replacement index "x"'),
    ("regexp", "/^a/ $1", 'out of range replacement index "1"'),
    ("regexp", "/^(a)/ $1a", 'non-numeric replacement index "1a"'),
    ("regexp", "/^(a)/ $1_", 'non-numeric replacement index "1_"'),
    ("regexp", "/a/ ${x}", 'non-numeric replacement index "x"'),
    ("regexp", "/^a/z x", 'unknown regexp option "z"'),
    ("regexp", "/^a x", 'no closing regexp delimiter "/"'),
    ("regexp", "!/^(a)/ $1", "$number found in negative match replacement text"),
    ("regexp", "endif", "ignoring ENDIF without matching IF"),
    ("regexp", "foo", "ignoring unrecognized request"),
    ("pcre", "/^a/z x", 'unknown regexp option "z"'),
    ("pcre", "/a/!/b/ x", 'unknown regexp option "!"'),
    ("pcre", "/^(a)/ $2", 'out of range replacement index "2"'),
    ("pcre", "!/^(a)/ $1", "$number found in negative match replacement text"),
    ("pcre", "/^(a)/ $0", 'out of range replacement index "0"'),
    ("pcre", "/^(a)/ ${0}", 'out of range replacement index "0"'),
    ("regexp", "/^(a)/ $0", 'out-of-range replacement index "0"'),
]


@pytest.mark.parametrize(("kind", "rule", "reason"), BAD_RULES)
def test_bad_rule_names_file_and_line(kind: str, rule: str, reason: str) -> None:
    with pytest.raises(TableOpenError) as info:
        parse_regexp_text(f"/ok/ ok\n{rule}\n", "/etc/x/t", pcre=kind == "pcre")
    assert str(info.value) == f"/etc/x/t, line 2: {reason.removeprefix('ignoring ')}"


@requires_postmap
@pytest.mark.parametrize(("kind", "rule", "reason"), BAD_RULES)
def test_bad_rule_reason_agrees_with_postmap(
    tmp_path: Path, kind: str, rule: str, reason: str
) -> None:
    path = tmp_path / "t"
    write_table(path, rule + "\n")
    _, stderr = postmap_query(f"{kind}:{path}", "a")
    assert postmap_skip_reason(stderr, kind) == reason


@pytest.mark.parametrize(
    ("kind", "rule", "message"),
    [
        ("regexp", "/a(/ x", "error in regex at offset 1: missing ), unterminated subpattern"),
        ("regexp", "/^a/", "no replacement text"),
        ("regexp", "/(?i)a/ x", "error in regex: invalid preceding regular expression"),
        ("regexp", "/[[:nope:]]/ x", "error in regex: invalid character class name: [:nope:]"),
        ("pcre", r"/a\q/ x", r"error in regex at offset 1: bad escape \q"),
        ("pcre", "/(?R)/ x", "error in regex at offset 1: unknown extension ?R"),
        ("regexp", "/^(a)/ $ b", 'empty macro name: "$ b"'),
        ("regexp", "/^(a)/ ${1", 'truncated macro reference: "${1"'),
    ],
)
def test_compile_errors(kind: str, rule: str, message: str) -> None:
    with pytest.raises(TableOpenError) as info:
        parse_regexp_text(rule + "\n", "/t", pcre=kind == "pcre")
    assert str(info.value) == f"/t, line 1: {message}"


def test_warnings_for_rules_postfix_keeps() -> None:
    text = "if /a/ extra\n/b/ x\nendif junk\nif /c/\n/d/X y\n"
    table = parse_regexp_text(text, "/t", pcre=True)
    assert table.warnings == (
        '/t, line 1: ignoring extra text after IF statement: "extra"',
        "/t, line 3: ignoring extra text after ENDIF",
        '/t, line 5: ignoring obsolete regexp option "X"',
        "/t, line 4: IF has no matching ENDIF",
    )
    assert table.lookup("ab") == "x"
    assert table.lookup("cd") == "y"
    assert table.lookup("d") is None


@requires_postmap
def test_inline_rule_lists_agree_with_postmap() -> None:
    for spec, key in [
        ("regexp:{{/a/ x}, {/b/ y}}", "b"),
        ("regexp:{{/a/ x}, {if /b/}, {/c/ y}, {endif}}", "bc"),
        ("pcre:{{/^(a)/ yes $1}}", "Ab"),
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
def test_any_text_parses_or_raises_table_open_error(text: str, pcre: bool) -> None:
    try:
        table = parse_regexp_text(text, "/t", pcre=pcre)
    except TableOpenError as exc:
        assert str(exc).startswith("/t")
    else:
        table.lookup("ab")
        table.lookup("")


@given(st.text(max_size=40))
def test_literal_patterns_match_themselves(literal: str) -> None:
    escaped = "".join("\\" + c if c in "\\/^$.[]()*+?{}|" else c for c in literal)
    if any(c in literal for c in "\n\0") or literal.strip() != literal:
        return
    table = parse_regexp_text(f"/^{escaped}$/ hit\n", "/t", pcre=True)
    assert table.lookup(literal) == "hit"
