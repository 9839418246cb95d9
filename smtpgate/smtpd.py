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
import logging
import re
import ssl
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, NamedTuple

from aiosmtpd.smtp import SMTP

from smtpgate.config import Settings
from smtpgate.logs import MailLog, new_queue_id
from smtpgate.policy.model import ClientInfo, Decision, Stage
from smtpgate.policy.plan import Plan
from smtpgate.policy.session import PolicySession
from smtpgate.relay import ClientFacts, Relay, Transaction
from smtpgate.reply import R451_LOCAL_ERROR, Reply
from smtpgate.tables import AddressList

log = logging.getLogger("smtpgate.smtpd")

OK = Reply(250, "2.0.0", "Ok")
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

# Postfix's order of the counters in the "disconnect from" line.
COUNTED = "helo ehlo starttls auth mail rcpt data bdat rset noop vrfy etrn quit unknown".split()
ALLOWED_BEFORE_TLS = {"HELO", "EHLO", "STARTTLS", "NOOP", "RSET", "QUIT"}
# smtpd_forbidden_commands default: CONNECT GET POST regexp:{{/^[^A-Z]/ Bogus}} (the
# regexp is case-insensitive), plus Postfix's own check for a message header line.
FORBIDDEN_VERBS = {"CONNECT", "GET", "POST"}
_HEADER_LIKE = re.compile(r"^[\x21-\x39\x3b-\x7e]+:")
_LETTER_FIRST = re.compile(r"^[A-Za-z]")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"^[0-9]+$")
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})+$")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
OFF_T_MAX = 2**63 - 1  # SIZE beyond this: Postfix's "file system imposed limit"
_END_OF_DATA = b"\r\n.\r\n"


@dataclass(frozen=True)
class GateConfig:
    """What the protocol needs from the settings, converted once per (re)load."""

    hostname: str
    banner: str
    mail_name: str
    size_limit: int
    line_limit: int
    timeout: float
    recipient_limit: int
    disable_vrfy: bool
    tls_context: ssl.SSLContext | None
    tls_required: bool
    bare_newline: str
    bare_newline_code: int
    bare_newline_exclusions: AddressList

    @classmethod
    def from_settings(cls, settings: Settings) -> GateConfig:
        level = (settings.get("smtpd_tls_security_level") or "").lower()
        cert = settings.get("smtpd_tls_cert_file") or ""
        context = None
        if level in ("may", "encrypt") and cert:
            context = server_tls_context(cert, settings.get("smtpd_tls_key_file") or cert)
        exclusions = AddressList.parse(
            settings.as_list("smtpd_forbid_bare_newline_exclusions"),
            base_dir=settings.config_directory,
            title="smtpd_forbid_bare_newline_exclusions",
        )
        return cls(
            hostname=settings["myhostname"],
            banner=settings["smtpd_banner"],
            mail_name=settings.get("mail_name") or "Postfix",
            size_limit=settings.as_int("message_size_limit"),
            line_limit=max(settings.as_int("line_length_limit"), 512),
            timeout=settings.as_time("smtpd_timeout"),
            recipient_limit=settings.as_int("smtpd_recipient_limit"),
            disable_vrfy=settings.as_bool("disable_vrfy_command"),
            tls_context=context,
            tls_required=level == "encrypt" and context is not None,
            bare_newline=(settings.get("smtpd_forbid_bare_newline") or "normalize").lower(),
            bare_newline_code=settings.as_int("smtpd_forbid_bare_newline_reject_code"),
            bare_newline_exclusions=exclusions,
        )


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2 or newer; no client certificate requested."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


@dataclass
class Shared:
    """State shared by every connection of one server: swapped whole on reload."""

    plan: Plan
    config: GateConfig
    relay: Relay
    maillog: MailLog
    sessions: set[GateProtocol] = field(default_factory=set)
    draining: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a session ends or finishes a command (the drain waits on it)."""


class _NoHooks:
    """aiosmtpd wants a handler object; every hook is handled in GateProtocol."""


@dataclass
class _Transaction:
    sender: str
    mail_params: list[str]
    recipients: list[str] = field(default_factory=list)
    relay: Transaction | None = None


class GateProtocol(SMTP):
    """One client connection."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.config = shared.config
        self.line_length_limit = self.config.line_limit + 2
        super().__init__(
            _NoHooks(),
            hostname=self.config.hostname,
            ident="",
            data_size_limit=None,
            enable_SMTPUTF8=True,
            tls_context=self.config.tls_context,
            timeout=10**9,  # smtpgate keeps its own timers (smtpd_timeout)
        )
        self.policy: PolicySession | None = None
        self.client: ClientInfo | None = None
        self.txn: _Transaction | None = None
        self.counts: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()
        self.esmtp = False
        self.tls_active = False
        self.closing = False
        self.busy = False

    # -- connection events ------------------------------------------------------------

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
        # Postfix's printable(): a control character in a reply (say, from an address the
        # client sent) goes out as a space.
        lines = (_UNPRINTABLE.sub(" ", line) for line in reply.lines())
        data = "".join(line + "\r\n" for line in lines).encode("utf-8", "replace")
        self._writer.write(data)

    async def _flush(self, force: bool = False) -> None:
        if self.closing:
            return
        if force or not self._reader._buffer:  # type: ignore[attr-defined]
            try:
                await self._writer.drain()
            except (ConnectionError, OSError):
                self.closing = True

    async def _send(self, reply: Reply) -> None:
        """Send a reply; a disconnecting reply is flushed and the connection closed."""
        self._write(reply)
        if reply.disconnect:
            await self._flush(force=True)
            self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # -- the command loop -------------------------------------------------------------

    async def _handle_client(self) -> None:
        shared = self.shared
        shared.sessions.add(self)
        client = _client_info(self.session.peer if self.session else None)
        self.client = client
        self.policy = PolicySession(shared.plan, client)
        shared.maillog.info(f"connect from {client.namaddr}")
        try:
            await self._greet()
            while not self.closing:
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
            self._log_disconnect()
            shared.sessions.discard(self)
            shared.changed.set()
            self._close()

    async def _greet(self) -> None:
        assert self.policy is not None
        decision = await self.policy.connect()
        self._log_decision(decision)
        if self.shared.draining:
            await self._send(
                Reply(421, "4.3.2", f"{self.config.hostname} Service shutting down", True)
            )
            return
        await self._send(decision.reply or Reply(220, "", self.config.banner))
        await self._flush(force=True)

    async def _read_command(self) -> bytes | None:
        try:
            line = await asyncio.wait_for(self._reader.readuntil(b"\n"), self.config.timeout)
        except TimeoutError:
            text = f"{self.config.hostname} Error: timeout exceeded"
            await self._send(Reply(421, "4.4.2", text, disconnect=True))
            self.shared.maillog.info(f"timeout after {self._last_command} from {self._namaddr}")
            return None
        except asyncio.LimitOverrunError as exc:
            # Postfix reads line_length_limit octets and skips the rest of the line.
            head = await self._reader.readexactly(exc.consumed)
            await self._skip_line()
            return head[: self.config.line_limit]
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return line

    async def _skip_line(self) -> None:
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)
            except (asyncio.IncompleteReadError, ConnectionError):
                return

    _last_command = "CONNECT"

    @property
    def _namaddr(self) -> str:
        return self.client.namaddr if self.client else "unknown[unknown]"

    async def _dispatch(self, raw: bytes) -> None:
        line = raw.rstrip(b"\n")
        bare_lf = not line.endswith(b"\r")
        line = line.rstrip(b"\r")
        if bare_lf and self._bare_newline_rejected():
            self.counts["unknown"] += 1
            await self._send(self._bare_newline_reply())
            return
        # Postfix handles the command as a C string: it ends at the first NUL.
        line = line.split(b"\0", 1)[0]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.counts["unknown"] += 1
            await self._send(BAD_UTF8)
            return
        tokens = smtpd_tokens(text)
        if not tokens:
            self.counts["unknown"] += 1
            await self._send(BAD_SYNTAX)
            return
        verb = tokens[0].text
        upper = verb.upper()
        self._last_command = upper
        if _forbidden(verb):
            self.shared.maillog.warning(f"non-SMTP command from {self._namaddr}: {text[:100]}")
            await self._send(FORBIDDEN)
            return
        handler = self._commands.get(upper)
        if handler is None:
            self.counts["unknown"] += 1
            await self._send(UNKNOWN_COMMAND)
            return
        name = handler.__name__.removeprefix("cmd_")
        self.counts[name] += 1
        if self.config.tls_required and not self.tls_active and upper not in ALLOWED_BEFORE_TLS:
            await self._send(NEED_STARTTLS)
            return
        assert self.policy is not None
        self.policy.state.input_pending = bool(self._reader._buffer)  # type: ignore[attr-defined]
        ok = await handler(self, tokens[1:])
        if ok:
            self.successes[name] += 1

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
        if self.config.tls_context is not None and not self.tls_active:
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
        if args[1].error:
            return await self._fail(BAD_SENDER)
        params = [t.text for t in args[2:]]
        problem, size = _check_mail_params(params)
        if problem is not None:
            return await self._fail(problem)
        address = parse_address(args[1].text, allow_empty=True)
        if address is None:
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
        await self._send(Reply(250, "2.1.0", "Ok"))
        return True

    async def cmd_rcpt(self, args: Args) -> bool:
        assert self.policy is not None
        if self.txn is None:
            return await self._fail(Reply(503, "5.5.1", "Error: need MAIL command"))
        if len(args) < 2 or args[0].text.lower() != "to:":
            return await self._fail(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        if args[1].error:
            return await self._fail(BAD_RECIPIENT)
        params = [t.text for t in args[2:]]
        problem = _check_rcpt_params(params)
        if problem is not None:
            return await self._fail(problem)
        address = parse_address(args[1].text, allow_empty=False)
        if address is None:
            return await self._fail(BAD_RECIPIENT)
        if len(self.txn.recipients) >= self.config.recipient_limit:
            return await self._fail(Reply(452, "4.5.3", "Error: too many recipients"))
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

    async def _relay_rcpt(self, address: str, params: list[str]) -> Reply:
        assert self.txn is not None and self.policy is not None and self.client is not None
        st = self.policy.state
        if st.queue_id is None:
            st.queue_id = new_queue_id()
            self.shared.maillog.info(f"{st.queue_id}: client={self.client.namaddr}")
        if st.discard:
            return Reply(250, "2.1.5", "Ok")
        if self.txn.relay is None:
            facts = ClientFacts(
                name=self.client.name,
                addr=self.client.address,
                port=self.client.port,
                proto=st.protocol,
                helo=st.helo_name,
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
        await self._send(DATA_GO_AHEAD)
        await self._flush(force=True)
        content = await self._read_data()
        if content is None:  # the client went away mid-DATA
            self.closing = True
            return False
        reply = await self._finish_data(content)
        await self._send(reply)
        return reply.code // 100 == 2

    async def _read_data(self) -> bytes | None:
        """Read up to CRLF.CRLF; pipelined input after it stays in the reader."""
        reader = self._reader
        data = bytearray(b"\r\n")
        searched = 0
        while True:
            end = data.find(_END_OF_DATA, searched)
            if end >= 0:
                rest = bytes(data[end + len(_END_OF_DATA) :])
                if rest:
                    reader._buffer[0:0] = rest  # type: ignore[attr-defined]
                return bytes(data[2 : end + 2])
            searched = max(len(data) - len(_END_OF_DATA) + 1, 0)
            try:
                chunk = await asyncio.wait_for(reader.read(65536), self.config.timeout)
            except TimeoutError:
                text = f"{self.config.hostname} Error: timeout exceeded"
                await self._send(Reply(421, "4.4.2", text, disconnect=True))
                return None
            except ConnectionError:
                return None
            if not chunk:
                return None
            data += chunk

    async def _finish_data(self, content: bytes) -> Reply:
        assert self.txn is not None and self.policy is not None and self.client is not None
        txn, st = self.txn, self.policy.state
        reply = self._check_content(content)
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
            await self._end_transaction(completed=True)
            return reply
        message = (
            self._received_header()
            + "".join(f"{h}\r\n" for h in st.prepend).encode("utf-8")
            + _crlf(content)
        )
        reply = await asyncio.shield(txn.relay.data(message))
        whatsup = "proxy-accept" if reply.code // 100 == 2 else "proxy-reject"
        self._log_proxy(whatsup, "END-OF-MESSAGE", reply)
        if getattr(txn.relay, "outcome_unknown", False):
            self.shared.maillog.warning(
                f"{st.queue_id}: backend connection lost after the end of data: "
                "the message may have been delivered; the client was told 451"
            )
        await self._end_transaction(completed=True)
        return reply

    def _check_content(self, content: bytes) -> Reply | None:
        if self.config.size_limit and len(content) > self.config.size_limit:
            return TOO_BIG
        if b"\x00" in content:
            return NUL_IN_DATA
        if self._bare_newline_rejected() and re.search(rb"(?<!\r)\n", content):
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
        proto = ("ESMTPS" if self.tls_active else "ESMTP") if self.esmtp else "SMTP"
        helo = st.helo_name or self.client.address
        lines = [
            f"Received: from {helo} ({self.client.name} [{self.client.address}])",
            f"\tby {self.config.hostname} (smtpgate) with {proto} id {st.queue_id}",
        ]
        date = formatdate(localtime=False, usegmt=False)
        if len(self.txn.recipients) == 1:
            lines.append(f"\tfor <{self.txn.recipients[0]}>; {date}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{date}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")

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
        if self.config.tls_context is None:
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
        parts.append(f"commands={total}" if ok == total else f"commands={ok}/{total}")
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


def smtpd_tokens(line: str) -> list[Token]:
    """Postfix's smtpd_token(): split a command line as smtpd does.

    White space separates words, except inside ``<...>`` (which nests) and ``"..."``;
    a backslash protects the next character; ``FROM:`` and ``TO:`` end a word, so
    ``MAIL FROM:<a@b>`` and ``mail from: a@b`` both give ``MAIL``, ``FROM:``, the address.
    """
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
    words = _address_words(s)
    if words is None:
        return None
    address = _join_words(words)
    if address is None:
        return None
    if address.startswith("@"):
        colon = address.find(":")
        if colon >= 0 and colon + 1 < len(address):
            address = address[colon + 1 :]
    elif "," in address:
        return None
    if address == "@" or not address and not allow_empty:
        return None
    return address


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


def _forbidden(verb: str) -> bool:
    """smtpd_forbidden_commands (its default) or a message header: reply 221 and close."""
    return (
        verb.upper() in FORBIDDEN_VERBS
        or not _LETTER_FIRST.match(verb)
        or bool(_HEADER_LIKE.match(verb))
    )


def _crlf(content: bytes) -> bytes:
    """Bare LF line ends become CRLF (smtpd_forbid_bare_newline = normalize)."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", content)
