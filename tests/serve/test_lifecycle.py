"""Server lifecycle and log lines: stop/drain, Postfix-format logging, the serve command.

In-process tests use :func:`running_gate`; the CLI tests run ``.venv/bin/smtpgate serve``
as a subprocess on a free port in front of a RecordingBackend of the test's own loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import pytest

from tests.postfix_instance import free_port
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import SEED_MAIN_CF, SEED_TABLES, Gate, running_gate

SMTPGATE = str(Path(sys.executable).with_name("smtpgate"))
SHUTTING_DOWN = ["421 4.3.2 mx.example.org Service shutting down"]
BODY = b"Subject: drain\r\n\r\nin flight\r\n"
SYSLOG_PREFIX = r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ postfix/smtpd\[(?P<pid>\d+)\]: "
# fail2ban's filter.d/postfix.conf (mode normal), with its __prefix_line for postfix daemons
FAIL2BAN = re.compile(
    r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ postfix(-\w+)?/\w+(?:/smtp[ds])?\[\d+\]:? "
    r"\w+: (?:milter-)?reject: RCPT from [^[]*\[(?P<host>[^\]]+)\](?::\d+)?: 55[04] 5\.7\.1\s",
    re.MULTILINE,
)
FAIL2BAN_SIMPLE = re.compile(r"NOQUEUE: reject: RCPT from \S+\[(?P<host>[^\]]+)\]")
QQ_REJECT = (
    "554 5.7.1 <318787866@qq.com>: Sender address rejected: 521; "
    "from=<318787866@qq.com> to=<foo@bar.org>"
)


async def begin_relay(c: LineClient, sender: str = "friend@example.net") -> None:
    """EHLO .. DATA and the content with its dot; the reply to the dot is not read."""
    assert (await c.cmd("EHLO client.example.net"))[0] == "250-mx.example.org"
    assert await c.cmd(f"MAIL FROM:<{sender}>") == ["250 2.1.0 Ok"]
    assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
    assert await c.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    await c.send_raw(BODY + b".\r\n")


# -- Server.stop() -----------------------------------------------------------------------------


async def test_stop_tells_idle_sessions_421_and_finishes_busy_ones(tmp_path: Path):
    release = asyncio.Event()
    async with RecordingBackend(holds={"DOT": release}) as backend:
        # SIGTERM to the CLI: test_serve_sigterm_drains_and_exits_0
        reason = "calls Server.stop() and watches it wait for the relay in flight"
        async with running_gate(
            tmp_path, SEED_MAIN_CF, backend, SEED_TABLES, in_process=reason
        ) as gate:
            idle = await gate.connect()
            assert (await idle.cmd("EHLO idle.example"))[0] == "250-mx.example.org"
            busy = await gate.connect()
            await begin_relay(busy)
            await backend.wait_for(lambda: "DOT" in backend.held)

            stop = asyncio.create_task(gate.server.stop(drain_timeout=10))
            assert await idle.reply() == SHUTTING_DOWN
            assert await idle.closed()
            with pytest.raises(OSError):  # no new connections once stop has begun
                await LineClient.connect(gate.host, gate.port, source="127.0.0.3")
            assert not stop.done(), "stop() finished while a relay was in flight"

            release.set()
            [message] = backend.messages
            assert await busy.reply() == [f"250 2.0.0 Ok: queued as {message.queue_id}"]
            assert await busy.reply() == SHUTTING_DOWN
            assert await busy.closed()
            await asyncio.wait_for(stop, 10)
            log = gate.log
    accepted = log.index("proxy-accept: END-OF-MESSAGE")
    assert log.index("stopping: no new connections") < accepted < log.index("]: stopped")
    assert "disconnect from unknown[127.0.0.2] ehlo=1 commands=1" in log


async def test_stop_without_sessions_is_quick(tmp_path: Path, backend: RecordingBackend):
    reason = "times Server.stop() itself, without a process to start or reap"
    async with running_gate(
        tmp_path, SEED_MAIN_CF, backend, SEED_TABLES, in_process=reason
    ) as gate:
        await asyncio.wait_for(gate.server.stop(drain_timeout=10), 2)
        assert gate.server.stopped.is_set()
        with pytest.raises(OSError):
            await LineClient.connect(gate.host, gate.port)


# -- log lines ---------------------------------------------------------------------------------


async def test_connect_and_disconnect_counters(seed_gate: Gate, backend: RecordingBackend):
    c = await seed_gate.connect()
    await begin_relay(c)
    assert (await c.reply())[0].startswith("250 ")
    assert await c.cmd("QUIT") == ["221 2.0.0 Bye"]
    assert await c.closed()
    await backend.wait_for(lambda: len(backend.messages) == 1)
    d = await seed_gate.connect(source="127.0.0.3")
    await d.cmd("HELO h.example")
    await d.cmd("MAIL FROM:<318787866@qq.com>")
    await d.cmd("RCPT TO:<foo@bar.org>")
    await d.cmd("BOGUS")
    assert await d.cmd("QUIT") == ["221 2.0.0 Bye"]
    assert await d.closed()
    await c.close()
    await d.close()
    log = await seed_gate.wait_log("disconnect from unknown[127.0.0.3]")
    assert re.search(SYSLOG_PREFIX + r"connect from unknown\[127\.0\.0\.2\]$", log, re.M)
    assert re.search(
        SYSLOG_PREFIX
        + r"disconnect from unknown\[127\.0\.0\.2\] ehlo=1 mail=1 rcpt=1 data=1 quit=1 "
        r"commands=5$",
        log,
        re.M,
    ), log
    # Postfix's form for failures: ok/total, unknown commands counted, in Postfix's order
    assert re.search(
        SYSLOG_PREFIX + r"disconnect from unknown\[127\.0\.0\.3\] helo=1 mail=1 rcpt=0/1 "
        r"quit=1 unknown=0/1 commands=3/5$",
        log,
        re.M,
    ), log


async def test_noqueue_reject_line_esmtp(seed_gate: Gate, backend: RecordingBackend):
    c = await seed_gate.connect()
    await c.cmd("EHLO me.example.com")
    await c.cmd("MAIL FROM:<318787866@qq.com>")
    assert (await c.cmd("RCPT TO:<foo@bar.org>"))[0].startswith("554 5.7.1")
    await c.cmd("QUIT")
    await c.closed()
    log = await seed_gate.wait_log("disconnect from unknown[127.0.0.2]")
    line = (
        f"NOQUEUE: reject: RCPT from unknown[127.0.0.2]: {QQ_REJECT} proto=ESMTP "
        "helo=<me.example.com>"
    )
    assert re.search(SYSLOG_PREFIX + re.escape(line) + "$", log, re.M), log
    assert [m["host"] for m in FAIL2BAN.finditer(log)] == ["127.0.0.2"]
    assert [m["host"] for m in FAIL2BAN_SIMPLE.finditer(log)] == ["127.0.0.2"]


async def test_reject_after_an_accepted_recipient_has_a_queue_id(
    seed_gate: Gate, backend: RecordingBackend
):
    c = await seed_gate.connect()
    await c.cmd("EHLO me.example.com")
    await c.cmd("MAIL FROM:<318787866@qq.com>")
    assert await c.cmd("RCPT TO:<other@bar.org>") == ["250 2.1.5 Ok"]
    assert (await c.cmd("RCPT TO:<foo@bar.org>"))[0].startswith("554 5.7.1")
    await c.cmd("QUIT")
    await c.closed()
    log = await seed_gate.wait_log("disconnect from unknown[127.0.0.2]")
    reject = re.search(
        SYSLOG_PREFIX
        + r"(?P<qid>[0-9A-F]{10}): reject: RCPT from unknown\[127\.0\.0\.2\]: "
        + re.escape(QQ_REJECT + " proto=ESMTP helo=<me.example.com>")
        + "$",
        log,
        re.M,
    )
    assert reject, log
    assert f"{reject['qid']}: client=unknown[127.0.0.2]" in log
    assert "NOQUEUE: reject" not in log
    assert [m["host"] for m in FAIL2BAN.finditer(log)] == ["127.0.0.2"]


# -- the serve command -------------------------------------------------------------------------


def serve_config(tmp_path: Path, port: int, backend: RecordingBackend, seed: bool = True) -> Path:
    """A main.cf for ``serve``: the seed's restrictions (or none) plus the plumbing."""
    for name, text in SEED_TABLES.items():
        (tmp_path / name).write_text(text)
    config = tmp_path / "main.cf"
    restrictions = SEED_MAIN_CF if seed else "myhostname = mx.example.org\n"
    config.write_text(
        restrictions
        + f"listen = 127.0.0.1:{port}\n"
        + f"relayhost = {backend.relayhost}\n"
        + f"maillog_file = {tmp_path / 'maillog'}\n"
        + "syslog_name = postfix\n"
        + f"pid_file = {tmp_path / 'smtpgate.pid'}\n"
        + "smtpgate_user = nobody\n"
        + "smtpd_proxy_timeout = 10s\n"
    )
    return config


async def wait_file(path: Path, text: str, proc: asyncio.subprocess.Process) -> str:
    """Poll *path* (bounded) until it contains *text*; fail early if *proc* died."""
    async with asyncio.timeout(15):
        while True:
            content = path.read_text() if path.exists() else ""
            if text in content:
                return content
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"smtpgate exited {proc.returncode}: {err!r}\n{content}")
            await asyncio.sleep(0.02)  # poll interval of a bounded wait for a condition


async def test_serve_sigterm_drains_and_exits_0(tmp_path: Path):
    release = asyncio.Event()
    async with RecordingBackend(holds={"DOT": release}) as backend:
        port = free_port()
        config = serve_config(tmp_path, port, backend)
        maillog = tmp_path / "maillog"
        proc = await asyncio.create_subprocess_exec(
            SMTPGATE,
            "serve",
            "-c",
            str(config),
            "-o",
            "smtpgate_workers=2",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await wait_file(maillog, "smtpgate listening on", proc)
            c = await LineClient.connect("127.0.0.1", port, source="127.0.0.2")
            assert (await c.reply())[0].startswith("220 ")
            await c.cmd("EHLO me.example.com")
            await c.cmd("MAIL FROM:<318787866@qq.com>")
            assert (await c.cmd("RCPT TO:<foo@bar.org>"))[0].startswith("554 5.7.1")
            assert await c.cmd("RSET") == ["250 2.0.0 Ok"]
            assert await c.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
            assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
            assert (await c.cmd("DATA"))[0].startswith("354")
            await c.send_raw(BODY + b".\r\n")
            await backend.wait_for(lambda: "DOT" in backend.held, timeout=10)

            proc.send_signal(signal.SIGTERM)
            await wait_file(maillog, "stopping: no new connections", proc)
            release.set()
            [message] = backend.messages
            assert await c.reply() == [f"250 2.0.0 Ok: queued as {message.queue_id}"]
            assert await c.reply() == SHUTTING_DOWN
            assert await c.closed()
            await c.close()
            rc = await asyncio.wait_for(proc.wait(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        stderr = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert rc == 0, stderr
    log = maillog.read_text()
    lines = log.splitlines()
    assert lines and all(re.match(SYSLOG_PREFIX, line) for line in lines), log
    # the supervisor and its two workers, each line with its own process id
    pids = {re.match(SYSLOG_PREFIX, line)["pid"] for line in lines}  # type: ignore[index]
    assert str(proc.pid) in pids and len(pids) == 3, log
    assert [m["host"] for m in FAIL2BAN.finditer(log)] == ["127.0.0.2"]
    assert [m["host"] for m in FAIL2BAN_SIMPLE.finditer(log)] == ["127.0.0.2"]
    assert "proxy-accept: END-OF-MESSAGE" in log
    assert lines[-1].endswith("]: stopped")


async def test_serve_port_in_use_exits_nonzero_with_one_line(
    tmp_path: Path, backend: RecordingBackend
):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = serve_config(tmp_path, port, backend, seed=False)
        proc = await asyncio.create_subprocess_exec(
            SMTPGATE,
            "serve",
            "-c",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode not in (0, None)
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("smtpgate: fatal: ")
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    assert stdout == b""
    assert not os.path.exists(tmp_path / "smtpgate.pid")
