"""Maps: ordered search, pattern tables skipped for partial keys, errors are not misses."""

from __future__ import annotations

import pytest

from smtpgate.errors import TableLookupError, TableUnavailableError
from smtpgate.tables import Maps, SurrogateTable, open_table


def _maps(*specs: str) -> Maps:
    return Maps("check_sender_access", [open_table(s) for s in specs])


@pytest.mark.parametrize(
    ("specs", "key", "partial", "expected"),
    [
        (("inline:{a=1}", "inline:{a=2}"), "a", False, "1"),
        (("inline:{b=1}", "inline:{a=2}"), "a", False, "2"),
        (("inline:{b=1}",), "a", False, None),
        (("regexp:{{/^a/ re}}", "inline:{a=2}"), "a", False, "re"),
        (("regexp:{{/^a/ re}}", "inline:{a=2}"), "a", True, "2"),
        (("cidr:{{1.2.3.0/24 net}}", "inline:{1.2.3=short}"), "1.2.3", True, "short"),
        (("static:all",), "x", True, "all"),
        ((), "x", False, None),
    ],
)
def test_find(specs: tuple[str, ...], key: str, partial: bool, expected: str | None) -> None:
    assert _maps(*specs).find(key, partial=partial) == expected


def test_a_lookup_error_stops_the_search() -> None:
    maps = Maps("t", [open_table("inline:{b=1}"), SurrogateTable("hash", "/x", "boom"),
                      open_table("static:never")])  # fmt: skip
    assert maps.find("b") == "1"
    with pytest.raises(TableLookupError, match=r'^t: hash:/x lookup error for "a": boom$'):
        maps.find("a")


def test_an_unavailable_table_stays_unavailable() -> None:
    maps = Maps("t", [SurrogateTable("hash", "/x", "open /x: No such file or directory")])
    with pytest.raises(TableUnavailableError, match=r'^t: hash:/x lookup error for "a": open /x'):
        maps.find("a")


@pytest.mark.parametrize("spec", ["inline:{a=}", "static:{}", "regexp:{{/^a/}}"])
def test_an_empty_result_is_a_lookup_error(spec: str) -> None:
    """Postfix maps_find(): an empty result is DICT_ERR_RETRY, with these words."""
    maps = Maps("check_sender_access", [open_table(spec), open_table("static:never")])
    with pytest.raises(TableLookupError) as info:
        maps.find("a")
    assert not isinstance(info.value, TableUnavailableError)
    assert str(info.value) == (
        "check_sender_access lookup of a returns an empty string result; "
        "check_sender_access should return NO RESULT in case of NOT FOUND"
    )


def test_tables_is_a_tuple() -> None:
    maps = _maps("static:x")
    assert isinstance(maps.tables, tuple) and maps.title == "check_sender_access"
