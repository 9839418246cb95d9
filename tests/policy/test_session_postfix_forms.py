"""PolicySession against Postfix 3.7 transcripts (docs/postfix-behaviour.md), without sockets.

Each expected reply and log line below was read off a real Postfix 3.7.11 session; the
section of docs/postfix-behaviour.md is named in each test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgate.config import parse_settings
from smtpgate.policy.address import quote_822_local
from smtpgate.policy.model import ClientInfo, Stage
from smtpgate.policy.plan import Plan, build_plan
from smtpgate.policy.session import PolicySession

CLIENT = ClientInfo("127.0.0.2")
BASE = """\
compatibility_level = 3.6
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
"""


def plan(main_cf: str, tmp_path: Path) -> Plan:
    settings, _ = parse_settings(
        BASE + main_cf, str(tmp_path / "main.cf"), hostname="mx.example.org"
    )
    built, diagnostics = build_plan(settings, strict_tables=False)
    assert built is not None, [str(d) for d in diagnostics]
    return built


def session(main_cf: str, tmp_path: Path) -> PolicySession:
    return PolicySession(plan(main_cf, tmp_path), CLIENT)


def logs(decision) -> list[str]:
    return [r.text for r in decision.logs if r.level == "info"]


def reply(decision) -> str | None:
    return None if decision.reply is None else " ".join(decision.reply.lines())


# -- 5. from=<> / to=<> in Postfix's external form ---------------------------------------


@pytest.mark.parametrize(
    ("internal", "external"),
    [
        ("a b@x.org", '"a b"@x.org'),
        ("a@b@x.org", '"a@b"@x.org'),
        ("a.@x.org", '"a."@x.org'),
        ('a"b@x.org', '"a\\"b"@x.org'),
        ("ab@x.org", "ab@x.org"),
        ("a.b@x.org", "a.b@x.org"),
        (".a@x.org", '".a"@x.org'),
        ("a..b@x.org", '"a..b"@x.org'),
        ("a\\b@x.org", '"a\\\\b"@x.org'),
        ("jos\u00e9@x.org", "jos\u00e9@x.org"),
        ("postmaster", "postmaster"),
        ("", ""),
    ],
)
def test_quote_822_local(internal: str, external: str) -> None:
    assert quote_822_local(internal) == external


@pytest.mark.parametrize(
    ("sender", "shown"),
    [
        ("a b@x.org", '"a b"@x.org'),
        ("a@b@x.org", '"a@b"@x.org'),
        ("a.@x.org", '"a."@x.org'),
        ('a"b@x.org', '"a\\"b"@x.org'),
        ("ab@x.org", "ab@x.org"),
    ],
)
async def test_reject_log_quotes_the_sender_reply_does_not(
    sender: str, shown: str, tmp_path: Path
) -> None:
    s = session(
        "smtpd_sender_restrictions = check_sender_access inline:{ x.org=REJECT }\n", tmp_path
    )
    await s.helo("client.example.net", esmtp=True)
    assert (await s.mail(sender)).reply is None
    d = await s.rcpt("bob@bar.org")
    assert reply(d) == f"554 5.7.1 <{sender}>: Sender address rejected: Access denied"
    assert logs(d) == [
        f"NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1 <{sender}>: Sender address "
        f"rejected: Access denied; from=<{shown}> to=<bob@bar.org> proto=ESMTP "
        "helo=<client.example.net>"
    ]


async def test_relay_denied_log_quotes_the_recipient(tmp_path: Path) -> None:
    s = session("", tmp_path)
    await s.helo("client.example.net", esmtp=True)
    await s.mail("s p@example.net")
    d = await s.rcpt("a.@other.org")
    assert reply(d) == "454 4.7.1 <a.@other.org>: Relay access denied"
    assert logs(d) == [
        "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 454 4.7.1 <a.@other.org>: Relay access "
        'denied; from=<"s p"@example.net> to=<"a."@other.org> proto=ESMTP '
        "helo=<client.example.net>"
    ]


async def test_null_sender_logs_empty_brackets(tmp_path: Path) -> None:
    s = session("", tmp_path)
    await s.helo("client.example.net", esmtp=True)
    await s.mail("")
    d = await s.rcpt("x@other.org")
    assert logs(d)[0].endswith("; from=<> to=<x@other.org> proto=ESMTP helo=<client.example.net>")


async def test_discard_logged_once_with_quoted_addresses(tmp_path: Path) -> None:
    """Postfix logs the first DISCARD of a transaction; later recipients are not checked."""
    s = session(
        "smtpd_recipient_restrictions = check_recipient_access "
        "inline:{ {d q@bar.org=DISCARD} {disc@bar.org=DISCARD} }, permit\n",
        tmp_path,
    )
    await s.helo("client.example.net", esmtp=True)
    await s.mail("s p@example.net")
    first = await s.rcpt("d q@bar.org")
    assert first.reply is None
    assert logs(first) == [
        "NOQUEUE: discard: RCPT from unknown[127.0.0.2]: <d q@bar.org>: Recipient address "
        'triggers DISCARD action; from=<"s p"@example.net> to=<"d q"@bar.org> proto=ESMTP '
        "helo=<client.example.net>"
    ]
    second = await s.rcpt("disc@bar.org")
    assert second.reply is None and logs(second) == []


# -- 1. smtpd_delay_reject = no ------------------------------------------------------------

CLIENT_REJECT = "smtpd_client_restrictions = check_client_access inline:{ 127.0.0.2=REJECT }\n"


async def test_connect_reject_is_the_greeting_then_503_for_all_but_quit(tmp_path: Path) -> None:
    s = session("smtpd_delay_reject = no\n" + CLIENT_REJECT, tmp_path)
    d = await s.connect()
    assert reply(d) == "554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied"
    assert d.reply is not None and not d.reply.disconnect
    assert logs(d) == [
        "NOQUEUE: reject: CONNECT from unknown[127.0.0.2]: 554 5.7.1 <unknown[127.0.0.2]>: "
        "Client host rejected: Access denied; proto=SMTP"
    ]
    denied = "503 5.7.0 Error: access denied for unknown[127.0.0.2]"
    for verb in "HELO EHLO MAIL RCPT DATA BDAT RSET NOOP VRFY ETRN STARTTLS AUTH FOO".split():
        r = s.access_denied(verb)
        assert r is not None and " ".join(r.lines()) == denied
    assert s.access_denied("QUIT") is None
    assert reply(await s.helo("client.example.net", esmtp=True)) == denied
    assert reply(await s.mail("a@example.net")) == denied
    assert reply(await s.rcpt("bob@bar.org")) == denied
    assert reply(await s.etrn("bar.org")) == denied


async def test_connect_passes_nothing_denied(tmp_path: Path) -> None:
    s = session("smtpd_delay_reject = no\n", tmp_path)
    d = await s.connect()
    assert d.reply is None
    assert s.access_denied("NOOP") is None


HELO_REJECT = (
    "smtpd_delay_reject = no\n"
    "smtpd_helo_restrictions = check_helo_access inline:{ bad.example=REJECT }\n"
)


async def test_rejected_ehlo_logs_the_old_protocol(tmp_path: Path) -> None:
    """Postfix: 'NOQUEUE: reject: EHLO from ...; proto=SMTP helo=<bad.example>'."""
    s = session(HELO_REJECT, tmp_path)
    d = await s.helo("bad.example", esmtp=True)
    assert reply(d) == "554 5.7.1 <bad.example>: Helo command rejected: Access denied"
    assert logs(d) == [
        "NOQUEUE: reject: EHLO from unknown[127.0.0.2]: 554 5.7.1 <bad.example>: Helo command "
        "rejected: Access denied; proto=SMTP helo=<bad.example>"
    ]
    assert s.state.protocol == "SMTP" and s.state.helo_name is None
    # Later MAIL and RCPT pass (no HELO name kept, smtpd_helo_required = no).
    assert (await s.mail("sender@example.net")).reply is None
    assert (await s.rcpt("bob@bar.org")).reply is None


async def test_rejected_ehlo_keeps_the_transaction(tmp_path: Path) -> None:
    s = session(HELO_REJECT, tmp_path)
    await s.helo("client.example.net", esmtp=True)
    await s.mail("sender@example.net")
    d = await s.helo("bad.example", esmtp=True)
    assert d.reply is not None
    assert logs(d)[0].endswith("from=<sender@example.net> proto=ESMTP helo=<bad.example>")
    assert s.state.sender == "sender@example.net"
    assert s.state.helo_name == "client.example.net"


async def test_helo_after_ehlo_keeps_esmtp(tmp_path: Path) -> None:
    s = session(
        "smtpd_sender_restrictions = check_sender_access inline:{ x.org=REJECT }\n", tmp_path
    )
    await s.helo("one.example", esmtp=True)
    await s.helo("two.example", esmtp=False)
    await s.mail("a@x.org")
    d = await s.rcpt("bob@bar.org")
    assert logs(d)[0].endswith("proto=ESMTP helo=<two.example>")


async def test_helo_then_ehlo_is_esmtp(tmp_path: Path) -> None:
    s = session("", tmp_path)
    await s.helo("one.example", esmtp=False)
    assert s.state.protocol == "SMTP"
    await s.helo("two.example", esmtp=True)
    assert s.state.protocol == "ESMTP"


# -- 2. ETRN -------------------------------------------------------------------------------


async def test_etrn_client_restrictions_run_first(tmp_path: Path) -> None:
    s = session(CLIENT_REJECT, tmp_path)
    await s.helo("client.example.net", esmtp=True)
    d = await s.etrn("bar.org")
    assert d.stage is Stage.ETRN
    assert reply(d) == "554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied"
    assert logs(d) == [
        "NOQUEUE: reject: ETRN from unknown[127.0.0.2]: 554 5.7.1 <unknown[127.0.0.2]>: Client "
        "host rejected: Access denied; proto=ESMTP helo=<client.example.net>"
    ]


async def test_etrn_before_helo_logs_no_helo(tmp_path: Path) -> None:
    s = session(CLIENT_REJECT, tmp_path)
    d = await s.etrn("bar.org")
    assert logs(d) == [
        "NOQUEUE: reject: ETRN from unknown[127.0.0.2]: 554 5.7.1 <unknown[127.0.0.2]>: Client "
        "host rejected: Access denied; proto=SMTP"
    ]


async def test_etrn_helo_restrictions_run_too(tmp_path: Path) -> None:
    s = session(
        "smtpd_helo_restrictions = check_helo_access inline:{ bad.example=REJECT }\n", tmp_path
    )
    await s.helo("bad.example", esmtp=True)
    d = await s.etrn("example.org")
    assert reply(d) == "554 5.7.1 <bad.example>: Helo command rejected: Access denied"


async def test_etrn_restrictions(tmp_path: Path) -> None:
    s = session(
        "smtpd_etrn_restrictions = check_etrn_access inline:{ example.org=REJECT bar.org=OK }, "
        "check_client_access inline:{ 127.0.0.2=REJECT }\n",
        tmp_path,
    )
    await s.helo("client.example.net", esmtp=True)
    d = await s.etrn("example.org")
    assert reply(d) == "554 5.7.1 <example.org>: Etrn command rejected: Access denied"
    assert logs(d) == [
        "NOQUEUE: reject: ETRN from unknown[127.0.0.2]: 554 5.7.1 <example.org>: Etrn command "
        "rejected: Access denied; proto=ESMTP helo=<client.example.net>"
    ]
    assert (await s.etrn("bar.org")).reply is None  # OK ends the list
    d = await s.etrn("other.org")
    assert reply(d) == "554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied"
    assert s.state.etrn_name is None


async def test_etrn_access_matches_parent_domains_and_bare_tables(tmp_path: Path) -> None:
    s = session("smtpd_etrn_restrictions = inline:{ example.org=REJECT }\n", tmp_path)
    assert reply(await s.etrn("sub.example.org")) == (
        "554 5.7.1 <sub.example.org>: Etrn command rejected: Access denied"
    )


async def test_etrn_delay_reject_no_runs_only_etrn_restrictions(tmp_path: Path) -> None:
    s = session(
        "smtpd_delay_reject = no\n"
        "smtpd_helo_restrictions = check_helo_access inline:{ bad.example=REJECT }\n",
        tmp_path,
    )
    await s.helo("good.example", esmtp=True)
    assert (await s.etrn("bar.org")).reply is None


async def test_etrn_passes_without_restrictions(tmp_path: Path) -> None:
    s = session("", tmp_path)
    d = await s.etrn("bar.org")
    assert d.reply is None and logs(d) == []


# -- 4. reject_unauth_pipelining: a sticky session flag -------------------------------------


async def test_unauth_pipelining_flag_is_sticky(tmp_path: Path) -> None:
    """HELO and MAIL in one write; RCPT alone later is still refused (Postfix >= 2.6)."""
    s = session("smtpd_client_restrictions = reject_unauth_pipelining\n", tmp_path)
    await s.helo("a.example")
    s.state.illegal_pipelining = True  # the SMTP layer saw MAIL pipelined after HELO
    await s.mail("a@example.net")
    s.state.input_pending = False
    d = await s.rcpt("bob@bar.org")
    assert reply(d) == (
        "503 5.5.0 <unknown[127.0.0.2]>: Client host rejected: Improper use of SMTP command "
        "pipelining"
    )
    assert logs(d) == [
        "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 503 5.5.0 <unknown[127.0.0.2]>: Client "
        "host rejected: Improper use of SMTP command pipelining; from=<a@example.net> "
        "to=<bob@bar.org> proto=SMTP helo=<a.example>"
    ]


async def test_unauth_pipelining_data_stage(tmp_path: Path) -> None:
    s = session("smtpd_data_restrictions = reject_unauth_pipelining\n", tmp_path)
    await s.helo("client.example.net")
    s.state.illegal_pipelining = True
    await s.mail("a@example.net")
    await s.rcpt("bob@bar.org")
    s.confirm_rcpt("bob@bar.org")
    d = await s.data()
    assert reply(d) == (
        "503 5.5.0 <DATA>: Data command rejected: Improper use of SMTP command pipelining"
    )
    assert logs(d) == [
        "NOQUEUE: reject: DATA from unknown[127.0.0.2]: 503 5.5.0 <DATA>: Data command "
        "rejected: Improper use of SMTP command pipelining; from=<a@example.net> "
        "to=<bob@bar.org> proto=SMTP helo=<client.example.net>"
    ]
