"""reject_unverified_recipient, smtpgate against Postfix 3.7 (tests/postfix_instance.py:
a whole Postfix with its verify(8), qmgr and smtp client), both in front of the same
aiosmtpd backend that refuses unknown users.

The same dialogue goes to both: an unknown recipient twice (the first answer comes from a
probe, the second from the cache), then a known one.  The replies and the ``NOQUEUE:
reject`` log lines must be the same, and both probe with ``MAIL FROM:<double-bounce@$myorigin>``.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from tests.postfix_instance import POSTFIX, PostfixInstance
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import running_gate
from tests.verify.conftest import rcpts

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(not os.path.exists(POSTFIX), reason="Postfix is not installed"),
]

COMMON_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_recipient_restrictions = reject_unauth_destination, reject_unverified_recipient
"""
RCPTS = ["nobody@bar.org", "nobody@bar.org", "alice@bar.org"]


async def smtpgate_side(
    tmp_path: Path, main_cf: str, backend: RecordingBackend
) -> tuple[list[list[str]], list[str]]:
    async with running_gate(tmp_path, main_cf, backend, in_process="reads its log") as gate:
        client = await gate.connect()
        assert (await client.cmd("EHLO client.example.net"))[-1].startswith("250 ")
        assert await client.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
        replies = [await client.cmd(f"RCPT TO:<{rcpt}>") for rcpt in RCPTS]
        await client.cmd("QUIT")
    lines = [line.split(": ", 1)[1] for line in gate.log.splitlines() if " NOQUEUE: " in line]
    return replies, lines


def postfix_side(main_cf: str, backend: RecordingBackend) -> tuple[list[list[str]], list[str]]:
    with PostfixInstance(main_cf + f"relayhost = {backend.relayhost}\n") as pf:
        d = pf.dialogue("127.0.0.2", "client.example.net", "a@example.net", RCPTS, ehlo=True)
    replies = [e.reply for e in d.exchanges if e.command.startswith("RCPT")]
    return replies, d.noqueue


# smtpgate's separate probe: a table after the restriction could still refuse.
SEPARATE = (
    "smtpd_recipient_restrictions = reject_unauth_destination, reject_unverified_recipient,\n"
    "    check_recipient_access inline:{ trap@bar.org=REJECT }\n"
)


@pytest.mark.parametrize(
    "extra",
    [
        "",  # Postfix's defaults: 450, a deferral ("unverified address")
        "unverified_recipient_reject_code = 550\n",  # "undeliverable address"
        "unverified_recipient_reject_code = 550\nunverified_recipient_reject_reason = "
        "Address lookup failure\n",
        "unverified_recipient_reject_code = 550\n" + SEPARATE,
    ],
)
async def test_replies_and_log_lines_match_postfix(tmp_path: Path, extra: str) -> None:
    """The first three cases use smtpgate's lock-step probe (the client's RCPT), the
    last a separate probe."""
    unknown = "550 5.1.1 <nobody@bar.org>: Recipient address rejected: User unknown"
    main_cf = COMMON_CF + extra
    async with RecordingBackend(rcpt_replies={"nobody@bar.org": unknown}) as backend:
        expected = await asyncio.to_thread(postfix_side, main_cf, backend)
        postfix_probes = [c for conn in backend.connections for c in conn.commands]
        backend.connections.clear()
        got = await smtpgate_side(tmp_path, main_cf, backend)
        assert len(rcpts(backend, "nobody@bar.org")) == 1
    assert got == expected
    assert len(expected[1]) == 2  # both refusals logged
    # Postfix's probe: MAIL FROM the double-bounce sender (with the SIZE of its probe
    # message, which smtpgate has none of), one RCPT per address, RSET.
    assert "MAIL FROM:<double-bounce@mx.example.org> SIZE=233" in postfix_probes
    assert postfix_probes[postfix_probes.index("RCPT TO:<nobody@bar.org>") + 1] == "RSET"
    assert [c for c in postfix_probes if re.match("RCPT", c)] == [
        "RCPT TO:<nobody@bar.org>",
        "RCPT TO:<alice@bar.org>",
    ]
