"""smtpgate.relay against a real SMTP backend on 127.0.0.1 (tests/serve/backend.py).

Every fault of docs/research reliability.md section 6 is played with real sockets: the
reply the client would get, and what the backend stored (nothing before the dot).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest

from smtpgate.config import parse_settings
from smtpgate.errors import ConfigError
from smtpgate.relay import (
    R451_PROXY,
    ClientFacts,
    Relay,
    Relayhost,
    frame_data,
    parse_relayhost,
    peer_name_matches,
    relay_config,
    xforward_commands,
    xtext,
)
from smtpgate.reply import Reply
from tests.serve.backend import RecordingBackend
from tests.serve.certs import test_pki

CLIENT = ClientFacts("mail.example.net", "203.0.113.7", 40123, "ESMTP", "mail.example.net")
MESSAGE = b"From: a@example.net\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


def make_relay(backend: RecordingBackend, extra: str = "", **pool: object) -> Relay:
    text = (
        f"relayhost = {backend.relayhost}\n"
        "smtpd_proxy_timeout = 2s\n"
        "smtp_connect_timeout = 2s\n" + extra
    )
    settings, diags = parse_settings(text, "main.cf", hostname="mx.example.org")
    assert [d for d in diags if d.severity == "error"] == []
    return Relay.from_config(replace(relay_config(settings), **pool))  # type: ignore[arg-type]


@asynccontextmanager
async def relay_for(
    backend: RecordingBackend, extra: str = "", **pool: object
) -> AsyncIterator[Relay]:
    relay = make_relay(backend, extra, **pool)
    try:
        yield relay
    finally:
        await relay.close()


async def send(
    relay: Relay, recipients: list[str], message: bytes = MESSAGE, sender: str = "a@example.net"
) -> tuple[list[Reply], Reply | None]:
    """One whole transaction; the RCPT replies and the DATA reply (None: aborted)."""
    tx = await relay.begin(CLIENT, sender, [])
    replies = [await tx.rcpt(r, []) for r in recipients]
    if tx.accepted_recipients == 0:
        await tx.abort()
        return replies, None
    return replies, await tx.data(message)


# -- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[backend.example]:2526", Relayhost("backend.example", 2526, False)),
        ("[backend.example]", Relayhost("backend.example", 25, False)),
        ("backend.example:2526", Relayhost("backend.example", 2526, True)),
        ("backend.example", Relayhost("backend.example", 25, True)),
        ("[1.2.3.4]:2526", Relayhost("1.2.3.4", 2526, False)),
        ("[::1]:2526", Relayhost("::1", 2526, False)),
        ("[ipv6:::1]", Relayhost("::1", 25, False)),
        ("[backend.example]:smtp", Relayhost("backend.example", 25, False)),
        ("", None),
    ],
)
def test_parse_relayhost(value: str, expected: Relayhost | None) -> None:
    assert parse_relayhost(value) == expected


@pytest.mark.parametrize(
    "value", ["[::1", "::1:25", "[host]x", "host:0", "host:99999", "a, b", "host:", "[]:25"]
)
def test_parse_relayhost_errors(value: str) -> None:
    with pytest.raises(ValueError):
        parse_relayhost(value)


def test_bad_relayhost_is_a_config_error_naming_the_line() -> None:
    settings, _ = parse_settings("relayhost = [::1\n", "main.cf", hostname="mx.example.org")
    with pytest.raises(ConfigError, match=r"main.cf, line 1: relayhost"):
        Relay.from_config(relay_config(settings))


def test_xtext() -> None:
    assert xtext("mail.example.net") == "mail.example.net"
    assert xtext("a+b=c d\x01é") == "a+2Bb+3Dc+20d+01+C3+A9"
    assert len(xtext("+" * 300)) <= 255


def test_xforward_unavailable_and_only_offered() -> None:
    client = ClientFacts("unknown", "2001:db8::1", 0, "SMTP", None)
    assert xforward_commands(client, {"NAME", "ADDR", "PORT", "HELO", "PROTO"}) == [
        "XFORWARD NAME=[UNAVAILABLE] ADDR=IPv6:2001:db8::1 PORT=[UNAVAILABLE] "
        "HELO=[UNAVAILABLE] PROTO=SMTP"
    ]
    assert xforward_commands(client, {"PROTO"}) == ["XFORWARD PROTO=SMTP"]
    assert xforward_commands(client, set()) == []


def test_xforward_split_below_512_octets() -> None:
    client = ClientFacts("n" * 300, "198.51.100.1", 25, "ESMTP", "h=" * 200)
    commands = xforward_commands(client, {"NAME", "ADDR", "PORT", "HELO", "PROTO", "SOURCE"})
    assert len(commands) >= 2
    assert all(len(c) + 2 <= 512 - len("250 ") for c in commands)
    attrs = [item.split("=")[0] for c in commands for item in c.split()[1:]]
    assert attrs == ["NAME", "ADDR", "PORT", "HELO", "PROTO", "SOURCE"]


TRICKY = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
]


def _assert_wire_safe(wire: bytes) -> None:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    assert re.search(rb"(?<!\r)\n", wire) is None, "bare LF on the wire"
    assert (b"\r\n" + wire).count(b"\r\n.\r\n") == 1, "an end of data before the end"
    lines = wire.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines[:-2])


@pytest.mark.parametrize("sequence", TRICKY)
def test_frame_data_never_emits_an_end_of_data(sequence: bytes) -> None:
    wire = frame_data(b"Subject: x\r\n\r\nbefore" + sequence + b"MAIL FROM:<evil@x>\r\nafter")
    _assert_wire_safe(wire)


def test_frame_data_stuffing_and_endings() -> None:
    assert frame_data(b"") == b".\r\n"
    assert frame_data(b"a") == b"a\r\n.\r\n"
    assert frame_data(b".\r\n..x\r\n") == b"..\r\n...x\r\n.\r\n"
    # a lone CR goes out as a space, as Postfix 3.7 sends it on
    assert frame_data(b"a\nb\rc\r\n.d") == b"a\r\nb c\r\n..d\r\n.\r\n"


def test_peer_name_matching() -> None:
    cert = {"subjectAltName": (("DNS", "mx.backend.test"), ("IP Address", "127.0.0.1"))}
    assert peer_name_matches(cert, ["hostname"], "mx.backend.test")
    assert peer_name_matches(cert, ["nexthop", "dot-nexthop"], "backend.test")
    assert not peer_name_matches(cert, ["nexthop"], "backend.test")
    assert peer_name_matches(cert, ["hostname"], "127.0.0.1")
    assert not peer_name_matches(cert, ["hostname"], "127.0.0.2")
    assert peer_name_matches(
        {"subjectAltName": (("DNS", "*.backend.test"),)}, ["x.backend.test"], ""
    )
    cn_only = {"subject": ((("commonName", "backend.test"),),)}
    assert peer_name_matches(cn_only, ["nexthop"], "backend.test")


# -- happy path --------------------------------------------------------------------------------


async def test_per_recipient_replies_and_content() -> None:
    replies = {"bad@example.org": "550 5.1.1 <bad@example.org>: Recipient address rejected"}
    multi = {"full@example.org": "452-4.2.2 Mailbox full\n452 4.2.2 try again later"}
    async with RecordingBackend(rcpt_replies={**replies, **multi}) as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", ["BODY=8BITMIME"])
            ok = await tx.rcpt("b@example.org", [])
            bad = await tx.rcpt("bad@example.org", [])
            full = await tx.rcpt("full@example.org", [])
            done = await tx.data(MESSAGE)
            await tx.abort()  # harmless after data()
    assert ok == Reply(250, "2.1.5", "Ok")
    assert bad == Reply(550, "5.1.1", "<bad@example.org>: Recipient address rejected")
    assert full == Reply(452, "4.2.2", "Mailbox full\ntry again later")
    assert str(full) == "452-4.2.2 Mailbox full\n452 4.2.2 try again later"
    assert done == Reply(250, "2.0.0", "Ok: queued as Q00001")
    assert tx.backend_queue_id == "Q00001"
    assert tx.accepted_recipients == 1 and not tx.outcome_unknown
    assert re.fullmatch(r"127\.0\.0\.1\[127\.0\.0\.1\]:\d+", tx.backend_peer)
    [stored] = backend.messages
    assert stored.mail_from == "a@example.net"
    assert stored.mail_options == ["BODY=8BITMIME"]
    assert stored.rcpt_tos == ["b@example.org"]
    assert stored.content == MESSAGE
    assert stored.helo == "mx.example.org"  # smtpd_proxy_ehlo = $myhostname
    assert [c for c, _ in tx.reply_history] == ["MAIL", "RCPT", "RCPT", "RCPT", "END-OF-DATA"]


async def test_null_sender_and_smtpd_proxy_ehlo() -> None:
    async with RecordingBackend() as backend:
        async with relay_for(backend, "smtpd_proxy_ehlo = gate.example.org\n") as relay:
            _, done = await send(relay, ["b@example.org"], sender="")
    assert done is not None and done.code == 250
    assert backend.messages[0].mail_from == "<>"
    assert backend.connections[0].commands[0] == "EHLO gate.example.org"
    assert "MAIL FROM:<>" in backend.connections[0].commands


async def test_xforward_sent_as_offered() -> None:
    client = ClientFacts("unknown", "192.0.2.9", 2525, "SMTP", "helo name+x")
    async with RecordingBackend() as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(client, "a@example.net", [])
            assert (await tx.rcpt("b@example.org", [])).code == 250
            assert (await tx.data(MESSAGE)).code == 250
    assert backend.messages[0].xforward == {
        "NAME": "[UNAVAILABLE]",
        "ADDR": "192.0.2.9",
        "PORT": "2525",
        "HELO": "helo+20name+2Bx",
        "IDENT": "[UNAVAILABLE]",
        "PROTO": "SMTP",
        "SOURCE": "REMOTE",
    }


async def test_xforward_long_values_are_split() -> None:
    client = ClientFacts("n" * 250 + ".example", "192.0.2.9", 2525, "ESMTP", "h" * 250)
    async with RecordingBackend() as backend:
        async with relay_for(backend) as relay:
            _ = await relay.begin(client, "a@example.net", [])
            tx = await relay.begin(client, "a@example.net", [])
            assert (await tx.rcpt("b@example.org", [])).code == 250
            assert (await tx.data(MESSAGE)).code == 250
    commands = [c for c in backend.connections[0].commands if c.startswith("XFORWARD")]
    assert len(commands) == 2 and all(len(c) + 2 <= 512 for c in commands)
    assert backend.messages[0].xforward["HELO"] == "h" * 250


async def test_no_xforward_when_not_offered_and_only_listed_attributes() -> None:
    async with RecordingBackend(xforward=None) as backend:
        async with relay_for(backend) as relay:
            await send(relay, ["b@example.org"])
    assert not any(c.startswith("XFORWARD") for c in backend.connections[0].commands)
    async with RecordingBackend(xforward="ADDR PROTO") as backend:
        async with relay_for(backend) as relay:
            await send(relay, ["b@example.org"])
    assert backend.messages[0].xforward == {"ADDR": "203.0.113.7", "PROTO": "ESMTP"}


# -- content safety ----------------------------------------------------------------------------


@pytest.mark.parametrize("sequence", TRICKY)
async def test_smuggling_sequences_give_one_transaction(sequence: bytes) -> None:
    smuggled = (
        b"Subject: x\r\n\r\nhello" + sequence + b"MAIL FROM:<admin@example.org>\r\n"
        b"RCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nbad" + sequence
        + b"tail\r\n"
    )  # fmt: skip
    async with RecordingBackend(lenient_data_end=True) as backend:
        async with relay_for(backend) as relay:
            _, done = await send(relay, ["b@example.org"], smuggled)
            _, again = await send(relay, ["c@example.org"])
    assert done is not None and done.code == 250
    assert again is not None and again.code == 250
    assert [m.mail_from for m in backend.messages] == ["a@example.net", "a@example.net"]
    assert [m.rcpt_tos for m in backend.messages] == [["b@example.org"], ["c@example.org"]]
    _assert_wire_safe(backend.messages[0].raw)
    assert b"MAIL FROM:<admin@example.org>" in backend.messages[0].content


async def test_dot_stuffing_round_trip() -> None:
    content = b"Subject: dots\r\n\r\n.\r\n..\r\n.hidden\r\nnot.a.dot\r\n. \r\n"
    async with RecordingBackend() as backend:
        async with relay_for(backend) as relay:
            _, done = await send(relay, ["b@example.org"], content)
    assert done is not None and done.code == 250
    [stored] = backend.messages
    assert stored.content == content
    assert stored.raw == b"Subject: dots\r\n\r\n..\r\n...\r\n..hidden\r\nnot.a.dot\r\n.. \r\n.\r\n"


async def test_bare_line_ends_are_normalised() -> None:
    """A bare LF ends a line (it becomes CRLF); a lone CR becomes a space, as Postfix
    3.7 sends it on (docs/postfix-behaviour.md, point 3)."""
    async with RecordingBackend() as backend:
        async with relay_for(backend) as relay:
            _, done = await send(relay, ["b@example.org"], b"Subject: x\n\nline1\rline2\n.x")
    assert done is not None and done.code == 250
    assert backend.messages[0].content == b"Subject: x\r\n\r\nline1 line2\r\n.x\r\n"
    assert backend.messages[0].raw == b"Subject: x\r\n\r\nline1 line2\r\n..x\r\n.\r\n"


async def test_large_message_with_flow_control() -> None:
    line = b"0123456789" * 7 + b"\r\n"
    content = b"Subject: big\r\n\r\n" + line * 60_000  # about 4.3 MB
    async with RecordingBackend(size=None) as backend:
        async with relay_for(backend) as relay:
            _, done = await send(relay, ["b@example.org"], content)
    assert done is not None and done.code == 250
    assert backend.messages[0].content == content


async def test_control_characters_never_reach_the_backend() -> None:
    async with RecordingBackend() as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net\r\nRCPT TO:<x@y>", [])
            assert await tx.rcpt("b@example.org", []) == Reply(
                501, "5.1.7", "Bad sender address syntax"
            )
            await tx.abort()
            tx = await relay.begin(CLIENT, "a@example.net", [])
            bad = await tx.rcpt("b@example.org>\r\nDATA", [])
            bad_param = await tx.rcpt("b@example.org", ["NOTIFY=NEVER\x00"])
            good = await tx.rcpt("c@example.org", [])
            await tx.abort()
    assert bad == bad_param == Reply(501, "5.1.3", "Bad recipient address syntax")
    assert good.code == 250
    commands = [c for conn in backend.connections for c in conn.commands]
    assert not any("DATA" in c or "x@y" in c for c in commands)
    assert backend.messages == []


# -- faults (reliability.md section 6) ---------------------------------------------------------


async def test_backend_down() -> None:
    async with RecordingBackend(down=True) as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            first = await tx.rcpt("b@example.org", [])
            second = await tx.rcpt("c@example.org", [])
            assert await tx.data(MESSAGE) == R451_PROXY
    assert first == second == R451_PROXY == Reply(451, "4.3.0", "Error: queue file write error")
    assert tx.fault is not None and "connect to backend" in tx.fault


async def test_empty_relayhost(caplog: pytest.LogCaptureFixture) -> None:
    settings, _ = parse_settings("relayhost =\n", "main.cf", hostname="mx.example.org")
    with caplog.at_level(logging.WARNING, "smtpgate.relay"):
        relay = Relay.from_config(relay_config(settings))
        tx = await relay.begin(CLIENT, "a@example.net", [])
        assert await tx.rcpt("b@example.org", []) == R451_PROXY
        await tx.abort()
        await relay.close()
    assert "relayhost is empty" in caplog.text


@pytest.mark.parametrize(
    "behaviour",
    [
        {"replies": {"GREETING": "554 5.3.2 not now"}},
        {"replies": {"GREETING": "421 4.3.2 busy"}},
        {"close_at": {"GREETING"}},
        {"garbled": {"GREETING"}},
        {"delays": {"GREETING": math.inf}},
        {"replies": {"EHLO": "502 5.5.2 what"}},
        {"replies": {"EHLO": "421 4.7.0 bye"}},
        {"close_at": {"EHLO"}},
        {"delays": {"EHLO": math.inf}},
        {"replies": {"XFORWARD": "550 5.7.1 not authorized"}},
        {"close_at": {"XFORWARD"}},
        {"close_at": {"MAIL"}},
        {"replies": {"MAIL": "421 4.3.2 shutting down"}},
        {"replies": {"MAIL": "354 go ahead"}},
        {"garbled": {"MAIL"}},
        {"delays": {"MAIL": math.inf}},
    ],
    ids=lambda b: repr(b),
)
async def test_faults_before_mail_give_451(behaviour: dict[str, object], caplog) -> None:
    async with RecordingBackend(**behaviour) as backend:  # type: ignore[arg-type]
        async with relay_for(
            backend, "smtp_connect_timeout = 1s\nsmtpd_proxy_timeout = 1s\n"
        ) as relay:
            with caplog.at_level(logging.WARNING, "smtpgate.relay"):
                tx = await relay.begin(CLIENT, "a@example.net", [])
                assert await tx.rcpt("b@example.org", []) == R451_PROXY
                assert await tx.rcpt("c@example.org", []) == R451_PROXY
                assert await tx.data(MESSAGE) == R451_PROXY
            assert relay.idle_connections == 0
    assert backend.messages == []
    assert len(backend.connections) <= 1  # a dead transaction does not try again
    assert "backend" in caplog.text  # the detail is logged, not told


@pytest.mark.parametrize(
    "reply", ["452 4.3.1 Insufficient system storage", "553 5.7.1 <a@example.net>: Sender rejected"]
)
async def test_mail_refusal_is_passed_through_and_sticky(reply: str) -> None:
    async with RecordingBackend(replies={"MAIL": reply}) as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            first = await tx.rcpt("b@example.org", [])
            second = await tx.rcpt("c@example.org", [])
            assert await tx.data(MESSAGE) == first
            del backend.replies["MAIL"]
            _, done = await send(relay, ["b@example.org"])  # the refused connection is reused
    code, dsn, text = reply.split(" ", 2)
    assert first == second == Reply(int(code), dsn, text)
    # MAIL and the first RCPT went in one pipelined write; after the refusal the RCPT's
    # 503 was read and dropped (the second rcpt() sent nothing), so the connection stayed
    # in step and the next transaction reused it.
    verbs = [c.split()[0] for c in backend.connections[0].commands]
    assert verbs[: verbs.index("RSET")] == ["EHLO", "XFORWARD", "MAIL", "RCPT"]
    assert verbs[verbs.index("RSET") :].count("RCPT") == 1
    assert done is not None and done.code == 250 and len(backend.connections) == 1
    assert len(backend.messages) == 1


@pytest.mark.parametrize(
    "behaviour",
    [
        {"close_at": {"RCPT"}},
        {"replies": {"RCPT": "421 4.3.2 bye"}},
        {"replies": {"RCPT": "354 what"}},
        {"garbled": {"RCPT"}},
        {"delays": {"RCPT": math.inf}},
    ],
    ids=lambda b: repr(b),
)
async def test_faults_at_rcpt(behaviour: dict[str, object]) -> None:
    async with RecordingBackend(**behaviour) as backend:  # type: ignore[arg-type]
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            assert await tx.rcpt("b@example.org", []) == R451_PROXY
            assert await tx.rcpt("c@example.org", []) == R451_PROXY
            assert await tx.data(MESSAGE) == R451_PROXY
            assert relay.idle_connections == 0
    assert backend.messages == []
    assert [c.split()[0] for c in backend.connections[0].commands].count("RCPT") == 1


async def test_all_recipients_refused() -> None:
    async with RecordingBackend(rcpt_replies={"b@example.org": "550 5.1.1 unknown"}) as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            assert (await tx.rcpt("b@example.org", [])).code == 550
            assert await tx.data(MESSAGE) == Reply(554, "5.5.1", "Error: no valid recipients")
            assert relay.idle_connections == 1
    assert backend.messages == []
    assert "DATA" not in backend.connections[0].commands


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ({"replies": {"DATA": "451 4.3.0 try later"}}, Reply(451, "4.3.0", "try later")),
        ({"replies": {"DATA": "554 5.5.1 no"}}, Reply(554, "5.5.1", "no")),
        ({"replies": {"DATA": "250 2.0.0 Ok"}}, R451_PROXY),
        ({"replies": {"DATA": "421 4.3.2 bye"}}, R451_PROXY),
        ({"close_at": {"DATA"}}, R451_PROXY),
        ({"garbled": {"DATA"}}, R451_PROXY),
        ({"delays": {"DATA": math.inf}}, R451_PROXY),
        ({"close_at": {"CONTENT"}}, R451_PROXY),
    ],
    ids=lambda b: repr(b),
)
async def test_faults_before_the_dot_store_nothing(
    behaviour: dict[str, object], expected: Reply
) -> None:
    async with RecordingBackend(**behaviour) as backend:  # type: ignore[arg-type]
        async with relay_for(backend) as relay:
            replies, done = await send(relay, ["b@example.org"])
            pooled = relay.idle_connections
    assert replies[0].code == 250
    assert done == expected
    assert backend.messages == []
    assert pooled == (1 if expected.code != 451 or expected.text != R451_PROXY.text else 0)


@pytest.mark.parametrize(
    "reply",
    ["554 5.7.1 content rejected", "451 4.3.0 try later", "552-5.3.4 too big\n552 5.3.4 sorry"],
)
async def test_refusal_of_the_dot_is_passed_through(reply: str) -> None:
    async with RecordingBackend(replies={"DOT": reply}) as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            await tx.rcpt("b@example.org", [])
            done = await tx.data(MESSAGE)
            assert relay.idle_connections == 1
    assert str(done) == reply
    assert not tx.outcome_unknown
    assert backend.messages == []


@pytest.mark.parametrize(
    "behaviour",
    [{"close_at": {"DOT"}}, {"delays": {"DOT": math.inf}}, {"garbled": {"DOT"}}],
    ids=lambda b: repr(b),
)
async def test_fault_after_the_dot_is_451_with_outcome_unknown(
    behaviour: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    async with RecordingBackend(**behaviour) as backend:  # type: ignore[arg-type]
        async with relay_for(backend, "smtpd_proxy_timeout = 1s\n") as relay:
            with caplog.at_level(logging.WARNING, "smtpgate.relay"):
                tx = await relay.begin(CLIENT, "a@example.net", [])
                await tx.rcpt("b@example.org", [])
                done = await tx.data(MESSAGE)
            assert relay.idle_connections == 0
    assert done == R451_PROXY
    assert tx.outcome_unknown
    assert len(backend.messages) == 1  # stored: the client retries, a duplicate, not a loss
    assert "outcome unknown" in caplog.text
    assert [c for c in backend.connections[0].commands if c == "DATA"] == ["DATA"]  # no retry


async def test_421_after_the_dot_is_not_outcome_unknown() -> None:
    async with RecordingBackend(replies={"DOT": "421 4.3.2 shutting down"}) as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            await tx.rcpt("b@example.org", [])
            assert await tx.data(MESSAGE) == R451_PROXY
            assert relay.idle_connections == 0
    assert not tx.outcome_unknown


async def test_abort_never_sends_the_dot() -> None:
    async with RecordingBackend() as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            await tx.rcpt("b@example.org", [])
            await tx.abort()
            assert await tx.data(MESSAGE) == Reply(503, "5.5.1", "Error: need MAIL command")
            assert relay.idle_connections == 1
    assert backend.messages == []
    assert backend.connections[0].commands[-3:] == ["RCPT TO:<b@example.org>", "RSET", "QUIT"]


# -- pool --------------------------------------------------------------------------------------


async def test_pool_reuses_one_connection_with_rset() -> None:
    async with RecordingBackend() as backend:
        async with relay_for(backend) as relay:
            for rcpt in ("b@example.org", "c@example.org", "d@example.org"):
                _, done = await send(relay, [rcpt])
                assert done is not None and done.code == 250
            assert relay.connections_opened == 1
        await backend.wait_for(lambda: backend.connections[0].closed)
    [conn] = backend.connections
    verbs = [c.split()[0] for c in conn.commands]
    assert verbs.count("EHLO") == 1
    assert verbs.count("RSET") == 2  # probe before each reuse
    assert verbs[-1] == "QUIT"  # Relay.close()
    assert len(backend.messages) == 3 and {m.connection for m in backend.messages} == {0}
    assert all(m.xforward["ADDR"] == "203.0.113.7" for m in backend.messages)  # per transaction


async def test_concurrent_transactions_use_separate_connections() -> None:
    async with RecordingBackend() as backend:
        async with relay_for(backend) as relay:
            tx1 = await relay.begin(CLIENT, "a@example.net", [])
            tx2 = await relay.begin(CLIENT, "z@example.net", [])
            assert (await tx1.rcpt("b@example.org", [])).code == 250
            assert (await tx2.rcpt("c@example.org", [])).code == 250
            assert (await tx2.data(MESSAGE)).code == 250
            assert (await tx1.data(MESSAGE)).code == 250
            assert relay.idle_connections == 2
    assert sorted(m.mail_from for m in backend.messages) == ["a@example.net", "z@example.net"]
    assert len({m.connection for m in backend.messages}) == 2


async def test_pool_drops_a_connection_whose_rset_fails() -> None:
    async with RecordingBackend() as backend:
        async with relay_for(backend) as relay:
            await send(relay, ["b@example.org"])
            backend.replies["RSET"] = "421 4.3.2 closing"
            await backend.wait_for(lambda: len(backend.connections) == 1)
            _, done = await send(relay, ["c@example.org"])  # 421 to the probe: new connection
            assert done is not None and done.code == 250
            del backend.replies["RSET"]
            assert relay.connections_opened == 2
    assert [m.connection for m in backend.messages] == [0, 1]


async def test_pool_drops_after_421_and_timeout() -> None:
    async with RecordingBackend() as backend:
        async with relay_for(backend, "smtpd_proxy_timeout = 1s\n") as relay:
            backend.replies["RCPT"] = "421 4.3.2 bye"
            replies, _ = await send(relay, ["b@example.org"])
            assert replies == [R451_PROXY] and relay.idle_connections == 0
            del backend.replies["RCPT"]
            backend.delays["DATA"] = math.inf
            _, done = await send(relay, ["b@example.org"])
            assert done == R451_PROXY and relay.idle_connections == 0
            del backend.delays["DATA"]
            _, done = await send(relay, ["b@example.org"])
            assert done is not None and done.code == 250
            assert relay.connections_opened == 3
    assert len(backend.messages) == 1


async def test_pool_replaces_a_connection_the_backend_closed() -> None:
    async with RecordingBackend() as backend:
        async with relay_for(backend) as relay:
            await send(relay, ["b@example.org"])
            backend._sessions[0].transport.close()  # type: ignore[union-attr]
            await backend.wait_for(lambda: backend.connections[0].closed)
            _, done = await send(relay, ["c@example.org"])
    assert done is not None and done.code == 250
    assert len(backend.connections) == 2


async def test_pool_limits() -> None:
    async with RecordingBackend() as backend:
        async with relay_for(backend, max_transactions=2, max_idle=1) as relay:
            for _ in range(3):
                await send(relay, ["b@example.org"])
            assert relay.connections_opened == 2
            tx1 = await relay.begin(CLIENT, "a@example.net", [])
            tx2 = await relay.begin(CLIENT, "a@example.net", [])
            await tx1.rcpt("b@example.org", [])
            await tx2.rcpt("b@example.org", [])
            await tx1.abort()
            await tx2.abort()
            assert relay.idle_connections == 1  # max_idle


# -- TLS ---------------------------------------------------------------------------------------


def _tls(level: str, cafile: object = None, extra: str = "") -> str:
    text = f"smtp_tls_security_level = {level}\n"
    if cafile is not None:
        text += f"smtp_tls_CAfile = {cafile}\n"
    return text + extra


@pytest.mark.parametrize("level", ["may", "encrypt"])
async def test_tls_may_and_encrypt(level: str) -> None:
    async with RecordingBackend(starttls=True) as backend:
        async with relay_for(backend, _tls(level)) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            assert (await tx.rcpt("b@example.org", [])).code == 250
            assert (await tx.data(MESSAGE)).code == 250
            assert tx.tls
    assert backend.messages[0].tls
    verbs = [c.split()[0] for c in backend.connections[0].commands]
    assert verbs[:3] == ["EHLO", "STARTTLS", "EHLO"]


async def test_tls_none_never_starttls() -> None:
    async with RecordingBackend(starttls=True) as backend:
        async with relay_for(backend, _tls("none")) as relay:
            await send(relay, ["b@example.org"])
    assert not backend.messages[0].tls
    assert "STARTTLS" not in backend.connections[0].commands


async def test_tls_may_without_starttls_is_plaintext() -> None:
    async with RecordingBackend(starttls=False) as backend:
        async with relay_for(backend, _tls("may")) as relay:
            _, done = await send(relay, ["b@example.org"])
    assert done is not None and done.code == 250 and not backend.messages[0].tls


async def test_tls_may_falls_back_to_plaintext_on_a_new_connection() -> None:
    async with RecordingBackend(starttls=True, garbled={"TLS"}) as backend:
        async with relay_for(backend, _tls("may")) as relay:
            _, done = await send(relay, ["b@example.org"])
    assert done is not None and done.code == 250
    assert len(backend.connections) == 2
    assert "STARTTLS" not in backend.connections[1].commands
    assert backend.messages[0].connection == 1 and not backend.messages[0].tls


async def test_tls_may_continues_when_starttls_is_refused() -> None:
    async with RecordingBackend(starttls=True, replies={"STARTTLS": "454 4.7.0 no"}) as backend:
        async with relay_for(backend, _tls("may")) as relay:
            _, done = await send(relay, ["b@example.org"])
    assert done is not None and done.code == 250 and len(backend.connections) == 1


@pytest.mark.parametrize(
    "behaviour",
    [
        {"starttls": False},
        {"starttls": True, "garbled": {"TLS"}},
        {"starttls": True, "replies": {"STARTTLS": "454 4.7.0 no"}},
    ],
    ids=["not offered", "handshake fails", "refused"],
)
@pytest.mark.parametrize("level", ["encrypt", "verify", "secure"])
async def test_mandatory_tls_never_falls_back(level: str, behaviour: dict[str, object]) -> None:
    pki = test_pki()
    async with RecordingBackend(**behaviour) as backend:  # type: ignore[arg-type]
        async with relay_for(backend, _tls(level, pki.ca_cert)) as relay:
            replies, _ = await send(relay, ["b@example.org"])
    assert replies == [R451_PROXY]
    assert backend.messages == []
    assert len(backend.connections) == 1
    assert not any(c.startswith("MAIL") for c in backend.connections[0].commands)


async def test_tls_verify_with_the_test_ca() -> None:
    pki = test_pki()
    async with RecordingBackend(starttls=True) as backend:
        async with relay_for(backend, _tls("verify", pki.ca_cert)) as relay:
            _, done = await send(relay, ["b@example.org"])
    assert done is not None and done.code == 250 and backend.messages[0].tls


async def test_tls_verify_with_a_wrong_ca_fails(caplog: pytest.LogCaptureFixture) -> None:
    pki = test_pki()
    async with RecordingBackend(starttls=True) as backend:
        async with relay_for(backend, _tls("verify", pki.other_ca_cert)) as relay:
            with caplog.at_level(logging.WARNING, "smtpgate.relay"):
                replies, _ = await send(relay, ["b@example.org"])
    assert replies == [R451_PROXY] and backend.messages == []
    assert len(backend.connections) == 1
    assert "certificate verify failed" in caplog.text


async def test_tls_verify_name_mismatch_fails() -> None:
    pki = test_pki()
    extra = "smtp_tls_verify_cert_match = other.example\n"
    async with RecordingBackend(starttls=True) as backend:
        async with relay_for(backend, _tls("verify", pki.ca_cert, extra)) as relay:
            replies, _ = await send(relay, ["b@example.org"])
    assert replies == [R451_PROXY] and backend.messages == []


async def test_tls_secure_matches_nexthop_names() -> None:
    pki = test_pki()
    good = "smtp_tls_secure_cert_match = backend.test\n"
    async with RecordingBackend(starttls=True) as backend:
        async with relay_for(backend, _tls("secure", pki.ca_cert, good)) as relay:
            _, done = await send(relay, ["b@example.org"])
    assert done is not None and done.code == 250
    bad = "smtp_tls_secure_cert_match = .example.com\n"
    async with RecordingBackend(starttls=True) as backend:
        async with relay_for(backend, _tls("secure", pki.ca_cert, bad)) as relay:
            replies, _ = await send(relay, ["b@example.org"])
    assert replies == [R451_PROXY]


async def test_tls_client_certificate() -> None:
    pki = test_pki()
    extra = f"smtp_tls_cert_file = {pki.client_cert}\nsmtp_tls_key_file = {pki.client_key}\n"
    async with RecordingBackend(starttls=True, client_ca=pki.ca_cert) as backend:
        async with relay_for(backend, _tls("verify", pki.ca_cert, extra)) as relay:
            _, done = await send(relay, ["b@example.org"])
    assert done is not None and done.code == 250
    cert = backend.connections[0].client_cert
    assert cert is not None and (("commonName", "smtpgate.test"),) in cert["subject"]


def test_tls_config_errors() -> None:
    for text, name in [
        ("smtp_tls_security_level = dane\n", "smtp_tls_security_level"),
        ("smtp_tls_security_level = verify\nsmtp_tls_CAfile = /nonexistent\n", "smtp_tls_CAfile"),
        (
            "smtp_tls_security_level = may\nsmtp_tls_cert_file = /nonexistent\n",
            "smtp_tls_cert_file",
        ),
    ]:
        settings, _ = parse_settings(
            "relayhost = [127.0.0.1]:25\n" + text, "main.cf", hostname="mx.example.org"
        )
        with pytest.raises(ConfigError, match=name):
            Relay.from_config(relay_config(settings))


# -- slowness and cancellation -----------------------------------------------------------------


async def test_a_slow_backend_within_the_timeout_is_fine() -> None:
    slow = {"GREETING": 0.2, "RCPT": 0.2, "DOT": 0.2}
    async with RecordingBackend(delays=slow) as backend:
        async with relay_for(backend) as relay:
            _, done = await send(relay, ["b@example.org"])
    assert done is not None and done.code == 250


async def test_cancelled_data_drops_the_connection() -> None:
    async with RecordingBackend(delays={"DOT": math.inf}) as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            await tx.rcpt("b@example.org", [])
            task = asyncio.create_task(tx.data(MESSAGE))
            await backend.wait_for(lambda: len(backend.messages) == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert tx.outcome_unknown and relay.idle_connections == 0
            await tx.abort()  # no-op
        await backend.wait_for(lambda: backend.connections[0].closed)


async def test_cancelled_rcpt_drops_the_connection() -> None:
    async with RecordingBackend(delays={"RCPT": math.inf}) as backend:
        async with relay_for(backend) as relay:
            tx = await relay.begin(CLIENT, "a@example.net", [])
            task = asyncio.create_task(tx.rcpt("b@example.org", []))
            await backend.wait_for(
                lambda: (
                    any(c.startswith("RCPT") for c in backend.connections[0].commands)
                    if backend.connections
                    else False
                )
            )
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await tx.abort()
            assert relay.idle_connections == 0
        await backend.wait_for(lambda: backend.connections[0].closed)
    assert backend.messages == []


def test_quote_local_restores_the_smtp_form():
    from smtpgate.relay import quote_local

    assert quote_local("a b@example.org") == '"a b"@example.org'
    assert quote_local('say"hi@example.org') == '"say\\"hi"@example.org'
    assert quote_local("first.last@example.org") == "first.last@example.org"
    assert quote_local(".lead@example.org") == '".lead"@example.org'
    assert quote_local("a@b@example.org") == '"a@b"@example.org'
    assert quote_local("postmaster") == "postmaster"
