"""The MTA side of the milter protocol on asyncio: every configured milter, in order.

Theory of operation (Postfix ``src/milter/milter.c`` and ``milter8.c``, step by step):

1. :class:`Milters` is built once per configuration generation; each SMTP session gets a
   :class:`MilterSession` (``Milters.session()``), which opens its own connection to
   every milter at :meth:`MilterSession.connect`, as Postfix does (libmilter closes the
   socket when the SMTP client goes), negotiates (SMFIC_OPTNEG: protocol 6, every
   action, every event flag the version has) and reports the SMTP connection.
2. Each event goes to the milters in order; the first one that answers anything but
   "no news" ends the round and its answer is the :class:`Verdict`: later milters do not
   see that event (Postfix ``milter_*_event``: ``resp == 0`` loop). The macros of the
   stage (``milter_<stage>_macros``, or the list the milter asked for) go before each
   event, even one the milter asked not to get (SMFIP_NO*), but not for an event of a
   protocol version it does not speak or that it skipped (SMFIR_SKIP).
3. Each milter has Postfix's states: ``accept`` at CONNECT or HELO ends its part in the
   connection (its socket is closed); elsewhere it ends its part in the message (until
   :meth:`MilterSession.abort`). ``reject``/``tempfail``/a reply code at CONNECT or HELO
   stick: that milter answers every later event with them. ``discard`` is refused at
   CONNECT/HELO (a warning). ``quarantine`` (SMFIR_QUARANTINE) is kept and the milter's
   final reply still read; it stops the round like any answer.
4. Faults: a milter that cannot be reached, does not answer within its timeout
   (``connect_timeout``; ``command_timeout`` per reply to a connection or envelope event;
   ``content_timeout`` per reply during the message, restarted by SMFIR_PROGRESS), closes
   the connection or sends what the protocol does not allow is out for the rest of the
   SMTP session: its socket is closed and its ``default_action`` answers every later event
   (accept: no news; reject: ``550 5.5.0 Service unavailable``; tempfail: ``451 4.7.1
   Service unavailable - try again later``; quarantine: hold). A milter that breaks a rule
   about content (a malformed reply code, a body replacement mixed with other edits) gets
   ``451 4.3.5 Server configuration problem - try again later`` unless its default action
   is accept or quarantine. Each fault is logged as Postfix logs it
   (``milter inet:127.0.0.1:11332: can't read SMFIC_CONNECT reply packet header: ...``).
5. :meth:`MilterSession.message` sends the headers (a folded header's lines joined by LF,
   one leading space dropped unless SMFIP_HDR_LEADSPC), the end of headers, the body in
   65535-byte chunks and the end of message; the edits a milter asks for at the end are
   applied before the next milter sees the message (Postfix: "each milter sees the result
   of any changes made by a preceding milter").

Nothing here raises: every problem is a Verdict and a log line.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from smtpgate.config.milterconf import MilterConfig, MilterSpec
from smtpgate.errors import MilterProtocolError
from smtpgate.milter import edits, protocol
from smtpgate.milter.protocol import (
    Accept,
    AddHeader,
    AddRcpt,
    ChgFrom,
    ChgHeader,
    Continue,
    DelRcpt,
    Discard,
    InsHeader,
    MilterReply,
    OptNeg,
    Progress,
    Quarantine,
    Reject,
    ReplBody,
    ReplyCode,
    Shutdown,
    Skip,
    Tempfail,
)
from smtpgate.reply import Reply
from smtpgate.smtp.ports import NO_METRICS, Metrics
from smtpgate.smtp.store import Message


class WarningLog(Protocol):
    """Where fault lines go: a ``logging.Logger`` or smtpgate's MailLog."""

    def warning(self, msg: str, /) -> None: ...


@dataclass(frozen=True)
class Verdict:
    """What the milters decided about one event.

    ``action`` is ``continue`` (no news), ``accept`` (no news, and no milter wants more
    of this transaction), ``reject``/``tempfail`` (``code enhanced text`` is the reply to
    give, Postfix's text or the milter's own; ``disconnect`` for a 421), ``discard`` or
    ``quarantine`` (hold the message: ``reason`` is the milter's text).
    """

    action: str = "continue"
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    milter: str = ""
    reason: str = ""
    disconnect: bool = False
    """True for 421 (SMFIR_SHUTDOWN or a milter's own 421 reply): close the session."""

    @property
    def is_reply(self) -> bool:
        return self.code is not None

    def reply(self) -> Reply | None:
        """The SMTP reply to give (multi-line when ``text`` has newlines); None if none."""
        if self.code is None:
            return None
        return Reply(self.code, self.enhanced or "", self.text or "", self.disconnect)

    @property
    def log_text(self) -> str:
        """What Postfix logs after ``milter-reject: EVENT from ...:`` for this verdict:
        the reply for reject/tempfail, else Postfix's words."""
        if self.action == "quarantine":
            return "milter triggers HOLD action"
        if self.action == "discard":
            return "milter triggers DISCARD action"
        reply = self.reply()
        return str(reply).replace("\n", "\r\n") if reply else ""


CONTINUE = Verdict()
ACCEPT = Verdict("accept")


@dataclass
class MessageResult:
    """The end of the message: the verdict, the message after the milters' header and
    body edits, and the envelope edits for the caller to make.

    Apply the envelope edits in this order: drop ``delete_recipients`` (each as the
    client gave it, compared exactly), then add ``add_recipients``.
    """

    verdict: Verdict
    content: bytes | Message
    sender: tuple[str, tuple[str, ...]] | None = None
    add_recipients: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    delete_recipients: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.sender is not None or self.add_recipients or self.delete_recipients)


# The replies Postfix makes for the milter's one-letter decisions.
REJECT_TEXT = ("550", "5.7.1", "Command rejected")
TEMPFAIL_TEXT = ("451", "4.7.1", "Service unavailable - try again later")
SHUTDOWN_TEXT = ("421", "4.7.0", "Server closing connection")
DEFAULT_REJECT_TEXT = ("550", "5.5.0", "Service unavailable")
CONFIG_ERROR_TEXT = ("451", "4.3.5", "Server configuration problem - try again later")


def _verdict(code: tuple[str, str, str], milter: str) -> Verdict:
    number = int(code[0])
    action = "reject" if number >= 500 else "tempfail"
    return Verdict(action, number, code[1], code[2], milter, disconnect=number == 421)


def parse_reply(text: str, milter: str = "") -> Verdict:
    """A milter's reply text (``550 5.7.1 text``, multi-line with CRLF) as a Verdict.

    The enhanced code of the first line is the Verdict's; each line keeps its own text.
    """
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
    code = int(lines[0][:3])
    enhanced = ""
    first = lines[0][4:]
    word = first.split(" ", 1)[0]
    if _is_enhanced(word, lines[0][0]):
        enhanced = word
    texts = []
    for line in lines:
        rest = line[4:]
        if enhanced and rest.split(" ", 1)[0] == enhanced:
            rest = rest[len(enhanced) + 1 :]
        texts.append(rest)
    action = "reject" if code >= 500 else "tempfail"
    return Verdict(action, code, enhanced or None, "\n".join(texts), milter, disconnect=code == 421)


def _is_enhanced(word: str, klass: str) -> bool:
    parts = word.split(".")
    return (
        len(parts) == 3
        and parts[0] == klass
        and all(p.isdigit() and 0 < len(p) <= 3 for p in parts)
    )


def valid_reply_code(text: str) -> bool:
    """Postfix's check of an SMFIR_REPLYCODE: ``[45]dd`` then space or hyphen, and an
    enhanced code (when the text has one) of the same class."""
    return (
        len(text) >= 4
        and text[0] in "45"
        and text[1:3].isdigit()
        and text[3] in " -"
        and not (len(text) > 4 and text[4].isdigit() and text[4] != text[0])
    )


def unpercent(text: str) -> str:
    """Sendmail doubles ``%`` in replies (it uses them as formats): ``%%`` becomes ``%``
    and a lone ``%`` goes (Postfix milter8.c)."""
    out = []
    chars = iter(text)
    for ch in chars:
        if ch == "%":
            ch = next(chars, "")
        out.append(ch)
    return "".join(out)


class State(enum.Enum):
    """A milter's state within a session (milter8.c MILTER8_STAT_*)."""

    CLOSED = "closed"
    READY = "ready"
    ENVELOPE = "envelope"
    MESSAGE = "message"
    ACCEPT_CON = "accept connection"
    ACCEPT_MSG = "accept message"
    REJECT_CON = "reject connection"
    ERROR = "error"


MAX_REPLIES = 100_000
"""Replies (progress, edits) one event may get before the milter counts as broken (Postfix
has no bound: a milter could keep the SMTP session forever with SMFIR_PROGRESS)."""
_STOPPED = (State.ERROR, State.ACCEPT_CON, State.REJECT_CON)
_CONNECT_EVENTS = (protocol.SMFIC_CONNECT, protocol.SMFIC_HELO)
_EDITS = (AddHeader, InsHeader, ChgHeader, ReplBody, AddRcpt, DelRcpt, ChgFrom)
_STAGE_OF_SMFIM = {
    protocol.SMFIM_CONNECT: "connect",
    protocol.SMFIM_HELO: "helo",
    protocol.SMFIM_ENVFROM: "mail",
    protocol.SMFIM_ENVRCPT: "rcpt",
    protocol.SMFIM_DATA: "data",
    protocol.SMFIM_EOM: "end_of_data",
    protocol.SMFIM_EOH: "end_of_header",
}
_FAMILIES = {
    "4": protocol.SMFIA_INET,
    "inet": protocol.SMFIA_INET,
    "ipv4": protocol.SMFIA_INET,
    "6": protocol.SMFIA_INET6,
    "inet6": protocol.SMFIA_INET6,
    "ipv6": protocol.SMFIA_INET6,
    "l": protocol.SMFIA_UNIX,
    "unix": protocol.SMFIA_UNIX,
    "u": protocol.SMFIA_UNKNOWN,
    "unknown": protocol.SMFIA_UNKNOWN,
}


class _Fault(Exception):
    """One milter failed: the text is the warning to log (after ``milter NAME:``)."""

    def __init__(self, text: str, config: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.config = config


def _strerror(exc: BaseException | None) -> str:
    """What Postfix's %m prints for this failure."""
    if exc is None:
        return "Application error"  # end of file: Postfix prints errno 0 so (vbuf_print.c)
    if isinstance(exc, TimeoutError):
        return os.strerror(errno.ETIMEDOUT)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


@dataclass
class _MessageWork:
    """One milter's view of the message while it goes through the milters."""

    message: edits.Message
    envelope: edits.EnvelopeEdits
    edited: bool = False
    rest: Message | None = None  # the body beyond ``message.body``, still in the store

    def body_chunks(self, size: int) -> Iterator[bytes]:
        """The body as a milter receives it (every line ended with CRLF), in pieces of
        ``size`` bytes (the last may be shorter): ``message.body``, then the rest."""
        buffer = bytearray()
        last = 0
        pieces: Iterable[bytes] = (self.message.body,)
        if self.rest is not None:
            pieces = itertools.chain(pieces, self.rest)
        for piece in pieces:
            if not piece:
                continue
            last = piece[-1]
            buffer += piece
            while len(buffer) >= size:
                yield bytes(buffer[:size])
                del buffer[:size]
        if last and last != 0x0A:
            buffer += b"\r\n"
        if buffer:
            yield bytes(buffer)

    def result(self, original: bytes | Message) -> bytes | Message:
        """The message after the edits: ``original`` when there were none."""
        if not self.edited:
            return original
        head = self.message.render()
        if isinstance(original, bytes):
            return head
        if self.rest is None:
            return Message(head)
        return Message(head, self.rest.store, self.rest.offset)


class _Milter:
    """One milter within one SMTP session (milter8.c's MILTER8)."""

    def __init__(self, spec: MilterSpec, session: MilterSession) -> None:
        self.spec = spec
        self.name = spec.name
        self.session = session
        self.state = State.CLOSED
        self.def_reply: Verdict | None = None
        self.skip_event: bytes = b""
        self.version = 0
        self.actions = 0
        self.events = 0
        self.np_mask = 0
        self.macro_lists: dict[str, tuple[str, ...]] = {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = protocol.Decoder()
        self.timeout = spec.command_timeout

    # -- faults --------------------------------------------------------------------------

    def warn(self, text: str) -> None:
        self.session.log.warning(f"milter {self.name}: {text}")

    def _drop(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            try:
                writer.transport.abort()
            except Exception:
                pass

    def comm_error(self) -> Verdict | None:
        """milter8_comm_error: out for the session, default_action from now on."""
        return self._out_for_session(DEFAULT_REJECT_TEXT, TEMPFAIL_TEXT)

    def conf_error(self) -> Verdict | None:
        """milter8_conf_error: as comm_error, but 451 4.3.5 unless accept/quarantine."""
        return self._out_for_session(CONFIG_ERROR_TEXT, CONFIG_ERROR_TEXT)

    def _out_for_session(
        self, reject: tuple[str, str, str], tempfail: tuple[str, str, str]
    ) -> Verdict | None:
        self._drop()
        action = self.spec.default_action
        reply: Verdict | None
        if action == "accept":
            reply = None
        elif action == "quarantine":
            reply = Verdict("quarantine", milter=self.name, reason="milter default_action")
        else:
            reply = _verdict(reject if action == "reject" else tempfail, self.name)
        self.def_reply = reply
        self.state = State.ERROR
        return reply

    def fault(self, exc: _Fault) -> Verdict | None:
        self.warn(exc.text)
        return self.conf_error() if exc.config else self.comm_error()

    # -- I/O -----------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        writer = self.writer
        if writer is None or writer.is_closing():
            raise _Fault(f"error writing command: {os.strerror(errno.EPIPE)}")
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (OSError, TimeoutError) as exc:
            raise _Fault(f"error writing command: {_strerror(exc)}") from None

    async def read_reply(self, event: bytes) -> MilterReply:
        """One reply packet, within ``self.timeout``."""
        reader = self.reader
        try:
            while True:
                reply = self.decoder.next()
                if reply is not None:
                    return reply
                if reader is None:
                    raise EOFError
                chunk = await asyncio.wait_for(reader.read(65536), self.timeout)
                if not chunk:
                    raise EOFError
                self.decoder.feed(chunk)
        except MilterProtocolError as exc:
            raise _Fault(str(exc)) from None
        except (EOFError, OSError, TimeoutError) as exc:
            cause = None if isinstance(exc, EOFError) else exc
            raise _Fault(self._read_failure(event, _strerror(cause))) from None

    def _read_failure(self, event: bytes, why: str) -> str:
        have = self.decoder.buffered
        if have < 4:
            name = protocol.COMMAND_NAMES.get(event, "(unknown MTA event)")
            return f"can't read {name} reply packet header: {why}"
        if have == 4:
            return f"EOF while reading command code: {why}"
        return f"EOF while reading data: {why}"

    # -- negotiation ---------------------------------------------------------------------

    async def open(self) -> None:
        """milter8_connect: connect and negotiate; a failure is a comm_error."""
        spec = self.spec
        offered = protocol.PROTOCOL_EVENT_MASKS[spec.version]
        if spec.no_header_reply:
            offered |= protocol.SMFIP_NR_HDR
        self.np_mask = protocol.SMFIP_NOSEND_MASK & ~offered
        try:
            if spec.transport == "unix":
                opening = asyncio.open_unix_connection(spec.path)
            else:
                opening = asyncio.open_connection(spec.host, spec.port)
            self.reader, self.writer = await asyncio.wait_for(opening, spec.connect_timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            self.session.log.warning(f"connect to Milter service {self.name}: {_strerror(exc)}")
            self.comm_error()
            return
        self.timeout = spec.command_timeout
        try:
            try:
                await self.write(protocol.optneg(spec.version, protocol.MTA_ACTIONS, offered))
            except _Fault as exc:
                self.warn(exc.text)
                raise _Fault("write error in initial handshake") from None
            try:
                reply = await self.read_reply(protocol.SMFIC_OPTNEG)
            except _Fault as exc:
                self.warn(exc.text)
                raise _Fault("read error in initial handshake") from None
            self._negotiated(reply, spec.version)
        except _Fault as exc:
            self.fault(exc)
            return
        except Exception as exc:  # a bug here must not end the SMTP session
            self.fault(_Fault(f"internal error: {exc!r}"))
            return
        self.state = State.READY
        self.def_reply = None
        self.skip_event = b""

    def _negotiated(self, reply: MilterReply, my_version: int) -> None:
        if not isinstance(reply, OptNeg):
            letter = _reply_code(reply).decode("latin-1")
            raise _Fault(f'unexpected reply "{letter}" in initial handshake')
        if reply.version > my_version:
            raise _Fault(
                f"protocol version {reply.version} conflict with MTA protocol version {my_version}"
            )
        if reply.actions & protocol.MTA_ACTIONS != reply.actions:
            raise _Fault(
                f"request mask 0x{reply.actions:x} conflict with MTA request mask "
                f"0x{protocol.MTA_ACTIONS:x}"
            )
        self.version, self.actions, self.events = reply.version, reply.actions, reply.protocol
        if reply.version < my_version:
            for version, mask in protocol.PROTOCOL_EVENT_MASKS.items():
                if version <= reply.version:
                    self.np_mask |= protocol.SMFIP_NOSEND_MASK & ~mask
                    break
            else:
                self.warn(f"unexpected protocol version {reply.version}")
        for stage in reply.unknown_stages:
            self.warn(f"ignoring unknown macro type {stage}")
        self.macro_lists = {
            _STAGE_OF_SMFIM[number]: tuple(names.replace(",", " ").split())
            for number, names in reply.macros.items()
        }

    # -- events --------------------------------------------------------------------------

    def macro_names(self, stage: str) -> tuple[str, ...]:
        own = self.macro_lists.get(stage)
        return own if own else self.session.config.macros.get(stage, ())

    def wants(self, flag: int) -> bool:
        return not self.events & flag

    async def event(
        self,
        event: bytes,
        skip_flag: int,
        no_reply_flag: int,
        stage: str,
        payload: bytes,
        work: _MessageWork | None = None,
    ) -> Verdict | None:
        """milter8_event: macros, the event, the reply or replies."""
        if self.writer is None or self.def_reply is not None:
            return self.def_reply
        if skip_flag & self.np_mask:
            return self.def_reply
        if self.skip_event:
            if event == self.skip_event:
                return self.def_reply
            self.skip_event = b""
        try:
            pairs = self.session.macro_pairs(self.macro_names(stage))
            await self.write(protocol.macro(event, pairs))
            if skip_flag & self.events:
                return self.def_reply
            await self.write(payload)
            if no_reply_flag and self.events & no_reply_flag:
                return self.def_reply
            return await self._replies(event, work)
        except _Fault as exc:
            return self.fault(exc)
        except Exception as exc:  # a bug here must not end the SMTP session
            return self.fault(_Fault(f"internal error: {exc!r}"))

    async def _replies(self, event: bytes, work: _MessageWork | None) -> Verdict | None:
        """Replies until a decision; at the end of the message the edits before it."""
        body: list[bytes] | None = None
        body_size = 0
        body_locked = False
        for _ in range(MAX_REPLIES):
            reply = await self.read_reply(event)
            if body is not None and not isinstance(reply, ReplBody):
                self._replace_body(work, body)
                body, body_locked = None, True
            if isinstance(reply, Progress):
                continue
            if isinstance(reply, Quarantine):
                self.def_reply = Verdict("quarantine", milter=self.name, reason=reply.reason)
                continue
            if event == protocol.SMFIC_BODYEOB and work is not None and isinstance(reply, _EDITS):
                if not isinstance(reply, ReplBody):
                    self._edit(work, reply)
                    continue
                if body_locked:
                    raise _Fault(
                        "body replacement requests can't currently be mixed with other requests",
                        config=True,
                    )
                body_size += len(reply.chunk)
                if body_size > protocol.MAX_PACKET:
                    raise _Fault(
                        f"body replacement larger than {protocol.MAX_PACKET} bytes", config=True
                    )
                body = [] if body is None else body
                body.append(reply.chunk)
                continue
            return self._final(event, reply)
        raise _Fault(f"more than {MAX_REPLIES} replies to one event")

    def _final(self, event: bytes, reply: MilterReply) -> Verdict | None:
        """A reply that ends the event: continue, accept, discard, skip or a decision."""
        if isinstance(reply, Continue):
            return self.def_reply
        if isinstance(reply, Accept):
            if event in _CONNECT_EVENTS:
                self._drop()
                self.state = State.ACCEPT_CON
            else:
                self.state = State.ACCEPT_MSG
            return self.def_reply
        if isinstance(reply, Discard):
            if event in _CONNECT_EVENTS:
                self.warn("DISCARD action is not allowed for connect or helo")
                return self.def_reply
            self.state = State.ACCEPT_MSG
            return Verdict("discard", milter=self.name)
        if isinstance(reply, Skip):
            self.skip_event = event
            return self.def_reply
        if isinstance(reply, (Reject, Tempfail, Shutdown, ReplyCode)):
            return self._decision(event, reply)
        raise _Fault(self._unexpected(reply, event))

    def _unexpected(self, reply: MilterReply, event: bytes) -> str:
        name = reply.name if isinstance(reply, protocol.Unknown) else _reply_name(reply)
        event_name = protocol.COMMAND_NAMES.get(event, "(unknown MTA event)")
        return f"unexpected filter response {name} after event {event_name}"

    def _decision(self, event: bytes, reply: MilterReply) -> Verdict | None:
        if isinstance(reply, Reject):
            verdict = _verdict(REJECT_TEXT, self.name)
        elif isinstance(reply, Tempfail):
            verdict = _verdict(TEMPFAIL_TEXT, self.name)
        elif isinstance(reply, Shutdown):
            self._drop()
            self.state = State.REJECT_CON
            self.def_reply = _verdict(SHUTDOWN_TEXT, self.name)
            return self.def_reply
        else:
            assert isinstance(reply, ReplyCode)
            if not valid_reply_code(reply.text):
                raise _Fault(f"malformed reply: {reply.text}", config=True)
            verdict = parse_reply(unpercent(reply.text), self.name)
        if event in _CONNECT_EVENTS:
            self._drop()
            self.state = State.REJECT_CON
            self.def_reply = verdict
        return verdict

    def _space(self) -> bytes:
        return b"" if self.events & protocol.SMFIP_HDR_LEADSPC else b" "

    def _edit(self, work: _MessageWork, reply: MilterReply) -> None:
        if isinstance(reply, (AddRcpt, DelRcpt, ChgFrom)):
            work.envelope.apply(reply, self.session.log.warning, self.session.queue_id)
            return
        assert isinstance(reply, (AddHeader, InsHeader, ChgHeader))
        if isinstance(reply, ChgHeader) and not reply.name:
            raise _Fault("null change header name", config=True)
        if not edits.valid_header_name(reply.name):
            self.warn(f"ignoring header edit with a bad header name: {reply.name!r}")
            return
        work.message = edits.apply_header_edit(work.message, reply, self._space())
        work.edited = True

    def _replace_body(self, work: _MessageWork | None, pieces: list[bytes]) -> None:
        if work is not None:
            work.message = edits.replace_body(work.message, b"".join(pieces))
            work.rest = None
            work.edited = True

    # -- the message ---------------------------------------------------------------------

    async def message(self, work: _MessageWork) -> Verdict | None:
        """milter8_message: headers, end of headers, body chunks, end of message."""
        if self.state != State.ENVELOPE:
            return self.def_reply
        saved_reply, saved_skip = self.def_reply, self.skip_event
        self.state = State.MESSAGE
        self.timeout = self.spec.content_timeout
        try:
            verdict = await self._content(work)
        finally:
            self.timeout = self.spec.command_timeout
        if self.state in (State.MESSAGE, State.ACCEPT_MSG):
            # The message's changes of state end with it (in Postfix they happen in the
            # cleanup server's copy of the milter).
            self.state = State.ENVELOPE
            self.def_reply, self.skip_event = saved_reply, saved_skip
        return verdict

    def _done(self, verdict: Verdict | None) -> bool:
        return self.state != State.MESSAGE or verdict is not None

    async def _content(self, work: _MessageWork) -> Verdict | None:
        leading_space = bool(self.events & protocol.SMFIP_HDR_LEADSPC)
        verdict: Verdict | None = None
        if self.wants(protocol.SMFIP_NOHDRS):
            for header in work.message.visible_headers():
                verdict = await self.event(
                    protocol.SMFIC_HEADER,
                    protocol.SMFIP_NOHDRS,
                    protocol.SMFIP_NR_HDR,
                    "end_of_header",
                    protocol.header(header.name, header.milter_value(leading_space)),
                )
                if self._done(verdict):
                    return verdict
        if self.wants(protocol.SMFIP_NOEOH):
            verdict = await self.event(
                protocol.SMFIC_EOH,
                protocol.SMFIP_NOEOH,
                protocol.SMFIP_NR_EOH,
                "end_of_header",
                protocol.eoh(),
            )
            if self._done(verdict):
                return verdict
        if self.wants(protocol.SMFIP_NOBODY):
            for chunk in work.body_chunks(protocol.CHUNK_SIZE):
                verdict = await self.event(
                    protocol.SMFIC_BODY,
                    protocol.SMFIP_NOBODY,
                    protocol.SMFIP_NR_BODY,
                    "end_of_data",
                    protocol.body(chunk),
                )
                if self._done(verdict):
                    return verdict
        return await self.event(
            protocol.SMFIC_BODYEOB, 0, 0, "end_of_data", protocol.bodyeob(), work
        )

    # -- the end -------------------------------------------------------------------------

    async def abort(self) -> None:
        """milter8_abort: SMFIC_ABORT, back to the envelope state."""
        if self.state not in (State.ENVELOPE, State.MESSAGE, State.ACCEPT_MSG):
            return
        try:
            await self.write(protocol.abort())
        except _Fault as exc:
            self.fault(exc)
            return
        self.state = State.ENVELOPE

    async def quit(self) -> None:
        """milter8_disc_event: SMFIC_QUIT where the socket is still open, then close."""
        if self.state in (State.ENVELOPE, State.MESSAGE, State.ACCEPT_MSG):
            try:
                await self.write(protocol.quit())
            except _Fault:
                pass  # Postfix ignores the result of the last write too
        writer = self.writer
        self.writer = self.reader = None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, TimeoutError):
                pass
        self.state = State.CLOSED
        self.def_reply = None

    @property
    def done_with_transaction(self) -> bool:
        """No more events of this transaction will reach this milter."""
        return self.writer is None or self.state in (*_STOPPED, State.ACCEPT_MSG, State.CLOSED)


def _reply_code(reply: MilterReply) -> bytes:
    """The command byte a decoded reply came as."""
    if isinstance(reply, protocol.Unknown):
        return reply.code
    if isinstance(reply, AddRcpt):
        return protocol.SMFIR_ADDRCPT_PAR if reply.with_args else protocol.SMFIR_ADDRCPT
    if isinstance(reply, OptNeg):
        return protocol.SMFIC_OPTNEG
    codes: dict[type, bytes] = {
        Continue: protocol.SMFIR_CONTINUE,
        Accept: protocol.SMFIR_ACCEPT,
        Reject: protocol.SMFIR_REJECT,
        Tempfail: protocol.SMFIR_TEMPFAIL,
        Discard: protocol.SMFIR_DISCARD,
        Shutdown: protocol.SMFIR_SHUTDOWN,
        Progress: protocol.SMFIR_PROGRESS,
        Skip: protocol.SMFIR_SKIP,
        ReplyCode: protocol.SMFIR_REPLYCODE,
        Quarantine: protocol.SMFIR_QUARANTINE,
        AddHeader: protocol.SMFIR_ADDHEADER,
        InsHeader: protocol.SMFIR_INSHEADER,
        ChgHeader: protocol.SMFIR_CHGHEADER,
        ReplBody: protocol.SMFIR_REPLBODY,
        DelRcpt: protocol.SMFIR_DELRCPT,
        ChgFrom: protocol.SMFIR_CHGFROM,
    }
    return codes[type(reply)]


def _reply_name(reply: MilterReply) -> str:
    return protocol.REPLY_NAMES.get(_reply_code(reply), "(unknown filter reply)")


def _canonical(name: str) -> str:
    return name if name.startswith("{") else "{" + name + "}"


class MilterSession:
    """The milters of one SMTP session, in order (Postfix's MILTERS for one smtpd client).

    Call :meth:`connect` first and :meth:`close` last. Every method returns a
    :class:`Verdict`; none raises.
    """

    def __init__(self, config: MilterConfig, log: WarningLog) -> None:
        self.config = config
        self.log = log
        self.milters = [_Milter(spec, self) for spec in config.milters]
        self.metrics: Metrics = NO_METRICS
        self._macros: Mapping[str, str] = {}
        self._overrides: dict[str, str] = {}
        self.queue_id = ""
        self._helo_seen = False

    # -- macros --------------------------------------------------------------------------

    def _use(self, macros: Mapping[str, str], **overrides: str) -> None:
        """The caller's macros for this event: looked up only when a list names them (the
        mapping may compute each value lazily, as Postfix's smtpd_milter_eval does)."""
        self._macros = macros
        self._overrides = {_canonical(k): v for k, v in overrides.items()}
        queue_id = self._lookup("{i}")
        if queue_id:
            self.queue_id = queue_id

    def _lookup(self, key: str) -> str | None:
        """The value of ``{name}`` (asked for as ``{name}``, or ``name`` for one letter)."""
        if key in self._overrides:
            return self._overrides[key]
        bare = key[1:-1]
        for name in (key, bare) if len(bare) != 1 else (bare, key):
            try:
                value = self._macros.get(name)
            except Exception:  # a lazy value that fails is a macro without a value
                value = None
            if value is not None:
                return value
        return None

    def macro_pairs(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """(name as listed, value) for each listed macro that has a value (milter.c
        milter_macro_lookup: the session's value, else milter_macro_defaults);
        ``{daemon_name}`` and ``v`` are the configuration's when it has them."""
        pairs = []
        for name in names:
            key = _canonical(name)
            value: str | None = None
            if key == "{daemon_name}":
                value = self.config.daemon_name or None
            elif key == "{v}":
                value = self.config.v or None
            if value is None:
                value = self._lookup(key)
            if value is None:
                value = self.config.macro_defaults.get(key)
            if value is not None:
                pairs.append((name, value))
        return pairs

    # -- rounds --------------------------------------------------------------------------

    def _finish(self, verdict: Verdict | None) -> Verdict:
        if verdict is not None:
            return verdict
        if self.milters and all(m.done_with_transaction for m in self.milters):
            return ACCEPT
        return CONTINUE

    async def _round(
        self,
        event: bytes,
        skip_flag: int,
        no_reply_flag: int,
        stage: str,
        payload: bytes,
        only: int = 0,
    ) -> Verdict:
        for milter in self.milters:
            if only and not milter.events & only:
                continue
            if milter.state == State.CLOSED and milter.def_reply is None:
                continue  # never connected: connect() was not called
            verdict = await self._one(milter, event, skip_flag, no_reply_flag, stage, payload)
            if verdict is not None:
                return verdict
        return self._finish(None)

    async def _one(
        self,
        milter: _Milter,
        event: bytes,
        skip_flag: int,
        no_reply_flag: int,
        stage: str,
        payload: bytes,
    ) -> Verdict | None:
        if milter.state in _STOPPED:
            return milter.def_reply
        if milter.state == State.ACCEPT_MSG and event != protocol.SMFIC_HELO:
            return milter.def_reply
        start = time.monotonic()
        verdict = await milter.event(event, skip_flag, no_reply_flag, stage, payload)
        self.metrics.milter_reply(milter.name, stage, time.monotonic() - start)
        return verdict

    # -- the API -------------------------------------------------------------------------

    async def connect(
        self,
        macros: Mapping[str, str],
        hostname: str,
        address: str | None,
        port: int | None,
        family: str,
    ) -> Verdict:
        """Open every milter and report the connection (SMFIC_CONNECT).

        ``hostname`` is the client's verified name or ``unknown`` (sent as ``[address]``
        then, as Postfix does); ``family`` is ``inet``/``4``, ``inet6``/``6``,
        ``unix``/``L`` or ``unknown``/``U``.
        """
        self._use(macros)
        smfia = _FAMILIES.get(family.lower(), protocol.SMFIA_UNKNOWN)
        if address is None:
            smfia = protocol.SMFIA_UNKNOWN
        name = hostname
        if hostname == "unknown" and address and address != "unknown":
            name = f"[{address}]"
        number = port or 0
        if smfia == protocol.SMFIA_UNIX:
            number = 0
        if not 0 <= number <= 65535:
            number = 0
        payload = protocol.connect(name, smfia, number, address or "")
        for milter in self.milters:
            start = time.monotonic()  # the connect event's time includes opening the milter
            if milter.state == State.CLOSED:
                await milter.open()
            if milter.state == State.READY:
                milter.state = State.ENVELOPE
                verdict = await milter.event(
                    protocol.SMFIC_CONNECT,
                    protocol.SMFIP_NOCONNECT,
                    protocol.SMFIP_NR_CONN,
                    "connect",
                    payload,
                )
                self.metrics.milter_reply(milter.name, "connect", time.monotonic() - start)
            else:
                verdict = milter.def_reply
            if verdict is not None:
                return verdict
        return self._finish(None)

    async def helo(self, macros: Mapping[str, str], name: str) -> Verdict:
        """HELO or EHLO (SMFIC_HELO); after a repeated one, SMFIC_ABORT as well (Postfix's
        helo_cmd reports the HELO, then helo_reset aborts)."""
        self._use(macros)
        verdict = await self._round(
            protocol.SMFIC_HELO,
            protocol.SMFIP_NOHELO,
            protocol.SMFIP_NR_HELO,
            "helo",
            protocol.helo(name),
        )
        await self.reset_helo()
        self._helo_seen = True
        return verdict

    async def reset_helo(self) -> None:
        """The client's HELO is forgotten (STARTTLS; a repeated HELO/EHLO and the end of
        the session do it themselves): SMFIC_ABORT when there was one (helo_reset)."""
        if self._helo_seen:
            self._helo_seen = False
            await self.abort()

    async def mail(self, macros: Mapping[str, str], sender: str, params: Sequence[str]) -> Verdict:
        """MAIL FROM (SMFIC_MAIL): ``sender`` as the client wrote it inside ``<>``."""
        self._use(macros)
        for milter in self.milters:
            if milter.state == State.ACCEPT_MSG:
                await milter.abort()  # a transaction the caller did not end
        return await self._round(
            protocol.SMFIC_MAIL,
            protocol.SMFIP_NOMAIL,
            protocol.SMFIP_NR_MAIL,
            "mail",
            protocol.mail([f"<{sender}>", *params]),
        )

    async def rcpt(
        self,
        macros: Mapping[str, str],
        recipient: str,
        params: Sequence[str],
        *,
        rejected: str | None = None,
    ) -> Verdict:
        """RCPT TO (SMFIC_RCPT); a reject or tempfail is this recipient's reply only.

        ``rejected``: smtpgate already refused this recipient with that reply
        (``554 5.7.1 <a@b>: Relay access denied``); only the milters that asked for
        rejected recipients (SMFIP_RCPT_REJ) see it, with ``{rcpt_mailer}`` = error,
        ``{rcpt_host}`` = the enhanced code and ``{rcpt_addr}`` = the text, and their
        answer changes nothing.
        """
        payload = protocol.rcpt([f"<{recipient}>", *params])
        if rejected is None:
            self._use(macros)
            return await self._round(
                protocol.SMFIC_RCPT, protocol.SMFIP_NORCPT, protocol.SMFIP_NR_RCPT, "rcpt", payload
            )
        words = rejected[4:].split(" ", 1)
        self._use(
            macros,
            rcpt_mailer="error",
            rcpt_host=words[0],
            rcpt_addr=words[1] if len(words) > 1 else "",
        )
        await self._round(
            protocol.SMFIC_RCPT,
            protocol.SMFIP_NORCPT,
            protocol.SMFIP_NR_RCPT,
            "rcpt",
            payload,
            only=protocol.SMFIP_RCPT_REJ,
        )
        return CONTINUE

    async def data(self, macros: Mapping[str, str]) -> Verdict:
        """DATA or the first BDAT (SMFIC_DATA)."""
        self._use(macros)
        return await self._round(
            protocol.SMFIC_DATA,
            protocol.SMFIP_NODATA,
            protocol.SMFIP_NR_DATA,
            "data",
            protocol.data(),
        )

    async def unknown(self, macros: Mapping[str, str], command: str) -> Verdict:
        """An unknown SMTP command (SMFIC_UNKNOWN); Postfix sends its first word only."""
        self._use(macros)
        return await self._round(
            protocol.SMFIC_UNKNOWN,
            protocol.SMFIP_NOUNKNOWN,
            protocol.SMFIP_NR_UNKN,
            "unknown_command",
            protocol.unknown(command),
        )

    def other(self) -> Verdict:
        """The standing answer for a command with no milter event (VRFY, ETRN, AUTH,
        STARTTLS): Postfix's milter_other_event, a fault's or a connect reject's reply."""
        for milter in self.milters:
            if milter.def_reply is not None:
                return milter.def_reply
        return CONTINUE

    async def message(
        self, macros: Mapping[str, str], content: bytes | Message, *, hidden_headers: int = 0
    ) -> MessageResult:
        """The message through every milter in order, edits applied between them.

        ``content``: headers and body, lines ending in CRLF, dots unstuffed: bytes, or a
        :class:`~smtpgate.smtp.store.Message` whose header block is read into memory
        (bounded) and whose body is read from its store for each milter.  Its first
        ``hidden_headers`` headers are smtpgate's own (its ``Received:``): milters do not
        see them, and they count for an insertion's position only (as in Postfix).  The
        result's content is of the same kind: bytes for bytes; for a message, the edited
        header block followed by the stored body, or by a milter's replacement body.
        """
        self._use(macros)
        if isinstance(content, Message):
            head, rest = content.split_head()
            work = _MessageWork(edits.parse(head, hidden_headers), edits.EnvelopeEdits(), rest=rest)
        else:
            work = _MessageWork(edits.parse(content, hidden_headers), edits.EnvelopeEdits())
        verdict: Verdict | None = None
        for milter in self.milters:
            if milter.state in _STOPPED or milter.state == State.ACCEPT_MSG:
                verdict = milter.def_reply
            elif milter.state == State.ENVELOPE:
                start = time.monotonic()
                verdict = await milter.message(work)
                self.metrics.milter_reply(milter.name, "eom", time.monotonic() - start)
            if verdict is not None:
                break
        return MessageResult(
            verdict=self._finish(verdict),
            content=work.result(content),
            sender=work.envelope.sender,
            add_recipients=work.envelope.add_recipients,
            delete_recipients=work.envelope.delete_recipients,
        )

    async def abort(self) -> None:
        """The end of a transaction begun with :meth:`mail` (after the message, RSET, a
        refused MAIL or RCPT-less DATA, QUIT: Postfix's mail_reset): SMFIC_ABORT to every
        milter that is in the envelope or message state."""
        for milter in self.milters:
            await milter.abort()

    async def close(self) -> None:
        """The client is gone: SMFIC_ABORT if there was a HELO (helo_reset), SMFIC_QUIT to
        every milter still listening, sockets closed. Redundant calls do nothing."""
        await self.reset_helo()
        for milter in self.milters:
            await milter.quit()

    @property
    def wants_message(self) -> bool:
        """Some milter still wants this transaction's message (else :meth:`message`
        would only return ``accept`` or a standing reply)."""
        return any(not m.done_with_transaction for m in self.milters)


class Milters:
    """The configured milters; one :class:`MilterSession` per SMTP session."""

    def __init__(self, config: MilterConfig | None = None, log: WarningLog | None = None) -> None:
        self.config = config or MilterConfig()
        self.log: WarningLog = log or logging.getLogger("smtpgate.milter")
        self.metrics: Metrics = NO_METRICS
        """Told how long each milter took per event (set in a worker)."""

    def session(self, log: WarningLog | None = None) -> MilterSession:
        session = MilterSession(self.config, log or self.log)
        session.metrics = self.metrics
        return session

    def __bool__(self) -> bool:
        return bool(self.config.milters)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.config.milters)
