"""C01-C03: the control cases every hostile group is measured against."""

from __future__ import annotations

from tests.hostile.conftest import Env, body


async def test_c01_normal_relay(env: Env) -> None:
    c = await env.session()
    final = await env.transaction(c, body("c01"))
    assert final[0].startswith("250 2.0.0 Ok: queued as Q"), final
    [stored] = env.stored("c01")
    assert stored.mail_from == "sender@ext.example"
    assert stored.rcpt_tos == ["u@our.example"]
    assert stored.content.endswith(body("c01"))
    assert stored.xforward["ADDR"] == "127.0.0.2"
    assert await env.cmd(c, "QUIT") == ["221 2.0.0 Bye"]
    assert await c.closed()
    await env.finish()


async def test_c02_dot_stuffing_round_trip(env: Env) -> None:
    text = b".\r\n..\r\n.leading dot\r\n. \r\nend\r\n"
    stuffed = b"..\r\n...\r\n..leading dot\r\n.. \r\nend\r\n"
    c = await env.session()
    final = await env.transaction(c, body("c02", stuffed))
    assert final[0].startswith("250 "), final
    [stored] = env.stored("c02")
    assert stored.content.endswith(body("c02", text))
    assert stored.raw.endswith(body("c02", stuffed) + b".\r\n")
    await env.finish()


async def test_c03_case_insensitive_domain(env: Env) -> None:
    c = await env.session()
    final = await env.transaction(c, body("c03"), rcpt="u@OUR.Example")
    assert final[0].startswith("250 "), final
    [stored] = env.stored("c03")
    assert stored.rcpt_tos == ["u@OUR.Example"]
    await env.finish()
