"""reject_unverified_recipient in the core, against FakeVerifier: Postfix 3.7's replies
and log lines for each status, the parameters, the cache, and the lock-step shortcut
(which RCPTs may be their own probe).

The adapter (cache rules, probes on real sockets) is tested in ``tests/verify/``.
"""

from __future__ import annotations

import pytest

from smtpgate.policy.model import ClientInfo
from smtpgate.policy.plan import Plan
from smtpgate.policy.ports import FakeVerifier, VerifyStatus
from smtpgate.policy.session import PolicySession
from smtpgate.policy.verification import LOCKSTEP_PROBE, backend_status
from smtpgate.reply import Reply
from tests.policy.conftest import BASE_LINES, Build, MakePlan

CLIENT = ClientInfo("192.0.2.1", "mail.client.test", "mail.client.test", 40000, "ok", "ok")
NAMADDR = "mail.client.test[192.0.2.1]"
RCPT_LIST = (
    "smtpd_recipient_restrictions = reject_unauth_destination, reject_unverified_recipient\n"
)
SAID = (
    "host backend.test[127.0.0.1] said: 550 5.1.1 <nobody@example.org>: Recipient address "
    "rejected: User unknown in virtual mailbox table (in reply to RCPT TO command)"
)
BACKEND = {
    "nobody@example.org": (VerifyStatus.BOUNCE, SAID),
    "later@example.org": (VerifyStatus.DEFER, "host backend.test[127.0.0.1] said: 450 4.2.0 busy"),
    "down@example.org": None,
}
TAIL = "; from=<a@sender.test> to=<{}> proto=ESMTP helo=<helo.client.test>"


def session(plan: Plan) -> tuple[PolicySession, FakeVerifier]:
    fake = FakeVerifier(BACKEND)
    return PolicySession(plan.with_verifier(fake), CLIENT), fake


async def start(s: PolicySession) -> None:
    await s.helo("helo.client.test", esmtp=True)
    await s.mail("a@sender.test")


def infos(decision: object) -> list[str]:
    return [r.text for r in decision.logs if r.level == "info"]  # type: ignore[attr-defined]


# -- the replies ----------------------------------------------------------------------


async def test_an_undeliverable_recipient_is_deferred_with_postfix_defaults(
    make_plan: MakePlan,
) -> None:
    # unverified_recipient_reject_code = 450: a 4xx code is a defer_if_permit with the
    # "unverified address" text (smtpd_check.c DEFER_IF_PERMIT3), given at the end.
    s, fake = session(make_plan(RCPT_LIST))
    await start(s)
    decision = await s.rcpt("nobody@example.org")
    text = f"<nobody@example.org>: Recipient address rejected: unverified address: {SAID}"
    assert str(decision.reply) == f"450 4.1.1 {text}"
    assert infos(decision) == [
        f"NOQUEUE: reject: RCPT from {NAMADDR}: 450 4.1.1 {text}"
        + TAIL.format("nobody@example.org")
    ]
    assert fake.probes == ["nobody@example.org"]


async def test_a_5xx_reject_code_rejects_as_undeliverable(make_plan: MakePlan) -> None:
    s, _ = session(make_plan("unverified_recipient_reject_code = 550\n" + RCPT_LIST))
    await start(s)
    decision = await s.rcpt("nobody@example.org")
    assert str(decision.reply) == (
        f"550 5.1.1 <nobody@example.org>: Recipient address rejected: undeliverable address: {SAID}"
    )


async def test_a_deferred_recipient_uses_the_defer_code(make_plan: MakePlan) -> None:
    s, _ = session(
        make_plan(
            "unverified_recipient_defer_code = 451\nunverified_recipient_reject_code = 550\n"
            + RCPT_LIST
        )
    )
    await start(s)
    decision = await s.rcpt("later@example.org")
    assert str(decision.reply) == (
        "451 4.1.1 <later@example.org>: Recipient address rejected: unverified address: "
        "host backend.test[127.0.0.1] said: 450 4.2.0 busy"
    )


async def test_a_deliverable_recipient_passes(make_plan: MakePlan) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await start(s)
    decision = await s.rcpt("alice@example.org")
    assert decision.reply is None
    assert fake.probes == ["alice@example.org"]


async def test_the_reject_reason_replaces_the_backends(make_plan: MakePlan) -> None:
    s, _ = session(
        make_plan(
            "unverified_recipient_reject_code = 550\n"
            "unverified_recipient_reject_reason = Address lookup failed\n" + RCPT_LIST
        )
    )
    await start(s)
    decision = await s.rcpt("nobody@example.org")
    assert str(decision.reply) == (
        "550 5.1.1 <nobody@example.org>: Recipient address rejected: undeliverable address: "
        "Address lookup failed"
    )


async def test_no_answer_is_an_address_verification_problem(make_plan: MakePlan) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await start(s)
    decision = await s.rcpt("down@example.org")
    text = "<down@example.org>: Recipient address rejected: address verification problem"
    assert str(decision.reply) == f"450 4.1.1 {text}"
    assert [(r.level, r.text) for r in decision.logs] == [
        ("warning", "verify service failure"),
        (
            "info",
            f"NOQUEUE: reject: RCPT from {NAMADDR}: 450 4.1.1 {text}"
            + TAIL.format("down@example.org"),
        ),
    ]
    assert "down@example.org" not in fake.cache  # nothing remembered: asked again next time
    await s.rcpt("down@example.org")
    assert fake.probes == ["down@example.org", "down@example.org"]


@pytest.mark.parametrize(
    ("action", "after", "reply"),
    [
        # defer_if_permit: a later reject wins over the deferral; "defer" answers at once.
        (
            "defer_if_permit",
            "reject",
            "554 5.7.1 <nobody@example.org>: Recipient address rejected: Access denied",
        ),
        (
            "defer",
            "reject",
            f"450 4.1.1 <nobody@example.org>: Recipient address rejected: "
            f"unverified address: {SAID}",
        ),
        (
            "defer_if_permit",
            "permit",
            f"450 4.1.1 <nobody@example.org>: Recipient address "
            f"rejected: unverified address: {SAID}",
        ),
    ],
)
async def test_the_tempfail_action(
    make_plan: MakePlan, action: str, after: str, reply: str
) -> None:
    s, _ = session(
        make_plan(
            f"unverified_recipient_tempfail_action = {action}\n"
            f"smtpd_recipient_restrictions = reject_unverified_recipient, {after}\n"
        )
    )
    await start(s)
    decision = await s.rcpt("nobody@example.org")
    assert str(decision.reply) == reply


async def test_the_cache_answers_the_next_attempts(make_plan: MakePlan) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await start(s)
    replies = {str((await s.rcpt("nobody@example.org")).reply) for _ in range(11)}
    assert len(replies) == 1 and replies.pop().startswith("450 4.1.1 <nobody@example.org>")
    assert fake.probes == ["nobody@example.org"]


async def test_a_null_sender_and_postmaster_are_verified_or_not_as_in_postfix(
    make_plan: MakePlan,
) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await s.helo("helo.client.test", esmtp=True)
    await s.mail("")
    assert (await s.rcpt("nobody@example.org")).reply is not None  # bounces are verified too
    assert (await s.rcpt("postmaster")).reply is None  # postmaster is always accepted
    assert fake.probes == ["nobody@example.org"]


async def test_without_a_verifier_every_query_is_a_verification_problem(
    make_plan: MakePlan,
) -> None:
    s = PolicySession(make_plan(RCPT_LIST), CLIENT)
    await start(s)
    decision = await s.rcpt("alice@example.org")
    assert str(decision.reply).endswith("Recipient address rejected: address verification problem")


# -- the lock-step shortcut -----------------------------------------------------------


def marks(plan: Plan) -> dict[str, list[object]]:
    return {
        parameter: [item.arg for item in items if item.name == "reject_unverified_recipient"]
        for parameter, items in plan.lists.items()
        if any(item.name == "reject_unverified_recipient" for item in items)
    }


@pytest.mark.parametrize(
    ("text", "marked"),
    [
        (RCPT_LIST, {"smtpd_recipient_restrictions": [LOCKSTEP_PROBE]}),
        (
            "smtpd_recipient_restrictions = reject_unverified_recipient, permit_mynetworks, "
            "permit\n",
            {"smtpd_recipient_restrictions": [LOCKSTEP_PROBE]},
        ),
        # postgrey after it could still refuse a recipient the backend accepted.
        (
            "smtpd_recipient_restrictions = reject_unverified_recipient, "
            "check_policy_service inet:127.0.0.1:10023\n",
            {"smtpd_recipient_restrictions": [None]},
        ),
        # The relay list runs first; the recipient list after it can refuse.
        (
            "smtpd_relay_restrictions = reject_unauth_destination, reject_unverified_recipient\n"
            "smtpd_recipient_restrictions = reject_rbl_client zen.example\n",
            {"smtpd_relay_restrictions": [None]},
        ),
        (
            "smtpd_relay_restrictions = reject_unauth_destination, reject_unverified_recipient\n"
            "smtpd_recipient_restrictions = permit_mynetworks\n",
            {"smtpd_relay_restrictions": [LOCKSTEP_PROBE]},
        ),
        # The recipient table check after the lists could refuse.
        (
            "relay_recipient_maps = inline:{ a@example.org=x }\n" + RCPT_LIST,
            {"smtpd_recipient_restrictions": [None]},
        ),
    ],
)
def test_the_plan_marks_where_the_relayed_rcpt_may_be_the_probe(
    make_plan: MakePlan, text: str, marked: dict[str, list[object]]
) -> None:
    assert marks(make_plan(text)) == marked


async def test_a_marked_restriction_leaves_an_unknown_address_to_the_relayed_rcpt(
    make_plan: MakePlan,
) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await start(s)
    decision = await s.rcpt("nobody@example.org", relay_verifies=True)
    assert decision.reply is None and s.verify_pending == "nobody@example.org"
    assert fake.probes == []
    backend = Reply(550, "5.1.1", "<nobody@example.org>: Recipient address rejected: User unknown")
    verdict = await s.verified("nobody@example.org", backend, "backend.test[127.0.0.1]:25")
    said = (
        "host backend.test[127.0.0.1] said: 550 5.1.1 <nobody@example.org>: Recipient address "
        "rejected: User unknown (in reply to RCPT TO command)"
    )
    text = f"<nobody@example.org>: Recipient address rejected: unverified address: {said}"
    assert str(verdict.reply) == f"450 4.1.1 {text}"
    assert infos(verdict) == [
        f"NOQUEUE: reject: RCPT from {NAMADDR}: 450 4.1.1 {text}"
        + TAIL.format("nobody@example.org")
    ]
    assert fake.recorded == [("nobody@example.org", VerifyStatus.BOUNCE, said)]
    # The next attempt is answered from the cache, before any RCPT is relayed.
    again = await s.rcpt("nobody@example.org", relay_verifies=True)
    assert str(again.reply) == f"450 4.1.1 {text}" and s.verify_pending is None
    assert fake.probes == []


async def test_a_relayed_success_is_remembered(make_plan: MakePlan) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await start(s)
    await s.rcpt("alice@example.org", relay_verifies=True)
    verdict = await s.verified("alice@example.org", Reply(250, "2.1.5", "Ok"), "b[127.0.0.1]:25")
    assert verdict.reply is None
    assert fake.cache["alice@example.org"][0] is VerifyStatus.OK


async def test_a_refusal_that_is_not_about_the_recipient_stays_the_backends(
    make_plan: MakePlan,
) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await start(s)
    await s.rcpt("alice@example.org", relay_verifies=True)
    for reply in (
        Reply(554, "5.7.1", "<a@sender.test>: Sender address rejected: Access denied"),
        Reply(451, "4.3.0", "Error: queue file write error"),
        Reply(553, "5.1.8", "<a@sender.test>: Sender address rejected: Domain not found"),
        Reply(550, "5.1.0", "<a@sender.test>: Sender address rejected: whatever"),
        Reply(550, "", "no"),
    ):
        verdict = await s.verified("alice@example.org", reply, "b[127.0.0.1]:25")
        assert verdict.reply is None and verdict.logs == []
    assert fake.recorded == [] and fake.cache == {}


async def test_an_rcpt_not_relayed_after_all_is_probed(make_plan: MakePlan) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await start(s)
    await s.rcpt("nobody@example.org", relay_verifies=True)
    verdict = await s.verified("nobody@example.org", None)
    assert str(verdict.reply).startswith("450 4.1.1 <nobody@example.org>")
    assert fake.probes == ["nobody@example.org"]


@pytest.mark.parametrize(
    "text",
    [
        # A deferral armed before: Postfix would still verify (and may reject).
        "smtpd_recipient_restrictions = defer_if_permit, reject_unverified_recipient\n",
        "smtpd_recipient_restrictions = warn_if_reject, reject_unverified_recipient\n",
        # Inside a class: not the plan's top-level item.
        "smtpd_restriction_classes = verify\nverify = reject_unverified_recipient\n"
        "smtpd_recipient_restrictions = verify\n",
    ],
)
async def test_a_separate_probe_where_something_could_still_refuse(
    make_plan: MakePlan, text: str
) -> None:
    s, fake = session(make_plan(text))
    await start(s)
    await s.rcpt("alice@example.org", relay_verifies=True)
    assert s.verify_pending is None and fake.probes == ["alice@example.org"]


async def test_vrfy_probes_separately(make_plan: MakePlan) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await s.helo("helo.client.test", esmtp=True)
    decision = await s.vrfy("nobody@example.org")
    assert decision.reply is not None and fake.probes == ["nobody@example.org"]


def test_backend_status_forms() -> None:
    ok = backend_status(Reply(250, "2.1.5", "Ok"), "b.test[127.0.0.1]:2525")
    assert ok == (
        VerifyStatus.OK,
        "host b.test[127.0.0.1] said: 250 2.1.5 Ok (in reply to RCPT TO command)",
    )
    multi = backend_status(Reply(550, "5.1.1", "first\nsecond"), "b.test[::1]:25")
    assert multi == (
        VerifyStatus.BOUNCE,
        "host b.test[::1] said: 550-5.1.1 first 550 5.1.1 second (in reply to RCPT TO command)",
    )
    assert backend_status(Reply(452, "4.1.1", "later"), "x[1.2.3.4]:25")[0] is VerifyStatus.DEFER  # type: ignore[index]


# -- the parameters -------------------------------------------------------------------


def test_bad_values_name_file_and_line(build: Build) -> None:
    plan, diagnostics = build(
        "address_verify_positive_expire_time = 0\n"
        "address_verify_sender = @example.org\n"
        "address_verify_map = verify_cache\n"
        "unverified_recipient_reject_code = 250\n"
        "unverified_recipient_tempfail_action = dunno\n"
        "address_verify_negative_refresh_time = 3x\n" + RCPT_LIST
    )
    assert plan is None
    found = sorted((d.location.line if d.location else 0, d.message) for d in diagnostics)
    lines = [line - BASE_LINES for line, _ in found]
    assert lines == [1, 2, 3, 4, 5, 6], found


def test_defaults_are_postfixs(make_plan: MakePlan) -> None:
    plan = make_plan(RCPT_LIST)
    v = plan.verify
    assert (v.positive_expire, v.positive_refresh) == (31 * 86400, 7 * 86400)
    assert (v.negative_expire, v.negative_refresh) == (3 * 86400, 3 * 3600)
    assert v.negative_cache and v.tempfail_action == "defer_if_permit" and v.sender_ttl == 0
    assert v.sender == "double-bounce@mx.example.org"  # $double_bounce_sender@$myorigin
    assert (
        plan.codes.unverified_recipient_reject_code,
        plan.codes.unverified_recipient_defer_code,
    ) == (450, 450)
    assert plan.verifies_recipients


@pytest.mark.parametrize(
    ("line", "sender"),
    [
        ("address_verify_sender = <>", ""),
        ("address_verify_sender =", ""),
        ("address_verify_sender = probe@example.net", "probe@example.net"),
        ("double_bounce_sender = bounce-me", "bounce-me@mx.example.org"),
        ("myorigin = example.org", "double-bounce@example.org"),
    ],
)
def test_the_probe_sender(make_plan: MakePlan, line: str, sender: str) -> None:
    assert make_plan(line + "\n" + RCPT_LIST).verify.sender == sender


def test_sender_verification_stays_refused_with_the_reason(build: Build) -> None:
    plan, diagnostics = build("smtpd_sender_restrictions = reject_unverified_sender\n")
    assert plan is None
    assert any("probe the sender's own MX on the internet" in d.message for d in diagnostics)


async def test_a_lockstep_refusal_counts_as_the_restrictions_hit(make_plan: MakePlan) -> None:
    hits: list[tuple[str, str, str]] = []
    fake = FakeVerifier(BACKEND)
    s = PolicySession(
        make_plan("unverified_recipient_reject_code = 550\n" + RCPT_LIST).with_verifier(fake),
        CLIENT,
        hits=lambda *hit: hits.append(hit),
    )
    await start(s)
    await s.rcpt("nobody@example.org", relay_verifies=True)
    backend = Reply(550, "5.1.1", "<nobody@example.org>: User unknown")
    await s.verified("nobody@example.org", backend, "b[127.0.0.1]:25")
    await s.rcpt("nobody@example.org", relay_verifies=True)  # from the cache
    assert hits == [("RCPT", "reject_unverified_recipient", "reject")] * 2
