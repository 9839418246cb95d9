"""One SMTP connection as Postfix's smtpd runs it: a state machine that does no I/O.

The network adapter (``smtpd.py``) and ``explain`` drive the same :class:`SmtpMachine`, so
what ``explain`` prints is what ``serve`` does.  The rules, in the order they apply:

1. **Bytes in, effects out.**  The driver hands over input with :meth:`receive` (and
   :meth:`receive_eof`) and calls :meth:`advance`, which works through every complete
   command (or content) that input holds and returns the effects, in order: bytes to
   send, ``FLUSH`` (send now and wait until the client took them), a pause in seconds
   (``smtpd_error_sleep_time``), ``START_TLS``, ``CLOSE``.  The driver performs them and
   nothing else; it keeps the timers (``smtpd_timeout``: :meth:`timed_out`), the TLS
   handshake (:meth:`tls_started`) and the socket.  :meth:`advance` stops after an
   effect that must happen before the next command is read (a pause, STARTTLS, close),
   so effects and commands never overtake each other.
2. **The commands are Postfix's** (``smtpd.c``): the syntax (``syntax.py``), the
   sequencing (HELO, MAIL, RCPT, DATA or BDAT), ``smtpd_helo_required``, the error and
   junk counters with ``smtpd_soft_error_limit``/``hard_error_limit``, the recipient and
   overshoot limits, the pipelining rules (a command that must end a group, a client that
   did not say EHLO), the DATA and BDAT framing (``data.py``).
3. **The restrictions decide** through :class:`~smtpgate.policy.session.PolicySession`;
   the machine writes their log lines and sends their replies.
4. **The backend is a port.**  Recipients that pass the restrictions go to the backend in
   lock-step (its RCPT reply is the client's); the final dot's reply is the backend's.
   ``serve`` plugs in the relay; ``explain`` plugs in :class:`AcceptingBackend`, which
   accepts everything (the question explain answers: what does *smtpgate* decide).
   The counters of the whole server (``anvil``) and the log are ports too.
5. **The envelope the backend gets** is the client's, changed by access(5) actions as a
   queueing Postfix would change what it delivers: REDIRECT replaces every recipient,
   BCC adds one, FILTER sends the message to its next hop instead of relayhost, HOLD to
   ``smtpgate_hold_relayhost`` (else relayhost, with an ``X-Smtpgate-Hold`` header a
   Postfix backend can hold it by).  When the envelope or next hop changed after the
   lock-step transaction began, that transaction is given up and the message goes in a
   new one with the final envelope.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from smtpgate.errors import TableLookupError
from smtpgate.facts import ClientFacts
from smtpgate.policy.address import header_safe, valid_hostname
from smtpgate.policy.logline import whatsup_line
from smtpgate.policy.model import ClientInfo, Decision, TlsInfo
from smtpgate.policy.peer import PeerLookup, lookup_client
from smtpgate.policy.plan import Plan
from smtpgate.policy.ports import Resolver
from smtpgate.policy.session import PolicySession
from smtpgate.postscreen.engine import DummyEngine, EngineSettings
from smtpgate.postscreen.screen import Screening
from smtpgate.reply import R451_LOCAL_ERROR, Reply
from smtpgate.smtp import syntax as s
from smtpgate.smtp.data import (
    ChunkReader,
    DotReader,
    header_date,
    received_header,
)
from smtpgate.smtp.macros import MacroContext, SessionMacros, macro_value
from smtpgate.smtp.ports import (
    CLOSE,
    FLUSH,
    NO_METRICS,
    START_TLS,
    Anvil,
    Backend,
    BackendTransaction,
    Effect,
    LogSink,
    Metrics,
    Milters,
    MilterVerdict,
    Observer,
)
from smtpgate.smtp.routes import Route, lockstep, route_of
from smtpgate.smtp.store import Message, MessageStore
from smtpgate.smtp.syntax import (
    ALLOWED_BEFORE_TLS,
    COUNTED,
    JUNK_COMMANDS,
    LAST_IN_GROUP,
    Token,
    acceptable_address,
    check_mail_params,
    check_rcpt_params,
    escape,
    parse_address,
    smtpd_tokens,
    wire,
    xtext,
)

log = logging.getLogger("smtpgate.smtp")

DATA_RESERVE = 65536  # room a new DATA needs in smtpgate_data_memory_limit: one read
# A message's bytes are reserved in the shared budget in grains that grow with it (each
# at least half what the message holds), so that a 1 KB message costs one request to the
# anvil and a 10 MB one about a dozen, never one per read.
HOLD_HEADER = "X-Smtpgate-Hold"
OUTPUT_BACKLOG = 65536  # reply bytes after which advance() stops for the driver to write


# -- the machine ---------------------------------------------------------------------------


class Mode(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    BDAT = "bdat"


@dataclass
class Transaction:
    """The client's mail transaction (MAIL to the end of the message)."""

    sender: str
    mail_params: list[str]
    recipients: list[str] = field(default_factory=list)
    rcpt_params: list[list[str]] = field(default_factory=list)
    relay: BackendTransaction | None = None
    route: Route | None = None  # what ``relay`` was opened with
    overshoot: int = 0
    chunks: MessageStore | None = None  # BDAT content so far
    chunk_problem: Reply | None = None  # a BDAT chunk failed: every later one gets this
    milters_open: bool = True  # the milters have this transaction (an abort is owed)
    envelope_changed: bool = False  # a milter changed the sender
    unannounced_id: str | None = None  # the backend's queue id while verification refuses


class SmtpMachine:
    """One client connection; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        plan: Plan,
        config: Any,
        backend: Backend,
        anvil: Anvil,
        log: LogSink,
        address: str,
        port: int | None = None,
        service: str = "smtp",
        resolver: Resolver | None = None,
        starttls: bool = False,
        queue_ids: Callable[[], str],
        observer: Observer | None = None,
        trace: bool = False,
        clock: Callable[[], float] = time.time,
        known_client: ClientInfo | None = None,
        milters: Milters | None = None,
        server: tuple[str, int] | None = None,
        new_store: Callable[[], MessageStore] = MessageStore,
        metrics: Metrics = NO_METRICS,
        proxy_local: bool = False,
        hangup: bool = False,
        screening: Screening | None = None,
    ) -> None:
        self.plan = plan
        self.config = config
        self.backend = backend
        self.anvil = anvil
        self.log = log
        self.resolver = resolver
        self.service = service
        self.starttls_offered = starttls
        self.new_queue_id = queue_ids
        self.observer = observer
        self.trace = trace
        self.clock = clock
        self.client = ClientInfo(address=address, port=port or 0)
        self.known_client = known_client  # found already: no lookup at connect
        self.milters = milters
        self.server = server  # the listener's address and port ({daemon_addr})
        self.new_store = new_store  # where a message's content waits (memory, spool file)
        self.proxy_local = proxy_local
        # a balancer's health check is no client: it counts in no client metric
        self.metrics = NO_METRICS if proxy_local else metrics
        """A load balancer's own connection (PROXY v2 LOCAL: its health check): a normal
        session that counts toward no client's limits (nor client metrics)."""
        self.hangup = hangup  # the PROXY handshake failed: 421 instead of a greeting
        self.screening = screening
        """postscreen's state of this client (the deep tests, the enforce reply)."""
        self.dummy: DummyEngine | None = None
        """postscreen's dummy engine, when it has the session (an enforced client)."""
        self.connections = 0  # this client's concurrent sessions ({client_connections})
        self.macros = SessionMacros(self._macro)
        self._milter_sender: str | None = None  # the address MAIL is checking
        self._milter_rcpt: str | None = None  # the address RCPT is checking
        self._milter_helo: str | None = None  # the name HELO is checking
        self._milter_proto: str | None = None  # the protocol before that HELO
        self.policy: PolicySession | None = None
        self.txn: Transaction | None = None
        self.counts: defaultdict[str, int] = defaultdict(int)
        self.successes: defaultdict[str, int] = defaultdict(int)
        self.esmtp = False
        self.tls_active = False
        self.closing = False
        self.busy = False  # inside a command (drain lets it finish)
        self.mode = Mode.COMMAND
        self.where = "CONNECT"
        # Postfix's state->error_count, junk_cmds, SMTPD_FLAG_ILL_PIPELINING.
        self.error_count = 0
        self.junk_cmds = 0
        self.ill_pipelining = False
        self.excepted = False  # smtpd_client_event_limit_exceptions: no limits
        self.anvil_counted = False  # connect() was called: disconnect() is owed
        self.data_held = 0  # bytes this session has reserved in the shared budget
        self.requests = 0  # commands completed (the driver's per-request deadline)
        self._in = bytearray()
        self._eof = False
        self._long_head: bytes | None = None  # an over-long line, until its end arrives
        self._out: list[Effect] = []
        self._out_size = 0  # reply bytes queued since the driver last took them
        self._stop = False  # an effect must happen before the next command
        self.may_continue = False
        self._greeting: Reply | None = None
        self._dot: DotReader | None = None
        self._chunk: ChunkReader | None = None
        self._pending: str | None = None  # counter name of the command awaiting content
        self._data_rejected: Reply | None = None  # DATA content read to the end and dropped
        self._chunk_problem: Reply | None = None  # the BDAT chunk being read is dropped
        self._reset_after_chunk = False  # the transaction ends once that chunk is read
        self._last_rcpt: str | None = None  # for the bare <LF> log line
        self._sending: asyncio.Future[Reply] | None = None  # the relay sending a message

    # -- driver interface ----------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Input from the client."""
        self._in += data

    def receive_eof(self) -> None:
        """The client closed its side (or the connection was lost)."""
        self._eof = True

    @property
    def buffered(self) -> int:
        """Input received and not yet worked through."""
        return len(self._in)

    def peek(self, limit: int = 1024) -> bytes:
        """Input received and not worked through, without taking it (postscreen's
        PREGREET peek)."""
        return bytes(self._in[:limit])

    @property
    def in_content(self) -> bool:
        """Reading message content (DATA or a BDAT chunk), not commands."""
        return self.mode is not Mode.COMMAND

    @property
    def namaddr(self) -> str:
        return self.client.namaddr

    @property
    def content_received(self) -> int:
        """Octets of message content received since DATA or BDAT (for the data rate)."""
        if self._dot is not None:
            return self._dot.received
        if self._chunk is not None:
            return self._chunk.size - self._chunk.remaining
        return 0

    def discard_input(self) -> None:
        """Drop input not yet worked through (plaintext behind STARTTLS)."""
        self._in.clear()

    def take(self) -> list[Effect]:
        """The effects queued so far; ``may_continue`` then says whether input may be
        left that :meth:`advance` will work through without waiting for more."""
        out, self._out = self._out, []
        self._out_size = 0
        self.may_continue = self._stop and not self.closing
        self._stop = False
        return out

    async def open(self, *, draining: bool = False) -> list[Effect]:
        """The connection is made: find the client's name, count it, run the connect
        restrictions.  Then the driver waits out any greet pause and calls :meth:`greet`."""
        if self.known_client is not None:
            found = PeerLookup(self.known_client)
        else:
            found = await lookup_client(
                self.resolver,
                self.client.address,
                self.client.port,
                peername_lookup=self.config.peername_lookup,
            )
        for record in found.logs:
            self.log.warning(record.text)
        self.client = found.client
        self.policy = PolicySession(
            self.plan, self.client, self.resolver, trace=self.trace, hits=self.metrics.restriction
        )
        if self.server is not None:  # policy servers are told server_address and _port
            self.policy.state.server_address, self.policy.state.server_port = self.server
        self.log.info(f"connect from {self.namaddr}")
        self.metrics.connect()
        if self.hangup:  # Postfix's SMTPD_FLAG_HANGUP: no rights known, no service
            self._reply(Reply(421, "4.3.0", f"{self.config.hostname} Server local error", True))
            return self.take()
        if not await self._admit():
            return self.take()
        decision = await self.policy.connect()
        if found.steps:
            decision.steps[:0] = found.steps
        self._note(decision)
        if draining:
            self._reply(self._shutting_down())
        elif decision.reply is not None:
            self._greeting = decision.reply
        else:
            self._greeting = await self._milter_connect() or Reply(220, "", self.config.banner)
        return self.take()

    def greet(self, early_input: bool = False, send: bool = True) -> list[Effect]:
        """Send the greeting; ``early_input``: the client spoke first (input the driver
        knows of but has not handed over, e.g. bytes still in the kernel).  ``send``
        False: no greeting at all (postscreen's enforce for a client that pregreeted:
        what it sent is read as its commands)."""
        greeting, self._greeting = self._greeting, None
        if greeting is None or self.closing:
            return self.take()
        if not send:
            return self.take()
        if (self._in or early_input) and not self.ill_pipelining:
            self._improper_pipelining("CONNECT", self._in)
            if self.config.forbid_unauth_pipelining:
                self._reply(s.SYNC_ERROR)
                return self.take()
        self._reply(greeting)
        self._out.append(FLUSH)
        return self.take()

    def start_dummy(self, send: bool = True) -> list[Effect]:
        """postscreen enforces this client: its dummy engine has the session, which never
        reaches smtpd (no connect line, no restrictions, no backend).  ``send``: its
        ``220`` greeting line (none for a client that pregreeted)."""
        assert self.screening is not None
        cfg = self.config
        settings = EngineSettings(
            hostname=cfg.hostname,
            size_limit=cfg.size_limit,
            disable_vrfy=cfg.disable_vrfy,
            helo_required=cfg.helo_required,
            soft_bounce=self.plan.soft_bounce,
        )
        self.dummy = DummyEngine(self.screening, settings)
        if send:
            self._reply(Reply(220, "", cfg.banner))
            self._out.append(FLUSH)
        return self.take()

    def _dummy_dispatch(self, raw: bytes) -> None:
        """One command line for postscreen's dummy engine (after the deep tests)."""
        dummy, screening = self.dummy, self.screening
        assert dummy is not None and screening is not None
        self.requests += 1
        line = raw.rstrip(b"\n")
        if raw.endswith(b"\n") and not line.endswith(b"\r"):
            dropped = screening.bare_newline(raw)
            if dropped is not None:
                self._reply(dropped)
                return
        text = line.rstrip(b"\r").split(b"\0", 1)[0].decode("utf-8", "replace")
        verb, _, args = text.lstrip(" \t").partition(" ")
        if screening.running_deep_tests:
            screening.before_command(dummy.where, line.rstrip(b"\r"))
            pending = b"" if verb.upper() == "BDAT" else self.peek(100)
            known = verb.upper() in _COMMANDS
            dropped = screening.command_line(verb, known, pending, dummy=True)
            if dropped is not None:
                self._reply(dropped)
                return
        self._reply(dummy.command(verb, args))

    async def advance(self) -> list[Effect]:
        """Work through the input received so far; the effects, in order."""
        while not self.closing and not self._stop:
            line = None
            if self.mode is Mode.COMMAND:
                if self.error_count >= self.config.hard_error_limit:
                    self._too_many_errors()
                    break
                line = self._next_line()
                if line is None:
                    break
            self.busy = True
            try:
                if line is not None:
                    await self._dispatch(line)
                elif not await self._content():
                    break
            except Exception:
                log.exception("%s: unexpected error", self.namaddr)
                await self._abandon()
            finally:
                self.busy = self.mode is not Mode.COMMAND
        if self._eof and not self._stop and not self.closing:
            self.closing = True  # the client is gone; nothing more will come
            self.metrics.lost(self.where)
        return self.take()

    async def _abandon(self) -> None:
        """A bug met: end the transaction, answer 451 without details, go on."""
        if self.mode is Mode.DATA and self._dot is not None:
            self._dot.discard()
            self._release_data()
            self._data_rejected = R451_LOCAL_ERROR  # read the rest, then answer
            return
        if self._dot is not None:
            self._dot.store.close()
        self.mode, self._dot, self._chunk = Mode.COMMAND, None, None
        self._release_data()
        await self._end_transaction()
        name, self._pending = self._pending, None
        self._reply(R451_LOCAL_ERROR)
        if name is not None:
            self._done(name, False)

    def timed_out(self) -> list[Effect]:
        """smtpd_timeout passed while waiting for input."""
        if self.dummy is not None and self.screening is not None:
            screening = self.screening
            screening.log.info(
                f"COMMAND TIME LIMIT from {screening.addr_port} after {self.dummy.where}"
            )
            screening.dropped = True
            text = f"{self.config.hostname} Error: timeout exceeded"
            self._reply(Reply(421, "4.4.2", text, disconnect=True))
            return self.take()
        where = self.where
        if self._dot is not None:
            where = f"DATA ({self._dot.received} bytes)"
        elif self._chunk is not None:
            where = "BDAT"
        text = f"{self.config.hostname} Error: timeout exceeded"
        self._reply(Reply(421, "4.4.2", text, disconnect=True))
        self.log.info(f"timeout after {where} from {self.namaddr}")
        return self.take()

    def tls_started(self, tls: TlsInfo | None = None) -> None:
        """The STARTTLS handshake completed: the session starts over (RFC 3207)."""
        self.tls_active = True
        self.esmtp = False
        self.metrics.tls(tls)
        if self.policy is not None:
            self.policy.state.helo_name = None
            self.policy.state.tls = tls

    def tls_failed(self, error: str) -> list[Effect]:
        self.log.warning(f"TLS handshake failed for {self.namaddr}: {error}")
        self.closing = True
        return [CLOSE]

    def shutdown(self) -> list[Effect]:
        """The server stops: an idle session gets 421 (a busy one is left to finish)."""
        if not self.busy and not self.closing:
            self._reply(self._shutting_down())
        return self.take()

    async def close(self) -> None:
        """The connection ended: give back what it held and log the disconnect."""
        self.closing = True
        if self._dot is not None:
            self._dot.store.close()
        await self._end_transaction()
        self._release_data()
        if self.anvil_counted:
            self.anvil_counted = False
            self.anvil.disconnect(None if self.excepted else self.client.address)
        if self.milters is not None:
            milters, self.milters = self.milters, None
            await asyncio.shield(milters.close())
        if self.screening is not None:
            self.screening.closed(quit=self.counts["quit"] > 0)
        if self.policy is not None:
            self._log_disconnect()
            self.metrics.disconnect()

    # -- replies -------------------------------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        """Queue a reply; past smtpd_soft_error_limit errors it comes after a pause
        (Postfix's vsmtpd_chat_reply()); a disconnecting reply closes the connection."""
        if self.closing:
            return
        if reply.code >= 500 and self.plan.soft_bounce:
            # smtpd_chat_reply(): every 5xx the client gets is a 4xx (log lines keep 5xx)
            dsn = "4" + reply.dsn[1:] if reply.dsn.startswith("5") else reply.dsn
            reply = dataclasses.replace(reply, code=reply.code - 100, dsn=dsn)
        if self.observer is not None:
            self.observer.reply(reply)
        out = self._out
        delay = self.config.error_sleep
        if self.error_count >= self.config.soft_error_limit and delay > 0:
            out += (FLUSH, float(delay), wire(reply), FLUSH)
            self._stop = True
        else:
            out.append(wire(reply))
            self._out_size += len(out[-1])  # type: ignore[arg-type]
            if self._out_size > OUTPUT_BACKLOG:
                self._stop = True  # let the driver write (and wait for a slow reader)
        if reply.disconnect or reply.code in (421, 521):  # smtpd_chat_reply() hangs up
            out += (FLUSH, CLOSE)
            self.closing = True
            self._stop = True

    def _fail(self, reply: Reply) -> bool:
        self._reply(reply)
        return False

    def _shutting_down(self) -> Reply:
        return Reply(421, "4.3.2", f"{self.config.hostname} Service shutting down", True)

    def _too_many_errors(self) -> None:
        text = f"{self.config.hostname} Error: too many errors"
        self._reply(Reply(421, "4.7.0", text, disconnect=True))
        self.log.info(f"too many errors after {self.where} from {self.namaddr}")

    def _note(self, decision: Decision) -> None:
        """Log a decision's lines (and show it to the observer)."""
        for record in decision.logs:
            if record.level == "warning":
                self.log.warning(record.text)
            else:
                self.log.info(record.text)
        if self.observer is not None:
            self.observer.decision(decision)
        if decision.reply is not None:
            queued = self.policy is not None and self.policy.state.queue_id is not None
            self.metrics.reject(self.where, decision.reply.code, queued)

    # -- admission -----------------------------------------------------------------------

    async def _admit(self) -> bool:
        """Connection limits, checked before the greeting: False after a 421 refusal.

        Clients in smtpd_client_event_limit_exceptions are not limited (Postfix's
        hogger_list): they count in the total only, and do not wait for the anvil's
        answer; so does every client when no limit is set.  The others are counted per
        address as anvil(8) does: one question to the anvil of the whole server answers
        all three limits.
        """
        cfg, client = self.config, self.client
        try:
            exceptions = cfg.limit_exceptions
            self.excepted = (
                self.proxy_local
                or not cfg.counts_clients
                or (exceptions is not None and exceptions.match(client.address))
            )
        except TableLookupError as exc:
            self.log.warning(f"smtpd_client_event_limit_exceptions: {exc}")
        self.anvil_counted = True  # before the await: a cancelled session still gives back
        if self.excepted:
            await self.anvil.connect(None, cfg.rate_time_unit)
            return True
        count, rate, total = await self.anvil.connect(client.address, cfg.rate_time_unit)
        self.connections = count
        if cfg.connection_limit and total > cfg.connection_limit:
            what = f"Connection limit exceeded: {total} (smtpgate_connection_limit)"
            limit = "connections"
        elif cfg.connection_count_limit and count > cfg.connection_count_limit:
            what = f"Connection concurrency limit exceeded: {count}"
            limit = "connection_count"
        elif cfg.connection_rate_limit and rate > cfg.connection_rate_limit:
            what = f"Connection rate limit exceeded: {rate}"
            limit = "connection_rate"
        else:
            return True
        self.metrics.refused(limit)
        self.log.warning(f"{what} from {self.namaddr} for service {self.service}")
        text = f"{cfg.hostname} Error: too many connections from {client.address}"
        self._reply(Reply(421, "4.7.0", text, disconnect=True))
        return False

    async def _rate_exceeded(self, event: str) -> bool:
        """smtpd_client_message_rate_limit (MAIL) or _recipient_rate_limit (RCPT, VRFY)."""
        cfg, address = self.config, self.client.address
        limit = cfg.message_rate_limit if event == "mail" else cfg.recipient_rate_limit
        if not limit or self.excepted:
            return False
        if event == "mail":
            rate = await self.anvil.mail(address, cfg.rate_time_unit)
            what, text = "Message delivery request", f"Error: too much mail from {address}"
        else:
            rate = await self.anvil.rcpt(address, cfg.rate_time_unit)
            what, text = "Recipient address", f"Error: too many recipients from {address}"
        if rate <= limit:
            return False
        self.metrics.refused("message_rate" if event == "mail" else "recipient_rate")
        self.log.warning(
            f"{what} rate limit exceeded: {rate} from {self.namaddr} for service {self.service}"
        )
        self._reply(Reply(450, "4.7.1", text))
        return True

    # -- milters -------------------------------------------------------------------------

    def _milters_listen(self) -> bool:
        """Whether the milters hear this event: not once one of them said DISCARD
        (Postfix's MILTER_SKIP_FLAGS)."""
        return self.milters is not None and not (
            self.policy is not None and self.policy.state.discard
        )

    def _milter_verdict(
        self, verdict: MilterVerdict, recipients: Sequence[str] = (), cleanup: bool = False
    ) -> Reply | None:
        """Postfix's check_milter_reply(): log what the milters decided at this stage and
        return the reply to give; a hold or a discard lets the command go on."""
        assert self.policy is not None
        st = self.policy.state
        action = verdict.action
        self.metrics.milter_verdict(self.where, action)
        reply: Reply | None = None
        if action == "quarantine":
            if any(verb == "HOLD" for verb, _ in st.queue_actions):
                return None
            text = verdict.reason or "milter triggers HOLD action"
            st.queue_actions.append(("HOLD", text))
            whatsup = "milter-hold"
        elif action == "discard":
            if st.discard:
                return None
            st.discard = True
            whatsup, text = "milter-discard", "milter triggers DISCARD action"
        elif action in ("reject", "tempfail") and verdict.code is not None:
            reply = _verdict_reply(verdict)
            whatsup, text = "milter-reject", " ".join(reply.lines())
            if cleanup:  # cleanup logs the reply without its code
                text = text[4:]
        else:
            return None
        sender = self._milter_sender or (self.txn.sender if self.txn is not None else None)
        self.log.info(
            whatsup_line(
                queue_id=st.queue_id,
                whatsup=whatsup,
                where=self.where,
                namaddr=self.namaddr,
                text=text,
                sender=sender,
                recipients=recipients,
                protocol=self._milter_proto or st.protocol,
                helo=self._milter_helo or st.helo_name,
            )
        )
        return reply

    async def _milter_helo_event(self, name: str, protocol: str) -> Reply | None:
        """The milters' HELO event; their refusal, which only a 421 makes HELO's reply
        (the others persist in the milter and answer MAIL and the later commands)."""
        if not self._milters_listen():
            return None
        assert self.milters is not None
        self._milter_helo, self._milter_proto = name, protocol
        try:
            return self._milter_verdict(await self.milters.helo(self.macros, name))
        finally:
            self._milter_helo = self._milter_proto = None

    async def _milter_message(
        self, txn: Transaction, message: Message
    ) -> tuple[Reply | None, Message]:
        """The whole message goes to the milters (headers, body, end of message) before
        the backend sees any of it: their verdict, and the message and envelope as their
        edits left them.  Postfix's cleanup does this for smtpd; its log lines say
        END-OF-MESSAGE and name the last recipient."""
        assert self.milters is not None
        saved, self.where = self.where, "END-OF-MESSAGE"
        try:
            assert self.policy is not None
            hidden = len(self.policy.state.prepend) + 1  # and smtpgate's Received:
            outcome = await self.milters.message(self.macros, message, hidden_headers=hidden)
            txn.milters_open = False  # the milters are done with this message
            last = txn.recipients[-1:]
            reply = self._milter_verdict(outcome.verdict, recipients=last, cleanup=True)
        finally:
            self.where = saved
        if reply is not None or outcome.verdict.action == "discard":
            return reply, message
        if outcome.sender is not None:
            sender, params = outcome.sender
            txn.sender, txn.mail_params = _bare(sender), list(params)
            txn.envelope_changed = True
        for address in outcome.delete_recipients:
            gone = _bare(address).lower()
            kept = [
                (rcpt, params)
                for rcpt, params in zip(txn.recipients, txn.rcpt_params, strict=True)
                if rcpt.lower() != gone
            ]
            txn.recipients = [rcpt for rcpt, _ in kept]
            txn.rcpt_params = [params for _, params in kept]
        for address, params in outcome.add_recipients:
            added = _bare(address)
            if added.lower() not in (r.lower() for r in txn.recipients):
                txn.recipients.append(added)
                txn.rcpt_params.append(list(params))
        content = outcome.content
        return None, Message(content) if isinstance(content, bytes) else content

    async def _milter_connect(self) -> Reply | None:
        """The milters' CONNECT event; the greeting when they refuse (smtpd.c: a refusal
        other than 421 persists in the milter and answers MAIL and the later commands)."""
        if self.milters is None:
            return None
        client = self.client
        family = "6" if ":" in client.address else "4" if "." in client.address else "U"
        address = None if family == "U" else client.address
        verdict = await self.milters.connect(
            self.macros, client.name, address, client.port or None, family
        )
        reply = self._milter_verdict(verdict)
        if reply is None:
            return None
        hostname = self.config.hostname
        if reply.code == 421:
            return Reply(421, "", f"{hostname} Service unavailable - try again later", True)
        if reply.code // 100 == 5:
            self.error_count += 1
            return Reply(554, "", f"{hostname} ESMTP not accepting connections")
        return None

    async def _milter_other(self) -> Reply | None:
        """VRFY, ETRN, STARTTLS: the milters' standing refusal, if any (milter_other_event)."""
        if self.milters is None:
            return None
        verdict = self.milters.other()
        if verdict.code is not None and verdict.code // 100 in (4, 5):
            return _verdict_reply(verdict)
        return None

    async def _milter_unknown(self, raw: bytes) -> Reply | None:
        """An unknown command goes to the milters; only a 4xx answer replaces Postfix's
        own "502 Error: command not recognized" (smtpd.c: milter_unknown_reply_override)."""
        if not self._milters_listen():
            return None
        assert self.milters is not None
        command = raw.decode("utf-8", "replace").rstrip("\r\n")
        verdict = await self.milters.unknown(self.macros, command)
        if verdict.action == "tempfail" and verdict.code is not None:
            return _verdict_reply(verdict)
        if verdict.action not in ("continue", "accept", "reject", "discard", "quarantine"):
            self.log.warning(f"unexpected SMFIC_UNKNOWN response: {verdict.action}")
        return None

    def _macro(self, name: str) -> str | None:
        """A macro's value now (Postfix's smtpd_milter_eval(); see smtp/macros.py)."""
        st = self.policy.state if self.policy is not None else None
        sender = self._milter_sender or (self.txn.sender if self.txn is not None else None)
        context = MacroContext(
            hostname=str(self.config.hostname),
            client=self.client,
            connections=self.connections,
            server=self.server,
            tls=st.tls if st is not None else None,
            queue_id=st.queue_id if st is not None else None,
            sender=sender,
            recipient=self._milter_rcpt,
        )
        return macro_value(name, context)

    # -- command lines -------------------------------------------------------------------

    def _next_line(self) -> bytes | None:
        """The next command line (with its line end), or None until one is complete.

        Postfix reads line_length_limit octets of a line and drops the rest of it; the
        command is worked on once the rest has been read (so the rest is not taken for
        pipelined input).
        """
        buf, limit = self._in, self.config.line_limit
        if self._long_head is None:
            end = buf.find(b"\n", 0, limit + 2)
            if end >= 0:
                line = bytes(buf[: end + 1])
                del buf[: end + 1]
                return line if len(line) <= limit + 2 else line[:limit]
            if len(buf) < limit + 2:
                return None
            self._long_head = bytes(buf[:limit])
            del buf[:limit]
        end = buf.find(b"\n")
        if end < 0:
            buf.clear()
            return None
        del buf[: end + 1]
        line, self._long_head = self._long_head, None
        return line

    def _improper_pipelining(self, command: str, pending: bytes | bytearray) -> bool:
        """Log the first input sent ahead of time, as smtpd_proto() does; True if any."""
        if self.ill_pipelining or not pending:
            return False
        self.ill_pipelining = True
        if self.policy is not None:
            self.policy.state.illegal_pipelining = True  # reject_unauth_pipelining reads it
        self.log.info(
            f"improper command pipelining after {command} from {self.namaddr}: "
            f"{escape(bytes(pending[:100]))}"
        )
        return True

    def _bare_newline_rejected(self) -> bool:
        cfg = self.config
        if cfg.bare_newline != "reject":
            return False
        try:
            return not cfg.bare_newline_exclusions.match(self.client.address)
        except TableLookupError:
            return True

    def _bare_newline_reply(self, disconnect: bool = False) -> Reply:
        code = self.config.bare_newline_code
        text = f"{self.config.hostname} Error: bare <LF> received"
        return Reply(code, f"{str(code)[0]}.5.2", text, disconnect or code in (421, 521))

    def _log_reject(self, text: str, recipients: Sequence[str] = ()) -> None:
        """A ``reject:`` line of the machine's own (bare <LF>), at the current stage."""
        assert self.policy is not None
        st = self.policy.state
        self.log.info(
            whatsup_line(
                queue_id=st.queue_id,
                whatsup="reject",
                where=self.where,
                namaddr=self.namaddr,
                text=text,
                sender=self.txn.sender if self.txn is not None else None,
                recipients=recipients,
                protocol=st.protocol,
                helo=st.helo_name,
            )
        )

    def _tokens(self, raw: bytes) -> list[Token] | None:
        """The words of a command line; None after replying to a line that has none."""
        line = raw.rstrip(b"\n")
        bare_lf = raw.endswith(b"\n") and not line.endswith(b"\r")
        line = line.rstrip(b"\r")
        if bare_lf and self.screening is not None:
            dropped = self.screening.bare_newline(raw)
            if dropped is not None:
                self._reply(dropped)
                return None
        if bare_lf and self._bare_newline_rejected():
            # Postfix refuses the line before it is a command: not counted, the log line
            # names the stage before it, and the connection closes.
            last = [self._last_rcpt] if self.txn is not None and self._last_rcpt else []
            self._log_reject("bare <LF> received", last)
            self._reply(self._bare_newline_reply(disconnect=True))
            return None
        # Postfix handles the command as a C string: it ends at the first NUL.
        line = line.split(b"\0", 1)[0]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.counts["unknown"] += 1
            self._reply(s.BAD_UTF8)
            return None
        if self.observer is not None:
            self.observer.command(text)
        tokens = smtpd_tokens(text)
        if not tokens:
            self.counts["unknown"] += 1
            self._reply(s.BAD_SYNTAX)
            return None
        return tokens

    async def _dispatch(self, raw: bytes) -> None:
        if self.dummy is not None:
            self._dummy_dispatch(raw)
            return
        cfg = self.config
        tokens = self._tokens(raw)
        if tokens is None:
            self.error_count += 1
            self.requests += 1
            return
        verb = tokens[0].text
        upper = verb.upper()
        handler = _COMMANDS.get(upper)
        screening = self.screening
        if screening is not None and screening.running_deep_tests:
            screening.before_command(self.where, raw.rstrip(b"\r\n"))
            pending = b"" if upper in ("DATA", "BDAT") else self.peek(100)
            dropped = screening.command_line(verb, handler is not None, pending)
            if dropped is not None:
                self.requests += 1
                self._reply(dropped)
                return
        if handler is None:
            self.where = "UNKNOWN"
            self.requests += 1
            if cfg.forbidden.match(verb):
                text = raw.split(b"\0", 1)[0].decode("utf-8", "replace").rstrip("\r\n")[:100]
                self.log.warning(f"non-SMTP command from {self.namaddr}: {text}")
                self._reply(s.FORBIDDEN)
                return
            self.counts["unknown"] += 1
            assert self.policy is not None
            reply = self.policy.access_denied(verb) or await self._milter_unknown(raw)
            self._reply(reply or s.UNKNOWN_COMMAND)
            self.error_count += 1
            return
        name = _COUNTER_NAMES[upper]
        self.counts[name] += 1
        assert self.policy is not None
        denied = self.policy.access_denied(upper)
        if denied is not None:  # smtpd_delay_reject = no, refused at connect
            self.requests += 1
            self._reply(denied)
            self.error_count += 1
            return
        if cfg.tls_required and not self.tls_active and upper not in ALLOWED_BEFORE_TLS:
            self.requests += 1
            self._reply(s.NEED_STARTTLS)
            self.error_count += 1
            return
        self.where = upper
        if (not self.esmtp or upper in LAST_IN_GROUP) and self._improper_pipelining(
            upper, self._in
        ):
            if cfg.forbid_unauth_pipelining:
                self._reply(s.SYNC_ERROR)
                return
        assert self.policy is not None
        self.policy.state.input_pending = bool(self._in)
        ok = await handler(self, tokens[1:])
        if ok is None:  # DATA or BDAT: the outcome comes with the content
            self._pending = name
            return
        self._done(name, ok, junk=upper in JUNK_COMMANDS)

    def _done(self, name: str, ok: bool, junk: bool = False) -> None:
        self.requests += 1
        if ok:
            self.successes[name] += 1
        else:
            self.error_count += 1
        if junk:
            self.junk_cmds += 1
            if self.junk_cmds > self.config.junk_limit + 1:
                self.error_count += 1

    # -- HELO, EHLO ----------------------------------------------------------------------

    async def cmd_helo(self, args: list[Token]) -> bool:
        return await self._hello(args, esmtp=False)

    async def cmd_ehlo(self, args: list[Token]) -> bool:
        return await self._hello(args, esmtp=True)

    async def _hello(self, args: list[Token], esmtp: bool) -> bool:
        assert self.policy is not None
        verb = "EHLO" if esmtp else "HELO"
        if not args:
            return self._fail(Reply(501, "", f"Syntax: {verb} hostname"))
        name = " ".join(t.text for t in args)
        # Postfix checks first: a rejected HELO leaves the session as it was (a
        # transaction in progress stays).
        protocol = self.policy.state.protocol  # what the milters' log line names
        decision = await self.policy.helo(name, esmtp=esmtp)
        self._note(decision)
        if decision.reply is not None:
            return self._fail(decision.reply)
        refused = await self._milter_helo_event(name, protocol)
        if refused is not None and refused.code == 421:
            return self._fail(refused)
        await self._end_transaction()
        # HELO after EHLO keeps ESMTP (and with it the pipelining rules of EHLO).
        self.esmtp = self.policy.state.protocol == "ESMTP"
        hostname = self.config.hostname
        if not esmtp:
            self._reply(Reply(250, "", hostname))
        elif refused is not None and refused.code // 100 == 5:
            # Sendmail's rule, kept by Postfix: after a milter's 5xx, EHLO announces
            # ENHANCEDSTATUSCODES only (the refusal answers MAIL).
            self._reply(Reply(250, "", f"{hostname}\nENHANCEDSTATUSCODES"))
        else:
            self._reply(Reply(250, "", "\n".join([hostname, *self._extensions()])))
        return True

    def _extensions(self) -> list[str]:
        cfg = self.config
        out = ["PIPELINING", f"SIZE {cfg.size_limit}" if cfg.size_limit else "SIZE"]
        if self.screening is not None and self.screening.deep_todo("pipelining"):
            out.pop(0)  # postscreen's pipelining test: not announced until passed
        if not cfg.disable_vrfy:
            out.append("VRFY")
        out.append("ETRN")
        if self.starttls_offered and not self.tls_active:
            out.append("STARTTLS")
        out += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
        return out

    # -- MAIL, RCPT ----------------------------------------------------------------------

    async def cmd_mail(self, args: list[Token]) -> bool:
        assert self.policy is not None
        if self.policy.state.helo_name is None and self.plan.helo_required:
            return self._fail(s.NEED_HELO)
        if self.txn is not None:
            return self._fail(s.NESTED_MAIL)
        if len(args) < 2 or args[0].text.lower() != "from:":
            return self._fail(s.syntax("MAIL FROM:<address>"))
        if await self._rate_exceeded("mail"):
            return False
        if args[1].error:
            return self._fail(s.BAD_SENDER)
        params = [t.text for t in args[2:]]
        problem, size = check_mail_params(params)
        if problem is not None:
            return self._fail(problem)
        address = parse_address(args[1].text, allow_empty=True)
        if address is None or not acceptable_address(address):
            return self._fail(s.BAD_SENDER)
        if self.config.size_limit and size > self.config.size_limit:
            return self._fail(s.TOO_BIG)
        decision = await self.policy.mail(address, size=size)
        self._note(decision)
        if decision.reply is not None:
            return self._fail(decision.reply)
        if self._milters_listen():
            assert self.milters is not None
            self._milter_sender = address
            try:
                verdict = await self.milters.mail(self.macros, address, params)
                reply = self._milter_verdict(verdict)
            finally:
                self._milter_sender = None
            if reply is not None:
                await asyncio.shield(self.milters.abort())
                self.policy.reset()  # undo what the restrictions left (Postfix's mail_reset)
                return self._fail(reply)
        # AUTH= from a client that did not authenticate is ignored, as Postfix does.
        forwarded = [p for p in params if not p.upper().startswith("AUTH=")]
        self.txn = Transaction(address, forwarded)
        self._reply(s.SENDER_OK)
        return True

    async def cmd_rcpt(self, args: list[Token]) -> bool:
        assert self.policy is not None
        txn = self.txn
        if txn is None:
            return self._fail(s.NEED_MAIL)
        if len(args) < 2 or args[0].text.lower() != "to:":
            return self._fail(s.syntax("RCPT TO:<address>"))
        if await self._rate_exceeded("rcpt"):
            return False
        if args[1].error:
            return self._fail(s.BAD_RECIPIENT)
        params = [t.text for t in args[2:]]
        problem = check_rcpt_params(params)
        if problem is not None:
            return self._fail(problem)
        address = parse_address(args[1].text, allow_empty=False)
        if address is None or not acceptable_address(address):
            return self._fail(s.BAD_RECIPIENT)
        screened = self._screened_rcpt(address)
        if screened is not None:
            return self._fail(screened)
        if len(txn.recipients) >= self.config.recipient_limit:
            # The first smtpd_recipient_overshoot_limit of these are not errors.
            self._reply(s.TOO_MANY_RECIPIENTS)
            txn.overshoot += 1
            return bool(txn.overshoot <= self.config.recipient_overshoot)
        decision = await self.policy.rcpt(address, relay_verifies=self._relay_verifies())
        self._note(decision)
        if decision.reply is not None:
            await self._milter_rejected_rcpt(address, params, decision.reply)
            return self._fail(decision.reply)
        if self._milters_listen():
            assert self.milters is not None
            self._milter_rcpt = address
            try:
                verdict = await self.milters.rcpt(self.macros, address, params)
                reply = self._milter_verdict(verdict, recipients=[address])
            finally:
                self._milter_rcpt = None
            if reply is not None:  # that recipient's reply, as in Postfix
                return self._fail(reply)
        reply = await self._relay_and_verify(txn, address, params)
        ok = reply.code // 100 == 2
        self._last_rcpt = address
        if ok:
            txn.recipients.append(address)
            txn.rcpt_params.append(params)
            self.policy.confirm_rcpt(address)
        self._reply(reply)
        return ok

    async def _milter_rejected_rcpt(self, address: str, params: list[str], reply: Reply) -> None:
        """The milters hear of a recipient the restrictions rejected (as Postfix tells them)."""
        if self._milters_listen():
            assert self.milters is not None
            text = " ".join(reply.lines())
            await self.milters.rcpt(self.macros, address, params, rejected=text)

    def _screened_rcpt(self, address: str) -> Reply | None:
        """postscreen at RCPT: the deep tests pass; with enforce, its reply to every
        RCPT, with its NOQUEUE line (None: go on)."""
        screening = self.screening
        if screening is None:
            return None
        screening.rcpt_seen()
        reply = given = screening.rcpt_reply
        if reply is None or given is None:
            return None
        assert self.policy is not None and self.txn is not None
        if self.plan.soft_bounce and reply.code >= 500:
            dsn = "4" + reply.dsn[1:] if reply.dsn.startswith("5") else reply.dsn
            reply = dataclasses.replace(reply, code=reply.code - 100, dsn=dsn)
        st = self.policy.state
        screening.log.info(
            f"NOQUEUE: reject: RCPT from {screening.addr_port}: {reply.code} {reply.dsn} "
            f"{reply.text}; from=<{self.txn.sender}>, to=<{address}>, "
            f"proto={st.protocol}, helo=<{st.helo_name or ''}>"
        )
        return given  # _reply softens what the client gets itself

    def _queue_id(self) -> str:
        assert self.policy is not None
        st = self.policy.state
        if st.queue_id is None:
            st.queue_id = self.new_queue_id()
            self.log.info(f"{st.queue_id}: client={self.namaddr}")
            self.metrics.queued()
        return st.queue_id

    def _facts(self) -> ClientFacts:
        assert self.policy is not None
        st = self.policy.state
        return ClientFacts(
            name=self.client.name,
            addr=self.client.address,
            port=self.client.port,
            proto=st.protocol,
            helo=st.helo_name,
            # XFORWARD IDENT: a Postfix backend logs it as orig_queue_id=, which joins
            # its log lines to smtpgate's.
            ident=st.queue_id,
            server=self.server,
        )

    def _route(self, txn: Transaction) -> Route:
        assert self.policy is not None
        actions = self.policy.state.queue_actions
        return route_of(txn.recipients, actions, self.backend.holds_elsewhere())

    def _lockstep(self) -> bool:
        assert self.policy is not None
        return lockstep(self.policy.state.queue_actions, self.backend.holds_elsewhere())

    def _relay_verifies(self) -> bool:
        """Whether an RCPT that passes the restrictions goes to the backend in lock-step
        with nothing between, so that its reply may verify the recipient."""
        assert self.policy is not None
        return not self.policy.state.discard and self._lockstep() and not self._milters_listen()

    async def _relay_and_verify(self, txn: Transaction, address: str, params: list[str]) -> Reply:
        """Relay an RCPT that passed the restrictions: the client's reply.  When its
        reply is to be reject_unverified_recipient's probe, finish the verification with
        it (or with a probe of its own when the RCPT was not relayed after all; see
        policy/verification.py)."""
        assert self.policy is not None
        if self.policy.verify_pending != address:
            return await self._relay_rcpt(txn, address, params)
        st = self.policy.state
        fresh_id = None
        if st.queue_id is None:
            # Postfix opens the queue file (logs "client=") once a recipient is
            # accepted; until the verification says so, the id is the backend's only.
            fresh_id = txn.unannounced_id = txn.unannounced_id or self.new_queue_id()
            st.queue_id = fresh_id
        reply = await self._relay_rcpt(txn, address, params, quiet=True)
        relayed = not st.discard and self._lockstep()
        peer = txn.relay.backend_peer if txn.relay is not None else ""
        if fresh_id is not None:
            st.queue_id = None  # a refusal is logged as NOQUEUE, as Postfix's
        decision = await self.policy.verified(address, reply if relayed else None, peer)
        self._note(decision)
        if decision.reply is not None:
            return decision.reply
        if fresh_id is not None:
            st.queue_id = fresh_id
            self.log.info(f"{fresh_id}: client={self.namaddr}")
            self.metrics.queued()
        if reply.code // 100 != 2:
            self._log_proxy("proxy-reject", "RCPT", reply, [address])
        return reply

    async def _relay_rcpt(
        self, txn: Transaction, address: str, params: list[str], quiet: bool = False
    ) -> Reply:
        """The backend's reply to the RCPT (its refusal logged unless ``quiet``)."""
        assert self.policy is not None
        self._queue_id()
        if self.policy.state.discard or not self._lockstep():
            return s.RECIPIENT_OK
        if txn.relay is None:
            route = self._route(txn)
            txn.relay = await self.backend.begin(
                self._facts(), txn.sender, txn.mail_params, filter=route.filter, hold=route.hold
            )
            txn.route = Route((), route.filter, route.hold)
        reply = await txn.relay.rcpt(address, params)
        if reply.code // 100 != 2:
            if not quiet:
                self._log_proxy("proxy-reject", "RCPT", reply, [address])
        elif txn.route is not None:
            txn.route = Route((*txn.route.recipients, address), txn.route.filter, txn.route.hold)
        return reply

    async def _settle_route(self, txn: Transaction) -> Reply | None:
        """Make the backend transaction carry the final envelope (see rule 5); a reply
        when that fails (the message cannot go anywhere)."""
        route = self._route(txn)
        if txn.relay is not None and txn.route == route and not txn.envelope_changed:
            return None
        if txn.relay is not None:
            relay, txn.relay = txn.relay, None
            await asyncio.shield(relay.abort())
        relay = await self.backend.begin(
            self._facts(), txn.sender, txn.mail_params, filter=route.filter, hold=route.hold
        )
        txn.relay, txn.route = relay, route
        params = dict(zip(txn.recipients, txn.rcpt_params, strict=True))
        if route.redirected and txn.recipients:
            # Postfix's queue keeps the first original recipient as the ORCPT.
            params = {route.recipients[0]: [f"ORCPT=rfc822;{xtext(txn.recipients[0])}"]}
        for address in route.recipients:
            reply = await relay.rcpt(address, params.get(address, []))
            if reply.code // 100 != 2:
                self._log_proxy("proxy-reject", "RCPT", reply, [address])
                txn.relay = None
                await asyncio.shield(relay.abort())
                return reply if reply.code // 100 == 4 else Reply(451, "4.3.0", reply.text)
        return None

    # -- DATA, BDAT ----------------------------------------------------------------------

    async def _start_content(self, txn: Transaction, where: str = "DATA") -> Reply | None:
        """What DATA and the first BDAT have in common: the data restrictions, a first
        reservation in the memory budget; a reply when the message cannot come."""
        assert self.policy is not None
        decision = await self.policy.data(where)
        self._note(decision)
        if decision.reply is not None:
            return decision.reply
        if self._milters_listen():
            assert self.milters is not None
            reply = self._milter_verdict(await self.milters.data(self.macros))
            if reply is not None:
                return reply
        limit = self.config.data_memory_limit
        if limit:
            reserved = await self.anvil.reserve(min(DATA_RESERVE, limit), limit)
            if not reserved.granted:
                self.metrics.refused("data_memory")
                self.log.warning(
                    f"smtpgate_data_memory_limit reached ({reserved.in_flight} bytes in "
                    f"flight): DATA from {self.namaddr} deferred"
                )
                return s.NO_MEMORY
            self.data_held = min(DATA_RESERVE, limit)
        return None

    async def cmd_data(self, args: list[Token]) -> bool | None:
        txn = self.txn
        screening = self.screening
        if screening is not None and screening.rcpt_reply is not None:
            # postscreen's enforce: no recipient was ever accepted; it hangs up
            screening.log.info(f"DATA without valid RCPT from {screening.addr_port}")
            screening.dropped = True
            reply = s.syntax("DATA") if args else s.NEED_RCPT if txn is None else s.NO_VALID_RCPT
            return self._fail(dataclasses.replace(reply, disconnect=True))
        if txn is None:
            return self._fail(s.NEED_RCPT)
        if not txn.recipients:
            return self._fail(s.NO_VALID_RCPT)
        if args:
            return self._fail(s.syntax("DATA"))
        if txn.chunks is not None or txn.chunk_problem is not None:
            return self._fail(Reply(503, "5.5.1", "Error: DATA after BDAT"))
        problem = await self._start_content(txn)
        if problem is not None:
            return self._fail(problem)
        assert self.policy is not None
        if not self.policy.state.discard:
            problem = await self._settle_route(txn)
            if problem is not None:
                self._release_data()
                await self._end_transaction()
                return self._fail(problem)
            if txn.relay is not None:
                txn.relay.start_data()  # the backend's 354 comes while the content does
        self._reply(s.DATA_GO_AHEAD)
        self._out.append(FLUSH)
        self._dot = DotReader(self.new_store())
        self.mode = Mode.DATA
        return None

    async def cmd_bdat(self, args: list[Token]) -> bool | None:
        """Postfix's bdat_cmd(): a chunk of exactly the size given, read even when it is
        refused; replies and warnings as Postfix 3.7 gives them (docs/postfix-behaviour.md)."""
        assert self.policy is not None
        words = [t.text for t in args]
        last = len(words) == 2 and words[1].upper() == "LAST"
        if not words or len(words) > 1 + last or not words[0].isdigit() or len(words[0]) > 18:
            # The chunk's size is unknown, so its octets cannot be told from commands.
            queue_id = self.policy.state.queue_id or "NOQUEUE"
            line = " ".join(["BDAT", *words])
            self.log.warning(
                f"{queue_id}: malformed BDAT command syntax from {self.namaddr}: {line}"
            )
            return self._fail(Reply(521, "5.5.4", "Syntax: BDAT count [LAST]", disconnect=True))
        size = int(words[0])
        txn = self.txn
        problem: Reply | None = None
        if txn is None:
            problem = s.NEED_RCPT
        elif not txn.recipients:
            problem = s.NO_VALID_RCPT
        elif size == 0 and not last:
            self.log.warning(f"{self._queue_id()}: null BDAT request from {self.namaddr}")
            txn.chunk_problem = Reply(551, "5.7.1", "Null BDAT request")
            self._drop_chunks(txn)
            self._release_data()
            return self._fail(txn.chunk_problem)
        elif txn.chunk_problem is not None:
            problem = Reply(551, "5.0.0", f"Discarded {size} bytes after earlier error")
        elif self.config.size_limit and size > self.config.size_limit:
            self.log.warning(
                f"{self._queue_id()}: BDAT request from {self.namaddr} exceeds message size limit"
            )
            problem = Reply(552, "5.3.4", "Chunk exceeds message size limit")
            self._reset_after_chunk = True
        else:
            if txn.chunks is None:
                problem = await self._start_content(txn, where="BDAT")
                if problem is None:
                    txn.chunks = self.new_store()
            if problem is None:
                assert txn.chunks is not None
                total = txn.chunks.size + size
                if self.config.size_limit and total > self.config.size_limit:
                    self.log.warning(f"{self._queue_id()}: queue file size limit exceeded")
                    problem = Reply(552, "5.3.4", "Error: message file too big")
                elif not await self._account(_in_memory(txn.chunks, total), complete=True):
                    problem = s.NO_MEMORY
            if problem is not None:
                txn.chunk_problem = problem
                self._drop_chunks(txn)
                self._release_data()
        keep = txn.chunks if problem is None and txn is not None else None
        self._chunk = ChunkReader(size, last, keep)
        self._chunk_problem = problem
        self.mode = Mode.BDAT
        return None

    async def _content(self) -> bool:
        """Take content input; True when the content ended (commands follow)."""
        if self.mode is Mode.DATA:
            return await self._data_content()
        return await self._bdat_content()

    async def _data_content(self) -> bool:
        reader = self._dot
        assert reader is not None
        rest = reader.feed(self._in)
        complete = rest is not None
        if reader.failure is not None and self._data_rejected is None:
            self._spool_failed(reader.failure)
            self._release_data()
            self._data_rejected = R451_LOCAL_ERROR
        if not reader.discarding:
            problem = await self._data_problem(reader, complete)
            if problem is not None:
                reader.discard()
                self._release_data()
                self._data_rejected = problem
        if rest is None:
            return False
        self._in[0:0] = rest  # pipelined commands after the dot
        self._dot, self.mode = None, Mode.COMMAND
        problem, self._data_rejected = self._data_rejected, None
        try:
            if problem is not None:
                await self._end_transaction()
                reply = problem
            else:
                reply = await self._finish_message(reader.store)
        finally:
            self._dispose(reader.store)
        self._release_data()
        self._content_done("data", reply, message_done=True)
        return True

    async def _data_problem(self, reader: DotReader, complete: bool) -> Reply | None:
        """Once the message is certainly over message_size_limit, or the memory budget
        has no room for it, it is read to the end and dropped."""
        size = reader.size
        if not complete and self.config.size_limit and size > self.config.size_limit + 8:
            return s.TOO_BIG  # the content can only grow: certainly too big
        if not await self._account(reader.memory, complete or reader.store.spooled):
            return s.NO_MEMORY
        return None

    async def _bdat_content(self) -> bool:
        chunk = self._chunk
        assert chunk is not None
        if not chunk.feed(self._in):
            return False
        self._chunk, self.mode = None, Mode.COMMAND
        problem, self._chunk_problem = self._chunk_problem, None
        txn = self.txn
        if problem is None and chunk.failure is not None and txn is not None:
            self._spool_failed(chunk.failure)
            problem = txn.chunk_problem = R451_LOCAL_ERROR
            self._drop_chunks(txn)
            self._release_data()
            self._reset_after_chunk = True
        if problem is not None:
            if chunk.last or self._reset_after_chunk:
                self._reset_after_chunk = False
                await self._end_transaction()
            self._content_done("bdat", problem, message_done=chunk.last)
            return True
        assert txn is not None and txn.chunks is not None
        if not chunk.last:
            self._content_done("bdat", Reply(250, "2.0.0", f"Ok: {chunk.size} bytes"), False)
            return True
        store = txn.chunks
        try:
            reply = await self._finish_message(store)
        finally:
            self._dispose(store)
        self._release_data()
        self._content_done("bdat", reply, message_done=True)
        return True

    def _content_done(self, name: str, reply: Reply, message_done: bool) -> None:
        ok = reply.code // 100 == 2
        if message_done:
            self.metrics.message(reply.code)
        if ok and message_done:
            # Postfix forgives earlier errors once a message was received.
            self.error_count = self.junk_cmds = 0
        self._pending = None
        self._reply(reply)
        self._done(name, ok)

    async def _account(self, size: int, complete: bool) -> bool:
        """Hold ``size`` bytes of content in the budget; False when there is no room.

        A whole message gives back what it reserved beyond its size (when that is worth
        a message to the anvil).
        """
        limit = self.config.data_memory_limit
        if not limit:
            return True
        if size > self.data_held and not await self._hold(size):
            self.metrics.refused("data_memory")
            self.log.warning(
                f"smtpgate_data_memory_limit reached: message from {self.namaddr} "
                "is read and discarded"
            )
            self._release_data()
            return False
        if complete and self.data_held - size >= DATA_RESERVE:
            self.anvil.release(self.data_held - size)
            self.data_held = size
        return True

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
            if (await self.anvil.reserve(amount, cfg.data_memory_limit)).granted:
                self.data_held += amount
                return True
        return False

    def _release_data(self) -> None:
        if self.data_held:
            self.anvil.release(self.data_held)
            self.data_held = 0

    def _dispose(self, store: MessageStore) -> None:
        """Close ``store`` now, or when the relay still reading it is done."""
        sending, self._sending = self._sending, None
        if sending is not None and not sending.done():
            sending.add_done_callback(lambda _: store.close())
        else:
            store.close()

    def _spool_failed(self, error: OSError) -> None:
        self.log.warning(
            f"{self._queue_id()}: cannot spool the message from {self.namaddr}: "
            f"{error.strerror or error}"
        )

    def _drop_chunks(self, txn: Transaction) -> None:
        if txn.chunks is not None:
            txn.chunks.close()
            txn.chunks = None

    def _check_content(self, content: MessageStore) -> Reply | None:
        if self.config.size_limit and content.size > self.config.size_limit:
            return s.TOO_BIG
        if content.nul:
            return s.NUL_IN_DATA
        if self._bare_newline_rejected() and content.bare_lf:
            txn = self.txn
            recipients = txn.recipients if txn is not None and len(txn.recipients) == 1 else []
            saved, self.where = self.where, "END-OF-MESSAGE"
            self._log_reject("bare <LF> received", recipients)
            self.where = saved
            return self._bare_newline_reply()
        return None

    async def _finish_message(self, content: MessageStore) -> Reply:
        """The whole message is in: end-of-data restrictions, then the backend."""
        txn, policy = self.txn, self.policy
        assert txn is not None and policy is not None
        st = policy.state
        reply = self._check_content(content)
        if reply is None:
            decision = await policy.end_of_data(size=content.size)
            self._note(decision)
            reply = decision.reply
        if reply is not None:
            await self._end_transaction()
            return reply
        queue_id = self._queue_id()
        message = Message(self._received_header(txn), content)
        if self._milters_listen():
            reply, message = await self._milter_message(txn, message)
            if reply is not None:
                await self._end_transaction()
                return reply
        if st.discard or not txn.recipients:
            # a restriction or milter said DISCARD (and logged it, once), or the milters
            # removed every recipient: nothing goes to the backend
            await self._end_transaction()
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        problem = await self._settle_route(txn)  # end-of-data actions may move it
        if problem is not None:
            await self._end_transaction()
            return problem
        assert txn.relay is not None and txn.route is not None
        if txn.route.hold is False and any(v == "HOLD" for v, _ in st.queue_actions):
            message = message.prefixed(f"{HOLD_HEADER}: {header_safe(self.namaddr)}\r\n".encode())
        # The relay finishes even when this task is cancelled (shield); the store stays
        # open until it has (see _dispose).
        self._sending = asyncio.ensure_future(txn.relay.data(message))
        reply = await asyncio.shield(self._sending)
        self._sending = None
        whatsup = "proxy-accept" if reply.code // 100 == 2 else "proxy-reject"
        self._log_proxy(whatsup, "END-OF-MESSAGE", reply, txn.recipients)
        if txn.relay.outcome_unknown:
            self.log.warning(
                f"{queue_id}: backend connection lost after the end of data: "
                "the message may have been delivered; the client was told 451"
            )
        txn.relay = None  # done: nothing to abort
        await self._end_transaction()
        return reply

    def _received_header(self, txn: Transaction) -> bytes:
        assert self.policy is not None
        st = self.policy.state
        return received_header(
            prepend=st.prepend,
            helo=st.helo_name,
            client=self.client,
            hostname=self.config.hostname,
            proto=("ESMTPS" if self.tls_active else "ESMTP") if self.esmtp else "SMTP",
            queue_id=st.queue_id or "",
            # Postfix's queue delivers a redirected message without "for <...>".
            recipients=[] if self._route(txn).redirected else txn.recipients,
            date=header_date(int(self.clock())),
        )

    # -- the other commands --------------------------------------------------------------

    async def cmd_rset(self, args: list[Token]) -> bool:
        if args:
            return self._fail(s.syntax("RSET"))
        await self._end_transaction()
        self._reply(s.OK)
        return True

    async def cmd_noop(self, args: list[Token]) -> bool:
        self._reply(s.OK)
        return True

    async def cmd_quit(self, args: list[Token]) -> bool:
        self._reply(s.BYE)
        return True

    async def cmd_vrfy(self, args: list[Token]) -> bool:
        """Postfix's vrfy_cmd: the recipient restrictions decide; 252 when they pass."""
        if self.config.disable_vrfy:
            return self._fail(s.VRFY_DISABLED)
        if not args:
            return self._fail(s.syntax("VRFY address [SMTPUTF8]"))
        if self.screening is not None and self.screening.rcpt_reply is not None:
            return self._fail(self.screening.rcpt_reply)  # postscreen's enforce
        if await self._rate_exceeded("rcpt"):
            return False
        refused = await self._milter_other()
        if refused is not None:
            return self._fail(refused)
        words = [t.text for t in args]
        if len(words) > 1 and words[-1].upper() == "SMTPUTF8":
            words.pop()
        text = " ".join(words)
        address = parse_address(text, allow_empty=False, sloppy=True)
        if address is None:
            return self._fail(s.BAD_RECIPIENT)
        assert self.policy is not None
        decision = await self.policy.vrfy(address)
        self._note(decision)
        if decision.reply is not None:
            return self._fail(decision.reply)
        self._reply(Reply(252, "2.0.0", text))
        return True

    async def cmd_etrn(self, args: list[Token]) -> bool:
        """Postfix's etrn_cmd(): its own checks, the restrictions, then the queue's answer.

        smtpgate has no queue to flush: every domain that passes gets the answer Postfix
        gives for a domain that is not in fast_flush_domains.
        """
        assert self.policy is not None
        if self.policy.state.helo_name is None and self.plan.helo_required:
            return self._fail(Reply(503, "", "Error: send HELO/EHLO first"))
        refused = await self._milter_other()
        if refused is not None:
            return self._fail(refused)
        if self.txn is not None:
            return self._fail(Reply(503, "", "Error: MAIL transaction in progress"))
        if len(args) != 1:
            return self._fail(Reply(500, "", "Syntax: ETRN domain"))
        domain = args[0].text
        if domain[:1] in ("@", "#"):
            domain = domain[1:]
        if not valid_hostname(domain):
            return self._fail(Reply(501, "", "Error: invalid parameter syntax"))
        decision = await self.policy.etrn(domain)
        self._note(decision)
        if decision.reply is not None:
            return self._fail(decision.reply)
        self.log.warning(f"reject: ETRN {domain}... from {self.namaddr}")
        return self._fail(Reply(459, "", f"<{domain}>: service unavailable"))

    async def cmd_auth(self, args: list[Token]) -> bool:
        # smtpgate offers no SASL: Postfix's answer with smtpd_sasl_auth_enable = no.
        return self._fail(s.NO_AUTH)

    async def cmd_xclient(self, args: list[Token]) -> bool:
        if not args:
            return self._fail(s.syntax("XCLIENT attribute=value..."))
        return self._fail(s.NOT_AUTHORIZED)

    async def cmd_xforward(self, args: list[Token]) -> bool:
        if not args:
            return self._fail(s.syntax("XFORWARD attribute=value..."))
        return self._fail(s.NOT_AUTHORIZED)

    async def cmd_starttls(self, args: list[Token]) -> bool:
        if args:
            return self._fail(s.syntax("STARTTLS"))
        if not self.starttls_offered:
            return self._fail(s.NOT_IMPLEMENTED)
        refused = await self._milter_other()
        if refused is not None:  # Sendmail's rule: a 4xx becomes 454
            return self._fail(
                refused if refused.code // 100 == 5 else Reply(454, "4.3.0", "Try again later")
            )
        if self.tls_active:
            return self._fail(s.TLS_ACTIVE)
        await self._end_transaction()
        self._reply(s.TLS_READY)
        # Plaintext sent behind STARTTLS is dropped, never read as commands over TLS
        # (CVE-2011-0411, the command injection).
        self._in.clear()
        if self.milters is not None:
            await self.milters.reset_helo()
        self._out += (FLUSH, START_TLS)
        self._stop = True
        return True

    # -- transaction end and logging -----------------------------------------------------

    async def _end_transaction(self) -> None:
        txn, self.txn = self.txn, None
        if txn is not None:
            self._drop_chunks(txn)
        if txn is not None and txn.milters_open and self.milters is not None:
            await asyncio.shield(self.milters.abort())
        if txn is not None and txn.relay is not None:
            try:
                await asyncio.shield(txn.relay.abort())
            except Exception:
                log.exception("backend abort failed")
        if self.policy is not None:
            self.policy.reset()

    def _log_proxy(self, whatsup: str, where: str, reply: Reply, recipients: list[str]) -> None:
        assert self.policy is not None and self.txn is not None
        st, txn = self.policy.state, self.txn
        relay = txn.relay
        self.log.info(
            whatsup_line(
                queue_id=st.queue_id,
                whatsup=whatsup,
                where=where,
                namaddr=self.namaddr,
                text=" ".join(reply.lines()),
                sender=txn.sender,
                recipients=recipients,
                protocol=st.protocol,
                helo=st.helo_name,
                extra=f"relay={relay.backend_peer}" if relay is not None else "",
            )
        )

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
        self.log.info(f"disconnect from {self.namaddr} {' '.join(parts)}")


_COMMANDS: dict[str, Any] = {
    "HELO": SmtpMachine.cmd_helo,
    "EHLO": SmtpMachine.cmd_ehlo,
    "MAIL": SmtpMachine.cmd_mail,
    "RCPT": SmtpMachine.cmd_rcpt,
    "DATA": SmtpMachine.cmd_data,
    "BDAT": SmtpMachine.cmd_bdat,
    "RSET": SmtpMachine.cmd_rset,
    "NOOP": SmtpMachine.cmd_noop,
    "QUIT": SmtpMachine.cmd_quit,
    "VRFY": SmtpMachine.cmd_vrfy,
    "STARTTLS": SmtpMachine.cmd_starttls,
    "ETRN": SmtpMachine.cmd_etrn,
    "AUTH": SmtpMachine.cmd_auth,
    "XCLIENT": SmtpMachine.cmd_xclient,
    "XFORWARD": SmtpMachine.cmd_xforward,
}
_COUNTER_NAMES = {verb: verb.lower() for verb in _COMMANDS}


def _in_memory(store: MessageStore, total: int) -> int:
    """What a store holds in memory once its content is ``total`` bytes."""
    if store.spooled or (store.spoolable and total > store.memory_limit):
        return 0
    return total


def _verdict_reply(verdict: MilterVerdict) -> Reply:
    """The reply a milter's reject or tempfail gives the client."""
    assert verdict.code is not None
    return Reply(verdict.code, verdict.enhanced or "", verdict.text or "")


def _bare(address: str) -> str:
    """An address a milter gave (``<a@b>`` or ``a@b``) without its angle brackets."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address
