"""open_table, split_spec, the type registry and the surrogate table."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgate.errors import TableLookupError, TableOpenError, TableUnavailableError
from smtpgate.tables import (
    TABLE_TYPES,
    UNSUPPORTED_TYPES,
    SurrogateTable,
    open_table,
    open_table_or_surrogate,
    split_spec,
    table_warnings,
)

from ._postmap import postmap_query, requires_postmap, write_table

LOC = ("/etc/smtpgate/main.cf", 12)


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("hash:/x", ("hash", "/x")),
        ("proxy:hash:/x", ("proxy", "hash:/x")),
        ("inline:{a=b}", ("inline", "{a=b}")),
        ("static:{ a b }", ("static", "{ a b }")),
    ],
)
def test_split_spec(spec: str, parts: tuple[str, str]) -> None:
    assert split_spec(spec) == parts


@pytest.mark.parametrize("spec", ["nofile", "static:", ":x", ""])
def test_split_spec_refuses(spec: str) -> None:
    with pytest.raises(TableOpenError) as info:
        split_spec(spec, location=LOC)
    assert str(info.value) == f'{LOC[0]}, line 12: expecting "type:name" form instead of "{spec}"'


def test_registry_keys_are_postfix_type_names() -> None:
    assert set(TABLE_TYPES) == {
        "hash", "texthash", "cidr", "regexp", "pcre", "inline", "static", "proxy"
    }  # fmt: skip
    assert not set(TABLE_TYPES) & UNSUPPORTED_TYPES


@pytest.mark.parametrize("type_", sorted(UNSUPPORTED_TYPES | {"foo"}))
def test_unsupported_types(type_: str) -> None:
    with pytest.raises(TableOpenError) as info:
        open_table(f"{type_}:/etc/postfix/x", location=LOC)
    assert str(info.value) == f"{LOC[0]}, line 12: unsupported dictionary type: {type_}"


@requires_postmap
def test_postmap_words_unknown_types_the_same() -> None:
    _, stderr = postmap_query("foo:/x", "a")
    assert "fatal: unsupported dictionary type: foo" in stderr


def test_relative_names_resolve_from_base_dir(tmp_path: Path) -> None:
    write_table(tmp_path / "access", "a 1\n")
    table = open_table("texthash:access", base_dir=tmp_path)
    assert table.name == "access"
    assert table.lookup("A") == "1"
    absolute = open_table(f"texthash:{tmp_path / 'access'}", base_dir="/nonexistent")
    assert absolute.lookup("a") == "1"


def test_missing_file_is_reported_where_the_spec_was_written(tmp_path: Path) -> None:
    with pytest.raises(TableOpenError) as info:
        open_table("hash:access", base_dir=tmp_path, location=LOC)
    path = tmp_path / "access"
    assert str(info.value) == f"{LOC[0]}, line 12: open {path}: No such file or directory"
    (tmp_path / "access.db").write_bytes(b"")
    with pytest.raises(TableOpenError, match=r"reads the postmap source file, not .*access\.db"):
        open_table("hash:access", base_dir=tmp_path)


def test_bad_rules_are_warnings_naming_the_table_file(tmp_path: Path) -> None:
    write_table(tmp_path / "c", "1.2.3.0/24 ok\n1.2.3.4/33 x\n")
    table = open_table("cidr:c", base_dir=tmp_path, location=LOC)
    assert table_warnings(table) == (
        f'{tmp_path / "c"}, line 2: bad mask length in "1.2.3.4/33": skipping this rule',
    )


def test_proxy_opens_the_table_it_names(tmp_path: Path) -> None:
    write_table(tmp_path / "access", "a 1\n")
    table = open_table("proxy:texthash:access", base_dir=tmp_path)
    assert (table.type, table.lookup("a")) == ("texthash", "1")
    with pytest.raises(TableOpenError, match="unsupported dictionary type: btree"):
        open_table("proxy:btree:/x")


def test_surrogate_fails_every_lookup_as_unavailable() -> None:
    table = SurrogateTable("hash", "/x", "open /x: No such file or directory")
    assert (table.type, table.name, table.is_pattern) == ("hash", "/x", False)
    with pytest.raises(TableUnavailableError, match="open /x: No such file"):
        table.lookup("anything")
    assert issubclass(TableUnavailableError, TableLookupError)


def test_open_table_or_surrogate(tmp_path: Path) -> None:
    table, error = open_table_or_surrogate("static:ok")
    assert error is None and table.lookup("x") == "ok"
    table, error = open_table_or_surrogate("btree:/x", location=LOC)
    assert isinstance(table, SurrogateTable) and error is not None
    assert (table.type, table.name) == ("btree", "/x")
    with pytest.raises(TableUnavailableError, match="unsupported dictionary type: btree"):
        table.lookup("x")
    table, error = open_table_or_surrogate("nofile")
    assert isinstance(table, SurrogateTable) and error is not None


def test_pattern_flags() -> None:
    flags = {
        spec.split(":")[0]: open_table(spec).is_pattern
        for spec in ("cidr:{{0.0.0.0/0 x}}", "regexp:{{/a/ x}}", "pcre:{{/a/ x}}",
                     "inline:{a=b}", "static:x")
    }  # fmt: skip
    assert flags == {"cidr": True, "regexp": True, "pcre": True, "inline": False, "static": False}


def test_a_nul_in_the_name_is_an_open_error() -> None:
    with pytest.raises(TableOpenError, match="embedded null byte"):
        open_table("texthash:/tmp/a\0b", location=LOC)


def test_tables_import_only_stdlib_and_errors() -> None:
    import ast
    import sys

    package = Path(__file__).parents[2] / "smtpgate" / "tables"
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert name == "smtpgate.errors" or top in sys.stdlib_module_names, (module, name)
                assert top not in {"socket", "asyncio"}, (module, name)
