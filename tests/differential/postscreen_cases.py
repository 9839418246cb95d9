"""The postscreen scenarios typed at Postfix 3.7's postscreen and at smtpgate.

A :class:`ScreenConfig` is the main.cf text both servers get (postscreen_* lines included),
its tables, and its DNS data: which client is listed where, and which lists never answer.
A :class:`Scenario` is one client session under a config: the client address (127.0.0.N),
what it writes before the greeting (``pregreet``), the writes after it (``steps``, as in
:func:`tests.postfix_instance.raw_session`), and ``probe=False`` for a client that hangs up
after its last step. Scenarios of a config run in the order written, one after the other,
against one server: a later scenario may rely on what postscreen remembered of an earlier one
(PASS OLD). Each config's scenarios use their own client addresses otherwise. ``greet=False``
is a client that closes right after connecting (and its pregreet), before the greeting.

What Postfix does in each is written down in /work/notes/postscreen-facts.md (observed on
Postfix 3.7.11); the test compares, it does not hard-code Postfix's answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tests.postfix_instance import RawStep

#: Every config starts with these lines (both servers). smtpd_forbid_unauth_pipelining is
#: set to Postfix 3.7's default (smtpgate's is 3.9's, yes): a pregreeting client that
#: postscreen lets through reaches smtpd with its early bytes unread, and what smtpd then
#: does with them is smtpd's business, compared in test_sessions_vs_postfix.py.
BASE = """\
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
smtpd_forbid_unauth_pipelining = no
postscreen_greet_wait = 1s
"""

GREET_WAIT = 1.0
"""postscreen_greet_wait of the configs, in seconds: a greeting later than half of it counts
as "after the wait", an earlier one as "at once"."""

CLIENTS = [f"127.0.0.{n}" for n in range(2, 20)]


def reverse(ip: str) -> str:
    return ".".join(reversed(ip.split(".")))


@dataclass(frozen=True)
class ScreenConfig:
    name: str
    main_cf: str
    tables: Mapping[str, str] = field(default_factory=dict)
    listed: Mapping[str, Mapping[str, Sequence[str]]] = field(default_factory=dict)
    """client address -> {list domain: A records}"""
    dead: Sequence[str] = ()
    """list domains that never answer (for every client of :data:`CLIENTS`)"""

    @property
    def text(self) -> str:
        return BASE + self.main_cf


@dataclass(frozen=True)
class Scenario:
    name: str
    config: ScreenConfig
    client: str
    steps: Sequence[str | bytes | RawStep] = ()
    pregreet: bytes = b""
    probe: bool = True
    greet: bool = True  # False: the client closes before the greeting


EHLO = "EHLO client.example.net"
RCPT2 = "RCPT TO:<alice@bar.org>"
MAIL = "MAIL FROM:<a@example.net>"
RCPT = "RCPT TO:<bob@bar.org>"
QUIT = "QUIT"
MAIL_RCPT = [EHLO, MAIL, RCPT, QUIT]

# --------------------------------------------------------------------------- configs

TWO_LISTS = "postscreen_dnsbl_sites = zen.test*2 bl.test*1\npostscreen_dnsbl_threshold = 3\n"
BOTH = {"zen.test": ["127.0.0.2"], "bl.test": ["127.0.0.2"]}
ZEN = {"zen.test": ["127.0.0.2"]}

DNSBL_ENFORCE = ScreenConfig(
    "dnsbl-enforce",
    TWO_LISTS + "postscreen_dnsbl_action = enforce\n",
    listed={
        "127.0.0.2": BOTH,
        "127.0.0.3": ZEN,
        "127.0.0.4": BOTH,
        "127.0.0.5": BOTH,
        "127.0.0.6": BOTH,
        "127.0.0.7": BOTH,
        "127.0.0.8": BOTH,
    },
)
DNSBL_DROP = ScreenConfig(
    "dnsbl-drop",
    TWO_LISTS
    + "postscreen_dnsbl_action = drop\npostscreen_greet_banner = $smtpd_banner, wait please\n",
    listed={"127.0.0.2": BOTH, "127.0.0.3": ZEN},
)
DNSBL_IGNORE = ScreenConfig(
    "dnsbl-ignore",
    TWO_LISTS + "postscreen_dnsbl_action = ignore\n",
    listed={"127.0.0.2": BOTH},
)
FILTERS = ScreenConfig(
    "dnsbl-filters",
    "postscreen_dnsbl_sites = zen.test=127.0.0.[2..4]*2 bl.test*1"
    " dnswl.test=127.0.[0..255].[1..3]*-5\n"
    "postscreen_dnsbl_threshold = 3\n"
    "postscreen_dnsbl_allowlist_threshold = -2\n"
    "postscreen_dnsbl_action = enforce\n"
    "postscreen_dnsbl_reply_map = texthash:@DIR@/dnsbl_reply\n",
    tables={"dnsbl_reply": "zen.test   zen.example.com\n"},
    listed={
        # zen answers a code inside its filter, bl too: 2 + 1
        "127.0.0.2": {"zen.test": ["127.0.0.3"], "bl.test": ["127.0.0.2"]},
        # zen's code is outside the filter: 0 + 1
        "127.0.0.3": {"zen.test": ["127.0.0.10"], "bl.test": ["127.0.0.2"]},
        # two codes inside the filter still count the weight once: 2
        "127.0.0.4": {"zen.test": ["127.0.0.2", "127.0.0.4"]},
        # allow list: 2 + 1 - 5 = -2, at the allowlist threshold
        "127.0.0.5": {
            "zen.test": ["127.0.0.2"],
            "bl.test": ["127.0.0.2"],
            "dnswl.test": ["127.0.5.2"],
        },
        # allow list code outside its filter: 2 + 1 + 0 = 3
        "127.0.0.6": {
            "zen.test": ["127.0.0.2"],
            "bl.test": ["127.0.0.2"],
            "dnswl.test": ["127.0.5.7"],
        },
    },
)
DEAD_LIST = ScreenConfig(
    "dnsbl-dead-list",
    "postscreen_dnsbl_sites = dead.test*1 zen.test*2 dnswl.test*-5\n"
    "postscreen_dnsbl_threshold = 2\n"
    "postscreen_dnsbl_allowlist_threshold = -1\n"
    "postscreen_dnsbl_timeout = 2s\n"
    "postscreen_dnsbl_action = drop\n",
    listed={"127.0.0.2": ZEN, "127.0.0.3": {"dnswl.test": ["127.0.0.2"]}},
    dead=("dead.test",),
)
ALLOWLIST_EARLY = ScreenConfig(
    "dnsbl-allowlist",
    "postscreen_dnsbl_sites = zen.test*2 dnswl.test=127.0.[0..255].[1..3]*-5\n"
    "postscreen_dnsbl_threshold = 2\n"
    "postscreen_dnsbl_whitelist_threshold = -1\n",
    listed={"127.0.0.2": {"dnswl.test": ["127.0.5.2"]}, "127.0.0.3": ZEN},
)
NO_BANNER = ScreenConfig(
    "no-teaser-banner",
    "postscreen_greet_banner =\n"
    "postscreen_dnsbl_sites = zen.test*2\n"
    "postscreen_dnsbl_threshold = 2\n"
    "postscreen_dnsbl_action = enforce\n",
    listed={"127.0.0.2": ZEN},
)
ACCESS_TABLE = {"psacl": "127.0.0.2/32 permit\n127.0.0.3/32 reject\n127.0.0.4/32 dunno\n"}
ACCESS_ENFORCE = ScreenConfig(
    "access-enforce",
    "postscreen_access_list = permit_mynetworks, cidr:@DIR@/psacl\n"
    "postscreen_denylist_action = enforce\n",
    tables=ACCESS_TABLE,
)
ACCESS_DROP = ScreenConfig(
    "access-drop-old-names",
    "postscreen_access_list = permit_mynetworks, cidr:@DIR@/psacl\n"
    "postscreen_blacklist_action = drop\n"
    "respectful_logging = no\n",
    tables=ACCESS_TABLE,
)
ACCESS_IGNORE = ScreenConfig(
    "access-ignore",
    "postscreen_access_list = permit_mynetworks, cidr:@DIR@/psacl\n",
    tables=ACCESS_TABLE,
)
PREGREET = {
    action: ScreenConfig(f"pregreet-{action}", f"postscreen_greet_action = {action}\n")
    for action in ("enforce", "drop", "ignore")
}
DEEP = "postscreen_pipelining_enable = yes\npostscreen_non_smtp_command_enable = yes\n" + (
    "postscreen_bare_newline_enable = yes\n"
)
DEEP_CONFIGS = {
    "default": ScreenConfig("deep-default", DEEP),
    **{
        action: ScreenConfig(
            f"deep-{action}",
            DEEP
            + f"postscreen_pipelining_action = {action}\n"
            + f"postscreen_non_smtp_command_action = {action}\n"
            + f"postscreen_bare_newline_action = {action}\n",
        )
        for action in ("enforce", "drop", "ignore")
    },
}

MESSAGE = RawStep(b"Subject: hello\r\n\r\nhello\r\n.\r\n", 1)  # one reply: 250 queued
PIPELINED = b"MAIL FROM:<a@example.net>\r\nRCPT TO:<bob@bar.org>\r\n"

# --------------------------------------------------------------------------- scenarios


def _scenarios() -> list[Scenario]:
    s: list[Scenario] = []

    def add(
        name: str, config: ScreenConfig, client: str, *steps: str | bytes | RawStep, **kw: object
    ):
        s.append(Scenario(f"{config.name}/{name}", config, client, steps, **kw))  # type: ignore[arg-type]

    c = DNSBL_ENFORCE
    add("two-lists-over-threshold", c, "127.0.0.2", EHLO, MAIL, RCPT, RCPT2, QUIT)
    add("one-list-under-threshold", c, "127.0.0.3", *MAIL_RCPT)
    add("pass-old", c, "127.0.0.3", *MAIL_RCPT)
    add(
        "dummy-engine-commands",
        c,
        "127.0.0.4",
        "HELO client.example.net",
        MAIL,
        "MAIL FROM:<b@example.net>",
        "RSET",
        "NOOP",
        "VRFY bob",
        "VRFY",
        "ETRN bar.org",
        "ETRN",
        RCPT,
        "MAIL FROM:<>",
        RCPT,
        "FOO bar",
        "STARTTLS",
        "AUTH PLAIN",
        "HELO",
        "EHLO",
        "MAIL",
        QUIT,
    )
    add("data-after-mail", c, "127.0.0.5", EHLO, MAIL, "DATA")
    add("data-without-mail", c, "127.0.0.6", EHLO, "DATA")
    add("bdat-without-mail", c, "127.0.0.7", EHLO, "BDAT 10 LAST")
    add("hangup-after-greeting", c, "127.0.0.8", probe=False)
    # Not listed: dnsblog logs its answer whenever it comes, and this session ends at once.
    add("hangup-before-greeting", c, "127.0.0.9", greet=False)
    add("fail-not-remembered", c, "127.0.0.2", EHLO, QUIT)

    c = DNSBL_DROP
    add("two-lists-over-threshold", c, "127.0.0.2", *MAIL_RCPT)
    add("one-list-under-threshold", c, "127.0.0.3", *MAIL_RCPT)

    c = DNSBL_IGNORE
    add("two-lists-over-threshold", c, "127.0.0.2", *MAIL_RCPT)
    add("ignored-fail-not-remembered", c, "127.0.0.2", EHLO, QUIT)

    c = FILTERS
    add("filter-match-and-reply-map", c, "127.0.0.2", *MAIL_RCPT)
    add("code-outside-filter", c, "127.0.0.3", *MAIL_RCPT)
    add("weight-once-per-site", c, "127.0.0.4", *MAIL_RCPT)
    add("allowlist-at-threshold", c, "127.0.0.5", *MAIL_RCPT)
    add("allowlist-code-outside-filter", c, "127.0.0.6", *MAIL_RCPT)

    c = DEAD_LIST
    add("listed-with-dead-list", c, "127.0.0.2", *MAIL_RCPT)
    add("allowlisted-waits-for-dead-list", c, "127.0.0.3", *MAIL_RCPT)
    add("unlisted-with-dead-list", c, "127.0.0.4", *MAIL_RCPT)

    c = ALLOWLIST_EARLY
    add("allowlisted-greeted-early", c, "127.0.0.2", *MAIL_RCPT)
    add("allowlisted-pass-old", c, "127.0.0.2", EHLO, QUIT)
    add("under-threshold-waits", c, "127.0.0.3", *MAIL_RCPT)
    add("unlisted-waits", c, "127.0.0.4", EHLO, QUIT)

    c = NO_BANNER
    add("listed", c, "127.0.0.2", *MAIL_RCPT)
    add("unlisted", c, "127.0.0.3", *MAIL_RCPT)
    add("pregreet-not-tested", c, "127.0.0.4", QUIT, pregreet=b"EHLO bot.example\r\n")

    for c in (ACCESS_ENFORCE, ACCESS_DROP, ACCESS_IGNORE):
        add("permit", c, "127.0.0.2", EHLO, QUIT)
        # VRFY: postscreen's answer (enforce); with ignore it is smtpd's, not compared here.
        vrfy = ["VRFY bob"] if c is ACCESS_ENFORCE else []
        add("reject", c, "127.0.0.3", EHLO, MAIL, RCPT, *vrfy, QUIT)
        add("dunno", c, "127.0.0.4", EHLO, QUIT)

    bot = b"EHLO bot.example\r\n"
    for c in PREGREET.values():
        add("pregreet-ehlo", c, "127.0.0.2", MAIL, RCPT, QUIT, pregreet=bot)
        if c is not PREGREET["ignore"]:
            # ignore: smtpd reads the line; smtpd's answer to binary is not postscreen's.
            add("pregreet-binary", c, "127.0.0.3", QUIT, pregreet=b"\x00bin\tary \xff\r\n")
        if c is not PREGREET["enforce"]:
            # enforce: the dummy engine sends no 220 line and waits for the line's end,
            # the client for the greeting: both wait for the command time limit.
            add("pregreet-partial", c, "127.0.0.5", QUIT, pregreet=b"EHLO")
        add("polite", c, "127.0.0.4", EHLO, QUIT)
        add("pass-old-pregreet-unnoticed", c, "127.0.0.4", QUIT, pregreet=bot)
        add("hangup-before-greeting", c, "127.0.0.7", greet=False)

    for action, c in DEEP_CONFIGS.items():
        if action == "default":
            add("good-client-450", c, "127.0.0.2", EHLO, MAIL, RCPT, RCPT2, QUIT)
            add("good-client-reconnects", c, "127.0.0.2", *MAIL_RCPT)
            add("good-client-sends-data", c, "127.0.0.9", EHLO, MAIL, RCPT, "DATA", MESSAGE, QUIT)
            add("no-rcpt-no-pass", c, "127.0.0.8", EHLO, QUIT)
            add("no-rcpt-no-pass-again", c, "127.0.0.8", EHLO, QUIT)
            add("http-connect", c, "127.0.0.5", "CONNECT 10.0.0.1:25 HTTP/1.0", QUIT)
        add("pipelining", c, "127.0.0.3", EHLO, PIPELINED, RCPT, QUIT)
        add("http-get", c, "127.0.0.4", "GET / HTTP/1.0", QUIT)
        add("bare-newline", c, "127.0.0.6", b"EHLO bare.example\n", MAIL, RCPT, QUIT)
        add("header-as-command", c, "127.0.0.7", EHLO, "Subject: hello", QUIT)
    return s


SCENARIOS = _scenarios()
CONFIGS: dict[str, ScreenConfig] = {s.config.name: s.config for s in SCENARIOS}
