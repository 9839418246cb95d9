"""M01-M16: malformed envelope addresses and parameters.

Expected replies were read off Postfix 3.7 with the same main.cf (from 127.0.0.2). Where
smtpgate accepts, the backend must receive an address without control characters.
"""

from __future__ import annotations

import re

import pytest

from tests.hostile.conftest import Env

BAD_RCPT = "501 5.1.3 Bad recipient address syntax"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
OK_RCPT = "250 2.1.5 Ok"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

RCPT_CASES = [
    # CR is white space to the address tokenizer (as in Postfix): u@our.example, 250
    pytest.param(b"<u\r@our.example>", OK_RCPT, id="m01-bare-cr"),
    pytest.param(b"<u@our.example\x00.evil.example>", BAD_RCPT, id="m02-nul"),
    pytest.param(b"<u@our.example", BAD_RCPT, id="m03-unterminated"),
    pytest.param(b"<<u@our.example>", BAD_RCPT, id="m03-double-open"),
    pytest.param(b"<u(comment)@our.example>", OK_RCPT, id="m04-comment"),
    pytest.param(b"<" + b"a" * 65 + b"@our.example>", OK_RCPT, id="m05-long-local-part"),
    pytest.param(
        b"<u@" + b"a" * 300 + b".our.example>",
        BAD_RCPT,
        id="m06-long-label",
    ),
    pytest.param(b"<u@[IPv6:::1::]>", BAD_RCPT, id="m07-bad-ipv6-literal"),
    pytest.param(b"<u@[999.1.1.1]>", BAD_RCPT, id="m08-bad-ipv4-literal"),
    pytest.param(b"<u@our..example>", BAD_RCPT, id="m09-empty-label"),
    pytest.param("<ü@our.example>".encode(), OK_RCPT, id="m10-utf8-without-smtputf8"),
    pytest.param(b"<u@@our.example>", "454 4.7.1 <u@@our.example>: Relay access denied", id="m11"),
    pytest.param(b"<u x@our.example>", BAD_RCPT, id="m12-space"),
    pytest.param(b"<>", BAD_RCPT, id="m13-empty"),
    pytest.param(b"<u\x1b@our.example>", BAD_RCPT, id="m14-escape"),
    pytest.param(b"<u@our.example> FOO=bar", "555 5.5.4 Unsupported option: FOO=bar", id="m15"),
]


@pytest.mark.parametrize(("arg", "reply"), RCPT_CASES)
async def test_malformed_recipients(env: Env, arg: bytes, reply: str) -> None:
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
    await c.send_raw(b"RCPT TO:" + arg + b"\r\n")
    assert await env.reply(c) == [reply]
    assert await env.cmd(c, "NOOP") == ["250 2.0.0 Ok"]
    for connection in env.backend.connections:
        for command in connection.commands:
            assert not CONTROL.search(command), command
    if reply != OK_RCPT:
        assert not any(
            x.startswith("RCPT") for conn in env.backend.connections for x in conn.commands
        )
    assert await env.cmd(c, "RSET") == ["250 2.0.0 Ok"]
    await env.finish()


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<a@ext.example> SIZE=abc", "501 5.5.4 Bad message size syntax"),
        (
            b"MAIL FROM:<a@ext.example> SIZE=99999999999999999999",
            "552 5.3.4 Message size exceeds file system imposed limit",
        ),
        (b"MAIL FROM:<a@ext.example> SIZE=20000000", "552 5.3.4 Message size exceeds fixed limit"),
        (b"MAIL FROM:<a@ext.example", BAD_SENDER),
        (b"MAIL FROM:<a\x00b@ext.example>", BAD_SENDER),
        (b"MAIL FROM:<a@ext.example> BODY=9BIT", "555 5.5.4 Unsupported option: BODY=9BIT"),
        (b"MAIL FROM:a b@ext.example", "555 5.5.4 Unsupported option: b@ext.example"),
    ],
    ids=[
        "m16-size-syntax",
        "m16-size-huge",
        "m16-size-limit",
        "m16-open",
        "m16-nul",
        "m16-body",
        "m16-space",
    ],
)
async def test_malformed_mail_from(env: Env, line: bytes, reply: str) -> None:
    c = await env.session()
    await c.send_raw(line + b"\r\n")
    assert await env.reply(c) == [reply]
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["503 5.5.1 Error: need MAIL command"]
    assert env.backend.connections == []
    await env.finish()
