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

#: Postfix-only lines: none now that smtpgate offers ETRN and CHUNKING as Postfix does (the
#: EHLO replies compare whole).
POSTFIX_ONLY = ""

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
    postfix_only: str = POSTFIX_ONLY
    """Lines for Postfix alone; "" keeps ETRN and CHUNKING in its EHLO reply."""

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
    logs: bool = False
    """Compare the action log lines too (reject/discard/redirect/... and "improper
    command pipelining"), queue ids normalised."""
    xfail: str = ""
    """Why today's smtpd cannot pass it yet: a strict xfail until the SMTP state machine."""
    relayed: bytes | None = None
    """The content the relayhost must get (after the Received: header): what Postfix's
    smtp client sent on for the same input (docs/postfix-behaviour.md), dot-unstuffed."""
    envelope: frozenset[str] | None = None
    """The recipients the relayhost must get for the (single) message; empty: nothing."""


EHLO = "EHLO client.example.net"
MAIL = "MAIL FROM:<sender@example.net>"
RCPT = "RCPT TO:<bob@bar.org>"
MESSAGE = RawStep(b"Subject: test\r\n\r\nhello\r\n.\r\n", 1)
LONG = "NOOP " + "x" * 2995  # 3000 characters before CRLF


def s(
    name: str,
    *steps: Step,
    config: SessionConfig = PLAIN,
    note: str = "",
    logs: bool = False,
    xfail: str = "",
    relayed: bytes | None = None,
    envelope: frozenset[str] | None = None,
) -> Script:
    return Script(name, tuple(steps), config, note, logs, xfail, relayed, envelope)


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
    s("unknown/bdat-no-transaction", EHLO, RawStep(b"BDAT 10\r\n0123456789", 1)),
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


# --------------------------------------------------------------------------- issue 12 item 5
# The Postfix-fidelity points of issue 12, from docs/postfix-behaviour.md. A script with
# ``xfail`` needs the SMTP state machine (smtpgate/smtp/); the lead flips it.

SM = "needs the SMTP state machine: "
CLIENT_REJECT = "smtpd_client_restrictions = check_client_access inline:{ 127.0.0.2=REJECT }\n"
NO_FORBID = RELAXED.replace(
    "smtpd_forbid_unauth_pipelining = yes", "smtpd_forbid_unauth_pipelining = no"
)

DELAY_NO_CLIENT = SessionConfig("delay_no_client", "smtpd_delay_reject = no\n" + CLIENT_REJECT)
DELAY_NO_HELO = SessionConfig(
    "delay_no_helo",
    "smtpd_delay_reject = no\n"
    "smtpd_helo_restrictions = check_helo_access inline:{ bad.example=REJECT }\n",
)

DELAY_REJECT_NO = [
    s(
        "delay-no/connect-reject-every-command",
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
        config=DELAY_NO_CLIENT,
        logs=True,
        note="554 instead of the 220 greeting, the session stays open",
    ),
    s("delay-no/connect-reject-quit", "QUIT", config=DELAY_NO_CLIENT, logs=True),
    s(
        "delay-no/helo-reject-then-mail",
        "HELO bad.example",
        MAIL,
        RCPT,
        "RSET",
        config=DELAY_NO_HELO,
        logs=True,
    ),
    s(
        "delay-no/ehlo-reject-proto-smtp",
        "EHLO bad.example",
        MAIL,
        RCPT,
        config=DELAY_NO_HELO,
        logs=True,
    ),
    s(
        "delay-no/ehlo-reject-keeps-transaction",
        EHLO,
        MAIL,
        "EHLO bad.example",
        RCPT,
        "HELO again.example",
        RCPT,
        config=DELAY_NO_HELO,
        logs=True,
    ),
]

#: ETRN and CHUNKING offered, as Postfix does by default (no POSTFIX_ONLY); the scripts
#: say HELO, so the EHLO keyword list plays no part.
ETRN_PLAIN = SessionConfig("etrn_plain", postfix_only="")
ETRN_CLIENT_REJECT = SessionConfig("etrn_client_reject", CLIENT_REJECT, postfix_only="")
ETRN_HELO_REQUIRED = SessionConfig(
    "etrn_helo_required", "smtpd_helo_required = yes\n" + CLIENT_REJECT, postfix_only=""
)
ETRN_RESTRICTED = SessionConfig(
    "etrn_restricted",
    "smtpd_helo_restrictions = check_helo_access inline:{ bad.example=REJECT }\n"
    "smtpd_etrn_restrictions = check_etrn_access inline:{ example.org=REJECT }, "
    "check_client_access inline:{ 127.0.0.2=REJECT }\n",
    postfix_only="",
)
ETRN_XFAIL = SM + "ETRN (etrn_cmd's checks, then PolicySession.etrn)"

ETRN = [
    s(
        "etrn/syntax",
        "HELO client.example.net",
        "ETRN",
        "ETRN a b",
        "ETRN <bar.org>",
        config=ETRN_PLAIN,
    ),
    s(
        "etrn/not-a-fast-flush-domain",
        "HELO client.example.net",
        "ETRN example.org",
        config=ETRN_PLAIN,
        note="459 <example.org>: service unavailable (example.org is not in fast_flush_domains)",
    ),
    s(
        "etrn/in-transaction",
        "HELO client.example.net",
        MAIL,
        "ETRN example.org",
        RCPT,
        "ETRN example.org",
        config=ETRN_PLAIN,
    ),
    s(
        "etrn/client-rejected",
        "HELO client.example.net",
        "ETRN example.org",
        "ETRN",
        "ETRN <bar.org>",
        config=ETRN_CLIENT_REJECT,
        logs=True,
    ),
    s(
        "etrn/client-rejected-before-helo",
        "ETRN example.org",
        config=ETRN_CLIENT_REJECT,
        logs=True,
    ),
    s(
        "etrn/helo-required",
        "ETRN example.org",
        "ETRN",
        "HELO client.example.net",
        "ETRN example.org",
        config=ETRN_HELO_REQUIRED,
        logs=True,
    ),
    s(
        "etrn/restrictions",
        "HELO client.example.net",
        "ETRN example.org",
        "ETRN sub.example.org",
        "ETRN other.org",
        config=ETRN_RESTRICTED,
        logs=True,
    ),
    s(
        "etrn/helo-restriction",
        "HELO bad.example",
        "ETRN other.org",
        config=ETRN_RESTRICTED,
        logs=True,
    ),
    s(
        "etrn/delay-no-access-denied",
        "ETRN example.org",
        "QUIT",
        config=DELAY_NO_CLIENT,
        logs=True,
    ),
]

NL_NORMALIZE = SessionConfig("bare_newline_normalize", "smtpd_forbid_bare_newline = normalize\n")
NL_REJECT = SessionConfig("bare_newline_reject", "smtpd_forbid_bare_newline = reject\n")
NL_TEXT = (
    SM + "the bare <LF> reply names the host: 550 5.5.2 mx.example.org Error: bare <LF> received"
)
NL_CLOSE = NL_TEXT + "; after a command line that ends in a bare LF the session closes"


def _content(
    name: str, data: bytes, relayed: bytes | None, config: SessionConfig, **kw: object
) -> Script:
    return s(
        f"bare-newline/{name}",
        EHLO,
        MAIL,
        RCPT,
        "DATA",
        RawStep(data, 1),
        "QUIT",
        config=config,
        relayed=relayed,
        **kw,  # type: ignore[arg-type]
    )


BARE_NEWLINE = [
    _content(
        "normalize-bare-cr",
        b"Subject: cr\r\n\r\nab\rcd\r\nend\r\n.\r\n",
        b"Subject: cr\r\n\r\nab cd\r\nend\r\n",
        NL_NORMALIZE,
    ),
    _content(
        "normalize-bare-lf",
        b"Subject: lf\r\n\r\nab\ncd\r\nend\r\n.\r\n",
        b"Subject: lf\r\n\r\nab\r\ncd\r\nend\r\n",
        NL_NORMALIZE,
    ),
    _content(
        "normalize-dot-stuffed",
        b"Subject: dots\r\n\r\nx\r\n..\r\n..x\r\ny\r\n.\r\n",
        b"Subject: dots\r\n\r\nx\r\n.\r\n.x\r\ny\r\n",
        NL_NORMALIZE,
    ),
    _content(
        "normalize-lf-dot-lf",
        b"Subject: lfdot\r\n\r\nhi\n.\nafter\r\n.\r\n",
        b"Subject: lfdot\r\n\r\nhi\r\nafter\r\n",
        NL_NORMALIZE,
    ),
    _content(
        "normalize-lf-dot-crlf",
        b"Subject: x\r\n\r\nhi\n.\r\nafter\r\n.\r\n",
        b"Subject: x\r\n\r\nhi\r\nafter\r\n",
        NL_NORMALIZE,
    ),
    _content(
        "normalize-cr-dot",
        b"Subject: x\r\n\r\nhi\r.\r\nafter\r\n.\r\n",
        b"Subject: x\r\n\r\nhi .\r\nafter\r\n",
        NL_NORMALIZE,
    ),
    s("bare-newline/normalize-command", b"EHLO client.example.net\n", "NOOP", config=NL_NORMALIZE),
    _content(
        "reject-bare-lf",
        b"Subject: lf\r\n\r\nab\ncd\r\nend\r\n.\r\n",
        None,
        NL_REJECT,
        logs=True,
        envelope=frozenset(),
    ),
    _content(
        "reject-lf-dot-lf",
        b"Subject: lfdot\r\n\r\nhi\n.\nafter\r\n.\r\n",
        None,
        NL_REJECT,
        logs=True,
        envelope=frozenset(),
    ),
    _content(
        "reject-crlf-lf",
        b"Subject: x\r\n\r\nhi\r\n\nafter\r\n.\r\n",
        None,
        NL_REJECT,
        logs=True,
        envelope=frozenset(),
    ),
    _content(
        "reject-bare-cr-accepted",
        b"Subject: cr\r\n\r\nab\rcd\r\nend\r\n.\r\n",
        b"Subject: cr\r\n\r\nab cd\r\nend\r\n",
        NL_REJECT,
    ),
    s(
        "bare-newline/reject-command",
        b"EHLO client.example.net\n",
        "NOOP",
        config=NL_REJECT,
        logs=True,
    ),
    s(
        "bare-newline/reject-mail-command",
        EHLO,
        b"MAIL FROM:<a@example.net>\n",
        "NOOP",
        config=NL_REJECT,
        logs=True,
    ),
    s(
        "bare-newline/reject-pipelined",
        EHLO,
        RawStep(b"MAIL FROM:<a@example.net>\nRCPT TO:<bob@bar.org>\r\n", 2),
        "NOOP",
        config=NL_REJECT,
        logs=True,
    ),
]

PIPE = b"MAIL FROM:<a@example.net>\r\nRCPT TO:<bob@bar.org>\r\nDATA\r\n"
UNAUTH_DATA = SessionConfig(
    "unauth_pipelining_data",
    "smtpd_data_restrictions = reject_unauth_pipelining\n",
    limits=NO_FORBID,
)
UNAUTH_CLIENT = SessionConfig(
    "unauth_pipelining_client",
    "smtpd_client_restrictions = reject_unauth_pipelining\n",
    limits=NO_FORBID,
)
UNAUTH_FORBID = SessionConfig(
    "unauth_pipelining_forbid", "smtpd_data_restrictions = reject_unauth_pipelining\n"
)

UNAUTH_PIPELINING = [
    s(
        "unauth-pipelining/data-helo",
        "HELO client.example.net",
        RawStep(PIPE, 3),
        MESSAGE,
        config=UNAUTH_DATA,
        logs=True,
        note="503 5.5.0 <DATA>: Data command rejected; the content is then junk: 221 2.7.0",
    ),
    s(
        "unauth-pipelining/data-helo-mail-in-one-write",
        RawStep(b"HELO a.example\r\nMAIL FROM:<a@example.net>\r\n", 2),
        RCPT,
        "DATA",
        MESSAGE,
        config=UNAUTH_DATA,
        logs=True,
    ),
    s(
        "unauth-pipelining/data-ehlo",
        EHLO,
        RawStep(PIPE, 3),
        MESSAGE,
        "QUIT",
        config=UNAUTH_DATA,
        logs=True,
    ),
    s(
        "unauth-pipelining/client-helo",
        "HELO client.example.net",
        RawStep(PIPE, 3),
        MESSAGE,
        config=UNAUTH_CLIENT,
        logs=True,
    ),
    s(
        "unauth-pipelining/client-helo-mail-in-one-write",
        RawStep(b"HELO a.example\r\nMAIL FROM:<a@example.net>\r\n", 2),
        RCPT,
        "DATA",
        MESSAGE,
        config=UNAUTH_CLIENT,
        logs=True,
    ),
    s(
        "unauth-pipelining/forbid-helo",
        "HELO client.example.net",
        RawStep(PIPE, 3),
        config=UNAUTH_FORBID,
        logs=True,
    ),
]

QUOTED = SessionConfig(
    "quoted_log", "smtpd_sender_restrictions = check_sender_access inline:{ x.org=REJECT }\n"
)
DISCARD = SessionConfig(
    "discard",
    "smtpd_recipient_restrictions = check_recipient_access "
    "inline:{ disc@bar.org=DISCARD d.@bar.org=DISCARD }, permit\n"
    "smtpd_data_restrictions = check_sender_access inline:{ d@example.net=DISCARD }\n"
    "smtpd_end_of_data_restrictions = check_sender_access inline:{ e@example.net=DISCARD }\n",
)
NO_MESSAGE = frozenset[str]()

LOG_FORMS = [
    *[
        s(f"log/sender-{name}", EHLO, f"MAIL FROM:<{addr}>", RCPT, config=QUOTED, logs=True)
        for name, addr in [
            ("space", '"a b"@x.org'),
            ("at", '"a@b"@x.org'),
            ("trailing-dot", "a.@x.org"),
            ("quoted-trailing-dot", '"a."@x.org'),
            ("quoted-plain", '"ab"@x.org'),
            ("backslash-space", "a\\ b@x.org"),
            ("escaped-quote", '"a\\"b"@x.org'),
        ]
    ],
    *[
        s(
            f"log/recipient-{name}",
            EHLO,
            'MAIL FROM:<"s p"@example.net>',
            f"RCPT TO:<{addr}>",
            config=QUOTED,
            logs=True,
        )
        for name, addr in [
            ("space", '"a b"@other.org'),
            ("at", '"a@b"@other.org'),
            ("trailing-dot", "a.@other.org"),
        ]
    ],
    s("log/null-sender", EHLO, "MAIL FROM:<>", "RCPT TO:<x@other.org>", config=QUOTED, logs=True),
    s(
        "discard/second-of-three",
        EHLO,
        MAIL,
        RCPT,
        "RCPT TO:<disc@bar.org>",
        "RCPT TO:<carol@bar.org>",
        "DATA",
        MESSAGE,
        "QUIT",
        config=DISCARD,
        logs=True,
        envelope=NO_MESSAGE,
    ),
    s(
        "discard/first-then-unroutable",
        EHLO,
        'MAIL FROM:<"s p"@example.net>',
        "RCPT TO:<d.@bar.org>",
        RCPT,
        "RCPT TO:<other@other.org>",
        "DATA",
        MESSAGE,
        "QUIT",
        config=DISCARD,
        logs=True,
        envelope=NO_MESSAGE,
        note="after a DISCARD even other.org is accepted: no more checks",
    ),
    s(
        "discard/rset-then-normal",
        EHLO,
        MAIL,
        "RCPT TO:<disc@bar.org>",
        "RSET",
        MAIL,
        RCPT,
        "DATA",
        MESSAGE,
        "QUIT",
        config=DISCARD,
        logs=True,
        envelope=frozenset({"bob@bar.org"}),
    ),
    s(
        "discard/at-data",
        EHLO,
        "MAIL FROM:<d@example.net>",
        RCPT,
        "RCPT TO:<carol@bar.org>",
        "DATA",
        MESSAGE,
        "QUIT",
        config=DISCARD,
        logs=True,
        envelope=NO_MESSAGE,
    ),
    s(
        "discard/at-end-of-message",
        EHLO,
        "MAIL FROM:<e@example.net>",
        RCPT,
        "RCPT TO:<carol@bar.org>",
        "DATA",
        MESSAGE,
        "QUIT",
        config=DISCARD,
        logs=True,
        envelope=NO_MESSAGE,
    ),
]


def _bdat(count: int, last: bool = False, data: bytes | None = None) -> bytes:
    chunk = data if data is not None else b"x" * count
    return f"BDAT {count}{' LAST' if last else ''}\r\n".encode() + chunk


BODY = b"Subject: b\r\n\r\nhello\r\n"
CHUNKING = SessionConfig("chunking", "message_size_limit = 2000\n", postfix_only="")
CHUNKING_RULES = SessionConfig(
    "chunking_rules",
    "smtpd_data_restrictions = check_sender_access inline:{ d@example.net=REJECT }\n"
    "smtpd_end_of_data_restrictions = check_sender_access inline:{ e@example.net=REJECT }\n",
    postfix_only="",
)
CHUNKING_NL_REJECT = SessionConfig(
    "chunking_nl_reject", "smtpd_forbid_bare_newline = reject\n", postfix_only=""
)
BDAT_XFAIL = (
    "lock-step: the reply to the last chunk is the backend's; this test backend (aiosmtpd, no "
    "CHUNKING) says 'Ok: queued as', Postfix's own queue 'Ok: N bytes queued as' (a Postfix "
    "backend says so through smtpgate: tests/serve/test_interop_postfix.py)"
)
#: The scripts whose last reply is the backend's "queued as" (the others match Postfix).
BDAT_BACKEND_REPLY = {
    "one-chunk",
    "two-chunks-then-empty-last",
    "zero-last",
    "lower-case-last",
    "noop-between-chunks",
    "pipelined-chunks",
    "pipelined-transaction",
    "content-bare-lf-cr-dot",
}


def bdat(name: str, *steps: Step, config: SessionConfig = CHUNKING, **kw: object) -> Script:
    xfail = BDAT_XFAIL if name in BDAT_BACKEND_REPLY else ""
    return s(f"bdat/{name}", *steps, config=config, xfail=xfail, **kw)  # type: ignore[arg-type]


BDAT = [
    bdat("ehlo-keywords", EHLO),
    bdat(
        "one-chunk",
        EHLO,
        MAIL,
        RCPT,
        RawStep(_bdat(len(BODY), True, BODY), 1),
        "QUIT",
        relayed=BODY,
    ),
    bdat(
        "two-chunks-then-empty-last",
        EHLO,
        MAIL,
        RCPT,
        RawStep(_bdat(12, False, BODY[:12]), 1),
        RawStep(_bdat(9, False, BODY[12:]), 1),
        RawStep(b"BDAT 0 LAST\r\n", 1),
        "QUIT",
        relayed=BODY,
    ),
    bdat("zero-last", EHLO, MAIL, RCPT, RawStep(b"BDAT 0 LAST\r\n", 1), "QUIT"),
    bdat("zero-not-last", EHLO, MAIL, RCPT, "BDAT 0", RawStep(b"BDAT 0 LAST\r\n", 1), "QUIT"),
    bdat("no-mail", EHLO, RawStep(_bdat(10), 1), "NOOP"),
    bdat("no-rcpt", EHLO, MAIL, RawStep(_bdat(10), 1), "NOOP"),
    bdat(
        "rejected-rcpt-only",
        EHLO,
        MAIL,
        "RCPT TO:<x@other.org>",
        RawStep(_bdat(10, True), 1),
        "NOOP",
    ),
    bdat("syntax-word", EHLO, MAIL, RCPT, "BDAT x"),
    bdat("syntax-extra", EHLO, MAIL, RCPT, RawStep(b"BDAT 10 FOO\r\n" + b"x" * 10, 1)),
    bdat("syntax-none", EHLO, MAIL, RCPT, "BDAT"),
    bdat("syntax-huge", EHLO, MAIL, RCPT, "BDAT 99999999999999999999"),
    bdat("lower-case-last", EHLO, MAIL, RCPT, RawStep(b"bdat 10 last\r\n" + b"x" * 10, 1), "QUIT"),
    bdat("chunk-over-size-limit", EHLO, MAIL, RCPT, RawStep(_bdat(3000, True), 1), "NOOP", MAIL),
    bdat(
        "total-over-size-limit",
        EHLO,
        MAIL,
        RCPT,
        RawStep(_bdat(1500), 1),
        RawStep(_bdat(1500, True), 1),
        "NOOP",
    ),
    bdat("then-data", EHLO, MAIL, RCPT, RawStep(_bdat(10), 1), "DATA", "NOOP"),
    bdat(
        "rset-between-chunks",
        EHLO,
        MAIL,
        RCPT,
        RawStep(_bdat(10), 1),
        "RSET",
        RawStep(_bdat(3, True), 1),
    ),
    bdat(
        "noop-between-chunks",
        EHLO,
        MAIL,
        RCPT,
        RawStep(_bdat(10), 1),
        "NOOP",
        RawStep(_bdat(3, True), 1),
        "QUIT",
    ),
    bdat(
        "pipelined-chunks",
        EHLO,
        RawStep(f"{MAIL}\r\n{RCPT}\r\n".encode(), 2),
        RawStep(_bdat(12, False, BODY[:12]) + _bdat(9, True, BODY[12:]), 2),
        "QUIT",
        relayed=BODY,
    ),
    bdat(
        "pipelined-transaction",
        EHLO,
        RawStep(f"{MAIL}\r\n{RCPT}\r\n".encode() + _bdat(len(BODY), True, BODY), 3),
        "QUIT",
    ),
    bdat(
        "content-bare-lf-cr-dot",
        EHLO,
        MAIL,
        RCPT,
        RawStep(_bdat(24, True, b"Subject: z\r\n\r\na\nb\rc\r\n.\r\n"), 1),
        "QUIT",
        relayed=b"Subject: z\r\n\r\na\r\nb c\r\n.\r\n",
    ),
    bdat(
        "data-restrictions-at-first-chunk",
        EHLO,
        "MAIL FROM:<d@example.net>",
        RCPT,
        RawStep(_bdat(10), 1),
        RawStep(_bdat(3, True), 1),
        "NOOP",
        config=CHUNKING_RULES,
        logs=True,
    ),
    bdat(
        "end-of-data-restrictions-at-last",
        EHLO,
        "MAIL FROM:<e@example.net>",
        RCPT,
        RawStep(_bdat(10), 1),
        RawStep(_bdat(3, True), 1),
        "NOOP",
        config=CHUNKING_RULES,
        logs=True,
    ),
    bdat(
        "bare-lf-reject",
        EHLO,
        MAIL,
        RCPT,
        RawStep(_bdat(22, True, b"Subject: z\r\n\r\na\nb\r\n.\r\n"), 1),
        "NOOP",
        config=CHUNKING_NL_REJECT,
        logs=True,
    ),
    bdat(
        "command-bare-lf-reject",
        EHLO,
        MAIL,
        RCPT,
        RawStep(b"BDAT 3 LAST\nabc", 1),
        "NOOP",
        config=CHUNKING_NL_REJECT,
        logs=True,
    ),
]

ACTIONS = SessionConfig(
    "access_actions",
    "smtpd_recipient_restrictions = check_recipient_access inline:{ "
    "{r@bar.org=REDIRECT target@bar.org} {b@bar.org=BCC copy@bar.org} "
    "{f@bar.org=FILTER smtp:[127.0.0.1]:10025} {h@bar.org=HOLD} "
    "{h2@bar.org=HOLD held for review} }, permit\n"
    "smtpd_sender_restrictions = check_sender_access inline:{ "
    "{rs@example.net=REDIRECT target@bar.org} {bs@example.net=BCC copy@bar.org} }\n",
)


def action(name: str, *steps: Step, **kw: object) -> Script:
    return s(
        f"access/{name}", EHLO, *steps, "DATA", MESSAGE, "QUIT", config=ACTIONS, logs=True, **kw
    )  # type: ignore[arg-type]


ACCESS_ACTIONS = [
    action(
        "redirect-one-of-two",
        MAIL,
        RCPT,
        "RCPT TO:<r@bar.org>",
        envelope=frozenset({"target@bar.org"}),
    ),
    action(
        "redirect-at-mail",
        "MAIL FROM:<rs@example.net>",
        RCPT,
        "RCPT TO:<carol@bar.org>",
        envelope=frozenset({"target@bar.org"}),
    ),
    action(
        "bcc",
        MAIL,
        RCPT,
        "RCPT TO:<b@bar.org>",
        envelope=frozenset({"bob@bar.org", "b@bar.org", "copy@bar.org"}),
    ),
    action(
        "bcc-at-mail",
        "MAIL FROM:<bs@example.net>",
        RCPT,
        envelope=frozenset({"bob@bar.org", "copy@bar.org"}),
    ),
    action(
        "filter",
        MAIL,
        RCPT,
        "RCPT TO:<f@bar.org>",
        envelope=NO_MESSAGE,
        xfail=(
            "a proxy relays in lock-step: nothing listens on the FILTER next hop "
            "127.0.0.1:10025 here, so smtpgate answers its 451 at DATA where Postfix queues "
            "(tests/serve/test_relay_nexthop.py relays to a FILTER hop that listens)"
        ),
    ),
    action("hold-once", MAIL, RCPT, "RCPT TO:<h@bar.org>", "RCPT TO:<h2@bar.org>"),
]


#: soft_bounce = yes: smtpd_chat_reply() turns every 5xx the client gets into a 4xx, the
#: syntax and sequence errors too (the log lines of restrictions keep what they say).
SOFT_BOUNCE_CF = SessionConfig("soft_bounce", "soft_bounce = yes\n")
SOFT_BOUNCE = [
    s(
        "soft-bounce/every-5xx",
        EHLO,
        "FOO",
        "MAIL FROM:<a b@x>",
        MAIL,
        "RCPT TO:<x@elsewhere.example>",
        "DATA",
        "VRFY",
        "QUIT",
        config=SOFT_BOUNCE_CF,
        logs=True,
        note="400 4.5.2 Error: command not recognized, 454 4.5.1 Error: no valid recipients",
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
    *DELAY_REJECT_NO,
    *ETRN,
    *SOFT_BOUNCE,
    *BARE_NEWLINE,
    *UNAUTH_PIPELINING,
    *LOG_FORMS,
    *BDAT,
    *ACCESS_ACTIONS,
]


def by_config(scripts: list[Script]) -> dict[str, list[Script]]:
    out: dict[str, list[Script]] = {}
    for script in scripts:
        out.setdefault(script.config.name, []).append(script)
    return out
