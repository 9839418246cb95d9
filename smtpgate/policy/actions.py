"""access(5) right-hand sides, parsed.

Postfix reads a table value as a command word and optional text
(``smtpd_check.c::check_table_result``).  :func:`parse_action` does the same split and
names the action; the engine performs it.  :func:`lint_action` finds the values that do
not do what they look like, for ``smtpgate check``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# Words compared case-insensitively, as Postfix's STREQUAL does.
KEYWORDS = frozenset(
    {
        "DUNNO",
        "REJECT",
        "DEFER",
        "WARN",
        "INFO",
        "FILTER",
        "HOLD",
        "DISCARD",
        "REDIRECT",
        "BCC",
        "DEFER_IF_PERMIT",
        "DEFER_IF_REJECT",
        "PREPEND",
        "OK",
        "RELAY",
    }
)

_DSN = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class Action:
    """A parsed table value: ``verb`` is a keyword, CODE, NUMERIC, TABLE or RESTRICTIONS."""

    verb: str
    text: str
    code: int = 0
    value: str = ""


def split_command(value: str) -> tuple[str, str]:
    """Split at the first blank into command word and text (leading blanks dropped)."""
    m = re.match(r"([^ \t]*)[ \t]*(.*)\Z", value, re.DOTALL)
    assert m is not None
    return m.group(1), m.group(2)


@functools.lru_cache(maxsize=4096)
def parse_action(value: str) -> Action:
    """The action a table value names (cached: a table has few distinct values)."""
    word, text = split_command(value)
    upper = word.upper()
    if upper in KEYWORDS:
        return Action(upper, text, value=value)
    if value.isdigit():
        return Action("NUMERIC", "", value=value)
    if len(word) == 3 and text and word[0] in "45" and word[1:].isdigit():
        return Action("CODE", text, int(word), value=value)
    if ":" in value:
        return Action("TABLE", value, value=value)
    return Action("RESTRICTIONS", value, value=value)


def dsn_valid(dsn: str) -> bool:
    return bool(_DSN.match(dsn))


def dsn_split(default: str, text: str) -> tuple[str, str]:
    """An optional leading enhanced status code in ``text``, else ``default``."""
    word, rest = split_command(text)
    if dsn_valid(word):
        return word, rest
    return default, text


def lint_action(value: str) -> str | None:
    """Explain a table value that does not do what it looks like, or None."""
    action = parse_action(value)
    word, text = split_command(value)
    if action.verb in {"REJECT", "DEFER"} and re.match(r"^[2-5]\d\d(\s|$)", text):
        code = text.split()[0]
        default = "access_map_reject_code" if action.verb == "REJECT" else "access_map_defer_code"
        wanted = f"{code} <text>" if code[0] in "45" else "a 4NN or 5NN code with text"
        return (
            f'"{value}" sends ${default} with the text "{text}", not a {code} reply; '
            f"to reply {code}, write {wanted}"
            + (" (a 421/521 reply also disconnects)" if code in {"421", "521"} else "")
        )
    if action.verb == "NUMERIC" and len(value) == 3 and value[0] in "45":
        return (
            f'"{value}" is an all-numeric value, which access(5) treats as OK (permit); '
            f"to reply {value}, write {value} <text>"
        )
    if action.verb == "RESTRICTIONS" and re.match(r"^(REJECT|DEFER|OK|DUNNO)\S", word, re.I):
        return f'"{value}" is not an action: a blank is missing after the keyword'
    return None
