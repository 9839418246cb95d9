"""``smtpgate explain`` asks the configured milters, as ``serve`` does: a milter's refusal is
in explain's dialogue and its log lines."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from smtpgate.milter import protocol as p
from tests.milter.fakemilter import FakeMilter, answering, replycode


async def test_explain_shows_the_milters_refusal(tmp_path: Path) -> None:
    refusal = replycode("553 5.7.1 Sender refused by the milter")
    async with FakeMilter(answering(p.SMFIC_MAIL, refusal)) as milter:
        (tmp_path / "main.cf").write_text(
            "myhostname = mx.example.org\nrelay_domains = bar.org\n"
            f"relayhost = [127.0.0.1]:9\nsmtpd_milters = {milter.name}\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "smtpgate",
            "explain",
            "-c",
            str(tmp_path / "main.cf"),
            "--client",
            "192.0.2.1",
            "--ehlo",
            "--helo",
            "client.example",
            "--from",
            "someone@example.net",
            "--to",
            "foo@bar.org",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert any(conn.of(p.SMFIC_MAIL) for conn in milter.connections)
    text = out.decode()
    assert "553 5.7.1 Sender refused by the milter" in text
    assert (
        "NOQUEUE: milter-reject: MAIL from unknown[192.0.2.1]: 553 5.7.1 Sender refused by "
        "the milter; from=<someone@example.net> proto=ESMTP helo=<client.example>"
    ) in json.dumps(json.loads(text))
