"""$name expansion (Postfix mac_expand.c, compat_level.c), table-driven."""

from __future__ import annotations

import pytest

from smtpgate.config.expand import ExpansionError, compat_level, expand, references

TABLE = {
    "x": "1",
    "empty": "",
    "indirect": "$x",
    "dollar_empty": "$empty",
    "nested": "<$indirect>",
    "level": "3.6",
}


def lookup(name: str, test: bool) -> str | None:
    raw = TABLE.get(name)
    if raw is None or test:
        return raw
    return expand(raw, lookup)


CASES = [
    ("plain text", "plain text"),
    ("$x", "1"),
    ("${x}", "1"),
    ("$(x)", "1"),
    ("$x.y", "1.y"),
    ("$$x", "$x"),
    ("a$$", "a$"),
    ("$nested", "<1>"),
    ("$undefined|${undefined}", "|"),
    ("${ x }", "1"),
    # conditional: ? and : test the unexpanded value
    ("${x?yes}", "yes"),
    ("${x:no}", ""),
    ("${empty?yes}", ""),
    ("${empty:no}", "no"),
    ("${undefined?yes}|${undefined:no}", "|no"),
    ("${dollar_empty?raw value is not empty}", "raw value is not empty"),
    ("${x?$x and $indirect}", "1 and 1"),
    ("${x?{ yes }:{ no }}", " yes "),
    ("${empty ? {A} : {B}}", "B"),
    ("${x?{A}:B}", "A"),
    ("${empty?{A}:B}", "B"),
    # Postfix 2.x compatibility: a text operand is everything after ? or :
    ("${x??foo:{b}ar}", "?foo:{b}ar"),
    ("${x ? a : b }", " a : b "),
    # relational forms
    ("${{$x} == {1} ? {eq} : {ne}}", "eq"),
    ("${{$x} != {1} ? {ne} : {eq}}", "eq"),
    ("${{10} > {9} ? {gt} : {le}}", "gt"),
    ("${{10} < {9} ? {lt} : {ge}}", "ge"),
    ("${{abc} < {abd} ? {lt} : {ge}}", "lt"),
    ("${{10} <= {10}?{le}:{gt}}", "le"),
    ("${{10} >= {11}?{ge}:{lt}}", "lt"),
    ("${{1} == {1}}", "true"),
    ("${{1} == {2}}", ""),
    ("${{1}=={1}:{x}}", ""),
    ("${{1}=={2}:{x}}", "x"),
    ("${{a}  !=  {b}  ?  {x}}", "x"),
    # compatibility levels compare number by number, not as strings or floats
    ("${{3.10} >level {3.9} ? {yes} : {no}}", "yes"),
    ("${{3.10} > {3.9} ? {yes} : {no}}", "no"),
    ("${{$level} <level {1} ? {} : {permit_mynetworks, defer}}", "permit_mynetworks, defer"),
    ("${{0} <level {1} ? {} : {permit_mynetworks}}", ""),
    ("${{$level} <level {3.6} ? {no} : {yes}}", "yes"),
    ("${{3.5.9} <level {3.6} ? {no} : {yes}}", "no"),
    ("${{2} ==level {2.0.0}}", "true"),
    ("${{3.6} <=level {3.6}}|${{3.7} >=level {3.6}}|${{3.6} !=level {3.6}}", "true|true|"),
    # nested conditionals
    ("${x?{${empty?{a}:{b}}}}", "b"),
]


@pytest.mark.parametrize(("pattern", "expected"), CASES)
def test_expand(pattern: str, expected: str) -> None:
    assert expand(pattern, lookup) == expected


ERRORS = [
    ("${foo", 'truncated macro reference: "${foo"'),
    ("$(foo", 'truncated macro reference: "$(foo"'),
    ("$ x", 'empty macro name: "$ x"'),
    ("x $", 'empty macro name: "x $"'),
    ("${a-b}", 'attribute name syntax error at: "...a>>>-b"'),
    ("${a b}", 'attribute name syntax error at: "...a>>> b"'),
    ("${{x} <level {1}?{a}:{b}}", 'malformed compatibility level syntax: "x"'),
    ("${{1} <> {1}?{a}:{b}}", '"==" or "!=" or "<" or "<=" or ">=" or ">" expected at'),
    ("${{1} <foo {1}}", 'bad operator suffix at: "...<>>>foo"'),
    ("${{1} == 1}", '"{expression}" expected at'),
    ("${{1} == {1}junk}", '"?" or ":" expected at: "...}>>>junk"'),
    ("${{1}=={1}?{a}:{b}junk}", 'unexpected input at: "...b}>>>junk"'),
    ("${x?{a} junk}", '":" expected at: "...a}>>>junk"'),
    ("$({1} == {1 ? {a})", "unbalanced {} in attribute expression"),
]


@pytest.mark.parametrize(("pattern", "message"), ERRORS)
def test_expand_errors(pattern: str, message: str) -> None:
    with pytest.raises(ExpansionError) as info:
        expand(pattern, lookup)
    assert str(info.value).startswith(message)


def test_nesting_is_bounded() -> None:
    deep = "${x?{" * 150 + "z" + "}}" * 150
    with pytest.raises(ExpansionError, match="unreasonable macro call nesting"):
        expand(deep, lookup)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.6", (3, 6, 0)),
        ("0", (0, 0, 0)),
        ("3.10.2", (3, 10, 2)),
        ("2.0", (2, 0, 0)),
    ],
)
def test_compat_level(text: str, expected: tuple[int, int, int]) -> None:
    assert compat_level(text) == expected


@pytest.mark.parametrize("text", ["", "x", "3.", "3.6.1.1", "-1", "3.1024", "3.6x", "3,6"])
def test_compat_level_errors(text: str) -> None:
    with pytest.raises(ExpansionError, match="malformed compatibility level syntax"):
        compat_level(text)


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("$a ${b} $(c) ${ d ?x} $$e", {"a", "b", "c", "d"}),
        ("${{$compatibility_level} <level {1} ? {} : {$f}}", {"compatibility_level", "f"}),
        ("no references $ $$", set()),
    ],
)
def test_references(value: str, names: set[str]) -> None:
    assert references(value) == names
