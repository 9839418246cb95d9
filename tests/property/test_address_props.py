"""Property tests: the envelope address parser, the command tokenizer, and the policy's
address functions (keys, resolve, syntax checks) never raise on arbitrary text.

The config lexer and the table parsers have their own property tests (tests/config,
tests/tables); these cover the SMTP side.
"""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtpgate.policy.address import (
    Resolver,
    address_keys,
    domain_keys,
    ip_keys,
    parent_domains,
    split_address,
    strip_extension,
    valid_hostaddr,
    valid_hostname,
    valid_mailhost_addr,
)
from smtpgate.relay import quote_local
from smtpgate.smtp.syntax import acceptable_address as _acceptable_address
from smtpgate.smtp.syntax import parse_address, smtpd_tokens

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ATOM = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~",
    min_size=1,
    max_size=12,
)
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
DOT_ATOM = st.lists(ATOM, min_size=1, max_size=3).map(".".join)
DOMAIN = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
SMTPISH = st.text(alphabet='<>"()\\@%!:,.; \t\rab\x00\x1b[]', max_size=40)
ANY_TEXT = st.one_of(st.text(max_size=80), SMTPISH)


@settings(max_examples=500, deadline=None)
@given(ANY_TEXT, st.booleans(), st.booleans())
def test_parse_address_never_raises(text: str, allow_empty: bool, sloppy: bool) -> None:
    result = parse_address(text, allow_empty=allow_empty, sloppy=sloppy)
    assert result is None or isinstance(result, str)
    if result is not None and not allow_empty:
        assert result != ""


@settings(max_examples=200, deadline=None)
@example('<"a\rb"@our.example>')
@example("<u\x1b@our.example>")
@given(ANY_TEXT)
def test_no_accepted_address_has_control_characters(text: str) -> None:
    """parse_address keeps what the client wrote; the command refuses control characters."""
    result = parse_address(text, allow_empty=True)
    if result is not None and CONTROL.search(result):
        assert not _acceptable_address(result), repr(result)


@settings(max_examples=300, deadline=None)
@given(DOT_ATOM, DOMAIN)
def test_simple_addresses_round_trip(local: str, domain: str) -> None:
    address = f"{local}@{domain}"
    assert parse_address(f"<{address}>", allow_empty=False) == address
    assert parse_address(address, allow_empty=False) == address
    assert parse_address(f"<@relay.example:{address}>", allow_empty=False) == address


PRINTABLE_NO_COMMA = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters=",")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=PRINTABLE_NO_COMMA, min_size=1, max_size=20), DOMAIN)
def test_quote_local_and_parse_address_are_inverse(local: str, domain: str) -> None:
    """What relay.py writes to the backend (quote_local) parses back to the checked address."""
    address = f"{local}@{domain}"
    assert parse_address(f"<{quote_local(address)}>", allow_empty=False) == address


def test_a_quoted_local_part_is_never_a_source_route() -> None:
    """Found by the property above: "@:" quoted is a local part, not the route @...: ."""
    assert parse_address('<"@:"@our.example>', allow_empty=False) == "@:@our.example"
    assert parse_address("<@a,@b:u@our.example>", allow_empty=False) == "u@our.example"


def test_quoted_comma_round_trips() -> None:
    assert parse_address('<"a,b"@our.example>', allow_empty=False) == "a,b@our.example"


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_smtpd_tokens_never_raise(line: str) -> None:
    tokens = smtpd_tokens(line)
    assert all(t.text for t in tokens)


def _resolver(percent: bool, bang: bool) -> Resolver:
    return Resolver(
        myorigin="mx.example.org",
        is_local_domain=lambda d: d in {"mx.example.org", "localhost"},
        is_relay_domain=lambda d: d == "our.example" or d.endswith(".our.example"),
        allow_percent_hack=percent,
        swap_bangpath=bang,
    )


@settings(max_examples=500, deadline=None)
@given(ANY_TEXT, st.booleans(), st.booleans())
def test_resolve_never_raises_and_is_conservative(text: str, percent: bool, bang: bool) -> None:
    resolved = _resolver(percent, bang).resolve(text)
    assert resolved.address == resolved.address.lower()
    if resolved.klass.value == "relay" and not resolved.routed:
        local = resolved.address.rpartition("@")[0]
        assert not any(op in local for op in "@%!"), resolved


@settings(max_examples=500, deadline=None)
@given(ANY_TEXT, st.sampled_from(["", "+", "+-"]), st.booleans())
def test_lookup_keys_never_raise(text: str, delimiters: str, parent_style: bool) -> None:
    keys = address_keys(text, delimiters, parent_style)
    assert keys and keys[0] == (text.lower(), False)
    assert all(partial for _, partial in keys[1:])
    domain_keys(text, parent_style)
    ip_keys(text)
    parent_domains(text, parent_style)
    split_address(text)
    strip_extension(text, delimiters)
    for check in (valid_hostname, valid_hostaddr, valid_mailhost_addr):
        assert check(text) in (True, False)
