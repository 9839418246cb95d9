"""Session-level differential test: raw SMTP sessions against Postfix 3.7 and smtpgate serve.

Each script of ``sessions.py`` is typed, one write at a time, at (a) a throwaway Postfix
(``PostfixInstance.raw_dialogue``) and (b) ``smtpgate serve`` in front of a
:class:`~tests.serve.backend.RecordingBackend`, both with the same main.cf lines and tables,
from 127.0.0.2. Every reply line (code, enhanced code, text) and the point where the server
closed the connection must be the same. Normalised, because they must differ:

- the queue id in ``250 2.0.0 Ok: queued as X`` (Postfix's queue, the backend's queue);
- nothing else: the greeting and the EHLO replies are compared whole (both offer ETRN and
  CHUNKING); smtpgate's list is also asserted on its own (:data:`SMTPGATE_EHLO`).

Both servers get the config's limits (:data:`~tests.differential.sessions.RELAXED` unless a
config sets its own): no error sleep and error/junk limits out of reach, so that a script with
many errors neither sleeps nor hits a limit, and smtpd_forbid_unauth_pipelining = yes. The
``limits/`` and ``sync/`` scripts are about the limits and RFC 2920 synchronisation, with tiny
limits (:data:`~tests.differential.sessions.TINY`). Postfix alone gets
:data:`~tests.differential.sessions.POSTFIX_ONLY` (the EHLO keywords it must not offer).

Where smtpgate deliberately differs, the script is in :data:`KNOWN_DIFFERENCES` with the
reason and smtpgate's own expected transcript, which is asserted (and Postfix must still
differ, so a stale entry fails).
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.differential.sessions import SCRIPTS, Script, SessionConfig
from tests.postfix_instance import (
    DIR_PLACEHOLDER,
    POSTFIX,
    PostfixInstance,
    RawDialogue,
    raw_session,
)
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import running_gate

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(
        not os.path.exists(POSTFIX),
        reason=f"{POSTFIX} is missing: install Debian's postfix (.ci/run does)",
    ),
]

CLIENT = "127.0.0.2"
RESULT_TIMEOUT = 50.0

SMTPGATE_EHLO = [
    "250-mx.example.org",
    "250-PIPELINING",
    "250-SIZE 10240000",
    "250-VRFY",
    "250-ETRN",
    "250-ENHANCEDSTATUSCODES",
    "250-8BITMIME",
    "250-DSN",
    "250-SMTPUTF8",
    "250 CHUNKING",
]

_QUEUED = re.compile(r"^(250 2\.0\.0 Ok: queued as )\S+$")


def transcript(d: RawDialogue) -> list[str]:
    """A flat, readable, normalised form: ``> sent``, ``< reply line``, ``[closed]``."""
    out = [f"< {line}" for line in d.greeting]
    if d.greeting_closed:
        out.append("[closed]")
    for x in d.exchanges:
        sent = x.sent.decode("utf-8", "backslashreplace").removesuffix("\r\n")
        for line in sent.split("\r\n"):
            line = line.replace("\r", "\\r").replace("\n", "\\n")
            out.append("> " + (line if len(line) <= 120 else f"{line[:100]}...({len(line)})"))
        for reply in x.replies:
            out += [f"< {line}" for line in _normalise(reply)]
        if x.closed:
            out.append("[closed]")
    return out


def _normalise(reply: list[str]) -> list[str]:
    return [_QUEUED.sub(r"\1QUEUEID", line) for line in reply]


def ehlo_replies(d: RawDialogue) -> list[list[str]]:
    """The EHLO replies of a session (multi-line 250 replies)."""
    return [r for x in d.exchanges for r in x.replies if len(r) > 1 and r[0].startswith("250-")]


# --------------------------------------------------------------------------- known differences

_EHLO_LINES = ["< " + line for line in SMTPGATE_EHLO]
_AFTER_EHLO = ["< 220 mx.example.org ESMTP Postfix", "> EHLO client.example.net", *_EHLO_LINES]

#: script name -> (reason, smtpgate's whole transcript). Asserted as smtpgate's behaviour, and
#: Postfix must still differ (a stale entry fails).
KNOWN_DIFFERENCES: dict[str, tuple[str, list[str]]] = {
    "unknown/etrn": (
        "smtpgate has no queue to flush: after the restrictions every domain gets Postfix's "
        "answer for a domain outside fast_flush_domains (Postfix: 250 Queuing started for "
        "bar.org, a relay domain)",
        [*_AFTER_EHLO, "> ETRN bar.org", "< 459 <bar.org>: service unavailable"],
    ),
    "bare-lf/data-smuggling": (
        "smtpd_forbid_bare_newline = normalize (Postfix 3.9's default): only CRLF.CRLF ends "
        "DATA, so LF.LF and the command behind it are content (Postfix 3.7 ends DATA at LF.LF "
        "and runs the smuggled RSET; the lone dot then gets 221 2.7.0 and a close)",
        [
            *_AFTER_EHLO,
            "> MAIL FROM:<sender@example.net>",
            "< 250 2.1.0 Ok",
            "> RCPT TO:<bob@bar.org>",
            "< 250 2.1.5 Ok",
            "> DATA",
            "< 354 End data with <CR><LF>.<CR><LF>",
            "> Subject: x",
            "> ",
            "> hi\\n.\\nRSET",
            "> .",
            "> QUIT",
            "< 250 2.0.0 Ok: queued as QUEUEID",
            "< 221 2.0.0 Bye",
            "[closed]",
        ],
    ),
    "mail/route-only": (
        "smtpgate refuses a sender that is only a source route (nothing after the colon); "
        "Postfix keeps <@x.example:> as is",
        [
            *_AFTER_EHLO,
            "> MAIL FROM:<@x.example:>",
            "< 501 5.1.7 Bad sender address syntax",
            "> RCPT TO:<bob@bar.org>",
            "< 503 5.5.1 Error: need MAIL command",
        ],
    ),
    **{
        name: (
            "control characters in an address are refused at the command (issue 3: strict "
            "where safety needs it); Postfix 3.7 accepts them and prints them as spaces",
            [*_AFTER_EHLO, *lines],
        )
        for name, lines in {
            "mail/control-char": [
                "> MAIL FROM:<a\x01b@blocked.example>",
                "< 501 5.1.7 Bad sender address syntax",
                "> RCPT TO:<bob@bar.org>",
                "< 503 5.5.1 Error: need MAIL command",
            ],
            "mail/del": [
                "> MAIL FROM:<a\x7fb@blocked.example>",
                "< 501 5.1.7 Bad sender address syntax",
                "> RCPT TO:<bob@bar.org>",
                "< 503 5.5.1 Error: need MAIL command",
            ],
            "rcpt/control-char": [
                "> MAIL FROM:<sender@example.net>",
                "< 250 2.1.0 Ok",
                "> RCPT TO:<x\x01y@other.org>",
                "< 501 5.1.3 Bad recipient address syntax",
            ],
        }.items()
    },
}


# --------------------------------------------------------------------------- Postfix side


class PostfixRuns:
    """Runs every script of a config against one Postfix instance, once, in a thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="postfix")
        self.futures: dict[str, Future[dict[str, RawDialogue]]] = {}

    def get(self, config: SessionConfig, scripts: list[Script]) -> Future[dict[str, RawDialogue]]:
        with self.lock:
            if config.name not in self.futures:
                self.futures[config.name] = self.pool.submit(_run_postfix, config, scripts)
            return self.futures[config.name]


def _run_postfix(config: SessionConfig, scripts: list[Script]) -> dict[str, RawDialogue]:
    main_cf = config.main_cf_text + config.postfix_only
    with PostfixInstance(main_cf, dict(config.tables)) as pf:
        return {s.name: pf.raw_dialogue(CLIENT, s.steps, logs=s.logs) for s in scripts}


# --------------------------------------------------------------------------- log lines

_ACTION_LINE = re.compile(
    r"^(?:NOQUEUE|QUEUEID|[0-9A-F]{6,}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10,}): "
    r"(?P<rest>(?:reject|reject_warning|warn|info|discard|hold|redirect|filter|bcc|"
    r"prepend): .*)$"
)


def action_log(lines: list[str]) -> list[str]:
    """The lines a script with ``logs`` compares: the action lines with the queue id as
    ``QID`` (a proxy has no queue file of its own), and the pipelining complaints."""
    out = []
    for line in lines:
        m = _ACTION_LINE.match(line)
        if m:
            out.append("QID: " + m["rest"])
        elif line.startswith("improper command pipelining after "):
            out.append(line)
    return out


def smtpd_messages(log: str) -> list[str]:
    """The message part of each smtpgate log line of the session from 127.0.0.2."""
    out = []
    for line in log.splitlines():
        head, sep, msg = line.partition("]: ")
        if sep:
            out.append(msg)
    return out


_RUNS = PostfixRuns()
_BY_CONFIG: dict[str, list[Script]] = {}
for _script in SCRIPTS:
    _BY_CONFIG.setdefault(_script.config.name, []).append(_script)


# --------------------------------------------------------------------------- smtpgate side


async def smtpgate_result(script: Script, tmp_path: Path) -> RawDialogue:
    config = script.config
    main_cf = config.main_cf_text.replace(DIR_PLACEHOLDER, str(tmp_path))
    tables = {k: v.replace(DIR_PLACEHOLDER, str(tmp_path)) for k, v in config.tables}
    async with RecordingBackend() as backend:
        async with running_gate(tmp_path, main_cf, backend, tables) as gate:
            d = await asyncio.to_thread(
                raw_session, gate.host, gate.port, CLIENT, script.steps, timeout=10.0
            )
            if script.logs:
                log = await gate.wait_log(f"disconnect from unknown[{CLIENT}]")
                d.log = smtpd_messages(log)
        if script.relayed is not None or script.envelope is not None:
            d.relayed = list(backend.messages)  # type: ignore[attr-defined]
    return d


def _after_received(content: bytes) -> bytes:
    """The content without the Received: header the relaying server prepended."""
    lines = content.split(b"\r\n")
    i = 0
    if lines and lines[0].startswith(b"Received:"):
        i = 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])


def _params() -> list[object]:
    out = []
    for script in SCRIPTS:
        marks = [pytest.mark.xfail(strict=True, reason=script.xfail)] if script.xfail else []
        out.append(pytest.param(script, id=script.name, marks=marks))
    return out


@pytest.mark.parametrize("script", _params())
async def test_session_matches_postfix(script: Script, tmp_path: Path) -> None:
    # Start Postfix for this config (in a thread) before smtpgate's run, then join.
    future = _RUNS.get(script.config, _BY_CONFIG[script.config.name])
    gate = await smtpgate_result(script, tmp_path)
    postfix = await asyncio.to_thread(future.result, RESULT_TIMEOUT)
    expected, got = transcript(postfix[script.name]), transcript(gate)
    own_ehlo = SMTPGATE_EHLO
    if "disable_vrfy_command = yes" in script.config.main_cf:
        own_ehlo = [line for line in SMTPGATE_EHLO if line != "250-VRFY"]
    size = re.search(r"^message_size_limit = (\d+)$", script.config.main_cf, re.M)
    if size:
        own_ehlo = [f"250-SIZE {size[1]}" if x.startswith("250-SIZE") else x for x in own_ehlo]
    for reply in ehlo_replies(gate):
        assert reply == own_ehlo
    if script.name in KNOWN_DIFFERENCES:
        reason, own = KNOWN_DIFFERENCES[script.name]
        assert got == own, reason
        assert expected != own, f"stale KNOWN_DIFFERENCES entry ({reason}): Postfix agrees now"
        return
    assert got == expected
    if script.logs:
        assert action_log(gate.log) == action_log(postfix[script.name].log)
    relayed = getattr(gate, "relayed", None)
    if script.envelope is not None:
        assert relayed is not None
        got_rcpts = frozenset(r for m in relayed for r in m.rcpt_tos)
        assert got_rcpts == script.envelope
        if not script.envelope:
            assert relayed == []
    if script.relayed is not None:
        assert relayed is not None and len(relayed) == 1
        assert _after_received(relayed[0].content) == script.relayed
