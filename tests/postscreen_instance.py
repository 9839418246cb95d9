"""A throwaway Postfix 3.7 with postscreen(8) in front of smtpd, on loopback, and its DNS.

Theory of operation
-------------------
:class:`PostscreenInstance` is a :class:`~tests.postfix_instance.PostfixInstance` whose
master.cf puts ``postscreen`` on the loopback port, with ``smtpd`` as a ``pass`` service and
``dnsblog``/``tlsproxy`` beside it (:data:`POSTSCREEN_MASTER_CF`).

postscreen's DNS lists are queried by dnsblog(8) through the C library's resolver, which reads
``/etc/resolv.conf`` and asks port 53. The instance therefore starts its master in a mount
namespace of its own (``unshare --mount``, private propagation) in which a ``resolv.conf`` of
the instance (``nameserver`` = :attr:`PostscreenInstance.nameserver`, a 127/8 address) is
bind-mounted over ``/etc/resolv.conf``; the machine's file is never changed, and every process
the master starts (postscreen, dnsblog, smtpd) inherits the namespace. The test's
:class:`~tests.dns.dnsserver.FakeDns` listens on that address, port 53 (binding port 53 needs
root, as running Postfix does: CI runs as root). smtpgate is pointed at the same server with
``dns_servers``.

:meth:`PostscreenInstance.session` runs a :func:`screened_session` (a scripted raw session
that may write before the greeting and records the greeting's delay) from a 127.0.0.N source
address and then waits for the session's last log line (postscreen's
``DISCONNECT``, or the ``disconnect from`` of the smtpd the client was passed to), returning
every postscreen, dnsblog and smtpd line naming that client (:func:`client_lines`). Give each
scenario a client address of its own: postscreen remembers clients in its cache.

:func:`normalise` turns those lines into a comparable form: no client port, queue id or
elapsed time.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tests.dns.dnsserver import FakeDns
from tests.postfix_instance import (
    MASTER_CF,
    POSTFIX,
    PostfixError,
    PostfixInstance,
    RawDialogue,
    RawExchange,
    RawStep,
)

#: master.cf: postscreen on the listener, smtpd behind it (see postscreen(8), "CONFIGURATION").
POSTSCREEN_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       1       postscreen
smtpd     pass  -       -       n       -       -       smtpd
dnsblog   unix  -       -       n       -       0       dnsblog
tlsproxy  unix  -       -       n       -       0       tlsproxy
""" + MASTER_CF.split("\n", 2)[2]

#: A line of one of the programs a postscreen session involves, in maillog_file form.
_PROGRAM_LINE = re.compile(
    r"\b(?:[\w.-]+/)*(?P<prog>postscreen|dnsblog|smtpd)\[\d+\]: (?P<msg>.*)$"
)
#: The line after which nothing more is logged for a session (its own program name first).
_END = re.compile(r"^(?:postscreen: DISCONNECT \[|smtpd: disconnect from )")
_PORT = re.compile(r"(\[\d+\.\d+\.\d+\.\d+\]):\d+")
_SECONDS = re.compile(r"\b(after|in) \d+(?:\.\d+)?(?= from )")
_QUEUE_ID = re.compile(r"^(?:[0-9A-F]{6,}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10,}): ")
LOG_TIMEOUT = 15.0


def nameserver_for(index: int) -> str:
    """A 127/8 address for a name server: distinct per ``index`` and per test process."""
    pid = os.getpid()
    return f"127.{53 + index % 64}.{(pid >> 8) & 0xFF}.{pid & 0xFF or 1}"


def client_lines(text: str, client: str) -> tuple[list[str], bool]:
    """The ``program: message`` lines of ``text`` naming ``client``, up to its session's end.

    A line names the client when it has ``[client]`` (postscreen, smtpd) or ``addr client``
    (dnsblog). Returns the lines and whether the session's last line was among them.
    """
    needle = re.compile(rf"(\[{re.escape(client)}\]|\baddr {re.escape(client)}\b)")
    out = []
    for line in text.splitlines():
        m = _PROGRAM_LINE.search(line)
        if m is None or not needle.search(m["msg"]):
            continue
        out.append(f"{m['prog']}: {m['msg']}")
        if _END.match(out[-1]):
            return out, True
    return out, False


def normalise(lines: Sequence[str]) -> list[str]:
    """``program: message`` lines without client ports, elapsed times and queue ids."""
    out = []
    for line in lines:
        prog, _, msg = line.partition(": ")
        msg = _QUEUE_ID.sub("QUEUEID: ", msg)
        msg = _PORT.sub(r"\1:PORT", msg)
        msg = _SECONDS.sub(r"\1 T", msg)
        out.append(f"{prog}: {msg}")
    return out


@dataclass
class ScreenedSession:
    """A session through postscreen: what was said, how long the greeting took, the log.

    ``dialogue`` is a :class:`~tests.postfix_instance.RawDialogue`; ``stalled`` says that the
    server said nothing more for the client's whole timeout while a reply was awaited (the
    replies read until then are kept). ``log`` holds ``program: message`` lines.
    """

    dialogue: RawDialogue
    seconds: float = 0.0  # from the connection until the greeting was read
    stalled: bool = False
    log: list[str] = field(default_factory=list)


class _Replies:
    """Reads complete (possibly multi-line) replies; a timeout keeps what was read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.lines: list[str] = []

    def reply(self) -> tuple[list[str], bool]:
        """(lines of one reply, server closed). Raises TimeoutError; ``lines`` keeps the
        lines of the unfinished reply."""
        self.lines = []
        while True:
            while b"\r\n" not in self.buf:
                try:
                    chunk = self.sock.recv(4096)
                except (ConnectionResetError, BrokenPipeError):
                    chunk = b""
                if not chunk:
                    if self.buf:
                        self.lines.append(self.buf.decode(errors="replace"))
                        self.buf = b""
                    return self.lines, True
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\r\n", 1)
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return self.lines, False


def screened_session(
    host: str,
    port: int,
    client: str,
    steps: Sequence[RawStep | bytes | str],
    *,
    pregreet: bytes = b"",
    probe: bool = True,
    greet: bool = True,
    timeout: float = 5.0,
) -> ScreenedSession:
    """A scripted session from ``client`` (127.0.0.N), as
    :func:`~tests.postfix_instance.raw_session` runs one, and:

    - ``pregreet`` is written at once after connecting, before the greeting is read (a
      client that talks first);
    - the time until the greeting was read is recorded;
    - a server that says nothing for ``timeout`` seconds while a reply is awaited ends the
      session (``stalled``), the replies read so far kept;
    - without ``probe`` the client closes after its last step (it hangs up) instead of
      sending ``NOOP`` to learn whether the server closes;
    - without ``greet`` it closes at once after connecting (and its pregreet), before the
      greeting (postscreen's "HANGUP ... in tests before SMTP handshake").
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.bind((client, 0))
        s.connect((host, port))
        start = time.monotonic()
        if pregreet:
            s.sendall(pregreet)
        if not greet:
            return ScreenedSession(RawDialogue(client, [], False))
        reader = _Replies(s)
        d = RawDialogue(client=client, greeting=[], greeting_closed=False)
        out = ScreenedSession(d)
        try:
            d.greeting, closed = reader.reply()
            out.seconds = time.monotonic() - start
            d.greeting_closed = closed
            for step in map(RawStep.of, steps):
                if closed:
                    break
                closed = _exchange(s, reader, step, d)
            if not closed and probe:
                _probe(s, reader, d)
        except TimeoutError:
            out.stalled = True
            if not d.greeting:
                d.greeting = reader.lines
                out.seconds = time.monotonic() - start
    return out


def _exchange(s: socket.socket, reader: _Replies, step: RawStep, d: RawDialogue) -> bool:
    """Write one step, read its replies into ``d``; True if the server has closed.

    On a timeout the replies read so far are recorded before the TimeoutError goes on."""
    replies: list[list[str]] = []
    closed = False
    try:
        s.sendall(step.data)
    except OSError:
        closed = True
    while not closed and len(replies) < step.replies:
        try:
            reply, closed = reader.reply()
        except TimeoutError:
            d.exchanges.append(RawExchange(step.data, [*replies, reader.lines], False))
            raise
        if reply:
            replies.append(reply)
    if not replies:
        _closed_before(d)
        return True
    d.exchanges.append(RawExchange(step.data, replies, closed))
    return closed


def _probe(s: socket.socket, reader: _Replies, d: RawDialogue) -> None:
    """``NOOP`` (not recorded): no reply means the server had closed after the last step."""
    try:
        s.sendall(b"NOOP\r\n")
        reply, _ = reader.reply()
    except OSError:
        reply = []
    if not reply:
        _closed_before(d)


def _closed_before(d: RawDialogue) -> None:
    """The server had closed before the last write: mark the previous exchange closed."""
    if d.exchanges:
        last = d.exchanges.pop()
        d.exchanges.append(RawExchange(last.sent, last.replies, True))
    else:
        d.greeting_closed = True


class PostscreenInstance(PostfixInstance):
    """Postfix with postscreen on loopback, resolving through :attr:`nameserver`:53."""

    master_cf = POSTSCREEN_MASTER_CF

    def __init__(
        self,
        main_cf: str = "",
        tables: Mapping[str, str] | None = None,
        *,
        nameserver: str | None = None,
        **kw: object,
    ) -> None:
        super().__init__(main_cf, tables, **kw)  # type: ignore[arg-type]
        self.nameserver = nameserver or nameserver_for(self.port)
        self.resolv_conf = self.tmp / "resolv.conf"
        # One try of two seconds: a list that never answers is postscreen's timeout to
        # observe (postscreen_dnsbl_timeout), not the C library's retries.
        self.resolv_conf.write_text(f"nameserver {self.nameserver}\noptions timeout:2 attempts:1\n")
        self.resolv_conf.chmod(0o644)

    def start_argv(self) -> list[str]:
        script = 'mount --bind "$1" /etc/resolv.conf && exec "$2" -c "$3" start'
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(self.resolv_conf),
            POSTFIX,
            str(self.etc),
        ]

    def start_dns(self, dns: FakeDns) -> FakeDns:
        """Start ``dns`` on this instance's name server address, port 53."""
        return dns.start(self.nameserver, 53)

    def session(
        self,
        client: str,
        steps: Sequence[RawStep | bytes | str],
        *,
        pregreet: bytes = b"",
        probe: bool = True,
        greet: bool = True,
        timeout: float = 5.0,
    ) -> ScreenedSession:
        """A session from ``client`` and the log lines naming it, once it has ended."""
        if not self.running:
            raise PostfixError("instance not started")
        offset = self.maillog.stat().st_size if self.maillog.exists() else 0
        s = screened_session(
            "127.0.0.1",
            self.port,
            client,
            steps,
            pregreet=pregreet,
            probe=probe,
            greet=greet,
            timeout=timeout,
        )
        s.log = self.client_log(offset, client)
        return s

    def client_log(self, offset: int, client: str) -> list[str]:
        """The lines after ``offset`` that name ``client``, once its session has ended."""
        end = time.monotonic() + LOG_TIMEOUT
        while True:
            with self.maillog.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            lines, ended = client_lines(text, client)
            if ended:
                return lines
            if time.monotonic() > end:
                raise PostfixError(
                    f"no end of session for {client} within {LOG_TIMEOUT}s:\n"
                    + "\n".join(lines)
                    + self._log_tail()
                )
            time.sleep(0.02)  # polling the maillog for the session's last line (bounded)
