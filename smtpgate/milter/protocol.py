"""The Sendmail milter protocol (version 6, as Postfix speaks it), without I/O.

Theory of operation (after Postfix ``src/milter/milter8.c``):

1. A packet is a 4-byte network-order length, one command byte, then data; the length
   counts the command byte. The MTA sends SMFIC_* commands (:func:`optneg`, :func:`macro`,
   :func:`connect` ... :func:`quit`); every function here returns the packet's bytes.
   Strings are NUL-terminated; a NUL inside a value cannot be framed and is sent as ``?``.
2. The milter answers with SMFIR_* replies. :class:`Decoder` takes the bytes as they come
   (``feed``) and hands out typed replies (``next``): :class:`Continue`, :class:`Accept`,
   ..., :class:`OptNeg` for the negotiation. It never raises anything but
   :class:`~smtpgate.errors.MilterProtocolError`, whose message is the text Postfix logs
   after ``milter NAME:`` (a bad length, a packet longer than ``max_packet``, data after a
   reply that has none, a string without its NUL, left-over bytes). A reply code that the
   protocol does not define is an :class:`Unknown` reply: whether it is acceptable depends
   on the event it answers, which only the client knows (Postfix: "unexpected filter
   response").
3. The flag words: SMFIF_* (actions the MTA lets the milter take), SMFIP_* (events the
   milter does not want, replies it will not send), SMFIM_* (the macro stages of
   SMFIR_SETSYMLIST lists in the negotiation reply).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from smtpgate.errors import MilterProtocolError

# Commands from the MTA to the milter.
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"
SMFIC_QUIT_NC = b"K"

COMMAND_NAMES = {
    SMFIC_ABORT: "SMFIC_ABORT",
    SMFIC_BODY: "SMFIC_BODY",
    SMFIC_CONNECT: "SMFIC_CONNECT",
    SMFIC_MACRO: "SMFIC_MACRO",
    SMFIC_BODYEOB: "SMFIC_BODYEOB",
    SMFIC_HELO: "SMFIC_HELO",
    SMFIC_HEADER: "SMFIC_HEADER",
    SMFIC_MAIL: "SMFIC_MAIL",
    SMFIC_EOH: "SMFIC_EOH",
    SMFIC_OPTNEG: "SMFIC_OPTNEG",
    SMFIC_QUIT: "SMFIC_QUIT",
    SMFIC_RCPT: "SMFIC_RCPT",
    SMFIC_DATA: "SMFIC_DATA",
    SMFIC_UNKNOWN: "SMFIC_UNKNOWN",
    SMFIC_QUIT_NC: "SMFIC_QUIT_NC",
}

# Replies from the milter to the MTA.
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CONN_FAIL = b"f"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_REJECT = b"r"
SMFIR_TEMPFAIL = b"t"
SMFIR_SHUTDOWN = b"4"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_REPLYCODE = b"y"
SMFIR_QUARANTINE = b"q"
SMFIR_SKIP = b"s"
SMFIR_CHGFROM = b"e"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SETSYMLIST = b"l"

REPLY_NAMES = {
    SMFIR_ADDRCPT: "SMFIR_ADDRCPT",
    SMFIR_DELRCPT: "SMFIR_DELRCPT",
    SMFIR_ACCEPT: "SMFIR_ACCEPT",
    SMFIR_REPLBODY: "SMFIR_REPLBODY",
    SMFIR_CONTINUE: "SMFIR_CONTINUE",
    SMFIR_DISCARD: "SMFIR_DISCARD",
    SMFIR_CONN_FAIL: "SMFIR_CONN_FAIL",
    SMFIR_CHGHEADER: "SMFIR_CHGHEADER",
    SMFIR_PROGRESS: "SMFIR_PROGRESS",
    SMFIR_REJECT: "SMFIR_REJECT",
    SMFIR_TEMPFAIL: "SMFIR_TEMPFAIL",
    SMFIR_SHUTDOWN: "SMFIR_SHUTDOWN",
    SMFIR_ADDHEADER: "SMFIR_ADDHEADER",
    SMFIR_INSHEADER: "SMFIR_INSHEADER",
    SMFIR_REPLYCODE: "SMFIR_REPLYCODE",
    SMFIR_QUARANTINE: "SMFIR_QUARANTINE",
    SMFIR_SKIP: "SMFIR_SKIP",
    SMFIR_CHGFROM: "SMFIR_CHGFROM",
    SMFIR_ADDRCPT_PAR: "SMFIR_ADDRCPT_PAR",
    SMFIR_SETSYMLIST: "SMFIR_SETSYMLIST",
}

# SMFIP_*: events the milter does not want, replies it will not send, and other options.
SMFIP_NOCONNECT = 1 << 0
SMFIP_NOHELO = 1 << 1
SMFIP_NOMAIL = 1 << 2
SMFIP_NORCPT = 1 << 3
SMFIP_NOBODY = 1 << 4
SMFIP_NOHDRS = 1 << 5
SMFIP_NOEOH = 1 << 6
SMFIP_NR_HDR = 1 << 7
SMFIP_NOUNKNOWN = 1 << 8
SMFIP_NODATA = 1 << 9
SMFIP_SKIP = 1 << 10
SMFIP_RCPT_REJ = 1 << 11
SMFIP_NR_CONN = 1 << 12
SMFIP_NR_HELO = 1 << 13
SMFIP_NR_MAIL = 1 << 14
SMFIP_NR_RCPT = 1 << 15
SMFIP_NR_DATA = 1 << 16
SMFIP_NR_UNKN = 1 << 17
SMFIP_NR_EOH = 1 << 18
SMFIP_NR_BODY = 1 << 19
SMFIP_HDR_LEADSPC = 1 << 20

SMFIP_NOSEND_MASK = (
    SMFIP_NOCONNECT
    | SMFIP_NOHELO
    | SMFIP_NOMAIL
    | SMFIP_NORCPT
    | SMFIP_NOBODY
    | SMFIP_NOHDRS
    | SMFIP_NOEOH
    | SMFIP_NOUNKNOWN
    | SMFIP_NODATA
)
SMFIP_NOREPLY_MASK = (
    SMFIP_NR_CONN
    | SMFIP_NR_HELO
    | SMFIP_NR_MAIL
    | SMFIP_NR_RCPT
    | SMFIP_NR_DATA
    | SMFIP_NR_UNKN
    | SMFIP_NR_HDR
    | SMFIP_NR_EOH
    | SMFIP_NR_BODY
)

# The events each protocol version may carry (milter8.c MILTER8_V*_PROTO_MASK).
_V2 = SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY
_V2 |= SMFIP_NOHDRS | SMFIP_NOEOH
_V3 = _V2 | SMFIP_NOUNKNOWN
_V4 = _V3 | SMFIP_NODATA
_V6 = _V4 | SMFIP_SKIP | SMFIP_RCPT_REJ | SMFIP_NOREPLY_MASK | SMFIP_HDR_LEADSPC
PROTOCOL_EVENT_MASKS = {6: _V6, 4: _V4, 3: _V3, 2: _V2}
"""Protocol version -> the SMFIP_* events the MTA offers in that version."""
NO_HEADER_REPLY = "no_header_reply"
"""The milter_protocol extension that also offers SMFIP_NR_HDR (Postfix's old spelling)."""

# SMFIF_*: actions a milter may take at the end of the message.
SMFIF_ADDHDRS = 1 << 0
SMFIF_CHGBODY = 1 << 1
SMFIF_ADDRCPT = 1 << 2
SMFIF_DELRCPT = 1 << 3
SMFIF_CHGHDRS = 1 << 4
SMFIF_QUARANTINE = 1 << 5
SMFIF_CHGFROM = 1 << 6
SMFIF_ADDRCPT_PAR = 1 << 7
SMFIF_SETSYMLIST = 1 << 8
MTA_ACTIONS = 0x1FF
"""Every action, as Postfix offers them (``my_actions`` in milter8_connect)."""

# SMFIM_*: macro stages of SMFIR_SETSYMLIST lists.
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6
MACRO_STAGES = {
    SMFIM_CONNECT: "connect",
    SMFIM_HELO: "helo",
    SMFIM_ENVFROM: "mail",
    SMFIM_ENVRCPT: "rcpt",
    SMFIM_DATA: "data",
    SMFIM_EOM: "end_of_data",
    SMFIM_EOH: "end_of_header",
}
"""SMFIM_* -> the stage name of the milter_<stage>_macros parameter it overrides."""

# Address families in SMFIC_CONNECT.
SMFIA_UNKNOWN = b"U"
SMFIA_UNIX = b"L"
SMFIA_INET = b"4"
SMFIA_INET6 = b"6"

CHUNK_SIZE = 65535
"""Body bytes per SMFIC_BODY packet (Postfix MILTER_CHUNK_SIZE)."""
MAX_PACKET = 64 * 1024 * 1024
"""The longest reply packet accepted (Postfix allows INT_MAX/2; this bounds memory)."""

_LEN = struct.Struct("!I")
_WORDS = struct.Struct("!III")


# --- encoding ------------------------------------------------------------------------


def _cstr(value: str | bytes) -> bytes:
    if isinstance(value, str):
        try:
            data = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no bytes decoded to
            data = value.encode("utf-8", "replace")
    else:
        data = value
    return data.replace(b"\0", b"?") + b"\0"


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length (command byte included), command, data."""
    return _LEN.pack(len(data) + 1) + command + data


def optneg(version: int, actions: int, protocol: int) -> bytes:
    """SMFIC_OPTNEG: the version, the actions the milter may take, the events offered."""
    return packet(SMFIC_OPTNEG, _WORDS.pack(version, actions, protocol))


def macro(event: bytes, pairs: Iterable[tuple[str, str]]) -> bytes:
    """SMFIC_MACRO for ``event`` (the command byte it precedes): name, value, name, value..."""
    return packet(SMFIC_MACRO, event + b"".join(_cstr(n) + _cstr(v) for n, v in pairs))


def connect(hostname: str, family: bytes, port: int, address: str) -> bytes:
    """SMFIC_CONNECT; an unknown family carries neither port nor address."""
    data = _cstr(hostname) + family
    if family != SMFIA_UNKNOWN:
        data += struct.pack("!H", port & 0xFFFF) + _cstr(address)
    return packet(SMFIC_CONNECT, data)


def helo(name: str) -> bytes:
    return packet(SMFIC_HELO, _cstr(name))


def mail(args: Sequence[str]) -> bytes:
    """SMFIC_MAIL: the sender as written (``<a@b>``), then each ESMTP parameter."""
    return packet(SMFIC_MAIL, b"".join(_cstr(a) for a in args))


def rcpt(args: Sequence[str]) -> bytes:
    """SMFIC_RCPT: the recipient as written (``<a@b>``), then each ESMTP parameter."""
    return packet(SMFIC_RCPT, b"".join(_cstr(a) for a in args))


def data() -> bytes:
    return packet(SMFIC_DATA)


def header(name: bytes, value: bytes) -> bytes:
    """SMFIC_HEADER: a folded value's lines are joined by a bare LF, as Sendmail does."""
    return packet(SMFIC_HEADER, _cstr(name) + _cstr(value))


def eoh() -> bytes:
    return packet(SMFIC_EOH)


def body(chunk: bytes) -> bytes:
    """SMFIC_BODY: raw body bytes (CRLF line ends), at most :data:`CHUNK_SIZE` per packet."""
    return packet(SMFIC_BODY, chunk)


def bodyeob() -> bytes:
    return packet(SMFIC_BODYEOB)


def abort() -> bytes:
    return packet(SMFIC_ABORT)


def quit() -> bytes:
    return packet(SMFIC_QUIT)


def quit_nc() -> bytes:
    return packet(SMFIC_QUIT_NC)


def unknown(command: str) -> bytes:
    return packet(SMFIC_UNKNOWN, _cstr(command))


# --- replies -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Continue:
    """SMFIR_CONTINUE: no objection, go on."""


@dataclass(frozen=True, slots=True)
class Accept:
    """SMFIR_ACCEPT: no more events for this message (connection, at CONNECT or HELO)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """SMFIR_REJECT: 550 5.7.1 Command rejected."""


@dataclass(frozen=True, slots=True)
class Tempfail:
    """SMFIR_TEMPFAIL: 451 4.7.1 Service unavailable - try again later."""


@dataclass(frozen=True, slots=True)
class Discard:
    """SMFIR_DISCARD: accept the message and drop it."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """SMFIR_SHUTDOWN ('4'): 421 and close the SMTP connection."""


@dataclass(frozen=True, slots=True)
class Progress:
    """SMFIR_PROGRESS: still working; the reply is still to come."""


@dataclass(frozen=True, slots=True)
class Skip:
    """SMFIR_SKIP: send no more events of this kind (body chunks) to this milter."""


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """SMFIR_REPLYCODE: an SMTP reply of the milter's own (not validated here)."""

    text: str


@dataclass(frozen=True, slots=True)
class Quarantine:
    """SMFIR_QUARANTINE: hold the message; the reason is the milter's text."""

    reason: str


@dataclass(frozen=True, slots=True)
class AddHeader:
    """SMFIR_ADDHEADER: append a header after the last one."""

    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class InsHeader:
    """SMFIR_INSHEADER: insert a header at a 0-based position (0 = before the first)."""

    index: int
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class ChgHeader:
    """SMFIR_CHGHEADER: change (empty value: delete) the index-th header of that name."""

    index: int
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class ReplBody:
    """SMFIR_REPLBODY: a piece of the replacement body (the pieces are concatenated)."""

    chunk: bytes


@dataclass(frozen=True, slots=True)
class AddRcpt:
    """SMFIR_ADDRCPT, or SMFIR_ADDRCPT_PAR with ESMTP arguments (``args``, space separated)."""

    recipient: str
    args: str = ""
    with_args: bool = False


@dataclass(frozen=True, slots=True)
class DelRcpt:
    """SMFIR_DELRCPT: remove the recipient that was given as ``recipient``."""

    recipient: str


@dataclass(frozen=True, slots=True)
class ChgFrom:
    """SMFIR_CHGFROM: a new sender, with ESMTP arguments (space separated)."""

    sender: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class Unknown:
    """A reply code the protocol defines no meaning for here (SMFIR_CONN_FAIL too)."""

    code: bytes
    size: int

    @property
    def name(self) -> str:
        return REPLY_NAMES.get(self.code, "(unknown filter reply)")


@dataclass(frozen=True, slots=True)
class OptNeg:
    """The milter's SMFIC_OPTNEG reply: its version, actions, protocol flags and macro lists."""

    version: int
    actions: int
    protocol: int
    macros: dict[int, str] = field(default_factory=dict)
    """SMFIM_* stage -> the space-separated macro names the milter wants (SETSYMLIST)."""
    unknown_stages: tuple[int, ...] = ()
    """Stage numbers the milter named that do not exist (Postfix ignores them, warning)."""


MilterReply = (
    Continue
    | Accept
    | Reject
    | Tempfail
    | Discard
    | Shutdown
    | Progress
    | Skip
    | ReplyCode
    | Quarantine
    | AddHeader
    | InsHeader
    | ChgHeader
    | ReplBody
    | AddRcpt
    | DelRcpt
    | ChgFrom
    | Unknown
    | OptNeg
)

_SIMPLE: dict[bytes, MilterReply] = {
    SMFIR_CONTINUE: Continue(),
    SMFIR_ACCEPT: Accept(),
    SMFIR_REJECT: Reject(),
    SMFIR_TEMPFAIL: Tempfail(),
    SMFIR_DISCARD: Discard(),
    SMFIR_SHUTDOWN: Shutdown(),
    SMFIR_PROGRESS: Progress(),
    SMFIR_SKIP: Skip(),
}


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


class _Fields:
    """Reads the fields of one packet's data as milter8.c's milter8_read_data does."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def long(self) -> int:
        if self.left < 4:
            raise MilterProtocolError("input packet too short for network long")
        (value,) = _LEN.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def string(self) -> bytes:
        if self.left < 1:
            raise MilterProtocolError("packet too short for string")
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise MilterProtocolError("missing string null terminator")
        value = self.data[self.pos : end]
        self.pos = end + 1
        return value

    def end(self) -> None:
        if self.left > 0:
            raise MilterProtocolError(f"left-over data {self.left} bytes")


def _until_nul(data: bytes) -> str:
    """A buffer read as a C string (Postfix reads REPLYCODE/QUARANTINE raw, then as C text)."""
    return _text(data.split(b"\0", 1)[0])


def decode(command: bytes, data: bytes) -> MilterReply:
    """One reply packet's command byte and data as a typed reply."""
    simple = _SIMPLE.get(command)
    if simple is not None:
        if data:
            name = REPLY_NAMES[command]
            raise MilterProtocolError(f"reply {name} was followed by {len(data)} data bytes")
        return simple
    fields = _Fields(data)
    reply: MilterReply
    if command == SMFIR_REPLYCODE:
        return ReplyCode(_until_nul(data))
    if command == SMFIR_QUARANTINE:
        return Quarantine(_until_nul(data))
    if command == SMFIR_REPLBODY:
        return ReplBody(data)
    if command == SMFIR_ADDHEADER:
        reply = AddHeader(fields.string(), fields.string())
    elif command in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
        index = fields.long()
        label, value = fields.string(), fields.string()
        cls = InsHeader if command == SMFIR_INSHEADER else ChgHeader
        reply = cls(index, label, value)
    elif command in (SMFIR_CHGFROM, SMFIR_ADDRCPT_PAR):
        address = _text(fields.string())
        args = _text(fields.string()) if fields.left > 0 else ""
        if command == SMFIR_CHGFROM:
            reply = ChgFrom(address, args)
        else:
            reply = AddRcpt(address, args, with_args=True)
    elif command == SMFIR_ADDRCPT:
        reply = AddRcpt(_text(fields.string()))
    elif command == SMFIR_DELRCPT:
        reply = DelRcpt(_text(fields.string()))
    elif command == SMFIC_OPTNEG:
        reply = _optneg(fields)
    else:
        return Unknown(command, len(data))
    fields.end()
    return reply


def _optneg(fields: _Fields) -> OptNeg:
    version, actions, protocol = fields.long(), fields.long(), fields.long()
    macros: dict[int, str] = {}
    unknown_stages: list[int] = []
    while fields.left > 0:
        stage = fields.long()
        names = _text(fields.string())
        if stage in MACRO_STAGES:
            macros[stage] = names
        else:
            unknown_stages.append(stage)
    return OptNeg(version, actions, protocol, macros, tuple(unknown_stages))


class Decoder:
    """Bytes in, typed replies out. ``feed`` what the socket read, then call ``next``
    until it returns None (a reply is incomplete). Errors are MilterProtocolError."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next(self) -> MilterReply | None:
        if len(self._buffer) < 4:
            return None
        (length,) = _LEN.unpack_from(self._buffer)
        if length < 1:
            raise MilterProtocolError(f"bad packet length: {length}")
        if length > self.max_packet:
            raise MilterProtocolError(f"unreasonable packet length: {length} > {self.max_packet}")
        if len(self._buffer) < 4 + length:
            return None
        command = bytes(self._buffer[4:5])
        payload = bytes(self._buffer[5 : 4 + length])
        del self._buffer[: 4 + length]
        return decode(command, payload)
