"""Postfix's session limits in smtpgate, over real sockets with tiny limits.

Each test checks the reply text (Postfix's, read off smtpd.c and a real Postfix 3.7.11:
tests/differential/test_sessions_vs_postfix.py runs the ``limits/`` scripts against both),
whether the connection closed, the log lines (the ``disconnect from`` counters above all),
and that a normal message still goes through afterwards. Time limits below one second are
set on the running server's ServiceConfig (main.cf times are whole seconds); every wait is
bounded, and no sleep stands in for synchronisation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from smtpgate.anvil import Anvil, DataBudget, LocalAnvil
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, running_gate

MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
"""
EHLO = "EHLO client.example.net"
MAIL = "MAIL FROM:<sender@example.net>"
RCPT = "RCPT TO:<bob@bar.org>"
UNKNOWN = "500 5.5.2 Error: command not recognized"
TOO_MANY_ERRORS = "421 4.7.0 mx.example.org Error: too many errors"
TIMEOUT = "421 4.4.2 mx.example.org Error: timeout exceeded"
BOUND = 5.0  # seconds: the longest any single wait in these tests may take
# Reasons for an in-process gate (tests/serve/conftest.py): these tests look inside the
# anvil or the budget of one process (tests/test_anvil.py covers the supervisor's service,
# tests/test_deployment.py the limits across workers of a real serve).
READS_ANVIL = "reads the anvil's counters (gate.server.shared.anvil)"
READS_BUDGET = "reads the data memory budget (gate.server.shared.budget)"
READS_SESSIONS = "reaches into the server's session (gate.server.shared.sessions)"
SETS_CONFIG = "sets ServiceConfig fields (sub-second timeouts) in the running server"


@asynccontextmanager
async def gate_with(
    tmp_path: Path,
    backend: RecordingBackend,
    *overrides: str,
    in_process: str = "",
    workers: int = 2,
    **config: Any,
) -> AsyncIterator[Gate]:
    """A gate with ``-o`` style overrides; keyword arguments replace ServiceConfig fields,
    which needs the server in this process (``in_process``)."""
    in_process = in_process or (SETS_CONFIG if config else "")
    async with running_gate(
        tmp_path, MAIN_CF, backend, overrides=overrides, workers=workers, in_process=in_process
    ) as gate:
        if config:
            shared = gate.server.shared  # a new generation, swapped in as one reference
            new = dataclasses.replace(shared.generation.config, **config)
            shared.generation = dataclasses.replace(shared.generation, config=new)
        yield gate


def local_anvil(gate: Gate) -> LocalAnvil:
    anvil = gate.server.shared.anvil
    assert isinstance(anvil, LocalAnvil)
    return anvil


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll a condition of the running server (same event loop), within BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # poll interval of a bounded wait for a condition


async def disconnect_line(gate: Gate, client: str = "127.0.0.2") -> str:
    prefix = f"disconnect from unknown[{client}]"
    await wait_until(lambda: prefix in gate.log, prefix)
    return next(line for line in gate.log.splitlines() if prefix in line)


async def deliver(gate: Gate, c: LineClient | None = None, body: bytes = b"hello") -> LineClient:
    """A normal message on ``c`` (or a new connection): every reply 2xx/354."""
    if c is None:
        c = await gate.connect()
        assert (await c.cmd(EHLO))[-1].startswith("250 ")
    assert await c.cmd(MAIL) == ["250 2.1.0 Ok"]
    assert await c.cmd(RCPT) == ["250 2.1.5 Ok"]
    assert (await c.cmd("DATA"))[0].startswith("354 ")
    await c.send_raw(b"Subject: t\r\n\r\n" + body + b"\r\n.\r\n")
    reply = await c.reply()
    assert reply[0].startswith("250 2.0.0 Ok: queued as "), reply
    return c


# --------------------------------------------------------------------------- timeouts


async def test_idle_client_gets_421_timeout(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(tmp_path, backend, timeout=0.3) as gate:
        c = await gate.connect()
        assert await c.cmd(EHLO)
        assert await c.reply() == [TIMEOUT]
        assert await c.closed()
        await disconnect_line(gate)
        assert "timeout after EHLO from unknown[127.0.0.2]" in gate.log
        await deliver(gate)


async def test_idle_before_any_command_logs_connect(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with gate_with(tmp_path, backend, timeout=0.3) as gate:
        c = await gate.connect()
        assert await c.reply() == [TIMEOUT]
        assert await c.closed()
        assert "commands=0/0" in await disconnect_line(gate)
        assert "timeout after CONNECT from unknown[127.0.0.2]" in gate.log


async def trickle(c: LineClient, data: bytes, gap: float) -> None:
    """Send one byte every ``gap`` seconds (pacing, not synchronisation)."""
    for i in range(len(data)):
        await c.send_raw(data[i : i + 1])
        await asyncio.sleep(gap)


async def test_trickled_command_survives_without_deadline(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    # smtpd_per_request_deadline = no (Postfix's default): the timer restarts with each read.
    async with gate_with(tmp_path, backend, timeout=0.4) as gate:
        c = await gate.connect()
        await trickle(c, b"NOOP xxxxxxxxx\r\n", 0.05)  # 0.8 s in all, never 0.4 s silent
        assert await c.reply() == ["250 2.0.0 Ok"]


async def test_per_request_deadline_cuts_a_trickled_command(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with gate_with(tmp_path, backend, timeout=0.4, per_request_deadline=True) as gate:
        c = await gate.connect()
        started = time.monotonic()
        sender = asyncio.ensure_future(trickle(c, b"NOOP " + b"x" * 40 + b"\r\n", 0.05))
        try:
            assert await c.reply() == [TIMEOUT]
        finally:
            sender.cancel()
        assert time.monotonic() - started < 1.5
        assert await c.closed()
        await disconnect_line(gate)
        assert "timeout after CONNECT from unknown[127.0.0.2]" in gate.log


async def test_data_deadline_grows_with_min_data_rate(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    # 1000 bytes every 0.1 s at smtpd_min_data_rate 1000 B/s: each read adds 1 s (capped at
    # smtpd_timeout 0.4 s), so the deadline keeps moving; the whole DATA takes ~1 s > 0.4 s.
    async with gate_with(
        tmp_path, backend, timeout=0.4, per_request_deadline=True, min_data_rate=1000
    ) as gate:
        c = await gate.connect()
        await c.cmd(EHLO)
        await c.cmd(MAIL)
        await c.cmd(RCPT)
        assert (await c.cmd("DATA"))[0].startswith("354")
        for _ in range(10):
            await c.send_raw(b"y" * 998 + b"\r\n")
            await asyncio.sleep(0.1)  # the client's data rate is what is under test
        await c.send_raw(b".\r\n")
        assert (await c.reply())[0].startswith("250 2.0.0 Ok: queued as")
        assert len(backend.messages) == 1


async def test_data_deadline_without_enough_rate_times_out(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with gate_with(
        tmp_path, backend, timeout=0.4, per_request_deadline=True, min_data_rate=10**9
    ) as gate:
        c = await gate.connect()
        await c.cmd(EHLO)
        await c.cmd(MAIL)
        await c.cmd(RCPT)
        assert (await c.cmd("DATA"))[0].startswith("354")

        async def slow() -> None:
            for _ in range(30):
                await c.send_raw(b"z" * 8 + b"\r\n")
                await asyncio.sleep(0.05)  # too slow a client, on purpose: under test

        sender = asyncio.ensure_future(slow())
        try:
            assert await c.reply() == [TIMEOUT]
        finally:
            sender.cancel()
        assert await c.closed()
        await disconnect_line(gate)
        assert "timeout after DATA (" in gate.log
        assert backend.messages == []
        await deliver(gate)


async def test_client_that_reads_nothing_is_dropped(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    # smtpd_timeout covers writes too: replies pile up, the write times out, the session ends.
    async with gate_with(
        tmp_path,
        backend,
        "smtpd_junk_command_limit=10000000",
        in_process=READS_SESSIONS,
        timeout=0.3,
    ) as gate:
        c = await gate.connect()
        await c.cmd(EHLO)
        # Small socket buffers on both sides, so that the replies cannot all be absorbed.
        c.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        (session,) = gate.server.shared.sessions
        server_socket = session.transport.get_extra_info("socket")  # type: ignore[union-attr]
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        c.writer.transport.pause_reading()
        c.writer.write(b"RSET\r\n" * 50_000)  # never reads a reply
        line = await disconnect_line(gate)
        assert "rset=50000" not in line  # dropped while writing, before reading all
        assert not gate.server.shared.sessions
        assert "timeout after RSET from unknown[127.0.0.2]" in gate.log
        c.writer.transport.abort()
        await deliver(gate)


# --------------------------------------------------------------------------- error counts


async def test_hard_error_limit(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(tmp_path, backend, "smtpd_hard_error_limit=3") as gate:
        c = await gate.connect()
        for _ in range(3):
            assert await c.cmd("FOO") == [UNKNOWN]
        # The 421 follows the third error at once, before any further command.
        assert await c.reply() == [TOO_MANY_ERRORS]
        assert await c.closed()
        line = await disconnect_line(gate)
        assert line.endswith("unknown=0/3 commands=0/3")
        assert "too many errors after UNKNOWN from unknown[127.0.0.2]" in gate.log
        await deliver(gate)


async def test_rejected_recipients_count_as_errors(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with gate_with(tmp_path, backend, "smtpd_hard_error_limit=2") as gate:
        c = await gate.connect()
        await c.cmd(EHLO)
        await c.cmd(MAIL)
        denied = "454 4.7.1 <x@other.org>: Relay access denied"
        assert await c.cmd("RCPT TO:<x@other.org>") == [denied]
        assert await c.cmd("RCPT TO:<x@other.org>") == [denied]
        assert await c.reply() == [TOO_MANY_ERRORS]
        assert await c.closed()
        assert (await disconnect_line(gate)).endswith("ehlo=1 mail=1 rcpt=0/2 commands=2/4")
        assert "too many errors after RCPT from" in gate.log


async def test_soft_error_limit_delays_replies(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(tmp_path, backend, "smtpd_soft_error_limit=2", error_sleep=0.3) as gate:
        c = await gate.connect()
        for _ in range(2):
            started = time.monotonic()
            assert await c.cmd("FOO") == [UNKNOWN]
            assert time.monotonic() - started < 0.25
        started = time.monotonic()
        assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]  # every reply is delayed now
        assert time.monotonic() - started >= 0.3
        # A delivered message forgives the errors: no more delay.
        await c.cmd(EHLO)
        await deliver(gate, c)
        started = time.monotonic()
        assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]
        assert time.monotonic() - started < 0.25


async def test_junk_command_limit(tmp_path: Path, backend: RecordingBackend) -> None:
    # junk limit 2: the 4th and later NOOP/RSET/VRFY/ETRN/HELO/EHLO are errors; 2 errors
    # end the session.
    async with gate_with(
        tmp_path, backend, "smtpd_junk_command_limit=2", "smtpd_hard_error_limit=2"
    ) as gate:
        c = await gate.connect()
        for _ in range(5):
            assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]
        assert await c.reply() == [TOO_MANY_ERRORS]
        assert await c.closed()
        assert (await disconnect_line(gate)).endswith("noop=5 commands=5")
        assert "too many errors after NOOP from" in gate.log


async def test_junk_count_restarts_after_a_message(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with gate_with(
        tmp_path, backend, "smtpd_junk_command_limit=2", "smtpd_hard_error_limit=2"
    ) as gate:
        c = await gate.connect()
        for _ in range(3):
            assert await c.cmd("RSET") == ["250 2.0.0 Ok"]
        await c.cmd(EHLO)  # the 4th junk command: one error
        await deliver(gate, c)
        for _ in range(4):
            assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]
        assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]


# --------------------------------------------------------------------------- recipients


async def test_recipient_limit_and_overshoot(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(
        tmp_path,
        backend,
        "smtpd_recipient_limit=2",
        "smtpd_recipient_overshoot_limit=1",
        "smtpd_hard_error_limit=3",
    ) as gate:
        c = await gate.connect()
        await c.cmd(EHLO)
        await c.cmd(MAIL)
        assert await c.cmd("RCPT TO:<a@bar.org>") == ["250 2.1.5 Ok"]
        assert await c.cmd("RCPT TO:<b@bar.org>") == ["250 2.1.5 Ok"]
        too_many = ["452 4.5.3 Error: too many recipients"]
        assert await c.cmd("RCPT TO:<c@bar.org>") == too_many  # overshoot: not an error
        assert await c.cmd("RCPT TO:<d@bar.org>") == too_many  # error 1
        assert await c.cmd("RCPT TO:<e@bar.org>") == too_many  # error 2
        assert (await c.cmd("DATA"))[0].startswith("354")
        await c.send_raw(b"Subject: t\r\n\r\nx\r\n.\r\n")
        assert (await c.reply())[0].startswith("250 2.0.0 Ok: queued as")
        assert backend.messages[0].rcpt_tos == ["a@bar.org", "b@bar.org"]
        await deliver(gate, c)  # the errors were forgiven
        assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
        line = await disconnect_line(gate)
        assert line.endswith("ehlo=1 mail=2 rcpt=4/6 data=2 quit=1 commands=10/12")


# --------------------------------------------------------------------------- connections


def too_many_connections(client: str = "127.0.0.2") -> list[str]:
    return [f"421 4.7.0 mx.example.org Error: too many connections from {client}"]


async def refused(gate: Gate, source: str = "127.0.0.2") -> list[str]:
    c = await LineClient.connect(gate.host, gate.port, source=source)
    gate.clients.append(c)
    reply = await c.reply()
    assert await c.closed()
    return reply


async def test_connection_count_limit(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(
        tmp_path, backend, "smtpd_client_connection_count_limit=2", in_process=READS_ANVIL
    ) as gate:
        first = await gate.connect()
        second = await gate.connect()
        assert await refused(gate) == too_many_connections()
        assert (
            "warning: Connection concurrency limit exceeded: 3 from unknown[127.0.0.2] "
            "for service 127.0.0.1:"
        ) in gate.log
        assert "disconnect from unknown[127.0.0.2] commands=0/0" in gate.log
        # Another address is not affected; the client's own count drops as it leaves.
        await deliver(gate, await gate.connect("127.0.0.3"))
        assert await first.cmd("QUIT") == ["221 2.0.0 Bye"]
        await wait_until(
            lambda: local_anvil(gate).anvil.clients["127.0.0.2"].connections == 1, "disconnect"
        )
        await deliver(gate)
        await second.cmd("QUIT")


async def test_connection_limit_exceptions(tmp_path: Path, backend: RecordingBackend) -> None:
    # smtpd_client_event_limit_exceptions defaults to $mynetworks (127.0.0.1/32 here).
    async with gate_with(
        tmp_path,
        backend,
        "smtpd_client_connection_count_limit=1",
        "smtpd_client_connection_rate_limit=1",
        "smtpgate_connection_limit=2",
        in_process=READS_ANVIL,
    ) as gate:
        held = [await gate.connect("127.0.0.1") for _ in range(3)]
        await deliver(gate, await gate.connect("127.0.0.1"))
        assert "127.0.0.1" not in local_anvil(gate).anvil.clients
        for c in held:
            await c.cmd("QUIT")


async def test_exceptions_list_can_be_emptied(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(
        tmp_path,
        backend,
        "smtpd_client_connection_count_limit=1",
        "smtpd_client_event_limit_exceptions=",
    ) as gate:
        await gate.connect("127.0.0.1")
        assert await refused(gate, "127.0.0.1") == too_many_connections("127.0.0.1")


async def test_global_connection_limit(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(tmp_path, backend, "smtpgate_connection_limit=2") as gate:
        await gate.connect("127.0.0.2")
        await gate.connect("127.0.0.3")
        assert await refused(gate, "127.0.0.4") == too_many_connections("127.0.0.4")
        assert "warning: Connection limit exceeded: 3 (smtpgate_connection_limit)" in gate.log
        await deliver(gate, await gate.connect("127.0.0.1"))  # mynetworks still get in


async def test_connection_rate_limit(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(tmp_path, backend, "smtpd_client_connection_rate_limit=2") as gate:
        for _ in range(2):
            c = await gate.connect()
            assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
        assert await refused(gate) == too_many_connections()
        assert "warning: Connection rate limit exceeded: 3 from unknown[127.0.0.2]" in gate.log
        await deliver(gate, await gate.connect("127.0.0.3"))


async def test_message_rate_limit(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(tmp_path, backend, "smtpd_client_message_rate_limit=1") as gate:
        c = await deliver(gate)
        assert await c.cmd(MAIL) == ["450 4.7.1 Error: too much mail from 127.0.0.2"]
        assert "warning: Message delivery request rate limit exceeded: 2 from" in gate.log
        assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]  # the session goes on
        await deliver(gate, await gate.connect("127.0.0.3"))


async def test_recipient_rate_limit(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(tmp_path, backend, "smtpd_client_recipient_rate_limit=2") as gate:
        c = await gate.connect()
        await c.cmd(EHLO)
        await c.cmd(MAIL)
        assert await c.cmd("RCPT TO:<a@bar.org>") == ["250 2.1.5 Ok"]
        assert await c.cmd("VRFY b@bar.org") == ["252 2.0.0 b@bar.org"]  # VRFY counts too
        limited = ["450 4.7.1 Error: too many recipients from 127.0.0.2"]
        assert await c.cmd("RCPT TO:<c@bar.org>") == limited
        assert "warning: Recipient address rate limit exceeded: 3 from" in gate.log
        assert (await c.cmd("DATA"))[0].startswith("354")
        await c.send_raw(b"Subject: t\r\n\r\nx\r\n.\r\n")
        assert (await c.reply())[0].startswith("250 2.0.0 Ok")
        assert backend.messages[0].rcpt_tos == ["a@bar.org"]


def test_anvil_window_and_pruning() -> None:
    now = [0.0]
    anvil = Anvil(clock=lambda: now[0], max_clients=3)
    assert anvil.connect("a", 60) == (1, 1)
    assert anvil.connect("a", 60) == (2, 2)
    assert anvil.mail("a", 60) == 1
    anvil.disconnect("a")
    now[0] = 61.0  # a new window: the rates start again, the open connection stays
    assert anvil.connect("a", 60) == (2, 1)
    assert anvil.rcpt("b", 60) == 1
    assert anvil.rcpt("c", 60) == 1
    assert anvil.rcpt("d", 60) == 1  # full: the oldest idle client (b) made room
    assert set(anvil.clients) == {"a", "c", "d"}
    now[0] = 200.0
    anvil.prune(60)
    assert set(anvil.clients) == {"a"}  # "a" still has open connections
    anvil.disconnect("a")
    anvil.disconnect("a")
    assert anvil.total == 0


# --------------------------------------------------------------------------- DATA and memory


async def test_long_data_line_relayed_intact(tmp_path: Path, backend: RecordingBackend) -> None:
    line = b"L" * 100_000
    async with gate_with(tmp_path, backend) as gate:
        await deliver(gate, body=line + b"\r\nend")
        stored = backend.messages[0].content
        assert b"\r\n" + line + b"\r\nend" in stored


async def test_oversized_message_is_not_buffered(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(
        tmp_path, backend, "message_size_limit=1000", in_process=READS_BUDGET
    ) as gate:
        c = await gate.connect()
        await c.cmd(EHLO)
        await c.cmd(MAIL)
        await c.cmd(RCPT)
        await c.cmd("DATA")
        await c.send_raw((b"x" * 998 + b"\r\n") * 1000 + b".\r\n")  # 1 MB
        assert await c.reply() == ["552 5.3.4 Message size exceeds fixed limit"]
        budget = local_anvil(gate).budget
        assert budget.peak <= 70_000 and budget.in_flight == 0
        assert backend.messages == []
        await deliver(gate, c)


async def test_memory_budget_refuses_new_data(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(
        tmp_path, backend, "smtpgate_data_memory_limit=3000", in_process=READS_BUDGET
    ) as gate:
        budget = local_anvil(gate).budget
        first = await gate.connect()
        await first.cmd(EHLO)
        await first.cmd(MAIL)
        await first.cmd(RCPT)
        assert (await first.cmd("DATA"))[0].startswith("354")
        await first.send_raw(b"a" * 2998 + b"\r\n")  # fills the budget; no dot yet
        await wait_until(lambda: budget.in_flight == 3000, "the first message in memory")
        second = await gate.connect("127.0.0.3")
        await second.cmd(EHLO)
        await second.cmd(MAIL)
        await second.cmd(RCPT)
        assert await second.cmd("DATA") == ["451 4.3.1 Insufficient system resources"]
        assert "smtpgate_data_memory_limit reached" in gate.log
        await first.send_raw(b".\r\n")
        assert (await first.reply())[0].startswith("250 2.0.0 Ok: queued as")
        assert budget.in_flight == 0
        assert (await second.cmd("DATA"))[0].startswith("354")  # room again
        await second.send_raw(b"Subject: t\r\n\r\nx\r\n.\r\n")
        assert (await second.reply())[0].startswith("250 2.0.0 Ok")
        assert len(backend.messages) == 2


async def test_memory_budget_overrun_mid_data(tmp_path: Path, backend: RecordingBackend) -> None:
    async with gate_with(
        tmp_path, backend, "smtpgate_data_memory_limit=3000", in_process=READS_BUDGET
    ) as gate:
        c = await gate.connect()
        await c.cmd(EHLO)
        await c.cmd(MAIL)
        await c.cmd(RCPT)
        await c.cmd("DATA")
        await c.send_raw((b"b" * 98 + b"\r\n") * 100 + b".\r\n")  # 10 kB > 3000
        assert await c.reply() == ["451 4.3.1 Insufficient system resources"]
        assert local_anvil(gate).budget.in_flight == 0
        assert backend.messages == []
        await deliver(gate, c)


def test_data_budget() -> None:
    budget = DataBudget()
    assert budget.take(600, 1000) and not budget.full(1000)
    assert not budget.take(500, 1000)
    assert budget.full(1000, reserve=500) and not budget.full(1000, reserve=400)
    assert budget.take(400, 1000) and budget.full(1000)
    budget.give_back(1000)
    assert budget.in_flight == 0 and budget.peak == 1000
    assert budget.take(10**12, 0)  # 0: no limit


# --------------------------------------------------------------------------- forbidden commands


@pytest.mark.parametrize(
    ("overrides", "line", "forbidden"),
    [
        ((), "GET / HTTP/1.0", True),
        ((), "1x", True),
        (("smtpd_forbidden_commands=CONNECT GET POST FOOBAR",), "foobar x", True),
        (("smtpd_forbidden_commands=CONNECT GET POST FOOBAR",), "1x", False),
        (("smtpd_forbidden_commands=",), "GET / HTTP/1.0", False),
        (("smtpd_forbidden_commands=",), "Subject: hi", True),  # header-like: always
        (("smtpd_forbidden_commands=inline:{xyzzy=x}",), "XYZZY", True),
    ],
)
async def test_forbidden_commands(
    tmp_path: Path,
    backend: RecordingBackend,
    overrides: tuple[str, ...],
    line: str,
    forbidden: bool,
) -> None:
    async with gate_with(tmp_path, backend, *overrides) as gate:
        c = await gate.connect()
        reply = await c.cmd(line)
        if forbidden:
            assert reply == ["221 2.7.0 Error: I can break rules, too. Goodbye."]
            assert await c.closed()
            assert f"warning: non-SMTP command from unknown[127.0.0.2]: {line}" in gate.log
        else:
            assert reply == [UNKNOWN]
            await deliver(gate, c)
