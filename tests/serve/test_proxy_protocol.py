"""smtpd_upstream_proxy_protocol = haproxy: the client a PROXY header names is the client.

Real sockets against `smtpgate serve` as deployed (two workers): the header is written
the way a load balancer writes it, and what the restrictions, the limits, the log and the
backend's XFORWARD see is the address in it.  A bad or missing header, a header that
does not come in time and a peer outside smtpgate_upstream_proxy_networks get what
Postfix 3.7 gives (tests/serve/test_proxy_postfix.py compares the two side by side).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from smtpgate.proxyproto import encode, encode_local
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, running_gate

MAIN_CF = """\
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_upstream_proxy_protocol = haproxy
smtpd_client_restrictions = check_client_access cidr:$config_directory/clients
"""
TABLES = {"clients": "192.0.2.66 REJECT no thanks\n"}
FRONT = ("198.51.100.25", 25)  # the balancer's front end, as its header names it
LOCAL_ERROR = ["421 4.3.0 mx.example.org Server local error"]


async def proxied(gate: Gate, header: bytes, source: str = "127.0.0.2") -> LineClient:
    """A connection from the balancer at *source* that starts with *header*."""
    client = await LineClient.connect(gate.host, gate.port, source=source)
    gate.clients.append(client)
    await client.send_raw(header)
    return client


async def greeted(gate: Gate, header: bytes, source: str = "127.0.0.2") -> LineClient:
    client = await proxied(gate, header, source)
    greeting = await client.reply()
    assert greeting == ["220 mx.example.org ESMTP Postfix"], greeting
    return client


async def send_mail(client: LineClient, rcpt: str = "foo@bar.org") -> list[str]:
    assert (await client.cmd("EHLO client.example"))[0] == "250-mx.example.org"
    assert await client.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
    reply = await client.cmd(f"RCPT TO:<{rcpt}>")
    if reply[0].startswith("250"):
        assert await client.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        reply = await client.cmd("Subject: hi\r\n\r\nhi\r\n.")
    await client.cmd("QUIT")
    return reply


async def test_the_v1_header_names_the_client_for_restrictions_and_logs(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with running_gate(tmp_path, MAIN_CF, backend, TABLES) as gate:
        client = await greeted(gate, encode(1, ("192.0.2.66", 40001), FRONT))
        assert await send_mail(client) == [
            "554 5.7.1 <unknown[192.0.2.66]>: Client host rejected: no thanks"
        ]
        log = await gate.wait_log("disconnect from unknown[192.0.2.66]")
    assert "connect from unknown[192.0.2.66]" in log
    assert (
        "NOQUEUE: reject: RCPT from unknown[192.0.2.66]: 554 5.7.1 <unknown[192.0.2.66]>: "
        "Client host rejected: no thanks; from=<friend@example.net> to=<foo@bar.org> "
        "proto=ESMTP helo=<client.example>"
    ) in log
    assert "127.0.0.2" not in log  # the balancer is nowhere in the session's lines
    assert backend.messages == []


async def test_the_v2_header_client_reaches_the_backend_in_xforward(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with running_gate(tmp_path, MAIN_CF, backend, TABLES) as gate:
        client = await greeted(gate, encode(2, ("192.0.2.77", 40123), FRONT))
        reply = await send_mail(client)
        assert reply[0].startswith("250 2.0.0 Ok"), reply
        log = await gate.wait_log("disconnect from unknown[192.0.2.77]")
    [message] = backend.messages
    assert message.xforward["ADDR"] == "192.0.2.77"
    assert message.xforward["PORT"] == "40123"
    assert "client=unknown[192.0.2.77]" in log
    assert b"(unknown [192.0.2.77])" in message.content  # smtpgate's Received: header


async def test_a_header_in_pieces_and_an_ipv6_client(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    header = encode(1, ("2001:db8::7", 2525), ("2001:db8::25", 25))
    async with running_gate(tmp_path, MAIN_CF, backend, TABLES) as gate:
        client = await proxied(gate, header[:9])
        await asyncio.sleep(0.05)  # a second segment, as a slow balancer sends it
        await client.send_raw(header[9:])
        assert (await client.reply())[0].startswith("220 ")
        assert (await client.cmd("EHLO client.example"))[0] == "250-mx.example.org"
        await client.cmd("QUIT")
        log = await gate.wait_log("disconnect from unknown[2001:db8::7]")
    assert "connect from unknown[2001:db8::7]" in log


@pytest.mark.parametrize(
    ("data", "warning"),
    [
        (b"EHLO x\r\n", "haproxy read: short protocol header: EHLO x\\r\\n"),
        (b"PROXY UNKNOWN\r\n", "haproxy read: bad or missing protocol type: PROXY UNKNOWN\\r\\n"),
        (
            b"PROXY TCP4 192.0.2.300 198.51.100.25 1 25\r\n",
            "haproxy read: bad or missing client address: "
            "PROXY TCP4 192.0.2.300 198.51.100.25 1 25\\r\\n",
        ),
        (encode(2, None, None), "haproxy read: unsupported network protocol: "),
    ],
)
async def test_a_bad_header_gets_postfixs_hangup(
    tmp_path: Path, backend: RecordingBackend, data: bytes, warning: str
) -> None:
    async with running_gate(tmp_path, MAIN_CF, backend, TABLES) as gate:
        client = await proxied(gate, data)
        assert await client.reply() == LOCAL_ERROR
        assert await client.closed()
        log = await gate.wait_log("disconnect from unknown[127.0.0.2] commands=0/0")
    lines = [line.split(": ", 1)[1] for line in log.splitlines() if "smtpd[" in line]
    at = next(i for i, line in enumerate(lines) if line.startswith("warning: haproxy"))
    assert lines[at].startswith(f"warning: {warning}"), lines
    assert lines[at + 1 : at + 3] == [
        "connect from unknown[127.0.0.2]",
        "disconnect from unknown[127.0.0.2] commands=0/0",
    ]


async def test_no_header_in_time_and_no_header_at_all(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    cf = MAIN_CF + "smtpd_upstream_proxy_timeout = 1s\n"
    async with running_gate(tmp_path, cf, backend, TABLES) as gate:
        silent = await proxied(gate, b"")
        assert await silent.reply() == LOCAL_ERROR
        await gate.wait_log("warning: haproxy read: timeout error")
        gone = await proxied(gate, b"", source="127.0.0.3")
        gone.writer.write_eof()
        assert await gone.reply() == LOCAL_ERROR  # as Postfix: the 421 still goes out
        assert await gone.closed()
        log = await gate.wait_log("disconnect from unknown[127.0.0.3] commands=0/0")
    assert "warning: haproxy read: EOF" in log


async def test_only_the_balancers_may_send_the_header(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    cf = MAIN_CF + "smtpgate_upstream_proxy_networks = 127.0.0.3/32, [::1]/128\n"
    header = encode(2, ("192.0.2.77", 40123), FRONT)
    async with running_gate(tmp_path, cf, backend, TABLES) as gate:
        stranger = await proxied(gate, header, source="127.0.0.2")
        assert await stranger.reply() == LOCAL_ERROR
        assert await stranger.closed()
        balancer = await greeted(gate, header, source="127.0.0.3")
        await balancer.cmd("QUIT")
        log = await gate.wait_log("disconnect from unknown[192.0.2.77]")
    assert (
        "warning: haproxy: refusing connection from unknown[127.0.0.2]: "
        "not in smtpgate_upstream_proxy_networks"
    ) in log
    assert "connect from unknown[127.0.0.2]" in log  # then the hang-up, as for a bad header


async def test_limits_count_the_real_client_and_never_the_balancers_health_checks(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    cf = MAIN_CF + "smtpd_client_connection_count_limit = 1\n"
    async with running_gate(tmp_path, cf, backend, TABLES) as gate:
        # the balancer's own sessions (v2 LOCAL) are its, and count for no client
        checks = [await greeted(gate, encode_local()) for _ in range(3)]
        first = await greeted(gate, encode(2, ("192.0.2.77", 1), FRONT))
        other = await greeted(gate, encode(2, ("192.0.2.78", 1), FRONT))
        second = await proxied(gate, encode(2, ("192.0.2.77", 2), FRONT))
        assert await second.reply() == [
            "421 4.7.0 mx.example.org Error: too many connections from 192.0.2.77"
        ]
        for client in (*checks, first, other):
            assert (await client.cmd("HELO balancer.example"))[0].startswith("250 ")
            await client.cmd("QUIT")
        log = await gate.wait_log("disconnect from unknown[192.0.2.78]")
    assert log.count("connect from unknown[127.0.0.2]") >= 3
    assert (
        "warning: Connection concurrency limit exceeded: 2 from unknown[192.0.2.77] "
        "for service 127.0.0.1:"
    ) in log
    assert "too many connections from 127.0.0.2" not in log


async def test_a_local_session_carries_the_flag_for_metrics(tmp_path: Path) -> None:
    async with running_gate(
        tmp_path, MAIN_CF, None, TABLES, in_process="reads the sessions' machines"
    ) as gate:
        check = await greeted(gate, encode_local())
        client = await greeted(gate, encode(1, ("192.0.2.77", 1), FRONT), source="127.0.0.3")
        flags = {
            s.machine.client.address: s.machine.proxy_local
            for s in gate.server.shared.sessions
            if s.machine is not None
        }
        assert flags == {"127.0.0.2": True, "192.0.2.77": False}
        await check.cmd("QUIT")
        await client.cmd("QUIT")
