"""Fixtures: a loopback DNS server, a real DnsPythonResolver pointed at it, plans."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpgate.config import parse_settings
from smtpgate.policy.plan import Plan, build_plan
from smtpgate.resolver import DnsPythonResolver
from tests.dns.dnsserver import FakeDns


@pytest.fixture
def dns_server() -> Iterator[FakeDns]:
    server = FakeDns().start()
    yield server
    server.stop()


@pytest.fixture
def resolver(dns_server: FakeDns) -> DnsPythonResolver:
    return DnsPythonResolver([dns_server.address], timeout=0.3, tries=2)


BASE = """\
myhostname = mx.example.org
mydomain = example.org
mydestination = $myhostname, localhost
relay_domains = example.org, sender.test, spam.rcpt.test
mynetworks = 127.0.0.0/8
"""


@pytest.fixture
def make_plan(tmp_path: Path) -> Any:
    def make(text: str, tables: dict[str, str] | None = None) -> Plan:
        for name, body in (tables or {}).items():
            (tmp_path / name).write_text(body)
        main_cf = BASE + text.replace("@DIR@", str(tmp_path))
        settings, _ = parse_settings(main_cf, str(tmp_path / "main.cf"), hostname="mx.example.org")
        plan, diagnostics = build_plan(settings, strict_tables=True)
        assert plan is not None, [str(d) for d in diagnostics]
        return plan

    return make
