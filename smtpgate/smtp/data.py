"""Message content: the end of DATA, SMTP transparency, the checks on content, the header.

No I/O.  :class:`DotReader` collects DATA content from input as it arrives and finds the
end (``CRLF . CRLF``, and nothing else: under ``smtpd_forbid_bare_newline = normalize``
a bare LF ends a line but never the message, which closes the SMTP smuggling hole);
:class:`ChunkReader` counts out a BDAT chunk.  What the machine hands the relay is the
content with SMTP transparency removed (:func:`unstuff`); line ends are the relay's
business (it sends every line with CRLF).
"""

from __future__ import annotations

import functools
import re
from email.utils import formatdate

from smtpgate.policy.address import header_safe, quote_822_local
from smtpgate.policy.model import ClientInfo

END_OF_DATA = b"\r\n.\r\n"
_BARE_LF = re.compile(rb"(?<!\r)\n")


class DotReader:
    """DATA content up to ``CRLF.CRLF``: feed it input, it says where the message ends.

    The content is kept with a leading CRLF so that a first line of ``.`` is found like
    any other; once the message is being discarded (too big, no memory) only the last
    four bytes are kept, enough to find the end.
    """

    __slots__ = ("buffer", "searched", "received", "discarding")

    def __init__(self) -> None:
        self.buffer = bytearray(b"\r\n")
        self.searched = 0
        self.received = 0  # bytes of input taken (for "timeout after DATA (N bytes)")
        self.discarding = False

    @property
    def size(self) -> int:
        """Content bytes held so far (without the leading CRLF)."""
        return len(self.buffer) - 2

    def feed(self, data: bytearray) -> bytes | None:
        """Take all of ``data``; returns what follows the end of data (pipelined input,
        to be read as commands) once the end was found, else None."""
        buffer = self.buffer
        self.received += len(data)
        buffer += data
        data.clear()
        end = buffer.find(END_OF_DATA, self.searched)
        if end < 0:
            if self.discarding:
                del buffer[:-4]
            self.searched = max(len(buffer) - len(END_OF_DATA) + 1, 0)
            return None
        rest = bytes(buffer[end + len(END_OF_DATA) :])
        del buffer[end + 2 :]  # keep the last line's CRLF
        return rest

    def discard(self) -> None:
        """Stop keeping the content (it will not be relayed); the end is still found."""
        self.discarding = True
        del self.buffer[:-4]
        self.searched = 0

    def content(self) -> bytes:
        """The message, transparency removed (call after the end was found)."""
        raw = bytes(memoryview(self.buffer)[2:])
        return unstuff(drop_false_ends(raw))


class ChunkReader:
    """One BDAT chunk: exactly ``size`` octets, taken from input as they come."""

    __slots__ = ("size", "remaining", "last", "chunk")

    def __init__(self, size: int, last: bool, keep: bool) -> None:
        self.size = size
        self.remaining = size
        self.last = last
        self.chunk: bytearray | None = bytearray() if keep else None

    def feed(self, data: bytearray) -> bool:
        """Take what belongs to the chunk from ``data``; True once it is complete."""
        take = min(self.remaining, len(data))
        if take:
            if self.chunk is not None:
                self.chunk += memoryview(data)[:take]
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
