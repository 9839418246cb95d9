"""Fixtures: a running smtpgate on 127.0.0.1 in front of a backend, as it is deployed.

:func:`running_gate` starts the real ``smtpgate serve`` command: a supervisor and two
worker processes sharing the port, writing ``maillog_file``.  When the suite runs as
root (CI does) the workers drop to ``nobody``, and main.cf, the tables and every TLS
certificate and key are readable by root only, in a folder only root may enter: the
supervisor reads them all before the drop, and a worker never opens them again.

A test that needs the server inside its own event loop (it calls ``Server.stop()``,
reads or changes ``gate.server.shared``) asks for it with ``in_process="why"``: one
process, one worker, no privilege drop, the log in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from smtpgate.config import parse_settings
from smtpgate.generation import Generation
from smtpgate.logs import MailLog
from smtpgate.server import Server
from tests.serve.backend import ConnectionRecord, RecordingBackend
from tests.serve.client import LineClient

SEED_TABLES = {
    "protected_destinations": "foo@bar.org     good_senders_only\n",
    "restricted_senders": "qq.com         REJECT  521\n163.com        REJECT  521\n",
}
SEED_MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_recipient_restrictions =
        permit_mynetworks
        check_recipient_access hash:$config_directory/protected_destinations
smtpd_restriction_classes = good_senders_only
good_senders_only = check_sender_access hash:$config_directory/restricted_senders, permit
"""
IS_ROOT = os.geteuid() == 0
WORKERS = 2
"""Worker processes of a deployed gate: more than one, as in the field."""
START_DEADLINE = 30.0
"""Seconds `smtpgate serve` may take to listen (the machine may be busy)."""
STOP_DEADLINE = 15.0
"""Seconds it may take to stop after SIGTERM, once the test's clients have gone."""
LOG_DEADLINE = 10.0
TLS_FILES = (
    "smtpd_tls_cert_file",
    "smtpd_tls_key_file",
    "smtpd_tls_CAfile",
    "smtpd_tls_chain_files",
    "smtp_tls_CAfile",
    "smtp_tls_cert_file",
    "smtp_tls_key_file",
    "smtp_tls_chain_files",
)
LISTENING = re.compile(r"smtpgate listening on 127\.0\.0\.1:(\d+) ")


class Gate:
    """A started smtpgate: its port, its log text, and a way to connect."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.clients: list[LineClient] = []

    @property
    def log(self) -> str:
        """The log so far.  A line logged before a reply is there once the client has the
        reply; for lines logged later (a disconnect, a timeout) use :meth:`wait_log`."""
        raise NotImplementedError

    async def wait_log(self, text: str, deadline: float = LOG_DEADLINE) -> str:
        """The log once it contains ``text``; fails after ``deadline`` seconds."""
        end = time.monotonic() + deadline
        while text not in (log := self.log):
            if time.monotonic() > end:
                raise AssertionError(f"not logged within {deadline}s: {text!r}\n{log}")
            await asyncio.sleep(0.02)  # poll interval of a bounded wait for a condition
        return log

    async def connect(self, source: str = "127.0.0.2") -> LineClient:
        client = await LineClient.connect(self.host, self.port, source=source)
        self.clients.append(client)
        greeting = await client.reply()
        assert greeting[0].startswith("220 "), greeting
        return client

    async def close_clients(self) -> None:
        for client in self.clients:
            await client.close()


class DeployedGate(Gate):
    """`smtpgate serve` in a subprocess: supervisor and workers, logging to a file."""

    def __init__(self, proc: asyncio.subprocess.Process, maillog: Path, port: int) -> None:
        super().__init__("127.0.0.1", port)
        self.proc = proc
        self.maillog = maillog
        self.crashed = False

    @property
    def log(self) -> str:
        return self.maillog.read_text() if self.maillog.exists() else ""

    async def crash(self) -> None:
        """SIGKILL the supervisor and its workers at once (a machine that dies); the
        fixture then does not stop it."""
        self.crashed = True
        os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()


class InProcessGate(Gate):
    """A :class:`Server` in the test's own event loop (one worker, no privilege drop)."""

    def __init__(self, server: Server, log: io.StringIO) -> None:
        host, port = server.sockets[0]
        super().__init__(host, port)
        self.server = server
        self._log = log

    @property
    def log(self) -> str:
        return self._log.getvalue()


GateFactory = Callable[..., "asynccontextmanager[Gate]"]


@asynccontextmanager
async def running_gate(
    tmp_path: Path,
    main_cf: str,
    backend: RecordingBackend | None,
    tables: dict[str, str] | None = None,
    overrides: tuple[str, ...] = (),
    relayhost: str | None = None,
    *,
    workers: int = WORKERS,
    in_process: str = "",
) -> AsyncIterator[Any]:
    """A started smtpgate; ``relayhost`` (default: the backend's) points it elsewhere, e.g.
    at a real Postfix.

    By default `smtpgate serve` runs as deployed (see the module docstring) with
    ``workers`` worker processes; a test that needs one worker says why in a comment.
    ``in_process`` (the reason, required) builds the Server in this event loop instead;
    the gate then has ``.server``.
    """
    if relayhost is None:
        relayhost = backend.relayhost if backend is not None else "[127.0.0.1]:9"
    # Tests never ask the machine's DNS server (a private address here) for anything:
    # no client name lookups unless a test's main.cf turns them on (with dns_servers).
    text = f"smtpd_peername_lookup = no\n{main_cf}\nrelayhost = {relayhost}\n"
    if in_process:
        for name, body in (tables or {}).items():
            (tmp_path / name).write_text(body)
        async with _in_process_gate(tmp_path, text + "listen = 127.0.0.1:0\n", overrides) as g:
            yield g
        return
    async with _deployed_gate(tmp_path, text, tables or {}, overrides, workers) as gate:
        for override in overrides:
            if override.replace(" ", "").startswith("relayhost="):
                relayhost = override.split("=", 1)[1].strip()
        if backend is not None and not backend.down and relayhost == backend.relayhost:
            await _forget_the_probe(backend)
        yield gate


async def _forget_the_probe(backend: RecordingBackend) -> None:
    """Wait for the relayhost probe a deployed server makes at start (its first worker
    connects and closes, see ``Server.probe_relayhost``), and take it off the backend's
    record: the test's own connections are numbered from 0, as in-process.  (Nothing
    else connects before the gate is handed to the test.)"""

    def probe() -> ConnectionRecord | None:
        # not necessarily closed yet: a backend that never greets (delays) holds it
        return next((c for c in backend.connections if not c.commands), None)

    await backend.wait_for(lambda: probe() is not None, timeout=LOG_DEADLINE)
    backend.connections.remove(probe())  # type: ignore[arg-type]
    for index, record in enumerate(backend.connections):
        record.index = index


@asynccontextmanager
async def _in_process_gate(
    tmp_path: Path, text: str, overrides: tuple[str, ...]
) -> AsyncIterator[InProcessGate]:
    settings, _ = parse_settings(
        text, str(tmp_path / "main.cf"), overrides, hostname="mx.example.org"
    )
    log = io.StringIO()
    server = Server(
        Generation.from_settings(settings), MailLog("mx.example.org", "postfix", stream=log)
    )
    await server.start()
    gate = InProcessGate(server, log)
    try:
        yield gate
    finally:
        await gate.close_clients()
        await server.stop(drain_timeout=2)


def _root_only(path: Path) -> None:
    """Readable by root only when the suite runs as root (as key files and tables are)."""
    path.chmod(0o600 if path.is_file() else 0o700)


def _private_tls_files(
    folder: Path, text: str, overrides: tuple[str, ...]
) -> tuple[str, tuple[str, ...]]:
    """Copy the TLS files the configuration names into ``folder`` (root-only), and
    rewrite the configuration and overrides to name the copies."""
    settings, _ = parse_settings(
        text, str(folder / "main.cf"), overrides, hostname="mx.example.org"
    )
    tls = folder / "tls"
    for name in TLS_FILES:
        for value in re.split(r"[\s,]+", settings.get(name) or ""):
            source = Path(value)
            if not value or not source.is_file() or source.parent == tls:
                continue
            tls.mkdir(mode=0o700, exist_ok=True)
            copy = tls / f"{len(list(tls.iterdir()))}-{source.name}"
            shutil.copyfile(source, copy)
            _root_only(copy)
            text = text.replace(value, str(copy))
            overrides = tuple(o.replace(value, str(copy)) for o in overrides)
    return text, overrides


@asynccontextmanager
async def _deployed_gate(
    tmp_path: Path,
    text: str,
    tables: dict[str, str],
    overrides: tuple[str, ...],
    workers: int,
) -> AsyncIterator[DeployedGate]:
    folder = tmp_path  # main.cf's folder: $config_directory, and tests name tmp_path
    _root_only(folder)
    for name, body in tables.items():
        (folder / name).write_text(body)
        _root_only(folder / name)
    if not re.search(r"^myhostname\s*=", text, re.M):  # as in-process: not the machine's
        text = "myhostname = mx.example.org\n" + text
    text, overrides = _private_tls_files(folder, text, overrides)
    config = folder / "main.cf"
    config.write_text(text)
    _root_only(config)
    maillog = folder / "maillog"
    stderr = folder / "serve.stderr"
    args = [
        "serve", "-c", str(config), *(a for o in overrides for a in ("-o", o)),
        "-o", "listen=127.0.0.1:0",
        "-o", f"maillog_file={maillog}",
        "-o", f"pid_file={folder / 'smtpgate.pid'}",
        "-o", "smtpgate_user=nobody",
        "-o", f"smtpgate_workers={workers}",
    ]  # fmt: skip
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "smtpgate", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
        )  # fmt: skip
    try:
        port = await _listening(proc, maillog, stderr, workers)
        gate = DeployedGate(proc, maillog, port)
        try:
            yield gate
        finally:
            await gate.close_clients()
        if gate.crashed:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            status = await asyncio.wait_for(proc.wait(), STOP_DEADLINE)
        except TimeoutError:
            raise AssertionError(
                f"smtpgate serve did not stop within {STOP_DEADLINE}s of SIGTERM\n{gate.log}"
            ) from None
        log = gate.log
        assert status == 0, f"smtpgate serve exited {status}: {stderr.read_text()}\n{log}"
        # a worker that died (and was replaced) would otherwise go unnoticed
        assert " died (" not in log and "error: worker" not in log, log
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the session start_new_session made
            await proc.wait()


async def _listening(
    proc: asyncio.subprocess.Process, maillog: Path, stderr: Path, workers: int
) -> int:
    """Wait (bounded) until every worker listens; the port they share."""
    end = time.monotonic() + START_DEADLINE
    while True:
        log = maillog.read_text() if maillog.exists() else ""
        ports = LISTENING.findall(log)
        if len(ports) >= workers:
            assert len(set(ports)) == 1, log
            return int(ports[0])
        if proc.returncode is not None:
            raise AssertionError(f"smtpgate serve exited {proc.returncode}: {stderr.read_text()}")
        if time.monotonic() > end:
            raise AssertionError(f"smtpgate serve did not listen within {START_DEADLINE}s\n{log}")
        await asyncio.sleep(0.02)  # poll interval of a bounded wait for a condition


@pytest.fixture
async def backend() -> AsyncIterator[RecordingBackend]:
    async with RecordingBackend() as b:
        yield b


@pytest.fixture
async def seed_gate(tmp_path: Path, backend: RecordingBackend) -> AsyncIterator[Gate]:
    async with running_gate(tmp_path, SEED_MAIN_CF, backend, SEED_TABLES) as gate:
        yield gate
