"""Where a message waits for the milters' verdict and the backend: memory, then a spool file.

:class:`MessageStore` takes the message content as it arrives (:meth:`MessageStore.append`)
and keeps it in memory up to a bound; past the bound everything goes to a file the
caller opens (the ``spool`` factory: serve gives an anonymous temporary file in
``smtpgate_spool_directory``, created with O_TMPFILE or unlinked at once, mode 0600, so
that it is gone whatever happens to the process; explain gives none and keeps everything
in memory).  The content comes back as bounded chunks (:meth:`MessageStore.chunks`) and
as its header block (:meth:`MessageStore.head`), as often as needed: the milters read it,
then the relay.  The store also knows what :func:`~smtpgate.smtp.data` checks on the whole
content, kept as it arrives: a NUL, a bare LF (a LF without CR before it, across appends).

:class:`Message` is a message as it goes out: bytes before the stored content
(smtpgate's ``Received:`` header, PREPEND text, a milter's edited header block) and the
stored content from an offset (or none, when a milter replaced the body).  Iterating it
gives its bytes in bounded pieces; nothing joins the whole message.

The store is closed at the end of the transaction whatever ends it (the machine's
``_end_transaction`` and ``close``); closing twice is harmless.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

READ_CHUNK = 1 << 16
"""The size of a chunk read back (a spool file's read)."""
HEAD_LIMIT = 1 << 20
"""The most of the header block that is read into memory: a header block beyond it is
taken as ending there (what follows counts as body for the milters)."""

Spool = Callable[[], BinaryIO]


class MessageStore:
    """The content of one message: appended, kept in memory up to ``memory_limit`` bytes,
    then in the file ``spool()`` opens (never, when ``spool`` is None)."""

    __slots__ = (
        "memory_limit",
        "_spool",
        "_memory",
        "_file",
        "size",
        "nul",
        "bare_lf",
        "_last",
        "closed",
    )

    def __init__(self, memory_limit: int = 0, spool: Spool | None = None) -> None:
        self.memory_limit = memory_limit
        self._spool = spool
        self._memory = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0
        self.nul = False  # a NUL octet in the content
        self.bare_lf = False  # a LF not preceded by CR
        self._last = 0  # the last octet appended (for a CR LF split between appends)
        self.closed = False

    @property
    def spooled(self) -> bool:
        """The content is in the spool file."""
        return self._file is not None

    @property
    def spoolable(self) -> bool:
        """Content beyond the bound goes to a file (else everything stays in memory)."""
        return self._spool is not None

    @property
    def memory(self) -> int:
        """Bytes of content held in memory (what the memory budget pays for)."""
        return len(self._memory)

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self.closed:
            raise ValueError("append to a closed message store")
        self._flags(data)
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._memory += data
        if self._spool is not None and len(self._memory) > self.memory_limit:
            self._file = self._spool()
            self._file.write(self._memory)
            self._memory = bytearray()

    def _flags(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        if not self.nul and b"\x00" in data:
            self.nul = True
        if not self.bare_lf:
            lf = data.count(b"\n")
            if lf:
                crlf = data.count(b"\r\n") + (data[0] == 0x0A and self._last == 0x0D)
                if crlf != lf:
                    self.bare_lf = True
        self._last = data[-1]

    def chunks(self, start: int = 0, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The content from offset ``start`` on, in pieces of at most ``size`` bytes."""
        if self.closed:
            raise ValueError("read from a closed message store")
        if self._file is None:
            view = memoryview(self._memory)
            for offset in range(start, len(view), size):
                yield bytes(view[offset : offset + size])
            return
        self._file.flush()
        fd = self._file.fileno()
        offset = start
        while offset < self.size:
            if self.closed:  # never read a descriptor number that may be another file's
                raise ValueError("read from a closed message store")
            piece = os.pread(fd, min(size, self.size - offset), offset)
            if not piece:
                raise OSError(f"spool file shorter than its content ({offset} of {self.size})")
            offset += len(piece)
            yield piece

    def head(self, limit: int = HEAD_LIMIT) -> bytes:
        """The header block: the content up to and including the first empty line; at
        most ``limit`` bytes, cut after the last line end within them."""
        out = bytearray()
        for piece in self.chunks():
            searched = max(len(out) - 3, 0)
            out += piece
            end = _empty_line(out, searched)
            if end >= 0:
                return bytes(out[:end])
            if len(out) >= limit:
                cut = out.rfind(b"\n", 0, limit)
                return bytes(out[: cut + 1]) if cut >= 0 else bytes(out[:limit])
        return bytes(out)

    def close(self) -> None:
        """Give back the memory and the file (the file vanishes with its descriptor)."""
        self.closed = True
        self._memory = bytearray()
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


def _empty_line(data: bytearray, start: int) -> int:
    """The end of the first empty line (CRLF CRLF, LF LF, LF CRLF) at or after ``start``,
    or at the very start; -1 when there is none yet."""
    if data.startswith(b"\r\n"):
        return 2
    if data.startswith(b"\n"):
        return 1
    best = -1
    for sep in (b"\n\r\n", b"\n\n"):
        found = data.find(sep, start)
        if found >= 0 and (best < 0 or found + len(sep) < best):
            best = found + len(sep)
    return best


def open_spool(directory: str) -> Spool:
    """A spool factory: an anonymous file in ``directory`` (O_TMPFILE where the kernel has
    it, else created and unlinked at once; mode 0600)."""
    import tempfile

    def spool() -> BinaryIO:
        return tempfile.TemporaryFile(dir=directory)

    return spool


@dataclass(frozen=True, slots=True)
class Message:
    """A message as it goes out: ``head`` bytes, then the stored content from ``offset``."""

    head: bytes = b""
    store: MessageStore | None = None
    offset: int = 0

    @property
    def size(self) -> int:
        stored = self.store.size - self.offset if self.store is not None else 0
        return len(self.head) + stored

    def __iter__(self) -> Iterator[bytes]:
        if self.head:
            yield self.head
        if self.store is not None:
            yield from self.store.chunks(self.offset)

    def prefixed(self, prefix: bytes) -> Message:
        return Message(prefix + self.head, self.store, self.offset)

    def split_head(self, limit: int = HEAD_LIMIT) -> tuple[bytes, Message]:
        """The header block as bytes (``head`` and the stored header block, bounded) and
        what follows it."""
        if self.store is None:
            return self.head, Message()
        if self.offset:
            # only the milters make messages with an offset; they are not split again
            raise ValueError("split_head of a message with an offset")
        stored = self.store.head(limit)
        return self.head + stored, Message(b"", self.store, len(stored))

    def to_bytes(self) -> bytes:
        """The whole message joined (tests and small messages only)."""
        return b"".join(self)
