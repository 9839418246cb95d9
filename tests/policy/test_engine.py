"""The restriction engine, driven directly: one stage list through :class:`Checker`.

Each case is a client restriction list (and the value the test's access table answers for
the client address); it asserts the status, the reply and every log line. The session's
stage logic is in test_session.py; here nothing but ``Checker.run_list`` runs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smtpgate.policy.engine import MAX_RECURSION, Checker
from smtpgate.policy.model import CLIENT, DUNNO, OK, RECIPIENT, REJECT, ClientInfo, SessionState
from smtpgate.policy.model import Status as S
from smtpgate.policy.plan import compile_runtime_list
from smtpgate.reply import Reply
from tests.policy.conftest import MakePlan

NAME = "unknown[192.0.2.1]"
REJECTED = f"<{NAME}>: Client host rejected:"
ACCESS = "check_client_access texthash:@DIR@/t"


@dataclass
class Run:
    status: S
    state: SessionState
    checker: Checker

    @property
    def reply(self) -> str | None:
        return (
            None if self.state.error is None or self.status is not REJECT else str(self.state.error)
        )

    @property
    def logs(self) -> list[str]:
        return [f"{log.level}: {log.text}" for log in self.checker.logs]


def run_client_list(
    make_plan: MakePlan,
    text: str,
    value: str | None = None,
    *,
    sender: str | None = None,
    strict: bool = True,
) -> Run:
    """Run smtpd_client_restrictions = ``text``; the table @DIR@/t maps 192.0.2.1 to ``value``."""
    tables = {"t": f"192.0.2.1 {value}\n" if value is not None else "# empty\n"}
    plan = make_plan(text, tables, strict=strict)
    state = SessionState(client=ClientInfo("192.0.2.1"), sender=sender)
    checker = Checker(plan, state)
    items = plan.stage_list("smtpd_client_restrictions")
    status = asyncio.run(checker.run_list(items, NAME, CLIENT))
    return Run(status, state, checker)


def reject_log(reply: str, extra: str = "") -> str:
    return f"info: NOQUEUE: reject: CONNECT from {NAME}: {reply};{extra} proto=SMTP"


@dataclass
class Case:
    text: str
    value: str | None
    status: S
    reply: str | None
    logs: list[str] = field(default_factory=list)
    sender: str | None = None


def rejected(reply: str, *before: str, sender: str | None = None) -> list[str]:
    extra = f" from=<{sender}>" if sender is not None else ""
    return [*before, reject_log(reply, extra)]


DENIED = f"554 5.7.1 {REJECTED} Access denied"
LATER = f"450 4.3.2 {REJECTED} Try again later"
CASES = {
    # generic_checks: the first result that is not DUNNO ends the list
    "empty-list": Case("", None, DUNNO, None),
    "permit": Case("smtpd_client_restrictions = permit, reject", None, OK, None),
    "reject": Case(
        "smtpd_client_restrictions = reject, permit", None, REJECT, DENIED, rejected(DENIED)
    ),
    "dunno-goes-on": Case(
        f"smtpd_client_restrictions = permit_mynetworks, {ACCESS}, permit", None, OK, None
    ),
    "defer": Case(
        "smtpd_client_restrictions = defer",
        None,
        REJECT,
        LATER,
        rejected(LATER),
    ),
    # access(5) actions
    "action-dunno": Case(
        f"smtpd_client_restrictions = {ACCESS}, reject", "DUNNO", REJECT, DENIED, rejected(DENIED)
    ),
    "action-ok": Case(f"smtpd_client_restrictions = {ACCESS}, reject", "OK", OK, None),
    "action-relay": Case(f"smtpd_client_restrictions = {ACCESS}, reject", "RELAY", OK, None),
    "action-reject-text": Case(
        f"smtpd_client_restrictions = {ACCESS}",
        "REJECT go away",
        REJECT,
        f"554 5.7.1 {REJECTED} go away",
        rejected(f"554 5.7.1 {REJECTED} go away"),
    ),
    "action-reject-dsn-class-follows-code": Case(
        f"smtpd_client_restrictions = {ACCESS}",
        "REJECT 4.2.0 full",
        REJECT,
        f"554 5.2.0 {REJECTED} full",
        rejected(f"554 5.2.0 {REJECTED} full"),
    ),
    "action-defer": Case(
        f"smtpd_client_restrictions = {ACCESS}",
        "DEFER",
        REJECT,
        f"450 4.7.1 {REJECTED} Access denied",
        rejected(f"450 4.7.1 {REJECTED} Access denied"),
    ),
    "action-defer-dsn": Case(
        f"smtpd_client_restrictions = {ACCESS}",
        "DEFER 5.3.0 later",
        REJECT,
        f"450 4.3.0 {REJECTED} later",
        rejected(f"450 4.3.0 {REJECTED} later"),
    ),
    "action-code-521-disconnects": Case(
        f"smtpd_client_restrictions = {ACCESS}",
        "521 go away",
        REJECT,
        f"521 5.7.1 {REJECTED} go away",
        rejected(f"521 5.7.1 {REJECTED} go away"),
    ),
    "action-code-421-disconnects": Case(
        f"smtpd_client_restrictions = {ACCESS}",
        "421 busy",
        REJECT,
        f"421 4.7.1 {REJECTED} busy",
        rejected(f"421 4.7.1 {REJECTED} busy"),
    ),
    "action-code-dsn-fixed-for-client": Case(
        f"smtpd_client_restrictions = {ACCESS}",
        "550 5.1.1 bad",
        REJECT,
        f"550 5.0.0 {REJECTED} bad",
        rejected(f"550 5.0.0 {REJECTED} bad"),
    ),
    "action-warn": Case(
        f"smtpd_client_restrictions = {ACCESS}, permit",
        "WARN look",
        OK,
        None,
        [f"info: NOQUEUE: warn: CONNECT from {NAME}: look; proto=SMTP"],
    ),
    "action-info": Case(
        f"smtpd_client_restrictions = {ACCESS}, permit",
        "INFO note",
        OK,
        None,
        [f"info: NOQUEUE: info: CONNECT from {NAME}: note; proto=SMTP"],
    ),
    "reply-text-cut-at-510": Case(
        f"smtpd_client_restrictions = {ACCESS}",
        "REJECT " + "x" * 600,
        REJECT,
        f"554 5.7.1 {REJECTED} " + "x" * (510 - len(f"554 5.7.1 {REJECTED} ")),
        rejected(f"554 5.7.1 {REJECTED} " + "x" * (510 - len(f"554 5.7.1 {REJECTED} "))),
    ),
    "reply-text-unprintable": Case(
        f"smtpd_client_restrictions = {ACCESS}",
        "REJECT a\x01b",
        REJECT,
        f"554 5.7.1 {REJECTED} a b",
        rejected(f"554 5.7.1 {REJECTED} a b"),
    ),
    # restriction classes, and restriction names in a table value
    "class-runs-in-place": Case(
        "smtpd_restriction_classes = c\nc = reject\nsmtpd_client_restrictions = c, permit",
        None,
        REJECT,
        DENIED,
        rejected(DENIED),
    ),
    "ok-in-a-class-ends-the-stage": Case(
        "smtpd_restriction_classes = c\nc = permit\nsmtpd_client_restrictions = c, reject",
        None,
        OK,
        None,
    ),
    "dunno-in-a-class-goes-on": Case(
        "smtpd_restriction_classes = c\nc = permit_mynetworks\n"
        "smtpd_client_restrictions = c, reject",
        None,
        REJECT,
        DENIED,
        rejected(DENIED),
    ),
    "nested-classes": Case(
        "smtpd_restriction_classes = a, b\na = permit_mynetworks, b\n"
        "b = defer\nsmtpd_client_restrictions = a, permit",
        None,
        REJECT,
        LATER,
        rejected(LATER),
    ),
    "table-value-names-a-class": Case(
        "smtpd_restriction_classes = strict\nstrict = defer\n"
        f"smtpd_client_restrictions = {ACCESS}, permit",
        "strict",
        REJECT,
        LATER,
        rejected(LATER),
    ),
    "table-value-names-restrictions": Case(
        f"smtpd_client_restrictions = {ACCESS}, reject", "permit_mynetworks, permit", OK, None
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_run_list(make_plan: MakePlan, tmp_path: Path, case: Case):
    run = run_client_list(make_plan, case.text, case.value, sender=case.sender)
    assert run.status is case.status
    assert run.reply == case.reply
    assert run.logs == [line.replace("@DIR@", str(tmp_path)) for line in case.logs]


@pytest.mark.parametrize(
    ("value", "disconnect"), [("521 x", True), ("421 x", True), ("550 x", False), ("450 x", False)]
)
def test_421_and_521_disconnect(make_plan: MakePlan, value: str, disconnect: bool):
    run = run_client_list(make_plan, f"smtpd_client_restrictions = {ACCESS}", value)
    assert run.state.error is not None and run.state.error.disconnect is disconnect


# -- the reject path: soft_bounce, reply codes from settings ---------------------------


@pytest.mark.parametrize(
    ("settings", "reply"),
    [
        ("soft_bounce = yes", f"454 4.7.1 {REJECTED} Access denied"),
        ("reject_code = 550", f"550 5.7.1 {REJECTED} Access denied"),
        ("soft_bounce = yes\nreject_code = 500", f"400 4.7.1 {REJECTED} Access denied"),
        ("soft_bounce = yes\nreject_code = 550", f"450 4.7.1 {REJECTED} Access denied"),
        ("soft_bounce = yes\ndefer_code = 421", f"421 4.3.2 {REJECTED} Try again later"),
    ],
)
def test_reply_codes_from_settings(make_plan: MakePlan, settings: str, reply: str):
    restriction = "defer" if "defer_code" in settings else "reject"
    run = run_client_list(make_plan, f"{settings}\nsmtpd_client_restrictions = {restriction}")
    assert run.reply == reply


def test_access_map_codes_from_settings(make_plan: MakePlan):
    text = (
        "access_map_reject_code = 550\naccess_map_defer_code = 451\n"
        f"smtpd_client_restrictions = {ACCESS}"
    )
    assert run_client_list(make_plan, text, "REJECT").reply == f"550 5.7.1 {REJECTED} Access denied"
    assert run_client_list(make_plan, text, "DEFER").reply == f"451 4.7.1 {REJECTED} Access denied"


# -- warn_if_reject, defer_if_permit, defer_if_reject ----------------------------------

DEFERRAL = {
    "warn_if_reject-turns-the-next-reject-into-a-warning": (
        "warn_if_reject reject, permit_mynetworks",
        DUNNO,
        None,
        [f"info: NOQUEUE: reject_warning: CONNECT from {NAME}: {DENIED}; proto=SMTP"],
    ),
    "warn_if_reject-only-covers-the-next-restriction": (
        "warn_if_reject permit_mynetworks reject",
        REJECT,
        DENIED,
        [reject_log(DENIED)],
    ),
    "warn_if_reject-covers-a-whole-class": (
        "warn_if_reject c, reject",
        REJECT,
        DENIED,
        [
            f"info: NOQUEUE: reject_warning: CONNECT from {NAME}: "
            f"450 4.3.2 {REJECTED} Try again later; proto=SMTP",
            reject_log(DENIED),
        ],
    ),
    "defer_if_permit-arms-and-permit-still-permits-here": ("defer_if_permit permit", OK, None, []),
    "defer_if_permit-loses-to-reject": (
        "defer_if_permit reject",
        REJECT,
        DENIED,
        [reject_log(DENIED)],
    ),
    "defer_if_reject-turns-a-reject-into-450": (
        "defer_if_reject reject",
        REJECT,
        f"450 4.7.0 {REJECTED} defer_if_reject requested",
        [reject_log(f"450 4.7.0 {REJECTED} defer_if_reject requested")],
    ),
    "defer_if_reject-leaves-a-4xx-alone": (
        "defer_if_reject defer",
        REJECT,
        LATER,
        [reject_log(LATER)],
    ),
    "defer_if_reject-then-permit": ("defer_if_reject permit", OK, None, []),
    "defer_if_permit-under-warn_if_reject-is-a-warning": (
        "warn_if_reject defer_if_permit permit",
        OK,
        None,
        [
            f"info: NOQUEUE: reject_warning: CONNECT from {NAME}: "
            f"450 4.7.0 {REJECTED} defer_if_permit requested; proto=SMTP"
        ],
    ),
    "warn_if_reject-wins-over-defer_if_reject": (
        "defer_if_reject warn_if_reject reject",
        DUNNO,
        None,
        [f"info: NOQUEUE: reject_warning: CONNECT from {NAME}: {DENIED}; proto=SMTP"],
    ),
}


@pytest.mark.parametrize(
    ("restrictions", "status", "reply", "logs"), DEFERRAL.values(), ids=DEFERRAL.keys()
)
def test_deferrals_and_warnings(make_plan: MakePlan, restrictions, status, reply, logs):
    run = run_client_list(
        make_plan,
        f"smtpd_restriction_classes = c\nc = defer\nsmtpd_client_restrictions = {restrictions}",
    )
    assert (run.status, run.reply, run.logs) == (status, reply, logs)


def test_defer_if_permit_is_remembered_for_the_stage(make_plan: MakePlan):
    run = run_client_list(
        make_plan,
        f"smtpd_client_restrictions = {ACCESS}, permit",
        "DEFER_IF_PERMIT come back later",
    )
    saved = run.state.defer_if_permit
    assert run.status is OK and saved.active
    assert (saved.code, saved.dsn, saved.text) == (450, "4.7.1", f"{REJECTED} come back later")


def test_the_first_deferral_is_kept(make_plan: MakePlan):
    run = run_client_list(
        make_plan, f"smtpd_client_restrictions = {ACCESS}, defer_if_permit", "DEFER_IF_PERMIT first"
    )
    assert run.state.defer_if_permit.text == f"{REJECTED} first"


def test_both_deferrals_armed_stop_the_list(make_plan: MakePlan):
    # Postfix: nothing later can change the outcome (a reject defers, a permit defers)
    run = run_client_list(
        make_plan, "smtpd_client_restrictions = defer_if_permit, defer_if_reject, reject"
    )
    assert run.status is DUNNO and run.reply is None and run.logs == []


def test_run_list_resets_the_per_list_state(make_plan: MakePlan):
    run = run_client_list(make_plan, "smtpd_client_restrictions = defer_if_reject permit")
    assert run.state.defer_if_reject.active
    items = run.checker.plan.stage_list("smtpd_client_restrictions")
    run.state.warn_if_reject = 3
    run.state.recursion = 7
    status = asyncio.run(run.checker.run_list((items[1],), NAME, CLIENT))
    assert status is OK
    assert not run.state.defer_if_reject.active
    assert (run.state.warn_if_reject, run.state.recursion) == (0, 0)


# -- configuration and lookup errors end the stage with 451 ----------------------------


def test_lookup_table_in_a_table_value(make_plan: MakePlan, tmp_path: Path):
    run = run_client_list(
        make_plan, f"smtpd_client_restrictions = {ACCESS}, permit", "check_sender_access hash:/x"
    )
    table = f"texthash:{tmp_path / 't'}"
    assert run.status is REJECT
    assert run.reply == "451 4.3.5 Server configuration error"
    assert run.logs == [
        f"warning: access table {table} has entry with lookup table: check_sender_access hash:/x",
        "warning: do not specify lookup tables inside SMTPD access maps",
        "warning: define a restriction class and specify its name instead.",
        f"warning: access table {table}: lookup table in value",
        reject_log("451 4.3.5 Server configuration error"),
    ]


def test_unknown_restriction_in_a_table_value(make_plan: MakePlan):
    run = run_client_list(make_plan, f"smtpd_client_restrictions = {ACCESS}, permit", "bogus_r")
    assert (run.status, run.reply) == (REJECT, "451 4.3.5 Server configuration error")
    assert run.logs == [
        'warning: unknown smtpd restriction: "bogus_r"',
        reject_log("451 4.3.5 Server configuration error"),
    ]


def test_a_config_error_deep_in_classes_ends_the_whole_stage(make_plan: MakePlan):
    # OK after the failing item must not run: the error unwinds every level at once.
    run = run_client_list(
        make_plan,
        f"smtpd_restriction_classes = a, b\na = b, permit\nb = {ACCESS}\n"
        "smtpd_client_restrictions = a, permit",
        "bogus_r",
    )
    assert (run.status, run.reply) == (REJECT, "451 4.3.5 Server configuration error")


def test_recursion_through_table_values_is_bounded(make_plan: MakePlan):
    run = run_client_list(
        make_plan,
        f"smtpd_restriction_classes = loop\nloop = {ACCESS}\nsmtpd_client_restrictions = loop",
        "loop",
    )
    assert (run.status, run.reply) == (REJECT, "451 4.3.5 Server configuration error")
    assert run.logs[0] == "warning: restriction class recursion is too deep"
    assert run.state.recursion == 0
    assert MAX_RECURSION == 100


def test_a_table_that_cannot_be_opened_answers_451_4_3_5(make_plan: MakePlan, tmp_path: Path):
    run = run_client_list(
        make_plan,
        "smtpd_client_restrictions = check_client_access texthash:@DIR@/no, permit",
        strict=False,
    )
    table = f"texthash:{tmp_path / 'no'}"
    reply = f"451 4.3.5 {REJECTED} Server configuration error"
    assert (run.status, run.reply) == (REJECT, reply)
    assert run.logs == [
        f"warning: {table} is unavailable. open {tmp_path / 'no'}: No such file or directory",
        f'warning: {table} lookup error for "unknown"',
        reject_log(reply),
    ]


def test_an_empty_lookup_result_is_a_lookup_error(make_plan: MakePlan):
    run = run_client_list(
        make_plan,
        "smtpd_client_restrictions = check_client_access inline:{192.0.2.1=}, permit",
        strict=False,
    )
    reply = f"451 4.3.5 {REJECTED} Server configuration error"
    assert (run.status, run.reply) == (REJECT, reply)
    assert run.logs == [
        "warning: inline:{192.0.2.1=} lookup of 192.0.2.1 returns an empty string result",
        "warning: inline:{192.0.2.1=} should return NO RESULT in case of NOT FOUND",
        'warning: inline:{192.0.2.1=} lookup error for "192.0.2.1"',
        reject_log(reply),
    ]


def test_a_config_error_is_never_only_a_warning(make_plan: MakePlan):
    run = run_client_list(
        make_plan, f"smtpd_client_restrictions = warn_if_reject {ACCESS}, permit", "bogus_r"
    )
    assert (run.status, run.reply) == (REJECT, "451 4.3.5 Server configuration error")


def test_a_failed_recipient_table_lookup_is_a_temporary_failure(make_plan: MakePlan):
    plan = make_plan("relay_recipient_maps = texthash:@DIR@/no", strict=False)
    state = SessionState(
        client=ClientInfo("192.0.2.1"), sender="a@b.org", recipient="bob@example.org"
    )
    checker = Checker(plan, state)
    items = compile_runtime_list(plan, "reject_unlisted_recipient, permit")
    status = asyncio.run(checker.run_list(items, "bob@example.org", RECIPIENT))
    assert status is REJECT
    assert state.error == Reply(451, "4.3.0", "<bob@example.org>: Temporary lookup failure")


# -- actions that only record (DISCARD, HOLD, PREPEND) ---------------------------------


def test_queue_actions_are_skipped_before_mail(make_plan: MakePlan, tmp_path: Path):
    for verb in ("DISCARD", "HOLD", "PREPEND X-A: b", "REDIRECT a@b.org"):
        run = run_client_list(make_plan, f"smtpd_client_restrictions = {ACCESS}, permit", verb)
        assert run.status is OK
        assert run.logs == [
            f"warning: access table texthash:{tmp_path / 't'}: with smtpd_delay_reject=no, "
            f"action {verb.split()[0]} is always skipped in Client host or Helo command "
            "restrictions"
        ]
        assert not run.state.discard and not run.state.queue_actions and not run.state.prepend


def test_discard_is_ok_and_marks_the_transaction(make_plan: MakePlan):
    run = run_client_list(
        make_plan, f"smtpd_client_restrictions = {ACCESS}, reject", "DISCARD", sender="a@b.org"
    )
    assert run.status is OK and run.state.discard
    assert run.logs == [
        f"info: NOQUEUE: discard: CONNECT from {NAME}: <{NAME}>: Client host triggers DISCARD "
        "action; from=<a@b.org> proto=SMTP"
    ]


def test_hold_is_recorded_once_and_the_list_goes_on(make_plan: MakePlan):
    text = (
        f"smtpd_restriction_classes = c\nc = {ACCESS}\n"
        f"smtpd_client_restrictions = {ACCESS}, c, reject"
    )
    run = run_client_list(make_plan, text, "HOLD", sender="a@b.org")
    assert run.status is REJECT
    assert run.state.queue_actions == [("HOLD", "")]
    assert [line.split(": ")[2] for line in run.logs] == ["hold", "reject"]


def test_prepend_is_recorded(make_plan: MakePlan):
    run = run_client_list(
        make_plan, f"smtpd_client_restrictions = {ACCESS}", "PREPEND X-Seen: yes", sender="a@b.org"
    )
    assert run.status is DUNNO and run.state.prepend == ["X-Seen: yes"]
