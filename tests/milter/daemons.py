"""Real milters from Debian, each started on loopback with folders of its own, and stopped.

Reusable by any test (the end-to-end tests through ``serve`` too): every function takes a
folder the test owns (``tmp_path``), writes the daemon's configuration and data there,
starts the daemon in the foreground and waits until its milter socket accepts
connections. The result is a :class:`Daemon` whose ``endpoint`` is the
``smtpd_milters`` value (``inet:127.0.0.1:PORT``); ``stop()`` ends exactly the processes
it started (SIGTERM, then SIGKILL to their process group after a grace period). Each also
works as a context manager. A daemon that is not installed raises
:class:`DaemonMissing` (a failure, not a skip: CI installs them through ``.ci/run``); one
that does not come up raises ``RuntimeError`` with the tail of its log.

- :func:`start_rspamd` -- rspamd's proxy worker as a milter, scanning by itself
  (``self_scan``), with ``enable_test_patterns`` so the GTUBE variants work:
  ``XJS*C4JDBQADN1...`` rejects (``554 5.7.1 Gtube pattern``), ``YJS...`` adds
  ``X-Spam: Yes``, ``ZJS...`` rewrites the subject, ``AJS...`` does nothing
  (:func:`gtube`). Root only (rspamd drops to ``_rspamd``); 20-30 s to start the first
  time, faster with a ``cache_dir`` kept between runs (its compiled regular expressions).
- :func:`start_clamav` -- clamd with only the signatures the test gives (``.ndb`` hex
  signatures, see :func:`ndb_signature`; no virus database is fetched) and clamav-milter
  in front of it, which rejects an infected message and adds ``X-Virus-Status``.
- :func:`start_opendkim` -- opendkim signing (``mode="s"``), verifying (``"v"``) or both,
  with a key made by ``opendkim-genkey``; :attr:`OpenDkim.txt_record` is the selector's
  DNS TXT record for a loopback DNS server (``tests/dns/dnsserver.py``) that the daemon
  is pointed at through an unbound configuration (``dns=(host, port)``).

:func:`free_port` gives a loopback port for a daemon that cannot take port 0.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

GTUBE_TAIL = "JS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class DaemonMissing(RuntimeError):
    """The Debian package of a daemon is not installed (``.ci/run`` installs it)."""


def gtube(action: str) -> str:
    """rspamd's test pattern for ``reject``, ``add header``, ``rewrite subject`` or
    ``no action`` (needs ``enable_test_patterns``)."""
    letter = {"reject": "X", "add header": "Y", "rewrite subject": "Z", "no action": "A"}
    return letter[action] + GTUBE_TAIL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _need(program: str, package: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        raise DaemonMissing(f"{program} is not installed (Debian package {package})")
    return path


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _connectable(port: int = 0, path: str = "") -> bool:
    family = socket.AF_UNIX if path else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path or ("127.0.0.1", port))
        except OSError:
            return False
        return True


def milter_answers(port: int, timeout: float = 2.0) -> bool:
    """A milter on 127.0.0.1:``port`` answers SMFIC_OPTNEG (its workers are up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(struct.pack("!IcIII", 13, b"O", 6, 0x1FF, 0x1FFFFF))
            head = b""
            while len(head) < 5:
                chunk = sock.recv(5 - len(head))
                if not chunk:
                    return False
                head += chunk
            return head[4:5] == b"O"
    except OSError:
        return False


@dataclass
class Daemon:
    """Processes a test started, and the milter endpoint they serve."""

    name: str
    endpoint: str
    folder: Path
    log: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1]) if self.endpoint.startswith("inet:") else 0

    def alive(self) -> bool:
        return all(process.poll() is None for process in self.processes)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to each process started (the last first), SIGKILL to its group after
        ``grace`` seconds; waits for them."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(grace)
        self.processes.clear()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_ready(self, check: object, deadline: float, log: Path | None = None) -> None:
        """Poll ``check()`` until it holds; RuntimeError (with the log's tail) when a
        process exits or ``deadline`` seconds pass."""
        assert callable(check)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if check():
                return
            if not self.alive():
                break
            time.sleep(0.1)  # polling a daemon's socket: there is no event to await
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{_tail(log or self.log)}")


def _spawn(argv: list[str], output: Path) -> subprocess.Popen[bytes]:
    with output.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _chown(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


# --- rspamd --------------------------------------------------------------------------


def start_rspamd(
    folder: Path,
    *,
    port: int = 0,
    dns: tuple[str, int] | None = None,
    cache_dir: Path | None = None,
    deadline: float = 120.0,
) -> Daemon:
    """rspamd 3.x as a milter on 127.0.0.1 (``port`` 0: a free one); see the module doc.

    ``dns``: the resolver rspamd uses (a loopback DNS server); without one it gets a dead
    port and every lookup waits for its 1 s timeout (a clean message then takes seconds).
    """
    program = _need("rspamd", "rspamd")
    port = port or free_port()
    local = folder / "local"
    for sub in ("local.d", "override.d"):
        (local / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("db", "run", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (local / "override.d" / "worker-proxy.inc").write_text(
        f'bind_socket = "127.0.0.1:{port}";\nmilter = yes;\ntimeout = 120s;\n'
        'upstream "local" { default = yes; self_scan = yes; }\ncount = 1;\n'
    )
    for worker in ("normal", "controller"):
        (local / "override.d" / f"worker-{worker}.inc").write_text(
            f'bind_socket = "127.0.0.1:{free_port()}";\ncount = 1;\n'
        )
    nameserver = f"{dns[0]}:{dns[1]}" if dns else f"127.0.0.1:{free_port()}"
    options = [
        "enable_test_patterns = true;",
        f'dns {{ nameserver = ["{nameserver}"]; timeout = 1s; retransmits = 1; }}',
    ]
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _chown(cache_dir, "_rspamd")
        options.append(f'hs_cache_dir = "{cache_dir}/";')
    (local / "local.d" / "options.inc").write_text("\n".join(options) + "\n")
    (local / "local.d" / "logging.inc").write_text('level = "info";\n')
    _chown(folder, "_rspamd")
    log = folder / "log" / "rspamd.log"
    daemon = Daemon("rspamd", f"inet:127.0.0.1:{port}", folder, log)
    daemon.processes.append(
        _spawn(
            [
                program,
                "-f",
                "-u",
                "_rspamd",
                "-g",
                "_rspamd",
                "-c",
                "/etc/rspamd/rspamd.conf",
                f"--var=LOCAL_CONFDIR={local}",
                f"--var=DBDIR={folder / 'db'}",
                f"--var=RUNDIR={folder / 'run'}",
                f"--var=LOGDIR={folder / 'log'}",
            ],
            folder / "stdout.log",
        )
    )
    # The main process binds the port before its proxy worker runs: wait for an answer,
    # then for a whole scan (on a fresh machine rspamd is still compiling its expressions,
    # and its proxy answers "tempfail" to a message until its scanner is up).
    daemon.wait_ready(lambda: milter_answers(port) and rspamd_scans(daemon.endpoint), deadline)
    return daemon


def rspamd_scans(endpoint: str) -> bool:
    """rspamd answers a whole milter session and rejects GTUBE (its scanner works)."""
    from smtpgate.config.milterconf import MilterConfig, MilterSpec
    from smtpgate.milter.client import Milters

    async def probe() -> bool:
        host, port = endpoint.removeprefix("inet:").rsplit(":", 1)
        spec = MilterSpec(name=endpoint, transport="inet", host=host, port=int(port))
        session = Milters(MilterConfig(milters=(spec,))).session()
        try:
            macros = {"j": "probe.test", "{client_addr}": "192.0.2.1", "i": "PROBE"}
            for verdict in (
                await session.connect(macros, "probe.test", "192.0.2.1", 4711, "inet"),
                await session.helo(macros, "probe.test"),
                await session.mail(macros, "probe@example.org", []),
                await session.rcpt(macros, "probe@example.net", []),
                await session.data(macros),
            ):
                if verdict.action != "continue":
                    return False
            content = f"Subject: probe\r\n\r\n{gtube('reject')}\r\n".encode()
            result = await session.message(macros, content)
            return result.verdict.code == 554
        finally:
            await session.close()

    return asyncio.run(probe())


# --- ClamAV --------------------------------------------------------------------------


def ndb_signature(name: str, text: bytes) -> str:
    """An extended (``.ndb``) signature line matching ``text`` anywhere in any file."""
    return f"{name}:0:*:{text.hex()}"


def start_clamav(
    folder: Path,
    signatures: list[str],
    *,
    port: int = 0,
    on_infected: str = "Reject",
    deadline: float = 120.0,
) -> Daemon:
    """clamd (only ``signatures``, ``.ndb`` lines) and clamav-milter on 127.0.0.1.

    ``on_infected``: clamav-milter's OnInfected (Reject, Quarantine, Blackhole, Accept).
    """
    clamd = _need("clamd", "clamav-daemon")
    milter = _need("clamav-milter", "clamav-milter")
    port = port or free_port()
    database = folder / "db"
    database.mkdir(parents=True, exist_ok=True)
    (database / "smtpgate-test.ndb").write_text("\n".join(signatures) + "\n")
    clamd_socket = folder / "clamd.sock"
    log = folder / "clamd.log"
    milter_log = folder / "clamav-milter.log"
    (folder / "clamd.conf").write_text(
        f"LocalSocket {clamd_socket}\nFixStaleSocket true\nForeground true\n"
        f"DatabaseDirectory {database}\nLogFile {log}\nLogTime true\n"
        f"PidFile {folder / 'clamd.pid'}\nTemporaryDirectory {folder}\n"
        "ScanMail true\nBytecode false\nSelfCheck 0\nMaxThreads 2\n"
    )
    (folder / "clamav-milter.conf").write_text(
        f"MilterSocket inet:{port}@127.0.0.1\nForeground true\n"
        f"ClamdSocket unix:{clamd_socket}\nPidFile {folder / 'clamav-milter.pid'}\n"
        f"OnClean Accept\nOnInfected {on_infected}\nOnFail Defer\nAddHeader Replace\n"
        f"LogFile {milter_log}\nLogTime true\nLogInfected Basic\nLogClean Basic\n"
        f"TemporaryDirectory {folder}\nReadTimeout 60\n"
    )
    daemon = Daemon("clamav", f"inet:127.0.0.1:{port}", folder, milter_log)
    daemon.processes.append(
        _spawn([clamd, "--config-file", str(folder / "clamd.conf")], folder / "clamd.out")
    )
    daemon.wait_ready(lambda: _connectable(path=str(clamd_socket)), deadline, log)
    daemon.processes.append(
        _spawn([milter, "--config-file", str(folder / "clamav-milter.conf")], folder / "milter.out")
    )
    daemon.wait_ready(lambda: milter_answers(port), deadline, folder / "milter.out")
    return daemon


# --- OpenDKIM ------------------------------------------------------------------------


@dataclass
class OpenDkim(Daemon):
    """An opendkim daemon, and the key it signs with."""

    domain: str = ""
    selector: str = ""
    txt_record: str = ""
    """The TXT record of ``selector._domainkey.domain`` (``v=DKIM1; k=rsa; p=...``)."""

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def start_opendkim(
    folder: Path,
    *,
    domain: str = "example.org",
    selector: str = "test",
    mode: str = "sv",
    dns: tuple[str, int] | None = None,
    internal_hosts: str = "127.0.0.1",
    port: int = 0,
    deadline: float = 60.0,
) -> OpenDkim:
    """opendkim signing mail from ``domain`` with a new key (``mode`` s, v or sv) and
    verifying through the DNS server ``dns`` (an unbound forward to it).

    opendkim signs mail from ``internal_hosts`` (networks, comma separated; the client
    address of SMFIC_CONNECT) and verifies mail from the others.
    """
    program = _need("opendkim", "opendkim")
    genkey = _need("opendkim-genkey", "opendkim-tools")
    port = port or free_port()
    keys = folder / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [genkey, "-b", "1024", "-d", domain, "-s", selector, "-D", str(keys)],
        check=True,
        capture_output=True,
    )
    txt = (keys / f"{selector}.txt").read_text()
    record = "".join(part for part in txt.split('"')[1::2])
    lines = [
        f"Socket inet:{port}@127.0.0.1",
        f"Mode {mode}",
        f"Domain {domain}",
        f"Selector {selector}",
        f"KeyFile {keys / (selector + '.private')}",
        "Canonicalization relaxed/simple",
        "SignatureAlgorithm rsa-sha256",
        "Syslog no",
        "LogWhy yes",
        "UserID root",
        "RequireSafeKeys false",
        f"PidFile {folder / 'opendkim.pid'}",
        "AlwaysAddARHeader yes",
        "AuthservID mx.smtpgate.test",
        f"InternalHosts {folder / 'internal'}",
    ]
    (folder / "internal").write_text("\n".join(internal_hosts.split(",")) + "\n")
    if dns is not None:
        unbound = folder / "unbound.conf"
        unbound.write_text(
            'server:\n  do-not-query-localhost: no\n  module-config: "iterator"\n'
            f'forward-zone:\n  name: "."\n  forward-addr: {dns[0]}@{dns[1]}\n'
        )
        lines.append(f"ResolverConfiguration {unbound}")
    (folder / "opendkim.conf").write_text("\n".join(lines) + "\n")
    log = folder / "opendkim.out"
    daemon = OpenDkim(
        "opendkim",
        f"inet:127.0.0.1:{port}",
        folder,
        log,
        domain=domain,
        selector=selector,
        txt_record=record,
    )
    daemon.processes.append(_spawn([program, "-f", "-x", str(folder / "opendkim.conf")], log))
    daemon.wait_ready(lambda: milter_answers(port), deadline)
    return daemon
