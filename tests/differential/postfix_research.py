"""Record Postfix 3.7 transcripts for docs/postfix-behaviour.md (a tool, not a test).

    .venv/bin/python -m tests.differential.postfix_research [EXPERIMENT ...] > out.md

Each experiment starts a throwaway Postfix (tests/postfix_instance.py) with its main.cf lines,
plus a tiny recording SMTP server as its relayhost (and a second one for FILTER), types
raw sessions from 127.0.0.2, and prints: the main.cf lines, the transcript (``>`` sent,
``<`` received, byte-exact with CR/LF shown as ``\\r``/``\\n`` where they are not the line end),
every Postfix log line of the session (smtpd, cleanup, qmgr, smtp: queue ids normalised),
and what the relayhost received (envelope, and the DATA bytes as they were on the wire).
"""

from __future__ import annotations

import re
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tests.postfix_instance import PostfixInstance, RawStep, free_port, raw_session

CLIENT = "127.0.0.2"

BASE = """\
compatibility_level = 3.6
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
local_recipient_maps = inline:{ postmaster=x, alice=x }
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
smtpd_junk_command_limit = 1000
smtp_host_lookup = native
"""


# ----------------------------------------------------------------------------- recording sink


@dataclass
class Received:
    commands: list[str] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        rec = Received()
        self.server.sessions.append(rec)  # type: ignore[attr-defined]
        w = self.wfile
        w.write(b"220 sink.example ESMTP\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            cmd = line.decode("utf-8", "replace").rstrip("\r\n")
            rec.commands.append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            if verb == "EHLO":
                w.write(b"250-sink.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 DSN\r\n")
            elif verb == "DATA":
                w.write(b"354 go\r\n")
                buf = b""
                while not buf.endswith(b"\r\n.\r\n") and buf != b".\r\n":
                    chunk = self.rfile.readline()
                    if not chunk:
                        return
                    buf += chunk
                rec.data.append(buf)
                w.write(b"250 2.0.0 Ok: stored\r\n")
            elif verb == "QUIT":
                w.write(b"221 bye\r\n")
                return
            else:
                w.write(b"250 2.0.0 Ok\r\n")


class Sink(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.sessions: list[Received] = []
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


# ----------------------------------------------------------------------------- printing


def show(data: bytes) -> list[str]:
    out = []
    for part in re.split(rb"(?<=\r\n)", data):
        if not part:
            continue
        body = part[:-2] if part.endswith(b"\r\n") else part
        text = body.decode("utf-8", "backslashreplace").replace("\r", "\\r").replace("\n", "\\n")
        if not part.endswith(b"\r\n"):
            text += "   (no CRLF)"
        out.append(text)
    return out


_QID = re.compile(r"\b[0-9A-F]{8,12}\b")


def log_slice(pf: PostfixInstance, offset: int) -> list[str]:
    with pf.maillog.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        m = re.search(r"(postfix[\w/.-]*)\[\d+\]: (.*)$", line)
        if not m or "dict_nis_init" in line or "unknown[127.0.0.1]" in line:
            continue
        who = m[1].rsplit("/", 1)[-1]
        msg = _QID.sub("QUEUEID", m[2]).replace(str(pf.etc), "@DIR@")
        msg = re.sub(r"delay=[\d.]+, delays=[\d./]+, dsn", "delay=., dsn", msg)
        msg = re.sub(r"127\.0\.0\.1\]:\d+", "127.0.0.1]:PORT", msg)
        msg = re.sub(r"sink\.example\[127\.0\.0\.1\]:\d+", "sink[127.0.0.1]:PORT", msg)
        out.append(f"{who}: {msg}")
    return out


def wait_log(pf: PostfixInstance, offset: int, pred: Callable[[list[str]], bool], t=8.0):
    end = time.monotonic() + t
    while time.monotonic() < end:
        lines = log_slice(pf, offset)
        if pred(lines):
            return lines
        time.sleep(0.05)
    return log_slice(pf, offset)


def session(  # noqa: C901  (a printer)
    pf: PostfixInstance,
    title: str,
    steps: Sequence[RawStep | bytes | str],
    *,
    deliver: int = 0,
    sinks: Sequence[Sink] = (),
    extra: Callable[[], str] | None = None,
) -> None:
    offset = pf.maillog.stat().st_size if pf.maillog.exists() else 0
    before = [(len(s.sessions)) for s in sinks]
    d = raw_session("127.0.0.1", pf.port, CLIENT, steps)
    print(f"\n#### {title}\n\n```")
    for line in d.greeting:
        print(f"< {line}")
    if d.greeting_closed:
        print("[closed]")
    for x in d.exchanges:
        for line in show(x.sent):
            print(f"> {line}")
        for reply in x.replies:
            for line in reply:
                print(f"< {line}")
        if x.closed:
            print("[closed by server]")
    print("```")

    def done(lines: list[str]) -> bool:
        if not any("disconnect from" in ln for ln in lines):
            return False
        finished = sum(1 for ln in lines if "removed" in ln or "status=" in ln or ": hold: " in ln)
        return finished >= deliver

    lines = wait_log(pf, offset, done)
    if deliver:
        time.sleep(0.3)
        lines = log_slice(pf, offset)
    print("\nLog:\n\n```")
    for ln in lines:
        print(ln)
    print("```")
    for sink, n in zip(sinks, before, strict=True):
        for rec in sink.sessions[n:]:
            print(f"\nRelayhost/next hop on port {sink.port} received:\n\n```")
            for c in rec.commands:
                print(f"C: {c}")
            for data in rec.data:
                print("DATA bytes:")
                for line in show(data):
                    print(f"   {line}")
            print("```")
    if extra:
        print(extra())


def experiment(name: str, main_cf: str, tables: dict[str, str] | None = None, relay: bool = False):
    """A decorator: the function gets (pf, sinks) and runs sessions."""

    def deco(fn):
        EXPERIMENTS[name] = (main_cf, tables or {}, relay, fn)
        return fn

    return deco


EXPERIMENTS: dict[str, tuple] = {}


def run(name: str) -> None:
    main_cf, tables, relay, fn = EXPERIMENTS[name]
    sinks = [Sink(), Sink()] if relay else []
    text = BASE + main_cf
    if relay:
        text += f"relayhost = [127.0.0.1]:{sinks[0].port}\n"
        text = text.replace("@SINK2@", str(sinks[1].port))
    print(f"\n## {name}\n\nmain.cf (after the common lines):\n\n```\n{main_cf.strip()}\n```")
    with PostfixInstance(text, tables) as pf:
        fn(pf, sinks)
    for s in sinks:
        s.shutdown()


# ----------------------------------------------------------------------------- experiments

EHLO = "EHLO client.example.net"
HELO = "HELO client.example.net"
MAIL = "MAIL FROM:<sender@example.net>"
RCPT = "RCPT TO:<bob@bar.org>"
MSG = RawStep(b"Subject: test\r\n\r\nhello\r\n.\r\n", 1)


def one(cmds):
    return RawStep(b"".join(c.encode() + b"\r\n" for c in cmds), len(cmds))


CLIENT_REJECT = "smtpd_client_restrictions = check_client_access inline:{ 127.0.0.2=REJECT }\n"

FOLLOW = [
    "HELO x.example",
    EHLO,
    MAIL,
    RCPT,
    "DATA",
    "RSET",
    "NOOP",
    "VRFY bob@bar.org",
    "ETRN bar.org",
    "STARTTLS",
    "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
    "BDAT 1 LAST",
    "FOO",
    "QUIT",
]


@experiment("p1-connect-reject-delay-no", "smtpd_delay_reject = no\n" + CLIENT_REJECT)
def _p1a(pf, sinks):
    session(pf, "rejected at connect: every later command, in sequence", FOLLOW)
    session(pf, "rejected at connect: EHLO then MAIL, RCPT (proto=)", [EHLO, MAIL, RCPT, "QUIT"])
    session(pf, "rejected at connect: QUIT at once", ["QUIT"])


@experiment(
    "p1-helo-reject-delay-no",
    "smtpd_delay_reject = no\n"
    "smtpd_helo_restrictions = check_helo_access inline:{ bad.example=REJECT }\n",
)
def _p1b(pf, sinks):
    session(
        pf, "HELO rejected, then MAIL/RCPT/DATA", ["HELO bad.example", MAIL, RCPT, "RSET", "QUIT"]
    )
    session(pf, "EHLO rejected, then MAIL/RCPT", ["EHLO bad.example", MAIL, RCPT, "QUIT"])
    session(
        pf, "HELO rejected, then HELO good", ["HELO bad.example", "HELO good.example", MAIL, RCPT]
    )


@experiment(
    "p1-helo-reject-delay-no-helo-required",
    "smtpd_delay_reject = no\nsmtpd_helo_required = yes\n"
    "smtpd_helo_restrictions = check_helo_access inline:{ bad.example=REJECT }\n",
)
def _p1c(pf, sinks):
    session(pf, "HELO rejected (helo required), then MAIL/RCPT", ["HELO bad.example", MAIL, RCPT])


@experiment(
    "p1-sender-reject-delay-no",
    "smtpd_delay_reject = no\n"
    "smtpd_sender_restrictions = check_sender_access inline:{ blocked.example=REJECT }\n",
)
def _p1d(pf, sinks):
    session(
        pf, "MAIL rejected, then RCPT", [EHLO, "MAIL FROM:<a@blocked.example>", RCPT, MAIL, RCPT]
    )


@experiment("p1-connect-reject-delay-yes", CLIENT_REJECT)
def _p1e(pf, sinks):
    session(
        pf,
        "delay_reject=yes (reference): client reject at RCPT",
        [HELO, MAIL, RCPT, "ETRN bar.org"],
    )


@experiment("p2-etrn-plain", "")
def _p2a(pf, sinks):
    session(pf, "EHLO keywords (defaults)", [EHLO])
    session(pf, "ETRN before HELO", ["ETRN bar.org"])
    session(
        pf,
        "ETRN forms",
        [
            EHLO,
            "ETRN bar.org",
            "ETRN example.org",
            "ETRN",
            "ETRN a b",
            "ETRN @bar.org",
            "ETRN #bar.org",
            "ETRN <bar.org>",
        ],
    )
    session(pf, "ETRN in a MAIL transaction", [EHLO, MAIL, "ETRN bar.org", RCPT, "ETRN bar.org"])
    session(pf, "ETRN after HELO", [HELO, "ETRN bar.org"])


@experiment("p2-etrn-client-reject", CLIENT_REJECT)
def _p2b(pf, sinks):
    session(
        pf, "client rejected (delay_reject=yes)", [EHLO, "ETRN bar.org", "ETRN example.org", "ETRN"]
    )
    session(pf, "before HELO", ["ETRN bar.org"])


@experiment(
    "p2-etrn-restrictions",
    "smtpd_etrn_restrictions = check_etrn_access inline:{ example.org=REJECT bar.org=OK }, "
    "check_client_access inline:{ 127.0.0.2=REJECT }\n",
)
def _p2c(pf, sinks):
    session(
        pf, "smtpd_etrn_restrictions", [EHLO, "ETRN example.org", "ETRN bar.org", "ETRN other.org"]
    )


@experiment(
    "p2-etrn-restrictions-client-pass",
    "smtpd_client_restrictions = permit\n"
    "smtpd_helo_restrictions = check_helo_access inline:{ bad.example=REJECT }\n"
    "smtpd_etrn_restrictions = check_etrn_access inline:{ example.org=REJECT }\n",
)
def _p2d(pf, sinks):
    session(
        pf,
        "etrn restrictions, helo restriction rejects",
        ["EHLO bad.example", "ETRN example.org", "ETRN bar.org"],
    )
    session(pf, "etrn restrictions", [EHLO, "ETRN example.org", "ETRN bar.org"])


@experiment("p2-etrn-delay-no", "smtpd_delay_reject = no\n" + CLIENT_REJECT)
def _p2e(pf, sinks):
    session(pf, "delay_reject=no, client rejected", [EHLO, "ETRN bar.org"])


NL_MSGS = [
    ("bare CR inside a line", b"Subject: cr\r\n\r\nab\rcd\r\nend\r\n.\r\n"),
    ("bare LF inside content", b"Subject: lf\r\n\r\nab\ncd\r\nend\r\n.\r\n"),
    ("dot-stuffed lone dot (..)", b"Subject: dots\r\n\r\nx\r\n..\r\n..x\r\ny\r\n.\r\n"),
    ("lone dot after bare LF (\\n.\\n)", b"Subject: lfdot\r\n\r\nhi\n.\nafter\r\n.\r\n"),
    ("CR LF LF", b"Subject: crlflf\r\n\r\nhi\r\n\nafter\r\n.\r\n"),
    ("dot CR LF after bare LF (\\n.\\r\\n)", b"Subject: x\r\n\r\nhi\n.\r\nafter\r\n.\r\n"),
    ("bare CR then dot (\\r.\\r\\n)", b"Subject: x\r\n\r\nhi\r.\r\nafter\r\n.\r\n"),
]


def _nl(pf, sinks, mode):
    for title, msg in NL_MSGS:
        session(
            pf,
            f"{mode}: {title}",
            [EHLO, MAIL, RCPT, "DATA", RawStep(msg, 1), "QUIT"],
            deliver=1 if mode != "reject" else 0,
            sinks=sinks,
        )


@experiment("p3-bare-newline-no", "", relay=True)
def _p3a(pf, sinks):
    _nl(pf, sinks, "no")


@experiment("p3-bare-newline-normalize", "smtpd_forbid_bare_newline = normalize\n", relay=True)
def _p3b(pf, sinks):
    _nl(pf, sinks, "normalize")
    session(pf, "normalize: command ending in bare LF", [b"EHLO client.example.net\n", "NOOP"])


@experiment("p3-bare-newline-reject", "smtpd_forbid_bare_newline = reject\n", relay=True)
def _p3c(pf, sinks):
    _nl(pf, sinks, "reject")
    session(pf, "reject: command ending in bare LF", [b"EHLO client.example.net\n", "NOOP"])
    session(pf, "reject: MAIL ending in bare LF", [EHLO, b"MAIL FROM:<a@example.net>\n", "NOOP"])
    session(pf, "reject: HELO with bare CR", [b"HELO a\rb\r\n", "NOOP"])
    session(
        pf,
        "reject: pipelined, bare LF in middle",
        [EHLO, RawStep(b"MAIL FROM:<a@example.net>\nRCPT TO:<bob@bar.org>\r\n", 2), "NOOP"],
    )


@experiment("p3-bare-newline-yes", "smtpd_forbid_bare_newline = yes\n", relay=True)
def _p3d(pf, sinks):
    session(
        pf,
        "yes: bare LF content",
        [EHLO, MAIL, RCPT, "DATA", RawStep(NL_MSGS[1][1], 1), "QUIT"],
        sinks=sinks,
    )


PIPE = b"MAIL FROM:<a@example.net>\r\nRCPT TO:<bob@bar.org>\r\nDATA\r\n"


def _pipe(pf, sinks, label):
    session(
        pf,
        f"{label}: HELO, then MAIL/RCPT/DATA in one write",
        [HELO, RawStep(PIPE, 3), MSG, "QUIT"],
    )
    session(
        pf,
        f"{label}: EHLO, then MAIL/RCPT/DATA in one write",
        [EHLO, RawStep(PIPE, 3), MSG, "QUIT"],
    )
    session(
        pf,
        f"{label}: HELO, one command at a time",
        [HELO, "MAIL FROM:<a@example.net>", RCPT, "DATA", MSG, "QUIT"],
    )
    session(
        pf,
        f"{label}: HELO and MAIL in one write",
        [RawStep(b"HELO a.example\r\nMAIL FROM:<a@example.net>\r\n", 2), RCPT, "DATA", MSG],
    )


@experiment(
    "p4-unauth-pipelining-data",
    "smtpd_data_restrictions = reject_unauth_pipelining\nsmtpd_forbid_unauth_pipelining = no\n",
)
def _p4a(pf, sinks):
    _pipe(pf, sinks, "data_restrictions, forbid=no")


@experiment(
    "p4-unauth-pipelining-client",
    "smtpd_client_restrictions = reject_unauth_pipelining\nsmtpd_forbid_unauth_pipelining = no\n",
)
def _p4b(pf, sinks):
    _pipe(pf, sinks, "client_restrictions, forbid=no")


@experiment(
    "p4-unauth-pipelining-client-delay-no",
    "smtpd_delay_reject = no\n"
    "smtpd_client_restrictions = reject_unauth_pipelining\nsmtpd_forbid_unauth_pipelining = no\n",
)
def _p4b2(pf, sinks):
    _pipe(pf, sinks, "client_restrictions, delay_reject=no, forbid=no")


@experiment(
    "p4-unauth-pipelining-forbid-yes",
    "smtpd_data_restrictions = reject_unauth_pipelining\nsmtpd_forbid_unauth_pipelining = yes\n",
)
def _p4c(pf, sinks):
    _pipe(pf, sinks, "data_restrictions, forbid=yes")


@experiment("p4-forbid-yes-only", "smtpd_forbid_unauth_pipelining = yes\n")
def _p4d(pf, sinks):
    _pipe(pf, sinks, "no restriction, forbid=yes")


ODD = [
    '"a b"@x.org',
    '"a@b"@x.org',
    "a.@x.org",
    '"a."@x.org',
    '"ab"@x.org',
    "a\\ b@x.org",
    '"a\\"b"@x.org',
    "",
]


@experiment(
    "p5-quoted-log",
    "smtpd_sender_restrictions = check_sender_access inline:{ x.org=REJECT }\n",
)
def _p5a(pf, sinks):
    for a in ODD:
        session(pf, f"sender <{a}> rejected", [EHLO, f"MAIL FROM:<{a}>", RCPT])
    for a in ['"a b"@other.org', '"a@b"@other.org', "a.@other.org", '"a."@other.org']:
        session(
            pf,
            f"recipient <{a}> relay denied",
            [EHLO, 'MAIL FROM:<"s p"@example.net>', f"RCPT TO:<{a}>"],
        )
    session(pf, "null sender, relay denied", [EHLO, "MAIL FROM:<>", "RCPT TO:<x@other.org>"])


@experiment(
    "p5-discard",
    "smtpd_recipient_restrictions = check_recipient_access inline:{ {disc@bar.org=DISCARD} "
    '{"d q"@bar.org=DISCARD d.@bar.org=DISCARD} }, permit\n',
    relay=True,
)
def _p5b(pf, sinks):
    session(
        pf,
        "DISCARD on the 2nd of 3 recipients",
        [
            EHLO,
            MAIL,
            RCPT,
            "RCPT TO:<disc@bar.org>",
            "RCPT TO:<carol@bar.org>",
            "DATA",
            MSG,
            "QUIT",
        ],
        sinks=sinks,
        deliver=0,
    )
    session(
        pf,
        "DISCARD on the 1st recipient",
        [
            EHLO,
            MAIL,
            "RCPT TO:<disc@bar.org>",
            RCPT,
            "RCPT TO:<other@other.org>",
            "DATA",
            MSG,
            "QUIT",
        ],
        sinks=sinks,
    )
    session(
        pf,
        "DISCARD quoted local parts",
        [
            EHLO,
            'MAIL FROM:<"s p"@example.net>',
            'RCPT TO:<"d q"@bar.org>',
            "RCPT TO:<d.@bar.org>",
            "DATA",
            MSG,
            "QUIT",
        ],
        sinks=sinks,
    )
    session(
        pf,
        "DISCARD, then RSET, then a normal transaction",
        [EHLO, MAIL, "RCPT TO:<disc@bar.org>", "RSET", MAIL, RCPT, "DATA", MSG, "QUIT"],
        sinks=sinks,
        deliver=1,
    )


@experiment(
    "p5-discard-sender-and-data",
    'smtpd_sender_restrictions = check_sender_access inline:{ {"s p"@example.net=DISCARD} }\n'
    "smtpd_data_restrictions = check_sender_access inline:{ d@example.net=DISCARD }\n"
    "smtpd_end_of_data_restrictions = check_sender_access inline:{ e@example.net=DISCARD }\n",
    relay=True,
)
def _p5c(pf, sinks):
    session(
        pf,
        "DISCARD at MAIL (delay_reject=yes: logged at RCPT?)",
        [
            EHLO,
            'MAIL FROM:<"s p"@example.net>',
            RCPT,
            "RCPT TO:<carol@bar.org>",
            "DATA",
            MSG,
            "QUIT",
        ],
        sinks=sinks,
    )
    session(
        pf,
        "DISCARD at DATA",
        [EHLO, "MAIL FROM:<d@example.net>", RCPT, "RCPT TO:<carol@bar.org>", "DATA", MSG, "QUIT"],
        sinks=sinks,
    )
    session(
        pf,
        "DISCARD at END-OF-MESSAGE",
        [EHLO, "MAIL FROM:<e@example.net>", RCPT, "RCPT TO:<carol@bar.org>", "DATA", MSG, "QUIT"],
        sinks=sinks,
    )


def _bdat(n, last=False, data=None):
    return (
        f"BDAT {n}{' LAST' if last else ''}".encode()
        + b"\r\n"
        + (data if data is not None else b"x" * n)
    )


@experiment("p6-bdat", "message_size_limit = 2000\n", relay=True)
def _p6a(pf, sinks):
    body = b"Subject: b\r\n\r\nhello\r\n"
    session(pf, "EHLO keywords", [EHLO])
    session(
        pf,
        "BDAT one chunk LAST",
        [EHLO, MAIL, RCPT, RawStep(_bdat(len(body), True, body), 1), "QUIT"],
        sinks=sinks,
        deliver=1,
    )
    session(
        pf,
        "BDAT two chunks, then LAST",
        [
            EHLO,
            MAIL,
            RCPT,
            RawStep(_bdat(12, False, body[:12]), 1),
            RawStep(_bdat(len(body) - 12, False, body[12:]), 1),
            RawStep(b"BDAT 0 LAST\r\n", 1),
            "QUIT",
        ],
        sinks=sinks,
        deliver=1,
    )
    session(
        pf,
        "BDAT 0 LAST alone",
        [EHLO, MAIL, RCPT, RawStep(b"BDAT 0 LAST\r\n", 1), "QUIT"],
        sinks=sinks,
        deliver=1,
    )
    session(pf, "BDAT without MAIL", [EHLO, RawStep(_bdat(10), 1), "NOOP"])
    session(pf, "BDAT without RCPT", [EHLO, MAIL, RawStep(_bdat(10), 1), "NOOP"])
    session(pf, "BDAT before EHLO", [RawStep(_bdat(10), 1), "NOOP"])
    session(
        pf,
        "BDAT after HELO",
        [HELO, MAIL, RCPT, RawStep(_bdat(10, True), 1), "NOOP"],
        deliver=1,
        sinks=sinks,
    )
    session(pf, "BDAT x", [EHLO, MAIL, RCPT, "BDAT x", "NOOP"])
    session(
        pf,
        "BDAT 10 FOO",
        [EHLO, MAIL, RCPT, RawStep(_bdat(10).replace(b"BDAT 10", b"BDAT 10 FOO"), 1), "NOOP"],
    )
    session(pf, "BDAT no argument", [EHLO, MAIL, RCPT, "BDAT", "NOOP"])
    session(pf, "BDAT -1", [EHLO, MAIL, RCPT, "BDAT -1", "NOOP"])
    session(
        pf,
        "BDAT 10 LAST extra",
        [EHLO, MAIL, RCPT, RawStep(b"BDAT 10 LAST extra\r\n" + b"x" * 10, 1), "NOOP"],
    )
    session(
        pf,
        "BDAT lower-case last",
        [EHLO, MAIL, RCPT, RawStep(b"bdat 10 last\r\n" + b"x" * 10, 1), "QUIT"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "BDAT over message_size_limit (3000 > 2000), one chunk",
        [EHLO, MAIL, RCPT, RawStep(_bdat(3000, True), 1), "NOOP", MAIL],
    )
    session(
        pf,
        "BDAT over message_size_limit in two chunks",
        [EHLO, MAIL, RCPT, RawStep(_bdat(1500), 1), RawStep(_bdat(1500, True), 1), "NOOP"],
    )
    session(pf, "BDAT then DATA", [EHLO, MAIL, RCPT, RawStep(_bdat(10), 1), "DATA", "NOOP"])
    session(
        pf,
        "DATA after BDAT LAST (new transaction needed)",
        [EHLO, MAIL, RCPT, RawStep(_bdat(10, True), 1), "DATA", "NOOP"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "BDAT chunks pipelined in one write",
        [
            EHLO,
            one([MAIL, RCPT]),
            RawStep(_bdat(12, False, body[:12]) + _bdat(len(body) - 12, True, body[12:]), 2),
            "QUIT",
        ],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "MAIL RCPT BDAT LAST pipelined in one write",
        [EHLO, RawStep(f"{MAIL}\r\n{RCPT}\r\n".encode() + _bdat(len(body), True, body), 3), "QUIT"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "BDAT content with bare LF, bare CR, lone dot",
        [
            EHLO,
            MAIL,
            RCPT,
            RawStep(_bdat(24, True, b"Subject: z\r\n\r\na\nb\rc\r\n.\r\n"), 1),
            "QUIT",
        ],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "BDAT content without final CRLF",
        [EHLO, MAIL, RCPT, RawStep(_bdat(15, True, b"Subject: z\r\n\r\nab"), 1), "QUIT"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "RSET between chunks",
        [EHLO, MAIL, RCPT, RawStep(_bdat(10), 1), "RSET", RawStep(_bdat(3, True), 1)],
    )
    session(
        pf,
        "NOOP between chunks",
        [EHLO, MAIL, RCPT, RawStep(_bdat(10), 1), "NOOP", RawStep(_bdat(3, True), 1), "QUIT"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "BDAT with a rejected recipient only",
        [EHLO, MAIL, "RCPT TO:<x@other.org>", RawStep(_bdat(10, True), 1), "NOOP"],
    )
    session(
        pf,
        "BDAT 0 (not LAST)",
        [EHLO, MAIL, RCPT, "BDAT 0", RawStep(b"BDAT 0 LAST\r\n", 1), "QUIT"],
        deliver=1,
        sinks=sinks,
    )
    session(pf, "BDAT huge number", [EHLO, MAIL, RCPT, "BDAT 99999999999999999999", "NOOP"])


@experiment(
    "p6-bdat-data-restrictions",
    "smtpd_data_restrictions = check_sender_access inline:{ d@example.net=REJECT }\n"
    "smtpd_end_of_data_restrictions = check_sender_access inline:{ e@example.net=REJECT }\n",
)
def _p6b(pf, sinks):
    session(
        pf,
        "data restrictions reject at BDAT (two chunks)",
        [
            EHLO,
            "MAIL FROM:<d@example.net>",
            RCPT,
            RawStep(_bdat(10), 1),
            RawStep(_bdat(3, True), 1),
            "NOOP",
        ],
    )
    session(
        pf,
        "data restrictions reject at DATA (reference)",
        [EHLO, "MAIL FROM:<d@example.net>", RCPT, "DATA", "NOOP"],
    )
    session(
        pf,
        "end-of-data restrictions at BDAT LAST",
        [
            EHLO,
            "MAIL FROM:<e@example.net>",
            RCPT,
            RawStep(_bdat(10), 1),
            RawStep(_bdat(3, True), 1),
            "NOOP",
        ],
    )


@experiment("p6-bdat-bare-newline-reject", "smtpd_forbid_bare_newline = reject\n", relay=True)
def _p6c(pf, sinks):
    session(
        pf,
        "BDAT content with bare LF under reject",
        [EHLO, MAIL, RCPT, RawStep(_bdat(22, True, b"Subject: z\r\n\r\na\nb\r\n.\r\n"), 1), "NOOP"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "BDAT command ending in bare LF under reject",
        [EHLO, MAIL, RCPT, RawStep(b"BDAT 3 LAST\nabc", 1), "NOOP"],
    )


@experiment("p6-bdat-bare-newline-normalize", "smtpd_forbid_bare_newline = normalize\n", relay=True)
def _p6d(pf, sinks):
    session(
        pf,
        "BDAT content with bare LF under normalize",
        [EHLO, MAIL, RCPT, RawStep(_bdat(22, True, b"Subject: z\r\n\r\na\nb\r\n.\r\n"), 1), "QUIT"],
        deliver=1,
        sinks=sinks,
    )


ACTIONS = (
    "smtpd_recipient_restrictions = check_recipient_access inline:{ "
    "{r@bar.org=REDIRECT target@bar.org} {b@bar.org=BCC copy@bar.org} "
    "{f@bar.org=FILTER smtp:[127.0.0.1]:@SINK2@} {h@bar.org=HOLD} "
    "{h2@bar.org=HOLD held for review} }, permit\n"
    "smtpd_sender_restrictions = check_sender_access inline:{ "
    "{rs@example.net=REDIRECT target@bar.org} "
    "{bs@example.net=BCC copy@bar.org} }\n"
)


@experiment("p7-access-actions", ACTIONS, relay=True)
def _p7(pf, sinks):
    session(
        pf,
        "REDIRECT on one of two recipients",
        [EHLO, MAIL, RCPT, "RCPT TO:<r@bar.org>", "DATA", MSG, "QUIT"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "REDIRECT at MAIL",
        [EHLO, "MAIL FROM:<rs@example.net>", RCPT, "RCPT TO:<carol@bar.org>", "DATA", MSG, "QUIT"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "BCC on a recipient",
        [EHLO, MAIL, RCPT, "RCPT TO:<b@bar.org>", "DATA", MSG, "QUIT"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "BCC at MAIL",
        [EHLO, "MAIL FROM:<bs@example.net>", RCPT, "DATA", MSG, "QUIT"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "FILTER on a recipient",
        [EHLO, MAIL, RCPT, "RCPT TO:<f@bar.org>", "DATA", MSG, "QUIT"],
        deliver=1,
        sinks=sinks,
    )
    session(
        pf,
        "HOLD",
        [EHLO, MAIL, RCPT, "RCPT TO:<h@bar.org>", "RCPT TO:<h2@bar.org>", "DATA", MSG, "QUIT"],
        deliver=1,
        sinks=sinks,
        extra=lambda: _queue(pf),
    )
    session(
        pf,
        "REDIRECT twice + BCC",
        [
            EHLO,
            MAIL,
            "RCPT TO:<r@bar.org>",
            "RCPT TO:<b@bar.org>",
            "RCPT TO:<f@bar.org>",
            "DATA",
            MSG,
            "QUIT",
        ],
        deliver=1,
        sinks=sinks,
    )


@experiment(
    "p2-etrn-helo-required",
    "smtpd_helo_required = yes\n" + CLIENT_REJECT,
)
def _p2f(pf, sinks):
    session(
        pf,
        "helo required: ETRN before HELO",
        ["ETRN bar.org", "ETRN", "ETRN <bar.org>", "ETRN a b"],
    )
    session(
        pf,
        "client rejected: ETRN syntax errors",
        [EHLO, "ETRN <bar.org>", "ETRN a b", "ETRN bar.org"],
    )


@experiment(
    "p1-helo-after-ehlo-proto",
    "smtpd_sender_restrictions = check_sender_access inline:{ blocked.example=REJECT }\n",
)
def _p1f(pf, sinks):
    session(
        pf,
        "EHLO then HELO: proto= of a later reject",
        [EHLO, "HELO other.example", "MAIL FROM:<a@blocked.example>", RCPT],
    )
    session(
        pf,
        "HELO then EHLO",
        ["HELO one.example", "EHLO two.example", "MAIL FROM:<a@blocked.example>", RCPT],
    )


@experiment(
    "p1-ehlo-reject-in-transaction",
    "smtpd_delay_reject = no\n"
    "smtpd_helo_restrictions = check_helo_access inline:{ bad.example=REJECT }\n",
)
def _p1g(pf, sinks):
    session(
        pf,
        "EHLO good, MAIL, EHLO bad (rejected), RCPT",
        [EHLO, MAIL, "EHLO bad.example", RCPT, "HELO again.example", RCPT],
    )


def _queue(pf):
    import subprocess

    out = subprocess.run(
        ["/usr/sbin/postqueue", "-c", str(pf.etc), "-p"], capture_output=True, text=True
    )
    return "\npostqueue -p:\n\n```\n" + _QID.sub("QUEUEID", out.stdout).strip() + "\n```"


if __name__ == "__main__":
    names = sys.argv[1:] or list(EXPERIMENTS)
    print("Common main.cf lines:\n\n```\n" + BASE.strip() + "\n```")
    for n in names:
        run(n)
