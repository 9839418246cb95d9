"""The processes the benchmark runs and the measurements it takes.

* :class:`Sink`: Postfix's ``smtp-sink``, the backend both front ends relay to.
* :class:`Gate`: ``smtpgate serve`` (this checkout, this venv) as a subprocess.
* :class:`PostfixRef`: a throwaway Postfix (tests/postfix_instance.py) whose smtpd is a
  before-queue proxy (``smtpd_proxy_filter``) in front of the same smtp-sink.
* :func:`run_source`: one ``smtp-source`` run, timed, its complaints checked.
* :func:`hold_sessions`: open N concurrent SMTP sessions and keep them open.
* :func:`pss_kib`: summed PSS of a process and all its descendants (smaps_rollup).

Both front ends get the same restriction text (:data:`SHARED_MAIN_CF`) and tables, written
into their own configuration directories. Everything listens on 127.0.0.1 only; smtpgate
gets no DNS (``smtpd_peername_lookup = no``, and ``dns_servers`` points at loopback).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.postfix_instance import PostfixInstance, free_port

ROOT = Path(__file__).resolve().parent.parent
SBIN_DIRS = ("/usr/sbin", "/usr/lib/postfix/sbin", "/usr/bin")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

#: The load generator (smtp-source) connects from 127.0.0.1, which must be a stranger: it
#: is kept out of mynetworks. The seed's restrictions plus reject_unauth_destination; no
#: per-client connection limit (all load comes from one address).
SHARED_MAIN_CF = """\
myhostname = mx.example.org
mydestination =
relay_domains = bar.org
mynetworks = 192.0.2.0/24
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_recipient_restrictions =
        permit_mynetworks
        reject_unauth_destination
        check_recipient_access hash:@DIR@/protected_destinations
smtpd_restriction_classes = good_senders_only
good_senders_only = check_sender_access hash:@DIR@/restricted_senders, permit
"""

TABLES = {
    "protected_destinations": "foo@bar.org     good_senders_only\n",
    "restricted_senders": "qq.com         521 5.7.1 go away\n163.com        521 5.7.1 go away\n",
}

#: Envelope of the relay workloads (accepted: the restriction class permits this sender)
#: and of the reject workloads (RCPT answered 521, then the server disconnects).
GOOD_SENDER = "someone@example.com"
BAD_SENDER = "someone@qq.com"
RECIPIENT = "foo@bar.org"
CLIENT_HELO = "client.example"


class BenchError(RuntimeError):
    """A process did not start, a workload failed, or a measurement is impossible."""


def find_binary(name: str) -> str:
    """The path of a Postfix tool (smtp-source, smtp-sink); BenchError if not installed."""
    for d in SBIN_DIRS:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found:
        return found
    raise BenchError(f"{name} not found: run bench/setup.sh (apt-get install postfix)")


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _wait_greeting(port: int, proc: subprocess.Popen[bytes] | None, what: str, log: Path) -> None:
    """Poll 127.0.0.1:port until it sends a 220 greeting; fail early if ``proc`` died."""
    end = time.monotonic() + START_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise BenchError(f"{what} did not greet on 127.0.0.1:{port} ({last}):\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def live_children() -> dict[int, list[int]]:
    """Parent pid -> the pids of its live (not zombie) children, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (from the ppid fields in /proc/*/stat)."""
    children = live_children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pss_kib(root: int) -> tuple[int, int]:
    """(summed PSS in KiB, number of processes) of ``root`` and all its descendants."""
    total = count = 0
    for pid in descendants(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue  # exited meanwhile
        m = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
        if m:
            total += int(m[1])
            count += 1
    return total, count


def cpu_seconds(root: int) -> float:
    """User + system CPU time consumed so far by ``root`` and its descendants.

    Live processes count their own time plus that of their children that have exited and
    been waited for (cutime, cstime): Postfix's master reaps smtpd processes that reach
    max_use or max_idle, and their time stays counted.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / ticks  # utime stime cutime cstime
    return total


def _terminate(proc: subprocess.Popen[bytes], pids: Sequence[int]) -> None:
    """SIGTERM ``proc``, wait for it, then SIGKILL any of ``pids`` (its children) left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    for pid in pids:
        if pid != proc.pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Sink:
    """``smtp-sink`` on 127.0.0.1: accepts and discards everything, pipelining announced."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.log = tmp / "smtp-sink.out"
        argv = [find_binary("smtp-sink"), "-u", "nobody", "-m", "20000"]
        argv += [f"127.0.0.1:{self.port}", "4096"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _wait_greeting(self.port, self.proc, "smtp-sink", self.log)

    def stop(self) -> None:
        _terminate(self.proc, [])


class Gate:
    """``python -m smtpgate serve`` with the shared config, relaying to the sink."""

    name = "smtpgate"

    def __init__(
        self, tmp: Path, sink_port: int, options: Sequence[str] = (), dirname: str = "smtpgate"
    ) -> None:
        self.dir = tmp / dirname
        self.dir.mkdir(mode=0o755)
        for name, text in TABLES.items():
            (self.dir / name).write_text(text)
        self.port = free_port()
        main_cf = SHARED_MAIN_CF.replace("@DIR@", str(self.dir))
        (self.dir / "main.cf").write_text(main_cf)
        self.maillog = self.dir / "maillog"
        self.log = self.dir / "serve.out"
        plumbing = {
            "listen": f"127.0.0.1:{self.port}",
            "relayhost": f"[127.0.0.1]:{sink_port}",
            "maillog_file": str(self.maillog),
            "pid_file": str(self.dir / "smtpgate.pid"),
            "smtpgate_user": "nobody",
            "smtpgate_connection_limit": "0",
            "dns_servers": "127.0.0.1",
        }
        argv = [sys.executable, "-m", "smtpgate", "serve", "-c", str(self.dir / "main.cf")]
        for name, value in plumbing.items():
            argv += ["-o", f"{name}={value}"]
        for option in options:  # the caller's -o options come last and win
            argv += ["-o", option]
        self.argv = argv
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            _wait_greeting(self.port, self.proc, "smtpgate serve", self.log)
        except BaseException:
            self.stop()
            raise

    @property
    def root_pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        _terminate(self.proc, descendants(self.proc.pid) if self.proc.poll() is None else [])


class PostfixRef:
    """Postfix 3.x from Debian as a before-queue proxy in front of the sink.

    ``smtpd_proxy_filter`` is set in main.cf rather than with ``-o`` in master.cf: only
    smtpd reads it, so the effect is the same (SMTPD_PROXY_README's setup).

    With ``milter`` it is instead an smtpd with ``smtpd_milters`` that queues the message
    and delivers it to the sink (relayhost): a before-queue proxy does not show the
    message to its milters (smtpd hands the content to the proxy, not to cleanup, where
    Postfix runs the milters' content events), so that is the Postfix an admin with rspamd
    runs.  The client's 250 then comes after the milters and the queue file's fsync.
    """

    name = "Postfix"

    def __init__(self, sink_port: int, process_limit: int, milter: str | None = None) -> None:
        main_cf = SHARED_MAIN_CF + f"default_process_limit = {process_limit}\n"
        if milter is None:
            main_cf += f"smtpd_proxy_filter = 127.0.0.1:{sink_port}\n"
        else:
            main_cf += (
                f"smtpd_milters = {milter}\nmilter_default_action = tempfail\n"
                f"relayhost = [127.0.0.1]:{sink_port}\n"
            )
        self.instance = PostfixInstance(main_cf, TABLES)
        self.port = self.instance.port
        try:
            self.instance.start()
        except BaseException:
            self.instance.close()
            raise

    @property
    def root_pid(self) -> int:
        pid_file = self.instance.spool / "pid" / "master.pid"
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            raise BenchError(f"no Postfix master pid in {pid_file}") from exc

    @property
    def version(self) -> str:
        out = subprocess.run(
            ["/usr/sbin/postconf", "-h", "mail_version"], capture_output=True, text=True
        )
        return out.stdout.strip() or "?"

    def stop(self) -> None:
        self.instance.close()


def new_tmp() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="smtpgate-bench-"))
    tmp.chmod(0o755)  # smtp-sink and smtpgate run as nobody after start-up
    return tmp


@dataclass(frozen=True)
class SourceRun:
    """One smtp-source run: its wall time and what went wrong (empty when all went as meant)."""

    seconds: float
    problems: list[str]


def run_source(
    port: int,
    *,
    sessions: int,
    count: int,
    size: int = 0,
    many_per_session: bool = False,
    reject: bool = False,
    timeout: float = 900.0,
) -> SourceRun:
    """Run smtp-source against 127.0.0.1:port and time it.

    ``count`` is the number of messages (for ``reject``, of sessions: each one is answered
    521 at RCPT and disconnected). ``many_per_session`` (-d) sends all of a session's share
    over one connection; otherwise each message gets its own session.
    """
    argv = [find_binary("smtp-source"), "-C", "5", "-s", str(sessions), "-m", str(count)]
    argv += ["-M", CLIENT_HELO, "-t", RECIPIENT]
    if reject:
        argv += ["-A", "-f", BAD_SENDER]  # -A: a 5xx is a warning, not the end of the run
    else:
        argv += ["-f", GOOD_SENDER]
    if size:
        argv += ["-l", str(size)]
    if many_per_session:
        argv.append("-d")
    argv.append(f"127.0.0.1:{port}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"smtp-source timed out after {timeout}s: {' '.join(argv)}") from exc
    seconds = time.perf_counter() - start
    lines = (proc.stdout + proc.stderr).splitlines()
    problems = []
    if proc.returncode != 0:
        problems.append(f"smtp-source exit {proc.returncode}")
    if reject:
        rejected = [ln for ln in lines if "rejected: 521" in ln]
        problems += [ln for ln in lines if "rejected: 521" not in ln]
        if len(rejected) != count:
            problems.append(f"{len(rejected)} of {count} sessions rejected with 521")
    else:
        problems += lines
    return SourceRun(seconds, problems)


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    """One complete SMTP reply's last line (b'' at end of file)."""
    while True:
        line = await reader.readline()
        if len(line) < 4 or line[3:4] != b"-":
            return line


@asynccontextmanager
async def hold_sessions(
    port: int, count: int, commands: Sequence[str], *, timeout: float = 180.0
) -> AsyncIterator[int]:
    """Open ``count`` sessions to 127.0.0.1:port, each greeted and through ``commands``
    (each answered 2xx), and keep them all open inside the ``async with``.

    Connects at most 200 at a time so as not to overflow the listen queue. Yields the number
    of sessions established; raises BenchError if any failed.
    """
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(200)
    failures: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                failures.append(f"connect: {exc}")
                return
            writers.append(writer)
            reply = await _read_reply(reader)
            for cmd in commands:
                if not reply.startswith(b"2"):
                    break
                writer.write(cmd.encode() + b"\r\n")
                reply = await _read_reply(reader)
            if not reply.startswith(b"2"):
                failures.append(reply.decode(errors="replace").strip() or "connection closed")

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(one() for _ in range(count)))
        if failures:
            raise BenchError(f"{len(failures)} of {count} sessions failed, e.g. {failures[0]}")
        yield len(writers)
    finally:
        for writer in writers:
            writer.close()
        for writer in writers:
            try:
                await writer.wait_closed()
            except OSError:
                pass
