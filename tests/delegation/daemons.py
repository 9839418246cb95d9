"""The real policy daemons from Debian, each started by a test on loopback with folders of
its own, and stopped (by the ids of the processes the test started) at the end.

- postgrey 1.37 (``postgrey``): in the foreground, ``--delay`` seconds of greylisting.
- postfwd 1.35 (``postfwd2``): it daemonises into a session of its own (a master, a
  cache daemon, a policy daemon and its children); stopped by signalling that session's
  process group, found from its pid file.
- policyd-spf 3.0 (``postfix-policyd-spf-python``): a program that reads one request
  stream on standard input, so it runs behind ``socat`` (one process per connection),
  with its DNS queries sent to the tests' loopback DNS server (a wrapper sets pydns's
  server and port: ``/etc/resolv.conf`` cannot name a port).

A daemon that is not installed is a failure, not a skip: ``.ci/run`` installs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

START_DEADLINE = 30.0
STOP_DEADLINE = 10.0
IS_ROOT = os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need(program: str) -> str:
    path = shutil.which(program) or next(
        (p for d in ("/usr/sbin", "/usr/bin") if os.access(p := f"{d}/{program}", os.X_OK)), None
    )
    assert path, f"{program} is not installed (tests/system-deps.sh installs it)"
    return path


def private_folder(owner: str | None) -> Path:
    """A folder of the test's own that the daemon's user may use (pytest's tmp_path is
    root-only when the suite runs as root)."""
    folder = Path(tempfile.mkdtemp(prefix="smtpgate-policy-"))
    folder.chmod(0o755)
    if owner and IS_ROOT:
        entry = pwd.getpwnam(owner)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    return folder


async def wait_listening(
    port: int, alive: Callable[[], bool] | None = None, what: str = ""
) -> None:
    """Return once 127.0.0.1:port accepts a connection (bounded); fail if the daemon died."""
    end = time.monotonic() + START_DEADLINE
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            pass
        else:
            writer.close()
            await writer.wait_closed()
            return
        if alive is not None and not alive():
            raise AssertionError(f"{what} exited before it listened on 127.0.0.1:{port}")
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not listen on 127.0.0.1:{port} in {START_DEADLINE}s")
        await asyncio.sleep(0.05)  # poll interval of a bounded wait for a condition


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_DEADLINE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@asynccontextmanager
async def postgrey(delay: int = 1) -> AsyncIterator[str]:
    """postgrey on 127.0.0.1; yields its endpoint, ``inet:127.0.0.1:PORT``."""
    program = need("postgrey")
    folder = private_folder("postgrey")
    for name in ("whitelist_clients", "whitelist_recipients"):
        (folder / name).write_text("")  # none of the system's lists
    port = free_port()
    args = [
        f"--inet=127.0.0.1:{port}",
        f"--dbdir={folder}",
        f"--delay={delay}",
        f"--pidfile={folder / 'postgrey.pid'}",
        f"--whitelist-clients={folder / 'whitelist_clients'}",
        f"--whitelist-recipients={folder / 'whitelist_recipients'}",
        "--hostname=postgrey.test",
    ]
    if IS_ROOT:
        args.append("--user=postgrey")
    log = (folder / "postgrey.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        program, *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
    )
    try:
        await wait_listening(port, lambda: proc.returncode is None, "postgrey")
        yield f"inet:127.0.0.1:{port}"
    finally:
        await _stop(proc)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@asynccontextmanager
async def postfwd(rules: str) -> AsyncIterator[str]:
    """postfwd2 on 127.0.0.1 with ``rules`` (its ruleset file); yields its endpoint."""
    program = need("postfwd2")
    user = "postfw" if IS_ROOT else None
    folder = private_folder(user)
    (folder / "postfwd.cf").write_text(rules)
    port = free_port()
    pidfile = folder / "postfwd.pid"
    args = [
        "-f", str(folder / "postfwd.cf"),
        "-i", "127.0.0.1", "-p", str(port),
        f"--cache_socket=unix:{folder / 'cache.sock'}",
        f"--pidfile={pidfile}",
        "--cache=0",  # every request evaluated: the test changes nothing between them
    ]  # fmt: skip
    if user:
        args += ["-u", user, "-g", user]
    proc = await asyncio.create_subprocess_exec(
        program, *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), START_DEADLINE)  # it daemonises
    assert proc.returncode == 0, err.decode()
    group = None
    try:
        await wait_listening(port, None, "postfwd2")
        group = os.getpgid(int(pidfile.read_text().split()[0]))
        yield f"inet:127.0.0.1:{port}"
    finally:
        if group is not None:
            await _stop_group(group)
        shutil.rmtree(folder, ignore_errors=True)


async def _stop_group(group: int) -> None:
    """SIGTERM the process group the daemon made (its session), then wait it out."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    end = time.monotonic() + STOP_DEADLINE
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > end:
            os.killpg(group, signal.SIGKILL)
            return
        await asyncio.sleep(0.05)  # poll interval of a bounded wait for a condition


SPF_CONF = """\
debugLevel = 1
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
skip_addresses = 192.0.2.255/32
"""
"""Debian's policyd-spf.conf, but for skip_addresses: it skips 127.0.0.0/8, where the
tests' clients are."""

SPF_WRAPPER = """\
import sys

import DNS
import spf  # noqa: F401  (reads /etc/resolv.conf first: the server is set after it)

DNS.defaults["server"] = ["127.0.0.1"]
DNS.defaults["port"] = int(sys.argv.pop(1))
from spf_engine.policyd_spf import main

sys.argv[0] = "policyd-spf"
sys.exit(main())
"""


@asynccontextmanager
async def policyd_spf(dns_port: int) -> AsyncIterator[str]:
    """policyd-spf behind socat on 127.0.0.1, asking the DNS server on 127.0.0.1:dns_port."""
    need("policyd-spf")
    socat = need("socat")
    folder = private_folder(None)
    (folder / "policyd-spf.conf").write_text(SPF_CONF)
    (folder / "wrapper.py").write_text(SPF_WRAPPER)
    port = free_port()
    command = f"/usr/bin/python3 {folder / 'wrapper.py'} {dns_port} {folder / 'policyd-spf.conf'}"
    log = (folder / "socat.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        socat, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{command}",
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        await wait_listening(port, lambda: proc.returncode is None, "socat")
        yield f"inet:127.0.0.1:{port}"
    finally:
        # socat and the policyd-spf it forked share the session start_new_session made
        await _stop_group(proc.pid)
        await proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
