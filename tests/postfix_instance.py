"""A throwaway Postfix instance on loopback, and an SMTP dialogue driver for it.

Theory of operation
-------------------
:class:`PostfixInstance` owns one temporary directory::

    TMP/etc/      config_directory: main.cf, master.cf, the case's table files (+ .db)
    TMP/spool/    queue_directory  } copied (cp -a) from a tree that `postfix check` created
    TMP/data/     data_directory   } once per process: creating them costs ~2 s each time
    TMP/maillog   maillog_file, written by the postlog service (Postfix >= 3.4)

The main.cf it writes is the *plumbing* (directories, loopback listener, logging), then the
case's own lines, so a case can override anything (``mynetworks``, ``compatibility_level``...).
Table files are written next to main.cf; the placeholder ``@DIR@`` in main.cf text and table
text is replaced with that directory, so the same text works for Postfix and for smtpgate.
Tables referenced as ``hash:``/``btree:``/``cdb:`` are compiled with ``postmap``.

Start is ``postfix -c DIR check`` (its warnings are kept), then ``postfix -c DIR start``
(which waits for the master's init status), then the SMTP port is polled until it answers
with a greeting, failing early on any ``fatal:`` line in the maillog (an smtpd that dies at
start-up leaves the port open but silent). Stop is what ``postfix stop`` does, SIGTERM to the
master, followed by polling its pid (a zombie counts as gone: in containers PID 1 may not
reap). Files written are back-dated by 10 s, as Postfix re-reads a file younger than one
second in 300 ms steps. Every wait has a deadline; a failure raises :class:`PostfixError`
carrying Postfix's own complaints from the maillog and stderr.

:meth:`PostfixInstance.dialogue` speaks SMTP one command at a time from a chosen loopback
source address (127.0.0.N, N >= 2, outside the default ``mynetworks``), then waits for the
session's ``disconnect from`` log line so that every log line of the session has been written
before it returns. Dialogues are serial; many of them may run against one instance.
:meth:`PostfixInstance.raw_dialogue` is the byte-level form: it sends scripted writes (one
command line, or a pipelined group in one write) and records every reply and where the server
closed the connection; :func:`raw_session` is the same socket code, usable against any server
(the session-level differential test points it at smtpgate too).
:meth:`PostfixInstance.reconfigure` rewrites the configuration and restarts the instance
(a restart, not ``postfix reload``: after a reload there is no observable event telling when
the new configuration is in force, and the old one may still answer a connection).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

POSTFIX = "/usr/sbin/postfix"
POSTMAP = "/usr/sbin/postmap"
POSTCONF = "/usr/sbin/postconf"

#: Placeholder for the configuration directory in case text.
DIR_PLACEHOLDER = "@DIR@"

#: Table types that need a compiled database next to the text source.
INDEXED_TYPES = ("hash", "btree", "cdb", "lmdb", "dbm")

_TABLE_REF = re.compile(
    r"\b(?P<type>" + "|".join(INDEXED_TYPES) + r"):(?P<path>[^\s,{}]+)",
)
_SMTPD_LINE = re.compile(r"postfix(?:/[\w.-]+)*/smtpd\[(?P<pid>\d+)\]: (?P<msg>.*)$")
_QUEUE_ID = re.compile(
    r"^(?:NOQUEUE|QUEUEID|[0-9A-F]{6,}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10,}): "
)

#: smtpd start-up chatter unrelated to the session (Debian's alias_maps names a nis: table).
_NOISE = (
    "warning: dict_nis_init: NIS domain name not set",
    "dict_nis_init: NIS domain name not set",
)

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

#: Parameters every instance gets before the case's own lines (which may override them).
PLUMBING = """\
# --- plumbing written by tests/postfix_instance.py ---
config_directory = {etc}
queue_directory = {spool}
data_directory = {data}
maillog_file = {maillog}
maillog_file_prefixes = {tmp}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP $mail_name
biff = no
"""

#: Defaults the case text may set itself (then they are not written twice).
DEFAULTS = {"mynetworks": "127.0.0.1/32", "compatibility_level": "{compatibility_level}"}

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
IO_TIMEOUT = 15.0
LOG_TIMEOUT = 10.0


class PostfixError(RuntimeError):
    """Postfix could not be configured, started, stopped or talked to."""


@dataclass(frozen=True)
class Exchange:
    """One command sent and the server's complete reply to it."""

    command: str
    reply: list[str]
    closed: bool  # the server closed the connection after this reply


@dataclass
class Dialogue:
    """A whole SMTP session: the greeting, each exchange, and the session's smtpd log lines."""

    client: str
    greeting: list[str]
    greeting_closed: bool
    exchanges: list[Exchange] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # smtpd messages, syslog prefix removed

    @property
    def noqueue(self) -> list[str]:
        """Action log lines (``NOQUEUE: reject: ...``), the queue id normalised to NOQUEUE."""
        out = []
        for line in self.log:
            m = _QUEUE_ID.match(line)
            if m and re.match(
                r"(reject|reject_warning|warn|info|discard|hold|redirect|filter|"
                r"defer|bcc|prepend): ",
                line[m.end() :],
            ):
                out.append("NOQUEUE: " + line[m.end() :])
        return out


@dataclass(frozen=True)
class RawStep:
    """One write of a raw dialogue and how many replies it should get.

    ``data`` is sent as is, in a single ``sendall`` (a pipelined group is one step).
    ``replies`` is the number of replies to wait for: one per CRLF-ended line by default.
    """

    data: bytes
    replies: int

    @classmethod
    def of(cls, item: RawStep | bytes | str) -> RawStep:
        """A step from a command line (CRLF appended), raw bytes (as is), or a step."""
        if isinstance(item, RawStep):
            return item
        if isinstance(item, str):
            return cls(item.encode("utf-8") + b"\r\n", 1)
        return cls(item, max(1, item.count(b"\n")))


@dataclass(frozen=True)
class RawExchange:
    """One write and the replies to it (each a list of lines), as read off the socket."""

    sent: bytes
    replies: list[list[str]]
    closed: bool  # the server closed the connection after these replies


@dataclass
class RawDialogue:
    """A raw session: greeting, each write with its replies, and the smtpd log lines."""

    client: str
    greeting: list[str]
    greeting_closed: bool
    exchanges: list[RawExchange] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


def raw_session(
    host: str,
    port: int,
    client: str,
    steps: Sequence[RawStep | bytes | str],
    *,
    timeout: float = IO_TIMEOUT,
) -> RawDialogue:
    """Run a scripted byte-level session against any SMTP server (blocking socket I/O).

    Each step is written in one piece, then its replies are read. The server closing the
    connection is learned from an event, never a timer: end of file while a step's replies
    are read, or, after the last step, in reply to a probe (``NOOP``, not recorded). An
    exchange that got no reply at all because the server had already closed is not recorded;
    the previous exchange is marked ``closed`` instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.bind((client, 0))
        s.connect((host, port))
        reader = _ReplyReader(s)
        greeting = reader.reply()
        d = RawDialogue(client=client, greeting=greeting, greeting_closed=not greeting)
        closed = not greeting
        for step in map(RawStep.of, steps):
            if closed:
                break
            replies, closed = _send_and_read(s, reader, step.data, step.replies)
            if not replies:
                _mark_closed(d)
                break
            d.exchanges.append(RawExchange(step.data, replies, closed))
        if not closed:
            replies, closed = _send_and_read(s, reader, b"NOOP\r\n", 1)
            if not replies:
                _mark_closed(d)
    return d


def _send_and_read(
    s: socket.socket, reader: _ReplyReader, data: bytes, count: int
) -> tuple[list[list[str]], bool]:
    """Send ``data``; read up to ``count`` replies. (replies, server closed)."""
    try:
        s.sendall(data)
    except OSError:
        return [], True
    replies: list[list[str]] = []
    while len(replies) < count:
        reply = reader.reply()
        if not reply:
            return replies, True
        replies.append(reply)
    return replies, False


def _mark_closed(d: RawDialogue) -> None:
    if d.exchanges:
        last = d.exchanges.pop()
        d.exchanges.append(RawExchange(last.sent, last.replies, True))
    else:
        d.greeting_closed = True


def postfix_available() -> bool:
    """True if Debian's Postfix binaries are installed and we may run them (root)."""
    return os.path.exists(POSTFIX) and os.path.exists(POSTMAP) and os.geteuid() == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def indexed_tables(texts: Sequence[str]) -> set[tuple[str, str]]:
    """The (type, path) pairs of indexed tables referenced in the given texts."""
    refs = set()
    for text in texts:
        for m in _TABLE_REF.finditer(text):
            refs.add((m["type"], m["path"]))
    return refs


def _deadline_loop(timeout: float, step: float = 0.02) -> Iterator[float]:
    """Yield until the deadline; sleeps only between polls of an observable condition."""
    end = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if now >= end:
            return
        yield end - now
        time.sleep(min(step, max(0.0, end - time.monotonic())))


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


_template_lock = threading.Lock()
_template: Path | None = None


def _copy_template_tree(spool: Path, data: Path) -> None:
    """Create queue and data directories by copying a tree Postfix created once.

    The first ``postfix check`` against an empty queue_directory spends about two seconds
    creating it; a copy (``cp -a`` keeps owners and modes) takes milliseconds.
    """
    global _template
    with _template_lock:
        if _template is None or not _template.exists():
            tmpl = Path(tempfile.mkdtemp(prefix="smtpgate-postfix-template-"))
            tmpl.chmod(0o755)
            (tmpl / "etc").mkdir(mode=0o755)
            (tmpl / "spool").mkdir(mode=0o755)
            (tmpl / "etc" / "main.cf").write_text(
                f"queue_directory = {tmpl / 'spool'}\ndata_directory = {tmpl / 'data'}\n"
                f"maillog_file = {tmpl / 'maillog'}\nmaillog_file_prefixes = {tmpl}\n"
                "myhostname = template.example\ninet_protocols = ipv4\n"
                "compatibility_level = 3.6\n"
            )
            (tmpl / "etc" / "master.cf").write_text(MASTER_CF.format(listen="127.0.0.1:2525"))
            past = time.time() - 10
            for path in (tmpl / "etc").iterdir():
                os.utime(path, (past, past))
            env = dict(os.environ, MAIL_CONFIG=str(tmpl / "etc"))
            proc = subprocess.run(
                [POSTFIX, "-c", str(tmpl / "etc"), "check"],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT,
                env=env,
            )
            if proc.returncode != 0:
                raise PostfixError(f"postfix check (template) failed:\n{proc.stdout}{proc.stderr}")
            atexit.register(shutil.rmtree, tmpl, True)
            _template = tmpl
        template = _template
    for src, dst in ((template / "spool", spool), (template / "data", data)):
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True, timeout=START_TIMEOUT)


class PostfixInstance:
    """A Postfix master with its own config, queue and data directories, listening on loopback.

    Use as a context manager::

        with PostfixInstance(main_cf, {"access": "qq.com REJECT"}) as pf:
            d = pf.dialogue("127.0.0.2", "me.example", "a@qq.com", ["foo@bar.org"])
    """

    master_cf = MASTER_CF
    """master.cf; ``{listen}`` is the loopback address:port (a subclass puts postscreen
    there, see tests/postscreen_instance.py)."""

    def __init__(
        self,
        main_cf: str = "",
        tables: Mapping[str, str] | None = None,
        *,
        compatibility_level: str = "3.6",
        port: int | None = None,
        keep: bool = False,
        preamble: bytes = b"",
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="smtpgate-postfix-"))
        # smtpd and friends run as the postfix user and must traverse the tree.
        self.tmp.chmod(0o755)
        self.etc = self.tmp / "etc"
        self.spool = self.tmp / "spool"
        self.data = self.tmp / "data"
        self.maillog = self.tmp / "maillog"
        self.etc.mkdir(mode=0o755)
        _copy_template_tree(self.spool, self.data)
        self.port = port or free_port()
        self.keep = keep
        self.preamble = preamble
        """Written first by the start-up probe (a PROXY header, for an instance with
        smtpd_upstream_proxy_protocol = haproxy)."""
        self.running = False
        self._main_cf = main_cf
        self._tables = dict(tables or {})
        self._compat = compatibility_level
        self.write_config(main_cf, self._tables, compatibility_level)

    # ------------------------------------------------------------------ configuration
    def expand(self, text: str) -> str:
        """Replace the ``@DIR@`` placeholder with the configuration directory."""
        return text.replace(DIR_PLACEHOLDER, str(self.etc))

    def write_config(
        self, main_cf: str, tables: Mapping[str, str], compatibility_level: str = "3.6"
    ) -> None:
        """Write main.cf, master.cf and the tables, and compile the indexed tables."""
        for old in self.etc.iterdir():
            if old.is_file():
                old.unlink()
        plumbing = PLUMBING.format(
            etc=self.etc,
            spool=self.spool,
            data=self.data,
            maillog=self.maillog,
            tmp=self.tmp,
            compatibility_level=compatibility_level,
        )
        main_text = self.expand(main_cf)
        for name, value in DEFAULTS.items():
            if not re.search(rf"^{name}\s*=", main_text, re.MULTILINE):
                value = value.format(compatibility_level=compatibility_level)
                plumbing += f"{name} = {value}\n"
        (self.etc / "main.cf").write_text(plumbing + "# --- case ---\n" + main_text + "\n")
        (self.etc / "master.cf").write_text(self.master_cf.format(listen=f"127.0.0.1:{self.port}"))
        table_texts = []
        for name, text in tables.items():
            path = self.etc / name
            path.write_text(self.expand(text))
            path.chmod(0o644)
            table_texts.append(self.expand(text))
        # Postfix re-reads a file modified within the last second in 300 ms steps until it
        # is "old enough" (dict_load_file); back-date what we wrote so it reads at once.
        past = time.time() - 10
        for path in self.etc.iterdir():
            os.utime(path, (past, past))
        for kind, path in sorted(indexed_tables([main_text, *table_texts])):
            if not Path(path).exists():
                continue  # a missing table is a legitimate case: Postfix reports it itself
            self._run([POSTMAP, "-c", str(self.etc), f"{kind}:{path}"], what="postmap")

    def reconfigure(
        self,
        main_cf: str,
        tables: Mapping[str, str] | None = None,
        *,
        compatibility_level: str = "3.6",
    ) -> None:
        """Install a new configuration; restarts the instance if it was running."""
        was_running = self.running
        if was_running:
            self.stop()
        self._main_cf, self._tables, self._compat = main_cf, dict(tables or {}), compatibility_level
        self.write_config(main_cf, self._tables, compatibility_level)
        if was_running:
            self.start()

    # ------------------------------------------------------------------ lifecycle
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MAIL_CONFIG"] = str(self.etc)
        env.setdefault("LANG", "C")
        return env

    def _run(self, argv: list[str], *, what: str, check: bool = True) -> str:
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=START_TIMEOUT, env=self._env()
            )
        except subprocess.TimeoutExpired as exc:
            raise PostfixError(f"{what}: timed out: {' '.join(argv)}{self._log_tail()}") from exc
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise PostfixError(
                f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{out}{self._log_tail()}"
            )
        return out

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError:
            return ""
        tail = text.splitlines()[-lines:]
        return "\n--- maillog (tail) ---\n" + "\n".join(tail) if tail else ""

    def check(self) -> str:
        """Run ``postfix check``; return its warnings (raise on a fatal error)."""
        return self._run([POSTFIX, "-c", str(self.etc), "check"], what="postfix check")

    def start_argv(self) -> list[str]:
        """The command that starts the master (a subclass may wrap it, e.g. in unshare)."""
        return [POSTFIX, "-c", str(self.etc), "start"]

    def start(self) -> None:
        """Start the master and wait until the SMTP port greets."""
        if self.running:
            return
        warnings = self.check().replace(str(self.etc), DIR_PLACEHOLDER)
        # `postfix check` just ran; tell `postfix start` not to repeat its (slow) checks.
        (self.spool / "quick-start").touch()
        self._run(self.start_argv(), what="postfix start")
        self.running = True
        self.check_warnings = warnings
        last_error: Exception | None = None
        for remaining in _deadline_loop(START_TIMEOUT, step=0.05):
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.port), timeout=min(remaining, 1.0)
                ) as s:
                    s.sendall(self.preamble)
                    if s.recv(512):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError as exc:
                last_error = exc
            # A daemon that dies at startup (bad config) leaves the port open but silent:
            # the master throttles it. Its fatal message is the event to look for.
            fatal = self.fatal_errors()
            if fatal:
                raise PostfixError(
                    "Postfix daemon failed at startup:\n" + "\n".join(fatal) + self._log_tail()
                )
        raise PostfixError(
            f"Postfix did not answer on 127.0.0.1:{self.port} within {START_TIMEOUT}s "
            f"({last_error}){self._log_tail()}"
        )

    def fatal_errors(self) -> list[str]:
        """The ``fatal:``/``panic:`` lines Postfix has logged so far."""
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if re.search(r"\]: (fatal|panic): ", ln)]

    def _master_pid(self) -> int | None:
        try:
            return int((self.spool / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop the master and wait (bounded) until it has exited.

        This is what ``postfix stop`` does (SIGTERM to the master), minus its fixed
        one-second sleeps: we poll the master's pid instead. Without a pid file we fall
        back to ``postfix stop`` itself.
        """
        if not self.running:
            return
        self.running = False
        pid = self._master_pid()
        if pid is None:
            self._run([POSTFIX, "-c", str(self.etc), "stop"], what="postfix stop", check=False)
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in _deadline_loop(STOP_TIMEOUT, step=0.02):
            if not _alive(pid):
                return
        self._run([POSTFIX, "-c", str(self.etc), "abort"], what="postfix abort", check=False)
        raise PostfixError(f"Postfix master {pid} still running after {STOP_TIMEOUT}s")

    def close(self) -> None:
        """Stop and remove the temporary tree."""
        try:
            self.stop()
        finally:
            if not self.keep:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ dialogue
    def dialogue(
        self,
        client: str,
        helo: str | None,
        mail_from: str | None,
        rcpts: Sequence[str],
        *,
        ehlo: bool = False,
        quit: bool = True,
    ) -> Dialogue:
        """Talk SMTP from ``client`` (a 127.0.0.N source address), one command at a time.

        ``helo=None`` skips HELO; ``mail_from=None`` skips MAIL (and then RCPT is still sent,
        to observe the server's answer). Addresses are given without angle brackets.
        Stops after the server closes the connection.
        """
        if not self.running:
            raise PostfixError("instance not started")
        offset = self.maillog.stat().st_size if self.maillog.exists() else 0
        commands: list[str] = []
        if helo is not None:
            commands.append(f"{'EHLO' if ehlo else 'HELO'} {helo}")
        if mail_from is not None:
            commands.append(f"MAIL FROM:<{mail_from}>")
        commands += [f"RCPT TO:<{r}>" for r in rcpts]
        if quit:
            commands.append("QUIT")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(IO_TIMEOUT)
            s.bind((client, 0))
            s.connect(("127.0.0.1", self.port))
            reader = _ReplyReader(s)
            greeting = reader.reply()
            d = Dialogue(client=client, greeting=greeting, greeting_closed=not greeting)
            for cmd in commands:
                try:
                    s.sendall(cmd.encode() + b"\r\n")
                except OSError:
                    reply = []
                else:
                    reply = reader.reply()
                if not reply:
                    # The server had closed after the previous reply; we learn it only now,
                    # from an event rather than a guess with a timer.
                    if d.exchanges:
                        last = d.exchanges.pop()
                        d.exchanges.append(Exchange(last.command, last.reply, True))
                    else:
                        d.greeting_closed = True
                    break
                d.exchanges.append(Exchange(cmd, reply, cmd == "QUIT"))
        d.log = self._session_log(offset, client)
        return d

    def raw_dialogue(
        self, client: str, steps: Sequence[RawStep | bytes | str], *, logs: bool = True
    ) -> RawDialogue:
        """:func:`raw_session` against this instance from ``client`` (127.0.0.N, N >= 2).

        With ``logs`` (the default) it then waits for the session's ``disconnect from`` line
        and returns the session's smtpd log lines in ``log``, as :meth:`dialogue` does.
        """
        if not self.running:
            raise PostfixError("instance not started")
        offset = self.maillog.stat().st_size if self.maillog.exists() else 0
        d = raw_session("127.0.0.1", self.port, client, steps)
        if logs:
            d.log = self._session_log(offset, client)
        return d

    def _session_log(self, offset: int, client: str) -> list[str]:
        """This session's smtpd lines: from its ``connect from`` to its ``disconnect from``.

        Only lines of the smtpd process that logged the connect count, so start-up warnings
        of a process (logged whenever it happens to start) stay out of the transcript; see
        :meth:`warnings` for those. Queue ids are shown as ``QUEUEID``.
        """
        connect = f"connect from unknown[{client}]"
        disconnect = f"disconnect from unknown[{client}]"
        for _ in _deadline_loop(LOG_TIMEOUT):
            with self.maillog.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            text = text.replace(str(self.etc), DIR_PLACEHOLDER)
            pid, out = None, []
            for m in map(_SMTPD_LINE.search, text.splitlines()):
                if m is None:
                    continue
                msg = _QUEUE_ID.sub(
                    lambda q: "NOQUEUE: " if q[0] == "NOQUEUE: " else "QUEUEID: ", m["msg"]
                )
                if pid is None:
                    if msg == connect:
                        pid = m["pid"]
                    continue
                if m["pid"] != pid or msg.startswith(_NOISE):
                    continue
                out.append(msg)
                if msg.startswith(disconnect):
                    return out
        raise PostfixError(f"no '{disconnect}' log line within {LOG_TIMEOUT}s{self._log_tail()}")

    def warnings(self) -> list[str]:
        """Every distinct warning/error any Postfix process logged so far (time, pid removed)."""
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError:
            return []
        text = text.replace(str(self.etc), DIR_PLACEHOLDER)
        found = re.findall(r"(postfix[\w/.-]*)\[\d+\]: ((?:warning|error|fatal|panic): .*)", text)
        return sorted({f"{who}: {msg}" for who, msg in found if not msg.startswith(_NOISE)})


class _ReplyReader:
    """Reads complete (possibly multi-line) SMTP replies from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        self.buf += chunk
        return bool(chunk)

    def reply(self) -> list[str]:
        """One reply's lines; an empty list if the peer closed before replying."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                if not self._fill():
                    if self.buf:
                        lines.append(self.buf.decode(errors="replace"))
                        self.buf = b""
                    return lines
            raw, self.buf = self.buf.split(b"\r\n", 1)
            line = raw.decode(errors="replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines


@contextmanager
def postfix_instance(
    main_cf: str = "", tables: Mapping[str, str] | None = None, **kw: object
) -> Iterator[PostfixInstance]:
    """Function form of :class:`PostfixInstance` as a context manager."""
    with PostfixInstance(main_cf, tables, **kw) as pf:  # type: ignore[arg-type]
        yield pf
