"""What a newcomer meets: errors that read like help, reload, privileges — real processes.

Each error is the one-line message `smtpgate` prints, checked through the real CLI in a
subprocess (or the real Server object where a process adds nothing).
"""

from __future__ import annotations

import io
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpgate.generation import load_generation
from smtpgate.logs import MailLog
from smtpgate.server import Server
from tests.processes import children, session
from tests.serve.client import LineClient

SMTPGATE = [sys.executable, "-m", "smtpgate"]
IS_ROOT = os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(folder: Path, extra: str = "", **tables: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    for name, text in tables.items():
        (folder / name).write_text(text)
    path = folder / "main.cf"
    path.write_text(
        "myhostname = mx.example.org\n"
        "smtpd_peername_lookup = no\n"
        "relay_domains = bar.org\n"
        "mynetworks =\n"
        "relayhost = [127.0.0.1]:9\n"
        "smtpd_recipient_restrictions = reject_unauth_destination,\n"
        "    check_sender_access texthash:$config_directory/senders\n" + extra
    )
    if "senders" not in tables:
        (folder / "senders").write_text("qq.com REJECT\n")
    return path


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SMTPGATE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_for_port(port: int, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)  # poll interval of a bounded wait for a condition
    raise AssertionError(f"nothing listens on {port} after {deadline}s")


@pytest.fixture
def serving(public_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    """`smtpgate serve` in a subprocess (as nobody when run by root); yields (proc, port, dir).

    The folder is readable by nobody: a reload re-reads the files with the dropped rights.
    """
    port = free_port()
    folder = public_dir / "etc"
    cf = write_config(folder)
    args = [
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
        "smtpgate_user=nobody",
    ]
    proc = subprocess.Popen(
        [*SMTPGATE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_port(port)
        yield proc, port, folder
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)  # also closes the pipes


def test_missing_config_file_says_what_to_do(tmp_path: Path):
    result = run("check", "-c", str(tmp_path / "main.cf"))
    assert result.returncode == 2
    assert f"{tmp_path / 'main.cf'}: No such file or directory: create it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_port_in_use_is_one_line_with_advice(tmp_path: Path):
    cf = write_config(tmp_path / "etc")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(
            "serve",
            "-c",
            str(cf),
            "-o",
            f"listen=127.0.0.1:{port}",
            "-o",
            "pid_file=",
            "-o",
            "smtpgate_user=nobody",
        )
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        f"smtpgate: fatal: cannot listen on 127.0.0.1:{port}: the address is already in use "
        "(another smtpgate or MTA runs there): stop it, or change listen"
    )


@pytest.mark.skipif(
    not IS_ROOT or shutil.which("setpriv") is None, reason="needs root to become nobody"
)
def test_port_25_without_privileges_explains(public_dir: Path):
    cf = write_config(public_dir / "etc")
    nobody = pwd.getpwnam("nobody")
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            *SMTPGATE,
            "serve",
            "-c",
            str(cf),
            "-o",
            "listen=127.0.0.1:25",
            "-o",
            "pid_file=",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert "permission denied: ports below 1024 need root" in result.stderr
    assert "listen = 0.0.0.0:2525" in result.stderr


def test_table_syntax_error_names_file_and_line(tmp_path: Path):
    cf = write_config(tmp_path / "etc", senders="qq.com REJECT\nbad-line-without-value\n")
    result = run("check", "-c", str(cf))
    assert f"{tmp_path / 'etc' / 'senders'}, line 2:" in result.stderr
    assert "expected format: key whitespace value" in result.stderr


def test_missing_table_is_an_error_in_check(tmp_path: Path):
    folder = tmp_path / "etc"
    cf = write_config(folder)
    (folder / "senders").unlink()
    result = run("check", "-c", str(cf))
    assert result.returncode == 2
    assert f"{cf}, line 6" in result.stderr and "No such file or directory" in result.stderr


async def test_unreachable_relayhost_warns_and_keeps_serving(tmp_path: Path):
    cf = write_config(
        tmp_path / "etc", f"listen = 127.0.0.1:0\nrelayhost = [127.0.0.1]:{free_port()}\n"
    )
    generation, _ = load_generation(str(cf))
    assert generation is not None
    log = io.StringIO()
    server = Server(generation, MailLog("mx.example.org", stream=log))
    await server.start()
    try:
        await server.probe_relayhost()
        assert "is not reachable now (Connection refused): smtpgate keeps serving" in log.getvalue()
        host, port = server.sockets[0]
        client = await LineClient.connect(host, port)
        assert (await client.reply())[0].startswith("220 ")
        await client.cmd("HELO me.example.com")
        await client.cmd("MAIL FROM:<a@example.net>")
        assert await client.cmd("RCPT TO:<x@bar.org>") == [
            "451 4.3.0 Error: queue file write error"
        ]
        await client.close()
    finally:
        await server.stop(drain_timeout=2)


def test_reload_command_signals_the_running_server(serving):
    proc, port, folder = serving
    (folder / "senders").write_text("qq.com 521 go away\n")
    result = run(
        "reload", "-c", str(folder / "main.cf"), "-o", f"pid_file={folder / 'smtpgate.pid'}"
    )
    assert result.returncode == 0, result.stderr
    # the verdict comes once the new workers serve: no waiting for the log
    assert result.stdout == f"smtpgate: reloaded {folder / 'main.cf'}\n"
    assert "reloaded" in (folder / "maillog").read_text()
    assert session(port, "a@qq.com").startswith("521 5.7.1 <a@qq.com>")
    broken = run("reload", "-c", str(folder / "missing.cf"))
    assert broken.returncode == 2 and "No such file or directory" in broken.stderr


@pytest.mark.skipif(not IS_ROOT, reason="privileges can only be dropped by root")
def test_root_drops_to_smtpgate_user(serving):
    """Like Postfix's master: the supervisor stays root (it re-reads root-only keys and
    tables at a reload); every process that talks to a client is smtpgate_user."""

    def uids(pid: int) -> set[str]:
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        return set(uid_line.split()[1:])

    proc, _, _ = serving
    assert uids(proc.pid) == {"0"}
    workers = children(proc.pid)
    assert workers
    assert all(uids(pid) == {str(pwd.getpwnam("nobody").pw_uid)} for pid in workers)


@pytest.mark.skipif(not IS_ROOT, reason="privileges can only be dropped by root")
def test_unknown_smtpgate_user_refuses_to_run_as_root(tmp_path: Path):
    cf = write_config(tmp_path / "etc")
    result = run(
        "serve",
        "-c",
        str(cf),
        "-o",
        f"listen=127.0.0.1:{free_port()}",
        "-o",
        "pid_file=",
        "-o",
        "smtpgate_user=no-such-user-here",
    )
    assert result.returncode == 2
    assert "smtpgate_user = no-such-user-here: no such user: create it" in result.stderr


def test_sigterm_stops_cleanly(serving):
    proc, port, folder = serving
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "stopped" in (folder / "maillog").read_text()
    stale = run(
        "reload", "-c", str(folder / "main.cf"), "-o", f"pid_file={folder / 'smtpgate.pid'}"
    )
    assert stale.returncode == 3
    assert "no smtpgate serve answers for pid_file" in stale.stderr
    assert "is it running?" in stale.stderr
    del port
