"""MilterSession against the real milters from Debian: rspamd, clamav-milter, opendkim.

Each daemon runs on loopback with its own folders (``daemons.py``, ``conftest.py``); the
tests drive a whole session (connect, HELO, MAIL, RCPT, DATA, message) as smtpd would and
check the verdicts and the edited message.
"""

from __future__ import annotations

import email
import email.policy

import pytest

from smtpgate.config.milterconf import MilterConfig
from smtpgate.milter.client import MessageResult, Milters, MilterSession, Verdict
from tests.milter.conftest import EICAR_LIKE
from tests.milter.daemons import Daemon, OpenDkim, gtube
from tests.milter.test_client import Log, spec

pytestmark = pytest.mark.timeout(240)

MACROS = {
    "j": "mx.smtpgate.test",
    "{daemon_addr}": "127.0.0.1",
    "_": "mail.example.org [192.0.2.10]",
    "{client_addr}": "192.0.2.10",
    "{client_name}": "mail.example.org",
    "i": "5F00D1234A",
    "{mail_addr}": "sender@example.org",
    "{rcpt_addr}": "rcpt@example.net",
}


def message(body: str, subject: str = "test") -> bytes:
    return (
        "From: Sender <sender@example.org>\r\n"
        "To: rcpt@example.net\r\n"
        f"Subject: {subject}\r\n"
        "Message-ID: <20240101000000.1@example.org>\r\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        f"{body}\r\n"
    ).encode()


def session(*daemons: Daemon, log: Log | None = None) -> MilterSession:
    specs = tuple(spec(d.endpoint, command=30, content=60) for d in daemons)
    config = MilterConfig(milters=specs, daemon_name="mx.smtpgate.test", v="Postfix 3.7.11")
    return Milters(config, log or Log()).session()


async def deliver(
    s: MilterSession, content: bytes, *, connect: bool = True
) -> tuple[list[Verdict], MessageResult]:
    """The session's first message (``connect``), or the next one."""
    verdicts = []
    if connect:
        verdicts = [
            await s.connect(MACROS, "mail.example.org", "192.0.2.10", 45678, "inet"),
            await s.helo(MACROS, "mail.example.org"),
        ]
    verdicts += [
        await s.mail(MACROS, "sender@example.org", []),
        await s.rcpt(MACROS, "rcpt@example.net", []),
        await s.data(MACROS),
    ]
    result = await s.message(MACROS, content)
    await s.abort()
    return verdicts, result


def headers(content: bytes) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


# --- rspamd ----------------------------------------------------------------------------


async def test_rspamd_rejects_gtube(rspamd_milter: Daemon) -> None:
    s = session(rspamd_milter)
    verdicts, result = await deliver(s, message(gtube("reject")))
    await s.close()
    assert {v.action for v in verdicts} <= {"continue"}
    assert result.verdict == Verdict(
        "reject", 554, "5.7.1", "Gtube pattern", rspamd_milter.endpoint
    )
    assert str(result.verdict.reply()) == "554 5.7.1 Gtube pattern"


async def test_rspamd_adds_a_header(rspamd_milter: Daemon) -> None:
    s = session(rspamd_milter)
    _, result = await deliver(s, message(gtube("add header")))
    await s.close()
    assert result.verdict.action == "continue"
    assert headers(result.content)["X-Spam"] == "Yes"
    assert result.content.endswith(b"\r\n\r\n" + gtube("add header").encode() + b"\r\n")


async def test_rspamd_rewrites_the_subject(rspamd_milter: Daemon) -> None:
    s = session(rspamd_milter)
    _, result = await deliver(s, message(gtube("rewrite subject"), subject="hello"))
    await s.close()
    assert result.verdict.action == "continue"
    assert headers(result.content)["Subject"] == "*** SPAM *** hello"
    assert result.content.count(b"Subject:") == 1


async def test_rspamd_passes_clean_mail_unchanged(rspamd_milter: Daemon) -> None:
    s = session(rspamd_milter)
    content = message("Hello, this is an ordinary message.\r\nSee you.")
    _, result = await deliver(s, content)
    await s.close()
    assert result.verdict.action == "continue"
    assert b"X-Spam: Yes" not in result.content
    assert result.content.endswith(b"\r\n\r\nHello, this is an ordinary message.\r\nSee you.\r\n")


async def test_several_messages_in_one_session(rspamd_milter: Daemon) -> None:
    s = session(rspamd_milter)
    _, first = await deliver(s, message(gtube("reject")))
    second = [
        (await deliver(s, message(body), connect=False))[1]
        for body in (gtube("add header"), "plain")
    ]
    await s.close()
    assert first.verdict.code == 554
    assert [r.verdict.action for r in second] == ["continue", "continue"]
    assert headers(second[0].content)["X-Spam"] == "Yes"
    assert headers(second[1].content)["X-Spam"] is None


# --- ClamAV ----------------------------------------------------------------------------


async def test_clamav_rejects_an_infected_message(clamav_milter: Daemon) -> None:
    s = session(clamav_milter)
    _, result = await deliver(s, message("look: " + EICAR_LIKE.decode() + " here"))
    await s.close()
    assert result.verdict == Verdict(
        "reject", 550, "5.7.1", "Command rejected", clamav_milter.endpoint
    )
    assert headers(result.content)["X-Virus-Status"].startswith("Infected (Smtpgate.Test.Sig")


async def test_clamav_passes_a_clean_message_with_its_header(clamav_milter: Daemon) -> None:
    s = session(clamav_milter)
    _, result = await deliver(s, message("nothing to see"))
    await s.close()
    assert result.verdict.action == "continue"
    assert headers(result.content)["X-Virus-Status"] == "Clean"
    assert headers(result.content)["X-Virus-Scanned"].startswith("clamav-milter")


# --- OpenDKIM --------------------------------------------------------------------------


async def test_opendkim_signs_and_the_next_milter_verifies(
    dkim_signer: OpenDkim, dkim_verifier: OpenDkim
) -> None:
    # One session, signer first: the verifier sees the signature the signer inserted.
    s = session(dkim_signer, dkim_verifier)
    _, result = await deliver(s, message("signed content"))
    await s.close()
    assert result.verdict.action == "continue"
    parsed = headers(result.content)
    signature = parsed["DKIM-Signature"]
    assert signature is not None and "d=example.org" in signature and "s=test" in signature
    # opendkim inserts its signature at the top (SMFIR_INSHEADER 0), above our headers.
    assert result.content.startswith((b"DKIM-Signature:", b"Authentication-Results:"))
    results = parsed["Authentication-Results"]
    assert "dkim=pass" in results and "header.d=example.org" in results


async def test_opendkim_fails_a_changed_message(
    dkim_signer: OpenDkim, dkim_verifier: OpenDkim
) -> None:
    signer = session(dkim_signer)
    _, signed = await deliver(signer, message("original body"))
    await signer.close()
    tampered = signed.content.replace(b"original body", b"changed body")
    verifier = session(dkim_verifier)
    _, result = await deliver(verifier, tampered)
    await verifier.close()
    assert result.verdict.action == "continue"
    assert "dkim=fail" in headers(result.content)["Authentication-Results"]


async def test_three_milters_in_order(
    rspamd_milter: Daemon, clamav_milter: Daemon, dkim_signer: OpenDkim
) -> None:
    s = session(rspamd_milter, clamav_milter, dkim_signer)
    _, marked = await deliver(s, message(gtube("add header")))
    _, infected = await deliver(s, message(EICAR_LIKE.decode()), connect=False)
    await s.close()
    parsed = headers(marked.content)
    assert marked.verdict.action == "continue"
    assert (parsed["X-Spam"], parsed["X-Virus-Status"]) == ("Yes", "Clean")
    assert parsed["DKIM-Signature"] is not None
    # ClamAV rejects: the round ends there, opendkim does not sign.
    assert infected.verdict.milter == clamav_milter.endpoint and infected.verdict.code == 550
    assert b"DKIM-Signature" not in infected.content
