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
import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class HarnessConfig:
    """How the two sides and the load are set up; ``today`` is the configuration the
    benchmark has always used, ``independent`` the one of issue 16's independent harness.
    Every field can be changed alone (``--vary name=value``) to find which one matters."""

    name: str
    #: where the load comes from ("" = the kernel's choice, 127.0.0.1); smtp-source gets
    #: it through the LD_PRELOAD shim bench/bindsrc.c, the load generator binds it itself
    source: str = ""
    mynetworks: str = "192.0.2.0/24"
    #: smtpd_client_event_limit_exceptions for both sides ("" = the default, $mynetworks)
    event_exceptions: str = ""
    #: Postfix's default_process_limit (0 = the largest session count + 100)
    process_limit: int = 0
    #: smtpgate logs to maillog_file (yes) or to standard error, its default (no)
    gate_maillog_file: bool = True
    #: smtpgate_connection_limit = 0 (yes) or smtpgate's default, 1000 (no)
    gate_no_connection_limit: bool = True
    #: dns_servers = 127.0.0.1 for smtpgate (yes) or its default, /etc/resolv.conf (no)
    gate_dns_loopback: bool = True

    def main_cf(self, base: str) -> str:
        """``base`` (SHARED_MAIN_CF or a variant) with this configuration's lines."""
        text = re.sub(r"^mynetworks = .*$", f"mynetworks = {self.mynetworks}", base, flags=re.M)
        if self.event_exceptions:
            text += f"smtpd_client_event_limit_exceptions = {self.event_exceptions}\n"
        return text

    def vary(self, settings: Sequence[str]) -> HarnessConfig:
        """A copy with ``name=value`` settings applied (BenchError for an unknown name)."""
        import dataclasses

        changes: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for setting in settings:
            name, _, value = setting.partition("=")
            if name not in fields or name == "name":
                raise BenchError(f"--vary {setting}: no such harness setting ({', '.join(fields)})")
            current = getattr(self, name)
            if isinstance(current, bool):
                changes[name] = value.lower() in ("yes", "true", "1")
            elif isinstance(current, int):
                changes[name] = int(value)
            else:
                changes[name] = value
        if not changes:
            return self
        label = self.name + "".join(f" {k}={v}" for k, v in changes.items())
        return dataclasses.replace(self, name=label, **changes)


HARNESSES = {
    "today": HarnessConfig("today"),
    "independent": HarnessConfig(
        "independent",
        source="127.0.0.2",
        mynetworks="127.0.0.1/32",
        event_exceptions="127.0.0.0/8",
        process_limit=600,
        gate_maillog_file=False,
        gate_no_connection_limit=False,
        gate_dns_loopback=False,
    ),
}


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
        self,
        tmp: Path,
        sink_port: int,
        options: Sequence[str] = (),
        dirname: str = "smtpgate",
        config: HarnessConfig | None = None,
        main_cf_extra: str = "",
    ) -> None:
        config = config or HARNESSES["today"]
        self.dir = tmp / dirname
        self.dir.mkdir(mode=0o755)
        for name, text in TABLES.items():
            (self.dir / name).write_text(text)
        self.port = free_port()
        main_cf = config.main_cf(SHARED_MAIN_CF) + main_cf_extra
        (self.dir / "main.cf").write_text(main_cf.replace("@DIR@", str(self.dir)))
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
        if not config.gate_maillog_file:
            del plumbing["maillog_file"]  # log lines go to standard error: serve.out
        if not config.gate_no_connection_limit:
            del plumbing["smtpgate_connection_limit"]
        if not config.gate_dns_loopback:
            del plumbing["dns_servers"]
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

    def __init__(
        self,
        sink_port: int,
        process_limit: int,
        milter: str | None = None,
        config: HarnessConfig | None = None,
    ) -> None:
        config = config or HARNESSES["today"]
        process_limit = config.process_limit or process_limit
        main_cf = config.main_cf(SHARED_MAIN_CF) + f"default_process_limit = {process_limit}\n"
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


_shim: Path | None = None


def bind_shim() -> Path:
    """bench/bindsrc.c compiled (once per run) into a shared object."""
    global _shim
    if _shim is None or not _shim.exists():
        folder = Path(tempfile.mkdtemp(prefix="smtpgate-bench-shim-"))
        atexit.register(shutil.rmtree, folder, True)
        out = folder / "bindsrc.so"
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise BenchError("no C compiler for bench/bindsrc.c: run bench/setup.sh")
        src = str(ROOT / "bench" / "bindsrc.c")
        argv = [cc, "-shared", "-fPIC", "-O2", "-o", str(out), src, "-ldl"]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"cannot build bench/bindsrc.c:\n{proc.stderr}")
        _shim = out
    return _shim


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
    source: str = "",
) -> SourceRun:
    """Run smtp-source against 127.0.0.1:port and time it.

    ``count`` is the number of messages (for ``reject``, of sessions: each one is answered
    521 at RCPT and disconnected). ``many_per_session`` (-d) sends all of a session's share
    over one connection; otherwise each message gets its own session. ``source``: the
    client address (through the LD_PRELOAD shim bench/bindsrc.c).
    """
    env = None
    if source:
        env = dict(os.environ, BENCH_SOURCE_ADDRESS=source, LD_PRELOAD=str(bind_shim()))
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
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
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
    port: int, count: int, commands: Sequence[str], *, timeout: float = 180.0, source: str = ""
) -> AsyncIterator[int]:
    """Open ``count`` sessions to 127.0.0.1:port, each greeted and through ``commands``
    (each answered 2xx), and keep them all open inside the ``async with``; from ``source``
    (a loopback address) if given.

    Connects at most 200 at a time so as not to overflow the listen queue. Yields the number
    of sessions established; raises BenchError if any failed.
    """
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(200)
    failures: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                local = (source, 0) if source else None
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
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


@dataclass
class LoadRun:
    """One load generator run (all its processes): counts, latencies, times."""

    seconds: float
    sessions: int
    messages: int
    counts: dict[str, int]
    latencies: list[float]  # ms, final dot to 250, every message
    generator_cpu: float  # CPU seconds of the generator's processes
    problems: list[str]

    def percentile(self, q: float) -> float:
        """The q-quantile (0..1) of the latencies, nearest rank; 0.0 without any."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


def _release_and_collect(
    children: Sequence[subprocess.Popen[str]], timeout: float
) -> list[dict[str, Any]]:
    """Wait for every generator process's ``ready``, say ``go`` to all, collect their JSON."""
    try:
        for child in children:
            assert child.stdout is not None and child.stdin is not None
            line = child.stdout.readline()
            if line.strip() != "ready":
                err = child.stderr.read() if child.stderr else ""
                raise BenchError(f"load generator did not start: {line}{err}")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            try:
                out, err = child.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"load generator timed out after {timeout}s") from exc
            if child.returncode != 0:
                raise BenchError(f"load generator failed ({child.returncode}):\n{err[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def run_loadgen(
    port: int,
    mode: str,
    *,
    sessions: int,
    count: int,
    procs: int = 2,
    rate: float = 0.0,
    sources: Sequence[str] = (),
    pool: int = 0,
    extra: Sequence[str] = (),
    timeout: float = 900.0,
) -> LoadRun:
    """Run ``bench/loadgen.py`` against 127.0.0.1:port in ``procs`` processes at once.

    Each process takes every ``procs``-th session (so a pool's addresses are spread the
    same way on every run), its share of the concurrency and of the rate. The processes
    start, say ``ready``, and are all released at once; the run lasts from the first start
    to the last end (one monotonic clock for all).
    """
    procs = max(1, min(procs, sessions, count))
    common = ["--server", f"127.0.0.1:{port}", "--mode", mode]
    for src in sources:
        common += ["--source", src]
    if pool:
        common += ["--pool", str(pool)]
    children = []
    for w in range(procs):
        share = count // procs + (1 if w < count % procs else 0)
        conc = sessions // procs + (1 if w < sessions % procs else 0)
        argv = [sys.executable, "-m", "bench.loadgen", "--wait-go", *common, *extra]
        argv += ["--sessions", str(conc), "--count", str(share)]
        argv += ["--first", str(w), "--stride", str(procs)]
        if rate:
            argv += ["--rate", str(rate / procs)]
        children.append(
            subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=ROOT, text=True,
            )
        )  # fmt: skip
    results = _release_and_collect(children, timeout)
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    counts: dict[str, int] = {}
    latencies: list[float] = []
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
        latencies.extend(r["latencies"])
    problems = [f"{v} x {k}" for k, v in sorted(counts.items()) if k.startswith("error")]
    cpu = sum(r["cpu"] for r in results)
    return LoadRun(
        seconds=seconds,
        sessions=sum(counts.values()),
        messages=sum(r["messages"] for r in results),
        counts=counts,
        latencies=latencies,
        generator_cpu=cpu,
        problems=problems,
    )


#: The zombie row's DNS lists: a pool of client addresses, 90 % of them listed.
ZOMBIE_POOL = 1000
DNS_ADDRESS = "127.53.0.1"  # port 53: Postfix's resolver knows no other port
ZOMBIE_ZONES = ("zone1.bench.test", "zone2.bench.test")

#: The postscreen model, with postscreen's names, for both sides. A client listed in zone1
#: (weight 2) reaches the threshold; one listed only in zone2 (weight 1) does not. No
#: pregreet test (an empty postscreen_greet_banner), so the DNS answers end the wait, not
#: postscreen_greet_wait (with the pregreet test every session would last the full wait).
POSTSCREEN_MAIN_CF = f"""\
postscreen_dnsbl_sites = {ZOMBIE_ZONES[0]}*2 {ZOMBIE_ZONES[1]}*1
postscreen_dnsbl_threshold = 2
postscreen_dnsbl_action = drop
postscreen_greet_banner =
postscreen_greet_wait = 3s
postscreen_access_list = permit_mynetworks
"""


def zombie_listed(i: int) -> tuple[bool, bool]:
    """(in zone1, in zone2) for the i-th pool address: 9 in 10 in zone1 (blocked), a third
    of those in zone2 too; of the other tenth, half are in zone2 only (score 1: passes)."""
    if i % 10:
        return True, i % 3 == 0
    return False, i % 20 == 0


def zombie_records() -> dict[str, list[str]]:
    """The DNS records of the pool's listed addresses (reversed octets under each zone)."""
    from bench.loadgen import pool_address

    records: dict[str, list[str]] = {}
    for i in range(ZOMBIE_POOL):
        rev = ".".join(reversed(pool_address(i).split(".")))
        for zone, listed in zip(ZOMBIE_ZONES, zombie_listed(i), strict=True):
            if listed:
                records[f"{rev}.{zone}"] = ["127.0.0.2"]
    return records


def zombie_expected(count: int, procs: int) -> int:
    """How many of ``count`` sessions come from blocked addresses (session k uses pool
    address k mod ZOMBIE_POOL, whatever the number of generator processes)."""
    del procs
    return sum(1 for k in range(count) if zombie_listed(k % ZOMBIE_POOL)[0])


class DnsServer:
    """bench/dnsbl.py on DNS_ADDRESS:53 with the zombie row's records (a subprocess)."""

    def __init__(self, tmp: Path) -> None:
        records = tmp / "dnsbl-records.json"
        records.write_text(json.dumps(zombie_records()))
        self.log = tmp / "dnsbl.out"
        argv = [sys.executable, "-m", "bench.dnsbl", "--listen", f"{DNS_ADDRESS}:53"]
        argv += ["--records", str(records)]
        self.err = self.log.open("w")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self.err, cwd=ROOT, text=True
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.wait(STOP_TIMEOUT)
            raise BenchError(f"DNS server did not start:\n{_tail(self.log)}")
        # a resolv.conf for Postfix's mount namespace
        self.resolv_conf = tmp / "resolv.conf"
        self.resolv_conf.write_text(f"nameserver {DNS_ADDRESS}\noptions timeout:1 attempts:2\n")
        self.resolv_conf.chmod(0o644)

    @property
    def root_pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        _terminate(self.proc, [])
        self.err.close()


POSTSCREEN_MASTER_CF = """\
{listen} inet  n       -       n       -       1       postscreen
smtpd     pass  -       -       n       -       -       smtpd
dnsblog   unix  -       -       n       -       0       dnsblog
tlsproxy  unix  -       -       n       -       0       tlsproxy
"""


class _NamespacedInstance(PostfixInstance):
    """A PostfixInstance whose master runs in its own mount namespace, where
    /etc/resolv.conf is ``resolv_conf`` bind-mounted (the real file is never touched),
    and whose listener is postscreen in front of smtpd."""

    def __init__(self, resolv_conf: Path, main_cf: str, tables: Mapping[str, str]) -> None:
        self.resolv_conf = resolv_conf
        super().__init__(main_cf, tables)

    def write_config(
        self, main_cf: str, tables: Mapping[str, str], compatibility_level: str = "3.6"
    ) -> None:
        super().write_config(main_cf, tables, compatibility_level)
        master = self.etc / "master.cf"
        listen = f"127.0.0.1:{self.port}"
        lines = [ln for ln in master.read_text().splitlines() if not ln.startswith(listen)]
        text = POSTSCREEN_MASTER_CF.format(listen=listen) + "\n".join(lines) + "\n"
        master.write_text(text)
        past = time.time() - 10
        os.utime(master, (past, past))

    def _run(self, argv: list[str], *, what: str, check: bool = True) -> str:
        if what == "postfix start":
            script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                    str(self.resolv_conf), *argv]  # fmt: skip
        return super()._run(argv, what=what, check=check)


class PostscreenRef(PostfixRef):
    """Postfix with postscreen + smtpd (a before-queue proxy to the sink, as PostfixRef),
    dnsblog resolving through the bench's DNS server."""

    def __init__(
        self, sink_port: int, process_limit: int, resolv_conf: Path, config: HarnessConfig
    ) -> None:
        process_limit = config.process_limit or process_limit
        main_cf = config.main_cf(SHARED_MAIN_CF) + POSTSCREEN_MAIN_CF
        main_cf += f"default_process_limit = {process_limit}\n"
        main_cf += f"smtpd_proxy_filter = 127.0.0.1:{sink_port}\n"
        self.instance = _NamespacedInstance(resolv_conf, main_cf, TABLES)
        self.port = self.instance.port
        try:
            self.instance.start()
        except BaseException:
            self.instance.close()
            raise
