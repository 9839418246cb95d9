"""Plans from main.cf text, for the unit tests of the restriction core.

``build("smtpd_client_restrictions = reject")`` parses the text after :data:`BASE` as
``<tmp>/main.cf`` (so a diagnostic names that file and the line), writes ``tables`` beside
it (``@DIR@`` in the text is that folder) and returns ``(plan or None, diagnostics)``.
``make_plan`` does the same and fails the test when the plan has an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from smtpgate.config import Diagnostic, parse_settings
from smtpgate.policy.plan import Plan, build_plan

BASE = """\
myhostname = mx.example.org
mydomain = example.org
mydestination = $myhostname, localhost
relay_domains = example.org
mynetworks = 127.0.0.0/8
"""
BASE_LINES = BASE.count("\n")
"""Line n of a test's own text is line BASE_LINES + n of main.cf."""

Build = Callable[..., tuple[Plan | None, list[Diagnostic]]]
MakePlan = Callable[..., Plan]


@pytest.fixture
def build(tmp_path: Path) -> Build:
    def build(
        text: str, tables: dict[str, str] | None = None, *, strict: bool = True
    ) -> tuple[Plan | None, list[Diagnostic]]:
        for name, body in (tables or {}).items():
            (tmp_path / name).write_text(body)
        main_cf = BASE + text.replace("@DIR@", str(tmp_path))
        settings, _ = parse_settings(main_cf, str(tmp_path / "main.cf"), hostname="mx.example.org")
        return build_plan(settings, strict_tables=strict)

    return build


@pytest.fixture
def make_plan(build: Build) -> MakePlan:
    def make(text: str, tables: dict[str, str] | None = None, *, strict: bool = True) -> Plan:
        plan, diagnostics = build(text, tables, strict=strict)
        assert plan is not None, [str(d) for d in diagnostics]
        return plan

    return make
