"""What the relay puts on the wire, as pure functions: message framing, XFORWARD, addresses,
and what a backend reply becomes for the client.

The relay frames the message itself; it trusts no flag from the front end. The message it
is given is the content as the client meant it: SMTP transparency removed (dots
unstuffed), each line ending in CRLF or a bare LF -- both are line ends, as in Postfix's
smtpd -- and a CR that is not followed by LF becomes a space (what Postfix 3.7 sends
onward: docs/postfix-behaviour.md). The wire forms:

- after DATA (:func:`frame_data`): every line end CRLF, a line that starts with ``.``
  gets a second one (RFC 5321 section 4.5.2), a last line without line end gets one,
  then ``.`` CRLF. No bare LF can reach the backend, and the only ``CRLF . CRLF`` is the
  end (SMTP smuggling);
- after BDAT (:func:`bdat_chunks`): the same line ends, no dot-stuffing; each chunk's
  command names its exact size, the last says LAST (RFC 3030).

The usual message is already canonical (CRLF only, no line starting with a dot, ending
in CRLF): it is checked by counts and one search at C speed and sent as it is, without a
copy; only other content is rebuilt.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable, Iterator, Sequence

from smtpgate.facts import ClientFacts
from smtpgate.reply import Reply
from smtpgate.smtp.syntax import xtext

END_OF_DATA = b".\r\n"

XFORWARD_ORDER = ("NAME", "ADDR", "PORT", "HELO", "IDENT", "PROTO", "SOURCE")
"""The attributes in the order Postfix's smtpd_proxy.c sends them."""
XFORWARD_UNAVAILABLE = "[UNAVAILABLE]"
XFORWARD_PAYLOAD_LIMIT = 512 - len("250 XFORWARD\r\n")
"""Postfix's PAYLOAD_LIMIT: the attributes of one XFORWARD command fit in 512 octets."""
XFORWARD_VALUE_LIMIT = 255
"""XFORWARD_README: attribute values are at most 255 characters (xtext-encoded here)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_LONE_CR = re.compile(rb"\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_DOT_LINE = re.compile(rb"\n\.")  # a regex search beats bytes.find for a 2-byte needle
_DSN = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


# -- the message ----------------------------------------------------------------------------


def canonical_lines(message: bytes) -> bytes:
    """*message* with every line end CRLF and a final line end: the same object when it
    already is (the usual case), else a new one. A lone CR becomes a space."""
    lf = message.count(b"\n")
    if message.count(b"\r\n") != lf:
        message = _BARE_LF.sub(b"\r\n", message)
    if message.count(b"\r") != lf:
        # A CR that does not end a line goes out as a space, as Postfix sends it: no
        # backend can take ``CR . CR`` for the end of the message.
        message = _LONE_CR.sub(b" ", message)
    if message and not message.endswith(b"\n"):
        message += b"\r\n"
    return message


def data_pieces(message: bytes) -> tuple[bytes, bytes]:
    """The wire form after DATA in two pieces (content, end) to be written together:
    :func:`frame_data` without joining them, so canonical content is never copied."""
    body = canonical_lines(message)
    if body.startswith(b".") or _DOT_LINE.search(body) is not None:
        body = _LEADING_DOT.sub(b"..", body)
    return body, END_OF_DATA


def frame_data(message: bytes) -> bytes:
    """The whole wire form of *message* after DATA, up to and including the final dot."""
    return b"".join(data_pieces(message))


def bdat_chunks(message: bytes, chunk_size: int) -> Iterator[tuple[bytes, memoryview]]:
    """``(command line, chunk)`` pairs for *message* sent with BDAT: CRLF line ends, no
    stuffing; chunks of at most *chunk_size* octets, the last (possibly empty) one LAST."""
    body = memoryview(canonical_lines(message))
    size = len(body)
    offset = 0
    while size - offset > chunk_size:
        yield b"BDAT %d\r\n" % chunk_size, body[offset : offset + chunk_size]
        offset += chunk_size
    yield b"BDAT %d LAST\r\n" % (size - offset), body[offset:]


class Framer:
    """:func:`canonical_lines` (and the dot-stuffing of :func:`data_pieces` when ``stuff``)
    on a message given in pieces: every piece is framed as it comes, whatever the pieces'
    boundaries split (a CR from its LF, a line end from the dot after it).  The pieces
    joined are what the whole-message functions give for the whole message."""

    __slots__ = ("stuff", "cr", "bol", "started")

    def __init__(self, stuff: bool) -> None:
        self.stuff = stuff
        self.cr = False  # the last piece ended with a CR: its fate depends on what follows
        self.bol = True  # the output so far ends a line (or is empty)
        self.started = False  # some output was given

    def feed(self, piece: bytes | bytearray | memoryview) -> bytes:
        """The wire form of ``piece`` (possibly empty, possibly shorter by a held CR)."""
        chunk = bytes(piece) if not isinstance(piece, bytes) else piece
        if self.cr:
            chunk, self.cr = b"\r" + chunk, False
        if chunk.endswith(b"\r"):
            chunk, self.cr = chunk[:-1], True
        if not chunk:
            return b""
        lf = chunk.count(b"\n")
        if chunk.count(b"\r\n") != lf:
            chunk = _BARE_LF.sub(b"\r\n", chunk)
        if chunk.count(b"\r") != lf:
            chunk = _LONE_CR.sub(b" ", chunk)
        if self.stuff:
            if _DOT_LINE.search(chunk) is not None:
                chunk = chunk.replace(b"\n.", b"\n..")
            if self.bol and chunk.startswith(b"."):
                chunk = b"." + chunk
        self.bol = chunk.endswith(b"\n")
        self.started = True
        return chunk

    def end(self) -> bytes:
        """What ends the content: a held CR (as a space) and the last line's CRLF."""
        tail = b""
        if self.cr:
            self.cr, tail = False, b" "
            self.bol, self.started = False, True
        if self.started and not self.bol:
            tail += b"\r\n"
            self.bol = True
        return tail


def pieces_of(message: bytes | bytearray | memoryview | Iterable[bytes]) -> Iterable[bytes]:
    """A message given whole as one piece; pieces as they are."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        return (bytes(message),)
    return message


def data_stream(message: bytes | Iterable[bytes]) -> Iterator[bytes]:
    """The wire form after DATA, without the final dot, in non-empty pieces."""
    framer = Framer(stuff=True)
    for piece in pieces_of(message):
        framed = framer.feed(piece)
        if framed:
            yield framed
    tail = framer.end()
    if tail:
        yield tail


def bdat_stream(message: bytes | Iterable[bytes], chunk_size: int) -> Iterator[tuple[bytes, bytes]]:
    """:func:`bdat_chunks` for a message in pieces: chunks of exactly *chunk_size* octets
    while more than that is left, then the LAST one (possibly empty); at most one chunk
    and one piece are held."""
    framer = Framer(stuff=False)
    buffer = bytearray()
    for piece in pieces_of(message):
        buffer += framer.feed(piece)
        while len(buffer) > chunk_size:
            yield b"BDAT %d\r\n" % chunk_size, bytes(buffer[:chunk_size])
            del buffer[:chunk_size]
    buffer += framer.end()
    while len(buffer) > chunk_size:
        yield b"BDAT %d\r\n" % chunk_size, bytes(buffer[:chunk_size])
        del buffer[:chunk_size]
    yield b"BDAT %d LAST\r\n" % len(buffer), bytes(buffer)


# -- XFORWARD -------------------------------------------------------------------------------


def _xforward_value(client: ClientFacts, attribute: str) -> str | None:
    if attribute == "NAME":
        return client.name if client.name and client.name != "unknown" else None
    if attribute == "ADDR":
        if not client.addr or client.addr == "unknown":
            return None
        return f"IPv6:{client.addr}" if ":" in client.addr else client.addr
    if attribute == "PORT":
        return str(client.port) if client.port > 0 else None
    if attribute == "HELO":
        return client.helo or None
    if attribute == "IDENT":
        return client.ident or None
    if attribute == "PROTO":
        return client.proto or None
    return client.source or "REMOTE"


def xforward_commands(client: ClientFacts, offered: Collection[str]) -> list[str]:
    """XFORWARD command lines (no CRLF) for the attributes *offered*, in Postfix's order.

    Missing values are ``[UNAVAILABLE]``; a command is flushed before it would exceed
    Postfix's 512-octet limit (``smtpd_proxy_xforward_send``).
    """
    commands: list[str] = []
    payload = ""
    for attribute in XFORWARD_ORDER:
        if attribute not in offered:
            continue
        value = _xforward_value(client, attribute)
        item = f" {attribute}={XFORWARD_UNAVAILABLE if value is None else xtext(value)}"
        if payload and len(payload) + len(item) > XFORWARD_PAYLOAD_LIMIT:
            commands.append("XFORWARD" + payload)
            payload = ""
        payload += item
    if payload:
        commands.append("XFORWARD" + payload)
    return commands


# -- addresses and parameters ---------------------------------------------------------------

_ATOM_SPECIALS = frozenset('()<>@,;:\\".[] \t')
DSN_MAIL_PARAMS = ("RET=", "ENVID=")
DSN_RCPT_PARAMS = ("NOTIFY=", "ORCPT=")


def without(params: Sequence[bytes], prefixes: Sequence[str]) -> list[bytes]:
    """Drop parameters the backend did not advertise (Postfix's smtp client does too)."""
    wanted = tuple(p.encode("ascii") for p in prefixes)
    return [p for p in params if not p.upper().startswith(wanted)]


def arg(text: str) -> bytes | None:
    """*text* as command-argument bytes, or None when it must not reach the backend."""
    if _CONTROL.search(text):
        return None
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


# -- replies --------------------------------------------------------------------------------


def printable(text: str) -> str:
    """Non-printable characters censored to ``?`` (Postfix ``printable()``)."""
    return _NOT_PRINTABLE.sub("?", text)


@functools.lru_cache(maxsize=1024)  # backends say "250 2.1.5 Ok" again and again
def reply_from_backend(code: int, message: str) -> Reply:
    """A backend reply as a :class:`Reply`: code, enhanced code (when every line has the
    same one), text with non-printable characters censored to ``?``; lines kept.
    *message* is the reply's text, its lines joined by LF."""
    lines = [printable(line) for line in message.split("\n")]
    first = lines[0].split(" ", 1)[0]
    if (
        _DSN.fullmatch(first)
        and first[0] == str(code)[0]
        and all(line == first or line.startswith(first + " ") for line in lines)
    ):
        return Reply(code, first, "\n".join(line[len(first) + 1 :] for line in lines))
    return Reply(code, "", "\n".join(lines))
