"""check_policy_service in the core, against FakePolicyClient: the request's attributes,
the answer as an access(5) action, the default action, and the configuration's errors.

The adapter (sockets, tries, timeouts) is tested in ``tests/delegation/``.
"""

from __future__ import annotations

from typing import Any

import pytest

from smtpgate.config.policyconf import PolicyService
from smtpgate.policy.delegation import request_attributes
from smtpgate.policy.model import ClientInfo, SessionState, TlsInfo
from smtpgate.policy.plan import Plan
from smtpgate.policy.ports import FakePolicyClient, PolicyAnswer
from smtpgate.policy.session import PolicySession
from tests.policy.conftest import BASE_LINES, Build, MakePlan

CLIENT = ClientInfo("192.0.2.1", "mail.client.test", "mail.client.test", 40000, "ok", "ok")
NAMADDR = "mail.client.test[192.0.2.1]"
SERVICE = "inet:127.0.0.1:9998"
RCPT_LIST = (
    f"smtpd_recipient_restrictions = reject_unauth_destination, check_policy_service {SERVICE}\n"
)

# Postfix 3.7's smtpd_check.c::check_policy_service, in order (3.8 adds
# compatibility_level and mail_version).
POSTFIX_37_ATTRIBUTES = [
    "request",
    "protocol_state",
    "protocol_name",
    "client_address",
    "client_name",
    "client_port",
    "reverse_client_name",
    "server_address",
    "server_port",
    "helo_name",
    "sender",
    "recipient",
    "recipient_count",
    "queue_id",
    "instance",
    "size",
    "etrn_domain",
    "stress",
    "sasl_method",
    "sasl_username",
    "sasl_sender",
    "ccert_subject",
    "ccert_issuer",
    "ccert_fingerprint",
    "ccert_pubkey_fingerprint",
    "encryption_protocol",
    "encryption_cipher",
    "encryption_keysize",
    "policy_context",
]


def session(plan: Plan, answer: Any = "DUNNO") -> tuple[PolicySession, FakePolicyClient]:
    fake = FakePolicyClient(answer)
    return PolicySession(plan.with_policy_client(fake), CLIENT), fake


async def transaction(
    s: PolicySession, *recipients: str, sender: str = "a@sender.test"
) -> list[Any]:
    await s.helo("helo.client.test", esmtp=True)
    await s.mail(sender, size=1234)
    decisions = []
    for rcpt in recipients:
        decision = await s.rcpt(rcpt)
        decisions.append(decision)
        if decision.reply is None:
            s.confirm_rcpt(rcpt)
    return decisions


# -- the request ----------------------------------------------------------------------


async def test_the_attributes_are_postfix_37s_in_its_order(make_plan: MakePlan) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    s.state.server_address, s.state.server_port = "198.51.100.25", 25
    await s.helo("helo.client.test", esmtp=True)
    await s.mail("a@sender.test", size=1234)
    s.state.queue_id = "ABC123"  # the SMTP machine's, once a recipient passes
    await s.rcpt("bob@example.org")
    (service, attrs, pairs) = fake.requests[0]
    assert service.endpoint == SERVICE
    assert [name for name, _ in pairs] == POSTFIX_37_ATTRIBUTES
    assert attrs | {"instance": "*"} == {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.1",
        "client_name": "mail.client.test",
        "client_port": "40000",
        "reverse_client_name": "mail.client.test",
        "server_address": "198.51.100.25",
        "server_port": "25",
        "helo_name": "helo.client.test",
        "sender": "a@sender.test",
        "recipient": "bob@example.org",
        "recipient_count": "0",
        "queue_id": "ABC123",
        "instance": "*",
        "size": "1234",
        "etrn_domain": "",
        "stress": "",
        "sasl_method": "",
        "sasl_username": "",
        "sasl_sender": "",
        "ccert_subject": "",
        "ccert_issuer": "",
        "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "",
        "encryption_protocol": "",
        "encryption_cipher": "",
        "encryption_keysize": "0",
        "policy_context": "",
    }


def test_tls_and_the_sizes_and_bdat_as_postfix_sends_them() -> None:
    state = SessionState(client=CLIENT, where="BDAT", rcpt_count=2, message_size=100)
    state.tls = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
    state.actual_size = 5120
    service = PolicyService("x", SERVICE, policy_context="submission")
    attrs = dict(request_attributes(state, service))
    assert attrs["protocol_state"] == "DATA"  # BDAT is DATA to a policy server
    assert attrs["recipient_count"] == "2"  # counted at DATA and END-OF-MESSAGE only
    assert attrs["size"] == "5120"  # the actual size, once known
    assert (attrs["encryption_protocol"], attrs["encryption_cipher"]) == (
        "TLSv1.3",
        "TLS_AES_256_GCM_SHA384",
    )
    assert attrs["encryption_keysize"] == "256"
    assert attrs["policy_context"] == "submission"
    state.where = "RCPT"
    assert dict(request_attributes(state, service))["recipient_count"] == "0"


async def test_instance_is_one_per_transaction(make_plan: MakePlan) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await transaction(s, "bob@example.org", "carol@example.org")
    s.reset()
    await s.mail("other@sender.test")
    await s.rcpt("bob@example.org")
    first, second, third = (attrs["instance"] for _, attrs, _ in fake.requests)
    assert first == second != ""
    assert third not in ("", first)


async def test_at_mail_with_delay_reject_no_there_is_no_instance_yet(make_plan: MakePlan) -> None:
    # Postfix's mail_cmd() makes the instance after the sender restrictions passed
    plan = make_plan(
        "smtpd_delay_reject = no\n"
        f"smtpd_sender_restrictions = check_policy_service {SERVICE}\n"
        f"smtpd_helo_restrictions = check_policy_service {SERVICE}\n"
    )
    s, fake = session(plan)
    await s.helo("helo.client.test")
    await s.mail("a@sender.test")
    (_, helo, _), (_, mail, _) = fake.requests
    assert (helo["protocol_state"], helo["helo_name"], helo["sender"]) == (
        "HELO",
        "helo.client.test",
        "",
    )
    assert (mail["protocol_state"], mail["sender"], mail["instance"]) == (
        "MAIL",
        "a@sender.test",
        "",
    )


async def test_data_stage_sends_the_count_and_the_lone_recipient(make_plan: MakePlan) -> None:
    plan = make_plan(f"smtpd_data_restrictions = check_policy_service {SERVICE}\n")
    s, fake = session(plan)
    await transaction(s, "bob@example.org")
    await s.data()
    (_, attrs, _) = fake.requests[0]
    assert (attrs["protocol_state"], attrs["recipient_count"], attrs["recipient"]) == (
        "DATA",
        "1",
        "bob@example.org",
    )


async def test_a_null_sender_is_sent_empty(make_plan: MakePlan) -> None:
    s, fake = session(make_plan(RCPT_LIST))
    await transaction(s, "bob@example.org", sender="")
    assert fake.requests[0][1]["sender"] == ""


# -- the answer: access(5) actions -----------------------------------------------------

REJECTED = "Recipient address rejected"


@pytest.mark.parametrize(
    ("action", "reply", "log"),
    [
        ("DUNNO", None, None),
        ("OK", None, None),
        ("REJECT", f"554 5.7.1 <bob@example.org>: {REJECTED}: Access denied", "reject"),
        ("REJECT go away", f"554 5.7.1 <bob@example.org>: {REJECTED}: go away", "reject"),
        ("reject 5.7.23 SPF fail", f"554 5.7.23 <bob@example.org>: {REJECTED}: SPF fail", "reject"),
        ("DEFER later", f"450 4.7.1 <bob@example.org>: {REJECTED}: later", "reject"),
        (
            "550 5.7.23 Message rejected due to: SPF fail",
            f"550 5.7.23 <bob@example.org>: {REJECTED}: Message rejected due to: SPF fail",
            "reject",
        ),
        (
            "DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/example.org.html",
            f"450 4.2.0 <bob@example.org>: {REJECTED}: Greylisted, see "
            "http://postgrey.schweikert.ch/help/example.org.html",
            "reject",
        ),
        ("DEFER_IF_REJECT maybe", None, None),
        (
            "421 4.7.0 go away now",
            f"421 4.7.0 <bob@example.org>: {REJECTED}: go away now",
            "reject",
        ),
        ("WARN looks odd", None, "warn"),
        ("INFO noted", None, "info"),
        ("HOLD", None, "hold"),
        ("DISCARD", None, "discard"),
        ("FILTER smtp:[127.0.0.1]:10025", None, "filter"),
        ("REDIRECT abuse@example.org", None, "redirect"),
        ("BCC archive@example.org", None, "bcc"),
        ("PREPEND X-Policy: seen", None, None),
    ],
)
async def test_the_action_is_an_access_action(
    make_plan: MakePlan, action: str, reply: str | None, log: str | None
) -> None:
    s, _ = session(make_plan(RCPT_LIST), action)
    (decision,) = await transaction(s, "bob@example.org")
    assert (str(decision.reply) if decision.reply else None) == reply
    lines = [r.text for r in decision.logs if r.level == "info"]
    if log is None:
        assert lines == []
    else:
        assert lines and lines[0].startswith(f"NOQUEUE: {log}: RCPT from {NAMADDR}: "), lines
    if action.startswith("PREPEND"):
        assert s.state.prepend == ["X-Policy: seen"]
    if action in ("HOLD", "DISCARD") or action.split()[0] in ("FILTER", "REDIRECT", "BCC"):
        assert s.state.discard or s.state.queue_actions


async def test_the_reject_log_line_is_postfixs(make_plan: MakePlan) -> None:
    s, _ = session(make_plan(RCPT_LIST), "DEFER_IF_PERMIT 4.2.0 Greylisted")
    (decision,) = await transaction(s, "bob@example.org")
    assert [r.text for r in decision.logs] == [
        f"NOQUEUE: reject: RCPT from {NAMADDR}: 450 4.2.0 <bob@example.org>: {REJECTED}: "
        "Greylisted; from=<a@sender.test> to=<bob@example.org> proto=ESMTP "
        "helo=<helo.client.test>"
    ]


async def test_a_class_name_runs_the_class(make_plan: MakePlan) -> None:
    plan = make_plan(
        "smtpd_restriction_classes = strict\nstrict = reject_non_fqdn_sender, reject\n" + RCPT_LIST
    )
    s, _ = session(plan, "strict")
    (decision,) = await transaction(s, "bob@example.org")
    assert (
        str(decision.reply)
        == "554 5.7.1 <bob@example.org>: Recipient address rejected: Access denied"
    )


async def test_a_bad_prepend_warns_as_postfix_does(make_plan: MakePlan) -> None:
    s, _ = session(make_plan(RCPT_LIST), "PREPEND no header here")
    (decision,) = await transaction(s, "bob@example.org")
    assert decision.reply is None
    assert [r.text for r in decision.logs if r.level == "warning"] == [
        f'access table {SERVICE} entry "policy query" requires header: text'
    ]


async def test_an_unknown_word_is_a_configuration_error(make_plan: MakePlan) -> None:
    s, _ = session(make_plan(RCPT_LIST), "FROBNICATE")
    (decision,) = await transaction(s, "bob@example.org")
    assert str(decision.reply) == "451 4.3.5 Server configuration error"


# -- no answer: the default action ----------------------------------------------------

DOWN = PolicyAnswer(
    None,
    (
        "connect to 127.0.0.1:9998: Connection refused",
        "problem talking to server 127.0.0.1:9998: Connection refused",
    ),
)


async def test_no_answer_takes_the_default_action_and_logs_the_warnings(
    make_plan: MakePlan,
) -> None:
    s, _ = session(make_plan(RCPT_LIST), DOWN)
    (decision,) = await transaction(s, "bob@example.org")
    assert str(decision.reply) == (
        "451 4.3.5 <bob@example.org>: Recipient address rejected: Server configuration problem"
    )
    assert [(r.level, r.text) for r in decision.logs] == [
        ("warning", "connect to 127.0.0.1:9998: Connection refused"),
        ("warning", "problem talking to server 127.0.0.1:9998: Connection refused"),
        (
            "info",
            f"NOQUEUE: reject: RCPT from {NAMADDR}: 451 4.3.5 <bob@example.org>: "
            "Recipient address rejected: Server configuration problem; from=<a@sender.test> "
            "to=<bob@example.org> proto=ESMTP helo=<helo.client.test>",
        ),
    ]


@pytest.mark.parametrize(
    ("main_cf", "reply"),
    [
        ("smtpd_policy_service_default_action = DUNNO\n", None),
        (
            "smtpd_policy_service_default_action = 450 4.7.1 Try again later\n",
            "450 4.7.1 <bob@example.org>: Recipient address rejected: Try again later",
        ),
    ],
)
async def test_the_default_action_parameter(
    make_plan: MakePlan, main_cf: str, reply: str | None
) -> None:
    s, _ = session(make_plan(main_cf + RCPT_LIST), DOWN)
    (decision,) = await transaction(s, "bob@example.org")
    assert (str(decision.reply) if decision.reply else None) == reply


async def test_the_brace_form_overrides_the_parameters(make_plan: MakePlan) -> None:
    plan = make_plan(
        "smtpd_policy_service_default_action = 450 4.7.1 global\n"
        "smtpd_recipient_restrictions = reject_unauth_destination,\n"
        "  check_policy_service { inet:127.0.0.1:9998, timeout=10s, default_action=DUNNO,\n"
        "    policy_context=mx, max_idle=5s, max_ttl=1m, try_limit=3, retry_delay=2s,\n"
        "    request_limit=7 }\n"
    )
    (service,) = plan.policy_services.values()
    assert (service.endpoint, service.timeout, service.default_action) == (SERVICE, 10.0, "DUNNO")
    assert (service.policy_context, service.max_idle, service.max_ttl) == ("mx", 5.0, 60.0)
    assert (service.try_limit, service.retry_delay, service.request_limit) == (3, 2.0, 7)
    s, fake = session(plan, DOWN)
    (decision,) = await transaction(s, "bob@example.org")
    assert decision.reply is None
    assert fake.requests[0][1]["policy_context"] == "mx"


async def test_malformed_utf8_in_the_answer_is_no_answer(make_plan: MakePlan) -> None:
    s, _ = session(make_plan(RCPT_LIST), "REJECT caf\udce9")
    (decision,) = await transaction(s, "bob@example.org")
    assert str(decision.reply).startswith("451 4.3.5 ")
    warnings = [r.text for r in decision.logs if r.level == "warning"]
    assert warnings == [f'malformed UTF-8 in policy server {SERVICE} response: "REJECT caf\ufffd"']


async def test_without_a_client_nothing_passes(make_plan: MakePlan) -> None:
    s = PolicySession(make_plan(RCPT_LIST), CLIENT)
    (decision,) = await transaction(s, "bob@example.org")
    assert str(decision.reply).startswith("451 4.3.5 ")


async def test_a_table_value_names_a_service_through_a_class_only(make_plan: MakePlan) -> None:
    # As in Postfix: a value with a ":" is "an entry with lookup table" (451 4.3.5);
    # a restriction class defined in main.cf may hold check_policy_service.
    plan = make_plan(
        "smtpd_restriction_classes = policy\n"
        f"policy = check_policy_service {SERVICE}\n"
        "smtpd_recipient_restrictions = reject_unauth_destination,\n"
        "  check_recipient_access inline:{ bob@example.org=policy,\n"
        f"    {{carol@example.org=check_policy_service {SERVICE}}} }}\n"
    )
    s, fake = session(plan, "REJECT no")
    decisions = await transaction(s, "bob@example.org", "carol@example.org")
    assert [str(d.reply) for d in decisions] == [
        "554 5.7.1 <bob@example.org>: Recipient address rejected: no",
        "451 4.3.5 Server configuration error",
    ]
    assert len(fake.requests) == 1


# -- configuration errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "check_policy_service",
            "requires a policy service (inet:host:port or unix:/path) argument",
        ),
        ("check_policy_service 127.0.0.1:9998", 'unsupported policy service transport "127.0.0.1"'),
        ("check_policy_service inet:127.0.0.1", "expected inet:host:port"),
        ("check_policy_service unix:private/policy", "a unix socket needs an absolute path"),
        ("check_policy_service tcp:127.0.0.1:1", 'unsupported policy service transport "tcp"'),
        (
            "check_policy_service { inet:127.0.0.1:1, timeout=10x }",
            "timeout: bad time value or unit: 10x",
        ),
        (
            "check_policy_service { inet:127.0.0.1:1, try_limit=0 }",
            "invalid try_limit parameter value 0 < 1",
        ),
        ("check_policy_service { inet:127.0.0.1:1, nonsense=1 }", 'unknown option: "nonsense = 1"'),
        (
            "check_policy_service { inet:127.0.0.1:1, timeout }",
            "malformed option: missing '=' after attribute name",
        ),
        ("check_policy_service { }", 'empty policy service: "{ }"'),
    ],
)
def test_a_bad_service_is_an_error_naming_file_and_line(
    build: Build, value: str, message: str
) -> None:
    plan, diagnostics = build(
        f"smtpd_recipient_restrictions = reject_unauth_destination, {value}\n"
    )
    assert plan is None
    (error,) = [d for d in diagnostics if d.severity == "error"]
    assert message in error.message, error.message
    assert error.location is not None and error.location.line == BASE_LINES + 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("smtpd_policy_service_timeout = 10q", "smtpd_policy_service_timeout"),
        ("smtpd_policy_service_try_limit = 0", "smtpd_policy_service_try_limit: bad value 0"),
        ("smtpd_policy_service_max_idle = 0", "smtpd_policy_service_max_idle: bad value 0"),
        ("smtpd_policy_service_request_limit = x", "smtpd_policy_service_request_limit"),
        ("smtpd_policy_service_request_limit = -1", "smtpd_policy_service_request_limit: bad"),
        ("smtpd_policy_service_default_action =", "smtpd_policy_service_default_action"),
    ],
)
def test_a_bad_parameter_is_an_error_naming_file_and_line(
    build: Build, line: str, message: str
) -> None:
    plan, diagnostics = build(line + "\n" + RCPT_LIST)
    assert plan is None
    errors = [d for d in diagnostics if d.severity == "error"]
    assert errors and message in errors[0].message, [str(d) for d in errors]
    assert errors[0].location is not None and errors[0].location.line == BASE_LINES + 1
