"""The `make run` demo, as processes: smtpgate sink + smtpgate serve with examples/main.cf.

The same commands the Makefile runs (on free ports instead of 2525/2526), then the seed's
telnet lines: qq.com gets 521 and a closed connection, a good sender's message becomes a
file in the Maildir.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve.client import LineClient
from tests.test_newcomer import free_port, wait_for_port

EXAMPLES = Path(__file__).parents[1] / "examples"
SMTPGATE = [sys.executable, "-m", "smtpgate"]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    sink_port, gate_port = free_port(), free_port()
    maildir = tmp_path / "mail"
    sink = subprocess.Popen(
        [*SMTPGATE, "sink", "--listen", f"127.0.0.1:{sink_port}", "--maildir", str(maildir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    gate = subprocess.Popen(
        [
            *SMTPGATE,
            "serve",
            "-c",
            str(EXAMPLES / "main.cf"),
            "-o",
            f"listen=127.0.0.1:{gate_port}",
            "-o",
            f"relayhost=[127.0.0.1]:{sink_port}",
            "-o",
            f"maillog_file={tmp_path / 'maillog'}",
            "-o",
            "pid_file=",
            "-o",
            "smtpgate_user=nobody",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(sink_port)
        wait_for_port(gate_port)
        yield gate_port, maildir
    finally:
        for proc in (gate, sink):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in (gate, sink):
            proc.communicate(timeout=30)


async def test_demo_seed_session(demo: tuple[int, Path]):
    port, maildir = demo
    c = await LineClient.connect("127.0.0.1", port)
    assert await c.reply() == ["220 mx.example.org ESMTP Postfix"]
    assert await c.cmd("helo me.testing.example.com") == ["250 mx.example.org"]
    assert await c.cmd("mail from: 318787866@qq.com") == ["250 2.1.0 Ok"]
    assert await c.cmd("rcpt to: foo@bar.org") == [
        "521 5.7.1 <318787866@qq.com>: Sender address rejected: go away"
    ]
    assert await c.closed()
    await c.close()

    c = await LineClient.connect("127.0.0.1", port)
    await c.reply()
    await c.cmd("helo me.testing.example.com")
    assert await c.cmd("mail from: friend@example.net") == ["250 2.1.0 Ok"]
    assert await c.cmd("rcpt to: foo@bar.org") == ["250 2.1.5 Ok"]
    assert await c.cmd("data") == ["354 End data with <CR><LF>.<CR><LF>"]
    await c.send_raw(b"Subject: hello\r\n\r\nhi there\r\n.\r\n")
    [final] = await c.reply()
    assert final.startswith("250 2.0.0 Ok: queued as ")
    assert await c.cmd("quit") == ["221 2.0.0 Bye"]
    await c.close()
    [stored] = list((maildir / "new").iterdir())
    text = stored.read_bytes()
    assert text.startswith(
        b"Return-Path: <friend@example.net>\nX-Original-To: foo@bar.org\n"
        b"Delivered-To: foo@bar.org\nReceived: from mx.example.org (unknown [127.0.0.1])\n"
    )
    assert text.endswith(b"Subject: hello\n\nhi there\n")
    # the client's 250 is the sink's 250: its queue id names the file
    assert stored.name.split(".")[1].startswith(final.rsplit(" ", 1)[1])
