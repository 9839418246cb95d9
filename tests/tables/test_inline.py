"""inline: and static: tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.errors import TableOpenError
from smtpgate.tables import open_table, table_warnings
from smtpgate.tables.text import TextHashTable

from ._postmap import postmap_query, requires_postmap

LOOKUPS = [
    ("inline:{a=b, C=D}", "c", "D"),
    ("inline:{a=b, C=D}", "C", "D"),
    ("inline:{a=b, C=D}", "x", None),
    ("inline:{ { a = b c } }", "a", "b c"),
    ("inline:{ {a=b}, c=d }", "c", "d"),
    ("inline:{a=b=c}", "a", "b=c"),
    ("inline:{a=1,a=2}", "a", "2"),  # the last of repeated keys wins
    ("inline:{ {user@Example.com = REJECT go away} }", "USER@example.COM", "REJECT go away"),
    ("static:foo", "x", "foo"),
    ("static:{ foo bar }", "anything", "foo bar"),
    ("static:Foo", "y", "Foo"),
]


@pytest.mark.parametrize(("spec", "key", "expected"), LOOKUPS)
def test_lookup(spec: str, key: str, expected: str | None) -> None:
    assert open_table(spec).lookup(key) == expected


@requires_postmap
@pytest.mark.parametrize(("spec", "key", "expected"), LOOKUPS)
def test_lookup_agrees_with_postmap(spec: str, key: str, expected: str | None) -> None:
    assert postmap_query(spec, key)[0] == expected


NEED = 'need "inline:{name=value...}"'


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("inline:{ a = b }", f"missing '=' after attribute name: \"inline:{{ a = b }}\"; {NEED}"),
        ("inline:{a}", f"missing '=' after attribute name: \"inline:{{a}}\"; {NEED}"),
        ("inline:{}", f'bad syntax: "inline:{{}}"; {NEED}'),
        ("inline:{a=b", f'bad syntax: "inline:{{a=b"; {NEED}'),
        ("inline:a=b", f'bad syntax: "inline:a=b"; {NEED}'),
        ("inline:{a=b}x", f'bad syntax: "inline:{{a=b}}x"; {NEED}'),
        ("static:{foo", "bad static:name syntax: missing '}' in \"{foo\""),
    ],
)
def test_errors_point_at_the_config(spec: str, message: str) -> None:
    with pytest.raises(TableOpenError) as info:
        open_table(spec, location=("main.cf", 3))
    assert str(info.value) == f"main.cf, line 3: {message}"


@requires_postmap
@pytest.mark.parametrize(
    "spec", ["inline:{ a = b }", "inline:{a}", "inline:{}", "inline:{a=b", "inline:a=b"]
)
def test_postmap_refuses_the_same_specs(spec: str) -> None:
    _, stderr = postmap_query(spec, "a")
    assert "fatal:" in stderr
    assert str(_error(spec)) in stderr


# Empty values open (Postfix accepts them at load) and are found as "", as postmap -q shows.
EMPTY = [
    (
        "inline:{a=, b=2}",
        "a",
        ("table inline:{a=, b=2}: key a: empty string result is not allowed",),
    ),
    ("inline:{ {a=} }", "a", ("table inline:{ {a=} }: key a: empty string result is not allowed",)),
    ("static:{}", "a", ("table static:{}: empty string result is not allowed",)),
    ("static:{ }", "a", ("table static:{ }: empty string result is not allowed",)),
]


@pytest.mark.parametrize(("spec", "key", "warnings"), EMPTY)
def test_empty_values_open_and_are_found_empty(
    spec: str, key: str, warnings: tuple[str, ...]
) -> None:
    table = open_table(spec)
    assert table.lookup(key) == ""
    assert table_warnings(table) == warnings


@requires_postmap
@pytest.mark.parametrize(("spec", "key", "warnings"), EMPTY)
def test_empty_values_agree_with_postmap(spec: str, key: str, warnings: tuple[str, ...]) -> None:
    value, stderr = postmap_query(spec, key)
    assert value == ""
    assert "fatal" not in stderr
    # postmap -q says at the lookup what smtpgate says at load (static: names no key there)
    assert f"table {spec}: key {key}: empty string result is not allowed" in stderr


def test_inline_items_have_line_zero_and_no_path() -> None:
    table = open_table("inline:{ {B = two words}, a=1 }")
    assert isinstance(table, TextHashTable)
    assert table.items() == [("b", "two words", 0), ("a", "1", 0)]
    assert table.path is None


def _error(spec: str) -> TableOpenError:
    with pytest.raises(TableOpenError) as info:
        open_table(spec)
    return info.value


word = st.text(st.characters(whitelist_categories=("Ll", "Nd")), min_size=1, max_size=8)


@given(st.dictionaries(word, word, min_size=1, max_size=8))
def test_round_trip(entries: dict[str, str]) -> None:
    spec = "inline:{" + ", ".join(f"{{ {k} = {v} }}" for k, v in entries.items()) + "}"
    table = open_table(spec)
    for key, value in entries.items():
        assert table.lookup(key) == value


@given(st.text(max_size=60))
def test_any_name_opens_or_raises_table_open_error(name: str) -> None:
    for type_ in ("inline", "static"):
        try:
            open_table(f"{type_}:{name}")
        except TableOpenError:
            pass
