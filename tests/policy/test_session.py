"""PolicySession, one command at a time: the stage drivers of Postfix's smtpd_check.c.

Each script is a main.cf fragment and the commands a client sends, with the reply the
session must give to each (``None``: the command passed every restriction).  ``confirm``
stands for the backend accepting a recipient (``confirm_rcpt``), ``reset`` for RSET.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from smtpgate.policy.model import ClientInfo, Decision, Stage
from smtpgate.policy.session import PolicySession
from tests.policy.conftest import MakePlan

CLIENT = ClientInfo("192.0.2.1")
NAMADDR = "unknown[192.0.2.1]"
CLIENT_DENIED = f"554 5.7.1 <{NAMADDR}>: Client host rejected: Access denied"
ACCESS_DENIED = f"503 5.7.0 Error: access denied for {NAMADDR}"
NOT_FQDN = "504 5.5.2 <h>: Helo command rejected: need fully-qualified hostname"
RELAY_DENIED = "454 4.7.1 <bob@else.org>: Relay access denied"


async def _step(session: PolicySession, command: str, arg: Any) -> Decision | None:
    if command == "connect":
        return await session.connect()
    if command in ("helo", "ehlo"):
        return await session.helo(arg, esmtp=command == "ehlo")
    if command == "mail":
        return await session.mail(arg)
    if command == "rcpt":
        return await session.rcpt(arg)
    if command == "confirm":
        session.confirm_rcpt(arg)
        return None
    if command == "data":
        return await session.data()
    if command == "eod":
        return await session.end_of_data()
    assert command == "reset", command
    session.reset()
    return None


def play(session: PolicySession, script: list[tuple[str, Any, str | None]]) -> list[Any]:
    """The replies the session gave, in the script's shape (to compare with it)."""

    async def run() -> list[Any]:
        out = []
        for command, arg, _ in script:
            decision = await _step(session, command, arg)
            reply = None if decision is None or decision.reply is None else str(decision.reply)
            out.append((command, arg, reply))
        return out

    return asyncio.run(run())


SCRIPTS = {
    "delay_reject-yes-client-reject-waits-for-rcpt": (
        "smtpd_client_restrictions = reject",
        [
            ("connect", None, None),
            ("ehlo", "h.test", None),
            ("mail", "a@b.org", None),
            ("rcpt", "bob@example.org", CLIENT_DENIED),
            ("rcpt", "carol@example.org", CLIENT_DENIED),
        ],
    ),
    "delay_reject-no-client-reject-at-connect-then-503": (
        "smtpd_delay_reject = no\nsmtpd_client_restrictions = reject",
        [
            ("connect", None, CLIENT_DENIED),
            ("ehlo", "h.test", ACCESS_DENIED),
            ("mail", "a@b.org", ACCESS_DENIED),
            ("rcpt", "bob@example.org", ACCESS_DENIED),
            ("data", None, None),
        ],
    ),
    "delay_reject-no-helo-reject-at-helo-and-a-second-helo": (
        "smtpd_delay_reject = no\nsmtpd_helo_restrictions = reject_non_fqdn_helo_hostname",
        [
            ("connect", None, None),
            ("helo", "h", NOT_FQDN),
            ("helo", "h.test", None),
            ("mail", "a@b.org", None),
            ("rcpt", "bob@example.org", None),
        ],
    ),
    "delay_reject-yes-helo-reject-at-rcpt": (
        "smtpd_helo_restrictions = reject_non_fqdn_helo_hostname",
        [
            ("helo", "h", None),
            ("mail", "a@b.org", None),
            ("rcpt", "bob@example.org", NOT_FQDN),
        ],
    ),
    "delay_reject-no-sender-reject-at-mail": (
        "smtpd_delay_reject = no\nsmtpd_sender_restrictions = reject_non_fqdn_sender",
        [
            ("ehlo", "h.test", None),
            (
                "mail",
                "a@b",
                "504 5.5.2 <a@b>: Sender address rejected: need fully-qualified address",
            ),
            ("rcpt", "bob@example.org", "503 5.5.1 Error: need MAIL command"),
            ("mail", "a@b.org", None),
            ("rcpt", "bob@example.org", None),
        ],
    ),
    "delay_reject-yes-sender-reject-at-rcpt": (
        "smtpd_sender_restrictions = reject_non_fqdn_sender",
        [
            ("ehlo", "h.test", None),
            ("mail", "a@b", None),
            (
                "rcpt",
                "bob@example.org",
                "504 5.5.2 <a@b>: Sender address rejected: need fully-qualified address",
            ),
        ],
    ),
    "sequencing": (
        "smtpd_helo_required = yes",
        [
            ("mail", "a@b.org", "503 5.5.1 Error: send HELO/EHLO first"),
            ("rcpt", "bob@example.org", "503 5.5.1 Error: need MAIL command"),
            ("helo", "h.test", None),
            ("mail", "a@b.org", None),
            ("mail", "c@b.org", "503 5.5.1 Error: nested MAIL command"),
            ("reset", None, None),
            ("mail", "c@b.org", None),
            ("helo", "h.test", None),  # HELO ends the transaction too
            ("rcpt", "bob@example.org", "503 5.5.1 Error: need MAIL command"),
        ],
    ),
    "helo-is-optional-by-default": (
        "",
        [("mail", "a@b.org", None), ("rcpt", "bob@example.org", None)],
    ),
    "the-relay-check": (
        "",
        [
            ("ehlo", "h.test", None),
            ("mail", "a@b.org", None),
            ("rcpt", "bob@example.org", None),
            ("rcpt", "bob@else.org", RELAY_DENIED),
        ],
    ),
    "postmaster-is-always-accepted": (
        "smtpd_recipient_restrictions = reject",
        [
            ("ehlo", "h.test", None),
            ("mail", "a@b.org", None),
            ("rcpt", "postmaster", None),
            ("rcpt", "PostMaster", None),
            (
                "rcpt",
                "postmaster@example.org",
                "554 5.7.1 <postmaster@example.org>: Recipient address rejected: Access denied",
            ),
        ],
    ),
    "defer_if_permit-at-mail-becomes-450-at-rcpt": (
        "smtpd_sender_restrictions = check_sender_access inline:{a@b.org=DEFER_IF_PERMIT}\n"
        "smtpd_recipient_restrictions = permit",
        [
            ("ehlo", "h.test", None),
            ("mail", "a@b.org", None),
            (
                "rcpt",
                "bob@example.org",
                "450 4.7.1 <a@b.org>: Sender address rejected: Service unavailable",
            ),
        ],
    ),
    "defer_if_permit-loses-to-a-later-reject": (
        "smtpd_sender_restrictions = check_sender_access inline:{a@b.org=DEFER_IF_PERMIT}\n"
        "smtpd_recipient_restrictions = reject",
        [
            ("ehlo", "h.test", None),
            ("mail", "a@b.org", None),
            (
                "rcpt",
                "bob@example.org",
                "554 5.7.1 <bob@example.org>: Recipient address rejected: Access denied",
            ),
        ],
    ),
    "defer_if_permit-of-one-sender-does-not-outlive-the-transaction": (
        "smtpd_delay_reject = no\n"
        "smtpd_sender_restrictions = check_sender_access inline:{a@b.org=DEFER_IF_PERMIT}",
        [
            ("ehlo", "h.test", None),
            ("mail", "a@b.org", None),
            (
                "rcpt",
                "bob@example.org",
                "450 4.7.1 <a@b.org>: Sender address rejected: Service unavailable",
            ),
            ("reset", None, None),
            ("mail", "c@b.org", None),
            ("rcpt", "bob@example.org", None),
        ],
    ),
    "defer_if_permit-in-data": (
        "smtpd_data_restrictions = defer_if_permit",
        [
            ("ehlo", "h.test", None),
            ("mail", "a@b.org", None),
            ("rcpt", "bob@example.org", None),
            ("confirm", "bob@example.org", None),
            ("data", None, "450 4.7.0 <DATA>: Data command rejected: defer_if_permit requested"),
        ],
    ),
    "end-of-data": (
        "smtpd_end_of_data_restrictions = reject",
        [
            ("ehlo", "h.test", None),
            ("mail", "a@b.org", None),
            ("rcpt", "bob@example.org", None),
            ("confirm", "bob@example.org", None),
            ("data", None, None),
            ("eod", None, "554 5.7.1 <END-OF-MESSAGE>: End-of-data rejected: Access denied"),
        ],
    ),
    "multi-recipient-bounce-counts-confirmed-recipients": (
        "smtpd_data_restrictions = reject_multi_recipient_bounce",
        [
            ("ehlo", "h.test", None),
            ("mail", "", None),
            ("rcpt", "bob@example.org", None),
            ("confirm", "bob@example.org", None),
            ("rcpt", "carol@example.org", None),  # not confirmed: the backend refused it
            ("data", None, None),
            ("confirm", "carol@example.org", None),
            ("data", None, "550 5.5.3 <DATA>: Data command rejected: Multi-recipient bounce"),
            ("reset", None, None),
            ("mail", "", None),
            ("rcpt", "bob@example.org", None),
            ("confirm", "bob@example.org", None),
            ("data", None, None),
        ],
    ),
    "discard-skips-the-later-recipients-checks": (
        "smtpd_recipient_restrictions = check_recipient_access "
        "inline:{first@example.org=DISCARD}, reject_unauth_destination, reject",
        [
            ("ehlo", "h.test", None),
            ("mail", "a@b.org", None),
            ("rcpt", "first@example.org", None),
            ("rcpt", "bob@else.org", None),
            ("reset", None, None),
            ("mail", "a@b.org", None),
            ("rcpt", "bob@else.org", RELAY_DENIED),
        ],
    ),
    "relay-before-recipient-restrictions": (
        "smtpd_recipient_restrictions = reject",
        [
            ("mail", "a@b.org", None),
            ("rcpt", "bob@else.org", RELAY_DENIED),
        ],
    ),
    "recipient-before-relay-restrictions": (
        "smtpd_relay_before_recipient_restrictions = no\nsmtpd_recipient_restrictions = reject",
        [
            ("mail", "a@b.org", None),
            (
                "rcpt",
                "bob@else.org",
                "554 5.7.1 <bob@else.org>: Recipient address rejected: Access denied",
            ),
        ],
    ),
    "unlisted-recipient": (
        "relay_recipient_maps = inline:{bob@example.org=x}",
        [
            ("mail", "a@b.org", None),
            ("rcpt", "bob@example.org", None),
            (
                "rcpt",
                "carol@example.org",
                "550 5.1.1 <carol@example.org>: Recipient address "
                "rejected: User unknown in relay recipient table",
            ),
        ],
    ),
    "unlisted-sender": (
        "relay_recipient_maps = inline:{bob@example.org=x}\nsmtpd_reject_unlisted_sender = yes",
        [
            ("mail", "carol@example.org", None),
            (
                "rcpt",
                "bob@example.org",
                "550 5.1.0 <carol@example.org>: Sender address "
                "rejected: User unknown in relay recipient table",
            ),
        ],
    ),
}


@pytest.mark.parametrize(("text", "script"), SCRIPTS.values(), ids=SCRIPTS.keys())
def test_script(make_plan: MakePlan, text: str, script: list[tuple[str, Any, str | None]]):
    session = PolicySession(make_plan(text), CLIENT)
    assert play(session, script) == script


# -- the facts a session keeps -----------------------------------------------------------


def test_rcpt_count_is_what_the_backend_accepted(make_plan: MakePlan):
    session = PolicySession(make_plan(""), CLIENT)
    state = session.state
    play(session, [("ehlo", "h.test", None), ("mail", "a@b.org", None)])
    play(session, [("rcpt", "bob@example.org", None), ("rcpt", "carol@example.org", None)])
    assert (state.rcpt_count, state.first_recipient) == (0, None)
    session.confirm_rcpt("carol@example.org")
    session.confirm_rcpt("bob@example.org")
    assert (state.rcpt_count, state.first_recipient) == (2, "carol@example.org")
    session.reset()
    assert (state.rcpt_count, state.first_recipient, state.sender) == (0, None, None)


def test_reset_ends_every_transaction_fact(make_plan: MakePlan):
    plan = make_plan(
        "smtpd_sender_restrictions = check_sender_access inline:{a@b.org=HOLD}, "
        "check_sender_access inline:{{a@b.org=PREPEND X-A: b}}"
    )
    session = PolicySession(plan, CLIENT)
    play(session, [("ehlo", "h.test", None), ("mail", "a@b.org", None)])
    play(session, [("rcpt", "bob@example.org", None), ("confirm", "bob@example.org", None)])
    state = session.state
    state.queue_id = "4ABC"
    state.discard = True
    assert state.queue_actions == [("HOLD", "")] and state.prepend == ["X-A: b"]
    session.reset()
    assert (state.sender, state.recipient, state.rcpt_count, state.first_recipient) == (
        None,
        None,
        0,
        None,
    )
    assert (state.discard, state.queue_id, state.queue_actions, state.prepend) == (
        False,
        None,
        [],
        [],
    )
    assert state.helo_name == "h.test" and state.protocol == "ESMTP"


def test_helo_keeps_a_header_safe_name(make_plan: MakePlan):
    session = PolicySession(make_plan(""), CLIENT)
    play(session, [("helo", "a\x01b.test", None)])
    assert (session.state.helo_name, session.state.protocol) == ("a?b.test", "SMTP")


def test_decisions_carry_the_stage_and_the_log_line(make_plan: MakePlan):
    plan = make_plan("smtpd_recipient_restrictions = reject")
    session = PolicySession(plan, CLIENT)

    async def run() -> list[Decision]:
        return [
            await session.helo("h.test", esmtp=True),
            await session.mail("a@b.org"),
            await session.rcpt("bob@example.org"),
        ]

    helo, mail, rcpt = asyncio.run(run())
    assert [d.stage for d in (helo, mail, rcpt)] == [Stage.HELO, Stage.MAIL, Stage.RCPT]
    assert helo.accepted and mail.accepted and not rcpt.accepted and not rcpt.disconnect
    assert [log.text for log in rcpt.logs] == [
        f"NOQUEUE: reject: RCPT from {NAMADDR}: 554 5.7.1 <bob@example.org>: Recipient address "
        "rejected: Access denied; from=<a@b.org> to=<bob@example.org> proto=ESMTP helo=<h.test>"
    ]
    # the recipient is the current command's only: later stages do not name it
    assert session.state.recipient is None


def test_data_names_the_single_recipient_in_its_log_line(make_plan: MakePlan):
    session = PolicySession(make_plan("smtpd_data_restrictions = reject"), CLIENT)
    play(session, [("helo", "h.test", None), ("mail", "a@b.org", None)])
    play(session, [("rcpt", "bob@example.org", None), ("confirm", "bob@example.org", None)])
    decision = asyncio.run(session.data())
    assert [log.text for log in decision.logs] == [
        f"NOQUEUE: reject: DATA from {NAMADDR}: 554 5.7.1 <DATA>: Data command rejected: Access "
        "denied; from=<a@b.org> to=<bob@example.org> proto=SMTP helo=<h.test>"
    ]
    assert session.state.recipient is None


def test_data_names_no_recipient_when_there_are_several(make_plan: MakePlan):
    session = PolicySession(make_plan("smtpd_data_restrictions = reject"), CLIENT)
    play(session, [("helo", "h.test", None), ("mail", "a@b.org", None)])
    for rcpt in ("bob@example.org", "carol@example.org"):
        play(session, [("rcpt", rcpt, None), ("confirm", rcpt, None)])
    decision = asyncio.run(session.data())
    assert [log.text for log in decision.logs] == [
        f"NOQUEUE: reject: DATA from {NAMADDR}: 554 5.7.1 <DATA>: Data command rejected: Access "
        "denied; from=<a@b.org> proto=SMTP helo=<h.test>"
    ]


def test_delay_reject_no_connect_reject_closes_with_421(make_plan: MakePlan):
    plan = make_plan(
        "smtpd_delay_reject = no\nsmtpd_client_restrictions = check_client_access "
        "inline:{{192.0.2.1=421 go away}}"
    )
    decision = asyncio.run(PolicySession(plan, CLIENT).connect())
    assert decision.disconnect
    assert str(decision.reply) == f"421 4.7.1 <{NAMADDR}>: Client host rejected: go away"


def test_an_untraced_session_keeps_no_trail(make_plan: MakePlan):
    plan = make_plan("smtpd_recipient_restrictions = permit_mynetworks, reject")
    traced = PolicySession(plan, CLIENT)
    untraced = PolicySession(plan, CLIENT, trace=False)
    script = [("mail", "a@b.org", None), ("rcpt", "bob@example.org", None)]
    assert play(traced, script) == play(untraced, script)
    assert asyncio.run(untraced.rcpt("carol@example.org")).steps == []
    assert asyncio.run(traced.rcpt("carol@example.org")).steps != []
