"""Fixtures: a loopback DNS server with weighted lists, a Redis, and clients that time
the greeting."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.dns.dnsserver import FakeDns
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, backend  # noqa: F401  (the fixture, for these tests)
from tests.shared_state.redis_server import redis_server  # noqa: F401 (the fixture)


@pytest.fixture
def dns() -> Iterator[FakeDns]:
    server = FakeDns().start()
    yield server
    server.stop()


def dns_overrides(dns: FakeDns) -> tuple[str, ...]:
    host, port = dns.address
    return (f"dns_servers={host}:{port}", "dns_timeout=1s", "dns_tries=1")


def listed(dns: FakeDns, address: str, zone: str, code: str = "127.0.0.2") -> None:
    reverse = ".".join(reversed(address.split(".")))
    dns.add(f"{reverse}.{zone}.", "A", code)


class Session:
    """A client connection with its greeting and how long the greeting took."""

    def __init__(self, client: LineClient, greeting: list[str], seconds: float) -> None:
        self.client = client
        self.greeting = greeting
        self.seconds = seconds
        self.port = int(client.writer.get_extra_info("sockname")[1])

    @property
    def tag(self) -> str:
        """postscreen's ``[addr]:port``."""
        host = self.client.writer.get_extra_info("sockname")[0]
        return f"[{host}]:{self.port}"


async def session(gate: Gate, source: str, first: bytes = b"") -> Session:
    """Connect from ``source`` (sending ``first`` at once: a pregreet), read the whole
    greeting (or whatever ends it), and time it."""
    start = time.monotonic()
    client = await LineClient.connect(gate.host, gate.port, source=source)
    gate.clients.append(client)
    if first:
        await client.send_raw(first)
    try:
        greeting = await client.reply()
    except ConnectionError:
        greeting = []
    return Session(client, greeting, time.monotonic() - start)
