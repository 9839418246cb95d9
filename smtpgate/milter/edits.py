"""End-of-message edits as pure functions: headers, body, envelope.

Theory of operation (after Postfix ``src/cleanup/cleanup_milter.c``, where the edits land
in the queue file):

1. :func:`parse` splits a message (bytes, lines ending in CRLF) into its headers -- each
   header with its continuation lines, byte for byte -- the empty line, and the body,
   with Postfix's header syntax (``is_header.c``: a label of printable ASCII without
   space or colon, optional blanks, a colon). :meth:`Message.render` gives the same bytes
   back when nothing was edited.
2. A header may be *hidden*: smtpgate's own ``Received:`` at the top, which milters do
   not see (Postfix hides its own the same way). Changes and deletions count the
   headers the milter saw, so they skip hidden ones; insertions count every header (so
   index 0 goes above smtpgate's ``Received:``), as Sendmail and Postfix do.
3. The header edits: :func:`add_header` (after the last header), :func:`insert_header`
   (at the milter's 0-based index; past the end appends), :func:`change_header` (the
   N-th header of that name, case-insensitive, N=0 meaning 1; not found appends, as
   Postfix does), :func:`delete_header` (not found: nothing). A new header reads
   ``name:`` + space + value, the space being ``" "`` unless the milter negotiated
   SMFIP_HDR_LEADSPC (then it sends its own). A value's lines are joined with CRLF;
   a continuation line that does not start with a blank gets a tab, and an empty one is
   dropped, so a milter cannot end the header section early (a safety check Postfix does
   not make).
4. :func:`replace_body`: the milter's body bytes cut into lines at LF (a CR before the
   LF dropped, a last line without LF kept) and each ended with CRLF, after the empty
   line -- as Postfix's cleanup_repl_body writes it.
5. The envelope edits are data: :class:`EnvelopeEdits` collects a new sender, added and
   deleted recipients in the order the milters asked (:meth:`EnvelopeEdits.apply`), for
   the caller to use on the transaction. ESMTP arguments are kept the way Postfix keeps
   them (RET and ENVID for the sender, NOTIFY and ORCPT for a recipient); the others
   are dropped with Postfix's warning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from smtpgate.milter.protocol import (
    AddHeader,
    AddRcpt,
    ChgFrom,
    ChgHeader,
    DelRcpt,
    InsHeader,
    ReplBody,
)

CRLF = b"\r\n"


def header_label_length(line: bytes) -> int:
    """The length of the header label that starts ``line``; 0 when it is no header
    (Postfix ``is_header_buf``)."""
    length = 0
    blanks = False
    for byte in line:
        if byte == 0x3A:  # ':'
            return length
        if byte in (0x20, 0x09):
            if length == 0:
                return 0
            blanks = True
            continue
        if blanks or byte < 0x21 or byte > 0x7E:
            return 0
        length += 1
    return 0


def valid_header_name(name: bytes) -> bool:
    """A name a milter may give a new header: a Postfix header label, nothing else."""
    return bool(name) and header_label_length(name + b":") == len(name)


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line


@dataclass(frozen=True, slots=True)
class Header:
    """One header as it stands in the message: its lines with their line ends."""

    raw: bytes
    hidden: bool = False

    @property
    def name(self) -> bytes:
        return self.raw[: header_label_length(self.raw)]

    def milter_value(self, leading_space: bool = False) -> bytes:
        """The value as a milter receives it: after the colon, lines joined by LF, one
        leading space dropped unless the milter asked for SMFIP_HDR_LEADSPC."""
        rest = self.raw[header_label_length(self.raw) :]
        rest = rest.lstrip(b" \t")[1:]  # the blanks before the colon, and the colon
        if not leading_space and rest.startswith(b" "):
            rest = rest[1:]
        return b"\n".join(_strip_eol(line) for line in rest.splitlines(keepends=True)) or b""


@dataclass(frozen=True, slots=True)
class Message:
    """A message split into headers, the empty line and the body."""

    headers: tuple[Header, ...]
    separator: bytes
    """The empty line between headers and body (``b""`` when the message has none)."""
    body: bytes

    def render(self) -> bytes:
        return b"".join(h.raw for h in self.headers) + self.separator + self.body

    def visible_headers(self) -> list[Header]:
        """The headers a milter is shown, in order."""
        return [h for h in self.headers if not h.hidden]

    def milter_body(self) -> bytes:
        """The body as a milter receives it: every line ended with CRLF."""
        if self.body and not self.body.endswith(b"\n"):
            return self.body + CRLF
        return self.body


def parse(content: bytes, hidden: int = 0) -> Message:
    """Split ``content``; its first ``hidden`` headers are smtpgate's own."""
    headers: list[bytes] = []
    pos = 0
    size = len(content)
    separator = b""
    while pos < size:
        end = content.find(b"\n", pos)
        end = size if end < 0 else end + 1
        line = content[pos:end]
        text = _strip_eol(line)
        if not text and line:
            separator = line
            pos = end
            break
        if headers and text[:1] in (b" ", b"\t"):
            headers[-1] += line
        elif header_label_length(text):
            headers.append(line)
        else:
            break
        pos = end
    return Message(
        tuple(Header(raw, i < hidden) for i, raw in enumerate(headers)),
        separator,
        content[pos:],
    )


def _terminated(headers: tuple[Header, ...]) -> tuple[Header, ...]:
    """Headers whose last one ends with a line end, so that another can follow."""
    if headers and not headers[-1].raw.endswith(b"\n"):
        last = headers[-1]
        return (*headers[:-1], replace(last, raw=last.raw + CRLF))
    return headers


def format_header(name: bytes, value: bytes, space: bytes = b" ") -> bytes:
    """``name:`` + space + value as header lines ending in CRLF (see the module doc)."""
    lines = [_strip_eol(line) for line in value.split(b"\n")]
    out = [name + b":" + space + lines[0]]
    for line in lines[1:]:
        if not line.strip(b" \t\r"):
            continue
        out.append(line if line[:1] in (b" ", b"\t") else b"\t" + line)
    return CRLF.join(out) + CRLF


def add_header(message: Message, name: bytes, value: bytes, space: bytes = b" ") -> Message:
    """Append a header after the last one."""
    new = Header(format_header(name, value, space))
    return replace(message, headers=(*_terminated(message.headers), new))


def insert_header(
    message: Message, index: int, name: bytes, value: bytes, space: bytes = b" "
) -> Message:
    """Insert before the header at 0-based ``index`` (over all headers, hidden ones too);
    an index past the last header appends."""
    if index < 0:
        index = 0
    if index >= len(message.headers):
        return add_header(message, name, value, space)
    new = Header(format_header(name, value, space))
    headers = message.headers
    return replace(message, headers=(*headers[:index], new, *headers[index:]))


def _find(message: Message, index: int, name: bytes) -> int | None:
    """The position of the index-th (1-based) visible header called ``name``."""
    wanted = name.lower()
    for position, header in enumerate(message.headers):
        if header.hidden or header.name.lower() != wanted:
            continue
        index -= 1
        if index == 0:
            return position
    return None


def change_header(
    message: Message, index: int, name: bytes, value: bytes, space: bytes = b" "
) -> Message:
    """Replace the index-th header called ``name`` (index 0 counts as 1); an empty value
    deletes it. A header that is not there is appended (Postfix cleanup_upd_header)."""
    if not value:
        return delete_header(message, index, name)
    position = _find(message, max(index, 1), name)
    if position is None:
        return add_header(message, name, value, space)
    headers = message.headers
    new = Header(format_header(name, value, space))
    return replace(message, headers=(*headers[:position], new, *headers[position + 1 :]))


def delete_header(message: Message, index: int, name: bytes) -> Message:
    """Remove the index-th header called ``name`` (index 0 counts as 1), if it is there."""
    position = _find(message, max(index, 1), name)
    if position is None:
        return message
    headers = message.headers
    return replace(message, headers=(*headers[:position], *headers[position + 1 :]))


def replace_body(message: Message, body: bytes) -> Message:
    """The body replaced by ``body`` as Postfix stores a milter's replacement."""
    lines = body.split(b"\n")
    last = lines.pop()
    out = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if last:
        out.append(last)
    new_body = b"".join(line + CRLF for line in out)
    return replace(message, headers=_terminated(message.headers), separator=CRLF, body=new_body)


HeaderEdit = AddHeader | InsHeader | ChgHeader


def apply_header_edit(message: Message, edit: HeaderEdit, space: bytes = b" ") -> Message:
    """One SMFIR_ADDHEADER, SMFIR_INSHEADER or SMFIR_CHGHEADER reply applied."""
    if isinstance(edit, AddHeader):
        return add_header(message, edit.name, edit.value, space)
    if isinstance(edit, InsHeader):
        return insert_header(message, edit.index, edit.name, edit.value, space)
    return change_header(message, edit.index, edit.name, edit.value, space)


def apply(
    content: bytes,
    edits: Iterable[HeaderEdit | ReplBody],
    *,
    hidden: int = 0,
    leading_space: bool = False,
) -> bytes:
    """``content`` with the header and body edits of one milter applied in order (the
    REPLBODY pieces are joined into one replacement)."""
    message = parse(content, hidden)
    space = b"" if leading_space else b" "
    body: list[bytes] | None = None
    for edit in edits:
        if isinstance(edit, ReplBody):
            body = [] if body is None else body
            body.append(edit.chunk)
        else:
            message = apply_header_edit(message, edit, space)
    if body is not None:
        message = replace_body(message, b"".join(body))
    return message.render()


# --- the envelope --------------------------------------------------------------------

Warn = Callable[[str], None]


def external_address(text: str) -> str:
    """The address of a milter's envelope edit without its ``<>`` (Postfix parses it as
    an RFC 822 address and keeps the first; a ``<...>`` part wins)."""
    value = text.strip()
    start = value.find("<")
    if start >= 0:
        end = value.find(">", start)
        if end > start:
            return value[start + 1 : end].strip()
    return value


@dataclass
class EnvelopeEdits:
    """The envelope changes of one message, from every milter, in order.

    The caller removes ``delete_recipients`` from the transaction's recipients (each as
    the client gave it, compared exactly, as Postfix compares them), then appends
    ``add_recipients``.
    """

    sender: tuple[str, tuple[str, ...]] | None = None
    add_recipients: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    delete_recipients: list[str] = field(default_factory=list)

    def apply(self, edit: ChgFrom | AddRcpt | DelRcpt, warn: Warn, queue_id: str = "") -> None:
        """Record one SMFIR_CHGFROM, SMFIR_ADDRCPT(_PAR) or SMFIR_DELRCPT reply."""
        qid = queue_id or "NOQUEUE"
        if isinstance(edit, ChgFrom):
            args = []
            for arg in edit.args.split():
                if arg[:4].upper() == "RET=" or arg[:6].upper() == "ENVID=":
                    args.append(arg)
                else:
                    warn(f'Ignoring bad ESMTP parameter "{arg}" in SMFI_CHGFROM request')
            self.sender = (external_address(edit.sender), tuple(args))
        elif isinstance(edit, AddRcpt):
            address = external_address(edit.recipient)
            if not address:
                warn(f"{qid}: ignoring attempt from Milter to add null recipient")
                return
            kept = []
            for arg in edit.args.split():
                if arg[:7].upper() == "NOTIFY=" or arg[:6].upper() == "ORCPT=":
                    kept.append(arg)
                else:
                    warn(
                        f"{qid}: ignoring ESMTP argument from Milter or "
                        f'header/body_checks: "{arg[:100]}"'
                    )
            self.add_recipients.append((address, tuple(kept)))
        else:
            address = external_address(edit.recipient)
            self.add_recipients = [r for r in self.add_recipients if r[0] != address]
            if address not in self.delete_recipients:
                self.delete_recipients.append(address)
