"""Big messages through a deployed smtpgate (2 workers, dropped privileges) and milters:
the message waits in a spool file (smtpgate_message_memory_limit, smtpgate_spool_directory)
while the milters read it, and the backend gets it changed as they said.

- a 5 MB message, one milter adding a header and one replacing the body: the backend
  stores the new header and the new body; both milters were sent the whole 5 MB body;
- the same with the header milter only: the backend stores the 5 MB body byte for byte;
- while a message comes in, the worker holds its spool file open, and that file has no
  name ("(deleted)"): the directory stays empty, and the file goes with the descriptor;
  once the message is done no spool file is open; a worker killed in the middle of a
  message leaves nothing in the directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpgate.milter import protocol as p
from tests.milter import fakemilter as f
from tests.milter.fakemilter import Connection, FakeMilter, Packet
from tests.processes import children, wait_until
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import running_gate

MAIN_CF = """\
myhostname = mx.example.org
mynetworks = 192.0.2.0/24
relay_domains = bar.org
smtpd_recipient_restrictions = reject_unauth_destination
smtpd_milters = {milters}
milter_default_action = tempfail
message_size_limit = 20000000
smtpgate_message_memory_limit = 65536
smtpgate_spool_directory = {spool}
"""

HEAD = b"From: friend@example.net\r\nTo: foo@bar.org\r\nSubject: big\r\n\r\n"
BODY = b"".join(b".%07d " % i + b"y" * 66 + b"\r\n" for i in range(70_000))  # 5.3 MB


@pytest.fixture
def spool() -> Iterator[Path]:
    """A spool directory that serve makes (the workers, user nobody, must reach it)."""
    parent = Path(tempfile.mkdtemp(prefix="smtpgate-spool-test."))
    parent.chmod(0o755)
    try:
        yield parent / "spool"
    finally:
        shutil.rmtree(parent)


def spool_files(pid: int, directory: Path) -> list[str]:
    """What process ``pid`` holds open in ``directory``."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


def open_in(gate: object, directory: Path) -> list[str]:
    return [t for pid in children(gate.proc.pid) for t in spool_files(pid, directory)]  # type: ignore[attr-defined]


def body_of(conn: Connection) -> bytes:
    return b"".join(packet.data for packet in conn.of(p.SMFIC_BODY))


async def envelope(c: LineClient) -> None:
    assert (await c.cmd("EHLO client.example"))[0].startswith("250-")
    assert await c.cmd("MAIL FROM:<friend@example.net>") == ["250 2.1.0 Ok"]
    assert await c.cmd("RCPT TO:<foo@bar.org>") == ["250 2.1.5 Ok"]
    assert (await c.cmd("DATA"))[0].startswith("354")


async def test_5mb_message_changed_by_two_milters(tmp_path: Path, spool: Path) -> None:
    replaced = 0

    def replace_first_body(conn: Connection, packet: Packet) -> bytes | object | None:
        nonlocal replaced
        if packet.command == p.SMFIC_BODYEOB and not replaced:
            replaced += 1
            return f.replbody(b"replaced body\r\n") + f.CONTINUE
        return conn.milter.default(conn, packet)

    header = f.answering(p.SMFIC_BODYEOB, f.addheader("X-Spool-Test", "added") + f.CONTINUE)
    async with (
        FakeMilter(header) as adds,
        FakeMilter(replace_first_body) as replaces,
        RecordingBackend(size=None) as backend,
    ):
        cf = MAIN_CF.format(milters=f"{adds.name}, {replaces.name}", spool=spool)
        async with running_gate(tmp_path, cf, backend) as gate:
            assert spool.is_dir() and spool.stat().st_mode & 0o777 == 0o700
            c = await gate.connect()
            wire = (HEAD + BODY).replace(b"\r\n.", b"\r\n..")
            for message in (1, 2):
                await envelope(c)
                half = len(wire) // 2
                await c.send_raw(wire[:half])
                # the message is in a spool file that has no name
                assert wait_until(lambda: len(open_in(gate, spool)) == 1), open_in(gate, spool)
                assert all(t.endswith("(deleted)") for t in open_in(gate, spool))
                assert os.listdir(spool) == []
                await c.send_raw(wire[half:] + b".\r\n")
                final = await c.reply()
                assert final[0].startswith("250 2.0.0 Ok: queued as "), (message, final)
                assert open_in(gate, spool) == []  # closed with the transaction
            await c.cmd("QUIT")
    first, second = backend.messages
    head, body = first.content.split(b"\r\n\r\n", 1)
    assert b"\r\nX-Spool-Test: added" in head and b"Subject: big" in head
    assert body == b"replaced body\r\n"
    head, body = second.content.split(b"\r\n\r\n", 1)
    assert b"\r\nX-Spool-Test: added" in head
    assert body == BODY  # 5 MB, byte for byte, dots unstuffed
    # each milter was sent each whole body (the second milter after the first's edits)
    assert [body_of(conn) for conn in adds.connections] == [BODY * 2]
    assert len(body_of(replaces.connections[0])) == 2 * len(BODY)


async def test_worker_killed_mid_message_leaves_no_file(tmp_path: Path, spool: Path) -> None:
    async with FakeMilter() as milter, RecordingBackend(size=None) as backend:
        cf = MAIN_CF.format(milters=milter.name, spool=spool)
        async with running_gate(tmp_path, cf, backend) as gate:
            c = await gate.connect()
            await envelope(c)
            await c.send_raw(HEAD + BODY[:2_000_000])
            assert wait_until(lambda: len(open_in(gate, spool)) == 1)
            (worker,) = {pid for pid in children(gate.proc.pid) if spool_files(pid, spool)}
            assert spool_files(worker, spool)[0].endswith("(deleted)")
            await gate.crash()  # SIGKILL, supervisor and workers
            assert wait_until(lambda: not os.path.exists(f"/proc/{worker}"))
            assert os.listdir(spool) == []
    assert backend.messages == []
