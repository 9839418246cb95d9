"""Log lines in Postfix's format, to ``maillog_file`` or to standard error.

Every line reads as Postfix's ``maillog_file`` does::

    Nov 28 05:22:12 mx postfix/smtpd[26508]: NOQUEUE: reject: RCPT from ...

so that ``grep NOQUEUE`` and fail2ban's postfix filter work unchanged.  The program
name is ``$syslog_name/smtpd``; with ``syslog_name = postfix`` (the default) the lines
are indistinguishable in form from Postfix's own.  Warnings carry Postfix's
``warning:`` prefix.  Python's ``logging`` (loggers ``smtpgate.*``) is routed here too,
so a library warning lands in the same file.

Transaction ids are the queue-id form Postfix logs once a recipient was accepted: 10
upper-case hexadecimal characters, unique within the process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import threading
import time
from typing import TextIO

from smtpgate.config.service import ServiceConfig

_counter = itertools.count(int(time.time() * 1000) & 0xFFFFFF)
_pid = os.getpid()  # for every log line: getpid() is a system call


def _reseed_after_fork() -> None:
    """Worker processes must not repeat each other's queue ids: a fresh start per process."""
    global _counter, _pid
    _counter = itertools.count(int.from_bytes(os.urandom(3), "big"))
    _pid = os.getpid()


os.register_at_fork(after_in_child=_reseed_after_fork)


def new_queue_id() -> str:
    """A Postfix-looking short queue id (hex), unique within this process."""
    return f"{(int(time.time()) & 0xFFFFF):05X}{next(_counter) & 0xFFFFF:05X}"


class MailLog:
    """Writes Postfix-format lines; thread-safe; in the server, written out once per turn
    of the event loop (see _write)."""

    def __init__(
        self,
        hostname: str,
        syslog_name: str = "postfix",
        path: str | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.hostname = hostname.split(".")[0] or hostname
        self.tag = f"{syslog_name}/smtpd"
        self.path = path
        self._lock = threading.Lock()
        self._flush_pending = False
        self._stamp_second = -1
        self._stamp = ""
        self._pending: list[str] = []
        self._stream: TextIO | None = None
        self._fd = -1
        if path:
            # Lines written within one turn of the event loop go out in one os.write() on an
            # O_APPEND descriptor (see _write and flush): whole lines only, so the lines of
            # several worker processes sharing the file never interleave mid-line.
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            self._owned = True
        else:
            self._stream = stream or sys.stderr
            self._owned = False

    @classmethod
    def from_config(cls, config: ServiceConfig, stream: TextIO | None = None) -> MailLog:
        """myhostname, syslog_name and maillog_file (empty: ``stream``, else stderr)."""
        return cls(config.hostname, config.syslog_name, config.maillog_file or None, stream)

    def program(self, name: str) -> ProgramLog:
        """The same log under another program name (``postfix/postscreen``)."""
        return ProgramLog(self, f"{self.tag.rsplit('/', 1)[0]}/{name}")

    def _write(self, text: str, tag: str | None = None) -> None:
        now = int(time.time())
        if now != self._stamp_second:  # strftime once per second, not once per line
            self._stamp_second = now
            self._stamp = time.strftime("%b %d %H:%M:%S", time.localtime(now))
        line = f"{self._stamp} {self.hostname} {tag or self.tag}[{_pid}]: {text}\n"
        with self._lock:
            if self._stream is not None:
                try:
                    self._stream.write(line)
                except (OSError, ValueError):
                    return  # logging must never take the server down
            else:
                self._pending.append(line)
            if self._flush_pending:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is None:
                self._flush_locked()
            else:
                # In the server: flushed at the end of this turn of the event loop (and
                # before each reply to a client, see flush), one write() for all lines.
                self._flush_pending = True
                loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write out buffered lines (cheap when there are none)."""
        if self._flush_pending:
            with self._lock:
                self._flush_locked()

    def _flush_locked(self) -> None:
        self._flush_pending = False
        try:
            if self._stream is not None:
                self._stream.flush()
                return
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending.clear()
            if self._fd < 0:
                return
            data = text.encode("utf-8", "replace")
            while data:  # one write() for a regular file; a loop only for the rare short one
                written = os.write(self._fd, data)
                data = data[written:]
        except (OSError, ValueError):
            pass  # logging must never take the server down

    def info(self, text: str) -> None:
        self._write(text)

    def warning(self, text: str) -> None:
        self._write(f"warning: {text}")

    def error(self, text: str) -> None:
        self._write(f"error: {text}")

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
        if self._owned and self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass


class ProgramLog:
    """A :class:`MailLog` writing under another program name (same file, same order)."""

    def __init__(self, maillog: MailLog, tag: str) -> None:
        self.maillog = maillog
        self.tag = tag

    def info(self, text: str) -> None:
        self.maillog._write(text, self.tag)

    def warning(self, text: str) -> None:
        self.maillog._write(f"warning: {text}", self.tag)

    def flush(self) -> None:
        self.maillog.flush()


class _MailLogHandler(logging.Handler):
    def __init__(self, maillog: MailLog) -> None:
        super().__init__(logging.INFO)
        self.maillog = maillog

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            text += " " + " | ".join(
                logging.Formatter().formatException(record.exc_info).splitlines()
            )
        if record.levelno >= logging.ERROR:
            self.maillog.error(text)
        elif record.levelno >= logging.WARNING:
            self.maillog.warning(text)
        else:
            self.maillog.info(text)


def route_python_logging(maillog: MailLog) -> None:
    """Send the ``smtpgate`` loggers' records to ``maillog`` (replacing earlier routes)."""
    logger = logging.getLogger("smtpgate")
    for handler in list(logger.handlers):
        if isinstance(handler, _MailLogHandler):
            logger.removeHandler(handler)
    logger.addHandler(_MailLogHandler(maillog))
    logger.setLevel(logging.INFO)
    logger.propagate = False
