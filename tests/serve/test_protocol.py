"""smtpgate's SMTP protocol over a real socket: Postfix 3.7's replies, texts and closes.

Every expected reply here was read off a real Postfix 3.7 (tests/differential/
test_sessions_vs_postfix.py runs the same kinds of sessions against both); these run
without Postfix. ``blocked.example`` senders are refused at RCPT (delay_reject) with the
sender address in the text, so a MAIL test can show how the address was parsed; recipients
in ``other.org`` are refused with "Relay access denied", showing the parsed recipient.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtpgate.smtp.syntax import Token, parse_address, smtpd_tokens
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, running_gate

MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
local_recipient_maps = inline:{ postmaster=x, alice=x }
smtpd_sender_restrictions = check_sender_access inline:{ blocked.example=REJECT }
"""
BAN_521 = (
    "smtpd_recipient_restrictions = check_sender_access inline:{ {banned.example = 521 go away} }\n"
)

EHLO = "EHLO client.example.net"
MAIL = "MAIL FROM:<sender@example.net>"
FORBIDDEN = "221 2.7.0 Error: I can break rules, too. Goodbye."
UNKNOWN = "500 5.5.2 Error: command not recognized"
NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"
SENDER_REJECTED = "554 5.7.1 <{}>: Sender address rejected: Access denied"
RELAY_DENIED = "454 4.7.1 <{}>: Relay access denied"


@pytest.fixture
async def gate(tmp_path: Path, backend: RecordingBackend) -> AsyncIterator[Gate]:
    async with running_gate(tmp_path, MAIN_CF, backend) as g:
        yield g


async def talk(gate: Gate, *lines: str | bytes) -> list[str]:
    """Send each line (str: CRLF added; bytes: as is), one reply each; first lines only."""
    c = await gate.connect()
    out = []
    for line in lines:
        await c.send_raw(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        reply = await c.reply()
        out.append(reply[0] if len(reply) == 1 else reply[0] + "...")
    return out


async def last_reply(gate: Gate, *lines: str | bytes) -> str:
    return (await talk(gate, *lines))[-1]


# -- the tokenizer and the address parser (pure) ------------------------------------------


@pytest.mark.parametrize(
    ("line", "tokens"),
    [
        ("MAIL FROM:<a@b>", ["MAIL", "FROM:", "<a@b>"]),
        ("mail from: a@b SIZE=1", ["mail", "from:", "a@b", "SIZE=1"]),
        ("MAIL FROM <a@b>", ["MAIL", "FROM", "<a@b>"]),
        ("MAIL FROM :<a@b>", ["MAIL", "FROM", ":<a@b>"]),
        ("HELO\tx.example  \r", ["HELO", "x.example"]),
        ('MAIL FROM:<"a b"@c>', ["MAIL", "FROM:", '<"a b"@c>']),
        ("NOOP a\\ b", ["NOOP", "a\\ b"]),
        ("", []),
        ("  \t ", []),
    ],
)
def test_tokens(line: str, tokens: list[str]) -> None:
    assert [t.text for t in smtpd_tokens(line)] == tokens


def test_unclosed_bracket_is_an_error_token() -> None:
    assert smtpd_tokens("MAIL FROM:<a@b FOO=1")[2] == Token("<a@b FOO=1", error=True)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("<a@b.example>", "a@b.example"),
        ("a@b.example", "a@b.example"),
        ("<<a@b.example>>", "a@b.example"),
        ("<>", ""),
        ('<"a b"@c.example>', "a b@c.example"),
        ('<"a@b"@c.example>', "a@b@c.example"),
        ("<a\\ b@c.example>", "a b@c.example"),
        ("<a@b.example (comment)>", "a@b.example"),
        ("<@x.example,@y.example:a@b.example>", "a@b.example"),
        ("<@x.example:>", "@x.example:"),
        ("<jos\u00e9@b.example>", "jos\u00e9@b.example"),
        ("<a b@c.example>", None),
        ("<@>", None),
        ("<a,b@c.example>", None),
    ],
)
def test_parse_address(text: str, address: str | None) -> None:
    assert parse_address(text, allow_empty=True) == address


def test_empty_recipient_is_bad() -> None:
    assert parse_address("<>", allow_empty=False) is None


# -- HELO/EHLO ----------------------------------------------------------------------------


async def test_helo_and_ehlo_without_argument(gate: Gate) -> None:
    assert await talk(gate, "HELO", "EHLO") == [
        "501 Syntax: HELO hostname",
        "501 Syntax: EHLO hostname",
    ]


@pytest.mark.parametrize(
    "line", ["helo client.example.net", "HELO\tclient.example.net", "  HeLo a b  c  "]
)
async def test_helo_forms(gate: Gate, line: str) -> None:
    assert await talk(gate, line) == ["250 mx.example.org"]


async def test_ehlo_capabilities(gate: Gate) -> None:
    c = await gate.connect()
    assert await c.cmd("ehlo client.example.net") == [
        "250-mx.example.org",
        "250-PIPELINING",
        "250-SIZE 10240000",
        "250-VRFY",
        "250-ETRN",
        "250-ENHANCEDSTATUSCODES",
        "250-8BITMIME",
        "250-DSN",
        "250-SMTPUTF8",
        "250 CHUNKING",
    ]


# -- MAIL ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "sender"),
    [
        ("MAIL FROM:<a@blocked.example>", "a@blocked.example"),
        ("mail from: a@blocked.example", "a@blocked.example"),
        ("MAIL FROM: <a@blocked.example>", "a@blocked.example"),
        ("MAIL FROM:a@blocked.example", "a@blocked.example"),
        ("MAIL FROM:<a@blocked.example> SIZE=100 BODY=8BITMIME", "a@blocked.example"),
        ("MAIL FROM:<@x.example,@y.example:a@blocked.example>", "a@blocked.example"),
        ('MAIL FROM:<"a b"@blocked.example>', "a b@blocked.example"),
        ("MAIL FROM:<jos\u00e9@blocked.example>", "jos\u00e9@blocked.example"),
        ("MAIL FROM:<<a@blocked.example>>", "a@blocked.example"),
    ],
)
async def test_mail_forms_and_the_parsed_sender(gate: Gate, line: str | bytes, sender: str) -> None:
    replies = await talk(gate, EHLO, line, "RCPT TO:<bob@bar.org>")
    assert replies[1:] == ["250 2.1.0 Ok", SENDER_REJECTED.format(sender)]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("MAIL FROM <a@b.example>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        ("MAIL FROM:", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        ("MAIL", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        ("MAIL FROM:<a@b.example", "501 5.1.7 Bad sender address syntax"),
        ("MAIL FROM:<a@b.example>x", "501 5.1.7 Bad sender address syntax"),
        ("MAIL FROM:<a b@b.example>", "501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<a\x00b@b.example>\r\n", "501 5.1.7 Bad sender address syntax"),
        ("MAIL FROM:<a@b.example> SIZE=abc", "501 5.5.4 Bad message size syntax"),
        ("MAIL FROM:<a@b.example> SIZE=999999999", "552 5.3.4 Message size exceeds fixed limit"),
        (
            "MAIL FROM:<a@b.example> SIZE=9223372036854775808",
            "552 5.3.4 Message size exceeds file system imposed limit",
        ),
        ("MAIL FROM:<a@b.example> FOO=bar", "555 5.5.4 Unsupported option: FOO=bar"),
        ("MAIL FROM:<a@b.example> BODY=9BIT", "555 5.5.4 Unsupported option: BODY=9BIT"),
        ("MAIL FROM:<a@b.example> RET=ALL", "501 5.5.4 Bad RET parameter syntax"),
        ("MAIL FROM:<a@b.example> ENVID=a+zz", "501 5.5.4 Bad ENVID parameter syntax"),
        ("MAIL FROM:Joe <a@b.example>", "555 5.5.4 Unsupported option: <a@b.example>"),
    ],
)
async def test_mail_errors(gate: Gate, line: str | bytes, reply: str) -> None:
    assert await talk(gate, EHLO, line, "RCPT TO:<bob@bar.org>") == [
        "250-mx.example.org...",
        reply,
        "503 5.5.1 Error: need MAIL command",
    ]


async def test_mail_without_helo_and_nested_mail(gate: Gate) -> None:
    assert await talk(gate, MAIL, "MAIL FROM:<x@example.net>") == [
        "250 2.1.0 Ok",
        "503 5.5.1 Error: nested MAIL command",
    ]


# -- RCPT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("RCPT TO:<x@other.org>", RELAY_DENIED.format("x@other.org")),
        ("rcpt to: x@other.org", RELAY_DENIED.format("x@other.org")),
        ("RCPT TO:<@a.example:x@other.org>", RELAY_DENIED.format("x@other.org")),
        ('RCPT TO:<"x y"@other.org>', RELAY_DENIED.format("x y@other.org")),
        (
            "RCPT TO:<x@other.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@other.org",
            RELAY_DENIED.format("x@other.org"),
        ),
        ("RCPT TO <x@other.org>", "501 5.5.4 Syntax: RCPT TO:<address>"),
        ("RCPT TO:<>", "501 5.1.3 Bad recipient address syntax"),
        ("RCPT TO:<x@other.org", "501 5.1.3 Bad recipient address syntax"),
        (
            "RCPT TO:<x@other.org> NOTIFY=NEVER,SUCCESS",
            "501 5.5.4 Error: Bad NOTIFY parameter syntax",
        ),
        ("RCPT TO:<x@other.org> ORCPT=bogus", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
        ("RCPT TO:<x@other.org> FOO=bar", "555 5.5.4 Unsupported option: FOO=bar"),
        (
            "RCPT TO:<nobody@mx.example.org>",
            "550 5.1.1 <nobody@mx.example.org>: Recipient address rejected: "
            "User unknown in local recipient table",
        ),
        ("RCPT TO:<postmaster>", "250 2.1.5 Ok"),
    ],
)
async def test_rcpt_forms(gate: Gate, line: str, reply: str) -> None:
    assert await last_reply(gate, EHLO, MAIL, line) == reply


async def test_rcpt_before_mail(gate: Gate) -> None:
    assert await talk(gate, "RCPT TO:<bob@bar.org>") == ["503 5.5.1 Error: need MAIL command"]


# -- DATA, RSET, NOOP, QUIT, VRFY ------------------------------------------------------------


async def test_data_sequencing(gate: Gate) -> None:
    assert await talk(
        gate, EHLO, "DATA", "DATA x", MAIL, "DATA x", "RCPT TO:<x@other.org>", "DATA"
    ) == [
        "250-mx.example.org...",
        "503 5.5.1 Error: need RCPT command",
        "503 5.5.1 Error: need RCPT command",
        "250 2.1.0 Ok",
        "554 5.5.1 Error: no valid recipients",
        RELAY_DENIED.format("x@other.org"),
        "554 5.5.1 Error: no valid recipients",
    ]
    assert await last_reply(gate, EHLO, MAIL, "RCPT TO:<bob@bar.org>", "DATA now") == (
        "501 5.5.4 Syntax: DATA"
    )


async def test_rset_noop_quit_with_arguments(gate: Gate) -> None:
    c = await gate.connect()
    assert await c.cmd(MAIL) == ["250 2.1.0 Ok"]
    assert await c.cmd("RSET now") == ["501 5.5.4 Syntax: RSET"]
    assert await c.cmd("NOOP hello there") == ["250 2.0.0 Ok"]
    assert await c.cmd("RSET") == ["250 2.0.0 Ok"]
    assert await c.cmd("RCPT TO:<bob@bar.org>") == ["503 5.5.1 Error: need MAIL command"]
    assert await c.cmd("QUIT now") == ["221 2.0.0 Bye"]
    assert await c.closed()


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("VRFY", "501 5.5.4 Syntax: VRFY address [SMTPUTF8]"),
        ("VRFY bob@bar.org", "252 2.0.0 bob@bar.org"),
        ("VRFY <bob@bar.org> SMTPUTF8", "252 2.0.0 <bob@bar.org>"),
        ("VRFY a b", "501 5.1.3 Bad recipient address syntax"),
        ("VRFY x@other.org", RELAY_DENIED.format("x@other.org")),
        (
            "VRFY nobody@mx.example.org",
            "550 5.1.1 <nobody@mx.example.org>: Recipient address rejected: "
            "User unknown in local recipient table",
        ),
    ],
)
async def test_vrfy(gate: Gate, line: str, reply: str) -> None:
    assert await talk(gate, line) == [reply]


async def test_vrfy_disabled(tmp_path: Path, backend: RecordingBackend) -> None:
    main_cf = MAIN_CF + "disable_vrfy_command = yes\n"
    async with running_gate(tmp_path, main_cf, backend) as g:
        assert (
            await talk(g, "VRFY", "VRFY bob@bar.org") == ["502 5.5.1 VRFY command is disabled"] * 2
        )


# -- commands smtpgate does not offer, junk, and forbidden commands -----------------------


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("FOO bar", UNKNOWN),
        ("HELP", UNKNOWN),
        ("EXPN staff", UNKNOWN),
        ("TURN", UNKNOWN),
        ("hello there", UNKNOWN),
        ("Subject : x", UNKNOWN),
        ("", "500 5.5.2 Error: bad syntax"),
        ("   ", "500 5.5.2 Error: bad syntax"),
        ("STARTTLS", NOT_IMPLEMENTED),
        ("STARTTLS now", "501 5.5.4 Syntax: STARTTLS"),
        ("ETRN bar.org", "459 <bar.org>: service unavailable"),
        ("ETRN", "500 Syntax: ETRN domain"),
        ("AUTH PLAIN AGFsaWNlAHNlY3JldA==", "503 5.5.1 Error: authentication not enabled"),
        ("XCLIENT NAME=spoofed", "550 5.7.0 Error: insufficient authorization"),
        ("XFORWARD", "501 5.5.4 Syntax: XFORWARD attribute=value..."),
        ("NOOP " + "x" * 2995, "250 2.0.0 Ok"),
        ("A" * 3000, UNKNOWN),
        (b"NO\x00OP\r\n", UNKNOWN),
        (b"NOOP\x00 junk\r\n", "250 2.0.0 Ok"),
        (b"NOOP\rx\r\n", "250 2.0.0 Ok"),
        (b"NOOP\x7f\r\n", UNKNOWN),
        (b"NOOP a\x7fb\r\n", "250 2.0.0 Ok"),
        (b"NOOP \xff\xfe\r\n", "500 5.5.2 Error: bad UTF-8 syntax"),
        (b"HELO client.example.net\n", "250 mx.example.org"),
    ],
)
async def test_other_commands_leave_the_session_usable(
    gate: Gate, line: str | bytes, reply: str
) -> None:
    assert await talk(gate, line, "NOOP") == [reply, "250 2.0.0 Ok"]


@pytest.mark.parametrize(
    "line",
    [
        "GET / HTTP/1.0",
        "get / HTTP/1.0",
        "POST /x HTTP/1.1",
        "CONNECT mx.example.org:25 HTTP/1.0",
        "Subject: x",
        "from: someone@example.net",
        "HELO:client.example.net",
        "123 abc",
        "[HELO",
        ":",
    ],
)
async def test_forbidden_commands_close(gate: Gate, line: str) -> None:
    c = await gate.connect()
    assert await c.cmd(line) == [FORBIDDEN]
    assert await c.closed()
    assert "warning: non-SMTP command from unknown[127.0.0.2]: " in gate.log


async def test_bdat_chunks_make_one_message(gate: Gate, backend: RecordingBackend) -> None:
    c = await gate.connect()
    assert (await c.cmd(EHLO))[-1] == "250 CHUNKING"
    assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
    assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
    await c.send_raw(b"BDAT 12\r\nSubject: x\r\n")
    assert await c.reply() == ["250 2.0.0 Ok: 12 bytes"]
    await c.send_raw(b"BDAT 9 LAST\r\n\r\n.body\r\n")
    assert (await c.reply())[0].startswith("250 2.0.0 Ok: queued as ")
    assert backend.messages[-1].content.endswith(b"Subject: x\r\n\r\n.body\r\n")


async def test_bdat_with_a_bad_size_closes(gate: Gate) -> None:
    c = await gate.connect()
    assert await c.cmd(EHLO)
    assert await c.cmd("BDAT x") == ["521 5.5.4 Syntax: BDAT count [LAST]"]
    assert await c.closed()


# -- pipelining ---------------------------------------------------------------------------


async def test_pipelined_transaction_gets_every_reply_in_order(
    gate: Gate, backend: RecordingBackend
) -> None:
    c = await gate.connect()
    await c.cmd(EHLO)
    await c.send_raw(
        b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<bob@bar.org>\r\n"
        b"RCPT TO:<x@other.org>\r\nRCPT TO:<carol@bar.org>\r\nDATA\r\n"
    )
    assert [await c.reply() for _ in range(5)] == [
        ["250 2.1.0 Ok"],
        ["250 2.1.5 Ok"],
        [RELAY_DENIED.format("x@other.org")],
        ["250 2.1.5 Ok"],
        ["354 End data with <CR><LF>.<CR><LF>"],
    ]
    await c.send_raw(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    [final] = await c.reply()
    assert final.startswith("250 2.0.0 Ok: queued as ")
    assert await c.reply() == ["221 2.0.0 Bye"]
    assert await c.closed()
    assert backend.messages[0].rcpt_tos == ["bob@bar.org", "carol@bar.org"]


async def test_pipelined_521_is_the_last_thing_written(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with running_gate(tmp_path, MAIN_CF + BAN_521, backend) as g:
        c = await g.connect()
        await c.cmd(EHLO)
        await c.send_raw(
            b"MAIL FROM:<x@banned.example>\r\nRCPT TO:<bob@bar.org>\r\n"
            b"RCPT TO:<carol@bar.org>\r\nDATA\r\nNOOP\r\n"
        )
        rest = await asyncio.wait_for(c.reader.read(), 10)  # everything up to the close
    assert rest == (
        b"250 2.1.0 Ok\r\n521 5.7.1 <x@banned.example>: Sender address rejected: go away\r\n"
    )
    assert backend.connections == []


async def test_pipelined_syntax_errors_do_not_stop_the_group(gate: Gate) -> None:
    c: LineClient = await gate.connect()
    await c.cmd(EHLO)
    await c.send_raw(b"MAIL FROM:<sender@example.net\r\nRCPT TO:<bob@bar.org>\r\nFOO\r\nNOOP\r\n")
    assert [await c.reply() for _ in range(4)] == [
        ["501 5.1.7 Bad sender address syntax"],
        ["503 5.5.1 Error: need MAIL command"],
        [UNKNOWN],
        ["250 2.0.0 Ok"],
    ]
