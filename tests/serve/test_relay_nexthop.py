"""Next hop per transaction (access(5) FILTER, HOLD) and BDAT towards the backend.

Real backends on loopback: aiosmtpd servers (tests/serve/backend.py, which do not offer
CHUNKING) and a throwaway Postfix 3.7 (tests/postfix_instance.py, which does).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest

from smtpgate.config import parse_settings
from smtpgate.errors import ConfigError, FilterDestinationError, RelayError
from smtpgate.relay import (
    ClientFacts,
    Relay,
    Relayhost,
    parse_filter_destination,
    relay_config,
)
from tests.postfix_instance import POSTFIX, PostfixInstance
from tests.serve.backend import RecordingBackend
from tests.serve.test_interop_postfix import wait_maillog

CLIENT = ClientFacts("mail.example.net", "203.0.113.7", 40123, "ESMTP", "mail.example.net")
MESSAGE = b"From: a@example.net\r\nSubject: hop\r\n\r\nHello.\r\n"


def make_relay(relayhost: str, extra: str = "", **fields: object) -> Relay:
    text = f"relayhost = {relayhost}\nsmtpd_proxy_timeout = 5s\nsmtp_connect_timeout = 5s\n"
    settings, diags = parse_settings(text + extra, "main.cf", hostname="mx.example.org")
    assert [d for d in diags if d.severity == "error"] == []
    return Relay.from_config(replace(relay_config(settings), **fields))  # type: ignore[arg-type]


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "hop"),
    [
        ("smtp:[127.0.0.1]:10025", Relayhost("127.0.0.1", 10025, False)),
        ("relay:[filter.example]", Relayhost("filter.example", 25, False)),
        ("smtp:filter.example:2525", Relayhost("filter.example", 2525, True)),
        ("SMTP:[ipv6:::1]:10025", Relayhost("::1", 10025, False)),
    ],
)
def test_parse_filter_destination(value: str, hop: Relayhost) -> None:
    assert parse_filter_destination(value) == hop


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("lmtp:[127.0.0.1]:24", 'transport "lmtp" is not supported'),
        ("scan:[127.0.0.1]:10025", 'transport "scan" is not supported'),
        ("smtp:", "no next hop"),
        ("smtp:[127.0.0.1", "expected"),
        ("[127.0.0.1]:10025", "is not supported"),
        ("127.0.0.1", 'expected "transport:[host]:port"'),
    ],
)
def test_parse_filter_destination_errors(value: str, why: str) -> None:
    with pytest.raises(FilterDestinationError, match=re.escape(why)) as info:
        parse_filter_destination(value)
    assert isinstance(info.value, RelayError)  # the caller answers 451 4.3.0 for it
    assert str(info.value).startswith(f"FILTER {value}:")


def test_hold_relayhost_is_typed_configuration() -> None:
    text = "relayhost = [127.0.0.1]:2526\nsmtpgate_hold_relayhost = [quarantine.example]:2527\n"
    settings, _ = parse_settings(text, "main.cf", hostname="mx.example.org")
    config = relay_config(settings)
    assert config.hold_relayhost == Relayhost("quarantine.example", 2527, False)
    assert (
        relay_config(parse_settings("", "main.cf", hostname="h.example")[0]).hold_relayhost is None
    )
    bad, _ = parse_settings(
        "relayhost = [a]\nsmtpgate_hold_relayhost = [b\n", "main.cf", hostname="h.example"
    )
    with pytest.raises(ConfigError, match=r"main.cf, line 2: smtpgate_hold_relayhost: \[b"):
        relay_config(bad)


# -- next hop per transaction ----------------------------------------------------------------


async def test_next_hop_per_transaction_with_its_own_pool() -> None:
    async with RecordingBackend() as backend, RecordingBackend() as filter_:
        relay = make_relay(backend.relayhost)
        try:
            hop = parse_filter_destination(f"smtp:{filter_.relayhost}")
            for next_hop in (hop, None, hop):
                tx = await relay.begin(CLIENT, "a@example.net", [], next_hop=next_hop)
                assert (await tx.rcpt("b@example.org", [])).code == 250
                assert (await tx.data(MESSAGE)).code == 250
            assert relay.idle_connections == 2  # one pooled connection per next hop
        finally:
            await relay.close()
    assert len(filter_.messages) == 2 and len(backend.messages) == 1
    assert len(filter_.connections) == 1  # the FILTER hop's connection was reused
    assert filter_.messages[0].xforward["ADDR"] == "203.0.113.7"


async def test_next_hop_that_is_down_is_451_and_relayhost_still_works() -> None:
    async with RecordingBackend() as backend, RecordingBackend(down=True) as dead:
        relay = make_relay(backend.relayhost)
        try:
            tx = await relay.begin(
                CLIENT,
                "a@example.net",
                [],
                next_hop=parse_filter_destination(f"smtp:{dead.relayhost}"),
            )
            assert (await tx.rcpt("b@example.org", [])).code == 451
            assert tx.fault is not None and "connect to backend" in tx.fault
            tx = await relay.begin(CLIENT, "a@example.net", [])
            assert (await tx.rcpt("b@example.org", [])).code == 250
            assert (await tx.data(MESSAGE)).code == 250
        finally:
            await relay.close()
    assert len(backend.messages) == 1


async def test_hold_relayhost_is_a_next_hop() -> None:
    async with RecordingBackend() as backend, RecordingBackend() as quarantine:
        relay = make_relay(backend.relayhost, f"smtpgate_hold_relayhost = {quarantine.relayhost}\n")
        try:
            tx = await relay.begin(CLIENT, "a@example.net", [], next_hop=relay.hold_relayhost)
            assert (await tx.rcpt("b@example.org", [])).code == 250
            assert (await tx.data(MESSAGE)).code == 250
        finally:
            await relay.close()
    assert [m.rcpt_tos for m in quarantine.messages] == [["b@example.org"]]
    assert backend.messages == []


# -- DATA or BDAT ----------------------------------------------------------------------------


async def test_backend_without_chunking_gets_data() -> None:
    async with RecordingBackend() as backend:
        relay = make_relay(backend.relayhost)
        try:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            assert (await tx.rcpt("b@example.org", [])).code == 250
            tx.start_data()
            assert (await tx.data(b"Subject: x\n\n.dot\nend")).code == 250
        finally:
            await relay.close()
    verbs = [c.split()[0] for c in backend.connections[0].commands]
    assert "DATA" in verbs and "BDAT" not in verbs
    assert backend.messages[0].raw == b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\n"


BACKEND_CF = """\
myhostname = backend.test
mydestination =
relay_domains = bar.org
smtpd_authorized_xforward_hosts = 127.0.0.0/8
defer_transports = relay, smtp, local, virtual
"""


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixInstance]:
    with PostfixInstance(BACKEND_CF) as pf:
        yield pf


def postcat_body(pf: PostfixInstance, queue_id: str) -> str:
    proc = subprocess.run(
        ["/usr/sbin/postcat", "-c", str(pf.etc), "-b", "-q", queue_id],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout


@pytest.mark.postfix
@pytest.mark.skipif(not os.path.exists(POSTFIX), reason="Postfix is not installed")
@pytest.mark.parametrize(("chunk_size", "chunks"), [(1 << 20, 1), (4000, 3)])
async def test_postfix_backend_gets_bdat(
    postfix: PostfixInstance, chunk_size: int, chunks: int
) -> None:
    """Postfix offers CHUNKING: the message goes as BDAT (one LAST chunk, or bounded
    chunks), unstuffed, and Postfix stores it as the client meant it."""
    offset = postfix.maillog.stat().st_size
    lines = [b"Subject: chunks", b"", b".leading dot", b"bare\rcr"]
    lines += [b"line %04d " % i + b"x" * 60 for i in range(120)]
    message = b"\n".join(lines[:4]) + b"\r\n" + b"\r\n".join(lines[4:]) + b"\r\n"
    assert len(message) > 2 * 4000
    relay = make_relay(f"[127.0.0.1]:{postfix.port}", chunk_size=chunk_size)
    try:
        tx = await relay.begin(CLIENT, "friend@example.net", [])
        assert (await tx.rcpt("foo@bar.org", [])).code == 250
        tx.start_data()  # nothing to send ahead for BDAT (a DATA here would get a 503)
        done = await tx.data(message)
    finally:
        await relay.close()
    # Postfix's reply to BDAT LAST names the size it received: the chunks' sum, exactly
    wire_size = len(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert done.code == 250 and f"Ok: {wire_size} bytes queued as " in done.text, done
    queue_id = tx.backend_queue_id
    assert queue_id is not None
    log = await wait_maillog(
        postfix, r"disconnect from unknown\[127\.0\.0\.1\] (?P<counts>ehlo=.*)$", offset
    )
    assert f"bdat={chunks} " in log["counts"] and "data=" not in log["counts"], log["counts"]
    body = postcat_body(postfix, queue_id)
    assert "\n.leading dot\n" in body and "..leading" not in body
    assert "line 0119 " in body


# -- a message in pieces (read back from the spool) ------------------------------------------

# Every awkward place for a cut: CR | LF, a line end | the dot after it, a dot | its line
# end, a bare LF | a dot, a lone CR at the end of a piece, no line end at the very end.
AWKWARD = [
    b"Subject: split\r",
    b"\n",
    b"\r\n",
    b".",
    b"dot after a cut\r\n",
    b"line\r",
    b"\n.",
    b".two dots\r\n",
    b"bare\n",
    b".",
    b"\n",
    b"lone\r",
    b"cr\r\n",
    b".\r",
    b"\n",
    b"end without line end",
]


async def test_pieces_cut_anywhere_frame_as_the_whole_message() -> None:
    whole = b"".join(AWKWARD)
    async with RecordingBackend() as backend:
        relay = make_relay(backend.relayhost)
        try:
            for message in (whole, iter(AWKWARD)):
                tx = await relay.begin(CLIENT, "a@example.net", [])
                assert (await tx.rcpt("b@example.org", [])).code == 250
                tx.start_data()
                assert (await tx.data(message)).code == 250
        finally:
            await relay.close()
    first, second = backend.messages
    assert second.raw == first.raw
    assert first.raw.endswith(b"\r\n..\r\nend without line end\r\n.\r\n")
    assert b"\r\n..dot after a cut\r\n" in first.raw and b"\r\n...two dots\r\n" in first.raw


@pytest.mark.postfix
@pytest.mark.skipif(not os.path.exists(POSTFIX), reason="Postfix is not installed")
async def test_postfix_backend_gets_bdat_of_pieces(postfix: PostfixInstance) -> None:
    """Pieces cut at every awkward place, in BDAT chunks of 7 octets: Postfix stores what
    it stores for the whole message in one chunk."""
    bodies = []
    for chunk_size, message in ((1 << 20, b"".join(AWKWARD)), (7, iter(AWKWARD))):
        relay = make_relay(f"[127.0.0.1]:{postfix.port}", chunk_size=chunk_size)
        try:
            tx = await relay.begin(CLIENT, "friend@example.net", [])
            assert (await tx.rcpt("foo@bar.org", [])).code == 250
            tx.start_data()
            done = await tx.data(message)
        finally:
            await relay.close()
        assert done.code == 250, done
        assert tx.backend_queue_id is not None
        bodies.append(postcat_body(postfix, tx.backend_queue_id))
    whole, pieces = bodies
    assert pieces == whole
    assert "\n.dot after a cut\n" in whole and "\nlone cr\n" in whole
