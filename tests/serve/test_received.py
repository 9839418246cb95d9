"""What a client sends reaches the headers smtpgate writes only in Postfix's cleaned-up form.

The HELO names and what Postfix 3.7.11 wrote for them in its Received: header were
observed with a throwaway instance (tests/postfix_instance.py, ``postcat -bh``): control
characters and DEL become ``?`` (printable()), so do space and ``<>()\\";@`` (neuter()),
UTF-8 stays. A PREPEND action whose text carries the HELO name (a regexp table's ``$1``)
is cleaned the same way, and Postfix writes PREPEND headers above its Received: header.
XFORWARD forwards the cleaned-up name, as Postfix's smtpd_proxy does, and smtpgate's
queue id as IDENT (a Postfix backend logs it as ``orig_queue_id=``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.serve.backend import RecordingBackend
from tests.serve.conftest import running_gate

MAIN_CF = """\
myhostname = mx.example.org
relay_domains = bar.org
smtpd_helo_restrictions = check_helo_access regexp:$config_directory/helo_prepend
"""
TABLES = {"helo_prepend": "/^(.*)$/ PREPEND X-Helo: $1\n"}

# EHLO argument as sent -> the name in Postfix 3.7.11's Received: header.
POSTFIX_HELO = [
    (b"a\x1bb\x7f.test", "a?b?.test"),
    (b"ctl\x01\x02\x08\x0b\x0c.test", "ctl????.test"),  # \x0b\x0c split words: one "?"
    (b"tab\there.test", "tab?here.test"),
    (b"two words", "two?words"),
    (b'x<y>(z)\\q"r;s@t', "x?y??z??q?r?s?t"),
    ("caf\u00e9.test".encode(), "caf\u00e9.test"),
    (b"[192.0.2.1]", "[192.0.2.1]"),
]


@pytest.mark.parametrize(("sent", "shown"), POSTFIX_HELO)
async def test_helo_name_in_headers_is_postfix_cleaned(
    tmp_path: Path, backend: RecordingBackend, sent: bytes, shown: str
) -> None:
    async with running_gate(tmp_path, MAIN_CF, backend, TABLES) as gate:
        c = await gate.connect(source="127.0.0.2")
        await c.send_raw(b"EHLO " + sent + b"\r\n")
        assert (await c.reply())[-1].startswith("250 ")
        assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
        assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
        assert (await c.cmd("DATA"))[0].startswith("354 ")
        await c.send_raw(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        assert (await c.reply())[0].startswith("250 ")
    [message] = backend.messages
    head = message.content.split(b"\r\n\r\n", 1)[0].decode()
    assert re.match(
        rf"X-Helo: {re.escape(shown)}\r\n"
        rf"Received: from {re.escape(shown)} \(unknown \[127\.0\.0\.2\]\)\r\n"
        r"\tby mx\.example\.org \(smtpgate\) with ESMTP id \w+\r\n"
        r"\tfor <foo@bar\.org>; .+\r\n"
        r"Subject: hi$",
        head,
    ), head
    assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", head.replace("\r\n", ""))
    assert message.xforward["HELO"] == shown.replace("\u00e9", "+C3+A9")  # xtext
    # XFORWARD IDENT is smtpgate's queue id, the one in its log and its Received: header
    [queue_id] = re.findall(r": (\w+): client=unknown\[127\.0\.0\.2\]$", gate.log, re.M)
    assert message.xforward["IDENT"] == queue_id
    assert f"with ESMTP id {queue_id}\r\n" in head


async def test_recipient_in_received_header_is_quoted_as_postfix_does(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    """data_cmd(): ``for <%s>`` with quote_822_local(recipient)."""
    async with running_gate(tmp_path, MAIN_CF, backend, TABLES) as gate:
        c = await gate.connect(source="127.0.0.2")
        assert (await c.cmd("EHLO client.example.net"))[-1].startswith("250 ")
        assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
        assert await c.cmd('RCPT TO:<"a b"@bar.org>') == ["250 2.1.5 Ok"]
        assert (await c.cmd("DATA"))[0].startswith("354 ")
        await c.send_raw(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        assert (await c.reply())[0].startswith("250 ")
    [message] = backend.messages
    assert b'\r\n\tfor <"a b"@bar.org>; ' in message.content
