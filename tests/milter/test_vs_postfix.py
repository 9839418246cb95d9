"""The milter client next to Postfix 3.7's own, against the same fake milter.

A throwaway Postfix (``tests/postfix_instance.py``) with ``smtpd_milters`` pointing at a
:class:`FakeMilter` (run in a thread of its own) talks SMTP with a client; then a
:class:`MilterSession` makes the same calls smtpd makes. Compared: the packets the milter
received (commands, macro names, event data), the replies the client got against the
verdicts, and the warnings Postfix logged against the client's.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from smtpgate.config.milterconf import MilterConfig
from smtpgate.milter import protocol as p
from smtpgate.milter.client import Milters, Verdict
from tests.milter import fakemilter as f
from tests.milter.daemons import free_port
from tests.milter.fakemilter import CLOSE, Connection, FakeMilter, Handler, answering
from tests.milter.test_client import Log, spec
from tests.postfix_instance import POSTFIX, PostfixInstance, RawStep

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not os.path.exists(POSTFIX),
        reason=f"{POSTFIX} is missing: install Debian's postfix (.ci/run does)",
    ),
]

CLIENT = "127.0.0.5"


@contextmanager
def threaded(handler: Handler | None = None, **options: object) -> Iterator[FakeMilter]:
    """A FakeMilter served by an event loop in a thread (Postfix's side is blocking)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: list[FakeMilter] = []
    stop = asyncio.Event()

    async def run() -> None:
        async with FakeMilter(handler, **options) as fake:  # type: ignore[arg-type]
            holder.append(fake)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield holder[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def postfix(milter: str, extra: str = "") -> PostfixInstance:
    return PostfixInstance(
        f"smtpd_milters = {milter}\nmilter_command_timeout = 2s\n"
        f"relay_domains = example.net\nmyhostname = mx.smtpgate.test\n{extra}"
    )


async def smtpgate(milter: str, log: Log) -> list[Verdict]:
    """smtpd's calls for HELO, MAIL, RCPT, QUIT, with Postfix's macro values."""
    macros = {
        "j": "mx.smtpgate.test",
        "{daemon_addr}": "127.0.0.1",
        "_": f"unknown [{CLIENT}]",
        "{mail_addr}": "a@example.org",
        "{rcpt_addr}": "b@example.net",
        "{mail_host}": "example.org",
        "{mail_mailer}": "smtp",
        "{rcpt_host}": "example.net",
        "{rcpt_mailer}": "smtp",
    }
    config = MilterConfig(
        milters=(spec(milter, command=2.0),), daemon_name="mx.smtpgate.test", v="Postfix 3.7.11"
    )
    s = Milters(config, log).session()
    verdicts = [
        await s.connect(macros, "unknown", CLIENT, 40000, "inet"),
        await s.helo(macros, "client.example"),
        await s.mail(macros, "a@example.org", []),
        await s.rcpt(macros, "b@example.net", []),
    ]
    await s.abort()
    await s.close()
    return verdicts


def postfix_warnings(log: list[str]) -> list[str]:
    return [line.removeprefix("warning: ") for line in log if line.startswith("warning: milter")]


def replies(dialogue_exchanges: list[tuple[str, list[str]]]) -> list[str]:
    return [reply[-1] for _, reply in dialogue_exchanges]


def without_port(event: bytes, data: bytes) -> bytes:
    """SMFIC_CONNECT's data without the client's port (Postfix's client has its own)."""
    if event != p.SMFIC_CONNECT:
        return data
    name, rest = data.split(b"\0", 1)
    return name + b"\0" + rest[:1] + rest[3:]


def test_a_clean_session_sends_what_postfix_sends() -> None:
    with threaded() as theirs, threaded() as ours:
        with postfix(theirs.name) as pf:
            d = pf.dialogue(CLIENT, "client.example", "a@example.org", ["b@example.net"])
        assert [e.reply[-1][:3] for e in d.exchanges] == ["250", "250", "250", "221"]
        log = Log()
        verdicts = asyncio.run(smtpgate(ours.name, log))
        assert {v.action for v in verdicts} == {"continue"}
        pf_conn, our_conn = theirs.connections[-1], ours.connections[-1]
        # the fakes read in threads of their own: wait (bounded) until both have read to
        # the end (the QUIT and the close), then compare
        deadline = time.monotonic() + 10
        while not (pf_conn.closed and our_conn.closed):
            assert time.monotonic() < deadline, "a milter connection was not closed"
            time.sleep(0.02)  # poll interval of a bounded wait for another thread
        assert our_conn.optneg == pf_conn.optneg == (6, 0x1FF, 0x1FFFFF)
        assert our_conn.commands() == pf_conn.commands()
        for event in (p.SMFIC_CONNECT, p.SMFIC_HELO, p.SMFIC_MAIL, p.SMFIC_RCPT):
            assert [m.keys() for m in our_conn.macros_for(event)] == [
                m.keys() for m in pf_conn.macros_for(event)
            ], event
            ours_data = [without_port(event, pk.data) for pk in our_conn.of(event)]
            assert ours_data == [without_port(event, pk.data) for pk in pf_conn.of(event)]
        assert pf_conn.macros_for(p.SMFIC_CONNECT)[0]["v"] == "Postfix 3.7.11"


def _case(
    handler: Handler | None, command: str
) -> tuple[list[str], list[str], list[Verdict], list[str]]:
    with threaded(handler) as theirs, threaded(handler) as ours:
        with postfix(theirs.name) as pf:
            d = pf.dialogue(CLIENT, "client.example", "a@example.org", ["b@example.net"])
        log = Log()
        verdicts = asyncio.run(smtpgate(ours.name, log))
    got = {e.command.split()[0]: e.reply[-1] for e in d.exchanges}
    return (
        [got.get(command, "")],
        postfix_warnings(d.log),
        verdicts,
        [line.replace(ours.name, theirs.name) for line in log.lines],
    )


@pytest.mark.parametrize(
    ("answer", "reply"),
    [
        (f.REJECT, "550 5.7.1 Command rejected"),
        (f.TEMPFAIL, "451 4.7.1 Service unavailable - try again later"),
        (f.replycode("553 5.7.1 Not you, 100%% sure%"), "553 5.7.1 Not you, 100% sure"),
    ],
)
def test_a_mail_decision_is_postfixs_reply(answer: bytes, reply: str) -> None:
    pf_reply, _, verdicts, _ = _case(answering(p.SMFIC_MAIL, answer), "MAIL")
    assert pf_reply == [reply]
    assert str(verdicts[2].reply()) == reply


def test_a_milter_that_is_down() -> None:
    port = free_port()
    name = f"inet:127.0.0.1:{port}"
    with postfix(name) as pf:
        d = pf.dialogue(CLIENT, "client.example", "a@example.org", ["b@example.net"])
    log = Log()
    verdicts = asyncio.run(smtpgate(name, log))
    mail = next(e.reply[-1] for e in d.exchanges if e.command.startswith("MAIL"))
    assert mail == "451 4.7.1 Service unavailable - try again later"
    assert str(verdicts[2].reply()) == mail
    assert f"warning: connect to Milter service {name}: Connection refused" in d.log
    assert log.lines == [f"connect to Milter service {name}: Connection refused"]


def test_a_milter_that_closes_at_mail() -> None:
    def handler(conn: Connection, packet: f.Packet) -> bytes | object | None:
        if packet.command == p.SMFIC_MAIL:
            return CLOSE
        return conn.milter.default(conn, packet)

    pf_reply, pf_warnings, verdicts, ours = _case(handler, "MAIL")
    assert pf_reply == ["451 4.7.1 Service unavailable - try again later"]
    assert str(verdicts[2].reply()) == pf_reply[0]
    assert ours == pf_warnings


def test_garbage_at_rcpt() -> None:
    pf_reply, pf_warnings, verdicts, ours = _case(
        answering(p.SMFIC_RCPT, f.addheader("X", "1")), "RCPT"
    )
    assert pf_reply == ["451 4.7.1 Service unavailable - try again later"]
    assert str(verdicts[3].reply()) == pf_reply[0]
    assert ours == pf_warnings


CONTENT = (
    b"From: a@example.org\r\n"
    b"To: b@example.net\r\n"
    b"Subject:  two spaces\r\n"
    b"X-Folded: first\r\n"
    b"\tsecond\r\n"
    b"X-Tab:\tvalue\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"\r\n"
    b"first body line\r\n"
    b"\r\n"
    b"last line\r\n"
)


def postfix_message(milter: str) -> list[list[str]]:
    """Postfix receives CONTENT: the replies to each step."""
    with postfix(milter) as pf:
        d = pf.raw_dialogue(
            CLIENT,
            [
                "EHLO client.example",
                "MAIL FROM:<a@example.org>",
                "RCPT TO:<b@example.net>",
                "DATA",
                RawStep(CONTENT + b".\r\n", 1),
                "QUIT",
            ],
        )
    return [e.replies[-1] for e in d.exchanges]


async def smtpgate_message(milter: str) -> Verdict:
    config = MilterConfig(milters=(spec(milter),), daemon_name="mx.smtpgate.test")
    s = Milters(config, Log()).session()
    queue_id = {"i": "4ABCDEF123"}
    await s.connect({}, "unknown", CLIENT, 40000, "inet")
    await s.helo({}, "client.example")
    await s.mail(queue_id, "a@example.org", [])
    await s.rcpt(queue_id, "b@example.net", [])
    await s.data(queue_id)
    result = await s.message(queue_id, CONTENT)
    await s.abort()
    await s.close()
    return result.verdict


def test_the_message_is_sent_as_postfix_sends_it() -> None:
    with threaded() as theirs, threaded() as ours:
        replies = postfix_message(theirs.name)
        assert replies[4][-1].startswith("250 2.0.0 Ok: queued as")
        assert asyncio.run(smtpgate_message(ours.name)).action == "continue"
        pf_conn = next(c for c in theirs.connections if p.SMFIC_BODYEOB in c.events())
        our_conn = ours.connections[-1]
    assert our_conn.events() == pf_conn.events()
    for event in (p.SMFIC_HEADER, p.SMFIC_EOH, p.SMFIC_BODY, p.SMFIC_BODYEOB):
        assert [pk.data for pk in our_conn.of(event)] == [pk.data for pk in pf_conn.of(event)]
        assert [m.keys() for m in our_conn.macros_for(event)] == [
            m.keys() for m in pf_conn.macros_for(event)
        ]


@pytest.mark.parametrize(
    ("answer", "reply"),
    [
        (f.replycode("554 5.7.1 Gtube pattern"), "554 5.7.1 Gtube pattern"),
        (f.REJECT, "550 5.7.1 Command rejected"),
        (f.TEMPFAIL, "451 4.7.1 Service unavailable - try again later"),
    ],
)
def test_an_end_of_message_decision_is_postfixs_reply(answer: bytes, reply: str) -> None:
    with threaded(answering(p.SMFIC_BODYEOB, answer)) as theirs:
        replies = postfix_message(theirs.name)
    with threaded(answering(p.SMFIC_BODYEOB, answer)) as ours:
        verdict = asyncio.run(smtpgate_message(ours.name))
    assert replies[4] == [reply]
    assert str(verdict.reply()) == reply
