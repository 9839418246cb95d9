"""hash: and texthash: tables: postmap source format, folding, warnings and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.tables import open_table, table_warnings
from smtpgate.tables.text import parse_texthash

from ._postmap import (
    build_hash,
    postmap_build,
    postmap_query,
    postmap_warnings,
    requires_postmap,
    write_table,
)

SOURCE = (
    "Foo bar\n"
    "foo baz\n"
    "novalue\n"
    "  cont inued\n"
    "<> empty sender\n"
    "# comment\n"
    "\n"
    "  # indented comment\n"
    "key  value with  spaces  \n"
    "Key2\n"
    " continued value\n"
    "c 3\n"
    "   leading\n"
    "# a comment inside a logical line\n"
    "  more\n"
    "crlf value\r\n"
    "STRASSE upper\n"
    "user@Example.COM Mixed Case Value\n"
    "nul 1\0junk\n"
)

LOOKUPS = [
    ("foo", "bar"),  # a duplicate keeps the first value
    ("FOO", "bar"),  # keys are folded
    ("novalue", "cont inued"),  # a continuation line supplies the value
    ("<>", "empty sender"),
    ("key", "value with  spaces"),  # trailing blanks trimmed, inner kept
    ("key2", "continued value"),
    ("c", "3   leading  more"),  # comment lines do not end a logical line
    ("crlf", "value"),
    ("straße", "upper"),  # full Unicode case folding, as Postfix with SMTPUTF8
    ("USER@example.com", "Mixed Case Value"),  # values keep their case
    ("nul", "1"),  # text after NUL is invisible to Postfix
    ("leading", None),
    ("comment", None),
    ("missing", None),
    ("", None),
]


@pytest.fixture
def source_file(tmp_path: Path) -> Path:
    path = tmp_path / "access"
    write_table(path, SOURCE)
    return path


@pytest.mark.parametrize(("key", "expected"), LOOKUPS)
def test_lookup(key: str, expected: str | None) -> None:
    table = parse_texthash(SOURCE, "/etc/x/access")
    assert table.lookup(key) == expected


def test_warnings_are_worded_like_postmap() -> None:
    text = "  first\na 1\nb: 2\nA 3\n"
    table = parse_texthash(text, "/t")
    assert table.warnings == (
        '/t: logical line must not start with whitespace: "  first"',
        '/t, line 3: record is in "key: value" format; is this an alias file?',
        '/t, line 4: duplicate entry: "A"',
    )
    assert table.lookup("b:") == "2"
    assert table.lookup("a") == "1"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a 1\nlonely\nb 2\n", 2),
        ("a 1\n\n# c\nb\n", 4),
        ("a 1\nb   \t\n", 2),
    ],
)
def test_a_key_without_value_is_skipped_with_postfix_warning(text: str, line: int) -> None:
    texthash = parse_texthash(text, "/t")
    assert texthash.warnings == (
        f"/t, line {line}: expected format: key whitespace value -- ignoring this line",
    )
    assert texthash.lookup("a") == "1"
    assert texthash.lookup("b") == ("2" if "b 2" in text else None)
    # postmap words it without "-- ignoring this line" when it builds the .db
    hashed = parse_texthash(text, "/t", type="hash")
    assert hashed.warnings == (f"/t, line {line}: expected format: key whitespace value",)
    assert hashed.entries == texthash.entries


def test_a_non_utf8_line_is_skipped_with_postfix_warning(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_table(path, b"a 1\n\xff\xfe 1\nb \xff\n\xc3\xa9 x\n")
    table = open_table(f"texthash:{path}")
    assert table_warnings(table) == (
        f'{path}, line 2: non-UTF-8 input "?? 1" -- ignoring this line',
        f'{path}, line 3: non-UTF-8 input "b ?" -- ignoring this line',
    )
    assert [table.lookup(k) for k in ("a", "b", "\xe9")] == ["1", None, "x"]


BAD_SOURCE = b"a 1\nlonely\nb 2\nc   \t\nkey: v\n\xff\xfe 1\nb \xff\nA 3\nd\n  4\n"
BAD_KEYS = ["a", "b", "c", "lonely", "key:", "d"]


@requires_postmap
@pytest.mark.parametrize("type_", ["hash", "texthash"])
def test_skipped_lines_agree_with_postmap(tmp_path: Path, type_: str) -> None:
    path = tmp_path / "t"
    write_table(path, BAD_SOURCE)
    table = open_table(f"{type_}:{path}")
    if type_ == "hash":
        theirs = postmap_warnings(postmap_build(str(path)))
    else:
        theirs = postmap_warnings(postmap_query(f"texthash:{path}", "a")[1])
    assert list(table_warnings(table)) == theirs
    for key in BAD_KEYS:
        assert table.lookup(key) == postmap_query(f"{type_}:{path}", key)[0], key


@pytest.mark.parametrize("type_", ["hash", "texthash"])
def test_open_reads_the_source_file(type_: str, source_file: Path) -> None:
    table = open_table(f"{type_}:access", base_dir=source_file.parent)
    assert (table.type, table.name, table.is_pattern) == (type_, "access", False)
    assert table.lookup("foo") == "bar"
    duplicate = {
        "texthash": f'{source_file}, line 2: duplicate entry: "foo"',
        "hash": f'{source_file}.db: duplicate entry: "foo"',  # as postmap says when building
    }
    assert table_warnings(table) == (duplicate[type_],)


@requires_postmap
@pytest.mark.parametrize(("key", "_expected"), [c for c in LOOKUPS if c[0]])  # postmap needs a key
def test_texthash_agrees_with_postmap(source_file: Path, key: str, _expected: str | None) -> None:
    ours = open_table(f"texthash:{source_file}").lookup(key)
    theirs, _ = postmap_query(f"texthash:{source_file}", key)
    assert ours == theirs


@requires_postmap
def test_hash_agrees_with_postmap(source_file: Path) -> None:
    build_hash(str(source_file))
    table = open_table(f"hash:{source_file}")
    for key, _ in LOOKUPS:
        if key:
            assert table.lookup(key) == postmap_query(f"hash:{source_file}", key)[0], key


@requires_postmap
def test_postmap_also_warns_about_the_duplicate(source_file: Path) -> None:
    _, stderr = postmap_query(f"texthash:{source_file}", "foo")
    assert f'{source_file}, line 2: duplicate entry: "foo"' in stderr
    assert table_warnings(open_table(f"texthash:{source_file}"))[0] in stderr


# Keys: no blanks, not starting with "#", stable under case folding; values: trimmed, one line.
keys = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters="#"),
    min_size=1,
    max_size=20,
).filter(lambda k: k.casefold() == k and not any(c.isspace() for c in k))
values = (
    st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=30)
    .map(lambda v: v.strip(" \t\n\v\f\r"))
    .filter(lambda v: bool(v) and "\x85" not in v)
)


@given(st.dictionaries(keys, values, max_size=20))
def test_round_trip(entries: dict[str, str]) -> None:
    text = "".join(f"{k}\t{v}\n" for k, v in entries.items())
    table = parse_texthash(text, "/t")
    assert table.entries == entries
    for key, value in entries.items():
        assert table.lookup(key.upper()) == entries.get(key.upper().casefold())
        assert table.lookup(key) == value


@given(st.text(max_size=300))
def test_any_text_parses(text: str) -> None:
    table = parse_texthash(text, "/t")
    for key in table.entries:
        assert table.lookup(key)
    for warning in table.warnings:
        assert warning.startswith("/t")


def test_items_give_key_value_and_line() -> None:
    table = parse_texthash("a 1\nlonely\nB 2\n  more\n", "/t")
    assert table.items() == [("a", "1", 1), ("b", "2  more", 3)]
    assert table.path == "/t"
