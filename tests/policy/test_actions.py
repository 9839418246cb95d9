"""access(5) right-hand sides: parsing, DSN rewriting, and the lint for check."""

import pytest

from smtpgate.policy.actions import dsn_split, lint_action, parse_action
from smtpgate.policy.dsn import smtpd_dsn_fix
from smtpgate.policy.model import CLIENT, RECIPIENT, SENDER


@pytest.mark.parametrize(
    ("value", "verb", "code", "text"),
    [
        ("OK", "OK", 0, ""),
        ("ok trailing text", "OK", 0, "trailing text"),
        ("RELAY", "RELAY", 0, ""),
        ("REJECT  521", "REJECT", 0, "521"),
        ("reject", "REJECT", 0, ""),
        ("521 go away", "CODE", 521, "go away"),
        ("450 4.7.1 later", "CODE", 450, "4.7.1 later"),
        ("521", "NUMERIC", 0, ""),
        ("1234567", "NUMERIC", 0, ""),
        ("250 ok", "RESTRICTIONS", 0, "250 ok"),
        ("DUNNO", "DUNNO", 0, ""),
        ("DEFER_IF_PERMIT maybe", "DEFER_IF_PERMIT", 0, "maybe"),
        ("good_senders_only", "RESTRICTIONS", 0, "good_senders_only"),
        ("check_sender_access hash:/x", "TABLE", 0, "check_sender_access hash:/x"),
        ("REJECT521", "RESTRICTIONS", 0, "REJECT521"),
    ],
)
def test_parse_action(value, verb, code, text):
    action = parse_action(value)
    assert (action.verb, action.code, action.text) == (verb, code, text)


def test_dsn_split():
    assert dsn_split("5.7.1", "5.1.1 no such user") == ("5.1.1", "no such user")
    assert dsn_split("5.7.1", "go away") == ("5.7.1", "go away")
    assert dsn_split("5.7.1", "5.1 not a code") == ("5.7.1", "5.1 not a code")


@pytest.mark.parametrize(
    ("status", "klass", "expected"),
    [
        ("5.1.1", SENDER, "4.1.7"),
        ("5.1.5", SENDER, "4.1.0"),
        ("5.1.9", SENDER, "4.1.0"),
        ("5.1.9", RECIPIENT, "4.1.0"),
        ("5.1.1", RECIPIENT, "4.1.1"),
        ("5.1.7", RECIPIENT, "4.1.3"),
        ("5.1.2", SENDER, "4.1.8"),
        ("5.1.1", CLIENT, "4.0.0"),
        ("5.7.1", SENDER, "5.7.1"),
    ],
)
def test_dsn_fix(status, klass, expected):
    assert smtpd_dsn_fix(status, klass) == expected


def test_lint_finds_the_seed_trap():
    hint = lint_action("REJECT  521")
    assert hint is not None
    assert "521 <text>" in hint and "disconnects" in hint
    assert "treats as OK" in (lint_action("521") or "")
    assert lint_action("521 go away") is None
    assert lint_action("OK") is None
    assert "blank is missing" in (lint_action("REJECT521") or "")
