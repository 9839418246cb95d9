"""The seed, typed line by line as the admin typed it in telnet, over a real socket."""

from __future__ import annotations

from pathlib import Path

from tests.serve.backend import RecordingBackend
from tests.serve.conftest import SEED_MAIN_CF, SEED_TABLES, Gate, running_gate


async def test_seed_as_written_rejects_with_554_and_stays_open(
    seed_gate: Gate, backend: RecordingBackend
):
    c = await seed_gate.connect()
    assert await c.cmd("helo me.testing.example.com") == ["250 mx.example.org"]
    assert await c.cmd("mail from: 318787866@qq.com") == ["250 2.1.0 Ok"]
    assert await c.cmd("rcpt to: foo@bar.org") == [
        "554 5.7.1 <318787866@qq.com>: Sender address rejected: 521"
    ]
    # the session stays open: other recipients still work, and nothing reached the backend
    assert await c.cmd("noop") == ["250 2.0.0 Ok"]
    assert await c.cmd("quit") == ["221 2.0.0 Bye"]
    assert await c.closed()
    assert backend.messages == []
    assert (
        "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1 <318787866@qq.com>: "
        "Sender address rejected: 521; from=<318787866@qq.com> to=<foo@bar.org> "
        "proto=SMTP helo=<me.testing.example.com>"
    ) in seed_gate.log


async def test_seed_as_meant_replies_521_and_disconnects(tmp_path: Path, backend: RecordingBackend):
    tables = dict(SEED_TABLES, restricted_senders="qq.com 521 go away\n")
    async with running_gate(tmp_path, SEED_MAIN_CF, backend, tables) as gate:
        c = await gate.connect()
        await c.cmd("helo me.testing.example.com")
        await c.cmd("mail from: 318787866@qq.com")
        assert await c.cmd("rcpt to: foo@bar.org") == [
            "521 5.7.1 <318787866@qq.com>: Sender address rejected: go away"
        ]
        assert await c.closed()
    assert backend.connections == []


async def test_good_sender_is_relayed_and_gets_the_backend_reply(
    seed_gate: Gate, backend: RecordingBackend
):
    c = await seed_gate.connect()
    assert (await c.cmd("EHLO client.example.net"))[0] == "250-mx.example.org"
    assert await c.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
    assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
    assert await c.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    await c.send_raw(b"Subject: hi\r\n\r\n..starts with a dot\r\nbye\r\n.\r\n")
    final = await c.reply()
    assert final[0].startswith("250 ")
    assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
    [message] = backend.messages
    assert message.mail_from == "friend@example.net"
    assert message.rcpt_tos == ["foo@bar.org"]
    assert message.content.endswith(b"Subject: hi\r\n\r\n.starts with a dot\r\nbye\r\n")
    assert message.content.startswith(b"Received: from client.example.net (unknown [127.0.0.2])")
    # the client's 250 is the backend's 250, queue id included
    assert final == [f"250 2.0.0 Ok: queued as {message.queue_id}"]
    assert "proxy-accept: END-OF-MESSAGE" in seed_gate.log


async def test_quoted_local_part_and_dsn_parameters_reach_the_backend_correctly(
    seed_gate: Gate, backend: RecordingBackend
):
    c = await seed_gate.connect()
    await c.cmd("EHLO client.example.net")
    assert await c.cmd("MAIL FROM:<friend@example.net> RET=HDRS") == ["250 2.1.0 Ok"]
    assert await c.cmd('RCPT TO:<"a b"@bar.org> NOTIFY=NEVER') == ["250 2.1.5 Ok"]
    await c.cmd("DATA")
    await c.send_raw(b"Subject: q\r\n\r\nx\r\n.\r\n")
    assert (await c.reply())[0].startswith("250 ")
    [message] = backend.messages
    # the backend (aiosmtpd) offers no DSN: RET and NOTIFY are not sent to it, and the
    # internal form "a b@bar.org" is quoted again on the wire
    assert message.rcpt_tos == ['"a b"@bar.org']
    assert message.mail_options == []
    assert message.rcpt_options == [[]]
