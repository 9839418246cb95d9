"""Property tests through a real socket: the DATA reader and the command loop.

* Any split of the client's byte stream into writes gives exactly the stored message that
  one write gives (the end-of-data search must not depend on where reads end).
* No input makes the command handler raise: no ``unexpected error`` in the log, no
  ``451 4.3.0 Error: local error while processing``, and the server still relays.

Each example starts its own gate and backend (asyncio.run per example); the example
counts are modest to keep the suite fast.  The gate is in-process (IN_PROCESS says why);
the same paths run deployed in tests/hostile.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.hostile.conftest import GO_AHEAD, MAIN_CF, code, open_env, read_until_closed
from tests.serve.client import LineClient

LINE = st.text(alphabet="ab .\r\n\t-:", max_size=30).map(lambda s: s.encode())
BODY = st.lists(LINE, min_size=1, max_size=12).map(lambda lines: b"\r\n".join(lines) + b"\r\n")
TAG = b"X-Tag: prop\r\n\r\n"
IN_PROCESS = (
    "a gate per hypothesis example (100 in all) would be a process tree per example; "
    "and the error check listens to this process's smtpgate logger"
)
SOCKET_SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _normalise(body: bytes) -> bytes:
    """What the backend stores: a bare LF ends a line (CRLF); a lone CR is a space, as
    Postfix 3.7 sends it on."""
    return re.sub(rb"\r(?!\n)", b" ", re.sub(rb"(?<!\r)\n", b"\r\n", body))


async def _send(client: LineClient, payload: bytes, cuts: list[int]) -> list[str]:
    assert (await client.cmd("EHLO x.example"))[0].startswith("250")
    assert await client.cmd("MAIL FROM:<s@ext.example>") == ["250 2.1.0 Ok"]
    assert await client.cmd("RCPT TO:<u@our.example>") == ["250 2.1.5 Ok"]
    assert await client.cmd("DATA") == GO_AHEAD
    start = 0
    for cut in [*sorted(set(cuts)), len(payload)]:
        if start < cut <= len(payload):
            await client.send_raw(payload[start:cut])
            await asyncio.sleep(0.002)  # pacing: the cut arrives as its own read (under test)
            start = cut
    return await client.reply()


async def _split_case(body: bytes, cuts: list[int]) -> tuple[bytes, bytes]:
    payload = TAG + body + b".\r\n"
    async with open_env(Path(tempfile.mkdtemp()), in_process=IN_PROCESS) as env:
        one = await env.gate.connect()
        assert (await _send(one, payload, []))[0].startswith("250 ")
        split = await env.gate.connect()
        assert (await _send(split, payload, cuts))[0].startswith("250 ")
        first, second = (m.content for m in env.backend.messages)
    return first[first.index(b"X-Tag: ") :], second[second.index(b"X-Tag: ") :]


@SOCKET_SETTINGS
@given(BODY, st.lists(st.integers(min_value=1, max_value=400), max_size=8))
def test_any_split_of_the_stream_stores_the_same_message(body: bytes, cuts: list[int]) -> None:
    assume(b"\r\n.\r\n" not in TAG + body)  # that would be the end of the data
    assume(b"\x00" not in body)
    whole, pieces = asyncio.run(_split_case(body, cuts))
    assert whole == pieces
    if not re.search(rb"(^|\r|\n)\.", body):  # leading dots: see tests/hostile C02
        assert whole == _normalise(TAG + body)


VERBS = st.sampled_from(
    [
        b"HELO",
        b"EHLO",
        b"MAIL FROM:",
        b"RCPT TO:",
        b"DATA",
        b"RSET",
        b"NOOP",
        b"VRFY",
        b"BDAT",
        b"STARTTLS",
        b"AUTH",
        b"XCLIENT",
        b"XFORWARD",
        b"ETRN",
        b"mail from:",
        b"",
        b".",
    ]
)
ARG = st.one_of(
    st.sampled_from([b"<u@our.example>", b"<s@ext.example>", b"<>", b"x.example", b"SIZE=1"]),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
    st.text(alphabet='<>"()\\@%!:,.; ab\x1b\x00', max_size=20).map(lambda s: s.encode()),
)
COMMAND = st.tuples(VERBS, ARG).map(
    lambda va: va[0] + (b" " if va[0][-1:] != b":" else b"") + va[1]
)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _garbage_case(commands: list[bytes]) -> tuple[list[str], bool]:
    async with open_env(
        Path(tempfile.mkdtemp()), overrides=("smtpd_timeout=2s",), in_process=IN_PROCESS
    ) as env:
        c = await env.gate.connect()
        await c.send_raw(b"".join(cmd + b"\r\n" for cmd in commands) + b"\r\n.\r\nQUIT\r\n")
        lines, closed = await read_until_closed(c, deadline=4)
        probe = await env.session()
        final = await env.transaction(probe, TAG + b"after\r\n")
        assert code(final) == 250, final
    return lines, closed


@SOCKET_SETTINGS
@given(st.lists(COMMAND, max_size=10))
def test_no_input_raises_out_of_the_handler(commands: list[bytes]) -> None:
    errors = _Errors()
    logger = logging.getLogger("smtpgate")
    logger.addHandler(errors)
    try:
        lines, closed = asyncio.run(_garbage_case(commands))
    finally:
        logger.removeHandler(errors)
    assert closed, lines
    assert not any("local error while processing" in line for line in lines), lines
    assert not any(r.exc_info for r in errors.records), [r.getMessage() for r in errors.records]
    assert all(re.match(r"^[2-5]\d\d[ -]", line) for line in lines), lines


assert MAIN_CF  # the gate these properties run against: tests/hostile/conftest.py
