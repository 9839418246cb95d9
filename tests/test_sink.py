"""``smtpgate sink`` stores what Postfix's delivery would store, behind a real smtpgate.

The expected files are Postfix 3.7's own: a throwaway instance delivering through
virtual(8) to Maildirs wrote, for a null sender and three recipients (one of them
``"a b"@bar.org``), three files each starting ``Return-Path: <>``, ``X-Original-To:
"a b"@bar.org``, ``Delivered-To: "a b"@bar.org``, then its smtpd's ``Received:`` header
and the message, with LF line ends and a 5,000-character line kept whole.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtpgate.sink import start_sink
from tests.serve.conftest import Gate, running_gate

MAIN_CF = "myhostname = mx.example.org\nrelay_domains = bar.org\n"
LONG = b"L" * 5000  # serve relays it; the old sink answered 500 Line too long


@pytest.fixture
async def gate_and_sink(tmp_path: Path) -> AsyncIterator[tuple[Gate, Path]]:
    maildir = tmp_path / "mail"
    sink = await start_sink("127.0.0.1", 0, maildir)
    port = sink.sockets[0].getsockname()[1]
    try:
        async with running_gate(tmp_path, MAIN_CF, None, relayhost=f"[127.0.0.1]:{port}") as gate:
            yield gate, maildir
    finally:
        sink.close()
        await sink.wait_closed()


async def send(gate: Gate, sender: str, recipients: list[str], body: bytes) -> str:
    c = await gate.connect(source="127.0.0.2")
    assert (await c.cmd("EHLO client.example.net"))[-1].startswith("250 ")
    assert await c.cmd(f"MAIL FROM:<{sender}>") == ["250 2.1.0 Ok"]
    for rcpt in recipients:
        assert await c.cmd(f"RCPT TO:<{rcpt}>") == ["250 2.1.5 Ok"]
    assert await c.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    await c.send_raw(body + b".\r\n")
    [final] = await c.reply()
    assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
    return final


async def test_sink_stores_postfix_delivery_files(gate_and_sink: tuple[Gate, Path]) -> None:
    gate, maildir = gate_and_sink
    body = b"Subject: t\r\n\r\nbody\r\n" + LONG + b"\r\n"
    final = await send(gate, "", ["foo@bar.org", '"a b"@bar.org', "x.y@bar.org"], body)
    m = re.fullmatch(r"250 2\.0\.0 Ok: queued as (\S+)", final)
    assert m, final  # the client's 250 is the sink's 250
    files = sorted((maildir / "new").iterdir())
    assert len(files) == 3  # one per recipient, as Postfix delivers
    texts = {}
    for path in files:
        assert path.name.split(".")[1].startswith(m[1])
        text = path.read_bytes()
        assert b"\r" not in text
        head, _, rest = text.partition(b"\nReceived: from ")
        texts[head] = rest
    assert sorted(texts) == [
        b'Return-Path: <>\nX-Original-To: "a b"@bar.org\nDelivered-To: "a b"@bar.org',
        b"Return-Path: <>\nX-Original-To: foo@bar.org\nDelivered-To: foo@bar.org",
        b"Return-Path: <>\nX-Original-To: x.y@bar.org\nDelivered-To: x.y@bar.org",
    ]
    for rest in texts.values():
        # the sink's Received: names the client it talked to: smtpgate, not the real client
        assert re.match(
            rb"mx\.example\.org \(unknown \[127\.0\.0\.1\]\)\n"
            rb"\tby sink\.localdomain \(smtpgate sink\) with ESMTP id \S+;\n\t.+\n"
            rb"Received: from client\.example\.net \(unknown \[127\.0\.0\.2\]\)\n",
            rest,
        ), rest
        assert rest.endswith(b"\nSubject: t\n\nbody\n" + LONG + b"\n")


async def test_sink_single_recipient_return_path(gate_and_sink: tuple[Gate, Path]) -> None:
    gate, maildir = gate_and_sink
    await send(gate, "friend@example.net", ["foo@bar.org"], b"Subject: hi\r\n\r\nhi\r\n")
    [stored] = (maildir / "new").iterdir()
    text = stored.read_bytes()
    assert text.startswith(
        b"Return-Path: <friend@example.net>\nX-Original-To: foo@bar.org\n"
        b"Delivered-To: foo@bar.org\nReceived: from mx.example.org (unknown [127.0.0.1])\n"
    )
    assert b"\tfor <foo@bar.org>; " in text
