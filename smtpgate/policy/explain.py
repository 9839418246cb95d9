"""Run a whole SMTP dialogue through the engine without a socket, for ``explain``.

The commands are those a client would send: HELO (or EHLO), MAIL FROM and one RCPT TO
per recipient, optionally DATA.  Each gets the reply ``serve`` would give when the
backend accepts; a reply that disconnects ends the dialogue, as it ends the connection.
:func:`render_text` and :func:`render_json` print the trail.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from smtpgate.config.service import ServiceConfig
from smtpgate.policy.model import ClientInfo, Decision, LogRecord, Stage, Step
from smtpgate.policy.peer import lookup_client
from smtpgate.policy.plan import Plan
from smtpgate.policy.ports import Resolver
from smtpgate.policy.session import ACCEPT_REPLIES, PolicySession
from smtpgate.reply import Reply

GREETING = "(connect)"


@dataclass(slots=True)
class Exchange:
    """One command, the reply it gets, and how the engine got there."""

    command: str
    reply: Reply
    decision: Decision | None = None
    steps: list[object] = field(default_factory=list)

    @property
    def log_lines(self) -> list[str]:
        if self.decision is None:
            return []
        return [r.text for r in self.decision.logs if r.level == "info"]

    @property
    def warnings(self) -> list[str]:
        if self.decision is None:
            return []
        return [r.text for r in self.decision.logs if r.level == "warning"]


def _reply_for(plan: Plan, decision: Decision, stage: Stage) -> Reply:
    if decision.reply is not None:
        return decision.reply
    if stage is Stage.HELO:
        return Reply(250, "", plan.myhostname)
    return ACCEPT_REPLIES[stage]


async def run_dialogue(
    plan: Plan,
    client: ClientInfo,
    *,
    config: ServiceConfig,
    helo: str | None,
    sender: str,
    recipients: Sequence[str],
    esmtp: bool = False,
    data: bool = False,
    resolver: Resolver | None = None,
    lookup_client_name: bool = False,
    trace: bool = True,
) -> list[Exchange]:
    """The exchanges of one connection, stopping where the server would disconnect.

    With a ``resolver`` the DNS restrictions look things up (every lookup is a step of
    the trail); without one, every lookup is a temporary failure.  With
    ``lookup_client_name`` the client's name is found as ``serve`` finds it at connect
    (PTR, then A/AAAA), and those lookups open the trail.  ``trace=False`` leaves the
    trail out, as ``serve`` does (same replies and log lines, no steps).  ``config`` is
    the front end's configuration, from the same load as ``plan`` (the banner,
    smtpd_peername_lookup).
    """
    peer_steps: list[Step] = []
    peer_logs: list[LogRecord] = []
    if lookup_client_name:
        found = await lookup_client(
            resolver,
            client.address,
            client.port,
            peername_lookup=config.peername_lookup,
        )
        client, peer_steps, peer_logs = found.client, found.steps, found.logs
    session = PolicySession(plan, client, resolver, trace=trace)
    exchanges: list[Exchange] = []
    greeting = await session.connect()
    greeting.steps[:0] = peer_steps
    greeting.logs[:0] = peer_logs
    banner = Reply(220, "", config.banner or plan.myhostname)
    exchanges.append(Exchange(GREETING, greeting.reply or banner, greeting))
    if exchanges[0].reply.disconnect:
        return exchanges
    steps: list[tuple[str, Stage, object]] = []
    if helo is not None:
        steps.append((f"{'EHLO' if esmtp else 'HELO'} {helo}", Stage.HELO, helo))
    steps.append((f"MAIL FROM:<{sender}>", Stage.MAIL, sender))
    steps.extend((f"RCPT TO:<{rcpt}>", Stage.RCPT, rcpt) for rcpt in recipients)
    if data:
        steps.append(("DATA", Stage.DATA, None))
    for command, stage, arg in steps:
        decision = await _run(session, stage, arg, esmtp)
        reply = _reply_for(plan, decision, stage)
        exchanges.append(Exchange(command, reply, decision))
        if reply.disconnect:
            break
        if stage is Stage.DATA and reply.code != 354:
            break
        if stage is Stage.DATA and not session.state.rcpt_count:
            break
    return exchanges


async def _run(session: PolicySession, stage: Stage, arg: object, esmtp: bool) -> Decision:
    if stage is Stage.HELO:
        return await session.helo(str(arg), esmtp=esmtp)
    if stage is Stage.MAIL:
        return await session.mail(str(arg))
    if stage is Stage.RCPT:
        decision = await session.rcpt(str(arg))
        if decision.accepted:
            session.confirm_rcpt(str(arg))  # explain assumes the backend accepts
        return decision
    if session.state.rcpt_count == 0:
        return Decision(Stage.DATA, Reply(503, "5.5.1", "Error: need RCPT command"))
    return await session.data()


def render_text(exchanges: Sequence[Exchange]) -> str:
    """The human trail: every step, every log line, every reply; the last reply last."""
    out: list[str] = []
    for ex in exchanges:
        if ex.command != GREETING:
            out.append(f">>> {ex.command}")
        if ex.decision is not None:
            for step in ex.decision.steps:
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
            "steps": [s.as_dict() for s in ex.decision.steps] if ex.decision else [],
        }

    greeting = [one(ex) for ex in exchanges if ex.command == GREETING]
    doc = {
        "greeting": greeting[0] if greeting else None,
        "exchanges": [one(ex) for ex in exchanges if ex.command != GREETING],
        "reply": exchanges[-1].reply.lines() if exchanges else [],
    }
    return json.dumps(doc, indent=2)
