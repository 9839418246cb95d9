"""PolicySession's hits (smtpgate_restriction_hits_total): which restriction ended each
list, at which stage, with what result; the trail (trace) plays no part in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgate.policy.model import ClientInfo
from smtpgate.policy.plan import Plan
from smtpgate.policy.session import PolicySession
from tests.policy.conftest import MakePlan

Hit = tuple[str, str, str]


async def hits_of(plan: Plan, client: str, *rcpts: str, trace: bool = False) -> list[Hit]:
    hits: list[Hit] = []

    def hit(stage: str, restriction: str, result: str) -> None:
        hits.append((stage, restriction, result))

    session = PolicySession(plan, ClientInfo(client), trace=trace, hits=hit)
    await session.helo("client.example.org", esmtp=True)
    await session.mail("a@sender.example")
    for rcpt in rcpts:
        await session.rcpt(rcpt)
    return hits


@pytest.mark.parametrize("trace", [False, True])
async def test_the_innermost_restriction_that_answered(
    make_plan: MakePlan, tmp_path: Path, trace: bool
) -> None:
    plan = make_plan(
        "smtpd_restriction_classes = strict\n"
        "strict = check_sender_access hash:@DIR@/senders, permit\n"
        "smtpd_recipient_restrictions = check_recipient_access hash:@DIR@/rcpts,"
        " reject_unauth_destination\n",
        {"senders": "sender.example REJECT go away\n", "rcpts": "u@example.org strict\n"},
    )
    hits = await hits_of(plan, "192.0.2.1", "u@example.org", "v@example.org", "w@else.org")
    assert hits == [
        # the class a table value named, then the table inside it
        ("RCPT", f"check_sender_access hash:{tmp_path}/senders", "reject"),
        # v@example.org: every list ends without a decision (DUNNO): no hit
        ("RCPT", "defer_unauth_destination", "defer"),  # smtpd_relay_restrictions' default
    ]


async def test_each_list_that_decides_is_a_hit(make_plan: MakePlan) -> None:
    plan = make_plan(
        "smtpd_client_restrictions = permit_mynetworks, reject\n"
        "smtpd_recipient_restrictions = permit_mynetworks, reject\n"
    )
    hits = await hits_of(plan, "127.0.0.1", "u@example.org")
    # smtpd_delay_reject: the client list runs at RCPT, then the relay and recipient lists
    assert hits == [("RCPT", "permit_mynetworks", "permit")] * 3
    assert await hits_of(plan, "192.0.2.1", "u@example.org") == [("RCPT", "reject", "reject")]


async def test_a_table_that_fails_is_an_error_hit(make_plan: MakePlan, tmp_path: Path) -> None:
    plan = make_plan(
        "smtpd_recipient_restrictions = check_recipient_access hash:@DIR@/missing\n",
        strict=False,
    )
    hits = await hits_of(plan, "192.0.2.1", "u@example.org")
    assert hits == [("RCPT", f"check_recipient_access hash:{tmp_path}/missing", "error")]
