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

:meth:`PostscreenInstance.session` runs a :func:`~tests.postfix_instance.raw_session` from a
127.0.0.N source address and then waits for the session's last log line (postscreen's
``DISCONNECT``, or the ``disconnect from`` of the smtpd the client was passed to), returning
every postscreen, dnsblog and smtpd line naming that client (:func:`client_lines`). Give each
scenario a client address of its own: postscreen remembers clients in its cache.

:func:`normalise` turns those lines into a comparable form: no client port, queue id or
elapsed time.
"""

from __future__ import annotations

import os
import re
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
    RawStep,
    raw_session,
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
    """A raw session through postscreen and its log lines (``program: message``)."""

    dialogue: RawDialogue
    log: list[str] = field(default_factory=list)
    seconds: float = 0.0  # from connect until the greeting was read


def screened_session(
    host: str,
    port: int,
    client: str,
    steps: Sequence[RawStep | bytes | str],
    *,
    pregreet: bytes = b"",
    probe: bool = True,
    timeout: float = 15.0,
) -> ScreenedSession:
    """:func:`raw_session` from ``client``, its greeting timed (``seconds``)."""
    d = raw_session(host, port, client, steps, timeout=timeout, pregreet=pregreet, probe=probe)
    return ScreenedSession(d, seconds=d.greeting_seconds)


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
        timeout: float = 15.0,
    ) -> ScreenedSession:
        """A session from ``client`` and the log lines naming it, once it has ended."""
        if not self.running:
            raise PostfixError("instance not started")
        offset = self.maillog.stat().st_size if self.maillog.exists() else 0
        s = screened_session(
            "127.0.0.1", self.port, client, steps, pregreet=pregreet, probe=probe, timeout=timeout
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
