"""How the machine applies the milters' verdicts, with a scripted in-memory milter port
(the real milter protocol and daemons: tests/milter; through a deployed server:
tests/serve/test_milters_serve.py).

Postfix's rules (smtpd.c check_milter_reply(), cleanup_milter.c cleanup_milter_apply()):
a refusal at CONNECT becomes a 554 (or 421) greeting; HELO is refused only by a 421; MAIL,
RCPT and DATA get the milter's reply (at RCPT, that recipient's); at the end of message
the whole message has been with the milters before the backend sees it; a hold or a
discard lets the dialogue go on and is logged once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smtpgate.config import parse_settings
from smtpgate.config.service import ServiceConfig
from smtpgate.policy.plan import build_plan
from smtpgate.smtp.machine import SmtpMachine
from smtpgate.smtp.ports import LocalCounters
from tests.smtp.test_machine_routes import RecordingBackend


@dataclass(frozen=True)
class Verdict:
    action: str = "continue"
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    milter: str = "fake"
    reason: str = ""


REJECT = Verdict("reject", 550, "5.7.1", "Command rejected")
TEMPFAIL = Verdict("tempfail", 451, "4.7.1", "Service unavailable - try again later")
SHUTDOWN = Verdict("tempfail", 421, "4.7.0", "Server closing connection")


@dataclass
class Outcome:
    verdict: Verdict = field(default_factory=Verdict)
    content: bytes | None = None
    sender: tuple[str, Sequence[str]] | None = None
    add_recipients: list[tuple[str, Sequence[str]]] = field(default_factory=list)
    delete_recipients: list[str] = field(default_factory=list)


class FakeMilters:
    """Answers each stage from ``script`` (stage -> Verdict, or for "rcpt" a dict per
    address); records every call with the macros it could see then."""

    def __init__(self, script: dict[str, object] | None = None) -> None:
        self.script = script or {}
        self.calls: list[tuple[str, object]] = []
        self.macros_seen: dict[str, dict[str, str]] = {}
        self.message_in: bytes | None = None
        self.hidden_headers = -1

    def _verdict(self, stage: str, macros: Mapping[str, str], arg: object = None) -> Verdict:
        self.calls.append((stage, arg))
        self.macros_seen[stage] = dict(macros)
        found = self.script.get(stage, Verdict())
        if isinstance(found, dict):
            found = found.get(arg, Verdict())
        assert isinstance(found, Verdict)
        return found

    async def connect(self, macros, hostname, address, port, family):  # type: ignore[no-untyped-def]
        return self._verdict("connect", macros, (hostname, address, family))

    async def helo(self, macros, name):  # type: ignore[no-untyped-def]
        return self._verdict("helo", macros, name)

    async def mail(self, macros, sender, params):  # type: ignore[no-untyped-def]
        return self._verdict("mail", macros, sender)

    async def rcpt(self, macros, recipient, params, *, rejected=None):  # type: ignore[no-untyped-def]
        if rejected is not None:
            self.calls.append(("rcpt-rejected", (recipient, rejected)))
            return Verdict()
        return self._verdict("rcpt", macros, recipient)

    async def data(self, macros):  # type: ignore[no-untyped-def]
        return self._verdict("data", macros)

    async def unknown(self, macros, command):  # type: ignore[no-untyped-def]
        return self._verdict("unknown", macros, command)

    async def message(self, macros, content, *, hidden_headers=0):  # type: ignore[no-untyped-def]
        # the machine hands over a Message (its Received: header and the stored content)
        self.message_in = content if isinstance(content, bytes) else content.to_bytes()
        self.hidden_headers = hidden_headers
        self.calls.append(("message", None))
        self.macros_seen["message"] = dict(macros)
        outcome = self.script.get("message", Outcome())
        assert isinstance(outcome, Outcome)
        if outcome.content is None:
            outcome.content = content
        return outcome

    def other(self) -> Verdict:
        return self._verdict("other", {})

    async def reset_helo(self) -> None:
        self.calls.append(("reset_helo", None))

    async def abort(self) -> None:
        self.calls.append(("abort", None))

    async def close(self) -> None:
        self.calls.append(("close", None))

    def stages(self) -> list[str]:
        return [stage for stage, _ in self.calls]


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, text: str) -> None:
        self.lines.append(text)

    def warning(self, text: str) -> None:
        self.lines.append(f"warning: {text}")


MAIN_CF = (
    "myhostname = mx.example.org\nmynetworks = 127.0.0.1/32\nrelay_domains = bar.org\n"
    "relayhost = [127.0.0.1]:9\nsmtpd_peername_lookup = no\n"
    "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination\n"
)


@dataclass
class Session:
    machine: SmtpMachine
    log: Log
    greeting: list[str]

    async def send(self, data: str | bytes) -> list[str]:
        raw = data.encode() + b"\r\n" if isinstance(data, str) else data
        self.machine.receive(raw)
        return lines(await self.machine.advance())


def lines(effects: Sequence[object]) -> list[str]:
    """The reply lines among the effects."""
    return [
        line
        for e in effects
        if isinstance(e, bytes)
        for line in e.decode().rstrip("\r\n").split("\r\n")
    ]


async def session(tmp_path: Path, milters: FakeMilters, backend: RecordingBackend) -> Session:
    settings, _ = parse_settings(MAIN_CF, str(tmp_path / "main.cf"), hostname="mx.example.org")
    plan, diagnostics = build_plan(settings, strict_tables=True)
    assert plan is not None, [str(d) for d in diagnostics]
    log = Log()
    machine = SmtpMachine(
        plan=plan,
        config=ServiceConfig.from_settings(settings),
        backend=backend,
        anvil=LocalCounters(),
        log=log,
        address="192.0.2.1",
        port=4711,
        queue_ids=lambda: "QID",
        milters=milters,
        server=("192.0.2.25", 25),
    )
    await machine.open()
    greeting = lines(machine.greet())
    return Session(machine, log, greeting)


async def transaction(s: Session, rcpts: Sequence[str] = ("x@bar.org",)) -> list[str]:
    assert (await s.send("EHLO c.example"))[0].startswith("250-mx.example.org")
    assert await s.send("MAIL FROM:<s@example.net>") == ["250 2.1.0 Ok"]
    for rcpt in rcpts:
        await s.send(f"RCPT TO:<{rcpt}>")
    assert await s.send("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    return await s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")


async def test_connect_reject_is_a_554_greeting_and_persists_in_the_milter(tmp_path: Path):
    milters = FakeMilters({"connect": REJECT, "mail": REJECT})
    s = await session(tmp_path, milters, RecordingBackend())
    assert s.greeting == ["554 mx.example.org ESMTP not accepting connections"]
    assert (
        "NOQUEUE: milter-reject: CONNECT from unknown[192.0.2.1]: 550 5.7.1 Command rejected; "
        "proto=SMTP"
    ) in s.log.lines
    # HELO is not refused; MAIL gets what the milter (still) says
    assert (await s.send("HELO c.example")) == ["250 mx.example.org"]
    assert await s.send("MAIL FROM:<s@example.net>") == ["550 5.7.1 Command rejected"]
    assert milters.calls[0] == ("connect", ("unknown", "192.0.2.1", "4"))


async def test_connect_421_greets_with_421_and_closes(tmp_path: Path):
    s = await session(tmp_path, FakeMilters({"connect": SHUTDOWN}), RecordingBackend())
    assert s.greeting == ["421 mx.example.org Service unavailable - try again later"]
    assert s.machine.closing


async def test_helo_is_refused_only_by_421(tmp_path: Path):
    s = await session(tmp_path, FakeMilters({"helo": REJECT}), RecordingBackend())
    # after a 5xx, EHLO announces ENHANCEDSTATUSCODES only (smtpd.c ehlo_cmd)
    assert await s.send("EHLO c.example") == ["250-mx.example.org", "250 ENHANCEDSTATUSCODES"]
    assert (
        "NOQUEUE: milter-reject: EHLO from unknown[192.0.2.1]: 550 5.7.1 Command rejected; "
        "proto=SMTP helo=<c.example>"
    ) in s.log.lines
    s = await session(tmp_path, FakeMilters({"helo": SHUTDOWN}), RecordingBackend())
    assert await s.send("EHLO c.example") == ["421 4.7.0 Server closing connection"]
    assert s.machine.closing


async def test_mail_reject_with_the_milters_text_and_an_abort(tmp_path: Path):
    custom = Verdict("reject", 553, "5.7.1", "Sender blocked by policy")
    milters = FakeMilters({"mail": custom})
    s = await session(tmp_path, milters, RecordingBackend())
    await s.send("EHLO c.example")
    assert await s.send("MAIL FROM:<s@example.net>") == ["553 5.7.1 Sender blocked by policy"]
    assert milters.stages()[-1] == "abort"
    assert (
        "NOQUEUE: milter-reject: MAIL from unknown[192.0.2.1]: 553 5.7.1 Sender blocked by "
        "policy; from=<s@example.net> proto=ESMTP helo=<c.example>"
    ) in s.log.lines
    # the session goes on: a new MAIL is asked again
    milters.script.clear()
    assert await s.send("MAIL FROM:<t@example.net>") == ["250 2.1.0 Ok"]


async def test_rcpt_refusal_is_that_recipients_reply(tmp_path: Path):
    backend = RecordingBackend()
    milters = FakeMilters({"rcpt": {"bad@bar.org": TEMPFAIL}})
    s = await session(tmp_path, milters, backend)
    await s.send("EHLO c.example")
    await s.send("MAIL FROM:<s@example.net>")
    assert await s.send("RCPT TO:<bad@bar.org>") == [
        "451 4.7.1 Service unavailable - try again later"
    ]
    assert await s.send("RCPT TO:<x@bar.org>") == ["250 2.1.5 Ok"]
    assert await s.send("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    assert await s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n") == ["250 2.0.0 Ok: queued as R1"]
    [txn] = backend.transactions
    assert txn.recipients == [("x@bar.org", [])]
    assert (
        # no queue id yet: Postfix opens the queue file after the first recipient passed
        "NOQUEUE: milter-reject: RCPT from unknown[192.0.2.1]: 451 4.7.1 Service unavailable - "
        "try again later; from=<s@example.net> to=<bad@bar.org> proto=ESMTP helo=<c.example>"
    ) in s.log.lines
    rcpt_macros = milters.macros_seen["rcpt"]
    assert rcpt_macros["{rcpt_addr}"] == "x@bar.org" and rcpt_macros["{rcpt_mailer}"] == "smtp"


async def test_data_refusal(tmp_path: Path):
    s = await session(tmp_path, FakeMilters({"data": REJECT}), RecordingBackend())
    await s.send("EHLO c.example")
    await s.send("MAIL FROM:<s@example.net>")
    await s.send("RCPT TO:<x@bar.org>")
    assert await s.send("DATA") == ["550 5.7.1 Command rejected"]


async def test_end_of_message_reject_relays_nothing(tmp_path: Path):
    backend = RecordingBackend()
    milters = FakeMilters({"message": Outcome(REJECT)})
    s = await session(tmp_path, milters, backend)
    assert await transaction(s) == ["550 5.7.1 Command rejected"]
    assert [t.message for t in backend.transactions] == [None]
    assert backend.transactions[0].aborted
    # cleanup's line: the reply without its code, the last recipient
    assert (
        "QID: milter-reject: END-OF-MESSAGE from unknown[192.0.2.1]: 5.7.1 Command rejected; "
        "from=<s@example.net> to=<x@bar.org> proto=ESMTP helo=<c.example>"
    ) in s.log.lines
    # the milters saw the whole message with smtpgate's Received: header on top
    assert milters.message_in is not None
    assert milters.message_in.startswith(b"Received: from c.example (unknown [192.0.2.1])")
    assert milters.message_in.endswith(b"Subject: x\r\n\r\nhi\r\n")
    assert milters.hidden_headers == 1  # smtpgate's Received:, hidden as Postfix hides its own
    assert "abort" not in milters.stages()[milters.stages().index("message") :]


async def test_end_of_message_edits_reach_the_backend(tmp_path: Path):
    backend = RecordingBackend()
    edited = b"X-Spam: yes\r\nSubject: [SPAM] x\r\n\r\nhi\r\n"
    outcome = Outcome(
        content=edited,
        sender=("<new@example.net>", ()),
        add_recipients=[("<added@bar.org>", ())],
        delete_recipients=["<y@bar.org>"],
    )
    s = await session(tmp_path, FakeMilters({"message": outcome}), backend)
    assert await transaction(s, ["x@bar.org", "y@bar.org"]) == ["250 2.0.0 Ok: queued as R1"]
    first, final = backend.transactions
    assert first.aborted and first.message is None  # the lock-step envelope is given up
    assert [r for r, _ in final.recipients] == ["x@bar.org", "added@bar.org"]
    assert final.message == edited


async def test_end_of_message_discard(tmp_path: Path):
    backend = RecordingBackend()
    s = await session(tmp_path, FakeMilters({"message": Outcome(Verdict("discard"))}), backend)
    assert await transaction(s) == ["250 2.0.0 Ok: queued as QID"]
    assert all(t.message is None for t in backend.transactions)
    assert (
        "QID: milter-discard: END-OF-MESSAGE from unknown[192.0.2.1]: milter triggers DISCARD "
        "action; from=<s@example.net> to=<x@bar.org> proto=ESMTP helo=<c.example>"
    ) in s.log.lines


async def test_end_of_message_quarantine_is_hold(tmp_path: Path):
    backend = RecordingBackend()
    verdict = Verdict("quarantine", reason="virus found")
    s = await session(tmp_path, FakeMilters({"message": Outcome(verdict)}), backend)
    assert await transaction(s) == ["250 2.0.0 Ok: queued as R1"]
    final = backend.transactions[-1]
    assert final.message is not None and final.message.startswith(b"X-Smtpgate-Hold: ")
    assert (
        "QID: milter-hold: END-OF-MESSAGE from unknown[192.0.2.1]: virus found; "
        "from=<s@example.net> to=<x@bar.org> proto=ESMTP helo=<c.example>"
    ) in s.log.lines
    backend = RecordingBackend(holds_elsewhere=True)
    s = await session(tmp_path, FakeMilters({"message": Outcome(verdict)}), backend)
    assert await transaction(s) == ["250 2.0.0 Ok: queued as R1"]
    assert backend.transactions[-1].hold is True


async def test_discard_at_mail_skips_the_later_events(tmp_path: Path):
    backend = RecordingBackend()
    milters = FakeMilters({"mail": Verdict("discard")})
    s = await session(tmp_path, milters, backend)
    assert await transaction(s) == ["250 2.0.0 Ok: queued as QID"]
    assert backend.transactions == []
    assert "rcpt" not in milters.stages() and "message" not in milters.stages()
    assert sum(" milter-discard: MAIL from " in line for line in s.log.lines) == 1


async def test_unknown_command_only_a_4xx_replaces_postfixs_reply(tmp_path: Path):
    s = await session(tmp_path, FakeMilters({"unknown": TEMPFAIL}), RecordingBackend())
    assert await s.send("FOO bar") == ["451 4.7.1 Service unavailable - try again later"]
    s = await session(tmp_path, FakeMilters({"unknown": REJECT}), RecordingBackend())
    assert await s.send("FOO bar") == ["500 5.5.2 Error: command not recognized"]


async def test_a_421_at_any_stage_hangs_up(tmp_path: Path):
    # smtpd_chat_reply() disconnects after every 421 it sends, whichever command got it
    s = await session(tmp_path, FakeMilters({"unknown": SHUTDOWN}), RecordingBackend())
    assert await s.send("FOO bar") == ["421 4.7.0 Server closing connection"]
    assert s.machine.closing
    s = await session(tmp_path, FakeMilters({"other": SHUTDOWN}), RecordingBackend())
    await s.send("EHLO c.example")
    assert await s.send("VRFY x@bar.org") == ["421 4.7.0 Server closing connection"]
    assert s.machine.closing
    assert await s.send("NOOP") == []


async def test_macros_as_postfix_gives_them(tmp_path: Path):
    milters = FakeMilters()
    s = await session(tmp_path, milters, RecordingBackend())
    await transaction(s)
    connect = milters.macros_seen["connect"]
    assert connect["j"] == "mx.example.org"
    assert connect["_"] == "unknown [192.0.2.1]"
    assert connect["{client_addr}"] == "192.0.2.1" and connect["{client_port}"] == "4711"
    assert connect["{daemon_addr}"] == "192.0.2.25" and connect["{daemon_port}"] == "25"
    assert "i" not in connect and "{mail_addr}" not in connect and "{tls_version}" not in connect
    assert milters.macros_seen["mail"]["{mail_addr}"] == "s@example.net"
    assert milters.macros_seen["message"]["i"] == "QID"
    await s.machine.close()
    assert milters.stages()[-1] == "close"


async def test_vrfy_and_etrn_get_the_standing_refusal(tmp_path: Path):
    s = await session(tmp_path, FakeMilters({"other": TEMPFAIL}), RecordingBackend())
    await s.send("EHLO c.example")
    assert await s.send("VRFY x@bar.org") == ["451 4.7.1 Service unavailable - try again later"]
    assert await s.send("ETRN bar.org") == ["451 4.7.1 Service unavailable - try again later"]


async def test_a_rejected_recipient_is_told_to_the_milters(tmp_path: Path):
    milters = FakeMilters()
    s = await session(tmp_path, milters, RecordingBackend())
    await s.send("EHLO c.example")
    await s.send("MAIL FROM:<s@example.net>")
    refusal = "454 4.7.1 <x@elsewhere.example>: Relay access denied"
    assert await s.send("RCPT TO:<x@elsewhere.example>") == [refusal]
    [(_, (rcpt, text))] = [c for c in milters.calls if c[0] == "rcpt-rejected"]
    assert rcpt == "x@elsewhere.example" and text == refusal
