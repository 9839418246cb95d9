"""Only the config layer reads a main.cf parameter by its name.

Everything else gets typed values (``config.size_limit``, ``plan.codes.reject_code``) from
one load (``smtpgate.generation``).  A parameter read by name elsewhere is how a misspelt
name silently became its default once (``plan._bool`` caught the KeyError); this test
reads the source (no import, no run) and names every such read with file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from smtpgate.config import PARAMETERS, POSTFIX_DEFAULTS

PACKAGE = Path(__file__).parents[1] / "smtpgate"
NAMES = frozenset(PARAMETERS) | frozenset(POSTFIX_DEFAULTS)
READS = frozenset({"get", "raw", "as_bool", "as_int", "as_time", "as_list", "as_code"})
"""Settings methods that return a value (``location``/``blame`` only say where)."""

SETTINGS_USERS = frozenset({"generation.py", "policy/plan.py"})
"""Modules outside config/ that may hold a Settings at all: the one load and the plan
compiler (for the file and line of its diagnostics).  The relay reads its typed
RelayConfig (config/relayconf.py)."""


def _holds_parameters(value: ast.expr) -> bool:
    """``settings[...]``, ``self.settings[...]``, ``plan.codes[...]``: a mapping of
    parameter values (a dict of compiled lists keyed by stage is not one)."""
    name = value.id if isinstance(value, ast.Name) else getattr(value, "attr", "")
    return name.endswith("settings") or name == "codes"


def parameter_reads(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for each read of a parameter by a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        key: ast.expr | None = None
        if isinstance(node, ast.Subscript) and _holds_parameters(node.value):
            key = node.slice
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in READS
            and node.args
        ):
            key = node.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value in NAMES:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def _modules() -> list[tuple[str, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if not name.startswith("config/"):
            out.append((name, path.read_text()))
    return out


def test_the_checker_finds_reads_by_name() -> None:
    source = (
        'a = settings.get("relayhost")\n'
        'b = settings["myhostname"]\n'
        'c = plan.codes["reject_code"]\n'
        'd = s.as_bool("smtpd_delay_reject")\n'
        "e = config.size_limit\n"
        'f = settings.location("listen")\n'
        'g = words.get("not_a_parameter_name")\n'
        'h = lists["smtpd_relay_restrictions"]\n'
    )
    assert [line.split(": ", 1)[0] for line in parameter_reads(source, "x.py")] == [
        "x.py:1",
        "x.py:2",
        "x.py:3",
        "x.py:4",
    ]


def test_no_module_outside_config_reads_a_parameter_by_name() -> None:
    reads = [
        read for name, source in _modules() for read in parameter_reads(source, f"smtpgate/{name}")
    ]
    assert reads == []


def test_settings_stay_in_the_load() -> None:
    holders = {
        name
        for name, source in _modules()
        if any(
            isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("smtpgate.config")
            and any(alias.name == "Settings" for alias in node.names)
            for node in ast.walk(ast.parse(source))
        )
    }
    assert holders <= SETTINGS_USERS, sorted(holders - SETTINGS_USERS)
