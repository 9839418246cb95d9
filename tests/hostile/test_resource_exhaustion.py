"""X01-X15: resource exhaustion, bounded (<= 1.1 MiB payloads, <= 200 connections, short
timeouts via overrides), with Postfix's limit names and replies (issue 5 items 1 and 4)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.hostile.conftest import GO_AHEAD, Env, body, code, open_env, read_until_closed
from tests.serve.client import LineClient

TIMEOUT_421 = "421 4.4.2 mx.example.org Error: timeout exceeded"
TOO_MANY_ERRORS = "421 4.7.0 mx.example.org Error: too many errors"
SHORT = ("smtpd_timeout=1s",)


async def test_x01_recipient_limit(tmp_path: Path) -> None:
    async with open_env(tmp_path, overrides=("smtpd_recipient_limit=20",)) as env:
        c = await env.session()
        assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
        await c.send_raw(b"".join(b"RCPT TO:<u%d@our.example>\r\n" % i for i in range(21)))
        replies = [await env.reply(c) for _ in range(21)]
        assert replies[:20] == [["250 2.1.5 Ok"]] * 20
        assert replies[20] == ["452 4.5.3 Error: too many recipients"]
        assert await env.cmd(c, "DATA") == GO_AHEAD
        await c.send_raw(body("x01") + b".\r\n")
        assert code(await env.reply(c)) == 250
        assert len(env.stored("x01")[0].rcpt_tos) == 20
        await env.finish()


async def test_x02_connection_count_limit(tmp_path: Path) -> None:
    overrides = ("smtpd_client_connection_count_limit=5",)  # for the whole server
    async with open_env(tmp_path, overrides=overrides) as env:
        clients = [await env.connect() for _ in range(5)]
        extra = await LineClient.connect(env.gate.host, env.gate.port, source="127.0.0.2")
        env.gate.clients.append(extra)
        assert await extra.reply() == [
            "421 4.7.0 mx.example.org Error: too many connections from 127.0.0.2"
        ]
        assert await extra.closed()
        await clients[0].close()
        await env.finish()


async def test_x03_idle_client_gets_421(tmp_path: Path) -> None:
    async with open_env(tmp_path, overrides=SHORT) as env:
        c = await env.session()
        started = time.monotonic()
        lines, closed = await read_until_closed(c)
        assert lines == [TIMEOUT_421] and closed
        assert time.monotonic() - started < 2.5
        await env.finish()


async def test_x04_slowloris_command(tmp_path: Path) -> None:
    async with open_env(tmp_path, overrides=SHORT) as env:
        c = await env.session()
        started = time.monotonic()
        for byte in b"NOOP":  # one byte every 0.3 s: the command is not complete after 1 s
            await c.send_raw(bytes([byte]))
            await asyncio.sleep(0.3)  # the slow client under test, not synchronisation
        lines, closed = await read_until_closed(c)
        assert time.monotonic() - started < 2.5
        assert lines == [TIMEOUT_421] and closed
        await env.finish()


async def test_x05_slow_data_is_cut_by_the_request_deadline(tmp_path: Path) -> None:
    overrides = (*SHORT, "smtpd_per_request_deadline=yes", "smtpd_min_data_rate=500")
    async with open_env(tmp_path, overrides=overrides) as env:
        c = await env.session()
        assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
        assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
        assert await env.cmd(c, "DATA") == GO_AHEAD
        started = time.monotonic()
        reply = asyncio.ensure_future(read_until_closed(c, deadline=4))
        for _ in range(15):  # stop writing once the server spoke: a write after its close
            if reply.done() or c.reader._buffer:  # type: ignore[attr-defined]
                break  # would be answered with RST, which discards the unread 421
            await c.send_raw(b"x")
            await asyncio.sleep(0.2)  # a data rate below smtpd_min_data_rate: under test
        lines, closed = await reply
        assert lines == [TIMEOUT_421] and closed
        assert time.monotonic() - started < 4
        assert env.backend.messages == []
        await env.finish()


async def test_x06_oversize_message(tmp_path: Path) -> None:
    async with open_env(tmp_path, overrides=("message_size_limit=2000",)) as env:
        c = await env.session()
        final = await env.transaction(c, body("x06", b"y" * 70 + b"\r\n") * 80)
        assert final == ["552 5.3.4 Message size exceeds fixed limit"]
        assert env.backend.messages == []
        # The backend was in DATA (sent with the client's DATA): closed, never a dot.
        await env.backend.wait_for(lambda: env.backend.connections[0].closed)
        assert env.backend.connections[0].commands[-1] == "DATA"
        assert await env.cmd(c, "NOOP") == ["250 2.0.0 Ok"]
        await env.finish()


async def test_x07_long_lines_are_relayed_intact(env: Env) -> None:
    long_line = b"L" * 5000 + b"\r\n"
    megaline = b"M" * (1024 * 1024) + b"\r\n"
    c = await env.session()
    final = await env.transaction(c, body("x07", long_line + megaline))
    assert final[0].startswith("250 "), final
    [stored] = env.stored("x07")
    assert stored.content.endswith(long_line + megaline)
    await env.finish()


async def test_x08_a_mebibyte_without_newline_as_a_command(env: Env) -> None:
    c = await env.session()
    await c.send_raw(b"A" * (1024 * 1024))
    await c.send_raw(b"\r\n")
    assert await env.reply(c) == ["500 5.5.2 Error: command not recognized"]
    assert await env.cmd(c, "NOOP") == ["250 2.0.0 Ok"]
    await env.finish()


async def test_x09_a_mebibyte_of_data_without_the_dot_then_close(env: Env) -> None:
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    assert await env.cmd(c, "DATA") == GO_AHEAD
    await c.send_raw(b"z" * (1024 * 1024))
    await c.close()
    # The backend got DATA with the client's DATA and is closed without a dot.
    await env.backend.wait_for(lambda: env.backend.connections[0].closed)
    assert env.backend.connections[0].commands[-1] == "DATA"
    assert env.backend.messages == []
    await env.finish()


async def test_x10_rejected_recipients_count_as_errors(tmp_path: Path) -> None:
    overrides = ("smtpd_error_sleep_time=0", "smtpd_soft_error_limit=100")
    async with open_env(tmp_path, overrides=overrides) as env:
        c = await env.session()
        assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
        for i in range(25):
            reply = await env.cmd(c, f"RCPT TO:<r{i}@ext.example>")
            if code(reply) == 421:
                break
        assert reply == [TOO_MANY_ERRORS]
        assert i == 20
        assert await c.closed()
        await env.finish()


async def test_x11_many_transactions_in_one_connection(env: Env) -> None:
    c = await env.session()
    for i in range(110):
        assert await env.cmd(c, f"MAIL FROM:<s{i}@ext.example>") == ["250 2.1.0 Ok"]
        assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
        assert await env.cmd(c, "RSET") == ["250 2.0.0 Ok"]
    final = await env.transaction(c, body("x11"))
    assert final[0].startswith("250 ")
    assert len(env.backend.messages) == 1
    await env.finish()


async def test_x12_connect_burst(env: Env) -> None:
    """160 simultaneous connections from four addresses: every one greeted, then QUIT."""

    async def one(source: str) -> list[str]:
        c = await env.connect(source, greet=False)
        greeting = await c.reply()
        bye = await c.cmd("QUIT")
        await c.close()
        return greeting + bye

    sources = [f"127.0.0.{n}" for n in (2, 3, 4, 5) for _ in range(40)]
    results = await asyncio.gather(*(one(s) for s in sources))
    assert all(r[0].startswith("220 mx.example.org") and r[-1] == "221 2.0.0 Bye" for r in results)
    await env.finish()


async def test_x13_non_reading_client_does_not_stop_the_server(tmp_path: Path) -> None:
    async with open_env(tmp_path, overrides=SHORT) as env:
        c = await env.session()
        c.writer.write(b"RSET\r\n" * 180_000)  # ~1 MiB of commands, replies never read
        assert await c.reply() == ["250 2.0.0 Ok"]  # the server is working through them
        await env.c01()
        await env.finish()


async def test_x13b_non_reading_client_is_dropped_after_smtpd_timeout(tmp_path: Path) -> None:
    # Junk and error limits out of the way, so that only the write timeout can end it.
    overrides = (*SHORT, "smtpd_junk_command_limit=10000000", "smtpd_error_sleep_time=0")
    async with open_env(
        tmp_path, overrides=overrides, in_process="watches the server's session set"
    ) as env:
        c = await env.session()
        c.writer.write(b"RSET\r\n" * 180_000)
        sessions = env.gate.server.shared.sessions
        assert await c.reply() == ["250 2.0.0 Ok"]  # the server is working through them
        assert len(sessions) == 1
        # smtpd_timeout covers writes too: the server answers until the client's socket
        # buffers are full (how long that takes depends on the kernel's buffer tuning, 2-4 s
        # here), then gives up on the write after 1 s. The bound only says "not forever".
        async with asyncio.timeout(10):
            while sessions:
                await asyncio.sleep(0.1)  # poll interval of a bounded wait for a condition
        await env.finish()


async def test_x14_ehlo_flood(env: Env) -> None:
    """EHLO is a junk command (Postfix SMTPD_CMD_FLAG_LIMIT): 100 are fine, then each one
    counts as an error, and the 20th error ends the session. No limit grows on the way."""
    c = await env.connect()
    for _ in range(90):
        assert (await env.cmd(c, "EHLO x.example"))[0] == "250-mx.example.org"
    long_sender = "a" * 900 + "@ext.example"
    assert await env.cmd(c, f"MAIL FROM:<{long_sender}>") == ["250 2.1.0 Ok"]
    sent = 90
    while sent < 300:
        reply = await env.cmd(c, "EHLO x.example")
        sent += 1
        if code(reply) != 250:
            break
    assert reply == [TOO_MANY_ERRORS] and 100 < sent < 140, (sent, reply)
    assert await c.closed()
    await env.finish()


async def test_x15_data_memory_budget(tmp_path: Path) -> None:
    # One budget for every session (across workers: tests/test_deployment.py). In process,
    # so that the test can wait for the first message to be held instead of sleeping.
    overrides = ("smtpgate_data_memory_limit=100000",)
    reason = "waits until the data budget holds the first message"
    async with open_env(tmp_path, overrides=overrides, in_process=reason) as env:
        budget = env.gate.server.shared.anvil.budget
        first, second = await env.session(), await env.session("127.0.0.3")
        for c in (first, second):
            assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
            assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
        assert await env.cmd(first, "DATA") == GO_AHEAD
        await first.send_raw(b"x" * 99_000)
        async with asyncio.timeout(5):
            while budget.in_flight < 99_000:
                await asyncio.sleep(0.01)  # poll interval of a bounded wait for a condition
        assert await env.cmd(second, "DATA") == ["451 4.3.1 Insufficient system resources"]
        await first.send_raw(b"\r\n.\r\n")
        assert code(await env.reply(first)) == 250
        await env.finish()
