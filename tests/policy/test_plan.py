"""Building a plan from main.cf text: what compiles to what, and every error with its place.

Each error case names the line of main.cf it must point at (the ``BASE`` lines come first;
see ``conftest.py``), because "every user-facing error says where".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgate.policy.plan import Compiled, compile_runtime_list
from smtpgate.policy.registry import lookup
from smtpgate.tables import SurrogateTable
from tests.policy.conftest import BASE_LINES, Build, MakePlan


def labels(items: tuple[Compiled, ...]) -> list[str]:
    return [item.label for item in items]


def errors(diagnostics: list) -> list[str]:
    return [str(d) for d in diagnostics if d.severity == "error"]


def warnings(diagnostics: list) -> list[str]:
    return [str(d) for d in diagnostics if d.severity == "warning"]


# -- stage lists ---------------------------------------------------------------------------


def test_every_stage_list_compiles_in_order(make_plan: MakePlan):
    plan = make_plan(
        "smtpd_client_restrictions = permit_mynetworks, reject\n"
        "smtpd_helo_restrictions = reject_invalid_helo_hostname\n"
        "smtpd_sender_restrictions = reject_non_fqdn_sender\n"
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n"
        "smtpd_recipient_restrictions = reject_non_fqdn_recipient\n"
        "smtpd_data_restrictions = reject_unauth_pipelining\n"
        "smtpd_end_of_data_restrictions = reject_multi_recipient_bounce\n"
    )
    assert {p: labels(items) for p, items in plan.lists.items()} == {
        "smtpd_client_restrictions": ["permit_mynetworks", "reject"],
        "smtpd_helo_restrictions": ["reject_invalid_helo_hostname"],
        "smtpd_sender_restrictions": ["reject_non_fqdn_sender"],
        "smtpd_relay_restrictions": ["permit_mynetworks", "reject_unauth_destination"],
        "smtpd_recipient_restrictions": ["reject_non_fqdn_recipient"],
        "smtpd_data_restrictions": ["reject_unauth_pipelining"],
        "smtpd_etrn_restrictions": [],
        "smtpd_end_of_data_restrictions": ["reject_multi_recipient_bounce"],
    }
    assert plan.stage_list("no_such_list") == ()


def test_names_are_case_insensitive_and_normalised(make_plan: MakePlan):
    plan = make_plan(
        "smtpd_client_restrictions = REJECT, Permit_MyNetworks,WARN_IF_REJECT reject_unknown_client"
    )
    items = plan.lists["smtpd_client_restrictions"]
    assert [i.name for i in items] == [
        "reject",
        "permit_mynetworks",
        "warn_if_reject",
        "reject_unknown_client",
    ]
    # warn_if_reject is a marker for the engine, not a restriction with a function
    assert items[2].spec is None and items[2].class_name is None
    assert all(i.spec is not None and i.spec.fn is not None for i in (items[0], items[1], items[3]))


def test_table_arguments_are_opened_at_load(make_plan: MakePlan):
    plan = make_plan(
        "smtpd_client_restrictions = check_client_access texthash:@DIR@/clients\n"
        "smtpd_sender_restrictions = texthash:@DIR@/senders, reject_rbl_client zen.test\n",
        {"clients": "192.0.2.1 REJECT\n", "senders": "a@b.org OK\n"},
    )
    client = plan.lists["smtpd_client_restrictions"][0]
    assert client.name == "check_client_access"
    assert client.arg.lookup("192.0.2.1") == "REJECT"
    # A bare table stands for the stage's own check_*_access (Postfix def_acl).
    sender, rbl = plan.lists["smtpd_sender_restrictions"]
    assert sender.name == "check_sender_access"
    assert sender.label.startswith("check_sender_access texthash:")
    assert sender.arg.lookup("a@b.org") == "OK"
    assert (rbl.name, rbl.arg, rbl.label) == (
        "reject_rbl_client",
        "zen.test",
        "reject_rbl_client zen.test",
    )


def test_a_table_named_twice_is_opened_once(make_plan: MakePlan):
    plan = make_plan(
        "smtpd_client_restrictions = check_client_access texthash:@DIR@/t\n"
        "smtpd_helo_restrictions = check_helo_access texthash:@DIR@/t\n",
        {"t": "x OK\n"},
    )
    (client,) = plan.lists["smtpd_client_restrictions"]
    (helo,) = plan.lists["smtpd_helo_restrictions"]
    assert client.arg is helo.arg


# -- errors, each with file and line -------------------------------------------------------

ERROR_CASES = [
    pytest.param(
        "smtpd_recipient_restrictions = permit_mynetwork, reject_unauth_destination",
        1,
        'smtpd_recipient_restrictions: unknown restriction "permit_mynetwork"',
        id="unknown-name",
    ),
    pytest.param(
        "\nsmtpd_client_restrictions = permit,\n  bogus_check\n",
        2,
        'smtpd_client_restrictions: unknown restriction "bogus_check"',
        id="unknown-name-on-a-continuation-line-names-the-first-line",
    ),
    pytest.param(
        "smtpd_client_restrictions = strict\nstrict = reject",
        1,
        'smtpd_client_restrictions: unknown restriction "strict"; strict is defined but not '
        "listed in smtpd_restriction_classes",
        id="defined-but-not-a-class",
    ),
    pytest.param(
        "smtpd_client_restrictions = check_client_access",
        1,
        'smtpd_client_restrictions: restriction "check_client_access" requires a type:table '
        "argument",
        id="table-missing-at-end",
    ),
    pytest.param(
        "smtpd_helo_restrictions = check_helo_access permit",
        1,
        'smtpd_helo_restrictions: restriction "check_helo_access" requires a type:table argument',
        id="table-argument-not-a-table",
    ),
    pytest.param(
        "smtpd_client_restrictions = reject_rbl_client",
        1,
        'smtpd_client_restrictions: restriction "reject_rbl_client" requires a domain name '
        "argument",
        id="zone-missing",
    ),
    pytest.param(
        "smtpd_client_restrictions = reject_rbl_client zen.test=127.0.0.[",
        1,
        'smtpd_client_restrictions: restriction "reject_rbl_client": in "127.0.0.[": missing "]"',
        id="bad-zone-filter",
    ),
    pytest.param(
        "smtpd_client_restrictions = permit_mx_backup",
        1,
        'smtpd_client_restrictions: restriction "permit_mx_backup" is not supported yet '
        "(smtpgate does not know this host's interface addresses)",
        id="not-implemented",
    ),
    pytest.param(
        "smtpd_data_restrictions = texthash:@DIR@/t",
        1,
        'smtpd_data_restrictions: a lookup table "texthash:@DIR@/t" must follow a '
        "check_*_access restriction here",
        id="bare-table-where-no-default-access",
    ),
    pytest.param(
        "smtpd_restriction_classes = foo",
        1,
        "restriction class `foo' needs a definition",
        id="class-without-definition",
    ),
    pytest.param(
        "smtpd_restriction_classes = a, b, c\na = b\nb = c, permit\nc = a",
        2,
        "restriction classes refer to each other in a loop: a -> b -> c -> a",
        id="cycle-of-three",
    ),
    pytest.param(
        "smtpd_restriction_classes = a\na = permit_mynetworks a",
        2,
        "restriction classes refer to each other in a loop: a -> a",
        id="class-names-itself",
    ),
    pytest.param(
        "reject_code = 299",
        1,
        "bad reply code configuration: reject_code = 299 (use a 4xx or 5xx SMTP code)",
        id="reply-code-out-of-range",
    ),
    pytest.param(
        "\naccess_map_defer_code = 45x",
        2,
        "bad numerical configuration: access_map_defer_code = 45x (use a whole number)",
        id="reply-code-not-a-number",
    ),
    pytest.param(
        "rbl_tempfail_action = maybe",
        1,
        "rbl_tempfail_action: bad value 'maybe' (expected defer or defer_if_permit or dunno)",
        id="tempfail-action",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), ERROR_CASES)
def test_error_names_file_and_line(build: Build, tmp_path: Path, text, line, message):
    plan, diagnostics = build(text)
    assert plan is None
    message = message.replace("@DIR@", str(tmp_path))
    where = f"{tmp_path / 'main.cf'}, line {BASE_LINES + line}"
    assert errors(diagnostics) == [f"{where}: error: {message}"]


def test_all_errors_are_reported_at_once(build: Build, tmp_path: Path):
    plan, diagnostics = build(
        "smtpd_client_restrictions = nope1\n"
        "smtpd_helo_restrictions = nope2, check_helo_access\n"
        "maps_rbl_reject_code = 200\n"
    )
    assert plan is None
    # the settings are read first (typed PolicyConfig), then the lists are compiled
    assert [d.message for d in diagnostics if d.severity == "error"] == [
        "bad reply code configuration: maps_rbl_reject_code = 200 (use a 4xx or 5xx SMTP code)",
        'smtpd_client_restrictions: unknown restriction "nope1"',
        'smtpd_helo_restrictions: unknown restriction "nope2"',
        'smtpd_helo_restrictions: restriction "check_helo_access" requires a type:table argument',
    ]


def test_an_unsupported_restriction_skips_its_own_argument(build: Build):
    # The seconds are not read as an unknown restriction.
    _, diagnostics = build("smtpd_recipient_restrictions = sleep 10, reject_unauth_destination")
    assert [d.message for d in diagnostics] == [
        'smtpd_recipient_restrictions: restriction "sleep" is not supported yet '
        "(smtpgate does not pause sessions on request)"
    ]


# -- the open-relay guard and the order lint -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination", True),
        ("smtpd_relay_restrictions =\nsmtpd_recipient_restrictions = defer_if_permit", True),
        (
            "smtpd_relay_restrictions = permit_mynetworks\nsmtpd_recipient_restrictions = reject",
            True,
        ),
        (
            "smtpd_relay_restrictions = permit_mynetworks\n"
            "smtpd_restriction_classes = guard\nguard = reject_unauth_destination\n"
            "smtpd_recipient_restrictions = guard",
            True,
        ),
        ("smtpd_relay_restrictions = permit_mynetworks", False),
        (
            # warn_if_reject makes the next restriction harmless: it does not count
            "smtpd_relay_restrictions = warn_if_reject reject_unauth_destination, permit",
            False,
        ),
        (
            "smtpd_relay_restrictions = permit_mynetworks\n"
            "smtpd_restriction_classes = guard\nguard = permit_mynetworks\n"
            "smtpd_recipient_restrictions = guard",
            False,
        ),
    ],
)
def test_a_relay_guard_is_required(build: Build, text: str, ok: bool):
    plan, diagnostics = build(text)
    guard_errors = [e for e in errors(diagnostics) if "open relay" in e]
    assert (plan is not None, guard_errors == []) == (ok, ok)


def test_permit_before_the_relay_check_is_a_warning(build: Build):
    plan, diagnostics = build("smtpd_recipient_restrictions = permit, reject_unauth_destination")
    assert plan is not None
    assert [d.message for d in diagnostics] == [
        "smtpd_recipient_restrictions: permit before reject_unauth_destination accepts every "
        "recipient: this is an open relay; put permit after it"
    ]
    _, diagnostics = build("smtpd_recipient_restrictions = reject_unauth_destination, permit")
    assert diagnostics == []


# -- tables: strict and lenient loading, value lint ----------------------------------------


def test_a_missing_table_is_an_error_in_check(build: Build, tmp_path: Path):
    plan, diagnostics = build("smtpd_client_restrictions = check_client_access texthash:@DIR@/no")
    assert plan is None
    (error,) = errors(diagnostics)
    assert error.startswith("error: smtpd_client_restrictions: ")
    assert f"{tmp_path / 'main.cf'}, line {BASE_LINES + 1}" in error
    assert f"open {tmp_path / 'no'}: No such file or directory" in error


def test_a_missing_table_is_a_surrogate_in_serve(build: Build, tmp_path: Path):
    plan, diagnostics = build(
        "smtpd_client_restrictions = check_client_access texthash:@DIR@/no", strict=False
    )
    assert plan is not None
    (warning,) = warnings(diagnostics)
    assert warning.endswith(f"every lookup in texthash:{tmp_path / 'no'} fails (451 4.3.5)")
    (item,) = plan.lists["smtpd_client_restrictions"]
    assert isinstance(item.arg, SurrogateTable)


def test_table_values_are_linted(build: Build, tmp_path: Path):
    plan, diagnostics = build(
        "smtpd_restriction_classes = strict\nstrict = reject\n"
        "smtpd_sender_restrictions = check_sender_access texthash:@DIR@/s\n",
        {"s": "a@x.org REJECT  521\nb@x.org strict\nc@x.org strickt\nd@x.org OK\n"},
    )
    assert plan is not None
    found = warnings(diagnostics)
    table = tmp_path / "s"
    assert len(found) == 2
    assert found[0].startswith(f"{table}, line 1: warning: texthash:{table}: a@x.org: ")
    assert "521 <text>" in found[0]
    assert found[1] == (
        f'{table}, line 3: warning: texthash:{table}: c@x.org: "strickt" is neither an action '
        "nor a restriction or class; a lookup answers 451 4.3.5 Server configuration error"
    )


# -- settings the engine reads -------------------------------------------------------------


def test_settings_become_plan_fields(make_plan: MakePlan):
    plan = make_plan("")
    assert (plan.delay_reject, plan.helo_required, plan.soft_bounce) == (True, False, False)
    assert plan.codes.reject_code == 554 and plan.codes.access_map_defer_code == 450
    plan = make_plan(
        "smtpd_delay_reject = no\nsmtpd_helo_required = yes\nsoft_bounce = yes\n"
        "reject_code = 550\nsmtpd_relay_before_recipient_restrictions = no\n"
        "smtpd_null_access_lookup_key = <empty>\n"
    )
    assert (plan.delay_reject, plan.helo_required, plan.soft_bounce) == (False, True, True)
    assert plan.codes.reject_code == 550
    assert plan.relay_before_recipient is False
    assert plan.null_access_lookup_key == "<empty>"


# -- restriction names in table values (compiled when first met) ---------------------------


def test_runtime_lists(make_plan: MakePlan):
    plan = make_plan("smtpd_restriction_classes = strict\nstrict = reject")
    items = compile_runtime_list(plan, "permit_mynetworks, strict WARN_IF_REJECT reject")
    assert [(i.name, i.class_name) for i in items] == [
        ("permit_mynetworks", None),
        ("strict", "strict"),
        ("warn_if_reject", None),
        ("reject", None),
    ]
    assert compile_runtime_list(plan, "permit_mynetworks, strict WARN_IF_REJECT reject") is items

    (rbl,) = compile_runtime_list(plan, "reject_rbl_client zen.test")
    assert (rbl.spec, rbl.arg, rbl.error) == (lookup("reject_rbl_client"), "zen.test", None)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("bogus", 'unknown smtpd restriction: "bogus"'),
        ("permit_mx_backup", 'restriction "permit_mx_backup" is not supported'),
        (
            "check_client_access texthash:/x",
            "restriction check_client_access needs an argument here",
        ),
        ("reject_rbl_client", "restriction reject_rbl_client needs an argument here"),
    ],
)
def test_runtime_list_errors_are_items(make_plan: MakePlan, text: str, error: str):
    """A bad name in a table value is not a load error: it answers 451 when it is met."""
    (item,) = compile_runtime_list(make_plan(""), text)
    assert (item.error, item.spec) == (error, None)
