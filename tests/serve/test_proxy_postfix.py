"""The PROXY protocol with a real Postfix 3.7 on both sides of it.

* **Postfix as the model** (``smtpd_upstream_proxy_protocol = haproxy``): the same bad,
  missing or late headers go to a throwaway Postfix and to smtpgate; the replies and the
  session's log lines (``warning: haproxy read: ...``, ``connect from``, ``disconnect
  from``) are the same.  (Postfix 3.7 hangs up with ``421 4.3.0 ... Server local error``
  and names the balancer's own address; later Postfix versions name unknown[unknown].)
* **Postfix as the backend** that expects a PROXY header: with
  ``smtpgate_backend_proxy_protocol = v1`` or ``v2`` its log and its restrictions see
  smtpgate's client, not smtpgate -- also when smtpgate itself sits behind a balancer
  that sent it a header, and for two clients one after the other (no backend connection
  carries one client's header for another).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpgate.proxyproto import encode, encode_local
from tests.postfix_instance import POSTFIX, PostfixInstance
from tests.serve.client import LineClient
from tests.serve.conftest import running_gate

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(not os.path.exists(POSTFIX), reason="Postfix is not installed"),
]

MODEL_CF = """\
myhostname = mx.example.org
smtpd_upstream_proxy_protocol = haproxy
smtpd_upstream_proxy_timeout = 1s
smtpd_forbid_unauth_pipelining = no
"""
BACKEND_CF = """\
myhostname = backend.test
mydestination =
relay_domains = bar.org
smtpd_upstream_proxy_protocol = haproxy
smtpd_client_restrictions = check_client_access inline:{ {127.0.0.3 = REJECT backend says no} }
defer_transports = relay, smtp, local, virtual
"""
GATE_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtp_connect_timeout = 5s
"""
NOISE = ("warning: dict_nis_init:",)  # a Postfix smtpd's start-up line
SMTPD_LINE = re.compile(r"smtpd\[\d+\]: (.*)$", re.M)


@pytest.fixture(scope="module")
def model() -> Iterator[PostfixInstance]:
    with PostfixInstance(MODEL_CF, preamble=encode_local()) as pf:
        yield pf


@pytest.fixture(scope="module")
def backend_postfix() -> Iterator[PostfixInstance]:
    with PostfixInstance(BACKEND_CF, preamble=encode_local()) as pf:
        yield pf


async def until_closed(host: str, port: int, data: bytes, eof: bool) -> bytes:
    """Connect from 127.0.0.2, send *data* (then end the input when *eof*), and read
    everything until the server closes."""
    client = await LineClient.connect(host, port, source="127.0.0.2")
    try:
        if data:
            await client.send_raw(data)
        if eof:
            # Postfix may have read the header, refused it and closed already (an idle
            # smtpd process answers at once): then there is no input left to end
            with contextlib.suppress(OSError):
                client.writer.write_eof()
        received = b""
        async with asyncio.timeout(10):
            try:
                while chunk := await client.reader.read(4096):
                    received += chunk
            except ConnectionResetError:
                pass  # Postfix closes with the header's bytes unread (it only peeked)
        return received
    finally:
        with contextlib.suppress(ConnectionResetError):
            await client.close()


async def session_lines(read_log, offset: int, peer: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The smtpd lines from *offset* up to this session's disconnect (bounded wait)."""
    async with asyncio.timeout(10):
        while True:
            lines = [
                line
                for line in SMTPD_LINE.findall(read_log()[offset:])
                if not line.startswith(NOISE)
                and "smtpgate" not in line
                and "[127.0.0.1]" not in line  # the start-up probe's session, logged late
            ]
            if any(line.startswith(f"disconnect from unknown[{peer}]") for line in lines):
                return lines
            await asyncio.sleep(0.05)  # poll interval of a bounded wait for a condition


CASES = [
    pytest.param(b"EHLO x\r\n", False, id="smtp-instead"),
    pytest.param(b"PROXY UNKNOWN\r\n", False, id="v1-unknown"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.25 0040 25\r\n", False, id="v1-port"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.25 40 25", True, id="v1-unterminated"),
    pytest.param(encode(2, None, None), False, id="v2-unspec"),
    pytest.param(encode_local()[:14], True, id="v2-short"),
    pytest.param(encode_local()[:12] + b"\x11" + encode_local()[13:], False, id="v2-version"),
    pytest.param(b"", True, id="eof"),
    pytest.param(b"", False, id="timeout"),
]


@pytest.mark.parametrize(("data", "eof"), CASES)
async def test_a_bad_header_is_handled_as_postfix_does(
    model: PostfixInstance, tmp_path: Path, data: bytes, eof: bool
) -> None:
    offset = model.maillog.stat().st_size
    expected_reply = await until_closed("127.0.0.1", model.port, data, eof)
    expected = await session_lines(
        lambda: model.maillog.read_bytes().decode(errors="replace"), offset, "127.0.0.2"
    )
    async with running_gate(tmp_path, MODEL_CF, None) as gate:
        reply = await until_closed(gate.host, gate.port, data, eof)
        lines = await session_lines(lambda: gate.log, 0, "127.0.0.2")
    assert reply == expected_reply
    assert lines == expected


async def test_a_good_header_is_read_as_postfix_reads_it(
    model: PostfixInstance, tmp_path: Path
) -> None:
    header = encode(1, ("192.0.2.66", 40001), ("198.51.100.25", 25))
    offset = model.maillog.stat().st_size
    expected_reply = await until_closed("127.0.0.1", model.port, header + b"QUIT\r\n", False)
    expected = await session_lines(
        lambda: model.maillog.read_bytes().decode(errors="replace"), offset, "192.0.2.66"
    )
    async with running_gate(tmp_path, MODEL_CF, None) as gate:
        reply = await until_closed(gate.host, gate.port, header + b"QUIT\r\n", False)
        lines = await session_lines(lambda: gate.log, 0, "192.0.2.66")
    assert reply == expected_reply
    assert lines == expected


async def mail(port: int, source: str, header: bytes = b"") -> tuple[list[str], list[str]]:
    """One message from *source* (after *header*): the replies to RCPT and to the dot."""
    c = await LineClient.connect("127.0.0.1", port, source=source)
    try:
        await c.send_raw(header)
        assert (await c.reply())[0].startswith("220 ")
        assert (await c.cmd("EHLO client.example"))[0] == "250-mx.example.org"
        assert await c.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
        rcpt = await c.cmd("RCPT TO:<foo@bar.org>")
        final: list[str] = []
        if rcpt[0].startswith("250"):
            assert (await c.cmd("DATA"))[0].startswith("354")
            final = await c.cmd("Subject: proxied\r\n\r\nhi\r\n.")
        await c.cmd("QUIT")
        return rcpt, final
    finally:
        await c.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_backend_sees_the_real_client(
    backend_postfix: PostfixInstance, tmp_path: Path, version: str
) -> None:
    pf = backend_postfix
    offset = pf.maillog.stat().st_size
    cf = GATE_CF + f"smtpgate_backend_proxy_protocol = {version}\n"
    relayhost = f"[127.0.0.1]:{pf.port}"
    async with running_gate(tmp_path, cf, None, relayhost=relayhost) as gate:
        rcpt, final = await mail(gate.port, "127.0.0.2")
        assert rcpt == ["250 2.1.5 Ok"]
        qid = re.fullmatch(r"250 2\.0\.0 Ok: \d+ bytes queued as (\w+)", final[0])
        assert qid, final
        # the next client's header is its own: Postfix rejects 127.0.0.3 by its address
        rcpt, _ = await mail(gate.port, "127.0.0.3")
        assert rcpt == ["554 5.7.1 <unknown[127.0.0.3]>: Client host rejected: backend says no"]
        rcpt, _ = await mail(gate.port, "127.0.0.2")
        assert rcpt == ["250 2.1.5 Ok"]
    text = pf.maillog.read_bytes()[offset:].decode(errors="replace")
    assert f"{qid[1]}: client=unknown[127.0.0.2]" in text, text
    assert re.search(
        r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.3\]: 554 5\.7\.1 "
        r"<unknown\[127\.0\.0\.3\]>: Client host rejected: backend says no;",
        text,
    ), text
    # smtpgate's start-up probe of the backend says who it is as well (v2: LOCAL)
    assert "warning: haproxy read" not in text, text


async def test_the_client_a_balancer_names_reaches_the_backend(
    backend_postfix: PostfixInstance, tmp_path: Path
) -> None:
    pf = backend_postfix
    offset = pf.maillog.stat().st_size
    cf = GATE_CF + "smtpd_upstream_proxy_protocol = haproxy\nsmtpgate_backend_proxy_protocol = v2\n"
    header = encode(2, ("192.0.2.66", 40001), ("198.51.100.25", 25))
    async with running_gate(tmp_path, cf, None, relayhost=f"[127.0.0.1]:{pf.port}") as gate:
        rcpt, final = await mail(gate.port, "127.0.0.2", header)
        assert rcpt == ["250 2.1.5 Ok"] and final[0].startswith("250 2.0.0 Ok"), final
    text = pf.maillog.read_bytes()[offset:].decode(errors="replace")
    assert re.search(r": client=unknown\[192\.0\.2\.66\]$", text, re.M), text
