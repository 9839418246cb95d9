"""`smtpgate serve` with worker processes: own sockets, reload, stop, and a replaced worker.

Real processes: the CLI in a subprocess with ``smtpgate_workers = 2``.  Which worker takes
which connection is the kernel's business (SO_REUSEPORT hashes the client's address and
port); only that every worker gets some of many connections is asserted.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import children, session, wait_until
from tests.test_newcomer import SMTPGATE, free_port, wait_for_port, write_config

Serving = tuple[subprocess.Popen[str], int, Path]


@pytest.fixture
def workers(public_dir: Path) -> Iterator[Serving]:
    port = free_port()
    folder = public_dir / "etc"
    cf = write_config(folder)
    proc = subprocess.Popen(
        [
            *SMTPGATE,
            "serve",
            "-c",
            str(cf),
            "-o",
            f"listen=127.0.0.1:{port}",
            "-o",
            f"pid_file={folder / 'smtpgate.pid'}",
            "-o",
            f"maillog_file={folder / 'maillog'}",
            "-o",
            "smtpd_peername_lookup=no",
            "-o",
            "smtpgate_user=nobody",
            "-o",
            "smtpgate_workers=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port)
        assert wait_until(lambda: len(children(proc.pid)) == 2)
        yield proc, port, folder
    finally:
        kids = children(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        for pid in kids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_workers_answer_sessions(workers: Serving):
    proc, port, folder = workers
    assert Path(folder / "smtpgate.pid").read_text().strip() == str(proc.pid)
    answers = [session(port, "someone@qq.com") for _ in range(12)]
    assert all(a.startswith("554") and "Access denied" in a for a in answers), answers
    log = folder / "maillog"
    assert wait_until(lambda: log.read_text().count("NOQUEUE: reject: RCPT") >= 12)
    lines = log.read_text().splitlines()
    line_form = re.compile(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d mx postfix/smtpd\[(\d+)\]: ")
    assert all(line_form.match(line) for line in lines), lines
    worker_pids = {str(pid) for pid in children(proc.pid)}
    rejecting = {
        line_form.match(line).group(1)  # type: ignore[union-attr]
        for line in lines
        if "NOQUEUE: reject" in line
    }
    assert rejecting and rejecting <= worker_pids
    assert "smtpgate started 2 worker processes" in log.read_text()


def listening_sockets(port: int) -> int:
    """How many sockets listen on 127.0.0.1:port (from /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[1] == local and row.split()[3] == "0A")


def test_each_worker_has_its_own_socket(workers: Serving):
    """SO_REUSEPORT: one accept queue per worker, so a burst is spread over both."""
    proc, port, folder = workers
    assert listening_sockets(port) == 2
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
    try:
        for sock in clients:
            assert sock.makefile("rb").readline().startswith(b"220")
    finally:
        for sock in clients:
            sock.close()
    log = folder / "maillog"
    assert wait_until(lambda: log.read_text().count("connect from") >= 40)
    serving = set(re.findall(r"smtpd\[(\d+)\]: connect from", log.read_text()))
    assert serving == {str(pid) for pid in children(proc.pid)}


def test_workers_keep_what_they_need_after_dropping_privileges(workers: Serving):
    """The parent imports, before it drops to smtpgate_user, what the workers would
    otherwise import on first use (uvloop, the IDNA codec...): after the drop the
    interpreter's files may be unreadable (a Python under /root, as on this machine)."""
    proc, port, folder = workers
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    log = folder / "maillog"
    assert wait_until(lambda: log.read_text().count(f"(event loop: {loop})") == 2), log.read_text()
    reply = session(port, "a@example.net", "u@bücher.example")
    # a non-ASCII domain goes through the IDNA codec: a policy answer, not a local error
    assert reply.startswith("454 4.7.1 <u@bücher.example>: Relay access denied"), reply
    assert "unexpected error" not in log.read_text()


def test_sighup_reload_replaces_every_worker(workers: Serving):
    """A reload is a generation swap: new workers with the new files, the old ones gone."""
    proc, port, folder = workers
    before = set(children(proc.pid))
    assert "554" in session(port, "someone@qq.com")
    (folder / "senders").write_text("qq.com 521 go away\n")
    proc.send_signal(signal.SIGHUP)
    log = folder / "maillog"
    assert wait_until(lambda: "reloaded" in log.read_text()), log.read_text()
    answers = [session(port, "someone@qq.com") for _ in range(8)]
    assert all(a.startswith("521") for a in answers), answers
    assert wait_until(lambda: len(children(proc.pid)) == 2)
    assert not set(children(proc.pid)) & before


def test_sigterm_stops_parent_and_workers(workers: Serving):
    proc, port, folder = workers
    kids = children(proc.pid)
    assert len(kids) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    for pid in kids:
        assert wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 5)
    assert "stopped" in (folder / "maillog").read_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_killed_worker_is_replaced(workers: Serving):
    proc, port, folder = workers
    victim = children(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in children(proc.pid) and len(children(proc.pid)) == 2), (
        children(proc.pid)
    )
    log = (folder / "maillog").read_text()
    assert f"worker {victim} died (killed by signal 9); starting a new one" in log
    assert all("554" in session(port, "someone@qq.com") for _ in range(6))
    assert proc.poll() is None


def test_workers_dying_too_often_stop_the_service(workers: Serving):
    proc, _, folder = workers
    for _ in range(5):
        assert wait_until(lambda: len(children(proc.pid)) == 2 or proc.poll() is not None)
        if proc.poll() is not None:
            break
        victim = children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda v=victim: v not in children(proc.pid) or proc.poll() is not None)
    assert proc.wait(timeout=30) == 1
    assert "worker deaths within 60s: stopping smtpgate" in (folder / "maillog").read_text()
