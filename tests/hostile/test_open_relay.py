"""R01-R29 (+ extras): open-relay forms of reliability.md section 4 from untrusted clients.

``our.example`` is relay_domains, ``mx.example.org`` ($myhostname, in mydestination) and
``[127.0.0.1]`` are the gate's own name and address literal, ``ext.example`` is foreign.
Clients connect from 127.0.0.2; mynetworks is 127.0.0.1/32. Every form is refused at RCPT
with Postfix's reply -- ``454 4.7.1 <...>: Relay access denied`` from the default
``defer_unauth_destination``, ``554 5.7.1`` from ``reject_unauth_destination`` -- the address
shown being the one Postfix shows (read off Postfix 3.7; ``test_replies_match_postfix``
re-checks a handful against a live instance), DATA gets ``554 5.5.1``, and the backend is
never contacted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smtpgate.policy.address import AddressClass, Resolver
from smtpgate.smtp.syntax import parse_address
from tests.hostile.conftest import TRUSTED, Env, body, open_env
from tests.postfix_instance import PostfixInstance, postfix_available, raw_session

HOST = "mx.example.org"
IP = "127.0.0.1"
REJECT_UNAUTH = "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n"
NO_RECIPIENTS = ["554 5.5.1 Error: no valid recipients"]

# (id, what the client sends after "RCPT TO:", the address Postfix shows in its reply)
RCPT_FORMS = [
    ("r01-plain", "<relaytest@ext.example>", "relaytest@ext.example"),
    ("r02-no-brackets", "relaytest@ext.example", "relaytest@ext.example"),
    ("r03-quoted", '<"relaytest@ext.example">', "relaytest@ext.example"),
    ("r04-quoted-percent", '<"relaytest%ext.example">', "relaytest%ext.example"),
    ("r05-percent-relay", "<relaytest%ext.example@our.example>", None),
    ("r06-percent-literal", f"<relaytest%ext.example@[{IP}]>", None),
    ("r07-percent-host", f"<relaytest%ext.example@{HOST}>", None),
    ("r08-at-at-relay", "<relaytest@ext.example@our.example>", None),
    ("r09-at-at-literal", f"<relaytest@ext.example@[{IP}]>", None),
    ("r10-quoted-at-relay", '<"relaytest@ext.example"@our.example>', None),
    ("r11-quoted-at-literal", f'<"relaytest@ext.example"@[{IP}]>', None),
    ("r12-source-route", "<@our.example:relaytest@ext.example>", "relaytest@ext.example"),
    ("r13-source-route-literal", f"<@[{IP}]:relaytest@ext.example>", "relaytest@ext.example"),
    ("r14-bang", "<ext.example!relaytest>", None),
    ("r15-bang-relay", "<ext.example!relaytest@our.example>", None),
    ("r16-bang-literal", f"<ext.example!relaytest@[{IP}]>", None),
    ("r17-foreign-literal", "<relaytest@[198.51.100.7]>", None),
    ("r18-suffix-lookalike", "<relaytest@notour.example>", None),
    ("r19-prefix-lookalike", "<relaytest@our.example.ext.example>", None),
    ("r20-trailing-dot", "<relaytest@ext.example.>", None),
    (
        "r21-route-list",
        "<@our.example,@ext.example:relaytest@ext.example>",
        "relaytest@ext.example",
    ),
]
# smtpgate-only: routing that ends in the relay domain only after it is unrolled. Postfix
# 3.7 permits these (it delivers the unrolled address); smtpgate forwards the address as
# written, so it refuses them (smtpgate/policy/address.py, Resolver.resolve).
UNROLLED_FORMS = [
    ("x01-percent-via-host", f"<relaytest%our.example@{HOST}>", None),
    ("x02-bang-no-domain", "<our.example!relaytest>", None),
    ("x03-percent-no-domain", "<relaytest%our.example>", None),
    ("x04-bang-via-localhost", "<our.example!relaytest@localhost>", None),
]
SENDER_FORMS = [
    ("r22-null", "<>"),
    ("r23-forged-local", "<spamtest@our.example>"),
    ("r24-own-literal", f"<spamtest@[{IP}]>"),
    ("r25-localhost", "<spamtest@localhost>"),
    ("r26-unqualified", "<spamtest>"),
    ("r27-bang", "<ext.example!spamtest>"),
]
HELOS = ["localhost", f"[{IP}]", "our.example", HOST]


def shown(form: str, address: str | None) -> str:
    if address is not None:
        return address
    return form.strip("<>").replace('"', "")


def relay_cases() -> list[object]:
    cases = []
    for forms in (RCPT_FORMS, UNROLLED_FORMS):
        for ident, form, address in forms:
            for extra, reply in (("", "454 4.7.1"), (REJECT_UNAUTH, "554 5.7.1")):
                name = f"{ident}-{'reject' if extra else 'defer'}"
                expected = f"{reply} <{shown(form, address)}>: Relay access denied"
                cases.append(pytest.param(form, extra, expected, id=name))
    return cases


async def refused(env: Env, form: str, expected: str, sender: str = "<spamtest@ext.example>"):
    c = await env.session()
    assert await env.cmd(c, f"MAIL FROM:{sender}") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, f"RCPT TO:{form}") == [expected]
    assert await env.cmd(c, "DATA") == NO_RECIPIENTS
    assert await env.cmd(c, "QUIT") == ["221 2.0.0 Bye"]
    assert await c.closed()
    assert env.backend.connections == [], "the backend must not even be contacted"
    assert env.backend.messages == []


@pytest.mark.parametrize(("form", "extra", "expected"), relay_cases())
async def test_relay_forms_are_refused(tmp_path: Path, form: str, extra: str, expected: str):
    async with open_env(tmp_path, extra) as env:
        await refused(env, form, expected)
        await env.finish()


@pytest.mark.parametrize(("ident", "sender"), SENDER_FORMS, ids=[s[0] for s in SENDER_FORMS])
async def test_sender_forms_do_not_open_the_relay(env: Env, ident: str, sender: str) -> None:
    env.senders.add(sender.strip("<>"))
    await refused(env, "<relaytest@ext.example>", RELAY_DENIED, sender)
    await env.finish()


RELAY_DENIED = "454 4.7.1 <relaytest@ext.example>: Relay access denied"


@pytest.mark.parametrize("helo", HELOS)
async def test_r28_helo_spoofing_does_not_open_the_relay(env: Env, helo: str) -> None:
    c = await env.connect()
    assert (await env.cmd(c, f"EHLO {helo}"))[0] == "250-mx.example.org"
    assert await env.cmd(c, "MAIL FROM:<spamtest@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "RCPT TO:<relaytest@ext.example>") == [RELAY_DENIED]
    assert await env.cmd(c, "DATA") == NO_RECIPIENTS
    assert env.backend.connections == []
    await env.finish()


async def test_r29_mixed_local_and_foreign_recipients(env: Env) -> None:
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<spamtest@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, "RCPT TO:<relaytest@ext.example>") == [RELAY_DENIED]
    assert await env.cmd(c, "RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    assert await env.cmd(c, "RCPT TO:<relaytest%ext.example@our.example>") == [
        "454 4.7.1 <relaytest%ext.example@our.example>: Relay access denied"
    ]
    assert await env.cmd(c, "DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    await c.send_raw(body("r29") + b".\r\n")
    assert (await env.reply(c))[0].startswith("250 ")
    [stored] = env.backend.messages
    assert stored.rcpt_tos == ["u@our.example"]
    rcpts = [x for x in env.backend.connections[0].commands if x.startswith("RCPT")]
    assert rcpts == ["RCPT TO:<u@our.example>"]
    await env.finish()


async def test_trusted_client_may_relay(env: Env) -> None:
    """The setup tells trusted from untrusted: 127.0.0.1 is in mynetworks."""
    c = await env.session(source=TRUSTED)
    final = await env.transaction(c, body("trusted"), rcpt="relaytest@ext.example")
    assert final[0].startswith("250 ")
    assert env.stored("trusted")[0].rcpt_tos == ["relaytest@ext.example"]
    await env.finish()


def _resolver() -> Resolver:
    return Resolver(
        myorigin=HOST,
        is_local_domain=lambda d: d in {HOST, "localhost"},
        is_relay_domain=lambda d: d == "our.example" or d.endswith(".our.example"),
    )


@pytest.mark.parametrize(
    "form",
    [
        "<u@OUR.Example>",
        "u@our.example",
        "<U.Ser+tag@our.example>",
        f"<@{HOST}:u@our.example>",
        "<@a.example,@b.example:u@our.example>",
        '<"u"@our.example>',
        '<"u x"@our.example>',
        "<u@sub.our.example>",
        "<u(comment)@our.example>",
    ],
)
async def test_the_backend_gets_the_address_the_decision_was_made_on(env: Env, form: str):
    """Accepted forms: what the backend receives parses to the very address that was
    checked, resolves to the same relay domain, and carries no routing operator."""
    c = await env.session()
    assert await env.cmd(c, "MAIL FROM:<spamtest@ext.example>") == ["250 2.1.0 Ok"]
    assert await env.cmd(c, f"RCPT TO:{form}") == ["250 2.1.5 Ok"]
    assert await env.cmd(c, "RSET") == ["250 2.0.0 Ok"]
    [rcpt] = [x for x in env.backend.connections[0].commands if x.startswith("RCPT TO:")]
    decided = parse_address(form, allow_empty=False)
    forwarded = parse_address(rcpt.removeprefix("RCPT TO:"), allow_empty=False)
    assert decided is not None and forwarded == decided
    checked, sent = _resolver().resolve(decided), _resolver().resolve(forwarded)
    assert checked == sent
    assert sent.klass is AddressClass.RELAY and not sent.routed
    assert not any(op in sent.address.rpartition("@")[0] for op in "@%!")
    await env.finish()


# -- the same forms against a real Postfix 3.7 ----------------------------------------------

POSTFIX_FORMS = [
    (form, extra)
    for ident, form, _ in RCPT_FORMS
    if ident.split("-")[0] in {"r01", "r03", "r05", "r07", "r10", "r12", "r14", "r18", "r19"}
    for extra in ("", REJECT_UNAUTH)
]


@pytest.fixture(scope="module")
def postfix_relay() -> object:
    if not postfix_available():
        pytest.skip("Postfix is not installed (or not root)")
    configs = {}
    for extra in ("", REJECT_UNAUTH):
        configs[extra] = PostfixInstance(
            "myhostname = mx.example.org\nrelay_domains = our.example\n" + extra
        )
    try:
        for pf in configs.values():
            pf.start()
        yield configs
    finally:
        for pf in configs.values():
            pf.close()


@pytest.mark.postfix
@pytest.mark.skipif(not os.path.exists("/usr/sbin/postfix"), reason="Postfix is not installed")
@pytest.mark.parametrize(("form", "extra"), POSTFIX_FORMS)
async def test_replies_match_postfix(
    tmp_path: Path, postfix_relay: dict[str, PostfixInstance], form: str, extra: str
) -> None:
    pf = postfix_relay[extra]
    steps = ["HELO client.example", "MAIL FROM:<spamtest@ext.example>", f"RCPT TO:{form}"]
    d = raw_session("127.0.0.1", pf.port, "127.0.0.2", [*steps, "DATA"])
    postfix = [e.replies[0] for e in d.exchanges]
    async with open_env(tmp_path, extra) as env:
        c = await env.connect()
        ours = [await env.cmd(c, line) for line in [*steps, "DATA"]]
        assert env.backend.connections == []
    assert ours[1:] == postfix[1:]
    assert postfix[2][0].endswith("Relay access denied")
