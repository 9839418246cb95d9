"""Backend faults, refused content and smuggling through the whole server.

client (LineClient) -> smtpgate (Server on 127.0.0.1) -> RecordingBackend, real sockets.
Every case of reliability.md section 6 is played and checked against the lock-step
invariant (:func:`assert_invariant`): the client got 250 for its dot only if the backend
stored the message, and the backend never stored a message the client got 4xx/5xx for,
except in the window after the dot was sent and before the backend replied (there a
duplicate is acceptable, a loss is not, and smtpgate logs the unknown outcome).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smtpgate.relay import Transaction
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import Gate, running_gate

MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_proxy_timeout = 1s
smtp_connect_timeout = 2s
"""
R451 = ["451 4.3.0 Error: queue file write error"]
BODY = b"From: a@example.net\r\nSubject: fault\r\n\r\nbody line\r\n"
UNKNOWN_OUTCOME = re.compile(
    r"postfix/smtpd\[\d+\]: warning: [0-9A-F]{10}: backend connection lost after the end of data: "
    r"the message may have been delivered; the client was told 451"
)


async def start(gate: Gate, sender: str = "a@example.net") -> LineClient:
    c = await gate.connect()
    assert (await c.cmd("EHLO client.example"))[0] == "250-mx.example.org"
    assert await c.cmd(f"MAIL FROM:<{sender}>") == ["250 2.1.0 Ok"]
    return c


async def send_body(c: LineClient, body: bytes = BODY) -> list[str]:
    """DATA, the body (already CRLF-framed, without the dot), the dot: the final reply."""
    assert await c.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    await c.send_raw(body + b".\r\n")
    return await c.reply()


def assert_invariant(final: list[str] | None, backend: RecordingBackend, after_dot: bool = False):
    """The lock-step promise for one transaction (``final``: the reply to the dot)."""
    stored = len(backend.messages)
    assert stored <= 1, "a transaction was stored twice"
    if final is not None and final[0].startswith("250"):
        assert stored == 1, "client got 250 but nothing was stored"
        assert final[0].endswith(backend.messages[0].queue_id), "250 is not the backend's 250"
    elif not after_dot:
        assert stored == 0, f"client got {final} but the backend stored the message"
    assert not any("Traceback" in line or "127.0.0.1" in line for line in final or [])


def commands(backend: RecordingBackend) -> list[str]:
    return [cmd for conn in backend.connections for cmd in conn.commands]


# -- backend faults (reliability.md section 6) -------------------------------------------------


async def test_backend_down(tmp_path: Path):
    async with RecordingBackend(down=True) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<foo@bar.org>") == R451
            assert await c.cmd("RCPT TO:<other@bar.org>") == R451
            assert await c.cmd("DATA") == ["554 5.5.1 Error: no valid recipients"]
            assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
            log = gate.log
    assert backend.messages == []
    assert "warning:" in log  # the detail is logged, never sent to the client


async def test_per_recipient_replies_pass_through(tmp_path: Path):
    rcpt_replies = {
        "bad@bar.org": "550 5.1.1 <bad@bar.org>: Recipient address rejected: User unknown",
        "full@bar.org": "452 4.2.2 <full@bar.org>: Mailbox full",
        "later@bar.org": "450 4.2.0 <later@bar.org>: Recipient address rejected: Greylisted",
    }
    async with RecordingBackend(rcpt_replies=rcpt_replies) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<good@bar.org>") == ["250 2.1.5 Ok"]
            for address, reply in rcpt_replies.items():
                assert await c.cmd(f"RCPT TO:<{address}>") == [reply]
            assert await c.cmd("RCPT TO:<second@bar.org>") == ["250 2.1.5 Ok"]
            final = await send_body(c)
            log = gate.log
    assert_invariant(final, backend)
    [message] = backend.messages
    assert message.rcpt_tos == ["good@bar.org", "second@bar.org"]
    assert "proxy-reject: RCPT from unknown[127.0.0.2]: 550 5.1.1 <bad@bar.org>" in log


async def test_all_recipients_refused_by_backend(tmp_path: Path):
    replies = {"RCPT": "550 5.1.1 User unknown"}
    async with RecordingBackend(replies=replies) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["550 5.1.1 User unknown"]
            assert (await c.cmd("DATA"))[0].startswith("554 5.5.1")
    assert backend.messages == []
    assert "DATA" not in commands(backend)


async def test_backend_refuses_mail_from(tmp_path: Path):
    replies = {"MAIL": "553 5.7.1 <a@example.net>: Sender address rejected: not owned"}
    async with RecordingBackend(replies=replies) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<foo@bar.org>") == [replies["MAIL"]]
            assert (await c.cmd("DATA"))[0][:3] in ("503", "554")
    assert backend.messages == []


@pytest.mark.parametrize(
    "reply", ["554 5.7.1 Message rejected as spam", "451 4.3.0 Temporary content scanner failure"]
)
async def test_final_dot_refused(tmp_path: Path, reply: str):
    async with RecordingBackend(replies={"DOT": reply}) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            final = await send_body(c)
            # the session goes on: a new transaction is possible
            assert await c.cmd("MAIL FROM:<b@example.net>") == ["250 2.1.0 Ok"]
            log = gate.log
    assert final == [reply]
    assert_invariant(final, backend)
    assert backend.messages == []
    assert f"proxy-reject: END-OF-MESSAGE from unknown[127.0.0.2]: {reply};" in log


@pytest.mark.parametrize("stage", ["DATA", "CONTENT"])
async def test_backend_closes_before_the_dot(tmp_path: Path, stage: str):
    async with RecordingBackend(close_at={stage}) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            final = await send_body(c, BODY + b"second line\r\nthird line\r\n")
    assert final == R451
    assert_invariant(final, backend)


async def test_backend_closes_after_the_dot(tmp_path: Path):
    async with RecordingBackend(close_at={"DOT"}) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            final = await send_body(c)
            log = gate.log
    assert final == R451
    assert_invariant(final, backend, after_dot=True)
    assert len(backend.messages) == 1  # the backend kept it: a possible duplicate, no loss
    assert UNKNOWN_OUTCOME.search(log), log


async def test_slow_backend_at_rcpt(tmp_path: Path):
    async with RecordingBackend(delays={"RCPT": 5}) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<foo@bar.org>") == R451
            assert (await c.cmd("DATA"))[0][:3] in ("503", "554")
            log = gate.log
    assert backend.messages == []
    assert "timeout" in log


async def test_slow_backend_at_the_dot(tmp_path: Path):
    async with RecordingBackend(delays={"DOT": 5}) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            final = await send_body(c)
            log = gate.log
    assert final == R451
    assert_invariant(final, backend, after_dot=True)
    assert UNKNOWN_OUTCOME.search(log), log


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
async def test_garbled_reply_before_the_dot(tmp_path: Path, stage: str):
    async with RecordingBackend(garbled={stage}) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            rcpt = await c.cmd("RCPT TO:<foo@bar.org>")
            if stage == "DATA":
                assert rcpt == ["250 2.1.5 Ok"]
                final: list[str] | None = await send_body(c)
                assert final == R451
            else:
                assert rcpt == R451
                final = None
    assert_invariant(final, backend)
    assert backend.messages == []


async def test_garbled_reply_to_the_dot(tmp_path: Path):
    async with RecordingBackend(garbled={"DOT"}) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate)
            await c.cmd("RCPT TO:<foo@bar.org>")
            final = await send_body(c)
    assert final == R451
    assert_invariant(final, backend, after_dot=True)


async def test_backend_421_mid_session_then_next_transaction_works(tmp_path: Path):
    async with RecordingBackend(replies={"RCPT": "421 4.3.2 backend.test shutting down"}) as b:
        async with running_gate(tmp_path, MAIN_CF, b) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<foo@bar.org>") == R451  # 421 is not passed through
            assert await c.cmd("RCPT TO:<other@bar.org>") == R451
            assert await c.cmd("RSET") == ["250 2.0.0 Ok"]
            await b.wait_for(lambda: b.connections[0].closed)
            b.replies.clear()
            assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            final = await send_body(c)
    assert_invariant(final, b)
    assert final[0].startswith("250 ")
    assert len(b.connections) == 2, "the connection that said 421 must not be reused"
    assert b.messages[0].connection == 1


async def test_backend_421_to_the_dot(tmp_path: Path):
    async with RecordingBackend(replies={"DOT": "421 4.3.2 backend.test shutting down"}) as b:
        async with running_gate(tmp_path, MAIN_CF, b) as gate:
            c = await start(gate)
            await c.cmd("RCPT TO:<foo@bar.org>")
            final = await send_body(c)
            b.replies.clear()
            assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            again = await send_body(c)
    assert final[0][:1] == "4" and final[0][:3] != "421", final  # no disconnect of our client
    assert again[0].startswith("250 ")
    assert len(b.messages) == 1 and len(b.connections) == 2


# -- content that smtpgate refuses: never completed at the backend -----------------------------


async def refused_content(
    tmp_path: Path, body: bytes, overrides: tuple[str, ...] = ()
) -> tuple[list[str], RecordingBackend]:
    async with RecordingBackend() as backend:
        async with running_gate(tmp_path, MAIN_CF, backend, overrides=overrides) as gate:
            c = await start(gate)
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            final = await send_body(c, body)
            # the session survives and the next message goes through
            assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            ok = await send_body(c)
            assert ok[0].startswith("250 ")
    [message] = backend.messages  # only the second one
    assert message.content.endswith(BODY)
    first = backend.connections[0].commands
    cut = first.index("DATA") if "DATA" in first else len(first)
    # the first transaction was closed with RSET (or the connection), never with DATA/dot
    assert "RSET" in first[:cut] or backend.connections[0].closed
    assert len([m for m in backend.messages if m.content.endswith(BODY)]) == 1
    return final, backend


async def test_bare_lf_rejected(tmp_path: Path):
    final, backend = await refused_content(
        tmp_path,
        b"Subject: x\r\n\r\nbare\nline\r\n",
        overrides=("smtpd_forbid_bare_newline=reject",),
    )
    # Postfix 3.7's text names the host (docs/postfix-behaviour.md, point 3)
    assert final == ["550 5.5.2 mx.example.org Error: bare <LF> received"]


async def test_nul_in_data_rejected(tmp_path: Path):
    final, backend = await refused_content(tmp_path, b"Subject: x\r\n\r\nnul\x00here\r\n")
    assert final[0][:1] == "5", final


async def test_message_over_size_limit(tmp_path: Path):
    body = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    body *= 40
    final, backend = await refused_content(tmp_path, body, overrides=("message_size_limit=2000",))
    assert final == ["552 5.3.4 Message size exceeds fixed limit"]


async def test_size_parameter_over_limit_refused_at_mail(tmp_path: Path, backend: RecordingBackend):
    async with running_gate(
        tmp_path, MAIN_CF, backend, overrides=("message_size_limit=2000",)
    ) as g:
        c = await g.connect()
        ehlo = await c.cmd("EHLO client.example")
        assert "250-SIZE 2000" in ehlo
        assert await c.cmd("MAIL FROM:<a@example.net> SIZE=5000") == [
            "552 5.3.4 Message size exceeds fixed limit"
        ]
    assert backend.connections == []


# -- smuggling (reliability.md section 2.2) ----------------------------------------------------

SEQUENCES = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "LF.CR": b"\n.\r",
    "CR.LF": b"\r.\n",
    "NUL": b"\r\n\x00.\r\n",
    "CRLF.CRCRLF": b"\r\n.\r\r\n",
    "CRCRLF.CRCRLF": b"\r\r\n.\r\r\n",
}
SMUGGLED = (
    b"MAIL FROM:<ceo@bar.org>\r\n"
    b"RCPT TO:<foo@bar.org>\r\n"
    b"DATA\r\n"
    b"From: ceo@bar.org\r\nSubject: smuggled\r\n\r\npay the invoice\r\n"
)


@pytest.mark.parametrize("lenient", [False, True], ids=["strict-backend", "lenient-backend"])
@pytest.mark.parametrize("sequence", SEQUENCES.values(), ids=SEQUENCES.keys())
async def test_smuggling_never_makes_a_second_transaction(
    tmp_path: Path, sequence: bytes, lenient: bool
):
    """Exim's oracle: one message is good, two is bad; the sender is always the real one.

    A lenient backend ends DATA at a dot after a bare LF (pre-3.9 Postfix, sendmail): the
    victim smtpgate must protect by never writing a bare LF.
    """
    body = b"From: a@example.net\r\nSubject: carrier\r\n\r\nbefore" + sequence + SMUGGLED
    async with RecordingBackend(lenient_data_end=lenient) as backend:
        async with running_gate(tmp_path, MAIN_CF, backend) as gate:
            c = await start(gate, "a@example.net")
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            final = await send_body(c, body)
            # exactly one reply to the dot: the next reply belongs to our NOOP
            assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]
            assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
            log = await gate.wait_log("disconnect from unknown[127.0.0.2]")
    assert_invariant(final, backend)
    senders = [m.mail_from for m in backend.messages]
    assert "ceo@bar.org" not in senders
    assert [cmd for cmd in commands(backend) if cmd.startswith("MAIL")] == [
        "MAIL FROM:<a@example.net>"
    ]
    if b"\x00" in sequence:
        assert final[0][:1] == "5" and backend.messages == []  # NUL is refused outright
    else:
        assert final[0].startswith("250 ")
        [message] = backend.messages
        assert message.mail_from == "a@example.net"
        assert b"MAIL FROM:<ceo@bar.org>" in message.content  # carried as text, not run
        # a bare LF ends a line (CRLF on the wire); a lone CR goes out as a space (Postfix)
        assert re.search(rb"(?<!\r)\n|\r(?!\n)", message.raw) is None, "bare LF or CR"
        assert (b"\r\n" + message.raw).count(b"\r\n.\r\n") == 1, "a second end of data"
    assert "disconnect from unknown[127.0.0.2] ehlo=1 mail=1 rcpt=1 data=" in log
    assert "noop=1 quit=1 commands=" in log


async def test_client_disconnects_mid_data(tmp_path: Path, backend: RecordingBackend):
    async with running_gate(tmp_path, MAIN_CF, backend) as gate:
        c = await start(gate)
        assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
        assert (await c.cmd("DATA"))[0].startswith("354")
        await c.send_raw(b"Subject: cut\r\n\r\nhalf a message\r\n.")
        await c.close()
        # DATA went to the backend with the client's DATA (start_data); the client left
        # before its dot, so smtpgate closes the backend connection: no dot, no message.
        await backend.wait_for(lambda: backend.connections[0].closed)
    assert backend.messages == []
    assert commands(backend)[-1] == "DATA"


# -- internal errors ---------------------------------------------------------------------------


async def test_exception_inside_the_server_is_a_451_without_details(
    tmp_path: Path, backend: RecordingBackend, monkeypatch: pytest.MonkeyPatch
):
    original = Transaction.data

    async def explode(self: Transaction, message: bytes, plain: bool = False) -> object:
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(Transaction, "data", explode)
    reason = "monkeypatches Transaction.data, which only reaches this process"
    async with running_gate(tmp_path, MAIN_CF, backend, in_process=reason) as gate:
        c = await start(gate)
        assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
        final = await send_body(c)
        assert final[0].startswith("451 4.3.0 "), final
        assert not any(word in final[0] for word in ("secret", "Traceback", "RuntimeError"))
        monkeypatch.setattr(Transaction, "data", original)
        # the session is still usable and the transaction was reset
        assert await c.cmd("MAIL FROM:<b@example.net>") == ["250 2.1.0 Ok"]
        assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
        again = await send_body(c)
        log = gate.log
    assert again[0].startswith("250 ")
    assert [m.mail_from for m in backend.messages] == ["b@example.net"]
    assert "secret internal detail" in log  # the detail goes to the log only
