"""Real milters behind a deployed smtpgate (2 workers, dropped privileges), with an SMTP
backend that stores what it gets.

rspamd (the issue's "done when"):

- GTUBE gets rspamd's 554 and nothing reaches the backend;
- rspamd's "add header" verdict is in the message the backend stores;
- its "rewrite subject" verdict changes the Subject the backend stores;
- clean mail passes, and the client's 250 is the backend's;
- with rspamd stopped, the client gets 451 4.7.1 (milter_default_action = tempfail) and
  nothing is stored.

OpenDKIM signs what smtpgate relays: the backend stores the signed message, and a
verifying OpenDKIM (the backend's, as it were) finds the signature good.
"""

from __future__ import annotations

from pathlib import Path

from tests.milter.daemons import Daemon, OpenDkim, free_port, gtube
from tests.milter.test_daemons import deliver, headers, session
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import running_gate

MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 192.0.2.0/24
relay_domains = bar.org
smtpd_recipient_restrictions = reject_unauth_destination
smtpd_milters = {milter}
milter_default_action = tempfail
"""


def message(subject: str, body: str) -> bytes:
    return (
        f"From: friend@example.net\r\nTo: foo@bar.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <{abs(hash(body))}@example.net>\r\nDate: Tue, 8 Dec 2026 10:00:00 +0000\r\n"
        f"\r\n{body}\r\n"
    ).encode()


async def send(c: LineClient, content: bytes) -> list[str]:
    assert (await c.cmd("EHLO client.example"))[0].startswith("250-")
    assert await c.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
    assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
    assert (await c.cmd("DATA"))[0].startswith("354")
    await c.send_raw(content + b".\r\n")
    return await c.reply()


async def test_rspamd_verdicts_through_serve(rspamd_milter: Daemon, tmp_path: Path):
    cf = MAIN_CF.format(milter=rspamd_milter.endpoint)
    async with RecordingBackend() as backend, running_gate(tmp_path, cf, backend) as gate:
        c = await gate.connect()
        final = await send(c, message("spam", gtube("reject")))
        assert final[0].startswith("554 5.7.1 "), final
        assert backend.messages == []
        assert await c.cmd("RSET") == ["250 2.0.0 Ok"]
        final = await send(c, message("tagged", gtube("add header")))
        assert final[0].startswith("250 2.0.0 Ok: queued as "), final
        final = await send(c, message("rewritten", gtube("rewrite subject")))
        assert final[0].startswith("250 2.0.0 Ok: queued as "), final
        final = await send(c, message("clean", "Hello, this is a plain message."))
        assert final[0] == f"250 2.0.0 Ok: queued as {backend.messages[-1].queue_id}", final
        await c.cmd("QUIT")
        log = await gate.wait_log("disconnect from")
    tagged, rewritten, clean = backend.messages
    assert b"\r\nX-Spam: Yes\r\n" in tagged.content.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    head = rewritten.content.split(b"\r\n\r\n", 1)[0]
    assert b"Subject: rewritten" not in head and b"Subject: " in head, head
    assert b"Subject: clean\r\n" in clean.content
    # smtpgate's Received header is there, below anything rspamd added
    assert b"Received: from client.example (unknown [127.0.0.2])" in clean.content
    assert ": milter-reject: END-OF-MESSAGE from unknown[127.0.0.2]: 5.7.1 " in log


async def test_rspamd_stopped_is_451_and_nothing_stored(tmp_path: Path):
    endpoint = f"inet:127.0.0.1:{free_port()}"  # where a stopped rspamd listened
    cf = MAIN_CF.format(milter=endpoint)
    async with RecordingBackend() as backend, running_gate(tmp_path, cf, backend) as gate:
        c = await gate.connect()
        assert (await c.cmd("EHLO client.example"))[0].startswith("250-")
        assert await c.cmd("MAIL FROM:<friend@example.net>") == [
            "451 4.7.1 Service unavailable - try again later"
        ]
        await c.cmd("QUIT")
        log = await gate.wait_log("disconnect from")
    assert backend.messages == [] and backend.connections == []
    assert f"warning: connect to Milter service {endpoint}: Connection refused" in log


async def test_opendkim_signs_what_smtpgate_relays(
    dkim_signer: OpenDkim, dkim_verifier: OpenDkim, tmp_path: Path
):
    cf = MAIN_CF.format(milter=dkim_signer.endpoint)
    content = (
        b"From: Sender <sender@example.org>\r\nTo: foo@bar.org\r\nSubject: signed\r\n"
        b"Message-ID: <dkim@example.org>\r\nDate: Tue, 8 Dec 2026 10:00:00 +0000\r\n"
        b"\r\nThis message is signed by the milter behind smtpgate.\r\n"
    )
    async with RecordingBackend() as backend, running_gate(tmp_path, cf, backend) as gate:
        c = await gate.connect()
        final = await send(c, content)
        assert final[0].startswith("250 2.0.0 Ok: queued as "), final
        await c.cmd("QUIT")
    [stored] = backend.messages
    signature = headers(stored.content)["DKIM-Signature"]
    assert signature is not None and "d=example.org" in signature, stored.content
    verifier = session(dkim_verifier)
    _, verified = await deliver(verifier, stored.content)
    await verifier.close()
    assert "dkim=pass" in headers(verified.content)["Authentication-Results"]
