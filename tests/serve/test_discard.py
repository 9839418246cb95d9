"""DISCARD through the whole server: the client is told the message was taken, nothing
reaches the backend's store, and a backend transaction opened for earlier recipients is
ended (RSET) so its connection goes back to the pool."""

from __future__ import annotations

from pathlib import Path

from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import running_gate

MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 192.0.2.0/24
relay_domains = bar.org
smtpd_recipient_restrictions =
        reject_unauth_destination
        check_recipient_access hash:$config_directory/recipients
"""
TABLES = {"recipients": "trap@bar.org DISCARD spam trap\n"}
MESSAGE = b"Subject: x\r\n\r\nbody\r\n.\r\n"


async def _message(c: LineClient, rcpts: list[str]) -> list[str]:
    assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
    for rcpt in rcpts:
        assert await c.cmd(f"RCPT TO:<{rcpt}>") == ["250 2.1.5 Ok"]
    assert (await c.cmd("DATA"))[0].startswith("354")
    await c.send_raw(MESSAGE)
    return await c.reply()


async def test_discard_after_a_relayed_recipient(tmp_path: Path, backend: RecordingBackend):
    async with running_gate(tmp_path, MAIN_CF, backend, TABLES) as gate:
        c = await gate.connect()
        assert (await c.cmd("EHLO client.example"))[0].startswith("250")
        final = await _message(c, ["foo@bar.org", "trap@bar.org"])
        assert final[0].startswith("250 2.0.0 Ok: queued as ")
        assert backend.messages == []
        conn = backend.connections[0]
        await backend.wait_for(lambda: conn.commands[-1] == "RSET")
        assert "DATA" not in conn.commands
        # the connection went back to the pool: the next message uses it
        final = await _message(c, ["foo@bar.org"])
        assert final[0].startswith("250 ")
        assert len(backend.connections) == 1 and len(backend.messages) == 1
        assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
    assert "discard: RCPT from unknown[127.0.0.2]: <trap@bar.org>: Recipient address spam trap" in (
        gate.log
    )
    # Postfix logs a DISCARD once, where it fired (docs/postfix-behaviour.md, point 5)
    assert gate.log.count(" discard: ") == 1


async def test_discard_before_any_relayed_recipient(tmp_path: Path, backend: RecordingBackend):
    async with running_gate(tmp_path, MAIN_CF, backend, TABLES) as gate:
        c = await gate.connect()
        assert (await c.cmd("EHLO client.example"))[0].startswith("250")
        final = await _message(c, ["trap@bar.org", "foo@bar.org"])
        assert final[0].startswith("250 2.0.0 Ok: queued as ")
        assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
    assert backend.connections == [] and backend.messages == []
