"""F01-F22: backend faults through the whole server (reliability.md section 6).

Each case asserts the client's reply, whether the client connection closed, and what the
backend stored; then the fault is cleared and C01 goes through the same server (the pool
must not keep a broken connection). ``smtpd_proxy_timeout = 1s``.
"""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path

import pytest

from smtpgate.relay import Transaction
from tests.hostile.conftest import GO_AHEAD, R451_PROXY, Env, body, code, open_env

AFTER_DOT_LOG = re.compile(
    r"[0-9A-F]{10}: backend connection lost after the end of data: the message may have been "
    r"delivered; the client was told 451"
)


def heal(env: Env) -> None:
    b = env.backend
    b.replies.clear()
    b.rcpt_replies.clear()
    b.close_at.clear()
    b.delays.clear()
    b.garbled.clear()


async def to_rcpt(env: Env, rcpt: str = "u@our.example") -> tuple[object, list[str]]:
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
    return c, await env.cmd(c, f"RCPT TO:<{rcpt}>")


async def test_f01_backend_down(tmp_path: Path) -> None:
    async with open_env(tmp_path, down=True) as env:
        c, reply = await to_rcpt(env)
        assert reply == [R451_PROXY]
        assert await env.cmd(c, "DATA") == ["554 5.5.1 Error: no valid recipients"]
        assert await env.cmd(c, "NOOP") == ["250 2.0.0 Ok"]
        fresh = await env.connect()  # still greeting and answering
        assert await env.cmd(fresh, "QUIT") == ["221 2.0.0 Bye"]


@pytest.mark.parametrize(
    ("setup", "ident"),
    [
        ({"delays": {"GREETING": math.inf}}, "f02-black-hole"),
        ({"replies": {"GREETING": "554 5.3.2 not now"}}, "f03-554-greeting"),
        ({"replies": {"EHLO": "502 5.5.2 what"}}, "f03b-ehlo-refused"),
        ({"garbled": {"RCPT"}}, "f16-garbage-reply"),
        (
            {
                "replies": {
                    "RCPT": "250-" + "x" * 1000 + "\n" + ("250-" + "y" * 990 + "\n") * 40 + "250 ok"
                }
            },
            "f17-huge-reply",
        ),
        ({"replies": {"MAIL": "421 4.3.2 shutting down"}}, "f18-421-at-mail"),
        ({"delays": {"RCPT": 3}}, "f19-rcpt-stall"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_faults_before_data_are_451(tmp_path: Path, setup: dict[str, object], ident: str):
    async with open_env(tmp_path, **setup) as env:  # type: ignore[arg-type]
        c, reply = await to_rcpt(env)
        assert reply == [R451_PROXY]
        assert await env.cmd(c, "DATA") == ["554 5.5.1 Error: no valid recipients"]
        assert env.backend.messages == []
        heal(env)
        assert await env.cmd(c, "RSET") == ["250 2.0.0 Ok"]
        final = await env.transaction(c, body(ident))
        assert final[0].startswith("250 "), "the next transaction reconnects"
        await env.finish()


@pytest.mark.parametrize(
    ("reply", "ident"),
    [
        ("550 5.1.1 <u@our.example>: Recipient address rejected: User unknown", "f04"),
        ("450 4.2.1 <u@our.example>: mailbox busy", "f05"),
        ("452 4.5.3 Error: too many recipients", "f06"),
    ],
)
async def test_per_recipient_replies_pass_through(env: Env, reply: str, ident: str) -> None:
    env.backend.rcpt_replies["u@our.example"] = reply
    c, got = await to_rcpt(env)
    assert got == [reply]
    assert await env.cmd(c, "RCPT TO:<v@our.example>") == ["250 2.1.5 Ok"]
    assert await env.cmd(c, "DATA") == GO_AHEAD
    await c.send_raw(body(ident) + b".\r\n")
    assert code(await env.reply(c)) == 250
    assert env.stored(ident)[0].rcpt_tos == ["v@our.example"]
    heal(env)
    await env.finish()


@pytest.mark.parametrize(
    ("reply", "ident"),
    [("554 5.7.1 content rejected", "f07"), ("451 4.3.0 try again later", "f08")],
)
async def test_final_dot_refused_passes_through(env: Env, reply: str, ident: str) -> None:
    env.backend.replies["DOT"] = reply
    c = await env.session()
    assert await env.transaction(c, body(ident)) == [reply]
    assert env.backend.messages == []
    heal(env)
    await env.finish()


@pytest.mark.parametrize("stage", ["DATA", "CONTENT"], ids=["f09-at-data", "f10-mid-content"])
async def test_backend_closes_before_the_dot(env: Env, stage: str) -> None:
    env.backend.close_at.add(stage)
    c = await env.session()
    assert await env.transaction(c, body("f09")) == [R451_PROXY]
    assert env.backend.messages == []
    assert await env.cmd(c, "NOOP") == ["250 2.0.0 Ok"]
    heal(env)
    await env.finish()


async def test_f11_backend_closes_after_the_dot(env: Env) -> None:
    env.backend.close_at.add("DOT")
    c = await env.session()
    assert await env.transaction(c, body("f11")) == [R451_PROXY]
    assert len(env.stored("f11")) == 1, "the unavoidable window: stored, client told 451"
    assert AFTER_DOT_LOG.search(env.gate.log)
    heal(env)
    await env.finish()


async def test_f12_slow_dot_within_the_timeout(env: Env) -> None:
    env.backend.delays["DOT"] = 0.5
    c = await env.session()
    final = await env.transaction(c, body("f12"))
    assert final[0].startswith("250 2.0.0 Ok: queued as ")
    assert len(env.stored("f12")) == 1
    heal(env)
    await env.finish()


async def test_f13_hung_dot(env: Env) -> None:
    env.backend.delays["DOT"] = math.inf
    c = await env.session()
    assert await env.transaction(c, body("f13")) == [R451_PROXY]
    assert len(env.stored("f13")) == 1
    assert AFTER_DOT_LOG.search(env.gate.log)
    heal(env)
    await env.finish()


async def test_f14_tls_required_but_not_offered(tmp_path: Path) -> None:
    async with open_env(tmp_path, "smtp_tls_security_level = encrypt\n") as env:
        c, reply = await to_rcpt(env)
        assert reply == [R451_PROXY]
        assert env.backend.messages == []
        assert all("MAIL" not in x for conn in env.backend.connections for x in conn.commands)


async def test_f15_garbled_tls_handshake(tmp_path: Path) -> None:
    async with open_env(
        tmp_path, "smtp_tls_security_level = encrypt\n", starttls=True, garbled={"TLS"}
    ) as env:
        c, reply = await to_rcpt(env)
        assert reply == [R451_PROXY]
        assert env.backend.messages == []


async def test_f20_client_vanishes_while_the_backend_sits_on_the_dot(env: Env) -> None:
    release = asyncio.Event()
    env.backend.holds["DOT"] = release
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    assert await env.cmd(c, "DATA") == GO_AHEAD
    await c.send_raw(body("f20") + b".\r\n")
    await env.backend.wait_for(lambda: "DOT" in env.backend.held)
    await c.close()
    release.set()
    del env.backend.holds["DOT"]
    await env.backend.wait_for(lambda: len(env.stored("f20")) == 1)
    await env.finish()


async def test_f21_client_vanishes_mid_data(env: Env) -> None:
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<sender@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    assert await env.cmd(c, "DATA") == GO_AHEAD
    await c.send_raw(body("f21", b"half a message\r\n"))
    await c.close()
    conn = env.backend.connections[0]
    # DATA went ahead with the client's DATA; without the client's dot the backend
    # connection is closed: the backend never sees an end of data.
    await env.backend.wait_for(lambda: conn.closed)
    assert conn.commands[-1] == "DATA"
    assert env.backend.messages == []
    await env.finish()


async def test_f22_internal_exception_is_a_neutral_451(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom(self: Transaction, message: bytes) -> object:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(Transaction, "data", boom)
    reason = "monkeypatches Transaction.data, which only reaches this process"
    async with open_env(tmp_path, in_process=reason) as env:
        c = await env.session()
        final = await env.transaction(c, body("f22"))
        assert code(final) == 451 and "secret" not in final[0] and "RuntimeError" not in final[0]
        assert env.backend.messages == []
        monkeypatch.undo()
        await env.finish()
