"""MilterSession against fake milters on 127.0.0.1: every verdict, every fault, Postfix's words."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from smtpgate.config.milterconf import MilterConfig, MilterSpec, parse_endpoint
from smtpgate.milter import protocol as p
from smtpgate.milter.client import Milters, MilterSession, Verdict
from tests.milter import fakemilter as f
from tests.milter.daemons import free_port
from tests.milter.fakemilter import CLOSE, Connection, FakeMilter, Packet, answering

MESSAGE = (
    b"Received: from client by mx\r\n"
    b"From: a@example.org\r\n"
    b"Subject:  two spaces\r\n"
    b"X-Folded: first\r\n\tsecond\r\n"
    b"\r\n"
    b"line 1\r\n"
    b"line 2\r\n"
)
MACROS = {
    "j": "mx.example.com",
    "{daemon_addr}": "127.0.0.1",
    "_": "client.example [192.0.2.1]",
    "i": "4ABCDEF123",
    "{mail_addr}": "a@example.org",
    "{rcpt_addr}": "b@example.net",
    "{client_addr}": "192.0.2.1",
}


class Log:
    """Collects the warnings the client logs."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, msg: str, /) -> None:
        self.lines.append(msg)


def spec(
    name: str,
    *,
    default_action: str = "tempfail",
    connect: float = 5.0,
    command: float = 5.0,
    content: float = 5.0,
    version: int = 6,
) -> MilterSpec:
    transport, host, port, path = parse_endpoint(name)
    return MilterSpec(
        name=name,
        transport=transport,
        host=host,
        port=port,
        path=path,
        connect_timeout=connect,
        command_timeout=command,
        content_timeout=content,
        default_action=default_action,
        version=version,
    )


def session(
    *specs: MilterSpec | FakeMilter, log: Log | None = None, **config: object
) -> MilterSession:
    milters = tuple(s if isinstance(s, MilterSpec) else spec(s.name) for s in specs)
    base = MilterConfig(milters=milters, daemon_name="mx.example.com", v="Postfix 3.7.11")
    for key, value in config.items():
        object.__setattr__(base, key, value)
    return Milters(base, log or Log()).session()


async def envelope(s: MilterSession, sender: str = "a@example.org") -> list[Verdict]:
    return [
        await s.connect(MACROS, "client.example", "192.0.2.1", 40000, "inet"),
        await s.helo(MACROS, "client.example"),
        await s.mail(MACROS, sender, ["SIZE=100"]),
        await s.rcpt(MACROS, "b@example.net", []),
        await s.data(MACROS),
    ]


REJECT = Verdict("reject", 550, "5.7.1", "Command rejected")
TEMPFAIL = Verdict("tempfail", 451, "4.7.1", "Service unavailable - try again later")


def named(verdict: Verdict, fake: FakeMilter) -> Verdict:
    return Verdict(
        verdict.action,
        verdict.code,
        verdict.enhanced,
        verdict.text,
        fake.name,
        verdict.reason,
        verdict.disconnect,
    )


# --- the conversation ------------------------------------------------------------------


async def test_a_clean_session_is_what_postfix_sends() -> None:
    async with FakeMilter() as fake:
        s = session(fake)
        verdicts = await envelope(s)
        result = await s.message(MACROS, MESSAGE)
        await s.abort()
        await s.close()
        await fake.wait(lambda: fake.connections[0].closed)
    assert {v.action for v in verdicts} == {"continue"}
    assert result.verdict.action == "continue"
    assert result.content is MESSAGE and not result.changed
    conn = fake.connections[0]
    assert conn.optneg == (6, 0x1FF, 0x1FFFFF)
    assert conn.commands() == b"ODCDHDMDRDTDLDLDLDLDNDBDEAAQ"
    (connect,) = conn.of(p.SMFIC_CONNECT)
    assert connect.data == b"client.example\x004" + struct.pack("!H", 40000) + b"192.0.2.1\x00"
    assert conn.of(p.SMFIC_HELO)[0].strings == ["client.example"]
    assert conn.of(p.SMFIC_MAIL)[0].strings == ["<a@example.org>", "SIZE=100"]
    assert conn.of(p.SMFIC_RCPT)[0].strings == ["<b@example.net>"]
    headers = [pk.strings for pk in conn.of(p.SMFIC_HEADER)]
    assert headers == [
        ["Received", "from client by mx"],
        ["From", "a@example.org"],
        ["Subject", " two spaces"],
        ["X-Folded", "first\n\tsecond"],
    ]
    assert [pk.data for pk in conn.of(p.SMFIC_BODY)] == [b"line 1\r\nline 2\r\n"]
    # The macros of each stage, as milter_<stage>_macros lists them (Postfix 3.7 defaults
    # here), with the values the caller knows; {daemon_name} and v from the configuration.
    assert conn.macros_for(p.SMFIC_CONNECT) == [
        {
            "j": "mx.example.com",
            "{daemon_name}": "mx.example.com",
            "{daemon_addr}": "127.0.0.1",
            "v": "Postfix 3.7.11",
            "_": "client.example [192.0.2.1]",
        }
    ]
    assert conn.macros_for(p.SMFIC_HELO) == [{}]
    assert conn.macros_for(p.SMFIC_MAIL) == [{"i": "4ABCDEF123", "{mail_addr}": "a@example.org"}]
    assert conn.macros_for(p.SMFIC_RCPT) == [{"i": "4ABCDEF123", "{rcpt_addr}": "b@example.net"}]
    assert conn.macros_for(p.SMFIC_DATA) == [{"i": "4ABCDEF123"}]
    assert conn.macros_for(p.SMFIC_HEADER) == [{"i": "4ABCDEF123"}] * 4
    assert conn.macros_for(p.SMFIC_BODYEOB) == [{"i": "4ABCDEF123"}]


MACRO_LISTS = {
    "connect": ("j", "{client_addr}"),
    "helo": (),
    "mail": ("{mail_addr}", "{auth_type}"),
    "rcpt": ("{rcpt_addr}",),
    "data": (),
    "end_of_header": (),
    "end_of_data": ("i",),
    "unknown_command": ("i",),
}


async def test_macro_lists_defaults_and_setsymlist() -> None:
    from types import MappingProxyType

    async with FakeMilter(symlists={p.SMFIM_ENVRCPT: "i {client_addr}"}) as fake:
        s = session(
            fake,
            macros=MappingProxyType(MACRO_LISTS),
            macro_defaults=MappingProxyType({"{auth_type}": "none"}),
        )
        await envelope(s)
        await s.unknown(MACROS, "XYZZY")
        await s.close()
    conn = fake.connections[0]
    assert conn.macros_for(p.SMFIC_CONNECT) == [
        {"j": "mx.example.com", "{client_addr}": "192.0.2.1"}
    ]
    assert conn.macros_for(p.SMFIC_MAIL) == [
        {"{mail_addr}": "a@example.org", "{auth_type}": "none"}
    ]
    # The milter asked for its own RCPT list (SMFIR_SETSYMLIST in the negotiation).
    assert conn.macros_for(p.SMFIC_RCPT) == [{"i": "4ABCDEF123", "{client_addr}": "192.0.2.1"}]
    assert conn.of(p.SMFIC_UNKNOWN)[0].strings == ["XYZZY"]


@pytest.mark.parametrize(
    ("hostname", "address", "port", "family", "data"),
    [
        ("unknown", "192.0.2.1", 25, "inet", b"[192.0.2.1]\x004\x00\x19192.0.2.1\x00"),
        ("h.example", "2001:db8::1", 25, "inet6", b"h.example\x006\x00\x192001:db8::1\x00"),
        ("localhost", "/run/s", 99, "unix", b"localhost\x00L\x00\x00/run/s\x00"),
        ("unknown", None, None, "unknown", b"unknown\x00U"),
    ],
)
async def test_connect_information(
    hostname: str, address: str | None, port: int | None, family: str, data: bytes
) -> None:
    async with FakeMilter() as fake:
        s = session(fake)
        assert (await s.connect({}, hostname, address, port, family)).action == "continue"
        await s.close()
    assert fake.connections[0].of(p.SMFIC_CONNECT)[0].data == data


async def test_a_unix_socket_milter(tmp_path: Path) -> None:
    async with FakeMilter(unix_path=str(tmp_path / "m.sock")) as fake:
        s = session(fake)
        assert [v.action for v in await envelope(s)] == ["continue"] * 5
        await s.close()
    assert fake.connections[0].commands().startswith(b"ODC")


# --- verdicts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        p.SMFIC_MAIL,
        p.SMFIC_RCPT,
        p.SMFIC_DATA,
        p.SMFIC_HEADER,
        p.SMFIC_EOH,
        p.SMFIC_BODY,
        p.SMFIC_BODYEOB,
    ],
)
@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (f.REJECT, REJECT),
        (f.TEMPFAIL, TEMPFAIL),
        (f.replycode("554 5.7.1 Gtube pattern"), Verdict("reject", 554, "5.7.1", "Gtube pattern")),
        (f.replycode("452 4.3.1 Try later"), Verdict("tempfail", 452, "4.3.1", "Try later")),
        (f.replycode("421 4.7.0 Bye"), Verdict("tempfail", 421, "4.7.0", "Bye", disconnect=True)),
        (
            f.SHUTDOWN,
            Verdict("tempfail", 421, "4.7.0", "Server closing connection", disconnect=True),
        ),
        (f.DISCARD, Verdict("discard")),
    ],
)
async def test_a_decision_at_each_stage(command: bytes, answer: bytes, verdict: Verdict) -> None:
    async with FakeMilter(answering(command, answer)) as fake:
        s = session(fake)
        verdicts = await envelope(s)
        result = await s.message(MACROS, MESSAGE)
        await s.close()
    got = [*verdicts, result.verdict]
    decided = [v for v in got if v.action != "continue"]
    assert decided[0] == named(verdict, fake)
    if command != p.SMFIC_BODYEOB and command in (p.SMFIC_HEADER, p.SMFIC_EOH, p.SMFIC_BODY):
        # Nothing more of the message goes to it; no end of message.
        assert p.SMFIC_BODYEOB not in fake.connections[0].events()


async def test_reject_at_connect_sticks_for_the_session() -> None:
    async with FakeMilter(answering(p.SMFIC_CONNECT, f.REJECT)) as fake:
        s = session(fake)
        verdicts = await envelope(s)
        assert s.other() == named(REJECT, fake)
        await s.close()
        await fake.wait(lambda: fake.connections[0].closed)
    assert verdicts == [named(REJECT, fake)] * 5
    # Postfix closes the socket after a connection-level decision: nothing more is sent.
    assert fake.connections[0].commands() == b"ODC"


async def test_a_reply_code_at_helo_sticks_too() -> None:
    async with FakeMilter(answering(p.SMFIC_HELO, f.replycode("550 5.7.1 Go away"))) as fake:
        s = session(fake)
        verdicts = await envelope(s)
        await s.close()
    go_away = Verdict("reject", 550, "5.7.1", "Go away", fake.name)
    assert verdicts[1:] == [go_away] * 4


async def test_accept_at_connect_ends_that_milters_part() -> None:
    async with FakeMilter(answering(p.SMFIC_CONNECT, f.ACCEPT)) as fake, FakeMilter() as other:
        s = session(fake, other)
        verdicts = await envelope(s)
        result = await s.message(MACROS, MESSAGE)
        await s.close()
    assert [v.action for v in verdicts] == ["continue"] * 5
    assert result.verdict.action == "continue"
    assert fake.connections[0].commands() == b"ODC"
    assert other.connections[0].commands().endswith(b"DEAQ")


async def test_accept_everywhere_is_reported_as_accept() -> None:
    async with FakeMilter(answering(p.SMFIC_MAIL, f.ACCEPT)) as fake:
        s = session(fake)
        verdicts = await envelope(s)
        assert not s.wants_message
        result = await s.message(MACROS, MESSAGE)
        await s.abort()
        assert s.wants_message
        again = await s.mail(MACROS, "c@example.org", [])
        await s.close()
    assert [v.action for v in verdicts] == ["continue", "continue", "accept", "accept", "accept"]
    assert result.verdict.action == "accept"
    # Accept at MAIL ends the milter's part in this message only: after ABORT, MAIL again.
    assert fake.connections[0].events() == b"OCHMAMAQ"
    assert again.action == "accept"


async def test_discard_at_connect_is_refused_with_a_warning() -> None:
    log = Log()
    async with FakeMilter(answering(p.SMFIC_CONNECT, f.DISCARD)) as fake:
        s = session(fake, log=log)
        verdicts = await envelope(s)
        await s.close()
    assert [v.action for v in verdicts] == ["continue"] * 5
    assert log.lines == [f"milter {fake.name}: DISCARD action is not allowed for connect or helo"]


async def test_a_rejection_ends_the_round() -> None:
    async with FakeMilter(answering(p.SMFIC_RCPT, f.REJECT)) as first, FakeMilter() as second:
        s = session(first, second)
        verdicts = await envelope(s)
        await s.close()
    assert verdicts[3] == named(REJECT, first)
    assert p.SMFIC_RCPT in first.connections[0].events()
    assert p.SMFIC_RCPT not in second.connections[0].events()
    assert p.SMFIC_DATA in second.connections[0].events()


async def test_reply_code_forms() -> None:
    log = Log()
    multi = "550-5.7.1 first line\r\n550 5.7.1 second 100%% sure%"
    async with FakeMilter(answering(p.SMFIC_MAIL, f.replycode(multi))) as fake:
        s = session(fake, log=log)
        verdicts = await envelope(s)
        await s.close()
    assert verdicts[2] == Verdict("reject", 550, "5.7.1", "first line\nsecond 100% sure", fake.name)
    assert str(verdicts[2].reply()) == "550-5.7.1 first line\n550 5.7.1 second 100% sure"
    assert log.lines == []


@pytest.mark.parametrize("text", ["250 2.0.0 ok", "550 4.7.1 mixed", "55 short", "5xx 5.7.1 x", ""])
async def test_a_malformed_reply_code_is_a_configuration_problem(text: str) -> None:
    log = Log()
    async with FakeMilter(answering(p.SMFIC_MAIL, f.replycode(text))) as fake:
        s = session(fake, log=log)
        verdicts = await envelope(s)
        await s.close()
    problem = Verdict(
        "tempfail", 451, "4.3.5", "Server configuration problem - try again later", fake.name
    )
    assert verdicts[2:] == [problem] * 3
    assert log.lines == [f"milter {fake.name}: malformed reply: {text}"]


async def test_quarantine_holds_the_message_and_the_next_one_is_new() -> None:
    def handler(conn: Connection, packet: Packet) -> bytes | None:
        if packet.command == p.SMFIC_BODYEOB and len(conn.of(p.SMFIC_BODYEOB)) == 1:
            return f.quarantine("looks odd") + f.addheader("X-Held", "yes") + f.CONTINUE
        return conn.milter.default(conn, packet)

    async with FakeMilter(handler) as fake, FakeMilter() as second:
        s = session(fake, second)
        await envelope(s)
        held = await s.message(MACROS, MESSAGE)
        await s.abort()
        await s.mail(MACROS, "a@example.org", [])
        await s.rcpt(MACROS, "b@example.net", [])
        await s.data(MACROS)
        clean = await s.message(MACROS, MESSAGE)
        await s.close()
    assert held.verdict == Verdict("quarantine", milter=fake.name, reason="looks odd")
    assert held.verdict.log_text == "milter triggers HOLD action"
    assert b"X-Held: yes\r\n" in held.content
    # Quarantine ends the round: the second milter did not see the first message.
    assert second.connections[0].events().count(p.SMFIC_BODYEOB) == 1
    assert clean.verdict.action == "continue"


# --- message content -------------------------------------------------------------------


async def test_edits_are_applied_and_the_next_milter_sees_them() -> None:
    def first(conn: Connection, packet: Packet) -> bytes | None:
        if packet.command == p.SMFIC_BODYEOB:
            return (
                f.insheader(0, "X-First", "top")
                + f.chgheader(1, "subject", "changed")
                + f.chgfrom("<new@example.org>", "RET=HDRS")
                + f.addrcpt("<extra@example.net>", "NOTIFY=NEVER")
                + f.delrcpt("<b@example.net>")
                + f.CONTINUE
            )
        return conn.milter.default(conn, packet)

    def second(conn: Connection, packet: Packet) -> bytes | None:
        if packet.command == p.SMFIC_BODYEOB:
            return f.addheader("X-Second", "last") + f.replbody(b"new body\r\n") + f.ACCEPT
        return conn.milter.default(conn, packet)

    async with FakeMilter(first) as one, FakeMilter(second) as two:
        s = session(one, two)
        await envelope(s)
        result = await s.message(MACROS, MESSAGE, hidden_headers=1)
        await s.close()
    assert result.verdict.action == "continue"
    assert result.content == (
        b"X-First: top\r\n"
        b"Received: from client by mx\r\n"
        b"From: a@example.org\r\n"
        b"subject: changed\r\n"
        b"X-Folded: first\r\n\tsecond\r\n"
        b"X-Second: last\r\n"
        b"\r\n"
        b"new body\r\n"
    )
    assert result.sender == ("new@example.org", ("RET=HDRS",))
    assert result.add_recipients == [("extra@example.net", ("NOTIFY=NEVER",))]
    assert result.delete_recipients == ["b@example.net"]
    # The hidden Received: is not shown; the second milter saw the first one's edits.
    first_saw = [pk.strings[0] for pk in one.connections[0].of(p.SMFIC_HEADER)]
    second_saw = [pk.strings for pk in two.connections[0].of(p.SMFIC_HEADER)]
    assert first_saw == ["From", "Subject", "X-Folded"]
    assert second_saw[0] == ["X-First", "top"]
    assert ["subject", "changed"] in second_saw


async def test_leading_space_negotiated() -> None:
    def handler(conn: Connection, packet: Packet) -> bytes | None:
        if packet.command == p.SMFIC_BODYEOB:
            return f.addheader("X-Lead", " kept") + f.CONTINUE
        return conn.milter.default(conn, packet)

    async with FakeMilter(handler, protocol=p.SMFIP_HDR_LEADSPC) as fake:
        s = session(fake)
        await envelope(s)
        result = await s.message(MACROS, b"Subject:  x\r\nA:b\r\n\r\nbody\r\n")
        await s.close()
    assert [pk.strings for pk in fake.connections[0].of(p.SMFIC_HEADER)] == [
        ["Subject", "  x"],
        ["A", "b"],
    ]
    assert result.content == b"Subject:  x\r\nA:b\r\nX-Lead: kept\r\n\r\nbody\r\n"


async def test_a_big_body_goes_in_chunks_and_skip_stops_them() -> None:
    body = b"".join(b"%08d" % i + b"x" * 90 + b"\r\n" for i in range(2000))  # 200000 bytes

    def handler(conn: Connection, packet: Packet) -> bytes | None:
        if packet.command == p.SMFIC_BODY and len(conn.of(p.SMFIC_BODY)) == 2:
            return f.SKIP
        return conn.milter.default(conn, packet)

    async with FakeMilter() as plain, FakeMilter(handler, protocol=p.SMFIP_SKIP) as fake:
        s = session(plain, fake)
        await envelope(s)
        result = await s.message(MACROS, b"Subject: big\r\n\r\n" + body)
        await s.close()
    assert result.verdict.action == "continue"
    chunks = [pk.data for pk in plain.connections[0].of(p.SMFIC_BODY)]
    assert [len(c) for c in chunks] == [65535, 65535, 65535, 3395]
    assert b"".join(chunks) == body
    assert len(fake.connections[0].of(p.SMFIC_BODY)) == 2
    assert fake.connections[0].events().endswith(b"BBEAQ")


async def test_no_events_and_no_replies_as_negotiated() -> None:
    no_reply = (
        p.SMFIP_NR_CONN | p.SMFIP_NR_HELO | p.SMFIP_NR_MAIL | p.SMFIP_NR_RCPT | p.SMFIP_NR_DATA
    ) | (p.SMFIP_NR_HDR | p.SMFIP_NR_EOH | p.SMFIP_NR_BODY | p.SMFIP_NR_UNKN)
    async with (
        FakeMilter(protocol=no_reply) as silent,
        FakeMilter(
            protocol=p.SMFIP_NOHELO | p.SMFIP_NOHDRS | p.SMFIP_NOBODY | p.SMFIP_NOUNKNOWN
        ) as picky,
    ):
        s = session(silent, picky)
        started = time.monotonic()
        verdicts = await envelope(s)
        await s.unknown(MACROS, "XYZZY")
        result = await s.message(MACROS, MESSAGE)
        await s.close()
        await silent.wait(lambda: silent.connections[0].closed)
    assert time.monotonic() - started < 3  # nobody waited for a reply that never comes
    assert [v.action for v in verdicts] == ["continue"] * 5
    assert result.verdict.action == "continue"
    assert silent.connections[0].events() == b"OCHMRTULLLLNBEAQ"
    # NOHELO: HELO's macros still go, HELO does not; NOHDRS/NOBODY: neither macros nor events.
    assert picky.connections[0].commands() == b"ODCDDMDRDTDDNDEAQ"


async def test_an_older_protocol_version_gets_only_its_events() -> None:
    async with FakeMilter(version=2, actions=0x3F) as old:
        s = session(old)
        await envelope(s)
        await s.unknown(MACROS, "XYZZY")
        await s.message(MACROS, MESSAGE)
        await s.close()
    # Version 2 has no DATA and no UNKNOWN event: not even their macros are sent.
    assert old.connections[0].events() == b"OCHMRLLLLNBEAQ"


async def test_rejected_recipients_go_to_the_milters_that_want_them() -> None:
    async with (
        FakeMilter(answering(p.SMFIC_RCPT, f.REJECT), protocol=p.SMFIP_RCPT_REJ) as wants,
        FakeMilter() as not_,
    ):
        s = session(wants, not_)
        await s.connect(MACROS, "client.example", "192.0.2.1", 1, "inet")
        await s.mail(MACROS, "a@example.org", [])
        verdict = await s.rcpt(
            MACROS, "x@example.net", [], rejected="554 5.7.1 <x@example.net>: Relay access denied"
        )
        await s.close()
    assert verdict.action == "continue"  # the milter's answer changes nothing
    assert wants.connections[0].macros_for(p.SMFIC_RCPT) == [
        {
            "i": "4ABCDEF123",
            "{rcpt_addr}": "<x@example.net>: Relay access denied",
            "{rcpt_host}": "5.7.1",
            "{rcpt_mailer}": "error",
        }
    ]
    assert p.SMFIC_RCPT not in not_.connections[0].events()


# --- faults ----------------------------------------------------------------------------


DEFAULTS = {
    "accept": [],
    "reject": [Verdict("reject", 550, "5.5.0", "Service unavailable")],
    "tempfail": [TEMPFAIL],
    "quarantine": [Verdict("quarantine", reason="milter default_action")],
}


@pytest.mark.parametrize("action", list(DEFAULTS))
async def test_a_milter_that_is_down_gets_its_default_action(action: str) -> None:
    log = Log()
    port = free_port()
    name = f"inet:127.0.0.1:{port}"
    s = session(spec(name, default_action=action), log=log)
    verdicts = await envelope(s)
    result = await s.message(MACROS, MESSAGE)
    assert result.content == MESSAGE
    await s.abort()
    await s.close()
    expected = [
        Verdict(v.action, v.code, v.enhanced, v.text, name, v.reason) for v in DEFAULTS[action]
    ]
    decided = [v for v in [*verdicts, result.verdict] if v.action not in ("continue", "accept")]
    assert decided == expected * 6
    assert log.lines == [f"connect to Milter service {name}: Connection refused"]


async def test_a_missing_unix_socket(tmp_path: Path) -> None:
    log = Log()
    name = f"unix:{tmp_path}/none.sock"
    s = session(spec(name), log=log)
    assert (await s.connect(MACROS, "h", "192.0.2.1", 1, "inet")).code == 451
    assert log.lines == [f"connect to Milter service {name}: No such file or directory"]


async def test_a_milter_that_is_down_does_not_stop_the_others() -> None:
    log = Log()
    async with FakeMilter(answering(p.SMFIC_BODYEOB, f.addheader("X-B", "1") + f.CONTINUE)) as fake:
        down = spec(f"inet:127.0.0.1:{free_port()}", default_action="accept")
        s = session(down, fake, log=log)
        await envelope(s)
        result = await s.message(MACROS, MESSAGE)
        await s.close()
    assert result.verdict.action == "continue"
    assert b"X-B: 1\r\n" in result.content


async def test_a_slow_milter_times_out_and_is_out_for_the_session() -> None:
    log = Log()

    async def handler(conn: Connection, packet: Packet) -> bytes | None:
        if packet.command == p.SMFIC_MAIL:
            await asyncio.sleep(3)
        return conn.milter.default(conn, packet)

    async with FakeMilter(handler) as fake:
        s = session(spec(fake.name, command=0.5), log=log)
        started = time.monotonic()
        verdicts = await envelope(s)
        elapsed = time.monotonic() - started
        await s.close()
        await fake.wait(lambda: fake.connections[0].closed)
    assert elapsed < 2.5
    assert verdicts[2:] == [named(TEMPFAIL, fake)] * 3
    assert log.lines == [
        f"milter {fake.name}: can't read SMFIC_MAIL reply packet header: Connection timed out"
    ]
    # Out for the session: nothing more is sent to it, not even QUIT.
    assert fake.connections[0].events() == b"OCHM"


def working(seconds: float, progress: float | None) -> f.Handler:
    """At the end of message: work ``seconds``, reporting progress every ``progress`` s."""

    async def handler(conn: Connection, packet: Packet) -> bytes | None:
        if packet.command != p.SMFIC_BODYEOB:
            return conn.milter.default(conn, packet)
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            await asyncio.sleep(progress or seconds)
            if progress:
                conn.writer.write(f.PROGRESS)
                await conn.writer.drain()
        return f.addheader("X-Done", "yes") + f.CONTINUE

    return handler


async def test_progress_restarts_the_content_timeout() -> None:
    async with FakeMilter(working(2.0, 0.4)) as fake:
        s = session(spec(fake.name, content=1.0, command=1.0))
        await envelope(s)
        result = await s.message(MACROS, MESSAGE)
        await s.close()
    assert result.verdict.action == "continue"
    assert b"X-Done: yes\r\n" in result.content


async def test_without_progress_the_content_timeout_applies() -> None:
    log = Log()
    async with FakeMilter(working(2.0, None)) as fake:
        s = session(spec(fake.name, content=1.0, command=5.0), log=log)
        await envelope(s)
        started = time.monotonic()
        result = await s.message(MACROS, MESSAGE)
        elapsed = time.monotonic() - started
        await s.close()
    assert result.verdict == named(TEMPFAIL, fake)
    assert 0.9 < elapsed < 1.9
    assert log.lines == [
        f"milter {fake.name}: can't read SMFIC_BODYEOB reply packet header: Connection timed out"
    ]


async def test_a_milter_that_closes_mid_message() -> None:
    log = Log()
    async with FakeMilter(answering(p.SMFIC_BODY, CLOSE)) as fake:
        s = session(fake, log=log)
        await envelope(s)
        result = await s.message(MACROS, MESSAGE)
        after = await s.mail(MACROS, "x@example.org", [])
        await s.close()
    assert result.verdict == named(TEMPFAIL, fake)
    assert result.content == MESSAGE
    assert after == named(TEMPFAIL, fake)
    assert log.lines == [
        f"milter {fake.name}: can't read SMFIC_BODY reply packet header: Application error"
    ]


@pytest.mark.parametrize(
    ("answer", "warning"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "unreasonable packet length: 1213486160 > 67108864"),
        (b"\x00\x00\x00\x00", "bad packet length: 0"),
        (f.reply(b"Z"), "unexpected filter response (unknown filter reply) after event SMFIC_MAIL"),
        (f.reply(b"f"), "unexpected filter response SMFIR_CONN_FAIL after event SMFIC_MAIL"),
        (
            f.addheader("X", "1"),
            "unexpected filter response SMFIR_ADDHEADER after event SMFIC_MAIL",
        ),
        (f.reply(b"c", b"x"), "reply SMFIR_CONTINUE was followed by 1 data bytes"),
    ],
)
async def test_garbage_is_a_fault(answer: bytes, warning: str) -> None:
    log = Log()
    async with FakeMilter(answering(p.SMFIC_MAIL, answer)) as fake:
        s = session(spec(fake.name, command=1.0), log=log)
        verdicts = await envelope(s)
        await s.close()
    assert verdicts[2:] == [named(TEMPFAIL, fake)] * 3
    assert log.lines == [f"milter {fake.name}: {warning}"]


async def test_a_truncated_packet_then_the_end() -> None:
    log = Log()

    def handler(conn: Connection, packet: Packet) -> bytes | object | None:
        if packet.command == p.SMFIC_MAIL:
            conn.writer.write(b"\x00\x00\x00\x05c")
            return CLOSE
        return conn.milter.default(conn, packet)

    async with FakeMilter(handler) as fake:
        s = session(fake, log=log)
        verdicts = await envelope(s)
        await s.close()
    assert verdicts[2] == named(TEMPFAIL, fake)
    assert log.lines == [f"milter {fake.name}: EOF while reading data: Application error"]


async def test_a_milter_that_never_negotiates() -> None:
    log = Log()
    async with FakeMilter(optneg_reply=b"") as fake:  # it never answers the negotiation
        s = session(spec(fake.name, command=0.5), log=log)
        verdict = await s.connect(MACROS, "h", "192.0.2.1", 1, "inet")
        await s.close()
    assert verdict == named(TEMPFAIL, fake)
    assert log.lines == [
        f"milter {fake.name}: can't read SMFIC_OPTNEG reply packet header: Connection timed out",
        f"milter {fake.name}: read error in initial handshake",
    ]


@pytest.mark.parametrize(
    ("kwargs", "warning"),
    [
        ({"version": 7}, "protocol version 7 conflict with MTA protocol version 6"),
        ({"actions": 0x7FF}, "request mask 0x7ff conflict with MTA request mask 0x1ff"),
        ({"optneg_reply": f.CONTINUE}, 'unexpected reply "c" in initial handshake'),
    ],
)
async def test_a_negotiation_that_fails(kwargs: dict[str, object], warning: str) -> None:
    log = Log()
    async with FakeMilter(**kwargs) as fake:  # type: ignore[arg-type]
        s = session(fake, log=log)
        verdict = await s.connect(MACROS, "h", "192.0.2.1", 1, "inet")
        await s.close()
    assert verdict == named(TEMPFAIL, fake)
    assert log.lines == [f"milter {fake.name}: {warning}"]


async def test_body_replacement_mixed_with_other_edits() -> None:
    log = Log()
    answer = f.replbody(b"a") + f.addheader("X", "1") + f.replbody(b"b") + f.CONTINUE
    async with FakeMilter(answering(p.SMFIC_BODYEOB, answer)) as fake:
        s = session(fake, log=log)
        await envelope(s)
        result = await s.message(MACROS, MESSAGE)
        await s.close()
    assert result.verdict == Verdict(
        "tempfail", 451, "4.3.5", "Server configuration problem - try again later", fake.name
    )
    assert log.lines == [
        f"milter {fake.name}: body replacement requests can't currently be mixed with "
        "other requests"
    ]


async def test_a_bad_header_name_is_skipped_with_a_warning() -> None:
    log = Log()
    answer = f.addheader("Bad Name", "1") + f.addheader("Good", "2") + f.CONTINUE
    async with FakeMilter(answering(p.SMFIC_BODYEOB, answer)) as fake:
        s = session(fake, log=log)
        await envelope(s)
        result = await s.message(MACROS, MESSAGE)
        await s.close()
    assert result.verdict.action == "continue"
    assert b"Bad Name" not in result.content and b"Good: 2\r\n" in result.content
    assert log.lines == [
        f"milter {fake.name}: ignoring header edit with a bad header name: b'Bad Name'"
    ]


async def test_a_repeated_helo_and_starttls_abort() -> None:
    async with FakeMilter() as fake:
        s = session(fake)
        await s.connect(MACROS, "h", "192.0.2.1", 1, "inet")
        await s.reset_helo()  # STARTTLS before any HELO: nothing to forget
        await s.helo(MACROS, "one")
        await s.helo(MACROS, "two")  # HELO, then ABORT
        await s.reset_helo()  # STARTTLS
        await s.close()
        await fake.wait(lambda: fake.connections[0].closed)
    assert fake.connections[0].events() == b"OCHHAAQ"


async def test_abort_and_quit() -> None:
    async with FakeMilter() as fake:
        s = session(fake)
        await envelope(s)
        await s.abort()
        await s.abort()  # still in the envelope state: another ABORT, as Postfix sends
        await s.close()  # after a HELO: ABORT (Postfix's helo_reset), then QUIT
        await s.close()  # redundant: nothing happens
        await fake.wait(lambda: fake.connections[0].closed)
    assert fake.connections[0].events() == b"OCHMRTAAAQ"


class LazyMacros(Mapping[str, str]):
    """Values computed when asked for, as the machine's SessionMacros does; never listed."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: list[str] = []

    def __getitem__(self, name: str) -> str:
        self.asked.append(name)
        return self.values[name]

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the macros are looked up by name, never listed")

    def __len__(self) -> int:
        raise AssertionError("the macros are looked up by name, never counted")


async def test_macros_are_looked_up_by_name_only() -> None:
    macros = LazyMacros({"i": "QID1", "{mail_addr}": "a@example.org", "j": "mx"})
    async with FakeMilter() as fake:
        s = session(fake)
        await s.connect(macros, "h", "192.0.2.1", 1, "inet")
        await s.mail(macros, "a@example.org", [])
        await s.close()
    assert fake.connections[0].macros_for(p.SMFIC_MAIL) == [
        {"i": "QID1", "{mail_addr}": "a@example.org"}
    ]
    assert "{auth_type}" in macros.asked and "{client_addr}" not in macros.asked


class Timings:
    """The metrics port's milter_reply calls (smtpgate_milter_reply_seconds)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.seconds: list[float] = []

    def milter_reply(self, milter: str, event: str, seconds: float) -> None:
        self.events.append((milter, event))
        self.seconds.append(seconds)


async def test_each_event_of_each_milter_is_timed() -> None:
    timings = Timings()
    async with FakeMilter() as fake:
        base = MilterConfig(milters=(spec(fake.name),), daemon_name="mx", v="Postfix 3.7.11")
        milters = Milters(base, Log())
        milters.metrics = timings  # type: ignore[assignment]
        s = milters.session()
        await envelope(s)
        await s.message(MACROS, MESSAGE)
        await s.close()
    assert timings.events == [
        (fake.name, event) for event in ("connect", "helo", "mail", "rcpt", "data", "eom")
    ]
    assert all(0 <= seconds < 10 for seconds in timings.seconds)
