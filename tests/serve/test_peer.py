"""The client's address in the log when the client resets the connection at once.

A port scanner's connect scan (``nmap -sT``) completes the handshake and closes with an
RST (SO_LINGER 0) before smtpgate accepts the connection. With uvloop (the deployed event
loop) the address used to be lost: uvloop asks getpeername() after the accept, which fails
on a reset socket, and the log said ``connect from unknown[unknown]``, out of fail2ban's
reach. (Postfix 3.7's smtpd also calls getpeername() and logs ``unknown[unknown]`` and
``lost connection after CONNECT from unknown[unknown]`` for such a scan: observed with a
throwaway instance. smtpgate does better, as the kernel still has the address.)

The test runs the server under both event loops; the scanner's socket calls are blocking
calls in the loop's own thread, so every RST is in before the server can accept.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from tests.serve.backend import RecordingBackend
from tests.serve.conftest import Gate, running_gate

SCANNERS = {"IPv4": ("127.0.0.3", "127.0.0.1:0"), "IPv6": ("::1", "[::1]:0")}
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def connect_and_reset(source: str, host: str, port: int) -> None:
    """nmap -sT: a full handshake, then an RST instead of a FIN."""
    with socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.bind((source, 0))
        s.connect((host, port))


async def sessions_over(gate: Gate, count: int) -> None:
    """Wait (event-driven, bounded) until ``count`` sessions have logged their end."""
    shared = gate.server.shared
    async with asyncio.timeout(10):
        while gate.log.count("disconnect from") < count:
            shared.changed.clear()
            await shared.changed.wait()


async def scan(tmp_path: Path, source: str, listen: str) -> str:
    async with RecordingBackend() as backend:
        async with running_gate(
            tmp_path,
            "myhostname = mx.example.org\n",
            backend,
            overrides=(f"listen={listen}",),
            in_process="runs the server on the test's event loop, asyncio and uvloop both",
        ) as gate:
            for _ in range(3):
                connect_and_reset(source, gate.host, gate.port)
            await sessions_over(gate, 3)
            return gate.log


@pytest.mark.parametrize("family", SCANNERS)
@pytest.mark.parametrize("loop", LOOPS)
def test_reset_at_once_is_logged_with_the_client_address(
    tmp_path: Path, loop: str, family: str
) -> None:
    scanner, listen = SCANNERS[family]
    if family == "IPv6" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        log = runner.run(scan(tmp_path, scanner, listen))
    assert f"(event loop: {loop})" in log
    lines = [line.split(": ", 1)[1] for line in log.splitlines() if "connect from" in line]
    assert lines.count(f"connect from unknown[{scanner}]") == 3, log
    assert [line for line in lines if line.startswith("disconnect")] == [
        f"disconnect from unknown[{scanner}] commands=0/0"
    ] * 3, log
    assert "unknown[unknown]" not in log


async def test_reset_at_once_is_logged_with_the_address_by_a_deployed_server(tmp_path: Path):
    """The same scan against `smtpgate serve` as deployed (workers on uvloop)."""
    async with RecordingBackend() as backend:
        async with running_gate(tmp_path, "myhostname = mx.example.org\n", backend) as gate:
            for _ in range(3):
                await asyncio.to_thread(connect_and_reset, "127.0.0.3", gate.host, gate.port)
            end = time.monotonic() + 10  # the log file is the only window into it
            while (log := gate.log).count("disconnect from unknown[127.0.0.3]") < 3:
                assert time.monotonic() < end, log
                await asyncio.sleep(0.02)  # poll interval of a bounded wait for a condition
    assert log.count("connect from unknown[127.0.0.3]") == 6, log  # connect + disconnect
    assert "unknown[unknown]" not in log
