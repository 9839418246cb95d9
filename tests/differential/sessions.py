"""Whole SMTP sessions, typed as raw lines: the script set of ``test_sessions_vs_postfix.py``.

A :class:`Script` is a list of steps sent one at a time, each waiting for its replies
(:class:`tests.postfix_instance.RawStep`: a ``str`` is one command line, CRLF appended;
``bytes`` are sent as they are, one reply expected per line end; a ``RawStep`` says how many
replies to wait for). A pipelined group is one ``bytes`` step holding several commands.
After the last step the harness probes with ``NOOP`` to learn whether the session is still
open, so a script need not end with QUIT.

Every script names a :class:`SessionConfig`; scripts of one config run against one Postfix
instance. :data:`BASE` is the config of the brief: the host's identity, one relay domain,
local users from an inline table. ``blocked.example`` senders are refused by a sender access
check, so a rejection at RCPT shows the sender address exactly as the server parsed it;
recipients in ``other.org`` are refused with "Relay access denied", which shows the parsed
recipient address.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.postfix_instance import RawStep

BASE = """\
compatibility_level = 3.6
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
local_recipient_maps = inline:{ postmaster=x, alice=x }
smtpd_peername_lookup = no
smtpd_sender_restrictions = check_sender_access inline:{ blocked.example=REJECT }
"""

#: Postfix-only lines. ETRN and CHUNKING are not offered, as smtpgate offers neither: the EHLO
#: replies then compare whole, and BDAT gets Postfix's answer for a server without CHUNKING.
POSTFIX_ONLY = """\
smtpd_discard_ehlo_keywords = etrn, chunking
"""

#: Limits for both servers (after BASE) unless a config sets its own: no error sleep and
#: error/junk limits out of reach, because many scripts make several errors and none of them
#: is about the limits; Postfix 3.9's smtpd_forbid_unauth_pipelining = yes (smtpgate's
#: default; Postfix 3.7.11 has the parameter, default no).
RELAXED = """\
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
smtpd_junk_command_limit = 1000
smtpd_forbid_unauth_pipelining = yes
"""

#: Tiny limits, for the scripts about them (LIMITS).
TINY = """\
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 2
smtpd_hard_error_limit = 4
smtpd_junk_command_limit = 2
smtpd_recipient_limit = 2
smtpd_recipient_overshoot_limit = 1
smtpd_forbid_unauth_pipelining = yes
"""


@dataclass(frozen=True)
class SessionConfig:
    """main.cf lines (after BASE) and table files; ``@DIR@`` is the config directory."""

    name: str
    main_cf: str = ""
    tables: tuple[tuple[str, str], ...] = ()
    limits: str = RELAXED

    @property
    def main_cf_text(self) -> str:
        return BASE + self.limits + self.main_cf


SEED_MAIN_CF = """\
smtpd_recipient_restrictions =
        permit_mynetworks
        check_recipient_access hash:@DIR@/protected_destinations
smtpd_restriction_classes = good_senders_only
good_senders_only = check_sender_access hash:@DIR@/restricted_senders, permit
"""
SEED_PROTECTED = "foo@bar.org     good_senders_only\n"

PLAIN = SessionConfig("plain")
NO_VRFY = SessionConfig("no_vrfy", "disable_vrfy_command = yes\n")
SEED_AS_WRITTEN = SessionConfig(
    "seed_reject_521",
    SEED_MAIN_CF,
    (
        ("protected_destinations", SEED_PROTECTED),
        ("restricted_senders", "qq.com         REJECT  521\n163.com        REJECT  521\n"),
    ),
)
SEED_AS_MEANT = SessionConfig(
    "seed_521",
    SEED_MAIN_CF,
    (
        ("protected_destinations", SEED_PROTECTED),
        ("restricted_senders", "qq.com         521 go away\n"),
    ),
)
BAN_521 = SessionConfig(
    "ban_521",
    "smtpd_recipient_restrictions = check_sender_access inline:{ {banned.example = 521 go away} }"
    "\n",
)

Step = RawStep | bytes | str


@dataclass(frozen=True)
class Script:
    name: str
    steps: tuple[Step, ...]
    config: SessionConfig = PLAIN
    note: str = ""


EHLO = "EHLO client.example.net"
MAIL = "MAIL FROM:<sender@example.net>"
RCPT = "RCPT TO:<bob@bar.org>"
MESSAGE = RawStep(b"Subject: test\r\n\r\nhello\r\n.\r\n", 1)
LONG = "NOOP " + "x" * 2995  # 3000 characters before CRLF


def s(name: str, *steps: Step, config: SessionConfig = PLAIN, note: str = "") -> Script:
    return Script(name, tuple(steps), config, note)


def mail_form(name: str, line: str | bytes, *more: Step) -> Script:
    """EHLO, one MAIL form, then a RCPT that shows what the sender parsed to."""
    return s(f"mail/{name}", EHLO, line, *(more or (RCPT,)))


def rcpt_form(name: str, line: str | bytes, *more: Step) -> Script:
    """EHLO, MAIL, one RCPT form (``other.org``: the relay refusal names the address)."""
    return s(f"rcpt/{name}", EHLO, MAIL, line, *more)


HELLO = [
    s("hello/helo-no-arg", "HELO", "MAIL FROM:<a@blocked.example>", RCPT),
    s("hello/ehlo-no-arg", "EHLO"),
    s("hello/helo-words", "HELO a b  c", "MAIL FROM:<a@blocked.example>", RCPT),
    s("hello/ehlo-words", "EHLO a b c"),
    s(
        "hello/helo-lower",
        "helo client.example.net",
        "mail from:<a@example.net>",
        "rcpt to:<bob@bar.org>",
    ),
    s("hello/ehlo-lower", "ehlo client.example.net"),
    s("hello/mixed-case", "HeLo client.example.net"),
    s("hello/extra-spaces", "HELO    client.example.net   "),
    s("hello/leading-space", "  HELO client.example.net"),
    s("hello/tab", "HELO\tclient.example.net"),
    s("hello/tab-before-verb", "\tEHLO client.example.net"),
    s("hello/twice", "HELO one.example", EHLO, MAIL, RCPT, "HELO two.example", RCPT),
    s("hello/address-literal", "EHLO [127.0.0.2]"),
    s("hello/no-space", "HELO:client.example.net"),
]

MAIL_FORMS = [
    s("mail/without-helo", MAIL, RCPT),
    mail_form("canonical", "MAIL FROM:<a@blocked.example>"),
    mail_form("telnet-lower-no-brackets", "mail from: a@blocked.example"),
    mail_form("space-before-bracket", "MAIL FROM: <a@blocked.example>"),
    mail_form("no-brackets", "MAIL FROM:a@blocked.example"),
    mail_form("no-colon", "MAIL FROM <a@blocked.example>"),
    mail_form("space-before-colon", "MAIL FROM :<a@blocked.example>"),
    mail_form("null-sender", "MAIL FROM:<>"),
    mail_form("null-sender-spaced", "MAIL FROM: <>"),
    mail_form("params", "MAIL FROM:<a@blocked.example> SIZE=100 BODY=8BITMIME"),
    mail_form("params-lower", "MAIL FROM:<a@blocked.example> size=100 body=7bit"),
    mail_form("params-double-space", "MAIL FROM:<a@blocked.example>  SIZE=100"),
    mail_form("size-bad", "MAIL FROM:<a@example.net> SIZE=abc"),
    mail_form("size-empty", "MAIL FROM:<a@example.net> SIZE="),
    mail_form("size-too-big", "MAIL FROM:<a@example.net> SIZE=999999999"),
    mail_form("size-huge-number", "MAIL FROM:<a@example.net> SIZE=99999999999999999999999"),
    mail_form("body-bad", "MAIL FROM:<a@example.net> BODY=9BIT"),
    mail_form("unknown-param", "MAIL FROM:<a@example.net> FOO=bar"),
    mail_form("unknown-param-no-value", "MAIL FROM:<a@example.net> FOO"),
    mail_form("ret-envid", "MAIL FROM:<a@blocked.example> RET=HDRS ENVID=abc"),
    mail_form("ret-bad", "MAIL FROM:<a@example.net> RET=ALL"),
    mail_form("smtputf8-param", "MAIL FROM:<a@blocked.example> SMTPUTF8"),
    mail_form("auth-param", "MAIL FROM:<a@blocked.example> AUTH=<>"),
    mail_form("unclosed", "MAIL FROM:<a@blocked.example"),
    mail_form("garbage-after-bracket", "MAIL FROM:<a@blocked.example>x"),
    mail_form("double-brackets", "MAIL FROM:<<a@blocked.example>>"),
    mail_form("source-route", "MAIL FROM:<@x.example,@y.example:a@blocked.example>"),
    mail_form("quoted-local", 'MAIL FROM:<"a b"@blocked.example>'),
    mail_form("unquoted-space", "MAIL FROM:<a b@blocked.example>"),
    mail_form("control-char", b"MAIL FROM:<a\x01b@blocked.example>\r\n"),
    mail_form("nul", b"MAIL FROM:<a\x00b@blocked.example>\r\n"),
    mail_form("utf8", "MAIL FROM:<jos\u00e9@blocked.example>"),
    mail_form("utf8-declared", "MAIL FROM:<jos\u00e9@blocked.example> SMTPUTF8"),
    mail_form("no-domain", "MAIL FROM:<a>"),
    mail_form("address-literal", "MAIL FROM:<a@[192.0.2.1]>"),
    mail_form("empty", "MAIL FROM:"),
    mail_form("verb-only", "MAIL"),
    mail_form("to-keyword", "MAIL TO:<a@example.net>"),
    mail_form("mixed-case-keyword", "Mail From:<a@blocked.example>"),
    mail_form("tab-separated", "MAIL\tFROM:\t<a@blocked.example>"),
    mail_form("space-only-after-colon", "MAIL FROM: "),
    mail_form("two-addresses", "MAIL FROM:<a@blocked.example> <b@blocked.example>"),
    mail_form("two-bare-addresses", "MAIL FROM:a@blocked.example b@example.net"),
    mail_form("phrase", "MAIL FROM:Joe <a@blocked.example>"),
    mail_form("comment", "MAIL FROM:<a@blocked.example (comment)>"),
    mail_form("quoted-at", 'MAIL FROM:<"a@b"@blocked.example>'),
    mail_form("quoted-plain", 'MAIL FROM:<"ab"@blocked.example>'),
    mail_form("backslash", "MAIL FROM:<a\\ b@blocked.example>"),
    mail_form("trailing-dot", "MAIL FROM:<a@blocked.example.>"),
    mail_form("upper-case", "MAIL FROM:<A@BLOCKED.EXAMPLE>"),
    mail_form("at-only", "MAIL FROM:<@>"),
    mail_form("route-only", "MAIL FROM:<@x.example:>"),
    mail_form("del", b"MAIL FROM:<a\x7fb@blocked.example>\r\n"),
    mail_form("nul-before-params", b"MAIL FROM:<a@blocked.example>\x00 FOO=bar\r\n"),
    mail_form("unclosed-with-param", "MAIL FROM:<a@example.net FOO=bar"),
    mail_form("size-negative", "MAIL FROM:<a@example.net> SIZE=-1"),
    mail_form("size-off-t-max", "MAIL FROM:<a@example.net> SIZE=9223372036854775807"),
    mail_form("size-off-t-max-plus-1", "MAIL FROM:<a@example.net> SIZE=9223372036854775808"),
    mail_form("body-binarymime", "MAIL FROM:<a@example.net> BODY=BINARYMIME"),
    mail_form("smtputf8-value", "MAIL FROM:<a@example.net> SMTPUTF8=yes"),
    mail_form("envid-empty", "MAIL FROM:<a@example.net> ENVID="),
    mail_form("envid-bad-xtext", "MAIL FROM:<a@example.net> ENVID=a+zz"),
    mail_form("envid-xtext", "MAIL FROM:<a@blocked.example> ENVID=a+2Bb"),
    mail_form("ret-twice", "MAIL FROM:<a@example.net> RET=FULL RET=HDRS"),
    mail_form("auth-empty", "MAIL FROM:<a@blocked.example> AUTH="),
    mail_form("xverp", "MAIL FROM:<a@example.net> XVERP"),
    mail_form("lone-equals", "MAIL FROM:<a@example.net> ="),
    mail_form("long-parameter", "MAIL FROM:<a@example.net> " + "X" * 4000, "NOOP"),
    s("mail/nested", EHLO, MAIL, "MAIL FROM:<other@example.net>", RCPT),
    s("mail/after-rset", EHLO, MAIL, "RSET", "MAIL FROM:<a@blocked.example>", RCPT),
]

RCPT_FORMS = [
    s("rcpt/before-mail", EHLO, RCPT),
    s("rcpt/before-helo", RCPT),
    rcpt_form("canonical", "RCPT TO:<x@other.org>"),
    rcpt_form("telnet-lower-no-brackets", "rcpt to: x@other.org"),
    rcpt_form("space-before-bracket", "RCPT TO: <x@other.org>"),
    rcpt_form("no-brackets", "RCPT TO:x@other.org"),
    rcpt_form("no-colon", "RCPT TO <x@other.org>"),
    rcpt_form("null", "RCPT TO:<>"),
    rcpt_form("unclosed", "RCPT TO:<x@other.org"),
    rcpt_form("source-route", "RCPT TO:<@a.example,@b.example:x@other.org>"),
    rcpt_form("quoted-local", 'RCPT TO:<"x y"@other.org>'),
    rcpt_form("control-char", b"RCPT TO:<x\x01y@other.org>\r\n"),
    rcpt_form("nul", b"RCPT TO:<x\x00y@other.org>\r\n"),
    rcpt_form("utf8", "RCPT TO:<j\u00f6rg@other.org>"),
    rcpt_form("postmaster", "RCPT TO:<postmaster>"),
    rcpt_form("postmaster-mixed-case", "RCPT TO:<PostMaster>"),
    rcpt_form("postmaster-local", "RCPT TO:<postmaster@mx.example.org>"),
    rcpt_form("local-user", "RCPT TO:<alice@mx.example.org>"),
    rcpt_form("local-unknown", "RCPT TO:<nobody@mx.example.org>"),
    rcpt_form("relay-ok", RCPT),
    # NOTIFY/ORCPT that pass reach the relay check: a recipient in other.org shows they were
    # accepted without needing a backend that speaks DSN.
    rcpt_form(
        "notify-orcpt", "RCPT TO:<x@other.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@other.org"
    ),
    rcpt_form("notify-never", "RCPT TO:<x@other.org> NOTIFY=NEVER"),
    rcpt_form("notify-lower", "RCPT TO:<x@other.org> notify=success"),
    rcpt_form("notify-never-and-more", "RCPT TO:<x@other.org> NOTIFY=NEVER,SUCCESS"),
    rcpt_form("notify-twice", "RCPT TO:<x@other.org> NOTIFY=SUCCESS NOTIFY=DELAY"),
    rcpt_form("notify-empty", "RCPT TO:<x@other.org> NOTIFY="),
    rcpt_form("orcpt-utf8", "RCPT TO:<x@other.org> ORCPT=utf-8;x@other.org"),
    rcpt_form("orcpt-xtext", "RCPT TO:<x@other.org> ORCPT=rfc822;x+2By@other.org"),
    rcpt_form("orcpt-no-address", "RCPT TO:<x@other.org> ORCPT=rfc822"),
    rcpt_form("size-param", "RCPT TO:<x@other.org> SIZE=1"),
    rcpt_form("postmaster-param", "RCPT TO:<postmaster> FOO"),
    rcpt_form("unclosed-with-param", "RCPT TO:<x@other.org FOO=bar"),
    rcpt_form("notify-bad", "RCPT TO:<bob@bar.org> NOTIFY=SOMETIMES"),
    rcpt_form("orcpt-bad", "RCPT TO:<bob@bar.org> ORCPT=bogus"),
    rcpt_form("unknown-param", "RCPT TO:<bob@bar.org> FOO=bar"),
    rcpt_form("empty", "RCPT TO:"),
    rcpt_form("verb-only", "RCPT"),
    rcpt_form("from-keyword", "RCPT FROM:<bob@bar.org>"),
    rcpt_form("two-recipients", RCPT, "RCPT TO:<carol@bar.org>"),
]

DATA = [
    s("data/before-mail", EHLO, "DATA"),
    s("data/before-rcpt", EHLO, MAIL, "DATA"),
    s("data/argument-before-rcpt", EHLO, MAIL, "DATA now"),
    s("data/argument-before-mail", EHLO, "DATA now"),
    s("data/with-argument", EHLO, MAIL, RCPT, "DATA now"),
    s("data/all-rejected", EHLO, MAIL, "RCPT TO:<x@other.org>", "DATA"),
    s("data/delivered", EHLO, MAIL, RCPT, "DATA", MESSAGE, "QUIT"),
    s("data/delivered-then-more", EHLO, MAIL, RCPT, "DATA", MESSAGE, "RCPT TO:<bob@bar.org>", MAIL),
    s(
        "data/lower-case",
        "helo me.example",
        "mail from:<a@example.net>",
        "rcpt to:<bob@bar.org>",
        "data",
        MESSAGE,
    ),
]

OTHER = [
    s("rset/plain", EHLO, MAIL, "RSET", RCPT),
    s("rset/argument", EHLO, MAIL, "RSET now", RCPT),
    s("noop/plain", "NOOP"),
    s("noop/argument", "NOOP hello there"),
    s("vrfy/no-argument", "VRFY"),
    s("vrfy/relay", EHLO, "VRFY bob@bar.org"),
    s("vrfy/bracketed", EHLO, "VRFY <bob@bar.org>"),
    s("vrfy/local-unknown", EHLO, "VRFY nobody@mx.example.org"),
    s("vrfy/local-user", EHLO, "VRFY alice"),
    s("vrfy/other", EHLO, "VRFY x@other.org"),
    s("vrfy/two-words", EHLO, "VRFY a b"),
    s("vrfy/smtputf8", EHLO, "VRFY bob@bar.org SMTPUTF8"),
    s("vrfy/unclosed", EHLO, "VRFY <bob@bar.org"),
    s("vrfy/null", EHLO, "VRFY <>"),
    s("vrfy/in-transaction", EHLO, "MAIL FROM:<a@blocked.example>", "VRFY bob@bar.org"),
    s("vrfy/before-helo", "VRFY bob@bar.org"),
    s("vrfy/disabled", EHLO, "VRFY bob@bar.org", config=NO_VRFY),
    s("vrfy/disabled-no-argument", "VRFY", config=NO_VRFY),
    s("quit/plain", "QUIT"),
    s("quit/argument", "QUIT now"),
    s("quit/lower", "quit"),
    s("unknown/word", "FOO bar", "NOOP"),
    s("unknown/empty-line", "", "NOOP"),
    s("unknown/spaces-only", "   ", "NOOP"),
    s("unknown/help", "HELP"),
    s("unknown/etrn", EHLO, "ETRN bar.org"),
    s("unknown/etrn-no-argument", EHLO, "ETRN"),
    s("unknown/auth", EHLO, "AUTH PLAIN AGFsaWNlAHNlY3JldA=="),
    s("unknown/auth-before-ehlo", "AUTH"),
    s("unknown/bdat", EHLO, MAIL, RCPT, "BDAT 0 LAST"),
    s("unknown/bdat-no-transaction", EHLO, "BDAT 10"),
    s("unknown/starttls", EHLO, "STARTTLS"),
    s("unknown/starttls-argument", EHLO, "STARTTLS now"),
    s("unknown/ehlo-in-transaction", EHLO, MAIL, "EHLO again.example", RCPT),
    s("unknown/expn", "EXPN staff"),
    s("unknown/turn", "TURN"),
    s("unknown/xclient", "XCLIENT NAME=spoofed"),
    s("unknown/xforward", "XFORWARD NAME=spoofed"),
    s("unknown/xclient-no-argument", EHLO, "XCLIENT"),
    s("junk/long-line", EHLO, LONG, "NOOP"),
    s("junk/long-mail", EHLO, "MAIL FROM:<" + "a" * 3000 + "@example.net>", "NOOP"),
    s("junk/long-verb", "A" * 3000, "NOOP"),
    s("junk/long-then-verb", "X" * 2050 + "NOOP", "NOOP"),
    s("junk/nul", b"NO\x00OP\r\n", "NOOP"),
    s("junk/nul-after-verb", b"NOOP\x00\r\n", "NOOP"),
    s("junk/control-in-verb", b"NO\x01OP\r\n", "NOOP"),
    s("junk/control-in-helo", b"HELO a\x01b\r\n", "NOOP"),
    s("junk/cr-inside", b"NO\rOP\r\n", "NOOP"),
    s("junk/cr-after-verb", b"NOOP\rx\r\n", "NOOP"),
    s("junk/del", b"NOOP\x7f\r\n", "NOOP"),
    s("junk/del-in-arg", b"NOOP a\x7fb\r\n", "NOOP"),
    s("junk/bad-utf8", b"NOOP \xff\xfe\r\n", "NOOP"),
    s("junk/bad-utf8-verb", b"\xffNOOP\r\n", "NOOP"),
    s("junk/bad-utf8-mail", EHLO, b"MAIL FROM:<\xff@example.net>\r\n", "NOOP"),
    s("junk/latin1-helo", b"HELO caf\xe9.example\r\n", "NOOP"),
    s("forbidden/get", "GET / HTTP/1.0"),
    s("forbidden/get-lower", "get / HTTP/1.0"),
    s("forbidden/post", "POST /cgi-bin/x HTTP/1.1"),
    s("forbidden/connect", "CONNECT mx.example.org:25 HTTP/1.0"),
    s("forbidden/header", "Subject: x"),
    s("forbidden/header-lower", "from: someone@example.net"),
    s("forbidden/header-after-ehlo", EHLO, "Received: from x"),
    s("forbidden/colon-in-verb", "X-Foo:bar"),
    s("forbidden/helo-colon", "HELO:client.example.net"),
    s("forbidden/colon-only", ":"),
    s("forbidden/header-space-colon", "Subject : x", "NOOP"),
    s("forbidden/lower-unknown", "hello there"),
    s("forbidden/digit-verb", "123 abc"),
    s("forbidden/symbol-verb", "[HELO"),
]

BARE_LF = [
    s(
        "bare-lf/data-smuggling",
        EHLO,
        MAIL,
        RCPT,
        "DATA",
        # Up to three replies: a server that ends DATA at LF.LF answers the smuggled RSET
        # and the lone dot too; one that does not answers the dot and then QUIT.
        RawStep(b"Subject: x\r\n\r\nhi\n.\nRSET\r\n.\r\nQUIT\r\n", 3),
        note="Postfix 3.7 ends DATA at LF.LF; smtpgate only at CRLF.CRLF",
    ),
    s("bare-lf/helo", b"HELO client.example.net\n", "NOOP"),
    s(
        "bare-lf/session",
        b"EHLO client.example.net\n",
        b"MAIL FROM:<sender@example.net>\n",
        b"RCPT TO:<bob@bar.org>\n",
    ),
]

PIPELINED = [
    s(
        "pipelined/transaction",
        EHLO,
        b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<bob@bar.org>\r\n"
        b"RCPT TO:<carol@bar.org>\r\nDATA\r\n",
        MESSAGE,
        "QUIT",
    ),
    s(
        "pipelined/rejected-rcpt",
        EHLO,
        b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<x@other.org>\r\nRCPT TO:<bob@bar.org>\r\n"
        b"DATA\r\n",
        MESSAGE,
    ),
    s(
        "pipelined/all-rejected",
        EHLO,
        b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<x@other.org>\r\nDATA\r\nRSET\r\n",
    ),
    s(
        "pipelined/syntax-errors",
        EHLO,
        b"MAIL FROM:<sender@example.net\r\nRCPT TO:<bob@bar.org>\r\nFOO\r\nNOOP\r\n",
    ),
    s(
        "pipelined/quit-in-middle",
        EHLO,
        b"MAIL FROM:<sender@example.net>\r\nQUIT\r\nRCPT TO:<bob@bar.org>\r\n",
    ),
    s(
        "pipelined/ban-521",
        EHLO,
        b"MAIL FROM:<x@banned.example>\r\nRCPT TO:<bob@bar.org>\r\nRCPT TO:<carol@bar.org>\r\n"
        b"DATA\r\n",
        config=BAN_521,
    ),
    s(
        "pipelined/ban-521-not-banned",
        EHLO,
        b"MAIL FROM:<x@example.net>\r\nRCPT TO:<bob@bar.org>\r\nDATA\r\n",
        MESSAGE,
        config=BAN_521,
    ),
]

TINY_LIMITS = SessionConfig("tiny_limits", limits=TINY)
RCPT_RATE = SessionConfig("rcpt_rate", "smtpd_client_recipient_rate_limit = 3\n", limits=TINY)
MAIL_RATE = SessionConfig("mail_rate", "smtpd_client_message_rate_limit = 2\n", limits=TINY)
OTHER_RCPT = "RCPT TO:<x@other.org>"

#: smtpd_hard_error_limit 4, smtpd_junk_command_limit 2, smtpd_recipient_limit 2 with
#: overshoot 1, the client rate limits, and RFC 2920 synchronisation (Postfix 3.9's rules).
LIMITS = [
    s("limits/hard-errors", "FOO", "FOO", "FOO", "FOO", "FOO", config=TINY_LIMITS),
    s("limits/junk-noop", *["NOOP"] * 8, config=TINY_LIMITS),
    s("limits/junk-rset", EHLO, *["RSET"] * 7, config=TINY_LIMITS),
    s("limits/junk-helo", *["HELO a.example"] * 6, "NOOP", config=TINY_LIMITS),
    s("limits/rejected-rcpts", EHLO, MAIL, *[OTHER_RCPT] * 5, config=TINY_LIMITS),
    s(
        "limits/too-many-recipients",
        EHLO,
        MAIL,
        RCPT,
        "RCPT TO:<carol@bar.org>",
        "RCPT TO:<dave@bar.org>",
        "RCPT TO:<erin@bar.org>",
        "RCPT TO:<frank@bar.org>",
        "DATA",
        MESSAGE,
        "NOOP",
        config=TINY_LIMITS,
        note="the 452s beyond the overshoot are errors; the delivered message forgives them",
    ),
    s(
        "limits/errors-forgiven-after-message",
        EHLO,
        MAIL,
        RCPT,
        "FOO",
        "FOO",
        "FOO",
        "DATA",
        MESSAGE,
        "FOO",
        "FOO",
        "FOO",
        "NOOP",
        config=TINY_LIMITS,
    ),
    s("limits/errors-after-rset", EHLO, "FOO", "FOO", "RSET", "FOO", "FOO", config=TINY_LIMITS),
    s(
        "limits/rcpt-rate",
        EHLO,
        MAIL,
        RCPT,
        "RCPT TO:<c@bar.org>",
        "RCPT TO:<d@bar.org>",
        "RCPT TO:<e@bar.org>",
        "VRFY bob@bar.org",
        config=RCPT_RATE,
    ),
    s(
        "limits/mail-rate",
        EHLO,
        MAIL,
        "RSET",
        MAIL,
        "RSET",
        "MAIL FROM:<bad",
        MAIL,
        config=MAIL_RATE,
    ),
    s("sync/helo-then-noop", b"HELO a.example\r\nNOOP\r\n"),
    s("sync/helo-noarg-then-noop", b"HELO\r\nNOOP\r\n"),
    s(
        "sync/no-ehlo-mail-rcpt",
        "HELO a.example",
        b"MAIL FROM:<a@example.net>\r\n" + RCPT.encode() + b"\r\n",
    ),
    s("sync/no-hello-rset-noop", b"RSET\r\nNOOP\r\n"),
    s("sync/ehlo-then-noop", b"EHLO a.example\r\nNOOP\r\n"),
    s("sync/noop-noop", EHLO, b"NOOP\r\nNOOP\r\n"),
    s("sync/vrfy-noop", EHLO, b"VRFY bob@bar.org\r\nNOOP\r\n"),
    s("sync/rset-noop", EHLO, b"RSET\r\nNOOP\r\n"),
    s("sync/quit-noop", EHLO, b"QUIT\r\nNOOP\r\n"),
    s("sync/unknown-noop", EHLO, b"FOO\r\nNOOP\r\n"),
    s("sync/empty-noop", EHLO, b"\r\nNOOP\r\n"),
    s(
        "sync/data-then-content",
        EHLO,
        b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<bob@bar.org>\r\nDATA\r\nSubject: x\r\n",
    ),
    s("sync/after-dot", EHLO, MAIL, RCPT, "DATA", RawStep(b"x\r\n.\r\nNOOP\r\n", 2)),
    s(
        "sync/whole-transaction",
        EHLO,
        b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<bob@bar.org>\r\nDATA\r\n",
        RawStep(b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<a@example.net>\r\n", 2),
        "QUIT",
    ),
    s("sync/helo-tiny-limits", b"HELO a.example\r\nNOOP\r\n", config=TINY_LIMITS),
]

SEED = [
    s(
        "seed/as-written",
        "helo me.testing.example.com",
        "mail from: 318787866@qq.com",
        "rcpt to: foo@bar.org",
        "rcpt to: other@bar.org",
        config=SEED_AS_WRITTEN,
        note="REJECT 521: 554 5.7.1 ... Sender address rejected: 521, session open",
    ),
    s(
        "seed/as-meant",
        "helo me.testing.example.com",
        "mail from: 318787866@qq.com",
        "rcpt to: foo@bar.org",
        "rcpt to: other@bar.org",
        config=SEED_AS_MEANT,
        note="521 go away: 521 5.7.1 ... go away, then the server closes",
    ),
    s(
        "seed/good-sender",
        "helo me.testing.example.com",
        "mail from: friend@example.net",
        "rcpt to: foo@bar.org",
        "data",
        MESSAGE,
        "quit",
        config=SEED_AS_MEANT,
    ),
]

SCRIPTS: list[Script] = [
    *HELLO,
    *MAIL_FORMS,
    *RCPT_FORMS,
    *DATA,
    *OTHER,
    *BARE_LF,
    *PIPELINED,
    *LIMITS,
    *SEED,
]


def by_config(scripts: list[Script]) -> dict[str, list[Script]]:
    out: dict[str, list[Script]] = {}
    for script in scripts:
        out.setdefault(script.config.name, []).append(script)
    return out
