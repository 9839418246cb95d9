"""SMTP syntax as Postfix's smtpd reads it: command words, addresses, parameters, replies.

Pure functions on text, no state: :func:`smtpd_tokens` splits a command line as
``smtpd_token()`` does, :func:`parse_address` is ``extract_addr()`` (an address in the
client's form becomes one in internal form: ``"a b"@x`` is ``a b@x``), and the parameter
checks are the loops of ``mail_cmd()`` and ``rcpt_cmd()``, with Postfix's reply texts.
The replies smtpgate gives of its own (not from the restrictions or the backend) are
named here, once.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from smtpgate.policy.address import dup_if_truncate, valid_hostname, valid_mailhost_addr
from smtpgate.reply import Reply

OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
BYE = Reply(221, "2.0.0", "Bye", disconnect=True)
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
BAD_UTF8 = Reply(500, "5.5.2", "Error: bad UTF-8 syntax")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NO_AUTH = Reply(503, "5.5.1", "Error: authentication not enabled")
NOT_AUTHORIZED = Reply(550, "5.7.0", "Error: insufficient authorization")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
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
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
VRFY_DISABLED = Reply(502, "5.5.1", "VRFY command is disabled")


def syntax(usage: str) -> Reply:
    """Postfix's ``501 5.5.4 Syntax: ...`` reply."""
    return Reply(501, "5.5.4", f"Syntax: {usage}")


# Postfix's order of the counters in the "disconnect from" line.
COUNTED = "helo ehlo starttls auth mail rcpt data bdat rset noop vrfy etrn quit unknown".split()
ALLOWED_BEFORE_TLS = frozenset({"HELO", "EHLO", "STARTTLS", "NOOP", "RSET", "QUIT"})
# smtpd.c's command table: SMTPD_CMD_FLAG_LIMIT (junk commands) and SMTPD_CMD_FLAG_LAST (must
# end a pipelined group, RFC 2920 section 3.1).
JUNK_COMMANDS = frozenset({"HELO", "EHLO", "RSET", "NOOP", "VRFY", "ETRN"})
LAST_IN_GROUP = frozenset({"HELO", "EHLO", "DATA", "NOOP", "VRFY"})
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"^[0-9]+$")
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})+$")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
_XTEXT_PLAIN = re.compile(r"[!-*,-<>-~]*")  # "!".."~" without "+" and "="
OFF_T_MAX = 2**63 - 1  # SIZE beyond this: Postfix's "file system imposed limit"


def check_mail_params(params: list[str]) -> tuple[Reply | None, int]:
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


def check_rcpt_params(params: list[str]) -> Reply | None:
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


def acceptable_address(address: str) -> bool:
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


def escape(data: bytes) -> str:
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


@functools.lru_cache(maxsize=1024)
def wire(reply: Reply) -> bytes:
    """A reply's bytes on the wire (cached: most replies are the same few texts).

    Postfix's printable(): a control character in a reply (say, from an address the
    client sent) goes out as a space.
    """
    lines = (_UNPRINTABLE.sub(" ", line) for line in reply.lines())
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "replace")


def xtext(value: str, limit: int = 255) -> str:
    """RFC 3461 xtext (``+HH`` for octets outside ``!``..``~`` and for ``+``/``=``).

    The result is cut at a character boundary so that it is at most *limit* octets.
    """
    if len(value) <= limit and _XTEXT_PLAIN.fullmatch(value):
        return value  # the usual case: nothing to encode
    out: list[str] = []
    size = 0
    for char in value:
        piece = "".join(
            chr(b) if 33 <= b <= 126 and b not in (43, 61) else f"+{b:02X}"
            for b in char.encode("utf-8", "surrogateescape")
        )
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)
