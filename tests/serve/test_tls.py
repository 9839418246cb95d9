"""STARTTLS over real sockets: inbound (client -> smtpgate) and outbound (smtpgate -> backend).

Inbound replies are Postfix 3.7's, observed on the installed Postfix with the same
certificate (``smtpd_tls_security_level = may``/``encrypt``):

- ``STARTTLS foo``            -> ``501 5.5.4 Syntax: STARTTLS`` (argument check comes first)
- ``STARTTLS`` inside TLS     -> ``554 5.5.1 Error: TLS already active``
- ``MAIL`` before TLS (encrypt) -> ``530 5.7.0 Must issue a STARTTLS command first``
- ``STARTTLS`` without TLS    -> ``502 5.5.1 Error: command not implemented``
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tests.serve.backend import RecordingBackend
from tests.serve.certs import test_pki
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, running_gate

MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_proxy_timeout = 5s
smtp_connect_timeout = 5s
"""
BODY = b"Subject: tls\r\n\r\nhello over TLS\r\n"


def inbound_tls(level: str = "may") -> str:
    pki = test_pki()
    return (
        f"{MAIN_CF}smtpd_tls_security_level = {level}\n"
        f"smtpd_tls_cert_file = {pki.server_cert}\n"
        f"smtpd_tls_key_file = {pki.server_key}\n"
    )


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(test_pki().ca_cert))
    return context


async def upgrade(c: LineClient) -> None:
    assert await c.cmd("STARTTLS") == ["220 2.0.0 Ready to start TLS"]
    await c.starttls(client_context(), server_hostname="localhost")


def tls_version(c: LineClient) -> str | None:
    ssl_object = c.writer.get_extra_info("ssl_object")
    return None if ssl_object is None else str(ssl_object.version())


async def transaction(c: LineClient, sender: str, rcpt: str, body: bytes = BODY) -> list[str]:
    assert await c.cmd(f"MAIL FROM:<{sender}>") == ["250 2.1.0 Ok"]
    assert await c.cmd(f"RCPT TO:<{rcpt}>") == ["250 2.1.5 Ok"]
    assert await c.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    await c.send_raw(body + b".\r\n")
    return await c.reply()


# -- inbound ---------------------------------------------------------------------------------


async def test_starttls_offered_upgrade_and_relay(tmp_path: Path, backend: RecordingBackend):
    async with running_gate(tmp_path, inbound_tls("may"), backend) as gate:
        c = await gate.connect()
        ehlo = await c.cmd("EHLO before.example")
        assert "250-STARTTLS" in ehlo
        await upgrade(c)
        assert tls_version(c) in ("TLSv1.2", "TLSv1.3")
        # after the handshake the session starts over: EHLO again, STARTTLS no longer offered
        ehlo = await c.cmd("EHLO after.example")
        assert ehlo[0] == "250-mx.example.org"
        assert not any("STARTTLS" in line for line in ehlo)
        final = await transaction(c, "friend@example.net", "foo@bar.org")
        assert final[0].startswith("250 2.0.0 Ok: queued as ")
        assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
    [message] = backend.messages
    received = message.content.split(b"\r\n\t", 2)
    # the HELO name given before TLS is forgotten; the header names the TLS protocol
    assert received[0] == b"Received: from after.example (unknown [127.0.0.2])"
    assert received[1].startswith(b"by mx.example.org (smtpgate) with ESMTPS id ")
    assert message.content.endswith(BODY)
    assert message.xforward.get("HELO") == "after.example"
    assert "disconnect from unknown[127.0.0.2] ehlo=2 starttls=1 mail=1 rcpt=1" in gate.log


async def test_plaintext_session_says_esmtp(tmp_path: Path, backend: RecordingBackend):
    async with running_gate(tmp_path, inbound_tls("may"), backend) as gate:
        c = await gate.connect()
        await c.cmd("EHLO plain.example")
        assert (await transaction(c, "a@example.net", "foo@bar.org"))[0].startswith("250 ")
    [message] = backend.messages
    assert b"\r\n\tby mx.example.org (smtpgate) with ESMTP id " in message.content


async def test_helo_name_is_forgotten_after_starttls(tmp_path: Path, backend: RecordingBackend):
    cf = inbound_tls("may") + "smtpd_helo_required = yes\n"
    async with running_gate(tmp_path, cf, backend) as gate:
        c = await gate.connect()
        await c.cmd("EHLO before.example")
        await upgrade(c)
        assert await c.cmd("MAIL FROM:<a@example.net>") == ["503 5.5.1 Error: send HELO/EHLO first"]
        await c.cmd("EHLO after.example")
        assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
    assert backend.connections == []


async def test_second_starttls_and_argument_are_refused(tmp_path: Path, backend: RecordingBackend):
    async with running_gate(tmp_path, inbound_tls("may"), backend) as gate:
        c = await gate.connect()
        await c.cmd("EHLO client.example")
        assert await c.cmd("STARTTLS now") == ["501 5.5.4 Syntax: STARTTLS"]
        await upgrade(c)
        assert await c.cmd("STARTTLS") == ["554 5.5.1 Error: TLS already active"]
        assert await c.cmd("STARTTLS x") == ["501 5.5.4 Syntax: STARTTLS"]
        # the TLS session is still usable
        assert (await c.cmd("EHLO client.example"))[0] == "250-mx.example.org"
        assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]
        assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
        assert await c.closed()


async def test_plaintext_pipelined_after_starttls_is_discarded(
    tmp_path: Path, backend: RecordingBackend
):
    """CVE-2024-34083 shape: commands sent in clear text behind STARTTLS must not run."""
    async with running_gate(tmp_path, inbound_tls("may"), backend) as gate:
        c = await gate.connect()
        await c.cmd("EHLO client.example")
        await c.send_raw(b"STARTTLS\r\nMAIL FROM:<evil@evil.example>\r\nRCPT TO:<foo@bar.org>\r\n")
        assert await c.reply() == ["220 2.0.0 Ready to start TLS"]
        await c.starttls(client_context(), server_hostname="localhost")
        # the first reply inside TLS is the one to our NOOP, not to the injected commands
        assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]
        assert await c.cmd("RCPT TO:<foo@bar.org>") == ["503 5.5.1 Error: need MAIL command"]
        assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
        assert await c.closed()
    assert backend.connections == []
    assert "evil" not in gate.log
    assert "noop=1" in gate.log and "mail=" not in gate.log.split("disconnect from")[-1]


async def test_encrypt_requires_starttls_first(tmp_path: Path, backend: RecordingBackend):
    async with running_gate(tmp_path, inbound_tls("encrypt"), backend) as gate:
        c = await gate.connect()
        assert "250-STARTTLS" in await c.cmd("EHLO client.example")
        need = ["530 5.7.0 Must issue a STARTTLS command first"]
        assert await c.cmd("MAIL FROM:<a@example.net>") == need
        assert await c.cmd("RCPT TO:<foo@bar.org>") == need
        assert await c.cmd("DATA") == need
        assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]
        await upgrade(c)
        await c.cmd("EHLO client.example")
        final = await transaction(c, "a@example.net", "foo@bar.org")
        assert final[0].startswith("250 ")
    assert len(backend.messages) == 1
    assert backend.messages[0].mail_from == "a@example.net"


async def test_no_certificate_no_starttls(tmp_path: Path, backend: RecordingBackend):
    cf = MAIN_CF + "smtpd_tls_security_level = may\n"  # no smtpd_tls_cert_file
    async with running_gate(tmp_path, cf, backend) as gate:
        c = await gate.connect()
        ehlo = await c.cmd("EHLO client.example")
        assert ehlo[0] == "250-mx.example.org"
        assert not any("STARTTLS" in line for line in ehlo)
        reply = await c.cmd("STARTTLS")
        assert reply[0][:3] == "502"
        assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]


async def test_no_certificate_starttls_replies_like_postfix(
    tmp_path: Path, backend: RecordingBackend
):
    """Postfix 3.7 without TLS: argument check first, then 'command not implemented'."""
    cf = MAIN_CF + "smtpd_tls_security_level = none\n"
    async with running_gate(tmp_path, cf, backend) as gate:
        c = await gate.connect()
        await c.cmd("EHLO client.example")
        assert await c.cmd("STARTTLS foo") == ["501 5.5.4 Syntax: STARTTLS"]
        assert await c.cmd("STARTTLS") == ["502 5.5.1 Error: command not implemented"]


# -- outbound ----------------------------------------------------------------------------------


def outbound_tls(level: str, cafile: Path | None = None) -> str:
    text = f"{MAIN_CF}smtp_tls_security_level = {level}\n"
    if cafile is not None:
        text += f"smtp_tls_CAfile = {cafile}\n"
    return text


async def relay_one(gate: Gate) -> tuple[list[str], list[str] | None]:
    """RCPT reply and the reply to the dot (None when no recipient was accepted)."""
    c = await gate.connect()
    await c.cmd("EHLO client.example")
    assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
    rcpt = await c.cmd("RCPT TO:<foo@bar.org>")
    if not rcpt[0].startswith("250"):
        assert (await c.cmd("DATA"))[0][:3] in ("503", "554")
        return rcpt, None
    assert (await c.cmd("DATA"))[0].startswith("354")
    await c.send_raw(BODY + b".\r\n")
    return rcpt, await c.reply()


@pytest.mark.parametrize("level", ["encrypt", "verify"])
async def test_outbound_tls_is_used(tmp_path: Path, level: str):
    async with RecordingBackend(starttls=True) as backend:
        cf = outbound_tls(level, test_pki().ca_cert if level == "verify" else None)
        async with running_gate(tmp_path, cf, backend) as gate:
            rcpt, final = await relay_one(gate)
    assert rcpt == ["250 2.1.5 Ok"]
    assert final is not None and final[0].startswith("250 2.0.0 Ok: queued as")
    [message] = backend.messages
    assert message.tls is True
    assert "STARTTLS" in backend.connections[0].commands


async def test_outbound_verify_with_wrong_ca_defers(tmp_path: Path):
    async with RecordingBackend(starttls=True) as backend:
        cf = outbound_tls("verify", test_pki().other_ca_cert)
        async with running_gate(tmp_path, cf, backend) as gate:
            rcpt, final = await relay_one(gate)
            log = gate.log
    assert rcpt == ["451 4.3.0 Error: queue file write error"]
    assert final is None
    assert backend.messages == []
    # never a fallback to plaintext: no MAIL reached the backend on any connection
    assert not any(cmd.startswith("MAIL") for conn in backend.connections for cmd in conn.commands)
    assert "warning:" in log and "TLS" in log


async def test_outbound_encrypt_without_starttls_offer_defers(tmp_path: Path):
    async with RecordingBackend(starttls=False) as backend:
        async with running_gate(tmp_path, outbound_tls("encrypt"), backend) as gate:
            rcpt, final = await relay_one(gate)
    assert rcpt == ["451 4.3.0 Error: queue file write error"]
    assert final is None
    assert backend.messages == []
    assert not any(cmd.startswith("MAIL") for conn in backend.connections for cmd in conn.commands)
