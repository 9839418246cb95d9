"""postscreen's deep protocol tests inside the SMTP session, over real sockets: a client
that pipelines without PIPELINING, one that speaks HTTP, one that ends lines with a bare
LF; and one that passes, which goes on in the same session (no reconnect)."""

from __future__ import annotations

from pathlib import Path

from tests.postscreen.conftest import session
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import running_gate

MAIN_CF = """\
myhostname = mx.example.org
relay_domains = bar.org
mynetworks = 127.0.0.1/32
postscreen_greet_banner =
postscreen_pipelining_enable = yes
postscreen_non_smtp_command_enable = yes
postscreen_bare_newline_enable = yes
"""
REASON = "the log in memory; the deployed form runs in test_shared.py"
GREETING = ["220 mx.example.org ESMTP Postfix"]


async def test_a_good_client_passes_and_goes_on_in_the_same_session(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with running_gate(tmp_path, MAIN_CF, backend, in_process=REASON) as gate:
        s = await session(gate, "127.0.0.2")
        assert s.greeting == GREETING
        ehlo = await s.client.cmd("EHLO ok.example")
        assert "250-PIPELINING" not in ehlo  # not until the client passed
        assert await s.client.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
        assert await s.client.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
        assert f"PASS NEW {s.tag}" in gate.log
        assert await s.client.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        reply = await s.client.cmd("Subject: hi\r\n\r\nhello\r\n.")
        assert reply[0].startswith("250 2.0.0 Ok"), reply
        await s.client.cmd("QUIT")
        again = await session(gate, "127.0.0.2")
        assert again.greeting == GREETING
        assert "250-PIPELINING" in await again.client.cmd("EHLO ok.example")
        assert f"PASS OLD {again.tag}" in gate.log


async def test_pipelining_enforce_and_drop(tmp_path: Path, backend: RecordingBackend) -> None:
    async with running_gate(tmp_path, MAIN_CF, backend, in_process=REASON) as gate:
        s = await session(gate, "127.0.0.3")
        await s.client.cmd("EHLO bot.example")
        await s.client.send_raw(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<foo@bar.org>\r\n")
        assert await s.client.reply() == ["250 2.1.0 Ok"]
        assert await s.client.reply() == ["550 5.5.1 Protocol error"]
        log = gate.log
        assert f"COMMAND PIPELINING from {s.tag} after MAIL: RCPT TO:<foo@bar.org>\\r\\n" in log
        assert (
            f"NOQUEUE: reject: RCPT from {s.tag}: 550 5.5.1 Protocol error; "
            "from=<a@example.net>, to=<foo@bar.org>, proto=ESMTP, helo=<bot.example>"
        ) in log
        assert "PASS NEW" not in log
    folder = tmp_path / "drop"
    folder.mkdir()
    text = MAIN_CF + "postscreen_pipelining_action = drop\n"
    async with running_gate(folder, text, backend, in_process=REASON) as gate:
        s = await session(gate, "127.0.0.3")
        await s.client.cmd("EHLO bot.example")
        await s.client.send_raw(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<foo@bar.org>\r\n")
        assert await s.client.reply() == ["521 5.5.1 Protocol error"]
        assert await s.client.closed()
        await gate.wait_log(f"DISCONNECT {s.tag}")
    assert not backend.connections


async def test_http_is_a_non_smtp_command(tmp_path: Path, backend: RecordingBackend) -> None:
    async with running_gate(tmp_path, MAIN_CF, backend, in_process=REASON) as gate:
        s = await session(gate, "127.0.0.4")
        assert await s.client.cmd("GET / HTTP/1.0") == [
            "521 5.7.0 Error: I can break rules, too. Goodbye."
        ]
        assert await s.client.closed()
        log = await gate.wait_log(f"DISCONNECT {s.tag}")
        assert f"NON-SMTP COMMAND from {s.tag} after CONNECT: GET / HTTP/1.0" in log
        header = await session(gate, "127.0.0.5")
        await header.client.cmd("EHLO ok.example")
        assert await header.client.cmd("Subject: hello") == [
            "521 5.7.0 Error: I can break rules, too. Goodbye."
        ]
        log = await gate.wait_log(f"DISCONNECT {header.tag}")
        assert f"NON-SMTP COMMAND from {header.tag} after EHLO: Subject: hello" in log


async def test_bare_newline_ignore_and_enforce(tmp_path: Path, backend: RecordingBackend) -> None:
    async with running_gate(tmp_path, MAIN_CF, backend, in_process=REASON) as gate:
        s = await session(gate, "127.0.0.6")
        await s.client.send_raw(b"EHLO bare.example\n")
        assert (await s.client.reply())[0] == "250-mx.example.org"  # still answered
        await s.client.cmd("MAIL FROM:<a@example.net>")
        assert await s.client.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
        log = gate.log
        assert f"BARE NEWLINE from {s.tag} after EHLO bare.example" in log
        assert f"PASS NEW {s.tag}" in log  # ignore: passes, for a short while
    folder = tmp_path / "enforce"
    folder.mkdir()
    text = MAIN_CF + "postscreen_bare_newline_action = enforce\n"
    async with running_gate(folder, text, backend, in_process=REASON) as gate:
        s = await session(gate, "127.0.0.6")
        await s.client.send_raw(b"EHLO bare.example\n")
        await s.client.reply()
        await s.client.cmd("MAIL FROM:<a@example.net>")
        assert await s.client.cmd("RCPT TO:<foo@bar.org>") == ["550 5.5.1 Protocol error"]
        assert "PASS NEW" not in gate.log


async def test_non_smtp_ignore_answers_as_postscreen(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    text = MAIN_CF + "postscreen_non_smtp_command_action = ignore\n"
    async with running_gate(tmp_path, text, backend, in_process=REASON) as gate:
        s = await session(gate, "127.0.0.4")
        assert await s.client.cmd("GET / HTTP/1.0") == ["502 5.5.2 Error: command not recognized"]
        await s.client.cmd("EHLO ok.example")
        await s.client.cmd("MAIL FROM:<a@example.net>")
        assert await s.client.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
        log = gate.log
        assert f"NON-SMTP COMMAND from {s.tag} after CONNECT: GET / HTTP/1.0" in log
        assert f"PASS NEW {s.tag}" in log
