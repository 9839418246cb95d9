"""PA01-PA21: protocol abuse (reliability.md section 8).

Replies are Postfix 3.7's where smtpgate already matches it (tests/differential checks them
against a real Postfix); the pipelining and error-counting cases follow the issue 5 spec
(Postfix 3.9 smtpd_forbid_unauth_pipelining, smtpd_hard_error_limit,
smtpd_junk_command_limit) and are expected to fail until that work lands.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile.conftest import Env, body, code, open_env, read_until_closed

SYNC = "554 5.5.0 Error: SMTP protocol synchronization"
FORBIDDEN = "221 2.7.0 Error: I can break rules, too. Goodbye."
UNKNOWN = "500 5.5.2 Error: command not recognized"
TOO_MANY_ERRORS = "421 4.7.0 mx.example.org Error: too many errors"
QUICK_ERRORS = ("smtpd_error_sleep_time=0", "smtpd_soft_error_limit=100")


async def sync_violation(env: Env, *writes: bytes, ehlo: bool | None = True) -> None:
    """Send *writes* (the last one pipelined); expect 554 5.5.0, a close, nothing stored."""
    c = await env.connect()
    if ehlo is not None:
        assert code(await env.cmd(c, "EHLO x.example" if ehlo else "HELO x.example")) == 250
    for data in writes:
        await c.send_raw(data)
    lines, closed = await read_until_closed(c, deadline=1.5)
    assert SYNC in lines, lines
    assert closed
    assert env.backend.messages == []


async def test_pa01_early_talker(tmp_path: Path) -> None:
    async with open_env(tmp_path, overrides=("smtpgate_greet_pause=1s",)) as env:
        c = await env.connect(greet=False)
        await c.send_raw(b"EHLO early.example\r\n")
        lines, closed = await read_until_closed(c, deadline=1.5)
        assert lines == [SYNC] and closed  # no 220 at all
        await env.finish()


async def test_pa02_pipelining_without_ehlo(env: Env) -> None:
    group = b"MAIL FROM:<a@ext.example>\r\nRCPT TO:<u@our.example>\r\nDATA\r\n"
    await sync_violation(env, group, ehlo=False)
    await env.finish()


async def test_pa03_command_after_ehlo_in_one_write(env: Env) -> None:
    await sync_violation(env, b"EHLO x.example\r\nMAIL FROM:<a@ext.example>\r\n", ehlo=None)
    await env.finish()


async def test_pa04_content_pipelined_with_data(env: Env) -> None:
    group = (
        b"MAIL FROM:<a@ext.example>\r\nRCPT TO:<u@our.example>\r\nDATA\r\n"
        + body("pa04")
        + b".\r\n"
    )
    await sync_violation(env, group)
    await env.finish()


async def test_pa05_sequence_errors(env: Env) -> None:
    c = await env.session()
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["503 5.5.1 Error: need MAIL command"]
    assert await env.cmd(c, "DATA") == ["503 5.5.1 Error: need RCPT command"]
    assert await env.cmd(c, "MAIL FROM:<a@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "MAIL FROM:<b@ext.example>") == ["503 5.5.1 Error: nested MAIL command"]
    assert await env.cmd(c, "DATA") == ["554 5.5.1 Error: no valid recipients"]
    assert await env.cmd(c, "NOOP") == ["250 2.0.0 Ok"]
    assert env.backend.connections == []
    await env.finish()


async def test_pa06_unknown_commands_are_answered_one_by_one(env: Env) -> None:
    c = await env.session()
    for i in range(5):
        assert await env.cmd(c, f"XYZZY{i}") == [UNKNOWN]
    assert await env.cmd(c, "NOOP") == ["250 2.0.0 Ok"]
    await env.finish()


async def test_pa07_unknown_command_flood_hits_the_hard_error_limit(tmp_path: Path) -> None:
    async with open_env(tmp_path, overrides=QUICK_ERRORS) as env:
        c = await env.session()
        await c.send_raw(b"".join(b"XYZZY\r\n" for _ in range(25)))
        lines, closed = await read_until_closed(c)
        assert lines[:20] == [UNKNOWN] * 20
        assert lines[20:] == [TOO_MANY_ERRORS], lines
        assert closed
        await env.finish()


async def test_pa08_junk_command_flood(tmp_path: Path) -> None:
    overrides = (*QUICK_ERRORS, "smtpd_junk_command_limit=5", "smtpd_hard_error_limit=3")
    async with open_env(tmp_path, overrides=overrides) as env:
        c = await env.session()
        for _ in range(30):
            reply = await env.cmd(c, "NOOP")
            if code(reply) != 250:
                break
        assert reply == [TOO_MANY_ERRORS]
        assert await c.closed()
        await env.finish()


@pytest.mark.parametrize(
    "line",
    ["GET / HTTP/1.1", "POST /cgi-bin/x HTTP/1.0", "CONNECT 10.0.0.1:25 HTTP/1.0", "Subject: hi"],
    ids=["pa09-get", "pa10-post", "pa11-connect", "pa12-header-label"],
)
async def test_pa09_pa12_cross_protocol_lines_close(env: Env, line: str) -> None:
    c = await env.connect()
    assert await env.cmd(c, line) == [FORBIDDEN]
    assert await c.closed()
    assert env.backend.connections == []
    await env.finish()


async def test_pa13_forbidden_command_mid_transaction_aborts_it(env: Env) -> None:
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<a@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    assert await env.cmd(c, "POST / HTTP/1.0") == [FORBIDDEN]
    assert await c.closed()
    assert env.backend.messages == []
    await env.finish()


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"NOOP\x00MAIL FROM:<a@ext.example>\r\n", "250 2.0.0 Ok"),
        (b"NO\x00OP\r\n", UNKNOWN),
        (b"NOOP \xff\xfe\r\n", "500 5.5.2 Error: bad UTF-8 syntax"),
        (b"MAIL FROM:<\xc0\xaf@ext.example>\r\n", "500 5.5.2 Error: bad UTF-8 syntax"),
        (b"HELO bare-lf.example\n", "250 mx.example.org"),
        (b"NOOP\rRSET\r\n", "250 2.0.0 Ok"),
        (b"NOOP\r\r\r\n", "250 2.0.0 Ok"),
    ],
    ids=[
        "pa14-nul",
        "pa14-nul-verb",
        "pa15-8bit",
        "pa15-overlong-utf8",
        "pa16-bare-lf",
        "pa17-bare-cr",
        "pa17-cr-run",
    ],
)
async def test_pa14_pa17_odd_bytes_in_commands(env: Env, data: bytes, reply: str) -> None:
    c = await env.connect()
    await c.send_raw(data)
    assert await env.reply(c) == [reply]
    assert await env.cmd(c, "NOOP") == ["250 2.0.0 Ok"], "exactly one reply, session usable"
    assert env.backend.connections == []
    await env.finish()


async def test_pa16_bare_lf_command_rejected_when_configured(tmp_path: Path) -> None:
    async with open_env(tmp_path, overrides=("smtpd_forbid_bare_newline=reject",)) as env:
        c = await env.connect()
        await c.send_raw(b"EHLO x.example\n")
        # Postfix 3.7: the host in the text, and the connection closes
        assert await env.reply(c) == ["550 5.5.2 mx.example.org Error: bare <LF> received"]
        assert await c.closed()
        await env.finish()


async def test_pa18_vrfy_follows_the_relay_rules(env: Env) -> None:
    c = await env.session()
    assert await env.cmd(c, "VRFY <relaytest@ext.example>") == [
        "454 4.7.1 <relaytest@ext.example>: Relay access denied"
    ]
    assert await env.cmd(c, "VRFY u@our.example") == ["252 2.0.0 u@our.example"]
    assert env.backend.connections == []
    await env.finish()


async def test_pa19_expn_and_auth_not_offered(env: Env) -> None:
    c = await env.session()
    ehlo = await env.cmd(c, "EHLO x.example")
    assert not any("AUTH" in line for line in ehlo), ehlo
    assert await env.cmd(c, "EXPN staff") == [UNKNOWN]
    assert await env.cmd(c, "AUTH PLAIN AGEAYg==") == [
        "503 5.5.1 Error: authentication not enabled"
    ]
    assert await env.cmd(c, "AUTH LOGIN") == ["503 5.5.1 Error: authentication not enabled"]
    await env.finish()


async def test_pa20_blocked_sender_gets_521_and_disconnect(tmp_path: Path) -> None:
    extra = (
        "smtpd_sender_restrictions = "
        "check_sender_access inline:{ {blocked.example = 521 go away} }\n"
    )
    async with open_env(tmp_path, extra) as env:
        c = await env.session()
        assert await env.cmd(c, "MAIL FROM:<x@blocked.example>") == ["250 2.1.0 Ok"]
        assert await env.cmd(c, "RCPT TO:<u@our.example>") == [
            "521 5.7.1 <x@blocked.example>: Sender address rejected: go away"
        ]
        assert await c.closed()
        assert env.backend.connections == []
        await env.finish()


async def test_pa21_quit_mid_transaction(env: Env) -> None:
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<a@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    assert await env.cmd(c, "QUIT") == ["221 2.0.0 Bye"]
    assert await c.closed()
    await env.backend.wait_for(
        lambda: (
            "RSET" in env.backend.connections[0].commands[-1] or env.backend.connections[0].closed
        )
    )
    assert env.backend.messages == []
    assert not any(cmd.startswith("DATA") for cmd in env.backend.connections[0].commands)
    await env.finish()
