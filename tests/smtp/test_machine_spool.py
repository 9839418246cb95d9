"""The machine's message store: a message beyond smtpgate_message_memory_limit goes to a
spool file, the memory budget (smtpgate_data_memory_limit) pays only for what is in
memory, the store is closed whatever ends the transaction, and what the backend gets
is the same bytes either way (DATA and BDAT)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from smtpgate.config import parse_settings
from smtpgate.config.service import ServiceConfig
from smtpgate.policy.plan import build_plan
from smtpgate.smtp.machine import SmtpMachine
from smtpgate.smtp.ports import LocalCounters, _Granted
from smtpgate.smtp.store import MessageStore, open_spool
from tests.smtp.test_machine_milters import Log
from tests.smtp.test_machine_routes import RecordingBackend

BOUND = 4096


class Budget(LocalCounters):
    """The anvil's DATA budget, with the most it ever lent at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0

    async def reserve(self, nbytes: int, limit: int) -> _Granted:
        if self.in_flight + nbytes > limit:
            return _Granted(False, self.in_flight)
        self.in_flight += nbytes
        self.peak = max(self.peak, self.in_flight)
        return _Granted()

    def release(self, nbytes: int) -> None:
        self.in_flight -= nbytes
        assert self.in_flight >= 0


class Stores:
    """The machine's store factory, keeping every store it made."""

    def __init__(self, directory: str | None) -> None:
        self.spool = open_spool(directory) if directory else None
        self.made: list[MessageStore] = []

    def __call__(self) -> MessageStore:
        self.made.append(MessageStore(BOUND, self.spool))
        return self.made[-1]


async def machine_for(tmp_path: Path, stores: Stores, budget: Budget, extra: str = "") -> Any:
    text = (
        "myhostname = mx.example.org\nmynetworks = 127.0.0.1/32\nrelay_domains = bar.org\n"
        "relayhost = [127.0.0.1]:9\nsmtpd_peername_lookup = no\n"
        "smtpgate_data_memory_limit = 1048576\nmessage_size_limit = 10240000\n" + extra
    )
    settings, _ = parse_settings(text, str(tmp_path / "main.cf"), hostname="mx.example.org")
    plan, diagnostics = build_plan(settings, strict_tables=True)
    assert plan is not None, [str(d) for d in diagnostics]
    backend = RecordingBackend()
    machine = SmtpMachine(
        plan=plan,
        config=ServiceConfig.from_settings(settings),
        backend=backend,
        anvil=budget,
        log=Log(),
        address="192.0.2.1",
        queue_ids=lambda: "QID",
        new_store=stores,
    )
    await machine.open()
    machine.greet()
    machine.backend_recorder = backend
    return machine


async def say(machine: Any, data: bytes) -> list[bytes]:
    """Input, and the replies to it (advance is called again while input may be left)."""
    machine.receive(data)
    out = [e for e in await machine.advance() if isinstance(e, bytes)]
    while machine.may_continue:
        out += [e for e in await machine.advance() if isinstance(e, bytes)]
    return out


def open_spool_files(directory: Path) -> list[str]:
    """This process's descriptors open on files in ``directory`` (O_TMPFILE: "#N (deleted)")."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + "/"):
            found.append(target)
    return found


async def envelope(machine: Any) -> None:
    for line in (b"EHLO c.example", b"MAIL FROM:<s@example.net>", b"RCPT TO:<u@bar.org>"):
        assert (await say(machine, line + b"\r\n"))[-1].startswith(b"250"), line


BODY = b"".join(b"line %06d " % i + b"x" * 50 + b"\r\n" for i in range(4000))  # ~256 KB
MESSAGE = b"Subject: big\r\n\r\n.leading dot\r\n" + BODY


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
async def test_spooled_message_reaches_the_backend_whole_and_costs_no_memory(
    tmp_path: Path, command: str
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    stores, budget = Stores(str(spool)), Budget()
    machine = await machine_for(tmp_path, stores, budget)
    await envelope(machine)
    seen_open = []
    if command == "DATA":
        assert (await say(machine, b"DATA\r\n"))[0].startswith(b"354")
        wire = MESSAGE.replace(b"\r\n.", b"\r\n..")
        for start in range(0, len(wire), 8192):
            assert await say(machine, wire[start : start + 8192]) == []
            seen_open.append(len(open_spool_files(spool)))
            # the budget holds the incomplete line and a first read, not the message
            assert budget.in_flight <= 2 * 65536, (start, budget.in_flight)
        out = await say(machine, b".\r\n")
    else:
        half = len(MESSAGE) // 2
        first, second = MESSAGE[:half], MESSAGE[half:]
        assert await say(machine, b"BDAT %d\r\n" % len(first) + first) == [
            b"250 2.0.0 Ok: %d bytes\r\n" % len(first)
        ]
        seen_open.append(len(open_spool_files(spool)))
        assert budget.in_flight <= 65536
        out = await say(machine, b"BDAT %d LAST\r\n" % len(second) + second)
    assert out == [b"250 2.0.0 Ok: queued as R1\r\n"]
    assert seen_open[-1] == 1  # the message was in a spool file while it came in
    store = stores.made[-1]
    assert store.closed and store.size == len(MESSAGE)
    assert open_spool_files(spool) == []  # closed with the transaction
    assert os.listdir(spool) == []  # and it never had a name
    assert budget.in_flight == 0 and budget.peak <= 2 * 65536
    sent = machine.backend_recorder.transactions[-1].message
    assert sent.endswith(b"\r\n" + MESSAGE)
    assert sent.startswith(b"Received: from c.example")
    assert b"\r\n\r\n" not in sent[: -len(MESSAGE)]  # only smtpgate's header before it


async def test_in_memory_message_is_charged_to_the_budget(tmp_path: Path) -> None:
    """Without a spool (explain's store) the whole message is in memory and paid for."""
    stores, budget = Stores(None), Budget()
    machine = await machine_for(tmp_path, stores, budget)
    await envelope(machine)
    await say(machine, b"DATA\r\n")
    await say(machine, MESSAGE.replace(b"\r\n.", b"\r\n.."))
    assert not stores.made[-1].spooled
    assert budget.in_flight >= len(MESSAGE)
    assert await say(machine, b".\r\n") == [b"250 2.0.0 Ok: queued as R1\r\n"]
    assert budget.in_flight == 0


@pytest.mark.parametrize("end", ["rset-after-bdat", "disconnect-in-data", "too-big", "nul"])
async def test_store_closed_whatever_ends_the_transaction(tmp_path: Path, end: str) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    stores, budget = Stores(str(spool)), Budget()
    machine = await machine_for(tmp_path, stores, budget, "message_size_limit = 100000\n")
    await envelope(machine)
    big = b"x" * 60 + b"\r\n"
    if end == "rset-after-bdat":
        chunk = big * 200
        await say(machine, b"BDAT %d\r\n" % len(chunk) + chunk)
        assert len(open_spool_files(spool)) == 1
        assert await say(machine, b"RSET\r\n") == [b"250 2.0.0 Ok\r\n"]
    elif end == "disconnect-in-data":
        await say(machine, b"DATA\r\n")
        await say(machine, big * 200)
        assert len(open_spool_files(spool)) == 1
        machine.receive_eof()
        await machine.advance()
        await machine.close()
    elif end == "too-big":
        await say(machine, b"DATA\r\n")
        out = await say(machine, big * 2000 + b".\r\n")
        assert out[-1].startswith(b"552 5.3.4 "), out
    else:
        await say(machine, b"DATA\r\n")
        out = await say(machine, big * 200 + b"nul\0\r\n.\r\n")
        assert out[-1].startswith(b"550 5.6.0 "), out
    assert all(store.closed for store in stores.made)
    assert open_spool_files(spool) == []
    assert machine.backend_recorder.transactions[-1:] == [] or (
        machine.backend_recorder.transactions[-1].message is None
    )
    await machine.close()
    assert budget.in_flight == 0


def test_spool_file_is_private_and_nameless(tmp_path: Path) -> None:
    store = MessageStore(10, open_spool(str(tmp_path)))
    store.append(b"a" * 11)
    assert store.spooled and os.listdir(tmp_path) == []
    (target,) = open_spool_files(tmp_path)
    assert target.endswith("(deleted)")
    fd = int(next(fd for fd in os.listdir("/proc/self/fd") if _points_to(fd, target)))
    assert os.stat(fd).st_mode & 0o777 == 0o600
    assert list(store.chunks()) == [b"a" * 11]
    store.close()
    store.close()
    assert open_spool_files(tmp_path) == []


def _points_to(fd: str, target: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == target
    except OSError:
        return False


class FullDisk:
    """A spool file on a full disk."""

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
async def test_full_disk_is_451_and_the_rest_is_read_as_content(
    tmp_path: Path, command: str
) -> None:
    budget = Budget()
    stores = Stores(None)
    stores.spool = FullDisk  # type: ignore[assignment]
    machine = await machine_for(tmp_path, stores, budget)
    await envelope(machine)
    # a line in the content that must never be taken for a command
    content = b"x" * 5000 + b"\r\nRSET\r\n" + b"y" * 5000 + b"\r\n"
    if command == "DATA":
        await say(machine, b"DATA\r\n")
        out = await say(machine, content + b".\r\n")
    else:
        out = await say(machine, b"BDAT %d LAST\r\n" % len(content) + content)
    assert out == [b"451 4.3.0 Error: local error while processing\r\n"]
    assert any("cannot spool the message" in line for line in machine.log.lines), machine.log
    assert budget.in_flight == 0
    await envelope(machine)  # the session goes on
    await machine.close()
