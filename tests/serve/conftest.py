"""Fixtures: a running smtpgate (``Server`` on 127.0.0.1, port 0) in front of a backend."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from smtpgate.config import parse_settings
from smtpgate.logs import MailLog
from smtpgate.policy.plan import compile_plan
from smtpgate.server import Server
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient

SEED_TABLES = {
    "protected_destinations": "foo@bar.org     good_senders_only\n",
    "restricted_senders": "qq.com         REJECT  521\n163.com        REJECT  521\n",
}
SEED_MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_recipient_restrictions =
        permit_mynetworks
        check_recipient_access hash:$config_directory/protected_destinations
smtpd_restriction_classes = good_senders_only
good_senders_only = check_sender_access hash:$config_directory/restricted_senders, permit
"""


class Gate:
    """A started smtpgate: its port, its log text, and a way to connect."""

    def __init__(self, server: Server, log: io.StringIO) -> None:
        self.server = server
        self._log = log
        self.host, self.port = server.sockets[0]
        self.clients: list[LineClient] = []

    @property
    def log(self) -> str:
        return self._log.getvalue()

    async def connect(self, source: str = "127.0.0.2") -> LineClient:
        client = await LineClient.connect(self.host, self.port, source=source)
        self.clients.append(client)
        greeting = await client.reply()
        assert greeting[0].startswith("220 "), greeting
        return client


GateFactory = Callable[..., "asynccontextmanager[Gate]"]


@asynccontextmanager
async def running_gate(
    tmp_path: Path,
    main_cf: str,
    backend: RecordingBackend | None,
    tables: dict[str, str] | None = None,
    overrides: tuple[str, ...] = (),
    relayhost: str | None = None,
) -> AsyncIterator[Gate]:
    """A started Server; ``relayhost`` (default: the backend's) points it elsewhere, e.g.
    at a real Postfix."""
    for name, text in (tables or {}).items():
        (tmp_path / name).write_text(text)
    if relayhost is None:
        relayhost = backend.relayhost if backend is not None else "[127.0.0.1]:9"
    # Tests never ask the machine's DNS server (a private address here) for anything:
    # no client name lookups unless a test's main.cf turns them on (with dns_servers).
    text = f"smtpd_peername_lookup = no\n{main_cf}\nlisten = 127.0.0.1:0\nrelayhost = {relayhost}\n"
    settings, _ = parse_settings(
        text, str(tmp_path / "main.cf"), overrides, hostname="mx.example.org"
    )
    plan, _ = compile_plan(settings, strict_tables=False)
    log = io.StringIO()
    server = Server(settings, plan, MailLog("mx.example.org", "postfix", stream=log))
    await server.start()
    gate = Gate(server, log)
    try:
        yield gate
    finally:
        for client in gate.clients:
            await client.close()
        await server.stop(drain_timeout=2)


@pytest.fixture
async def backend() -> AsyncIterator[RecordingBackend]:
    async with RecordingBackend() as b:
        yield b


@pytest.fixture
async def seed_gate(tmp_path: Path, backend: RecordingBackend) -> AsyncIterator[Gate]:
    async with running_gate(tmp_path, SEED_MAIN_CF, backend, SEED_TABLES) as gate:
        yield gate
