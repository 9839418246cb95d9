"""Two `smtpgate serve` behind Debian's HAProxy with PROXY v2 and SMTP health checks.

HAProxy listens on loopback and balances, round robin, over two deployed smtpgate
instances (each with its workers and dropped privileges), sending a PROXY v2 header on
every connection (``send-proxy-v2``) and checking both with ``option smtpchk`` (its
checks carry a v2 LOCAL header).  Clients bound to 127.0.0.2 and 127.0.0.3 send mail
through it: the restrictions see their own addresses (a check_client_access table
rejects 127.0.0.3), the logs name them, HAProxy's stats socket shows both instances UP,
and the health checks -- many more than the connection rate limit allows a client --
count for no client.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.postfix_instance import free_port
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, running_gate

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
DEADLINE = 30.0

GATE_CF = """\
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_upstream_proxy_protocol = haproxy
smtpgate_upstream_proxy_networks = 127.0.0.1/32
smtpd_client_restrictions = check_client_access cidr:$config_directory/clients
# a client may connect twice a minute: HAProxy's checks (every 200ms) would be refused
# at once if they counted
smtpd_client_connection_rate_limit = 2
smtpd_client_event_limit_exceptions =
"""
TABLES = {"clients": "127.0.0.3 REJECT no thanks\n"}
HAPROXY_CFG = """\
global
    stats socket {folder}/stats.sock mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend smtp
    bind 127.0.0.1:{port}
    default_backend gates

backend gates
    balance roundrobin
    option smtpchk HELO haproxy.test
    default-server send-proxy-v2 check inter 200ms fall 1 rise 1
{servers}
"""


@contextlib.asynccontextmanager
async def running_haproxy(folder: Path, ports: list[int]) -> AsyncIterator[tuple[int, Path]]:
    """HAProxy in the foreground in front of the given ports: (its port, stats socket)."""
    folder.mkdir()
    port = free_port()
    servers = "".join(f"    server gate{i} 127.0.0.1:{p}\n" for i, p in enumerate(ports, 1))
    config = folder / "haproxy.cfg"
    config.write_text(HAPROXY_CFG.format(folder=folder, port=port, servers=servers))
    subprocess.run([HAPROXY, "-c", "-q", "-f", str(config)], check=True, timeout=30)
    log = (folder / "haproxy.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        HAPROXY, "-db", "-f", str(config), stdout=log, stderr=log
    )
    try:
        yield port, folder / "stats.sock"
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        log.close()


async def server_status(stats: Path) -> dict[str, str]:
    """``show stat`` on the stats socket: server name -> status (UP, DOWN, ...)."""
    reader, writer = await asyncio.open_unix_connection(str(stats))
    try:
        writer.write(b"show stat\n")
        await writer.drain()
        text = (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.close()
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {row["svname"]: row["status"] for row in rows if row["pxname"] == "gates"}


async def both_up(stats: Path) -> dict[str, str]:
    end = time.monotonic() + DEADLINE
    while True:
        with contextlib.suppress(OSError):
            status = await server_status(stats)
            if status.get("gate1") == status.get("gate2") == "UP":
                return status
        if time.monotonic() > end:
            raise AssertionError(f"HAProxy did not mark both gates UP: {status}")
        await asyncio.sleep(0.1)  # poll interval of a bounded wait for a condition


async def checks_seen(gate: Gate, count: int) -> str:
    """The gate's log once it has served *count* health checks (bounded wait)."""
    end = time.monotonic() + DEADLINE
    while (log := gate.log).count("disconnect from unknown[127.0.0.1]") < count:
        if time.monotonic() > end:
            raise AssertionError(f"fewer than {count} health checks within {DEADLINE}s\n{log}")
        await asyncio.sleep(0.1)  # poll interval of a bounded wait for a condition
    return log


async def session(port: int, source: str) -> list[str]:
    """One message through the balancer from *source*: the reply to RCPT (or the dot)."""
    c = await LineClient.connect("127.0.0.1", port, source=source)
    try:
        assert (await c.reply())[0] == "220 mx.example.org ESMTP Postfix"
        assert (await c.cmd("EHLO client.example"))[0] == "250-mx.example.org"
        assert await c.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
        reply = await c.cmd("RCPT TO:<foo@bar.org>")
        if reply[0].startswith("250"):
            assert (await c.cmd("DATA"))[0].startswith("354")
            reply = await c.cmd(f"Subject: from {source}\r\n\r\nhi\r\n.")
        assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
        return reply
    finally:
        await c.close()


@pytest.mark.skipif(not Path(HAPROXY).exists(), reason="HAProxy is not installed")
async def test_two_gates_behind_haproxy_see_the_real_clients(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    (tmp_path / "gate1").mkdir()
    (tmp_path / "gate2").mkdir()
    async with (
        running_gate(tmp_path / "gate1", GATE_CF, backend, TABLES) as gate1,
        running_gate(tmp_path / "gate2", GATE_CF, backend, TABLES) as gate2,
        running_haproxy(tmp_path / "haproxy", [gate1.port, gate2.port]) as (port, stats),
    ):
        assert await both_up(stats) == {"gate1": "UP", "gate2": "UP", "BACKEND": "UP"}
        replies = [await session(port, source) for source in ("127.0.0.2", "127.0.0.3") * 2]
        for reply, source in zip(replies, ("127.0.0.2", "127.0.0.3") * 2, strict=True):
            if source == "127.0.0.3":
                assert reply == ["554 5.7.1 <unknown[127.0.0.3]>: Client host rejected: no thanks"]
            else:
                assert reply[0].startswith("250 2.0.0 Ok"), reply
        # many more checks than the rate limit lets a client connect, and still UP
        logs = [await checks_seen(gate, 10) for gate in (gate1, gate2)]
        assert await both_up(stats) == {"gate1": "UP", "gate2": "UP", "BACKEND": "UP"}
    both = "\n".join(logs)
    for log in logs:  # round robin: each gate had clients of its own, named by the header
        assert (
            ": connect from unknown[127.0.0.2]" in log or ": connect from unknown[127.0.0.3]" in log
        )
    assert both.count(": connect from unknown[127.0.0.2]") == 2
    assert both.count(": connect from unknown[127.0.0.3]") == 2
    assert (
        "NOQUEUE: reject: RCPT from unknown[127.0.0.3]: 554 5.7.1 <unknown[127.0.0.3]>: "
        "Client host rejected: no thanks; from=<friend@example.net> to=<foo@bar.org> "
        "proto=ESMTP helo=<client.example>"
    ) in both
    assert "rate limit exceeded" not in both and "haproxy read" not in both, both
    assert "helo=<haproxy.test>" not in both  # the checks are not refused either
    assert sorted(m.xforward["ADDR"] for m in backend.messages) == ["127.0.0.2", "127.0.0.2"]
