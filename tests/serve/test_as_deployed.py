"""The default gate of these tests is smtpgate as deployed (tests/serve/conftest.py).

Two workers, and when the suite runs as root: workers that run as nobody, in front of a
main.cf, tables and TLS files that only root may read.  If the fixture ever stopped doing
that, every serve test would quietly test something else: these checks say so.
"""

from __future__ import annotations

import pwd
import stat
from pathlib import Path

from tests.processes import children
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import IS_ROOT, SEED_TABLES, WORKERS, DeployedGate, running_gate
from tests.serve.test_tls import inbound_tls, upgrade


def uids(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return {int(field) for field in line.split()[1:]}
    raise AssertionError(f"no Uid line for {pid}")


def root_only(path: Path) -> bool:
    mode = path.stat()
    return mode.st_uid == 0 and stat.S_IMODE(mode.st_mode) & 0o077 == 0


async def test_default_gate_has_workers_that_dropped_privileges(seed_gate: DeployedGate):
    workers = children(seed_gate.proc.pid)
    assert len(workers) == WORKERS
    if IS_ROOT:
        nobody = pwd.getpwnam("nobody").pw_uid
        assert all(uids(pid) == {nobody} for pid in workers)
        assert uids(seed_gate.proc.pid) == {0}  # the supervisor keeps root for reloads
        folder = seed_gate.maillog.parent
        for path in (folder, folder / "main.cf", *(folder / name for name in SEED_TABLES)):
            assert root_only(path), path
    c = await seed_gate.connect()
    assert (await c.cmd("HELO client.example"))[0] == "250 mx.example.org"


async def test_root_only_tls_files_serve_starttls(tmp_path: Path, backend: RecordingBackend):
    async with running_gate(tmp_path, inbound_tls("may"), backend) as gate:
        config = (tmp_path / "main.cf").read_text()
        copies = [tmp_path / "tls" / p.name for p in (tmp_path / "tls").iterdir()]
        assert len(copies) == 2 and all(str(p) in config for p in copies)
        if IS_ROOT:
            assert root_only(tmp_path / "tls") and all(root_only(p) for p in copies)
        c = await gate.connect()
        await c.cmd("EHLO client.example")
        await upgrade(c)
        assert (await c.cmd("EHLO client.example"))[0] == "250-mx.example.org"
    assert "Permission denied" not in gate.log
