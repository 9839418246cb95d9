"""``explain``: a whole SMTP dialogue through the same machine ``serve`` runs, no socket.

The dialogue is what a client would send: HELO (or EHLO), MAIL FROM, one RCPT TO per
recipient, optionally DATA -- or a script of raw writes (a write may hold a pipelined
group).  Each write goes into an :class:`~smtpgate.smtp.machine.SmtpMachine` built as
``serve`` builds one, with :class:`~smtpgate.smtp.ports.AcceptingBackend` in place of
the relay (explain asks what *smtpgate* decides; the backend is taken to accept, and to
verify every recipient of reject_unverified_recipient) and the
server's counters of one process.  So the replies and the log lines are serve's by
construction; what explain adds is the trail of every restriction step.
:func:`render_text` and :func:`render_json` print it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from smtpgate.policy.model import ClientInfo, Decision, Step
from smtpgate.policy.plan import Plan
from smtpgate.policy.ports import FakeVerifier, Resolver
from smtpgate.reply import Reply
from smtpgate.smtp.machine import SmtpMachine
from smtpgate.smtp.ports import AcceptingBackend, LocalCounters, Milters

GREETING = "(connect)"


@dataclass(slots=True)
class Exchange:
    """One command, the reply it gets, and how the engine got there."""

    command: str
    reply: Reply
    decisions: list[Decision] = field(default_factory=list)
    maillog: list[tuple[str, str]] = field(default_factory=list)
    """Every line serve logs meanwhile: (level, text)."""

    @property
    def decision(self) -> Decision | None:
        """The restrictions' decision (the last, when a command ran several stages)."""
        return self.decisions[-1] if self.decisions else None

    @property
    def steps(self) -> list[Step]:
        return [step for d in self.decisions for step in d.steps]

    @property
    def log_lines(self) -> list[str]:
        """The restrictions' action lines (``NOQUEUE: reject: ...``)."""
        return [r.text for d in self.decisions for r in d.logs if r.level == "info"]

    @property
    def warnings(self) -> list[str]:
        return [text for level, text in self.maillog if level == "warning"]


_NO_REPLY = Reply(0, "", "(no reply)")


class _Recorder:
    """The machine's observer and log: cuts the dialogue into exchanges."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = [Exchange(GREETING, _NO_REPLY)]
        self._replied = False

    @property
    def current(self) -> Exchange:
        return self.exchanges[-1]

    def command(self, line: str) -> None:
        self.exchanges.append(Exchange(line, _NO_REPLY))
        self._replied = False

    def decision(self, decision: Decision) -> None:
        self.current.decisions.append(decision)

    def reply(self, reply: Reply) -> None:
        if self._replied:  # a second reply to one command (DATA's 354, then the end)
            self.exchanges.append(Exchange("(message content)", reply))
        else:
            self.current.reply = reply
        self._replied = True

    def info(self, text: str) -> None:
        self.current.maillog.append(("info", text))

    def warning(self, text: str) -> None:
        self.current.maillog.append(("warning", text))


def dialogue_writes(
    *, helo: str | None, sender: str, recipients: Sequence[str], esmtp: bool, data: bool
) -> list[bytes]:
    """The writes of the usual dialogue, one command each."""
    lines: list[str] = []
    if helo is not None:
        lines.append(f"{'EHLO' if esmtp else 'HELO'} {helo}")
    lines.append(f"MAIL FROM:<{sender}>")
    lines.extend(f"RCPT TO:<{rcpt}>" for rcpt in recipients)
    if data:
        lines.append("DATA")
    return [line.encode("utf-8") + b"\r\n" for line in lines]


def script_writes(text: str) -> list[bytes]:
    """The writes of a typed dialogue (``explain --script``): one command per line, each
    sent alone and answered before the next, as an admin types them in telnet; after
    ``DATA`` the lines up to a line ``.`` are the message, sent as one write."""
    writes: list[bytes] = []
    content: list[str] | None = None
    for line in text.splitlines():
        if content is not None:
            content.append(line)
            if line == ".":
                writes.append("\r\n".join(content).encode("utf-8") + b"\r\n")
                content = None
            continue
        writes.append(line.encode("utf-8") + b"\r\n")
        if line.strip().upper() == "DATA":
            content = []
    if content:
        writes.append("\r\n".join(content).encode("utf-8") + b"\r\n")
    return writes


async def run_dialogue(
    plan: Plan,
    client: ClientInfo,
    *,
    config: Any,
    helo: str | None = None,
    sender: str = "",
    recipients: Sequence[str] = (),
    esmtp: bool = False,
    data: bool = False,
    writes: Sequence[bytes] | None = None,
    resolver: Resolver | None = None,
    milters: Milters | None = None,
    lookup_client_name: bool = False,
    trace: bool = True,
) -> list[Exchange]:
    """The exchanges of one connection, stopping where the server would disconnect.

    ``writes`` replaces the usual dialogue with raw client writes (CRLF included).  With
    a ``resolver`` the DNS restrictions look things up (every lookup is a step of the
    trail); without one, every lookup is a temporary failure.  With
    ``lookup_client_name`` the client's name is found as ``serve`` finds it at connect
    (PTR, then A/AAAA), and those lookups open the trail; else ``client`` is taken as
    given.  With ``milters`` (the configured ones, as ``serve`` talks to them) their
    verdicts and edits are part of the dialogue; without, none is asked.
    ``trace=False`` leaves the trail out, as ``serve`` does.
    """
    if writes is None:
        writes = dialogue_writes(
            helo=helo, sender=sender, recipients=recipients, esmtp=esmtp, data=data
        )
    recorder = _Recorder()
    counter = itertools.count(1)
    if plan.verifies_recipients and plan.verifier is None:
        # The backend is taken to accept, its verification answers included.
        plan = plan.with_verifier(FakeVerifier())
    machine = SmtpMachine(
        plan=plan,
        config=config,
        backend=AcceptingBackend(),
        anvil=LocalCounters(),
        log=recorder,
        address=client.address,
        port=client.port,
        resolver=resolver,
        milters=milters,
        known_client=None if lookup_client_name else client,
        queue_ids=lambda: f"{next(counter):010X}",
        observer=recorder,
        trace=trace,
    )
    await machine.open()
    machine.greet()
    for write in writes:
        if machine.closing:
            break
        machine.receive(write)
        await machine.advance()
        while machine.may_continue:
            await machine.advance()
    await machine.close()
    return recorder.exchanges


def render_text(exchanges: Sequence[Exchange]) -> str:
    """The human trail: every step, every log line, every reply; the last reply last."""
    out: list[str] = []
    for ex in exchanges:
        if ex.command != GREETING:
            out.append(f">>> {ex.command}")
        for step in ex.steps:
            indent = "    " + "  " * step.depth
            detail = f" {step.detail}" if step.detail else ""
            out.append(f"{indent}[{step.stage}] {step.what}{detail} -> {step.result}")
        for line in ex.warnings:
            out.append(f"    log: warning: {line}")
        for line in ex.log_lines:
            out.append(f"    log: {line}")
        out.extend(f"<<< {line}" for line in ex.reply.lines())
        if ex.reply.disconnect:
            out.append("<<< (connection closed by server)")
    if exchanges:
        out.append("")
        out.append(str(exchanges[-1].reply))
    return "\n".join(out)


def render_json(exchanges: Sequence[Exchange]) -> str:
    """The trail for scripts (and the differential tests against Postfix)."""

    def one(ex: Exchange) -> dict[str, object]:
        return {
            "command": ex.command,
            "reply": ex.reply.lines(),
            "disconnect": ex.reply.disconnect,
            "log": ex.log_lines[0] if ex.log_lines else None,
            "logs": ex.log_lines,
            "warnings": ex.warnings,
            "maillog": [
                text if level == "info" else f"warning: {text}" for level, text in ex.maillog
            ],
            "steps": [s.as_dict() for s in ex.steps],
        }

    greeting = [one(ex) for ex in exchanges if ex.command == GREETING]
    doc = {
        "greeting": greeting[0] if greeting else None,
        "exchanges": [one(ex) for ex in exchanges if ex.command != GREETING],
        "reply": exchanges[-1].reply.lines() if exchanges else [],
    }
    return json.dumps(doc, indent=2)
