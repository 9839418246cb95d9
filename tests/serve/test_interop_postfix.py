"""smtpgate in front of a real Postfix 3.7 (tests/postfix_instance.py) as its backend.

Postfix trusts smtpgate for XFORWARD (``smtpd_authorized_xforward_hosts``). What Postfix
3.7 does with it (observed, not assumed): its smtpd logs
``QUEUEID: client=unknown[127.0.0.1], orig_queue_id=GATEID, orig_client=unknown[127.0.0.2]``
-- ``client=`` is always the real peer (smtpgate), the forwarded client is ``orig_client=``,
smtpgate's queue id (XFORWARD IDENT) is ``orig_queue_id=`` -- and the queue
file carries ``log_client_address=127.0.0.2``, ``log_helo_name=...`` for the later
delivery logs. Its own Received: header and its access decisions (and so its NOQUEUE
reject lines) use the real peer. Relayed mail stays in Postfix's queue
(``defer_transports``), where ``postqueue -p`` and ``postcat`` find it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postfix_instance import POSTFIX, PostfixInstance
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, running_gate

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(not os.path.exists(POSTFIX), reason="Postfix is not installed"),
]

BACKEND_CF = """\
myhostname = backend.test
mydestination =
relay_domains = bar.org
smtpd_authorized_xforward_hosts = 127.0.0.0/8
smtpd_recipient_restrictions =
    check_recipient_access inline:{ {nobody@bar.org = REJECT no such user} },
    permit_mynetworks, reject_unauth_destination
defer_transports = relay, smtp, local, virtual
"""
GATE_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_proxy_timeout = 20s
smtp_connect_timeout = 5s
"""
BODY = (
    b"From: friend@example.net\r\nSubject: interop\r\n"
    b"Message-ID: <interop@example.net>\r\n\r\nhi\r\n"
)


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixInstance]:
    with PostfixInstance(BACKEND_CF) as pf:
        yield pf


def postqueue(pf: PostfixInstance) -> str:
    proc = subprocess.run(
        ["/usr/sbin/postqueue", "-c", str(pf.etc), "-p"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout


def postcat(pf: PostfixInstance, queue_id: str) -> str:
    proc = subprocess.run(
        ["/usr/sbin/postcat", "-c", str(pf.etc), "-q", queue_id],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout


async def wait_maillog(pf: PostfixInstance, pattern: str, offset: int) -> re.Match[str]:
    """Poll Postfix's maillog (bounded) for *pattern* in what was written after *offset*."""
    regex = re.compile(pattern, re.M)
    async with asyncio.timeout(10):
        while True:
            with pf.maillog.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            m = regex.search(text)
            if m:
                return m
            await asyncio.sleep(0.05)  # poll interval of a bounded wait for a condition


async def session(gate: Gate) -> LineClient:
    c = await gate.connect(source="127.0.0.2")
    assert (await c.cmd("EHLO client.example.net"))[0] == "250-mx.example.org"
    return c


async def test_relayed_message_lands_in_postfix_queue_with_forwarded_client(
    postfix: PostfixInstance, tmp_path: Path
):
    offset = postfix.maillog.stat().st_size
    async with running_gate(
        tmp_path, GATE_CF, None, relayhost=f"[127.0.0.1]:{postfix.port}"
    ) as gate:
        c = await session(gate)
        assert await c.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
        assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
        assert await c.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        await c.send_raw(BODY + b".\r\n")
        final = await c.reply()
        assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
    # the client's 250 is Postfix's 250, with Postfix's queue id
    # Postfix offers CHUNKING, so smtpgate relays with BDAT; Postfix's reply to BDAT LAST
    # names the octets it received (its reply to the dot would not)
    m = re.fullmatch(r"250 2\.0\.0 Ok: \d+ bytes queued as (?P<qid>[0-9A-Z]+)", final[0])
    assert m, final
    qid = m["qid"]
    [gate_qid] = re.findall(r": (\w+): client=unknown\[127\.0\.0\.2\]$", gate.log, re.M)
    # XFORWARD IDENT: the two logs join on smtpgate's queue id
    await wait_maillog(
        postfix,
        rf"postfix/smtpd\[\d+\]: {qid}: client=unknown\[127\.0\.0\.1\], "
        rf"orig_queue_id={gate_qid}, orig_client=unknown\[127\.0\.0\.2\]$",
        offset,
    )
    assert f"{gate_qid}: proxy-accept: END-OF-MESSAGE" in gate.log
    assert f"queued as {qid};" in gate.log
    queue = postqueue(postfix)
    assert qid in queue and "friend@example.net" in queue and "foo@bar.org" in queue, queue
    content = postcat(postfix, qid)
    # the forwarded client is what Postfix records for its delivery logs
    for attribute in (
        f"log_ident={gate_qid}",
        "log_client_name=unknown",
        "log_client_address=127.0.0.2",
        "log_message_origin=unknown[127.0.0.2]",
        "log_helo_name=client.example.net",
        "log_protocol_name=ESMTP",
    ):
        assert f"named_attribute: {attribute}\n" in content, content
    # smtpgate's Received: header (naming the real client) is below Postfix's own
    assert re.search(
        r"Received: from mx\.example\.org \(unknown \[127\.0\.0\.1\]\)\s+by backend\.test.*\n"
        r"(?:\s.*\n)*Received: from client\.example\.net \(unknown \[127\.0\.0\.2\]\)\n"
        r"\s+by mx\.example\.org \(smtpgate\) with ESMTP id ",
        content,
    ), content
    assert "Subject: interop" in content


async def test_postfix_recipient_reject_reaches_the_client_verbatim(
    postfix: PostfixInstance, tmp_path: Path
):
    offset = postfix.maillog.stat().st_size
    async with running_gate(
        tmp_path, GATE_CF, None, relayhost=f"[127.0.0.1]:{postfix.port}"
    ) as gate:
        c = await session(gate)
        assert await c.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
        assert await c.cmd("RCPT TO:<nobody@bar.org>") == [
            "554 5.7.1 <nobody@bar.org>: Recipient address rejected: no such user"
        ]
        assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
        assert await c.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        await c.send_raw(BODY + b".\r\n")
        final = await c.reply()
        assert re.fullmatch(r"250 2\.0\.0 Ok: \d+ bytes queued as [0-9A-Z]+", final[0]), final
        await c.cmd("QUIT")
        log = gate.log
    assert (
        "proxy-reject: RCPT from unknown[127.0.0.2]: 554 5.7.1 <nobody@bar.org>: "
        "Recipient address rejected: no such user;"
    ) in log
    # Postfix decides (and logs) on its real peer, smtpgate
    await wait_maillog(
        postfix,
        r"postfix/smtpd\[\d+\]: NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: 554 5\.7\.1 "
        r"<nobody@bar\.org>: Recipient address rejected: no such user; "
        r"from=<friend@example\.net> to=<nobody@bar\.org> proto=ESMTP helo=<mx\.example\.org>",
        offset,
    )
    qid = final[0].rsplit(" ", 1)[1]
    queue = postqueue(postfix)
    entry = queue[queue.index(qid) :].split("\n\n", 1)[0]
    assert "foo@bar.org" in entry and "nobody@bar.org" not in entry, queue


async def test_bdat_client_through_smtpgate_to_postfix(postfix: PostfixInstance, tmp_path: Path):
    """A client that sends BDAT (as Exim and many libraries do) through smtpgate to a
    Postfix backend that offers CHUNKING: smtpgate answers the middle chunks itself, relays
    the message with BDAT, and the client's last reply is Postfix's."""
    offset = postfix.maillog.stat().st_size
    first = b"Subject: bdat interop\r\nMessage-ID: <bdat@example.net>\r\n\r\n"
    second = b".leading dot\r\nlast line\r\n"
    async with running_gate(
        tmp_path, GATE_CF, None, relayhost=f"[127.0.0.1]:{postfix.port}"
    ) as gate:
        c = await gate.connect(source="127.0.0.2")
        ehlo = await c.cmd("EHLO client.example.net")
        assert "250 CHUNKING" in ehlo, ehlo
        assert await c.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
        assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
        await c.send_raw(b"BDAT %d\r\n" % len(first) + first)
        assert await c.reply() == [f"250 2.0.0 Ok: {len(first)} bytes"]
        await c.send_raw(b"BDAT %d LAST\r\n" % len(second) + second)
        final = await c.reply()
        assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
    m = re.fullmatch(r"250 2\.0\.0 Ok: (?P<size>\d+) bytes queued as (?P<qid>[0-9A-Z]+)", final[0])
    assert m, final
    qid = m["qid"]
    assert f"queued as {qid};" in gate.log
    log = await wait_maillog(
        postfix, r"disconnect from unknown\[127\.0\.0\.1\] (?P<counts>ehlo=.*)$", offset
    )
    assert "bdat=1 " in log["counts"] and "data=" not in log["counts"], log["counts"]
    content = postcat(postfix, qid)
    assert "Subject: bdat interop" in content
    assert "\n.leading dot\n" in content and "..leading" not in content, content
    # Postfix counts what it received: smtpgate's Received header and the two chunks
    assert int(m["size"]) > len(first) + len(second)


SENDER_CF = """\
myhostname = sender.test
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{gate_port}
smtp_connect_timeout = 5s
"""


async def test_postfix_smtp_client_through_smtpgate_to_postfix(
    postfix: PostfixInstance, tmp_path: Path
):
    """Postfix's own smtp client (a second throwaway Postfix whose relayhost is smtpgate)
    delivers through smtpgate to the Postfix backend. Postfix 3.7's smtp client has no BDAT
    (it sends DATA even to a server that offers CHUNKING); smtpgate relays with BDAT, and the
    sending Postfix logs the backend's reply as its delivery status."""
    offset = postfix.maillog.stat().st_size
    async with running_gate(
        tmp_path, GATE_CF, None, relayhost=f"[127.0.0.1]:{postfix.port}"
    ) as gate:
        with PostfixInstance(SENDER_CF.format(gate_port=gate.port)) as sender:
            sent_from = sender.maillog.stat().st_size if sender.maillog.exists() else 0
            client = await LineClient.connect("127.0.0.1", sender.port, source="127.0.0.1")
            assert (await client.reply())[0].startswith("220 ")
            assert (await client.cmd("EHLO client.example.net"))[0].startswith("250")
            assert await client.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
            assert await client.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            assert (await client.cmd("DATA"))[0].startswith("354")
            await client.send_raw(BODY + b"..leading dot\r\n.\r\n")
            assert (await client.reply())[0].startswith("250 2.0.0 Ok: queued as ")
            await client.cmd("QUIT")
            await client.close()
            status = await wait_maillog(
                sender,
                r"postfix/smtp\[\d+\]: \w+: to=<foo@bar\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]"
                r":\d+, .* status=(?P<status>\w+) \((?P<reply>.*)\)$",
                sent_from,
            )
        gate_log = gate.log
    assert status["status"] == "sent", status[0]
    m = re.search(r"250 2\.0\.0 Ok: \d+ bytes queued as (?P<qid>[0-9A-Z]+)", status["reply"])
    assert m, status["reply"]
    assert "proxy-accept: END-OF-MESSAGE from unknown[127.0.0.1]: 250 2.0.0 Ok: " in gate_log
    counts = await wait_maillog(
        postfix, r"disconnect from unknown\[127\.0\.0\.1\] (?P<counts>ehlo=.*)$", offset
    )
    assert "bdat=1 " in counts["counts"] and "data=" not in counts["counts"], counts["counts"]
    content = postcat(postfix, m["qid"])
    assert "Subject: interop" in content and "\n.leading dot\n" in content, content
    # the whole chain of Received headers: backend, smtpgate, the sending Postfix
    assert re.search(
        r"Received: from mx\.example\.org .*\n(?:\s.*\n)*Received: from sender\.test "
        r"\(unknown \[127\.0\.0\.1\]\)\n\s+by mx\.example\.org \(smtpgate\)",
        content,
    ), content
