"""explain equals serve: generated dialogues get the same replies and log lines from both.

Hypothesis writes SMTP dialogues: HELO or EHLO, MAIL and RCPT with addresses in odd but
legal forms (quoted local parts, backslash escapes, source routes, the null sender,
postmaster), parameters, RSET, NOOP, VRFY, DATA with content, BDAT, junk, and pipelined
groups (several commands in one write, for an EHLO client).  Each dialogue goes through
``run_dialogue`` (explain, no socket) and through a live ``smtpgate serve`` (a supervisor,
two workers, a real backend on loopback); the replies to every write and every log line
of the session must be the same, up to queue ids and the backend's address.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from smtpgate.config import parse_settings
from smtpgate.config.service import ServiceConfig
from smtpgate.policy.model import ClientInfo
from smtpgate.policy.plan import build_plan
from smtpgate.smtp.explain import Exchange, run_dialogue
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import Gate, running_gate

MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_error_sleep_time = 0
smtpd_sender_restrictions = check_sender_access regexp:$config_directory/senders
smtpd_recipient_restrictions = check_recipient_access inline:{ {d@bar.org = DISCARD} },
    permit_mynetworks, reject_unauth_destination
"""
TABLES = {"senders": "/^a b@x\\.org$/ REJECT\n/^blocked@/ REJECT 521\n"}
CLIENT = "127.0.0.2"

LOCAL = st.sampled_from(
    ["a", "a.b", '"a b"', "a\\ b", '"a@b"', '"a."', "postmaster", "d", "x+y", "blocked"]
)
DOMAIN = st.sampled_from(["bar.org", "x.org", "other.org", "[127.0.0.1]"])
ADDRESS = st.builds(lambda local, d: f"{local}@{d}", LOCAL, DOMAIN) | st.sampled_from(
    ["postmaster", "<@route.example:a@bar.org>", "@x.org", "a@"]
)


def _angle(address: str) -> str:
    return address if address.startswith("<") else f"<{address}>"


MAIL = st.builds(
    lambda a, p: f"MAIL FROM:{_angle(a)}{p}",
    ADDRESS | st.just(""),
    st.sampled_from(["", " SIZE=100", " BODY=8BITMIME", " RET=FULL ENVID=x", " FOO=1"]),
)
RCPT = st.builds(
    lambda a, p: f"RCPT TO:{_angle(a)}{p}",
    ADDRESS,
    st.sampled_from(["", " NOTIFY=NEVER", " ORCPT=rfc822;a@bar.org", " BAR"]),
)
SIMPLE = st.sampled_from(
    ["RSET", "NOOP", "VRFY a@bar.org", "VRFY <postmaster>", "ETRN bar.org", "HELP", "AUTH x"]
)
CONTENT = st.sampled_from(
    [b"Subject: x\r\n\r\nhello\r\n.\r\n", b"Subject: y\r\n\r\n..dot\r\nline\r\n.\r\n"]
)


@st.composite
def dialogue(draw: st.DrawFn) -> list[bytes]:
    esmtp = draw(st.booleans())
    writes: list[bytes] = [f"{'EHLO' if esmtp else 'HELO'} client.example\r\n".encode()]
    for _ in range(draw(st.integers(1, 3))):
        group = [draw(MAIL)] + draw(st.lists(RCPT, min_size=1, max_size=3))
        group += draw(st.lists(SIMPLE, max_size=1))
        lines = [line.encode() + b"\r\n" for line in group]
        if esmtp and draw(st.booleans()):
            writes.append(b"".join(lines))  # one pipelined group
        else:
            writes.extend(lines)
        ending = draw(st.sampled_from(["DATA", "BDAT", "RSET", "none"]))
        if ending == "DATA":
            writes.append(b"DATA\r\n")
            writes.append(draw(CONTENT))
        elif ending == "BDAT" and esmtp:
            body = draw(CONTENT)[:-3]
            writes.append(b"BDAT %d LAST\r\n" % len(body) + body)
        elif ending == "RSET":
            writes.append(b"RSET\r\n")
    return writes


def _explain_plan(tmp_path: Path) -> tuple[object, ServiceConfig]:
    tmp_path.mkdir()
    for name, body in TABLES.items():
        (tmp_path / name).write_text(body)
    text = f"smtpd_peername_lookup = no\n{MAIN_CF}\nrelayhost = [127.0.0.1]:9\n"
    parsed, _ = parse_settings(text, str(tmp_path / "main.cf"), hostname="mx.example.org")
    plan, diagnostics = build_plan(parsed, strict_tables=True)
    assert plan is not None, [str(d) for d in diagnostics]
    return plan, ServiceConfig.from_settings(parsed)


_QUEUE_ID = re.compile(r"\b[0-9A-F]{6,}\b")


def _norm(line: str) -> str:
    line = re.sub(r" relay=\S+$", "", line)
    line = re.sub(r"queued as \S+", "queued as QID", line)
    return _QUEUE_ID.sub("QID", line)


def _replies(exchanges: list[Exchange]) -> list[str]:
    return [_norm(line) for ex in exchanges if ex.reply.code for line in ex.reply.lines()]


def _maillog(exchanges: list[Exchange]) -> list[str]:
    return [
        _norm(text if level == "info" else f"warning: {text}")
        for ex in exchanges
        for level, text in ex.maillog
    ]


_SYSLOG = re.compile(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ \S+\[\d+\]: ")


def _session_lines(log: str, index: int) -> list[str]:
    """The log lines of the ``index``-th client session (sessions run one after another)."""
    lines = [_SYSLOG.sub("", line) for line in log.splitlines()]
    sessions: list[list[str]] = []
    for line in lines:
        if line.startswith("connect from "):
            sessions.append([])
        if sessions and not line.startswith(("smtpgate ", "stopping", "stopped")):
            sessions[-1].append(line)
    return [_norm(line) for line in sessions[index]]


@settings(
    max_examples=4,
    deadline=None,
    # no shrinking: each try talks to a live server, and a difference in the number of
    # replies costs a read deadline; the failing script is in the assertion message
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.timeout(300)
@given(dialogues=st.lists(dialogue(), min_size=12, max_size=12))
def test_explain_and_serve_give_the_same_replies_and_log_lines(
    tmp_path_factory: pytest.TempPathFactory, dialogues: list[list[bytes]]
) -> None:
    asyncio.run(_compare(tmp_path_factory.mktemp("explain"), dialogues))


async def _compare(tmp_path: Path, dialogues: list[list[bytes]]) -> None:
    plan, config = _explain_plan(tmp_path / "explain")
    (tmp_path / "serve").mkdir()
    client = ClientInfo(address=CLIENT)
    async with RecordingBackend() as backend:
        async with running_gate(tmp_path / "serve", MAIN_CF, backend, TABLES) as gate:
            for writes in dialogues:
                await _one(gate, plan, config, client, writes)


async def _one(
    gate: Gate, plan: object, config: ServiceConfig, client: ClientInfo, writes: list[bytes]
) -> None:
    # explain, write by write: how many replies each write gets, and where the server
    # closes the connection
    counts: list[int] = []
    seen = 0
    for end in range(1, len(writes) + 1):
        exchanges = await run_dialogue(plan, client, config=config, writes=writes[:end])  # type: ignore[arg-type]
        replied = [ex for ex in exchanges[1:] if ex.reply.code]
        counts.append(len(replied) - seen)
        seen = len(replied)
        if replied and replied[-1].reply.disconnect:
            writes = writes[:end]
            break
    explained = await run_dialogue(plan, client, config=config, writes=writes)  # type: ignore[arg-type]
    sessions_before = gate.log.count("]: connect from ")
    c = await gate.connect(CLIENT)
    served: list[str] = []
    for write, count in zip(writes, counts, strict=True):
        await c.send_raw(write)
        for _ in range(count):
            try:
                served += [_norm(line) for line in await c.reply()]
            except (TimeoutError, ConnectionError) as exc:
                served.append(f"(no reply: {exc!r})")
                break
    await c.close()
    await _wait_for_sessions(gate, sessions_before + 1)
    script = b"".join(writes).decode("utf-8", "replace")
    assert served == _replies(explained[1:]), script
    assert _session_lines(gate.log, sessions_before) == _maillog(explained), script


async def _wait_for_sessions(gate: Gate, count: int) -> None:
    """Until ``count`` sessions have logged their disconnect (a log file has no event to
    wait on: Gate.wait_log's polling, for a count)."""
    log = gate.log
    while log.count("]: disconnect from ") < count:
        await gate.wait_log("]: disconnect from ")
        await asyncio.sleep(0.02)  # Gate.wait_log's poll interval
        log = gate.log
