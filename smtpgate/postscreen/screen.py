"""One client's screening: postscreen's decisions and log lines, without I/O.

The driver (``smtpd.py``) runs the steps in postscreen's order and does the waiting:

1. :meth:`Screening.connect` logs ``CONNECT from [addr]:port to [server]:port`` and
   evaluates ``postscreen_access_list`` (``permit`` -> ``ALLOWLISTED``, no tests;
   ``reject`` -> ``DENYLISTED`` and ``postscreen_denylist_action``).
2. :meth:`Screening.cached` reads the client's cache record: when every enabled test is
   still valid, ``PASS OLD`` and no tests.  Otherwise the tests to do are known
   (:attr:`todo`).
3. For the early tests the driver sends :attr:`teaser` (``220-`` and the greet banner),
   asks the DNS lists (:func:`smtpgate.postscreen.dnsbl.query_sites`) and waits up to
   ``postscreen_greet_wait``, telling :meth:`pregreeted` about input that arrives; the
   wait ends early when only the DNS lists were waited for and they answered.
   :meth:`after_wait` scores the lists (``DNSBL rank N for``) and gives the outcome.
4. The deep tests run in the SMTP machine, which calls :meth:`command_line`,
   :meth:`bare_newline` and :meth:`rcpt_seen`; :attr:`rcpt_reply` is the
   ``enforce`` reply every RCPT gets.
5. :meth:`conclude` logs ``PASS NEW`` / ``PASS OLD`` when every test to do passed and
   returns the cache record to write.

The outcomes are postscreen's: ``ignore`` logs and goes on, ``enforce`` lets the session
go on but every RCPT gets postscreen's 550 (with its ``NOQUEUE: reject: RCPT`` line) and
nothing reaches the backend, ``drop`` answers 521 and disconnects.  Unlike postscreen,
a client that passes the deep tests is not asked to come back later: smtpgate is the
smtpd, so the session simply goes on (see docs/postscreen.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from smtpgate.errors import TableLookupError
from smtpgate.postscreen.cache import DISABLED, NEW, TESTS, Expiry
from smtpgate.postscreen.config import PostscreenConfig
from smtpgate.postscreen.dnsbl import Score
from smtpgate.reply import Reply

EARLY = ("pregreet", "dnsbl")
DEEP = ("pipelining", "non_smtp", "bare_newline")

DNSBL_FORMAT = "{code} 5.7.1 Service unavailable; client [{address}] blocked using {name}"
R521_DENYLIST = Reply(521, "5.3.2", "Service currently unavailable", disconnect=True)
R550_DENYLIST = Reply(550, "5.3.2", "Service currently unavailable")
R521_PROTOCOL = Reply(521, "5.5.1", "Protocol error", disconnect=True)
R550_PROTOCOL = Reply(550, "5.5.1", "Protocol error")
R502_NOT_RECOGNIZED = Reply(502, "5.5.2", "Error: command not recognized")
R521_NON_SMTP = Reply(521, "5.7.0", "Error: I can break rules, too. Goodbye.", disconnect=True)


class Log(Protocol):
    """postscreen's log (``postfix/postscreen`` lines)."""

    def info(self, text: str) -> None: ...

    def warning(self, text: str) -> None: ...


class AddressMatcher(Protocol):
    def match(self, address: str) -> bool: ...


def format_delta(seconds: float, sig_digits: int = 2, max_digits: int = 2) -> str:
    """Postfix's ``format_tv`` (postscreen: 2 significant digits, delay_max_res 2)."""
    million = 1_000_000
    seconds = max(seconds, 0.0)
    sec = int(seconds)
    usec = int(round((seconds - sec) * million))
    if usec >= million:
        sec, usec = sec + 1, usec - million
    ures = million // 10**max_digits
    wid = 10**sig_digits
    if ures < million:
        if sec > 0:
            n = 1
            while sec >= n and n <= wid // 10:
                n *= 10
            ures = (million // wid) * n
        else:
            while usec >= wid * ures:
                ures *= 10
    if ures > 1:
        usec += ures // 2
        if usec >= million:
            sec += 1
            usec -= million
    out = str(sec)
    if usec >= ures:
        out += "."
        rem, n = usec, million // 10
        while rem >= ures and n > 0:
            out += "0123456789"[rem // n]
            rem %= n
            n //= 10
    return out


def escape_text(data: bytes, limit: int = 100) -> str:
    """postscreen's ``escape()`` of client text: C escapes for controls, at most ``limit``."""
    out = []
    for byte in data:
        if byte == 0x0D:
            out.append("\\r")
        elif byte == 0x0A:
            out.append("\\n")
        elif byte == 0x09:
            out.append("\\t")
        elif byte == 0x5C:
            out.append("\\\\")
        elif 32 <= byte < 127:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)[:limit]


@dataclass
class Outcome:
    """What the driver does after the early tests."""

    reply: Reply | None = None
    """A disconnecting reply (drop), sent instead of the greeting."""
    greet: bool = True
    """Send the 220 greeting (postscreen sends none to a client that pregreeted)."""


class Screening:
    """One client's postscreen state (see the module docstring)."""

    def __init__(
        self,
        config: PostscreenConfig,
        log: Log,
        address: str,
        port: int | None,
        *,
        clock: Callable[[], float],
        on_pass: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.address = address
        self.port = port
        self.clock = clock
        self.on_pass = on_pass
        self.todo: set[str] = set()
        self.passed: set[str] = set()
        self.failed: set[str] = set()
        self.skip: set[str] = set()  # deep tests done for the rest of this session
        self.new = False
        self.expiry = Expiry.new()
        self.rcpt_reply: Reply | None = None
        """postscreen's enforce reply: every RCPT (and VRFY) gets it."""
        self.noforward = False
        self.concluded = False
        self.allowlisted = False
        self.pregreet_text = b""
        self.score: Score | None = None
        self.greeted = clock()  # when the tests after the SMTP handshake began
        self.dropped = False  # postscreen ended the session itself (DATA in enforce)

    # -- naming ---------------------------------------------------------------------

    @property
    def addr_port(self) -> str:
        return f"[{self.address}]:{self.port if self.port is not None else 'unknown'}"

    @property
    def running_deep_tests(self) -> bool:
        """Whether the machine must run deep tests (announce no PIPELINING, watch input)."""
        return bool(self.todo & set(DEEP)) and not self.concluded

    def deep_todo(self, test: str) -> bool:
        return test in self.todo and test not in self.skip and not self.concluded

    # -- 1. connect and the access list -------------------------------------------------

    def connect(self, server: tuple[str, int] | None, mynetworks: AddressMatcher) -> Outcome | None:
        """Log CONNECT and evaluate the access list: an outcome ends the screening
        (allowlisted: go on; denylisted with drop: the reply); None: go on screening."""
        host, sport = server if server is not None else ("unknown", "unknown")
        self.log.info(f"CONNECT from {self.addr_port} to [{host}]:{sport}")
        verdict = self._acl(self.config.access_list, mynetworks, "postscreen_access_list")
        respectful = self.config.respectful_logging
        if verdict == "permit":
            self.log.info(f"{'ALLOW' if respectful else 'WHITE'}LISTED {self.addr_port}")
            self.allowlisted = True
            self.concluded = True
            return Outcome()
        if verdict == "reject":
            self.log.info(f"{'DENY' if respectful else 'BLACK'}LISTED {self.addr_port}")
            action = self.config.denylist_action
            if action == "drop":
                return self._drop(R521_DENYLIST)
            if action == "enforce":
                self.failed.add("denylist")
                self._enforce(R550_DENYLIST)
        return None

    def _acl(self, items: tuple[str, ...], mynetworks: AddressMatcher, origin: str) -> str:
        """server_acl_eval(): permit, reject, dunno or error."""
        for item in items:
            word = item.lower()
            if word == "reject":
                return "reject"
            if word == "permit":
                return "permit"
            if word == "dunno":
                return "dunno"
            if word == "permit_mynetworks":
                try:
                    if mynetworks.match(self.address):
                        return "permit"
                except TableLookupError:
                    self.log.warning(
                        f"{origin}: {item}: mynetworks lookup error -- ignoring the "
                        "remainder of this access list"
                    )
                    return "error"
                continue
            table = self.config.tables.get(item)
            if table is None:
                self.log.warning(
                    f"{origin}: unknown command: {item} -- ignoring the remainder of "
                    "this access list"
                )
                return "error"
            try:
                value = table.lookup(self.address)
            except TableLookupError:
                self.log.warning(
                    f"{origin}: {item}: table lookup error -- ignoring the remainder of "
                    "this access list"
                )
                return "error"
            if value is not None:
                words = tuple(w for w in value.replace(",", " ").split() if w)
                result = self._acl(words, mynetworks, item)
                if result != "dunno":
                    return result
        return "dunno"

    # -- 2. the cache ----------------------------------------------------------------

    def cached(self, record: str | None) -> bool:
        """Decide the tests to do from the cache record; True: PASS OLD, nothing to do."""
        now = int(self.clock())
        if record is not None and not self.failed:
            self.expiry = Expiry.parse(record)
            self._todo(now)
            if not self.todo:
                self.log.info(f"PASS OLD {self.addr_port}")
                self.concluded = True
                return True
        else:
            self.expiry = Expiry.new()
            self._todo(now)
        return False

    def _enabled(self, test: str) -> bool:
        cfg = self.config
        return {
            "pregreet": cfg.pregreet_enable,
            "dnsbl": cfg.dnsbl_enable,
            "pipelining": cfg.pipelining_enable,
            "non_smtp": cfg.non_smtp_enable,
            "bare_newline": cfg.bare_newline_enable,
        }[test]

    def _todo(self, now: int) -> None:
        self.new = any(t == NEW for t in self.expiry.times)
        self.todo = {t for t in TESTS if self._enabled(t) and now > self.expiry.get(t)}

    # -- 3. the early tests ------------------------------------------------------------

    @property
    def teaser(self) -> bytes | None:
        """The first greeting line sent before the wait (None: no pregreet test)."""
        if "pregreet" not in self.todo or not self.config.greet_banner:
            return None
        return f"220-{self.config.greet_banner}\r\n".encode("utf-8", "replace")

    @property
    def early_todo(self) -> bool:
        return bool(self.todo & set(EARLY))

    def pregreeted(self, data: bytes, elapsed: float) -> Outcome | None:
        """The client talked before its turn; an outcome (drop) ends the wait at once."""
        if "pregreet" not in self.todo or "pregreet" in self.failed:
            return None
        self.pregreet_text = data
        self.log.info(
            f"PREGREET {len(data)} after {format_delta(elapsed)} from {self.addr_port}: "
            f"{escape_text(data)}"
        )
        self.failed.add("pregreet")
        action = self.config.greet_action
        if action == "drop":
            return self._drop(R521_PROTOCOL)
        if action == "enforce":
            self._enforce(R550_PROTOCOL)
        return None

    def dnsbl_allows(self, result: Score) -> bool:
        """The score is at or below the allow list threshold: the other tests are
        skipped (and the wait for a pregreet may end)."""
        cfg = self.config
        return (
            not self.failed
            and cfg.allowlist_threshold < 0
            and result.total < cfg.dnsbl_threshold
            and result.total <= cfg.allowlist_threshold
        )

    def after_wait(self, result: Score | None) -> Outcome:
        """The greet wait is over: the pregreet verdict, the DNSBL score, the outcome."""
        cfg, now = self.config, int(self.clock())
        self.greeted = self.clock()
        if "pregreet" in self.todo and "pregreet" not in self.failed:
            self.expiry.set("pregreet", now + cfg.greet_ttl)
            self.passed.add("pregreet")
        if "pregreet" in self.failed and cfg.greet_action == "ignore":
            self.failed.discard("pregreet")
        greet = "pregreet" not in self.failed or cfg.greet_action == "ignore"
        if "dnsbl" in self.todo:
            result = result or Score(0, None, cfg.dnsbl_min_ttl, complete=False)
            self.score = result
            if self.dnsbl_allows(result):
                self._allowlist_others(now, result.ttl)
            if result.total < cfg.dnsbl_threshold:
                self.expiry.set("dnsbl", now + result.ttl)
                self.passed.add("dnsbl")
            else:
                self.log.info(f"DNSBL rank {result.total} for {self.addr_port}")
                name = self._reply_name(result.name or "")
                if cfg.dnsbl_action == "drop":
                    text = DNSBL_FORMAT.format(code=521, address=self.address, name=name)
                    return self._drop(_reply(text, disconnect=True))
                if cfg.dnsbl_action == "enforce":
                    self.failed.add("dnsbl")
                    text = DNSBL_FORMAT.format(code=550, address=self.address, name=name)
                    self._enforce(_reply(text))
        if self.failed:
            # postscreen turns on every deep test for a client that failed an early one
            self.todo |= set(DEEP)
        if not (self.todo & set(DEEP)) or self.todo <= self.passed:
            self.conclude()
        return Outcome(greet=greet)

    def hangup(self, elapsed: float, phase: str) -> None:
        """The client left during the tests (postscreen's psc_hangup_event)."""
        self.log.info(f"HANGUP after {format_delta(elapsed)} from {self.addr_port} in {phase}")
        self.noforward = True
        self.conclude()
        self.log.info(f"DISCONNECT {self.addr_port}")

    def _allowlist_others(self, now: int, ttl: int) -> None:
        """psc_allowlist_non_dnsbl(): every other test passes until the DNSBL result expires."""
        for test in TESTS:
            if test == "dnsbl":
                continue
            if test in self.todo and test not in self.passed:
                self.passed.add(test)
                self.skip.add(test)
            if self.expiry.get(test) < now + ttl:
                self.expiry.set(test, now + ttl)
        self.allowlisted = True

    def _reply_name(self, domain: str) -> str:
        table = self.config.reply_map
        if table is None or not domain:
            return domain
        try:
            mapped = table.lookup(domain)
        except TableLookupError:
            self.log.warning(f"postscreen_dnsbl_reply_map: lookup error for {domain}")
            return domain
        return mapped if mapped else domain

    # -- 4. the deep tests (the SMTP machine asks) -------------------------------------

    def command_line(
        self, verb: str, known: bool, pending: bytes, dummy: bool = False
    ) -> Reply | None:
        """A command line was read; ``pending``: input behind it.  A reply to send
        instead of handling the command (a drop reply ends the session); None: go on
        (maybe with an enforce reply set).  ``dummy``: the dummy engine handles it."""
        if self.deep_todo("non_smtp") and not known and self.config.forbidden.match(verb):
            rest = self._line.lstrip(b" \t")[len(verb.encode("utf-8", "replace")) :]
            text = escape_text(rest.lstrip(b" \t"))
            self.log.info(
                f"NON-SMTP COMMAND from {self.addr_port} after {self._where}: "
                f"{_printable(verb)} {text}"
            )
            reply = self._deep_failed("non_smtp", self.config.non_smtp_action, R521_NON_SMTP)
            if reply is not None or dummy:
                return reply
            # ignore or enforce: postscreen answers the unknown command itself (smtpd
            # would hang up on a forbidden command)
            return R502_NOT_RECOGNIZED
        if self.deep_todo("pipelining") and pending:
            self.log.info(
                f"COMMAND PIPELINING from {self.addr_port} after {_printable(verb)}: "
                f"{escape_text(pending)}"
            )
            reply = self._deep_failed("pipelining", self.config.pipelining_action, R521_PROTOCOL)
            if reply is not None:
                return reply
        return None

    _where = "CONNECT"
    _line = b""

    def before_command(self, where: str, line: bytes) -> None:
        """What the non-SMTP line names: the stage before the command, the line."""
        self._where, self._line = where, line

    def bare_newline(self, line: bytes) -> Reply | None:
        """A command line ended in a bare LF."""
        if not self.deep_todo("bare_newline"):
            return None
        text = escape_text(line.rstrip(b"\n"))
        self.log.info(f"BARE NEWLINE from {self.addr_port} after {text}")
        return self._deep_failed("bare_newline", self.config.bare_newline_action, R521_PROTOCOL)

    def _deep_failed(self, test: str, action: str, drop: Reply) -> Reply | None:
        self.skip.add(test)
        self.passed.discard(test)
        self.expiry.set(test, DISABLED)
        if action == "drop":
            self.failed.add(test)
            return self._drop(drop).reply
        if action == "enforce":
            self.failed.add(test)
            self._enforce(R550_PROTOCOL)
            return None
        # ignore: pass for a short time ("until something else expires")
        self.passed.add(test)
        self.expiry.set(test, int(self.clock()) + self.config.min_ttl)
        return None

    def rcpt_seen(self) -> None:
        """The deep tests pass once the client got as far as RCPT TO."""
        if self.concluded:
            return
        now = int(self.clock())
        ttls = {
            "bare_newline": self.config.bare_newline_ttl,
            "non_smtp": self.config.non_smtp_ttl,
            "pipelining": self.config.pipelining_ttl,
        }
        for test, ttl in ttls.items():
            if test in self.todo and test not in self.passed and test not in self.failed:
                self.passed.add(test)
                self.expiry.set(test, now + ttl)
        if not self.failed and self.todo <= self.passed:
            self.conclude()

    # -- 5. the verdict --------------------------------------------------------------

    def _enforce(self, reply: Reply) -> None:
        self.rcpt_reply = reply
        self.noforward = True

    def _drop(self, reply: Reply) -> Outcome:
        self.noforward = True
        self.conclude()
        self.log.info(f"DISCONNECT {self.addr_port}")
        return Outcome(reply=reply, greet=False)

    def conclude(self) -> str | None:
        """psc_conclude(): PASS NEW/OLD when every test to do passed; the record to
        cache (also handed to ``on_pass``), or None."""
        if self.concluded:
            return None
        self.concluded = True
        passed = set() if self.failed else self.passed
        if passed and self.todo <= passed:
            self.log.info(f"PASS {'NEW' if self.new else 'OLD'} {self.addr_port}")
        if not passed:
            return None
        for test in TESTS:  # disabled tests never passed: mark them disabled
            if not self._enabled(test) and self.expiry.get(test) == NEW:
                self.expiry.set(test, DISABLED)
        record = self.expiry.format()
        if passed and self.on_pass is not None:
            self.on_pass(record)
        return record

    def cache_ttl(self) -> float:
        """How long the record is kept: until its last test expires, plus retention."""
        return max(self.expiry.last() - self.clock(), 0) + self.config.cache_retention

    def closed(self, quit: bool = True) -> None:
        """The session ended (the machine closes): postscreen's last lines of a session
        it enforced (HANGUP when the client left without QUIT, then DISCONNECT)."""
        concluded = self.concluded
        if not concluded:
            self.conclude()
        if self.noforward and self.rcpt_reply is not None and not concluded:
            if not quit and not self.dropped:
                elapsed = self.clock() - self.greeted
                self.log.info(
                    f"HANGUP after {format_delta(elapsed)} from {self.addr_port} "
                    "in tests after SMTP handshake"
                )
            self.log.info(f"DISCONNECT {self.addr_port}")


def _reply(text: str, disconnect: bool = False) -> Reply:
    code, dsn, rest = text.split(" ", 2)
    return Reply(int(code), dsn, rest, disconnect=disconnect)


def _printable(text: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
