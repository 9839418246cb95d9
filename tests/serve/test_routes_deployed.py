"""FILTER, HOLD and REDIRECT through a deployed server (workers, dropped privileges, a
root-only table): each message goes where the action sends it, over a real socket.

- ``FILTER smtp:[127.0.0.1]:PORT`` -- the message goes to that next hop, not the
  relayhost; RCPT is not relayed in lock-step to the relayhost meanwhile.
- ``HOLD`` with ``smtpgate_hold_relayhost`` -- the message goes to the hold host.
- ``HOLD`` without it -- the relayhost gets it with an ``X-Smtpgate-Hold:`` header.
- ``REDIRECT`` -- one recipient, the target (ORCPT, naming the first original one, only to
  a backend that offers DSN).
"""

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
BODY = b"Subject: routes\r\n\r\nbody\r\n"


def tables(filter_host: str) -> dict[str, str]:
    return {
        "recipients": (
            f"filtered@bar.org FILTER smtp:{filter_host}\n"
            "held@bar.org HOLD suspicious\n"
            "moved@bar.org REDIRECT target@bar.org\n"
        )
    }


async def message(c: LineClient, rcpts: list[str]) -> list[str]:
    assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
    for rcpt in rcpts:
        assert await c.cmd(f"RCPT TO:<{rcpt}>") == ["250 2.1.5 Ok"]
    assert (await c.cmd("DATA"))[0].startswith("354")
    await c.send_raw(BODY + b".\r\n")
    return await c.reply()


async def test_filter_sends_the_message_to_its_next_hop(tmp_path: Path, backend: RecordingBackend):
    async with RecordingBackend() as filter_:
        async with running_gate(tmp_path, MAIN_CF, backend, tables(filter_.relayhost)) as gate:
            c = await gate.connect()
            assert (await c.cmd("EHLO client.example"))[0].startswith("250")
            final = await message(c, ["foo@bar.org", "filtered@bar.org"])
            assert final[0].startswith("250 2.0.0 Ok: queued as "), final
            await c.cmd("QUIT")
        [stored] = filter_.messages
        assert stored.rcpt_tos == ["foo@bar.org", "filtered@bar.org"]
        assert stored.content.endswith(BODY)
        # the client's 250 is the filter's
        assert final[0].endswith(stored.queue_id)
        assert backend.messages == []
    assert (
        "filter: RCPT from unknown[127.0.0.2]: <filtered@bar.org>: Recipient address "
        f"triggers FILTER smtp:{filter_.relayhost};"
    ) in gate.log


async def test_hold_goes_to_the_hold_relayhost(tmp_path: Path, backend: RecordingBackend):
    async with RecordingBackend() as quarantine:
        async with running_gate(
            tmp_path,
            MAIN_CF + f"smtpgate_hold_relayhost = {quarantine.relayhost}\n",
            backend,
            tables("[127.0.0.1]:9"),
        ) as gate:
            c = await gate.connect()
            assert (await c.cmd("EHLO client.example"))[0].startswith("250")
            final = await message(c, ["held@bar.org", "foo@bar.org"])
            assert final[0].startswith("250 2.0.0 Ok: queued as "), final
            # the next message, without HOLD, goes to the relayhost as before
            final = await message(c, ["foo@bar.org"])
            assert final[0].startswith("250 "), final
            await c.cmd("QUIT")
        [held] = quarantine.messages
        assert held.rcpt_tos == ["held@bar.org", "foo@bar.org"]
        assert b"X-Smtpgate-Hold" not in held.content
        [relayed] = backend.messages
        assert relayed.rcpt_tos == ["foo@bar.org"]
    assert (
        "hold: RCPT from unknown[127.0.0.2]: <held@bar.org>: Recipient address suspicious;"
    ) in gate.log


async def test_hold_without_hold_host_marks_the_message(tmp_path: Path, backend: RecordingBackend):
    async with running_gate(tmp_path, MAIN_CF, backend, tables("[127.0.0.1]:9")) as gate:
        c = await gate.connect()
        assert (await c.cmd("EHLO client.example"))[0].startswith("250")
        final = await message(c, ["held@bar.org"])
        assert final[0].startswith("250 2.0.0 Ok: queued as "), final
        await c.cmd("QUIT")
    [stored] = backend.messages
    assert stored.content.startswith(b"X-Smtpgate-Hold: unknown[127.0.0.2]\r\nReceived: ")
    # lock-step: the relayhost saw the RCPT while the client waited for its reply
    assert "RCPT TO:<held@bar.org>" in backend.connections[0].commands
    assert "hold: RCPT from unknown[127.0.0.2]" in gate.log


async def test_redirect_delivers_to_the_target_with_orcpt(
    tmp_path: Path, backend: RecordingBackend
):
    async with running_gate(tmp_path, MAIN_CF, backend, tables("[127.0.0.1]:9")) as gate:
        c = await gate.connect()
        assert (await c.cmd("EHLO client.example"))[0].startswith("250")
        final = await message(c, ["moved@bar.org", "foo@bar.org"])
        assert final[0].startswith("250 2.0.0 Ok: queued as "), final
        await c.cmd("QUIT")
    [stored] = backend.messages
    assert stored.rcpt_tos == ["target@bar.org"]
    # the machine asks for ORCPT=rfc822;moved@bar.org (tests/smtp/test_machine_routes.py);
    # this backend offers no DSN, so the relay drops it, as Postfix's smtp client does
    assert stored.rcpt_options == [[]]
    assert "DSN" not in " ".join(backend.connections[0].commands)
    assert b"for <" not in stored.content.split(b"\r\n\r\n", 1)[0]
    assert "redirect: RCPT from unknown[127.0.0.2]: <moved@bar.org>: Recipient address" in (
        gate.log
    )
