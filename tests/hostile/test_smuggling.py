"""S01-S18: SMTP smuggling (reliability.md section 2) through the whole server.

Oracle (Exim's test 0900): for every case the backend stores at most the one message the
client sent, never a transaction with the smuggled sender, and what reaches the backend
has no bare LF and exactly one end of data (smtpgate frames the content itself; a lone CR
inside a line is relayed as a space, as Postfix 3.7 sends it on). The lenient
backend ends DATA at a dot after a bare LF too (pre-3.9 Postfix, sendmail): the victim a
front end must protect.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.hostile.conftest import GO_AHEAD, Env, body, code, open_env

SMUGGLED = (
    b"MAIL FROM:<smuggler@evil.example>\r\nRCPT TO:<victim@our.example>\r\nDATA\r\n"
    b"From: ceo@our.example\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
)
SEQUENCES = {
    "s01-lf.lf": b"\n.\n",
    "s02-lf.crlf": b"\n.\r\n",
    "s03-cr.cr": b"\r.\r",
    "s04-crlf.lf": b"\r\n.\n",
    "s05-cr.crlf": b"\r.\r\n",
    "s06-crlf.cr": b"\r\n.\r",
    "s07-lf.cr": b"\n.\r",
    "s08-cr.lf": b"\r.\n",
    "s09-crlf.cr.crlf": b"\r\n.\r\r\n",
    "s10-crcrlf.crcrlf": b"\r\r\n.\r\r\n",
}
BARE_LF = re.compile(rb"(?<!\r)\n")


def assert_clean(env: Env) -> None:
    for message in env.backend.messages:
        assert message.mail_from != "smuggler@evil.example"
        assert BARE_LF.search(message.raw) is None, message.raw
        assert (b"\r\n" + message.raw).count(b"\r\n.\r\n") == 1, message.raw
    for connection in env.backend.connections:
        assert not any("smuggler" in command for command in connection.commands)


@pytest.mark.parametrize("lenient", [False, True], ids=["strict", "lenient"])
@pytest.mark.parametrize("sequence", SEQUENCES.values(), ids=SEQUENCES.keys())
async def test_s01_s10_end_of_data_lookalikes(tmp_path: Path, sequence: bytes, lenient: bool):
    async with open_env(tmp_path, lenient_data_end=lenient) as env:
        c = await env.session()
        final = await env.transaction(c, body("smug", b"hello" + sequence + SMUGGLED))
        assert final[0].startswith("250 2.0.0 Ok: queued as "), final
        assert await env.cmd(c, "NOOP") == ["250 2.0.0 Ok"], "one reply for one message"
        [stored] = env.backend.messages
        assert stored.mail_from == "sender@ext.example"
        assert b"wire the money" in stored.content
        assert_clean(env)
        await env.finish()


async def test_s11_nul_before_the_dot_is_refused(env: Env) -> None:
    c = await env.session()
    final = await env.transaction(c, body("nul", b"hello\r\n\x00.\r\n" + SMUGGLED))
    assert final == ["550 5.6.0 Error: message content contains a NUL character"]
    assert env.backend.messages == []
    assert_clean(env)
    await env.finish()


async def test_s12_bare_lf_without_dot_is_normalised(env: Env) -> None:
    c = await env.session()
    final = await env.transaction(c, body("lf", b"one\ntwo\r\n"))
    assert final[0].startswith("250 "), final
    [stored] = env.stored("lf")
    assert stored.content.endswith(b"one\r\ntwo\r\n")
    assert_clean(env)
    await env.finish()


async def test_s13_bare_lf_rejected_when_configured(tmp_path: Path) -> None:
    async with open_env(tmp_path, overrides=("smtpd_forbid_bare_newline=reject",)) as env:
        c = await env.session()
        final = await env.transaction(c, body("lf", b"one\n.\n" + SMUGGLED))
        assert final == ["550 5.5.2 mx.example.org Error: bare <LF> received"]
        assert env.backend.messages == []
        # The backend was in DATA (sent with the client's DATA): closed, never a dot.
        await env.backend.wait_for(lambda: env.backend.connections[0].closed)
        assert env.backend.connections[0].commands[-1] == "DATA"
        await env.finish()


async def test_s14_bare_cr_without_dot_is_relayed_as_postfix_sends_it(env: Env) -> None:
    c = await env.session()
    final = await env.transaction(c, body("cr", b"one\rtwo\r\n"))
    assert final[0].startswith("250 "), final
    [stored] = env.stored("cr")
    assert stored.content.endswith(b"one two\r\n")  # a lone CR: a space, as Postfix 3.7
    assert_clean(env)
    await env.finish()


async def test_s15_pipelined_second_message_is_the_clients_own(env: Env) -> None:
    """Commands after the dot in the same write are the client's next transaction."""
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    assert await env.cmd(c, "DATA") == GO_AHEAD
    env.senders.add("second@ext.example")
    await c.send_raw(
        body("first")
        + b".\r\nMAIL FROM:<second@ext.example>\r\nRCPT TO:<u@our.example>\r\nDATA\r\n"
    )
    replies = [await env.reply(c) for _ in range(4)]
    assert replies[0][0].startswith("250 2.0.0 Ok: queued as ")
    assert replies[1:] == [["250 2.1.0 Ok"], ["250 2.1.5 Ok"], GO_AHEAD]
    await c.send_raw(body("second") + b".\r\n")
    assert code(await env.reply(c)) == 250
    assert [m.mail_from for m in env.backend.messages] == [
        "sender@ext.example",
        "second@ext.example",
    ]
    assert len(env.stored("first")) == len(env.stored("second")) == 1
    await env.finish()


async def test_s16_bdat_content_is_counted_not_parsed(env: Env) -> None:
    """BDAT content is exactly its count of octets: a smuggled transaction inside it is
    text of the message, and what follows the chunk is read as commands again."""
    c = await env.session()
    ehlo = await env.cmd(c, "EHLO x.example")
    assert ehlo[-1] == "250 CHUNKING"
    assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    chunk = body("bdat", b"one\n.\r\n" + SMUGGLED)
    await c.send_raw(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert (await env.reply(c))[0].startswith("250 2.0.0 Ok: queued as ")
    assert await env.reply(c) == ["250 2.0.0 Ok"]
    [stored] = env.stored("bdat")
    assert b"MAIL FROM:<smuggler@evil.example>" in stored.content  # text, not a command
    assert_clean(env)
    await env.finish()


async def test_s17_end_of_data_split_across_writes(env: Env) -> None:
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    assert await env.cmd(c, "DATA") == GO_AHEAD
    for piece in (body("split", b"x\r"), b"\n", b".", b"\r", b"\n"):
        await c.send_raw(piece)
        await asyncio.sleep(0.02)  # pacing: each piece a separate segment (the case itself)
    final = await env.reply(c)
    assert final[0].startswith("250 "), final
    [stored] = env.stored("split")
    assert stored.content.endswith(b"\r\n\r\nx\r\n")
    await env.finish()


async def test_s18_stuffed_lone_dot_is_content(env: Env) -> None:
    c = await env.session()
    final = await env.transaction(c, body("dot", b"before\r\n..\r\n" + SMUGGLED))
    assert final[0].startswith("250 "), final
    [stored] = env.stored("dot")
    assert b"\r\nbefore\r\n.\r\nMAIL FROM:<smuggler" in stored.content
    assert_clean(env)
    await env.finish()
