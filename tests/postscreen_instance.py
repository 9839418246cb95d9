"""A throwaway Postfix 3.7 with postscreen(8) in front of smtpd, on loopback, and its DNS.

Theory of operation
-------------------
:class:`PostscreenInstance` is a :class:`~tests.postfix_instance.PostfixInstance` whose
master.cf puts ``postscreen`` on the loopback port, with ``smtpd`` as a ``pass`` service and
``dnsblog``/``tlsproxy`` beside it (:data:`POSTSCREEN_MASTER_CF`).

postscreen's DNS lists are queried by dnsblog(8) through the C library's resolver, which reads
``/etc/resolv.conf`` and asks port 53. The instance therefore starts its master in a mount
namespace of its own (``unshare -m``, private propagation) in which a ``resolv.conf`` of the
instance (``nameserver`` = :attr:`PostscreenInstance.nameserver`, a 127/8 address of its own)
is bind-mounted over ``/etc/resolv.conf``; the machine's file is never changed, and every
process the master starts (postscreen, dnsblog, smtpd) inherits the namespace. The test's
:class:`~tests.dns.dnsserver.FakeDns` listens on that address, port 53 (root only: CI runs as
root). smtpgate is pointed at the same server with ``dns_servers``.

:meth:`PostscreenInstance.session` runs a :func:`~tests.postfix_instance.raw_session` from a
127.0.0.N source address and then waits for the session's last log line (a postscreen
``DISCONNECT``/``HANGUP``, or the smtpd ``disconnect from`` of a client that was passed on),
returning every postscreen, dnsblog and smtpd line naming that client. Give each scenario a
client address of its own: postscreen remembers clients in its cache.

:func:`normalise` turns log lines into a comparable form: no syslog prefix, pid, client
port, queue id or elapsed time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
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
POSTSCREEN_MASTER_CF = (
    """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       1       postscreen
smtpd     pass  -       -       n       -       -       smtpd
dnsblog   unix  -       -       n       -       0       dnsblog
tlsproxy  unix  -       -       n       -       0       tlsproxy
"""
    + MASTER_CF.split("\n", 2)[2]
)

#: Lines of a session that end it, by program: after one of these nothing more is logged.
_END = re.compile(
    r"postfix/postscreen\[\d+\]: DISCONNECT \["
    r"|postfix/smtpd\[\d+\]: disconnect from "
)
_PROGRAM_LINE = re.compile(r"postfix/(?P<prog>postscreen|dnsblog|smtpd)\[\d+\]: (?P<msg>.*)$")
_PORT = re.compile(r"(\[\d+\.\d+\.\d+\.\d+\]):\d+")
_SECONDS = re.compile(r"\b(after|in) \d+(?:\.\d+)?\b")
_QUEUE_ID = re.compile(r"^(?:[0-9A-F]{6,}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10,}): ")
LOG_TIMEOUT = 15.0


def nameserver_for(port: int) -> str:
    """A 127/8 address for an instance's name server, distinct per SMTP port."""
    return f"127.53.{port >> 8}.{port & 0xFF or 1}"


@dataclass
class ScreenedSession:
    """A raw session through postscreen and its log lines (``program: message``)."""

    dialogue: RawDialogue
    log: list[str] = field(default_factory=list)
    seconds: float = 0.0  # from connect until the greeting was read


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


class PostscreenInstance(PostfixInstance):
    """Postfix with postscreen on loopback, resolving through :attr:`nameserver`:53."""

    master_cf = POSTSCREEN_MASTER_CF

    def __init__(self, main_cf: str = "", tables: dict[str, str] | None = None, **kw: object):
        super().__init__(main_cf, tables, **kw)  # type: ignore[arg-type]
        self.nameserver = nameserver_for(self.port)
        self.resolv_conf = self.tmp / "resolv.conf"
        # One try of two seconds: a list that never answers is postscreen's timeout to
        # observe (postscreen_dnsbl_timeout), not the C library's retries.
        self.resolv_conf.write_text(
            f"nameserver {self.nameserver}\noptions timeout:2 attempts:1\n"
        )
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
        timeout: float = 15.0,
        pregreet: bytes = b"",
    ) -> ScreenedSession:
        """A raw session from ``client`` and the log lines naming it, once it has ended."""
        if not self.running:
            raise PostfixError("instance not started")
        offset = self.maillog.stat().st_size if self.maillog.exists() else 0
        start = time.monotonic()
        d = raw_session(
            "127.0.0.1", self.port, client, steps, timeout=timeout, pregreet=pregreet
        )
        s = ScreenedSession(d, seconds=time.monotonic() - start)
        s.log = self.client_log(offset, client)
        return s

    def client_log(self, offset: int, client: str) -> list[str]:
        """The lines after ``offset`` that name ``client``, up to the session's end."""
        needle = re.compile(rf"(\[{re.escape(client)}\]|\baddr {re.escape(client)}\b)")
        end = time.monotonic() + LOG_TIMEOUT
        while True:
            with self.maillog.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            out = []
            for line in text.splitlines():
                m = _PROGRAM_LINE.search(line)
                if m is None or not needle.search(m["msg"]):
                    continue
                out.append(f"{m['prog']}: {m['msg']}")
                if _END.search(line):
                    return out
            if time.monotonic() > end:
                raise PostfixError(
                    f"no end of session for {client} within {LOG_TIMEOUT}s:\n"
                    + "\n".join(out)
                    + self._log_tail()
                )
            time.sleep(0.02)  # polling the maillog for the session's last line (bounded)
