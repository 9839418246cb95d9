"""The SMTP front end: aiosmtpd underneath, Postfix's protocol on the wire.

This is the only module that imports aiosmtpd.  :class:`GateProtocol` subclasses
``aiosmtpd.smtp.SMTP`` for its stream plumbing and its STARTTLS transport switch (which
discards plaintext pipelined behind STARTTLS), and replaces the command loop: aiosmtpd's
replies, its 500-with-exception-text error path and its handler hooks are not used.

Per command the protocol does the syntax work (Postfix's texts), asks the
:class:`~smtpgate.policy.session.PolicySession` (the same engine ``explain`` runs), and
drives the lock-step relay: the backend transaction opens at the first recipient that
passes the restrictions, every recipient's reply is the backend's, and the reply to the
final dot is the backend's.  A reply that disconnects (421, 521) is written, flushed and
followed by a close, in :meth:`GateProtocol._send` and nowhere else.

Replies to a pipelined group are buffered and written together; the buffer is flushed
whenever no more input is waiting, so a client that waits for each reply gets it at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import re
import socket
import ssl
import sys
import termios
import time
from collections import defaultdict
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, NamedTuple

from aiosmtpd.smtp import SMTP, Session

from smtpgate.anvil import AnvilClient, LocalAnvil
from smtpgate.config.service import ServiceConfig
from smtpgate.errors import TableLookupError
from smtpgate.generation import Generation
from smtpgate.logs import MailLog, new_queue_id
from smtpgate.policy.address import (
    dup_if_truncate,
    header_safe,
    valid_hostname,
    valid_mailhost_addr,
)
from smtpgate.policy.model import ClientInfo, Decision, Stage
from smtpgate.policy.peer import lookup_client
from smtpgate.policy.plan import Plan
from smtpgate.policy.ports import Resolver
from smtpgate.policy.session import PolicySession
from smtpgate.relay import (
    ClientFacts,
    Relay,
    Transaction,
    plain_content,
    quote_local,
)
from smtpgate.reply import R451_LOCAL_ERROR, Reply

log = logging.getLogger("smtpgate.smtpd")

OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
BAD_UTF8 = Reply(500, "5.5.2", "Error: bad UTF-8 syntax")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NO_AUTH = Reply(503, "5.5.1", "Error: authentication not enabled")
NOT_AUTHORIZED = Reply(550, "5.7.0", "Error: insufficient authorization")
# Postfix with CHUNKING off: BDAT content cannot be skipped, so it disconnects.
NO_CHUNKING = Reply(521, "5.5.1", "Error: command not implemented", disconnect=True)
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
NEED_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
FORBIDDEN = Reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.", disconnect=True)
NUL_IN_DATA = Reply(550, "5.6.0", "Error: message content contains a NUL character")
DATA_GO_AHEAD = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
SYNC_ERROR = Reply(554, "5.5.0", "Error: SMTP protocol synchronization", disconnect=True)
NO_MEMORY = Reply(451, "4.3.1", "Insufficient system resources")

# Postfix's order of the counters in the "disconnect from" line.
COUNTED = "helo ehlo starttls auth mail rcpt data bdat rset noop vrfy etrn quit unknown".split()
ALLOWED_BEFORE_TLS = {"HELO", "EHLO", "STARTTLS", "NOOP", "RSET", "QUIT"}
# smtpd.c's command table: SMTPD_CMD_FLAG_LIMIT (junk commands) and SMTPD_CMD_FLAG_LAST (must
# end a pipelined group, RFC 2920 section 3.1).
JUNK_COMMANDS = {"HELO", "EHLO", "RSET", "NOOP", "VRFY", "ETRN"}
LAST_IN_GROUP = {"HELO", "EHLO", "DATA", "NOOP", "VRFY"}
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"^[0-9]+$")
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})+$")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
OFF_T_MAX = 2**63 - 1  # SIZE beyond this: Postfix's "file system imposed limit"
_END_OF_DATA = b"\r\n.\r\n"
WRITE_BACKLOG = 65536  # reply bytes buffered for a client before smtpgate waits for it
DATA_RESERVE = 65536  # room a new DATA needs in smtpgate_data_memory_limit: one read
# A message's bytes are reserved in the shared budget in grains that grow with it (each
# at least half what the message holds), so that a 1 KB message costs one request to the
# anvil and a 10 MB one about a dozen, never one per read.


GateConfig = ServiceConfig
"""The name this module has always used for its configuration."""


@dataclass
class Shared:
    """What every connection of one server shares: the generation it serves (immutable,
    replaced as one reference) and the server's own mutable state beside it."""

    generation: Generation
    maillog: MailLog
    sessions: set[GateProtocol] = field(default_factory=set)
    draining: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a session ends or finishes a command (the drain waits on it)."""
    anvil: AnvilClient = field(default_factory=LocalAnvil)
    """Connection counts and event rates per client address, and the message bytes held
    in memory (smtpgate_data_memory_limit), for the whole server: every worker asks the
    same anvil (kept across reloads)."""

    @property
    def plan(self) -> Plan:
        return self.generation.plan

    @property
    def config(self) -> ServiceConfig:
        return self.generation.config

    @property
    def relay(self) -> Relay:
        return self.generation.relay

    @property
    def resolver(self) -> Resolver:
        return self.generation.resolver

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        return self.generation.tls_context


class _NoHooks:
    """aiosmtpd wants a handler object; every hook is handled in GateProtocol."""


_NO_HOOKS = _NoHooks()


@dataclass
class _Transaction:
    sender: str
    mail_params: list[str]
    recipients: list[str] = field(default_factory=list)
    relay: Transaction | None = None
    overshoot: int = 0


class GateProtocol(SMTP):
    """One client connection."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.config = shared.config
        self.line_length_limit = self.config.line_limit + 2
        self._init_aiosmtpd()
        self._out: list[bytes] = []  # replies not yet handed to the transport
        self._out_size = 0
        self.policy: PolicySession | None = None
        self.client: ClientInfo | None = None
        self.txn: _Transaction | None = None
        self.counts: defaultdict[str, int] = defaultdict(int)
        self.successes: defaultdict[str, int] = defaultdict(int)
        self.esmtp = False
        self.tls_active = False
        self.closing = False
        self.busy = False
        # Postfix's state->error_count, junk_cmds, SMTPD_FLAG_ILL_PIPELINING, where.
        self.error_count = 0
        self.junk_cmds = 0
        self.ill_pipelining = False
        self.where = "CONNECT"
        self.excepted = False  # smtpd_client_event_limit_exceptions: no limits
        self.anvil_counted = False  # connect() was called: disconnect() is owed
        self.data_held = 0  # bytes this session has reserved in the shared budget
        self.last_input = time.monotonic()
        self.input_seen: asyncio.Event | None = None  # made only for a greet pause

    def _init_aiosmtpd(self) -> None:
        """aiosmtpd's SMTP.__init__ without its per-connection cost.

        aiosmtpd builds tables of AUTH mechanisms, handler hooks and ``smtp_*`` methods
        with ``inspect.getmembers``/``dir`` for every connection, and logs them; smtpgate
        uses none of them (it has its own command loop).  This sets the attributes that
        the inherited stream plumbing, ``connection_made`` (with its STARTTLS switch,
        which clears plaintext left in the buffer) and ``_reset_timeout`` rely on.
        """
        self.__ident__ = ""
        self.loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = _NO_HOOKS
        self.data_size_limit = None
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = self.config.hostname
        self.tls_context = self.shared.tls_context
        self.require_starttls = False
        self._timeout_duration = 10**9  # smtpgate keeps its own timers (smtpd_timeout)
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = False
        self._auth_methods = {}
        self._handle_hooks = {}
        self._ehlo_hook_ver = None
        self._smtp_methods = {}
        self._enforce_call_limit = False

    def data_received(self, data: bytes) -> None:
        self.last_input = time.monotonic()
        if self.input_seen is not None:
            self.input_seen.set()
        super().data_received(data)

    # -- connection events ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # the STARTTLS switch: aiosmtpd's work
            super().connection_made(transport)
            return
        # A new connection: the part of aiosmtpd's connection_made that smtpgate uses
        # (not its idle timer, log line or envelope: smtpgate keeps its own).
        self.session = Session(self.loop)
        self.session.peer = _peername(transport)
        asyncio.StreamReaderProtocol.connection_made(self, transport)
        self.transport = transport
        self._handler_coroutine = self.loop.create_task(self._handle_client())

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the command loop here; let the reader see EOF instead, so a
        # relay in progress finishes cleanly.
        if self.session is not None and self.session.ssl is not None:
            super(SMTP, self).eof_received()
            return False
        return super(SMTP, self).eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        if self._original_transport is not None:
            self._original_transport.close()
        self.closing = True
        super(SMTP, self).connection_lost(error)

    # -- replies ----------------------------------------------------------------------

    def _write(self, reply: Reply) -> None:
        if self.closing or self._writer is None:
            return
        data = _wire(reply)
        self._out.append(data)
        self._out_size += len(data)

    def _push(self) -> None:
        """Hand the buffered replies to the transport in one write (one send())."""
        out = self._out
        if not out:
            return
        self.shared.maillog.flush()  # log lines reach the file before the reply the client
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)  # type: ignore[attr-defined]

    async def _flush(self, force: bool = False) -> None:
        """Write out buffered replies when no more input waits (or when asked, or when
        replies pile up); smtpd_timeout bounds the wait for a slow reader, as in Postfix."""
        if self.closing:
            return
        if not (force or self._out_size > WRITE_BACKLOG or not self._reader._buffer):  # type: ignore[attr-defined]
            return
        self._push()
        transport = self.transport
        if transport is None or not transport.get_write_buffer_size():  # type: ignore[attr-defined]
            return  # all of it went to the kernel: nothing to wait for
        try:
            await asyncio.wait_for(self._writer.drain(), self.config.timeout)
        except TimeoutError:
            self.shared.maillog.info(f"timeout after {self.where} from {self._namaddr}")
            self.closing = True
            transport.abort()  # type: ignore[attr-defined]  # drop what is unsent
        except (ConnectionError, OSError):
            self.closing = True

    async def _send(self, reply: Reply) -> None:
        """Send a reply; a disconnecting reply is flushed and the connection closed.

        Past smtpd_soft_error_limit errors every reply waits smtpd_error_sleep_time first
        and is flushed at once (Postfix's vsmtpd_chat_reply()).
        """
        delay = self.error_count >= self.config.soft_error_limit and self.config.error_sleep > 0
        if delay and not self.closing:
            await self._flush(force=True)
            await asyncio.sleep(self.config.error_sleep)
        self._write(reply)
        if delay:
            await self._flush(force=True)
        if reply.disconnect:
            await self._flush(force=True)
            self._close()

    def _close(self) -> None:
        self._push()
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # -- the command loop -------------------------------------------------------------

    async def _handle_client(self) -> None:
        shared = self.shared
        shared.sessions.add(self)
        try:
            peer = _client_info(self.session.peer if self.session else None)
            self.client = peer
            found = await lookup_client(
                shared.resolver,
                peer.address,
                peer.port,
                peername_lookup=self.config.peername_lookup,
            )
            for record in found.logs:
                shared.maillog.warning(record.text)
            client = found.client
            self.client = client
            self.policy = PolicySession(shared.plan, client, shared.resolver, trace=False)
            shared.maillog.info(f"connect from {client.namaddr}")
            if await self._admit():
                await self._greet()
            while not self.closing:
                if self.error_count >= self.config.hard_error_limit:
                    await self._too_many_errors()
                    break
                line = await self._read_command()
                if line is None:
                    break
                self.busy = True
                try:
                    await self._dispatch(line)
                except Exception:
                    log.exception("%s: unexpected error", client.namaddr)
                    await self._end_transaction()
                    await self._send(R451_LOCAL_ERROR)
                finally:
                    self.busy = False
                    shared.changed.set()
                await self._flush()
        except asyncio.CancelledError:
            self.closing = True
        finally:
            await self._end_transaction()
            self._release_data()
            if self.anvil_counted and self.client is not None:
                shared.anvil.disconnect(None if self.excepted else self.client.address)
            self._log_disconnect()
            shared.sessions.discard(self)
            shared.changed.set()
            self._close()

    async def _too_many_errors(self) -> None:
        text = f"{self.config.hostname} Error: too many errors"
        await self._send(Reply(421, "4.7.0", text, disconnect=True))
        self.shared.maillog.info(f"too many errors after {self.where} from {self._namaddr}")

    def _service(self) -> str:
        """The listener as Postfix names an inet service: host:port."""
        name = self.transport.get_extra_info("sockname") if self.transport else None
        if not name:
            return "smtp"
        host = str(name[0])
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"

    async def _admit(self) -> bool:
        """Connection limits, checked before the greeting: False after a 421 refusal.

        Clients in smtpd_client_event_limit_exceptions are not limited (Postfix's
        hogger_list): they count in the total only, and do not wait for the anvil's
        answer.  The others are counted per address as anvil(8) does: one question to the
        anvil of the whole server answers all three limits.
        """
        cfg, shared, client = self.config, self.shared, self.client
        assert client is not None

        def refuse() -> Reply:
            text = f"{cfg.hostname} Error: too many connections from {client.address}"
            return Reply(421, "4.7.0", text, disconnect=True)

        try:
            exceptions = cfg.limit_exceptions
            self.excepted = exceptions is not None and exceptions.match(client.address)
        except TableLookupError as exc:
            shared.maillog.warning(f"smtpd_client_event_limit_exceptions: {exc}")
        self.anvil_counted = True  # before the await: a cancelled session still gives back
        if self.excepted:
            await shared.anvil.connect(None, cfg.rate_time_unit)
            return True
        count, rate, total = await shared.anvil.connect(client.address, cfg.rate_time_unit)
        if cfg.connection_limit and total > cfg.connection_limit:
            shared.maillog.warning(
                f"Connection limit exceeded: {total} (smtpgate_connection_limit) from "
                f"{self._namaddr} for service {self._service()}"
            )
            await self._send(refuse())
            return False
        if cfg.connection_count_limit and count > cfg.connection_count_limit:
            shared.maillog.warning(
                f"Connection concurrency limit exceeded: {count} from {self._namaddr} "
                f"for service {self._service()}"
            )
            await self._send(refuse())
            return False
        if cfg.connection_rate_limit and rate > cfg.connection_rate_limit:
            shared.maillog.warning(
                f"Connection rate limit exceeded: {rate} from {self._namaddr} "
                f"for service {self._service()}"
            )
            await self._send(refuse())
            return False
        return True

    async def _greet(self) -> None:
        assert self.policy is not None
        decision = await self.policy.connect()
        self._log_decision(decision)
        if self.shared.draining:
            await self._send(
                Reply(421, "4.3.2", f"{self.config.hostname} Service shutting down", True)
            )
            return
        # Input before the greeting (Postfix 3.9: "after CONNECT"), within the greet pause.
        if self.config.greet_pause > 0:
            self.input_seen = seen = asyncio.Event()
            if self._reader._buffer:  # type: ignore[attr-defined]
                seen.set()
            try:
                await asyncio.wait_for(seen.wait(), self.config.greet_pause)
            except TimeoutError:
                pass
        elif not self._reader._buffer and self._unread_input():  # type: ignore[attr-defined]
            await asyncio.sleep(0)  # let the loop read it, to log it as Postfix does
        if self._improper_pipelining("CONNECT") and self.config.forbid_unauth_pipelining:
            await self._send(SYNC_ERROR)
            return
        await self._send(decision.reply or Reply(220, "", self.config.banner))
        await self._flush(force=True)

    def _unread_input(self) -> bool:
        """Whether the client sent bytes the event loop has not read yet (Postfix peeks at
        the socket the same way before its greeting: FIONREAD, no waiting)."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return False
        try:
            count = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            return False
        return int.from_bytes(count, sys.byteorder) > 0

    def _improper_pipelining(self, command: str) -> bool:
        """Log the first input sent ahead of time, as smtpd_proto() does; True if pending.

        Checked before each command that must end a pipelined group, before every command
        of a client that did not say EHLO, and before the greeting.
        """
        if self.ill_pipelining:
            return False
        buffer = self._reader._buffer  # type: ignore[attr-defined]
        if not buffer:
            return False
        self.ill_pipelining = True
        self.shared.maillog.info(
            f"improper command pipelining after {command} from {self._namaddr}: "
            f"{_escape(bytes(buffer[:100]))}"
        )
        return True

    async def _timed_out(self, where: str) -> None:
        text = f"{self.config.hostname} Error: timeout exceeded"
        await self._send(Reply(421, "4.4.2", text, disconnect=True))
        self.shared.maillog.info(f"timeout after {where} from {self._namaddr}")

    async def _read_command(self) -> bytes | None:
        """One command line within smtpd_timeout: for the whole line with
        smtpd_per_request_deadline, else since the last input that arrived."""
        timeout, start = self.config.timeout, time.monotonic()
        while True:
            since = start if self.config.per_request_deadline else max(start, self.last_input)
            remaining = since + timeout - time.monotonic()
            if remaining <= 0:
                await self._timed_out(self.where)
                return None
            try:
                if b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
                    line = await self._reader.readuntil(b"\n")  # there: no wait, no timer
                else:
                    timer = self.loop.call_later(remaining, self._expire_read)
                    try:
                        line = await self._reader.readuntil(b"\n")
                    finally:
                        timer.cancel()
            except TimeoutError:
                continue
            except asyncio.LimitOverrunError as exc:
                return await self._long_line(exc)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            return line

    def _expire_read(self) -> None:
        """A read's deadline passed: end the wait with TimeoutError.

        A timer per read that completes the reader's waiter: cheaper than
        ``asyncio.timeout`` (no cancellation of the session's task to undo).
        """
        waiter = self._reader._waiter  # type: ignore[attr-defined]
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    async def _long_line(self, exc: asyncio.LimitOverrunError) -> bytes | None:
        """Postfix reads line_length_limit octets and skips the rest of the line."""
        head = await self._reader.readexactly(exc.consumed)
        try:
            await asyncio.wait_for(self._skip_line(), self.config.timeout)
        except TimeoutError:
            await self._timed_out(self.where)
            return None
        return head[: self.config.line_limit]

    async def _skip_line(self) -> None:
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)
            except (asyncio.IncompleteReadError, ConnectionError):
                return

    @property
    def _namaddr(self) -> str:
        return self.client.namaddr if self.client else "unknown[unknown]"

    async def _dispatch(self, raw: bytes) -> None:
        tokens = await self._tokens(raw)
        if tokens is None:
            self.error_count += 1
            return
        verb = tokens[0].text
        upper = verb.upper()
        handler = self._commands.get(upper)
        if handler is None:
            self.where = "UNKNOWN"
            if self.config.forbidden.match(verb):
                text = raw.split(b"\0", 1)[0].decode("utf-8", "replace").rstrip("\r\n")[:100]
                self.shared.maillog.warning(f"non-SMTP command from {self._namaddr}: {text}")
                await self._send(FORBIDDEN)
                return
            self.counts["unknown"] += 1
            await self._send(UNKNOWN_COMMAND)
            self.error_count += 1
            return
        name = _COUNTER_NAMES[upper]
        self.counts[name] += 1
        if self.config.tls_required and not self.tls_active and upper not in ALLOWED_BEFORE_TLS:
            await self._send(NEED_STARTTLS)
            self.error_count += 1
            return
        self.where = upper
        if (not self.esmtp or upper in LAST_IN_GROUP) and self._improper_pipelining(upper):
            if self.config.forbid_unauth_pipelining:
                await self._send(SYNC_ERROR)
                return
        assert self.policy is not None
        self.policy.state.input_pending = bool(self._reader._buffer)  # type: ignore[attr-defined]
        ok = await handler(self, tokens[1:])
        if ok:
            self.successes[name] += 1
        else:
            self.error_count += 1
        if upper in JUNK_COMMANDS:
            self.junk_cmds += 1
            if self.junk_cmds > self.config.junk_limit + 1:
                self.error_count += 1

    async def _tokens(self, raw: bytes) -> Args | None:
        """The words of a command line; None after replying to a line that has none."""
        line = raw.rstrip(b"\n")
        bare_lf = not line.endswith(b"\r")
        line = line.rstrip(b"\r")
        if bare_lf and self._bare_newline_rejected():
            self.counts["unknown"] += 1
            await self._send(self._bare_newline_reply())
            return None
        # Postfix handles the command as a C string: it ends at the first NUL.
        line = line.split(b"\0", 1)[0]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.counts["unknown"] += 1
            await self._send(BAD_UTF8)
            return None
        tokens = smtpd_tokens(text)
        if not tokens:
            self.counts["unknown"] += 1
            await self._send(BAD_SYNTAX)
            return None
        return tokens

    # -- commands ---------------------------------------------------------------------

    async def cmd_helo(self, args: Args) -> bool:
        return await self._hello(args, esmtp=False)

    async def cmd_ehlo(self, args: Args) -> bool:
        return await self._hello(args, esmtp=True)

    async def _hello(self, args: Args, esmtp: bool) -> bool:
        assert self.policy is not None
        verb = "EHLO" if esmtp else "HELO"
        if not args:
            await self._send(Reply(501, "", f"Syntax: {verb} hostname"))
            return False
        name = " ".join(t.text for t in args)
        await self._end_transaction()
        decision = await self.policy.helo(name, esmtp=esmtp)
        self._log_decision(decision)
        if decision.reply is not None:
            await self._send(decision.reply)
            return False
        self.esmtp = esmtp
        if not esmtp:
            await self._send(Reply(250, "", self.config.hostname))
            return True
        await self._send(Reply(250, "", "\n".join([self.config.hostname, *self._extensions()])))
        return True

    def _extensions(self) -> list[str]:
        out = ["PIPELINING"]
        out.append(f"SIZE {self.config.size_limit}" if self.config.size_limit else "SIZE")
        if not self.config.disable_vrfy:
            out.append("VRFY")
        if self.tls_context is not None and not self.tls_active:
            out.append("STARTTLS")
        out += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]
        return out

    async def cmd_mail(self, args: Args) -> bool:
        assert self.policy is not None
        if self.txn is None:
            # A reload swaps the shared plan; a new transaction takes the current one.
            self.policy.plan = self.shared.plan
            self.config = self.shared.config
        if self.policy.state.helo_name is None and self.policy.plan.helo_required:
            return await self._fail(Reply(503, "5.5.1", "Error: send HELO/EHLO first"))
        if self.txn is not None:
            return await self._fail(Reply(503, "5.5.1", "Error: nested MAIL command"))
        if len(args) < 2 or args[0].text.lower() != "from:":
            return await self._fail(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        if await self._rate_exceeded("mail"):
            return False
        if args[1].error:
            return await self._fail(BAD_SENDER)
        params = [t.text for t in args[2:]]
        problem, size = _check_mail_params(params)
        if problem is not None:
            return await self._fail(problem)
        address = parse_address(args[1].text, allow_empty=True)
        if address is None or not _acceptable_address(address):
            return await self._fail(BAD_SENDER)
        if self.config.size_limit and size > self.config.size_limit:
            return await self._fail(TOO_BIG)
        decision = await self.policy.mail(address)
        self._log_decision(decision)
        if decision.reply is not None:
            await self._send(decision.reply)
            return False
        # AUTH= from a client that did not authenticate is ignored, as Postfix does.
        forwarded = [p for p in params if not p.upper().startswith("AUTH=")]
        self.txn = _Transaction(address, forwarded)
        await self._send(SENDER_OK)
        return True

    async def cmd_rcpt(self, args: Args) -> bool:
        assert self.policy is not None
        if self.txn is None:
            return await self._fail(Reply(503, "5.5.1", "Error: need MAIL command"))
        if len(args) < 2 or args[0].text.lower() != "to:":
            return await self._fail(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        if await self._rate_exceeded("rcpt"):
            return False
        if args[1].error:
            return await self._fail(BAD_RECIPIENT)
        params = [t.text for t in args[2:]]
        problem = _check_rcpt_params(params)
        if problem is not None:
            return await self._fail(problem)
        address = parse_address(args[1].text, allow_empty=False)
        if address is None or not _acceptable_address(address):
            return await self._fail(BAD_RECIPIENT)
        if len(self.txn.recipients) >= self.config.recipient_limit:
            # The first smtpd_recipient_overshoot_limit of these are not errors.
            await self._send(TOO_MANY_RECIPIENTS)
            self.txn.overshoot += 1
            return self.txn.overshoot <= self.config.recipient_overshoot
        decision = await self.policy.rcpt(address)
        self._log_decision(decision)
        if decision.reply is not None:
            await self._send(decision.reply)
            return False
        reply = await self._relay_rcpt(address, params)
        if reply.code // 100 == 2:
            self.txn.recipients.append(address)
            self.policy.confirm_rcpt(address)
        await self._send(reply)
        return reply.code // 100 == 2

    async def _fail(self, reply: Reply) -> bool:
        await self._send(reply)
        return False

    async def _rate_exceeded(self, event: str) -> bool:
        """smtpd_client_message_rate_limit (MAIL) or _recipient_rate_limit (RCPT, VRFY)."""
        cfg, client = self.config, self.client
        limit = cfg.message_rate_limit if event == "mail" else cfg.recipient_rate_limit
        if not limit or self.excepted or client is None:
            return False
        anvil = self.shared.anvil
        if event == "mail":
            rate = await anvil.mail(client.address, cfg.rate_time_unit)
            what, text = "Message delivery request", f"Error: too much mail from {client.address}"
        else:
            rate = await anvil.rcpt(client.address, cfg.rate_time_unit)
            what, text = "Recipient address", f"Error: too many recipients from {client.address}"
        if rate <= limit:
            return False
        self.shared.maillog.warning(
            f"{what} rate limit exceeded: {rate} from {self._namaddr} for service {self._service()}"
        )
        await self._send(Reply(450, "4.7.1", text))
        return True

    async def _relay_rcpt(self, address: str, params: list[str]) -> Reply:
        assert self.txn is not None and self.policy is not None and self.client is not None
        st = self.policy.state
        if st.queue_id is None:
            st.queue_id = new_queue_id()
            self.shared.maillog.info(f"{st.queue_id}: client={self.client.namaddr}")
        if st.discard:
            return RECIPIENT_OK
        if self.txn.relay is None:
            facts = ClientFacts(
                name=self.client.name,
                addr=self.client.address,
                port=self.client.port,
                proto=st.protocol,
                helo=st.helo_name,
                # XFORWARD IDENT: a Postfix backend logs it as orig_queue_id=, which joins
                # its log lines to smtpgate's (the queue id was assigned just above).
                ident=st.queue_id,
            )
            self.txn.relay = await self.shared.relay.begin(
                facts, self.txn.sender, self.txn.mail_params
            )
        reply = await self.txn.relay.rcpt(address, params)
        if reply.code // 100 != 2:
            self._log_proxy("proxy-reject", "RCPT", reply, recipient=address)
        return reply

    async def cmd_data(self, args: Args) -> bool:
        assert self.policy is not None
        if self.txn is None:
            return await self._fail(NEED_RCPT)
        if not self.txn.recipients:
            return await self._fail(NO_VALID_RCPT)
        if args:
            return await self._fail(Reply(501, "5.5.4", "Syntax: DATA"))
        decision = await self.policy.data()
        self._log_decision(decision)
        if decision.reply is not None:
            await self._send(decision.reply)
            return False
        limit = self.config.data_memory_limit
        if limit:
            reserved = await self.shared.anvil.reserve(min(DATA_RESERVE, limit), limit)
            if not reserved.granted:
                self.shared.maillog.warning(
                    f"smtpgate_data_memory_limit reached ({reserved.in_flight} bytes in "
                    f"flight): DATA from {self._namaddr} deferred"
                )
                return await self._fail(NO_MEMORY)
            self.data_held = min(DATA_RESERVE, limit)
        if self.txn.relay is not None and not self.policy.state.discard:
            self.txn.relay.start_data()  # the backend's 354 comes while the content does
        await self._send(DATA_GO_AHEAD)
        await self._flush(force=True)
        try:
            content, problem = await self._read_data()
            if content is None:  # the client went away mid-DATA, or timed out
                self.closing = True
                return False
            if problem is not None:
                await self._end_transaction()
                reply = problem
            else:
                reply = await self._finish_data(content)
        finally:
            self._release_data()
        if reply.code // 100 == 2:
            # Postfix forgives earlier errors once a message was received.
            self.error_count = self.junk_cmds = 0
        await self._send(reply)
        return reply.code // 100 == 2

    def _release_data(self) -> None:
        if self.data_held:
            self.shared.anvil.release(self.data_held)
            self.data_held = 0

    async def _hold(self, size: int) -> bool:
        """Make this session's reservation cover ``size`` bytes of content.

        It grows by a grain of at least half what it holds (never beyond what
        message_size_limit lets a message hold); when the budget has no room for the
        grain, by just what is needed.
        """
        cfg, held = self.config, self.data_held
        need = size - held
        grain = max(need, held // 2, DATA_RESERVE)
        if cfg.size_limit:
            grain = max(need, min(grain, cfg.size_limit + 8 + DATA_RESERVE - held))
        for amount in (grain, need) if grain > need else (need,):
            if (await self.shared.anvil.reserve(amount, cfg.data_memory_limit)).granted:
                self.data_held += amount
                return True
        return False

    async def _read_data(self) -> tuple[bytes | None, Reply | None]:
        """Read up to CRLF.CRLF; pipelined input after it stays in the reader.

        Returns (content, None), or (b"", reply) when the message was read and dropped
        because it exceeds message_size_limit or the memory budget (the rest is read and
        discarded up to the dot), or (None, None) when the client left or timed out.
        """
        reader, cfg = self._reader, self.config
        data = bytearray(b"\r\n")
        searched = received = 0
        problem: Reply | None = None
        now = time.monotonic()
        deadline = now + cfg.timeout
        while True:
            end = data.find(_END_OF_DATA, searched)
            if problem is None:
                problem = await self._account(end if end >= 0 else len(data) - 2, end >= 0)
            if end >= 0:
                rest = bytes(data[end + len(_END_OF_DATA) :])
                if rest:
                    reader._buffer[0:0] = rest  # type: ignore[attr-defined]
                return (b"", problem) if problem else (bytes(memoryview(data)[2 : end + 2]), None)
            if problem is not None:
                del data[:-4]  # keep only what the end of data may begin with
            searched = max(len(data) - len(_END_OF_DATA) + 1, 0)
            wait = deadline - now if cfg.per_request_deadline else cfg.timeout
            try:
                if reader._buffer and wait > 0:  # type: ignore[attr-defined]
                    chunk = await reader.read(65536)  # already there: no wait, no timer
                else:
                    timer = self.loop.call_later(max(wait, 0), self._expire_read)
                    try:
                        chunk = await reader.read(65536)
                    finally:
                        timer.cancel()
            except TimeoutError:
                await self._timed_out(f"DATA ({received} bytes)")
                return None, None
            except ConnectionError:
                return None, None
            if not chunk:
                return None, None
            now = time.monotonic()
            received += len(chunk)
            if cfg.per_request_deadline and cfg.min_data_rate > 0:
                deadline = min(deadline + len(chunk) / cfg.min_data_rate, now + cfg.timeout)
            data += chunk

    async def _account(self, size: int, complete: bool) -> Reply | None:
        """Hold ``size`` bytes of content in the budget; a reply when the message must go.

        Once the message is certainly over message_size_limit, or the memory budget has no
        room for it, its bytes are given back and the rest is read and discarded.  A whole
        message gives back what it reserved beyond its size (when that is worth a message
        to the anvil).
        """
        cfg = self.config
        problem = None
        if cfg.data_memory_limit and size > self.data_held and not await self._hold(size):
            self.shared.maillog.warning(
                f"smtpgate_data_memory_limit reached: message from {self._namaddr} "
                "is read and discarded"
            )
            problem = NO_MEMORY
        elif not complete and cfg.size_limit and size > cfg.size_limit + 8:
            problem = TOO_BIG  # the content can only grow: certainly too big
        if problem is not None:
            self._release_data()
        elif complete and self.data_held - size >= DATA_RESERVE:
            self.shared.anvil.release(self.data_held - size)
            self.data_held = size
        return problem

    async def _finish_data(self, content: bytes) -> Reply:
        assert self.txn is not None and self.policy is not None and self.client is not None
        txn, st = self.txn, self.policy.state
        # Plain content (CRLF only, no line starting with a dot; the usual message) is
        # already in its wire form: no unstuffing, normalising or restuffing copies.
        plain = plain_content(content)
        if not plain:
            content = _unstuff(content)
        reply = self._check_content(content, plain)
        if reply is None:
            decision = await self.policy.end_of_data()
            self._log_decision(decision)
            reply = decision.reply
        if reply is not None:
            await self._end_transaction()
            return reply
        if st.discard or txn.relay is None:
            reply = Reply(250, "2.0.0", f"Ok: queued as {st.queue_id}")
            self._log_proxy("discard", "END-OF-MESSAGE", reply)
            # Recipients relayed before the DISCARD: the backend's transaction is dropped.
            await self._end_transaction(completed=txn.relay is None)
            return reply
        head = self._received_header()
        plain = plain and plain_content(head)
        message = head + (content if plain else _crlf(content))
        reply = await asyncio.shield(txn.relay.data(message, plain))
        whatsup = "proxy-accept" if reply.code // 100 == 2 else "proxy-reject"
        self._log_proxy(whatsup, "END-OF-MESSAGE", reply)
        if getattr(txn.relay, "outcome_unknown", False):
            self.shared.maillog.warning(
                f"{st.queue_id}: backend connection lost after the end of data: "
                "the message may have been delivered; the client was told 451"
            )
        await self._end_transaction(completed=True)
        return reply

    def _check_content(self, content: bytes, plain: bool = False) -> Reply | None:
        if self.config.size_limit and len(content) > self.config.size_limit:
            return TOO_BIG
        if b"\x00" in content:
            return NUL_IN_DATA
        if not plain and self._bare_newline_rejected() and re.search(rb"(?<!\r)\n", content):
            return self._bare_newline_reply()
        return None

    def _bare_newline_rejected(self) -> bool:
        if self.config.bare_newline != "reject" or self.client is None:
            return False
        return not self.config.bare_newline_exclusions.match(self.client.address)

    def _bare_newline_reply(self) -> Reply:
        code = self.config.bare_newline_code
        return Reply(code, f"{str(code)[0]}.5.2", "Error: bare <LF> received", code in (421, 521))

    def _received_header(self) -> bytes:
        assert self.policy is not None and self.client is not None and self.txn is not None
        st = self.policy.state
        return received_header(
            prepend=st.prepend,
            helo=st.helo_name,
            client=self.client,
            hostname=self.config.hostname,
            proto=("ESMTPS" if self.tls_active else "ESMTP") if self.esmtp else "SMTP",
            queue_id=st.queue_id or "",
            recipients=self.txn.recipients,
            date=_header_date(int(time.time())),
        )

    async def cmd_rset(self, args: Args) -> bool:
        if args:
            return await self._fail(Reply(501, "5.5.4", "Syntax: RSET"))
        await self._end_transaction()
        await self._send(OK)
        return True

    async def cmd_noop(self, args: Args) -> bool:
        await self._send(OK)
        return True

    async def cmd_quit(self, args: Args) -> bool:
        await self._send(Reply(BYE.code, BYE.dsn, BYE.text, disconnect=True))
        return True

    async def cmd_vrfy(self, args: Args) -> bool:
        """Postfix's vrfy_cmd: the recipient restrictions decide; 252 when they pass."""
        if self.config.disable_vrfy:
            return await self._fail(Reply(502, "5.5.1", "VRFY command is disabled"))
        if not args:
            return await self._fail(Reply(501, "5.5.4", "Syntax: VRFY address [SMTPUTF8]"))
        if await self._rate_exceeded("rcpt"):
            return False
        words = [t.text for t in args]
        if len(words) > 1 and words[-1].upper() == "SMTPUTF8":
            words.pop()
        text = " ".join(words)
        address = parse_address(text, allow_empty=False, sloppy=True)
        if address is None:
            return await self._fail(BAD_RECIPIENT)
        decision = await self._vrfy_decision(address)
        self._log_decision(decision)
        if decision.reply is not None:
            await self._send(decision.reply)
            return False
        await self._send(Reply(252, "2.0.0", text))
        return True

    async def _vrfy_decision(self, address: str) -> Decision:
        """smtpd_check_rcpt() for VRFY: the RCPT checks, with or without a MAIL transaction.

        PolicySession.rcpt() insists on MAIL first; outside a transaction this drives its
        steps directly (the sender checks see no sender and pass, as in Postfix).
        """
        policy = self.policy
        assert policy is not None
        st = policy.state
        if st.sender is not None:
            return await policy.rcpt(address)
        denied = policy._denied(Stage.RCPT)
        if denied is not None:
            return denied
        checker = policy._checker(Stage.RCPT)
        st.where = "VRFY"
        st.recipient, st.recipient_rcptmap_checked = address, False
        try:
            status = await policy._rcpt_checks(checker, address)
        finally:
            st.recipient = None
        return policy._decision(checker, Stage.RCPT, status)

    async def cmd_etrn(self, args: Args) -> bool:
        # smtpgate has no queue to flush (a deliberate difference: Postfix runs ETRN).
        return await self._fail(NOT_IMPLEMENTED)

    async def cmd_auth(self, args: Args) -> bool:
        # smtpgate offers no SASL: Postfix's answer with smtpd_sasl_auth_enable = no.
        return await self._fail(NO_AUTH)

    async def cmd_bdat(self, args: Args) -> bool:
        return await self._fail(NO_CHUNKING)

    async def cmd_xclient(self, args: Args) -> bool:
        if not args:
            return await self._fail(Reply(501, "5.5.4", "Syntax: XCLIENT attribute=value..."))
        return await self._fail(NOT_AUTHORIZED)

    async def cmd_xforward(self, args: Args) -> bool:
        if not args:
            return await self._fail(Reply(501, "5.5.4", "Syntax: XFORWARD attribute=value..."))
        return await self._fail(NOT_AUTHORIZED)

    async def cmd_starttls(self, args: Args) -> bool:
        if args:
            return await self._fail(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        if self.tls_context is None:
            return await self._fail(NOT_IMPLEMENTED)
        if self.tls_active:
            return await self._fail(Reply(554, "5.5.1", "Error: TLS already active"))
        await self._end_transaction()
        self._write(Reply(220, "2.0.0", "Ready to start TLS"))
        await self._flush(force=True)
        try:
            await self._start_tls()
        except Exception as exc:
            self.shared.maillog.warning(f"TLS handshake failed for {self._namaddr}: {exc}")
            self._close()
            return False
        self.tls_active = True
        assert self.policy is not None
        self.policy.state.helo_name = None
        self.esmtp = False
        return True

    async def _start_tls(self) -> None:
        """aiosmtpd's transport switch; its connection_made() drops plaintext leftovers."""
        from asyncio import sslproto

        assert self.tls_context is not None and self.transport is not None
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True
        )
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        await asyncio.wait_for(waiter, self.config.timeout)

    _commands: dict[str, Any] = {}

    # -- transaction end and logging --------------------------------------------------

    async def _end_transaction(self, completed: bool = False) -> None:
        txn, self.txn = self.txn, None
        if txn is not None and txn.relay is not None and not completed:
            try:
                await asyncio.shield(txn.relay.abort())
            except Exception:
                log.exception("backend abort failed")
        if self.policy is not None:
            self.policy.reset()

    def _log_decision(self, decision: Decision) -> None:
        maillog = self.shared.maillog
        for record in decision.logs:
            if record.level == "warning":
                maillog.warning(record.text)
            else:
                maillog.info(record.text)

    def _log_proxy(self, whatsup: str, where: str, reply: Reply, recipient: str = "") -> None:
        assert self.policy is not None and self.txn is not None
        st = self.policy.state
        text = " ".join(reply.lines())
        line = f"{st.queue_id or 'NOQUEUE'}: {whatsup}: {where} from {self._namaddr}: {text};"
        line += f" from=<{self.txn.sender}>"
        for rcpt in [recipient] if recipient else self.txn.recipients:
            line += f" to=<{rcpt}>"
        line += f" proto={st.protocol}"
        if st.helo_name is not None:
            line += f" helo=<{st.helo_name}>"
        if self.txn.relay is not None:
            line += f" relay={self.txn.relay.backend_peer}"
        self.shared.maillog.info(line)

    def _log_disconnect(self) -> None:
        parts = []
        for name in COUNTED:
            total = self.counts[name]
            if total:
                ok = self.successes[name]
                parts.append(f"{name}={total}" if ok == total else f"{name}={ok}/{total}")
        total = sum(self.counts.values())
        ok = sum(self.successes.values())
        parts.append(f"commands={total}" if ok == total and total else f"commands={ok}/{total}")
        self.shared.maillog.info(f"disconnect from {self._namaddr} {' '.join(parts)}")

    def _shutting_down(self) -> Reply:
        return Reply(421, "4.3.2", f"{self.config.hostname} Service shutting down", True)

    async def drain(self) -> None:
        """Shutdown: an idle session gets 421 and is closed; a busy one finishes first."""
        if not self.busy and not self.closing:
            await self._send(self._shutting_down())


GateProtocol._commands = {
    "HELO": GateProtocol.cmd_helo,
    "EHLO": GateProtocol.cmd_ehlo,
    "MAIL": GateProtocol.cmd_mail,
    "RCPT": GateProtocol.cmd_rcpt,
    "DATA": GateProtocol.cmd_data,
    "RSET": GateProtocol.cmd_rset,
    "NOOP": GateProtocol.cmd_noop,
    "QUIT": GateProtocol.cmd_quit,
    "VRFY": GateProtocol.cmd_vrfy,
    "STARTTLS": GateProtocol.cmd_starttls,
    "ETRN": GateProtocol.cmd_etrn,
    "AUTH": GateProtocol.cmd_auth,
    "BDAT": GateProtocol.cmd_bdat,
    "XCLIENT": GateProtocol.cmd_xclient,
    "XFORWARD": GateProtocol.cmd_xforward,
}
_COUNTER_NAMES = {
    verb: handler.__name__.removeprefix("cmd_") for verb, handler in GateProtocol._commands.items()
}


def _check_mail_params(params: list[str]) -> tuple[Reply | None, int]:
    """Postfix's mail_cmd parameter loop: (the first problem, the SIZE value or 0)."""
    size = 0
    seen: set[str] = set()
    for param in params:
        upper = param.upper()
        key, _, value = param.partition("=")
        key = key.upper()
        if upper in ("BODY=8BITMIME", "BODY=7BIT", "SMTPUTF8") or key == "AUTH" and "=" in param:
            continue
        if key == "SIZE" and "=" in param:
            if not _DIGITS.match(value):
                return Reply(501, "5.5.4", "Bad message size syntax"), 0
            size = int(value)
            if size > OFF_T_MAX:
                return Reply(552, "5.3.4", "Message size exceeds file system imposed limit"), 0
        elif key == "RET" and "=" in param:
            if key in seen or value.upper() not in ("FULL", "HDRS"):
                return Reply(501, "5.5.4", "Bad RET parameter syntax"), 0
        elif key == "ENVID" and "=" in param:
            if key in seen or not _XTEXT.match(value):
                return Reply(501, "5.5.4", "Bad ENVID parameter syntax"), 0
        else:
            return Reply(555, "5.5.4", f"Unsupported option: {param}"), 0
        seen.add(key)
    return None, size


def _check_rcpt_params(params: list[str]) -> Reply | None:
    """Postfix's rcpt_cmd parameter loop: NOTIFY and ORCPT (RFC 3461), nothing else."""
    seen: set[str] = set()
    for param in params:
        key, eq, value = param.partition("=")
        key = key.upper()
        if key == "NOTIFY" and eq:
            words = value.upper().split(",")
            ok = words == ["NEVER"] or bool(value) and all(w in _NOTIFY for w in words)
            if key in seen or not ok:
                return Reply(501, "5.5.4", "Error: Bad NOTIFY parameter syntax")
        elif key == "ORCPT" and eq:
            kind, semi, addr = value.partition(";")
            ok = bool(kind and semi and addr)
            if ok and kind.lower() == "rfc822":
                ok = bool(_XTEXT.match(addr))
            if key in seen or not ok:
                return Reply(501, "5.5.4", "Error: Bad ORCPT parameter syntax")
        else:
            return Reply(555, "5.5.4", f"Unsupported option: {param}")
        seen.add(key)
    return None


def _peername(transport: asyncio.BaseTransport) -> Any:
    """The client's (address, port), read once, when the connection is made.

    uvloop does not keep the address accept() returned: it asks getpeername(), which
    fails (ENOTCONN) when the client has already reset the connection -- the port
    scanner's connect-and-reset (nmap -sT), whose RST arrives before the accept.  The
    kernel still knows the address; Linux's SO_PEERNAME reads it the way accept() does,
    without getpeername's connected-state check.  Only "unknown" when that fails too.
    """
    peer = transport.get_extra_info("peername")
    if peer or not sys.platform.startswith("linux"):
        return peer
    sock = transport.get_extra_info("socket")
    size = _SOCKADDR_SIZE.get(sock.family) if sock is not None else None
    if size is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERNAME, size)
    except OSError:
        return None
    port = int.from_bytes(raw[2:4], "big")
    if sock.family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


SO_PEERNAME = getattr(socket, "SO_PEERNAME", 28)  # Linux's value (asm-generic/socket.h)
# sizeof(struct sockaddr_in), sizeof(struct sockaddr_in6)
_SOCKADDR_SIZE: dict[int, int] = {socket.AF_INET: 16, socket.AF_INET6: 28}


def _client_info(peer: Any) -> ClientInfo:
    if not peer:
        return ClientInfo(address="unknown")
    host, port = str(peer[0]), int(peer[1])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return ClientInfo(address=host, port=port)


class Token(NamedTuple):
    """One word of a command line; ``error``: an unclosed ``<...>`` or quoted string."""

    text: str
    error: bool = False


Args = list[Token]
_WHITE = " \t\n\v\f\r"


# The usual command lines, split without the character loop (smtpd_tokens gives the
# same words; tests/property checks that): words of printable ASCII other than <>"\:,
# and MAIL FROM:/RCPT TO: with a <...> address free of those and of white space.
_PLAIN_WORD = r"[!#-9;=?-\[\]-~]+"
_PLAIN_COMMAND = re.compile(rf"[ \t]*({_PLAIN_WORD}(?:[ \t]+{_PLAIN_WORD})*)?[ \t]*")
_PLAIN_MAIL_RCPT = re.compile(
    rf"[ \t]*({_PLAIN_WORD})[ \t]+((?i:from|to):)[ \t]*(<[!#-9;=?-\[\]-~]*>)"
    rf"((?:[ \t]+{_PLAIN_WORD})*)[ \t]*"
)


def smtpd_tokens(line: str) -> list[Token]:
    """Postfix's smtpd_token(): split a command line as smtpd does.

    White space separates words, except inside ``<...>`` (which nests) and ``"..."``;
    a backslash protects the next character; ``FROM:`` and ``TO:`` end a word, so
    ``MAIL FROM:<a@b>`` and ``mail from: a@b`` both give ``MAIL``, ``FROM:``, the address.
    """
    plain = _PLAIN_COMMAND.fullmatch(line)
    if plain is not None:
        return [Token(word) for word in line.split()]
    plain = _PLAIN_MAIL_RCPT.fullmatch(line)
    if plain is not None:
        verb, keyword, address, params = plain.groups()
        return [Token(verb), Token(keyword), Token(address), *map(Token, params.split())]
    return _smtpd_tokens(line)


def _smtpd_tokens(line: str) -> list[Token]:
    """smtpd_tokens for any line: the character loop."""
    tokens: list[Token] = []
    i, n = 0, len(line)
    while True:
        buf: list[str] = []
        error = False
        while i < n:
            c = line[i]
            i += 1
            if c in _WHITE:
                while i < n and line[i] in _WHITE:
                    i += 1
                if buf:
                    break
            elif c in '<"':
                i, closed = _quoted(line, i, buf, c)
                error = error or not closed
            elif c == ":":
                buf.append(c)
                if "".join(buf).lower() in ("to:", "from:"):
                    break
            else:
                if c == "\\":
                    buf.append(c)
                    if i >= n:
                        break
                    c = line[i]
                    i += 1
                buf.append(c)
        if not buf:
            return tokens
        tokens.append(Token("".join(buf), error))


def _quoted(line: str, i: int, buf: list[str], start: str) -> tuple[int, bool]:
    """Copy up to the matching close of ``<`` or ``"``; (new index, closed)."""
    stack = [">" if start == "<" else '"']
    buf.append(start)
    n = len(line)
    while i < n:
        c = line[i]
        i += 1
        buf.append(c)
        if c == "\\":
            if i >= n:
                break
            buf.append(line[i])
            i += 1
        elif c == stack[-1]:
            if len(stack) == 1:
                return i, True
            stack.pop()
        elif c == '"':
            stack.append('"')
        elif c == "<" and stack[-1] == ">":
            stack.append(">")
    return i, False


def _unstuff(content: bytes) -> bytes:
    """Remove SMTP's transparency dots (RFC 5321 4.5.2): ``..x`` is the line ``.x``."""
    if content.startswith(b"."):
        content = content[1:]
    return content.replace(b"\n.", b"\n")


def _acceptable_address(address: str) -> bool:
    """No control characters, and a domain that is a host name or an address literal.

    Postfix 3.7 answers 250 to some control characters inside addresses; smtpgate
    refuses them at the command, so they never reach a table, a log line or the backend.
    """
    if _UNPRINTABLE.search(address):
        return False
    local, at, domain = address.rpartition("@")
    if not at or not address:
        return True  # the null sender, or an unqualified local name
    if domain.startswith("[") and domain.endswith("]"):
        return valid_mailhost_addr(domain[1:-1])
    name = dup_if_truncate(domain)
    if name.isascii():
        return valid_hostname(name)
    try:
        return valid_hostname(name.encode("idna").decode("ascii"))
    except UnicodeError:
        return False


def parse_address(text: str, *, allow_empty: bool, sloppy: bool = False) -> str | None:
    """Postfix's extract_addr(): the address in internal form, or None when it is bad.

    The outer ``<>`` go, then the rest is read as an RFC 822 address: quotes and
    backslashes are removed (``"a b"@c`` is ``a b@c``), comments dropped, a source
    route (``@x,@y:``) stripped; white space between words or a second address is an
    error. ``sloppy`` (VRFY) also takes an unbalanced ``<`` or ``>``.
    """
    s = text
    while len(s) >= 2 and s[0] == "<" and s[-1] == ">":
        s = s[1:-1]
    if sloppy:
        s = s.removeprefix("<").removesuffix(">")
    if _ADDRESS_SPECIAL.search(s) is None:
        address = s  # one plain word (the usual address): nothing to unquote or join
        route = address.startswith("@")
    else:
        words = _address_words(s)
        if words is None:
            return None
        joined = _join_words(words)
        if joined is None:
            return None
        address = joined
        # a source route is unquoted: "@:"@x.org is the local part @: at x.org
        route = address.startswith("@") and s.lstrip().startswith("@")
        if not route and any("," in w for w, quoted in words if not quoted):
            return None
    if route:
        colon = address.find(":")
        if colon >= 0 and colon + 1 < len(address):
            address = address[colon + 1 :]
    if address == "@" or not address and not allow_empty:
        return None
    return address


# What makes an address more than one plain word: quoting, comments, white space,
# brackets, separators (the set _address_words treats specially).
_ADDRESS_SPECIAL = re.compile(r'[\\"()<>;,\s]')


def _address_words(s: str) -> list[tuple[str, bool]] | None:
    """Words of an address, each (text, quoted); None on a syntax error."""
    words: list[tuple[str, bool]] = []
    buf: list[str] = []
    quoted = False
    i, n = 0, len(s)

    def flush() -> None:
        nonlocal buf, quoted
        if buf or quoted:
            words.append(("".join(buf), quoted))
        buf, quoted = [], False

    while i < n:
        c = s[i]
        i += 1
        if c == "\\" and i < n:
            buf.append(s[i])
            quoted = True
            i += 1
        elif c == '"':
            end = i
            while end < n and s[end] != '"':
                end += 2 if s[end] == "\\" else 1
            if end >= n:
                return None
            buf.append(re.sub(r"\\(.)", r"\1", s[i:end]))
            quoted, i = True, end + 1
        elif c == "(":
            depth = 1
            while i < n and depth:
                depth += {"(": 1, ")": -1}.get(s[i], 0)
                i += 2 if s[i] == "\\" else 1
            if depth:
                return None
            flush()
        elif c in _WHITE:
            flush()
        elif c in "<>;":
            return None
        else:
            buf.append(c)
    flush()
    return words


def _join_words(words: list[tuple[str, bool]]) -> str | None:
    """RFC 822 lets white space surround ``@`` and ``.``; any other gap is an error."""
    out = ""
    for i, (word, quoted) in enumerate(words):
        if i and not quoted and not (out.endswith(("@", ".")) or word.startswith(("@", "."))):
            return None
        if i and quoted and not out.endswith(("@", ".")):
            return None
        out += word
    return out


@functools.lru_cache(maxsize=2)
def _header_date(second: int) -> str:
    """The Received header's date, formatted once per second."""
    return formatdate(second, localtime=False, usegmt=False)


@functools.lru_cache(maxsize=1024)
def _wire(reply: Reply) -> bytes:
    """A reply's bytes on the wire (cached: most replies are the same few texts).

    Postfix's printable(): a control character in a reply (say, from an address the
    client sent) goes out as a space.
    """
    lines = (_UNPRINTABLE.sub(" ", line) for line in reply.lines())
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "replace")


def received_header(
    *,
    prepend: list[str],
    helo: str | None,
    client: ClientInfo,
    hostname: str,
    proto: str,
    queue_id: str,
    recipients: list[str],
    date: str,
) -> bytes:
    """PREPEND headers, then smtpgate's Received: header, in Postfix's order and form.

    Every part a client can choose goes through :func:`header_safe`: the HELO name, the
    recipient, PREPEND text (a regexp table's ``$1`` can carry the HELO name); the client
    name and address too, though DNS and the socket give them.
    """
    # Without HELO Postfix names the client by its host name ("unknown" without one).
    shown = header_safe(helo, neuter=True) if helo else header_safe(client.name)
    lines = [header_safe(line) for line in prepend]
    lines += [
        f"Received: from {shown} ({header_safe(client.name)} [{header_safe(client.address)}])",
        f"\tby {hostname} (smtpgate) with {proto} id {queue_id}",
    ]
    if len(recipients) == 1:
        # Postfix quotes the local part (quote_822_local): "a b"@x, not a b@x
        lines.append(f"\tfor <{header_safe(quote_local(recipients[0]))}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def _escape(data: bytes) -> str:
    """Postfix's escape(): C escapes for control characters, octal for other bytes."""
    names = {7: "a", 8: "b", 9: "t", 10: "n", 11: "v", 12: "f", 13: "r"}
    out = []
    for byte in data:
        if 0x20 <= byte < 0x7F:
            out.append("\\\\" if byte == 0x5C else chr(byte))
        elif byte in names:
            out.append("\\" + names[byte])
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


def _crlf(content: bytes) -> bytes:
    """Bare LF line ends become CRLF (smtpd_forbid_bare_newline = normalize)."""
    if content.count(b"\n") == content.count(b"\r\n"):
        return content  # no bare LF: the usual case, without a regex pass over the message
    return re.sub(rb"(?<!\r)\n", b"\r\n", content)
