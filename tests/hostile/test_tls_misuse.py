"""T01-T09: STARTTLS misuse against smtpgate (inbound TLS with the test PKI)."""

from __future__ import annotations

import asyncio
import ssl
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.hostile.conftest import Env, body, code, open_env, read_until_closed
from tests.serve.certs import test_pki
from tests.serve.client import LineClient


def _tls_cf() -> str:
    pki = test_pki()
    return (
        "smtpd_tls_security_level = may\n"
        f"smtpd_tls_cert_file = {pki.server_cert}\n"
        f"smtpd_tls_key_file = {pki.server_key}\n"
    )


def client_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(test_pki().ca_cert))


@pytest.fixture
async def tenv(tmp_path: Path) -> AsyncIterator[Env]:
    async with open_env(tmp_path, _tls_cf(), overrides=("smtpd_timeout=1s",)) as env:
        yield env


async def upgrade(env: Env, c: LineClient) -> None:
    assert await env.cmd(c, "STARTTLS") == ["220 2.0.0 Ready to start TLS"]
    await c.starttls(client_context(), server_hostname="localhost")


async def test_t01_plaintext_injected_behind_starttls_is_discarded(tenv: Env) -> None:
    c = await tenv.session()
    await c.send_raw(
        b"STARTTLS\r\nMAIL FROM:<evil@evil.example>\r\nRCPT TO:<u@our.example>\r\nDATA\r\n"
    )
    assert await tenv.reply(c) == ["220 2.0.0 Ready to start TLS"]
    await c.starttls(client_context(), server_hostname="localhost")
    assert await tenv.cmd(c, "NOOP") == ["250 2.0.0 Ok"]
    assert await tenv.cmd(c, "RCPT TO:<u@our.example>") == ["503 5.5.1 Error: need MAIL command"]
    assert tenv.backend.connections == []
    await tenv.finish()


async def test_t02_starttls_resets_the_transaction_and_helo(tenv: Env) -> None:
    c = await tenv.session()
    assert await tenv.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
    assert await tenv.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    await upgrade(tenv, c)
    assert await tenv.cmd(c, "DATA") == ["503 5.5.1 Error: need RCPT command"]
    ehlo = await tenv.cmd(c, "EHLO client.example")
    assert not any("STARTTLS" in line or "AUTH" in line for line in ehlo)
    final = await tenv.transaction(c, body("t02"))
    assert final[0].startswith("250 ")
    assert "ESMTPS" in tenv.stored("t02")[0].content.decode()
    await tenv.finish()


async def test_t03_double_starttls(tenv: Env) -> None:
    c = await tenv.session()
    await upgrade(tenv, c)
    assert await tenv.cmd(c, "STARTTLS") == ["554 5.5.1 Error: TLS already active"]
    assert await tenv.cmd(c, "NOOP") == ["250 2.0.0 Ok"]
    await tenv.finish()


async def test_t04_garbage_instead_of_a_handshake(tenv: Env) -> None:
    c = await tenv.session()
    assert await tenv.cmd(c, "STARTTLS") == ["220 2.0.0 Ready to start TLS"]
    await c.send_raw(b"MAIL FROM:<evil@evil.example>\r\n" * 20)
    lines, closed = await read_until_closed(c)
    assert closed and not any(line.startswith("250") for line in lines), lines
    assert tenv.backend.connections == []
    await tenv.finish()


async def test_t05_no_handshake_at_all(tenv: Env) -> None:
    c = await tenv.session()
    assert await tenv.cmd(c, "STARTTLS") == ["220 2.0.0 Ready to start TLS"]
    started = time.monotonic()
    lines, closed = await read_until_closed(c, deadline=4)
    assert closed and lines == []
    assert time.monotonic() - started < 3
    await tenv.finish()


async def test_t06_handshake_flood(tenv: Env) -> None:
    async def one(n: int) -> bool:
        c = await tenv.connect(f"127.0.0.{2 + n % 4}")
        await c.cmd("EHLO flood.example")
        await c.cmd("STARTTLS")
        await c.send_raw(b"\x16\x03\x01\x00\x05junk" if n % 2 else b"")
        _, closed = await read_until_closed(c, deadline=4)
        return closed

    assert all(await asyncio.gather(*(one(n) for n in range(30))))
    await tenv.finish()


async def test_t07_tls_1_0_is_refused(tenv: Env) -> None:
    c = await tenv.session()
    assert await tenv.cmd(c, "STARTTLS") == ["220 2.0.0 Ready to start TLS"]
    context = client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = ssl.TLSVersion.TLSv1
        try:
            context.set_ciphers("ALL:@SECLEVEL=0")
        except ssl.SSLError:
            pass
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await c.starttls(context, server_hostname="localhost")
    await tenv.finish()


async def test_t08_starttls_with_an_argument(tenv: Env) -> None:
    c = await tenv.session()
    assert await tenv.cmd(c, "STARTTLS now") == ["501 5.5.4 Syntax: STARTTLS"]
    assert await tenv.cmd(c, "NOOP") == ["250 2.0.0 Ok"]
    await tenv.finish()


async def test_t09_starttls_inside_a_transaction_after_data_refused(tenv: Env) -> None:
    """STARTTLS typed as message content is content, not a command."""
    c = await tenv.session()
    final = await tenv.transaction(c, body("t09", b"STARTTLS\r\nQUIT\r\n"))
    assert final[0].startswith("250 ")
    assert code(await tenv.cmd(c, "NOOP")) == 250
    assert tenv.stored("t09")[0].content.endswith(b"STARTTLS\r\nQUIT\r\n")
    await tenv.finish()
