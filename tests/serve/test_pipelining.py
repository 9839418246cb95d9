"""RFC 2920 command synchronisation: Postfix 3.9's smtpd_forbid_unauth_pipelining rules.

A client may send commands ahead of the replies only after EHLO, and only up to a command
that ends a group (HELO, EHLO, DATA, NOOP, VRFY: smtpd.c's SMTPD_CMD_FLAG_LAST); input
before the greeting counts too. Otherwise: ``554 5.5.0 Error: SMTP protocol
synchronization``, the command is not executed, the connection closes, and the log has
``improper command pipelining after CMD from name[addr]: <what was pending>``. The same
sessions run against a real Postfix in tests/differential (the ``sync/`` scripts).
"""

from __future__ import annotations

import asyncio
import re
import select
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, running_gate
from tests.serve.test_limits import EHLO, MAIN_CF, deliver, disconnect_line

SYNC = ["554 5.5.0 Error: SMTP protocol synchronization"]


@pytest.fixture
async def gate(tmp_path: Path, backend: RecordingBackend) -> AsyncIterator[Gate]:
    async with running_gate(tmp_path, MAIN_CF, backend) as g:
        yield g


async def refused_group(gate: Gate, *before: str, group: bytes, replies: int = 0) -> LineClient:
    """Send ``before`` one by one, then ``group`` in one write: ``replies`` replies, then 554."""
    c = await gate.connect()
    for line in before:
        assert (await c.cmd(line))[-1][0] in "23"
    await c.send_raw(group)
    for _ in range(replies):
        assert (await c.reply())[0][0] in "23"
    assert await c.reply() == SYNC
    assert await c.closed()
    return c


@pytest.mark.parametrize(
    ("before", "group", "after", "pending"),
    [
        ((), b"HELO a.example\r\nNOOP\r\n", "HELO", "NOOP\\r\\n"),
        ((), b"EHLO a.example\r\nNOOP\r\n", "EHLO", "NOOP\\r\\n"),
        ((), b"RSET\r\nNOOP\r\n", "RSET", "NOOP\\r\\n"),  # before EHLO: any command
        (("HELO a.example",), b"MAIL FROM:<a@example.net>\r\nNOOP\r\n", "MAIL", "NOOP\\r\\n"),
        ((EHLO,), b"NOOP\r\nNOOP\r\n", "NOOP", "NOOP\\r\\n"),
        ((EHLO,), b"VRFY bob@bar.org\r\nQUIT\r\n", "VRFY", "QUIT\\r\\n"),
        ((EHLO,), b"EHLO again.example\r\nQUIT\r\n", "EHLO", "QUIT\\r\\n"),
    ],
)
async def test_unauthorised_pipelining(
    gate: Gate, before: tuple[str, ...], group: bytes, after: str, pending: str
) -> None:
    await refused_group(gate, *before, group=group)
    line = await disconnect_line(gate)
    # The command was counted, and not executed: NAME=ok/total with one failure.
    m = re.search(rf" {after.lower()}=(\d+)/(\d+) ", line)
    assert m is not None, line
    assert int(m[2]) == int(m[1]) + 1
    assert (
        f"improper command pipelining after {after} from unknown[127.0.0.2]: {pending}"
    ) in gate.log
    await deliver(gate)


async def test_data_must_end_the_group(gate: Gate, backend: RecordingBackend) -> None:
    group = (
        b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<bob@bar.org>\r\nDATA\r\n"
        b"Subject: early\r\n\r\nbody\r\n.\r\n"
    )
    await refused_group(gate, EHLO, group=group, replies=2)
    assert backend.messages == []
    line = await disconnect_line(gate)
    assert line.endswith("ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4")
    assert "improper command pipelining after DATA from unknown[127.0.0.2]: Subject: early" in (
        gate.log
    )
    await deliver(gate)


async def test_escaped_pending_input_is_cut_at_100_bytes(gate: Gate) -> None:
    await refused_group(gate, group=b"HELO a\r\n\x01\xff" + b"y" * 200)
    line = next(x for x in gate.log.splitlines() if "improper command pipelining" in x)
    assert line.endswith(": \\001\\377" + "y" * 98)


async def test_talking_before_the_greeting(tmp_path: Path, backend: RecordingBackend) -> None:
    # smtpgate_greet_pause: the server waits up to 5 s for input before greeting; this
    # client talks at once, so the wait ends at once.
    async with running_gate(
        tmp_path, MAIN_CF, backend, overrides=("smtpgate_greet_pause=5s",)
    ) as gate:
        c = await LineClient.connect(gate.host, gate.port, source="127.0.0.2")
        gate.clients.append(c)
        await c.send_raw(b"EHLO early.example\r\n")
        assert await c.reply() == SYNC  # no 220 at all
        assert await c.closed()
        assert (await disconnect_line(gate)).endswith("commands=0/0")
        assert (
            "improper command pipelining after CONNECT from unknown[127.0.0.2]: "
            "EHLO early.example\\r\\n"
        ) in gate.log
        await deliver(gate)  # a polite client waits for the greeting and is served


async def test_unread_input_is_seen_before_the_loop_reads_it(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    """Before the greeting (without a greet pause) the server peeks at the socket, as
    Postfix does: bytes the event loop has not read yet count as early input."""
    reason = "pauses the session's transport to look at its socket"
    async with running_gate(tmp_path, MAIN_CF, backend, in_process=reason) as gate:
        c = await gate.connect()
        (session,) = gate.server.shared.sessions
        assert session.transport is not None
        session.transport.pause_reading()
        assert not session._unread_input()
        await c.send_raw(b"NOOP\r\n")
        fd = session.transport.get_extra_info("socket").fileno()
        readable, _, _ = await asyncio.to_thread(select.select, [fd], [], [], 5.0)
        assert readable and session._unread_input()
        session.transport.resume_reading()
        assert await c.reply() == ["250 2.0.0 Ok"]


async def test_allowed_groups(gate: Gate, backend: RecordingBackend) -> None:
    """After EHLO: RSET, MAIL, RCPT, QUIT, unknown commands and the message may be followed."""
    c = await gate.connect()
    await c.cmd(EHLO)
    await c.send_raw(b"RSET\r\nFOO\r\nNOOP\r\n")
    assert [(await c.reply())[0] for _ in range(3)] == [
        "250 2.0.0 Ok",
        "500 5.5.2 Error: command not recognized",
        "250 2.0.0 Ok",
    ]
    rcpts = b"".join(b"RCPT TO:<r%d@bar.org>\r\n" % i for i in range(50))
    await c.send_raw(b"MAIL FROM:<sender@example.net>\r\n" + rcpts + b"DATA\r\n")
    replies = [(await c.reply())[0] for _ in range(52)]
    assert replies[:51] == ["250 2.1.0 Ok"] + ["250 2.1.5 Ok"] * 50
    assert replies[51].startswith("354 ")
    await c.send_raw(b"Subject: t\r\n\r\nhi\r\n.\r\nQUIT\r\nNOOP\r\n")
    assert (await c.reply())[0].startswith("250 2.0.0 Ok: queued as")
    assert await c.reply() == ["221 2.0.0 Bye"]
    assert await c.closed()
    assert len(backend.messages[0].rcpt_tos) == 50
    assert "improper command pipelining" not in gate.log


async def test_pipelined_transactions_back_to_back(gate: Gate, backend: RecordingBackend) -> None:
    """Full-speed pipelining: each write ends one message and starts the next."""
    c = await gate.connect()
    await c.cmd(EHLO)
    envelope = b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<bob@bar.org>\r\nDATA\r\n"
    await c.send_raw(envelope)
    count = 20
    for i in range(count):
        assert (await c.reply())[0] == "250 2.1.0 Ok"
        assert (await c.reply())[0] == "250 2.1.5 Ok"
        assert (await c.reply())[0].startswith("354 ")
        body = b"Subject: %d\r\n\r\nmessage %d\r\n.\r\n" % (i, i)
        await c.send_raw(body + (envelope if i + 1 < count else b"QUIT\r\n"))
        assert (await c.reply())[0].startswith("250 2.0.0 Ok: queued as")
    assert await c.reply() == ["221 2.0.0 Bye"]
    assert len(backend.messages) == count
    assert "improper command pipelining" not in gate.log


async def test_pipelining_allowed_when_not_forbidden(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    """smtpd_forbid_unauth_pipelining = no (Postfix 3.7's default): logged once, served."""
    async with running_gate(
        tmp_path, MAIN_CF, backend, overrides=("smtpd_forbid_unauth_pipelining=no",)
    ) as gate:
        c = await gate.connect()
        await c.send_raw(b"HELO a.example\r\nNOOP\r\nNOOP\r\n")
        assert [(await c.reply())[0] for _ in range(3)] == [
            "250 mx.example.org",
            "250 2.0.0 Ok",
            "250 2.0.0 Ok",
        ]
        await deliver(gate, c)
        await c.cmd("QUIT")
        await disconnect_line(gate)
        assert gate.log.count("improper command pipelining after HELO from") == 1


async def test_reject_unauth_pipelining_still_works(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    """The restriction sees pending input when the parameter lets the command run."""
    main_cf = MAIN_CF + "smtpd_data_restrictions = reject_unauth_pipelining\n"
    async with running_gate(
        tmp_path, main_cf, backend, overrides=("smtpd_forbid_unauth_pipelining=no",)
    ) as gate:
        c = await gate.connect()
        await c.cmd(EHLO)
        await c.send_raw(
            b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<bob@bar.org>\r\nDATA\r\nSubject: x\r\n"
        )
        replies = [(await c.reply())[0] for _ in range(3)]
        assert replies[2] == (
            "503 5.5.0 <DATA>: Data command rejected: Improper use of SMTP command pipelining"
        )
        await asyncio.wait_for(c.close(), 5)
