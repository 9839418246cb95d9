"""Message content: the end of DATA, SMTP transparency, the checks on content, the header.

No I/O.  :class:`DotReader` collects DATA content from input as it arrives and finds the
end (``CRLF . CRLF``, and nothing else: under ``smtpd_forbid_bare_newline = normalize``
a bare LF ends a line but never the message, which closes the SMTP smuggling hole);
:class:`ChunkReader` counts out a BDAT chunk.  Both pass the content on as it arrives
to a :class:`~smtpgate.smtp.store.MessageStore` (memory, then a spool file): the DATA
reader line by line, with SMTP transparency removed (:func:`unstuff`) and the false ends
of a bare LF dropped (:func:`drop_false_ends`), keeping only the incomplete last line.
The store remembers a NUL and a bare LF as it goes, for the checks at the end.  Line
ends are the relay's business (it sends every line with CRLF).
"""

from __future__ import annotations

import functools
import re
from email.utils import formatdate

from smtpgate.policy.address import header_safe, quote_822_local
from smtpgate.policy.model import ClientInfo
from smtpgate.smtp.store import MessageStore

END_OF_DATA = b"\r\n.\r\n"
_BARE_LF = re.compile(rb"(?<!\r)\n")


class DotReader:
    """DATA content up to ``CRLF.CRLF``: feed it input, it says where the message ends.

    Complete lines go to the message store as they arrive, with SMTP transparency removed
    and the false ends of a bare LF dropped (:func:`unstuff`, :func:`drop_false_ends`,
    line by line); the reader keeps only the last, incomplete line and the two octets
    before it (a leading CRLF at first, so that a first line of ``.`` is found like any
    other).  Once the message is being discarded (too big, no memory) nothing more is
    stored; the end is still found.
    """

    __slots__ = ("buffer", "searched", "received", "discarding", "store", "taken", "failure")

    def __init__(self, store: MessageStore | None = None) -> None:
        self.buffer = bytearray(b"\r\n")
        self.searched = 0
        self.received = 0  # bytes of input taken (for "timeout after DATA (N bytes)")
        self.discarding = False
        self.store = MessageStore() if store is None else store
        self.taken = 0  # content octets passed on to the store (before unstuffing)
        self.failure: OSError | None = None  # the store could not take the content

    @property
    def size(self) -> int:
        """Content bytes received so far (without the leading CRLF), transparency kept."""
        return self.taken + len(self.buffer) - 2

    @property
    def memory(self) -> int:
        """Content bytes held in memory: the store's and the incomplete line."""
        return self.store.memory + len(self.buffer) - 2

    def feed(self, data: bytearray) -> bytes | None:
        """Take all of ``data``; returns what follows the end of data (pipelined input,
        to be read as commands) once the end was found, else None."""
        buffer = self.buffer
        self.received += len(data)
        buffer += data
        data.clear()
        end = buffer.find(END_OF_DATA, self.searched)
        if end >= 0:
            rest = bytes(buffer[end + len(END_OF_DATA) :])
            self._lines(end + 2)  # the last line's CRLF is content
            del buffer[2:]
            return rest
        last = buffer.rfind(b"\n")
        if last >= 2:
            self._lines(last + 1)
            del buffer[: last - 1]  # keep the two octets before what is left
        self.searched = max(len(buffer) - len(END_OF_DATA) + 1, 0)
        return None

    def _lines(self, stop: int) -> None:
        """Pass ``buffer[2:stop]`` (complete lines) to the store."""
        buffer = self.buffer
        self.taken += stop - 2
        if self.discarding:
            return
        block = bytes(memoryview(buffer)[2:stop])
        if not block.startswith(b".") and b"\n." not in block:
            self._store(block)  # the usual case: no line starts with a dot
            return
        bare_before = buffer[0] != 0x0D  # the line before ended with a bare LF
        out = bytearray()
        start = 0
        while start < len(block):
            end = block.index(b"\n", start) + 1
            line = block[start:end]
            start = end
            bare = not line.endswith(b"\r\n")
            if line == b".\n" or (bare_before and line == b".\r\n"):
                # a false end (drop_false_ends); ".\n" with CRLF before is one too
                bare_before = bare
                continue
            bare_before = bare
            out += line[1:] if line.startswith(b".") else line
        self._store(out)

    def _store(self, data: bytes | bytearray) -> None:
        try:
            self.store.append(data)
        except OSError as exc:  # the spool file (a full disk): read on, then say 451
            self.failure = exc
            self.discard()

    def discard(self) -> None:
        """Stop keeping the content (it will not be relayed); the end is still found."""
        self.discarding = True
        self.store.close()

    def content(self) -> bytes:
        """The message, transparency removed (call after the end was found; tests)."""
        return b"".join(self.store.chunks())


class ChunkReader:
    """One BDAT chunk: exactly ``size`` octets, taken from input as they come."""

    __slots__ = ("size", "remaining", "last", "store", "failure")

    def __init__(self, size: int, last: bool, store: MessageStore | None) -> None:
        self.size = size
        self.remaining = size
        self.last = last
        self.store = store  # where the octets go (None: dropped)
        self.failure: OSError | None = None  # the store could not take them

    def feed(self, data: bytearray) -> bool:
        """Take what belongs to the chunk from ``data``; True once it is complete."""
        take = min(self.remaining, len(data))
        if take:
            if self.store is not None:
                try:
                    self.store.append(bytes(memoryview(data)[:take]))
                except OSError as exc:  # the spool file: read the chunk on, then say 451
                    self.failure, self.store = exc, None
            del data[:take]
            self.remaining -= take
        return self.remaining == 0


def unstuff(content: bytes | memoryview) -> bytes:
    """Remove SMTP's transparency dots (RFC 5321 4.5.2): ``..x`` is the line ``.x``."""
    data = bytes(content)
    if data.startswith(b"."):
        data = data[1:]
    if b"\n." not in data:
        return data
    return data.replace(b"\n.", b"\n")


def drop_false_ends(raw: bytes) -> bytes:
    """Drop the ``.`` lines that a bare LF makes look like an end of data.

    Under smtpd_forbid_bare_newline = normalize only CRLF.CRLF ends the message; a line
    that is just ``.`` next to a bare LF (``hi LF . LF``, ``hi LF . CRLF``) is what a
    smuggling client sends, and Postfix 3.7 drops it rather than pass it on as content.
    Content with CRLF line ends only (the usual) cannot hold such a line.
    """
    if not has_bare_lf(raw):
        return raw
    lines = raw.split(b"\n")
    out: list[bytes] = []
    bare_before = False
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        bare = not last and not line.endswith(b"\r")
        if not last and (line == b"." and (bare or bare_before) or line == b".\r" and bare_before):
            bare_before = bare
            continue
        out.append(line)
        bare_before = bare
    return b"\n".join(out)


def has_bare_lf(content: bytes) -> bool:
    """A LF that is not preceded by CR (smtpd_forbid_bare_newline)."""
    if content.count(b"\n") == content.count(b"\r\n"):
        return False  # the usual case, without a regex pass over the message
    return _BARE_LF.search(content) is not None


@functools.lru_cache(maxsize=2)
def header_date(second: int) -> str:
    """The Received header's date, formatted once per second."""
    return formatdate(second, localtime=False, usegmt=False)


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
        lines.append(f"\tfor <{header_safe(quote_822_local(recipients[0]))}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")
