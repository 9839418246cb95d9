"""postscreen's dummy SMTP engine: what a client that postscreen enforces talks to.

Ported from Postfix 3.7 ``postscreen_smtpd.c``.  A client that failed a test whose
action is ``enforce`` never reaches smtpd: it gets postscreen's replies, every RCPT (and
VRFY) gets the failed test's reply with a ``NOQUEUE: reject: RCPT`` line, DATA and BDAT
end the session, QUIT gets ``221 2.0.0 Bye``.  Nothing is checked by smtpd's
restrictions, no milter hears of it and nothing reaches the backend.  The SMTP machine
hands each command line to :meth:`DummyEngine.command` once the client is enforced; the
deep tests keep running on the same lines before that (``Screening.command_line``).
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpgate.postscreen.screen import Screening
from smtpgate.reply import Reply

COMMAND_COUNT_LIMIT = 20  # postscreen_command_count_limit
KNOWN = frozenset(
    "HELO EHLO STARTTLS XCLIENT XFORWARD AUTH MAIL RCPT DATA BDAT RSET NOOP VRFY ETRN QUIT".split()
)
NOT_RECOGNIZED = Reply(502, "", "5.5.2 Error: command not recognized")
OK = Reply(250, "", "2.0.0 Ok")


def _reply(text: str, disconnect: bool = False) -> Reply:
    """A reply written as postscreen writes it (some have no enhanced status code)."""
    code, _, rest = text.partition(" ")
    return Reply(int(code), "", rest, disconnect=disconnect)


def extract_address(text: str) -> str:
    """psc_extract_addr(): the address of ``FROM:<...>``/``TO:<...>``, unquoted."""
    text = text.lstrip(" ")
    stop = ">" if text.startswith("<") else " "
    if text.startswith("<"):
        text = text[1:]
    out: list[str] = []
    inquote = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == stop and not inquote:
            break
        if ch == '"':
            inquote = not inquote
        else:
            if ch == "\\":
                i += 1
                if i >= len(text):
                    break
                ch = text[i]
            out.append(ch)
        i += 1
    address = "".join(out)
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]
    return address


@dataclass
class EngineSettings:
    """What the dummy engine's replies show (from smtpd's parameters, as postscreen's
    defaults take them)."""

    hostname: str
    size_limit: int
    disable_vrfy: bool
    helo_required: bool
    soft_bounce: bool = False


class DummyEngine:
    """One enforced client's session with postscreen's dummy engine."""

    def __init__(self, screening: Screening, settings: EngineSettings) -> None:
        self.screening = screening
        self.settings = settings
        self.helo_name: str | None = None
        self.sender: str | None = None
        self.protocol = "SMTP"
        self.commands = 0

    def command(self, verb: str, args: str) -> Reply:
        """The reply to one command line (``args``: the rest of the line)."""
        upper = verb.upper()
        self.commands += 1
        if self.commands > COMMAND_COUNT_LIMIT and upper != "QUIT":
            s = self.screening
            s.log.info(f"COMMAND COUNT LIMIT from {s.addr_port} after {self.where}")
            s.dropped = True
            return Reply(
                421, "", f"{self.settings.hostname} Service unavailable - try again later", True
            )
        handler = _HANDLERS.get(upper)
        reply = handler(self, args.strip(" ")) if handler is not None else NOT_RECOGNIZED
        self.where = upper if upper in KNOWN else "UNIMPLEMENTED"
        return reply

    where = "CONNECT"

    def helo(self, args: str) -> Reply:
        name = args.split(" ", 1)[0] if args else ""
        if not name:
            return _reply("501 Syntax: HELO hostname")
        self.helo_name, self.sender = name, None
        return Reply(250, "", self.settings.hostname)

    def ehlo(self, args: str) -> Reply:
        name = args.split(" ", 1)[0] if args else ""
        if not name:
            return _reply("501 Syntax: EHLO hostname")
        self.helo_name, self.sender, self.protocol = name, None, "ESMTP"
        size = self.settings.size_limit
        lines = [self.settings.hostname, f"SIZE {size}" if size else "SIZE"]
        if not self.settings.disable_vrfy:
            lines.append("VRFY")
        lines += ["ETRN", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
        return Reply(250, "", "\n".join(lines))

    def mail(self, args: str) -> Reply:
        if self.settings.helo_required and self.helo_name is None:
            return _reply("503 5.5.1 Error: send HELO/EHLO first")
        if self.sender is not None:
            return _reply("503 5.5.1 Error: nested MAIL command")
        if ":" not in args:
            return _reply("501 5.5.4 Syntax: MAIL FROM:<address>")
        self.sender = extract_address(args.split(":", 1)[1])
        return _reply("250 2.1.0 Ok")

    def rcpt(self, args: str) -> Reply:
        if self.sender is None:
            return _reply("503 5.5.1 Error: need MAIL command")
        if ":" not in args:
            return _reply("501 5.5.4 Syntax: RCPT TO:<address>")
        address = extract_address(args.split(":", 1)[1])
        s = self.screening
        reply = s.rcpt_reply or _reply("450 4.3.2 Service currently unavailable")
        logged = reply
        if self.settings.soft_bounce and reply.code >= 500:
            dsn = "4" + reply.dsn[1:] if reply.dsn.startswith("5") else reply.dsn
            logged = Reply(reply.code - 100, dsn, reply.text)
        s.log.info(
            f"NOQUEUE: reject: RCPT from {s.addr_port}: {_text(logged)}; "
            f"from=<{self.sender}>, to=<{address}>, proto={self.protocol}, "
            f"helo=<{self.helo_name or ''}>"
        )
        return reply

    def data(self, args: str) -> Reply:
        s = self.screening
        s.log.info(f"DATA without valid RCPT from {s.addr_port}")
        s.dropped = True
        if args:
            return _reply("501 5.5.4 Syntax: DATA", True)
        if self.sender is None:
            return _reply("503 5.5.1 Error: need RCPT command", True)
        return _reply("554 5.5.1 Error: no valid recipients", True)

    def bdat(self, args: str) -> Reply:
        s = self.screening
        s.log.info(f"BDAT without valid RCPT from {s.addr_port}")
        s.dropped = True
        if not args:
            return _reply("501 5.5.4 Syntax: BDAT count [LAST]", True)
        if self.sender is None:
            return _reply("554 5.5.1 Error: need MAIL command", True)
        return _reply("554 5.5.1 Error: no valid recipients", True)

    def rset(self, args: str) -> Reply:
        self.sender = None
        return OK

    def noop(self, args: str) -> Reply:
        return OK

    def vrfy(self, args: str) -> Reply:
        if not args:
            return _reply("501 5.5.4 Syntax: VRFY address")
        if self.settings.disable_vrfy:
            return _reply("502 5.5.1 VRFY command is disabled")
        return self.screening.rcpt_reply or _reply("450 4.3.2 Service currently unavailable")

    def etrn(self, args: str) -> Reply:
        if self.settings.helo_required and self.helo_name is None:
            return _reply("503 5.5.1 Error: send HELO/EHLO first")
        if not args:
            return _reply("500 Syntax: ETRN domain")
        return _reply("458 Unable to queue messages")

    def starttls(self, args: str) -> Reply:
        return _reply("502 5.5.1 Error: command not implemented")

    def quit(self, args: str) -> Reply:
        self.screening.dropped = True  # postscreen ends it: no HANGUP line
        return _reply("221 2.0.0 Bye", True)


def _text(reply: Reply) -> str:
    return f"{reply.code} {reply.dsn} {reply.text}" if reply.dsn else f"{reply.code} {reply.text}"


_HANDLERS = {
    "HELO": DummyEngine.helo,
    "EHLO": DummyEngine.ehlo,
    "STARTTLS": DummyEngine.starttls,
    "MAIL": DummyEngine.mail,
    "RCPT": DummyEngine.rcpt,
    "DATA": DummyEngine.data,
    "BDAT": DummyEngine.bdat,
    "RSET": DummyEngine.rset,
    "NOOP": DummyEngine.noop,
    "VRFY": DummyEngine.vrfy,
    "ETRN": DummyEngine.etrn,
    "QUIT": DummyEngine.quit,
}
