"""Golden transcripts: the engine against recorded Postfix 3.7 sessions.

``tests/differential/postfix_reference.json`` holds what a real Postfix 3.7.11 answered
(``make_reference.py`` records it; ``tests/differential/test_vs_postfix.py`` re-checks it
live).  This test replays every recorded session through ``run_dialogue`` — no Postfix
and no root needed — and asserts the same greeting, replies, disconnects and action
log lines (``NOQUEUE: reject: ...``, ``warn``, ``hold``...).

Where smtpgate deliberately differs, the case is listed in ``DELIBERATE`` with the
reason, and the test asserts the different behaviour instead.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from smtpgate.config import parse_settings
from smtpgate.config.service import ServiceConfig
from smtpgate.policy.model import ClientInfo
from smtpgate.policy.plan import build_plan
from smtpgate.smtp.explain import GREETING, Exchange, run_dialogue

REFERENCE = Path(__file__).parents[1] / "differential" / "postfix_reference.json"
CONFIGS: list[dict[str, Any]] = json.loads(REFERENCE.read_text())

# config name -> why smtpgate answers differently (asserted below).
DELIBERATE = {
    "unknown-restriction": (
        "Postfix starts and answers 451 4.3.5 at every RCPT; smtpgate refuses to load a "
        "config with an unknown restriction name (validate once, at load)"
    ),
}

ACTION = re.compile(
    r"^(NOQUEUE|QUEUEID|[0-9A-F]{6,}): "
    r"(reject|reject_warning|warn|info|hold|discard|filter|redirect|bcc): "
)


def _sessions() -> list[Any]:
    params = []
    for config in CONFIGS:
        if config["error"] or config["config"] in DELIBERATE:
            continue
        for case in config["cases"]:
            params.append(pytest.param(config, case, id=f"{config['config']}/{case['name']}"))
    return params


def _plan(config: dict[str, Any], tmp_path: Path) -> Any:
    for name, text in config["tables"].items():
        (tmp_path / name).write_text(text)
    text = config["main_cf"].replace("@DIR@", str(tmp_path))
    settings, _ = parse_settings(text, str(tmp_path / "main.cf"), hostname="mx.example.org")
    plan, diagnostics = build_plan(settings, strict_tables=False)
    service = ServiceConfig.from_settings(settings) if plan is not None else None
    return plan, service, diagnostics


def _action_logs(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if ACTION.match(line):
            out.append(re.sub(r"^([0-9A-F]{6,}|QUEUEID):", "NOQUEUE:", line))
    return out


@pytest.mark.parametrize(("config", "case"), _sessions())
def test_session_matches_postfix(config: dict[str, Any], case: dict[str, Any], tmp_path: Path):
    plan, service, diagnostics = _plan(config, tmp_path)
    assert plan is not None, [str(d) for d in diagnostics]
    if case["mail_from"] is None:
        pytest.fail("the reference has a session without MAIL; explain always sends MAIL")

    def dialogue(trace: bool) -> list[Exchange]:
        return asyncio.run(
            run_dialogue(
                plan,
                ClientInfo(address=case["client"]),
                config=service,
                helo=case["helo"],
                sender=case["mail_from"],
                recipients=case["rcpts"],
                esmtp=case["ehlo"],
                trace=trace,
            )
        )

    exchanges = dialogue(trace=True)
    greeting = exchanges[0]
    assert greeting.command == GREETING
    assert greeting.reply.lines() == case["greeting"]
    assert greeting.reply.disconnect == case["greeting_closed"]
    expected = [
        (e["command"], e["reply"], e["closed"]) for e in case["exchanges"] if e["command"] != "QUIT"
    ]
    ours = [(e.command, e.reply.lines(), e.reply.disconnect) for e in exchanges[1:]]
    if case["ehlo"]:
        # EHLO's capability list belongs to the SMTP layer; compare the first line only.
        expected = [(c, r[:1] if c.startswith("EHLO") else r, d) for c, r, d in expected]
        ours = [
            (c, [r[0].replace("250 ", "250-")] if c.startswith("EHLO") else r, d)
            for c, r, d in ours
        ]
    assert ours == expected
    ours_logs = [line for e in exchanges for line in e.log_lines]
    assert _action_logs(ours_logs) == _action_logs(case["log"])

    # serve runs the same checks without the trail: the same replies and log lines.
    untraced = dialogue(trace=False)
    assert [(e.command, e.reply, e.log_lines) for e in untraced] == [
        (e.command, e.reply, e.log_lines) for e in exchanges
    ]
    assert not any(e.decision.steps for e in untraced if e.decision is not None)


@pytest.mark.parametrize("name", sorted(DELIBERATE))
def test_deliberate_differences(name: str, tmp_path: Path):
    config = next(c for c in CONFIGS if c["config"] == name)
    plan, service, diagnostics = _plan(config, tmp_path)
    assert plan is None
    assert any("unknown restriction" in str(d) for d in diagnostics)


def test_configs_postfix_refuses_are_refused(tmp_path: Path):
    refused = [c for c in CONFIGS if c["error"]]
    assert refused, "the reference should hold at least one config Postfix refuses"
    for config in refused:
        sub = tmp_path / config["config"]
        sub.mkdir()
        plan, _, diagnostics = _plan(config, sub)
        assert plan is None, config["config"]
        assert any(d.severity == "error" for d in diagnostics)
