"""The differential scenario set: Postfix configurations and the SMTP dialogues run against them.

A :class:`Config` is what an admin writes: main.cf lines and table files (``@DIR@`` stands for
the directory the tables are written to). A :class:`Case` is one client session against a
config: source address, HELO name, sender, recipients. Cases sharing a config run against one
Postfix instance, so :data:`CASES` groups naturally (see :func:`by_config`).

Every config starts with :data:`BASE` (the host's identity, relay domain and local users, the
latter so that no case depends on the machine's passwd or /etc/aliases), so smtpgate and
Postfix read the same semantic lines; the Postfix-only plumbing (directories, listener,
logging) is added by ``tests/postfix_instance.py``.

The same list feeds ``make_reference.py`` (writes ``postfix_reference.md``) and
``test_vs_postfix.py`` (asserts smtpgate's ``explain`` equals Postfix).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

BASE = """\
compatibility_level = {compat}
myhostname = mx.example.org
mynetworks = 127.0.0.1/32
relay_domains = bar.org
local_recipient_maps = inline:{{ postmaster=x, root=x }}
"""


@dataclass(frozen=True)
class Config:
    """main.cf lines (without BASE) and table files, named and explained."""

    name: str
    title: str
    main_cf: str
    tables: tuple[tuple[str, str], ...] = ()
    compat: str = "3.6"
    #: Postfix's smtpd refuses this config at startup (a fatal error, no session at all).
    fatal: bool = False

    @property
    def main_cf_text(self) -> str:
        """The full semantic main.cf text: BASE, then the config's own lines."""
        return BASE.format(compat=self.compat) + self.main_cf.strip("\n") + "\n"

    @property
    def table_map(self) -> dict[str, str]:
        """Table file name -> text."""
        return dict(self.tables)


@dataclass(frozen=True)
class Case:
    """One SMTP session against a config. Addresses are given without angle brackets."""

    config: Config
    name: str
    client: str = "127.0.0.2"
    helo: str | None = "me.example.com"
    mail_from: str | None = "sender@example.com"
    rcpts: tuple[str, ...] = ("foo@bar.org",)
    ehlo: bool = False
    note: str = ""
    #: False when ``smtpgate explain`` cannot express the session (EHLO, no MAIL...):
    #: recorded in the reference, not compared.
    explainable: bool = True

    @property
    def id(self) -> str:
        """A stable pytest id: ``config/case``."""
        return f"{self.config.name}/{self.name}"


def tables(**files: str) -> tuple[tuple[str, str], ...]:
    """Table files as a hashable tuple; dedent each text."""
    out = []
    for name, text in files.items():
        lines = [ln.strip() for ln in text.strip("\n").splitlines()]
        out.append((name, "\n".join(lines) + "\n"))
    return tuple(out)


def slugify(text: str) -> str:
    """A DNS-label-safe slug."""
    text = text.lower().replace("+", "-plus-").replace("@", "-at-")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


CASES: list[Case] = []


def add(config: Config, *cases: Case) -> None:
    """Register cases (they must belong to ``config``)."""
    for c in cases:
        assert c.config is config
    CASES.extend(cases)


# ---------------------------------------------------------------------------- the seed story
SEED_MAIN = """\
smtpd_recipient_restrictions =
        permit_mynetworks
        check_recipient_access hash:@DIR@/protected_destinations
smtpd_restriction_classes = good_senders_only
good_senders_only = check_sender_access hash:@DIR@/restricted_senders, permit
"""
PROTECTED = """\
# not everyone can send to these destinations
# we restrict some of them

foo@bar.org     good_senders_only
"""
seed_written = Config(
    "seed-as-written",
    "The seed config exactly as the admin wrote it (`qq.com REJECT 521`).",
    SEED_MAIN,
    tables(
        protected_destinations=PROTECTED,
        restricted_senders="""
        # We do not want mail from these folks, generally

        qq.com         REJECT  521
        163.com        REJECT  521
        """,
    ),
)
seed_meant = Config(
    "seed-as-meant",
    "The seed config as the admin meant it (`qq.com 521 go away`: reply 521, then disconnect).",
    SEED_MAIN,
    tables(
        protected_destinations=PROTECTED,
        restricted_senders="""
        qq.com         521 go away
        163.com        521 5.7.1 go away
        """,
    ),
)
for cfg in (seed_written, seed_meant):
    add(
        cfg,
        Case(
            cfg,
            "qq",
            helo="me.testing.example.com",
            mail_from="318787866@qq.com",
            rcpts=("foo@bar.org", "other@bar.org"),
            client="127.0.0.82",
        ),
        Case(
            cfg,
            "qq-other-first",
            mail_from="318787866@qq.com",
            rcpts=("other@bar.org", "foo@bar.org", "third@bar.org"),
        ),
        Case(cfg, "163", mail_from="x@163.com"),
        Case(cfg, "good-sender", mail_from="friend@example.com"),
        Case(
            cfg,
            "subdomain-sender",
            mail_from="a@mail.qq.com",
            note="parent domain match (smtpd_access_maps in parent_domain_matches_subdomains)",
        ),
        Case(cfg, "mynetworks-client", client="127.0.0.1", mail_from="318787866@qq.com"),
        Case(cfg, "unrelated-rcpt", mail_from="318787866@qq.com", rcpts=("bar@bar.org",)),
    )

# ------------------------------------------------------------------- access(5) action matrix
ACTIONS: list[tuple[str, str]] = [
    ("ok", "OK"),
    ("ok-lower", "ok"),
    ("numeric", "1234"),
    ("dunno", "DUNNO"),
    ("reject", "REJECT"),
    ("reject-text", "REJECT go away"),
    ("reject-521", "REJECT 521"),
    ("defer", "DEFER"),
    ("defer-text", "DEFER try later"),
    ("c450", "450 try again later"),
    ("c451", "451 local trouble"),
    ("c452-dsn", "452 4.3.1 mailbox full"),
    ("c550", "550 not welcome"),
    ("c550-dsn", "550 5.1.1 no such user here"),
    ("c554-dsn-x", "554 5.7.9 policy says no"),
    ("c421", "421 closing now"),
    ("c521", "521 go away"),
    ("c521-dsn", "521 5.7.1 go away"),
    ("c250", "250 fine"),
    ("c550-bare", "550"),
    ("defer-if-reject", "DEFER_IF_REJECT maybe later"),
    ("defer-if-permit", "DEFER_IF_PERMIT maybe later"),
    ("warn", "WARN watch this"),
    ("info", "INFO just saying"),
    ("prepend", "PREPEND X-Tag: tagged"),
    ("discard", "DISCARD"),
    ("discard-text", "DISCARD dropped"),
    ("hold", "HOLD"),
    ("hold-text", "HOLD held for review"),
    ("redirect", "REDIRECT other@example.net"),
    ("filter", "FILTER smtp:[127.0.0.1]:10025"),
    ("bcc", "BCC copy@example.net"),
    ("restriction", "reject_unauth_destination"),
    ("restriction-reject", "reject"),
    ("restriction-list", "permit_mynetworks, reject"),
    ("class", "class_reject"),
    ("class-permit", "class_permit"),
    ("undefined", "no_such_class"),
    ("bad-syntax", "REJECT521"),
]

CONTEXTS = {
    # context: (restriction parameter, check name, key of action i, session for key)
    "client": ("smtpd_client_restrictions", "check_client_access"),
    "helo": ("smtpd_helo_restrictions", "check_helo_access"),
    "sender": ("smtpd_sender_restrictions", "check_sender_access"),
    "recipient": ("smtpd_recipient_restrictions", "check_recipient_access"),
}


def _key(context: str, i: int, slug: str) -> str:
    if context == "client":
        return f"127.0.0.{10 + i}"
    if context == "helo":
        return f"{slug}.helo.test"
    if context == "sender":
        return f"{slug}.sender.test"
    return f"{slug}@bar.org"


def _session(cfg: Config, context: str, i: int, slug: str, action: str) -> Case:
    key = _key(context, i, slug)
    kw: dict[str, object] = {"note": f"action `{action}`"}
    if context == "client":
        kw["client"] = key
    elif context == "helo":
        kw["helo"] = key
    elif context == "sender":
        kw["mail_from"] = f"user@{key}"
    if context == "recipient":
        kw["rcpts"] = (key, "other@bar.org")
    else:
        kw["rcpts"] = ("foo@bar.org", "other@bar.org")
    return Case(cfg, slug, **kw)  # type: ignore[arg-type]


def _matrix(context: str, variant: str) -> None:
    param, check = CONTEXTS[context]
    tail = {"plain": "", "then-reject": ", reject", "no-delay": ""}[variant]
    lines = [f"{param} = {check} hash:@DIR@/access{tail}"]
    lines.append("smtpd_restriction_classes = class_reject, class_permit")
    lines.append("class_reject = reject")
    lines.append("class_permit = permit")
    if variant == "no-delay":
        lines.append("smtpd_delay_reject = no")
    table = "\n".join(
        f"{_key(context, i, slug)} {action}" for i, (slug, action) in enumerate(ACTIONS)
    )
    title = {
        "plain": f"Every access(5) action in {check} (smtpd_delay_reject=yes).",
        "then-reject": f"Every access(5) action in {check}, followed by `reject` in the list.",
        "no-delay": f"Every access(5) action in {check} with smtpd_delay_reject=no.",
    }[variant]
    cfg = Config(f"action-{context}-{variant}", title, "\n".join(lines), tables(access=table))
    add(cfg, *(_session(cfg, context, i, s, a) for i, (s, a) in enumerate(ACTIONS)))


for _ctx in CONTEXTS:
    for _variant in ("plain", "then-reject", "no-delay"):
        _matrix(_ctx, _variant)

# ------------------------------------------------------------------- plain restrictions
RESTRICTIONS = [
    "permit",
    "reject",
    "defer",
    "defer_if_permit",
    "defer_if_reject",
    "defer_if_reject, reject",
    "defer_if_permit, reject",
    "warn_if_reject reject",
    "warn_if_reject reject_unauth_destination",
    "permit_mynetworks, reject",
    "reject_unauth_destination",
    "defer_unauth_destination",
    "permit_auth_destination, reject",
    "reject_non_fqdn_sender",
    "reject_non_fqdn_recipient",
    "reject_non_fqdn_helo_hostname",
    "reject_invalid_helo_hostname",
    "reject_unauth_pipelining",
    "reject_unlisted_sender",
    "reject_unlisted_recipient",
]
for _r in RESTRICTIONS:
    cfg = Config(
        f"restriction-{slugify(_r)}",
        f"`smtpd_recipient_restrictions = {_r}` (default relay restrictions).",
        f"smtpd_recipient_restrictions = {_r}",
    )
    add(
        cfg,
        Case(cfg, "relay-domain-rcpt", rcpts=("foo@bar.org",)),
        Case(cfg, "foreign-rcpt", rcpts=("x@elsewhere.example", "foo@bar.org")),
        Case(cfg, "mynetworks-client", client="127.0.0.1", rcpts=("x@elsewhere.example",)),
        Case(cfg, "non-fqdn-sender", mail_from="user"),
        Case(cfg, "non-fqdn-sender-host", mail_from="user@host"),
        Case(cfg, "non-fqdn-rcpt", rcpts=("foo@bar",)),
        Case(cfg, "non-fqdn-helo", helo="localhost"),
        Case(cfg, "invalid-helo", helo="bad_host!"),
        Case(cfg, "local-rcpt", rcpts=("postmaster@mx.example.org",)),
    )

helo_cfg = Config(
    "helo-hostname-checks",
    "reject_invalid_helo_hostname then reject_non_fqdn_helo_hostname on many HELO names.",
    "smtpd_helo_restrictions = reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname",
)
for _i, _h in enumerate(
    [
        "me.example.com",
        "bad_host!",
        "a..b.example",
        "-foo.example",
        "foo-.example",
        "localhost",
        "1.2.3.4",
        "[1.2.3.4]",
        "[1.2.3]",
        "[IPv6:::1]",
        "1.2.3.999",
        "x" * 64 + ".example",
        "example.",
        "me.example.com.",
        "123.example",
        "foo.123",
        "ünïcode.example",
    ]
):
    add(helo_cfg, Case(helo_cfg, f"helo-{_i}", helo=_h, note=f"HELO `{_h}`"))

# ------------------------------------------------------------------- relay
relay_default = Config(
    "relay-default",
    "No restrictions set: the default smtpd_relay_restrictions (defer_unauth_destination).",
    "",
)
add(
    relay_default,
    Case(relay_default, "foreign", rcpts=("x@elsewhere.example",)),
    Case(relay_default, "relay-domain", rcpts=("foo@bar.org",)),
    Case(relay_default, "relay-subdomain", rcpts=("foo@sub.bar.org",)),
    Case(relay_default, "mynetworks", client="127.0.0.1", rcpts=("x@elsewhere.example",)),
    Case(relay_default, "mixed", rcpts=("x@elsewhere.example", "foo@bar.org")),
    Case(relay_default, "local", rcpts=("postmaster@mx.example.org",)),
    Case(relay_default, "local-unknown", rcpts=("nosuchuser@mx.example.org",)),
    Case(relay_default, "localhost", rcpts=("postmaster@localhost",)),
    Case(relay_default, "routing-percent", rcpts=("x%elsewhere.example@bar.org",)),
    Case(relay_default, "routing-bang", rcpts=("elsewhere.example!x@bar.org",)),
    Case(relay_default, "ehlo", ehlo=True, note="EHLO reply lines"),
    Case(relay_default, "no-helo", helo=None, note="MAIL without HELO (helo not required)"),
    Case(relay_default, "null-sender", mail_from=""),
)
for name, lines, title in [
    (
        "relay-reject-unauth",
        "smtpd_relay_restrictions = reject_unauth_destination",
        "smtpd_relay_restrictions = reject_unauth_destination",
    ),
    (
        "relay-code-550",
        "smtpd_relay_restrictions = reject_unauth_destination\nrelay_domains_reject_code = 550",
        "relay_domains_reject_code = 550",
    ),
    (
        "relay-empty",
        "smtpd_relay_restrictions =\n"
        "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination",
        "empty smtpd_relay_restrictions, classic recipient restrictions",
    ),
    (
        "relay-compat-0-fatal",
        "",
        "compatibility_level = 0 and no restrictions: smtpd refuses to start (fatal)",
    ),
    (
        "relay-compat-0",
        "smtpd_recipient_restrictions =\n    permit_mynetworks,\n    reject_unauth_destination",
        "compatibility_level = 0 with the classic recipient restrictions",
    ),
    (
        "relay-permit-auth",
        "smtpd_relay_restrictions = permit_auth_destination, reject",
        "permit_auth_destination, reject",
    ),
]:
    cfg = Config(
        name,
        title,
        lines,
        compat="0" if "compat-0" in name else "3.6",
        fatal=name.endswith("-fatal"),
    )
    add(
        cfg,
        Case(cfg, "foreign", rcpts=("x@elsewhere.example",)),
        Case(cfg, "relay-domain", rcpts=("foo@bar.org",)),
        Case(cfg, "mynetworks", client="127.0.0.1", rcpts=("x@elsewhere.example",)),
    )

codes = Config(
    "reject-codes",
    "access_map_reject_code, access_map_defer_code, reject_code, defer_code overrides.",
    """\
access_map_reject_code = 550
access_map_defer_code = 451
reject_code = 551
defer_code = 452
smtpd_recipient_restrictions = check_sender_access hash:@DIR@/access, reject
smtpd_relay_restrictions = permit_mynetworks, check_client_access hash:@DIR@/relay,
    reject_unauth_destination
relay_domains_reject_code = 553
""",
    tables(
        access="""
        reject.test REJECT
        reject-text.test REJECT custom text
        defer.test DEFER
        defer-text.test DEFER custom text
        ok.test OK
        dunno.test DUNNO
        """,
        relay="""
        127.0.0.3 defer_if_permit
        """,
    ),
)
add(
    codes,
    *(
        Case(codes, d.split(".")[0], mail_from=f"a@{d}")
        for d in (
            "reject.test",
            "reject-text.test",
            "defer.test",
            "defer-text.test",
            "ok.test",
            "dunno.test",
        )
    ),
    Case(codes, "relay-denied", mail_from="a@ok.test", rcpts=("x@elsewhere.example",)),
    Case(codes, "defer-if-permit-code", client="127.0.0.3", mail_from="a@ok.test"),
)

# ------------------------------------------------------------------- lookup keys
nullsender = Config(
    "null-sender-default-key",
    "Null sender `<>` with the default smtpd_null_access_lookup_key (`<>`).",
    "smtpd_sender_restrictions = check_sender_access hash:@DIR@/access",
    tables(access="<> REJECT null sender matched"),
)
add(
    nullsender,
    Case(nullsender, "null", mail_from=""),
    Case(nullsender, "not-null", mail_from="a@example.com"),
)
nullsender2 = Config(
    "null-sender-custom-key",
    "smtpd_null_access_lookup_key = MAILER-DAEMON.",
    "smtpd_null_access_lookup_key = MAILER-DAEMON\n"
    "smtpd_sender_restrictions = check_sender_access hash:@DIR@/access",
    tables(access="<> REJECT angle key matched\nMAILER-DAEMON REJECT custom key matched"),
)
add(nullsender2, Case(nullsender2, "null", mail_from=""))

DELIM_TABLE = """
foo+spam@bar.org REJECT matched foo+spam@bar.org
foo@bar.org REJECT matched foo@bar.org
baz@ REJECT matched baz@
qux+x@ REJECT matched qux+x@
ext.example REJECT matched ext.example
"""
for name, delim in [("plus", "+"), ("multi", "+-"), ("none", "")]:
    cfg = Config(
        f"recipient-delimiter-{name}",
        f"recipient_delimiter = {delim!r}: which lookup keys are tried for user+ext@domain.",
        f"recipient_delimiter = {delim}\n"
        "smtpd_recipient_restrictions = check_recipient_access hash:@DIR@/access",
        tables(access=DELIM_TABLE),
    )
    add(
        cfg,
        *(
            Case(cfg, slugify(r), rcpts=(r,))
            for r in (
                "foo+spam@bar.org",
                "foo+other@bar.org",
                "foo-other@bar.org",
                "foo@bar.org",
                "baz+ext@bar.org",
                "baz@bar.org",
                "qux+x@bar.org",
                "qux+y@bar.org",
            )
        ),
    )
    sender_cfg = Config(
        f"sender-delimiter-{name}",
        f"recipient_delimiter = {delim!r} applied to check_sender_access keys.",
        f"recipient_delimiter = {delim}\n"
        "smtpd_sender_restrictions = check_sender_access hash:@DIR@/access",
        tables(access=DELIM_TABLE.replace("@bar.org", "@ext.example")),
    )
    add(
        sender_cfg,
        *(
            Case(sender_cfg, slugify(s), mail_from=s)
            for s in (
                "foo+spam@ext.example",
                "foo+x@ext.example",
                "baz+y@other.example",
                "nobody@ext.example",
            )
        ),
    )

PARENT_TABLE = """
example.com REJECT matched example.com
.example.net REJECT matched .example.net
example.net REJECT matched example.net
"""
for name, pdms in [
    ("default", None),
    ("without-smtpd-access-maps", "debug_peer_list, fast_flush_domains, mynetworks"),
]:
    lines = "smtpd_sender_restrictions = check_sender_access hash:@DIR@/access"
    if pdms is not None:
        lines = f"parent_domain_matches_subdomains = {pdms}\n" + lines
    cfg = Config(
        f"parent-domain-{name}",
        f"Parent domain matching ({name}).",
        lines,
        tables(access=PARENT_TABLE),
    )
    add(
        cfg,
        *(
            Case(cfg, slugify(s), mail_from=s)
            for s in (
                "a@example.com",
                "a@sub.example.com",
                "a@deep.sub.example.com",
                "a@example.net",
                "a@sub.example.net",
                "a@notexample.com",
            )
        ),
    )

userat = Config(
    "user-at-keys",
    "`user@` keys in check_sender_access and check_recipient_access.",
    "smtpd_sender_restrictions = check_sender_access hash:@DIR@/senders\n"
    "smtpd_recipient_restrictions = check_recipient_access hash:@DIR@/rcpts",
    tables(
        senders="postmaster@ REJECT sender postmaster@ matched\nMixed@ REJECT mixed case",
        rcpts="abuse@ REJECT rcpt abuse@ matched\nabuse@bar.org OK",
    ),
)
add(
    userat,
    Case(userat, "sender-postmaster", mail_from="postmaster@anywhere.example"),
    Case(userat, "sender-mixed-case", mail_from="MIXED@anywhere.example"),
    Case(userat, "rcpt-abuse-exact-ok", rcpts=("abuse@bar.org",)),
    Case(userat, "rcpt-abuse-other-domain", rcpts=("abuse@sub.bar.org",)),
    Case(userat, "rcpt-upper-case", rcpts=("ABUSE@SUB.BAR.ORG",)),
)

ipkeys = Config(
    "client-ip-octets",
    "check_client_access: full address, then 3, 2, 1 octets; the name `unknown`.",
    "smtpd_client_restrictions = check_client_access hash:@DIR@/clients",
    tables(
        clients="""
        127.0.0.3 REJECT matched 127.0.0.3
        127.1.2 REJECT matched 127.1.2
        127.2 REJECT matched 127.2
        127.0.0.4 OK
        127.3 550 5.7.1 matched 127.3
        """
    ),
)
add(
    ipkeys,
    *(
        Case(ipkeys, slugify(ip), client=ip)
        for ip in ("127.0.0.3", "127.0.0.4", "127.1.2.9", "127.2.5.5", "127.3.3.3", "127.4.4.4")
    ),
)
unknown_name = Config(
    "client-name-unknown",
    "Is the client name `unknown` looked up by check_client_access?",
    "smtpd_client_restrictions = check_client_access hash:@DIR@/clients",
    tables(clients="unknown REJECT name unknown matched\n127 DUNNO"),
)
add(unknown_name, Case(unknown_name, "any"))

cidr = Config(
    "cidr-client",
    "cidr: table in check_client_access.",
    "smtpd_client_restrictions = check_client_access cidr:@DIR@/clients.cidr",
    tables(
        **{
            "clients.cidr": """
            # first match wins
            127.0.0.5 OK
            127.0.0.0/29 REJECT cidr 127.0.0.0/29
            127.0.0.8/29 DUNNO
            127.0.0.0/24 550 5.7.2 cidr 127.0.0.0/24
            127.1.0.0/16 DEFER cidr 127.1.0.0/16
            """
        }
    ),
)
add(
    cidr,
    *(
        Case(cidr, slugify(ip), client=ip)
        for ip in ("127.0.0.2", "127.0.0.5", "127.0.0.9", "127.0.0.77", "127.1.9.9", "127.9.9.9")
    ),
)

for kind in ("regexp", "pcre"):
    ref = "$1" if kind == "regexp" else "${1}"
    cfg = Config(
        f"{kind}-tables",
        f"{kind}: tables with $1 substitution in sender and helo checks.",
        f"smtpd_sender_restrictions = check_sender_access {kind}:@DIR@/senders\n"
        f"smtpd_helo_restrictions = check_helo_access {kind}:@DIR@/helos",
        tables(
            senders=f"""
            /^(.*)@spam\\.example$/ REJECT go away {ref}
            /^([^@]+)@(.+)\\.ru$/ 550 5.7.1 no mail from $2 (user $1)
            /@ok\\.example$/ OK
            /^postmaster@/ DUNNO
            /x/ WARN has an x
            """,
            helos=f"""
            /^(\\d+)\\.(\\d+)\\.(\\d+)\\.(\\d+)$/ REJECT bare IP {ref}.$2.$3.$4
            /\\.invalid$/ 554 invalid helo {ref}
            """,
        ),
    )
    add(
        cfg,
        Case(cfg, "spam", mail_from="bob@spam.example"),
        Case(cfg, "ru", mail_from="ivan@mail.ru"),
        Case(cfg, "ok", mail_from="a@ok.example"),
        Case(cfg, "postmaster", mail_from="postmaster@x.example"),
        Case(cfg, "warn", mail_from="xavier@other.example"),
        Case(cfg, "helo-ip", helo="10.1.2.3"),
        Case(cfg, "helo-invalid", helo="host.invalid"),
    )

# ------------------------------------------------------------------- smtpd_delay_reject=no
nodelay = Config(
    "no-delay-stages",
    "smtpd_delay_reject=no: each stage answers at its own command.",
    """\
smtpd_delay_reject = no
smtpd_client_restrictions = check_client_access hash:@DIR@/clients
smtpd_helo_restrictions = check_helo_access hash:@DIR@/helos
smtpd_sender_restrictions = check_sender_access hash:@DIR@/senders
smtpd_recipient_restrictions = check_recipient_access hash:@DIR@/rcpts
""",
    tables(
        clients="127.0.0.3 REJECT client says no\n127.0.0.4 521 client go away\n"
        "127.0.0.5 421 client closing\n127.0.0.6 DEFER client later",
        helos="bad.helo REJECT helo says no\nbye.helo 521 helo go away",
        senders="bad.sender REJECT sender says no\nbye.sender 521 sender go away",
        rcpts="bad@bar.org REJECT rcpt says no",
    ),
)
add(
    nodelay,
    Case(nodelay, "client-reject", client="127.0.0.3"),
    Case(nodelay, "client-521", client="127.0.0.4"),
    Case(nodelay, "client-421", client="127.0.0.5"),
    Case(nodelay, "client-defer", client="127.0.0.6"),
    Case(nodelay, "helo-reject", helo="bad.helo"),
    Case(nodelay, "helo-521", helo="bye.helo"),
    Case(nodelay, "sender-reject", mail_from="a@bad.sender"),
    Case(nodelay, "sender-521", mail_from="a@bye.sender"),
    Case(nodelay, "rcpt-reject", rcpts=("bad@bar.org", "foo@bar.org")),
    Case(nodelay, "no-helo-sender-reject", helo=None, mail_from="a@bad.sender"),
)

helo_required = Config(
    "helo-required",
    "smtpd_helo_required = yes.",
    "smtpd_helo_required = yes\nsmtpd_helo_restrictions = check_helo_access hash:@DIR@/helos",
    tables(helos="bad.helo REJECT helo says no"),
)
add(
    helo_required,
    Case(helo_required, "no-helo", helo=None),
    Case(helo_required, "with-helo"),
    Case(helo_required, "bad-helo", helo="bad.helo"),
)
helo_required_nodelay = Config(
    "helo-required-no-delay",
    "smtpd_helo_required = yes, smtpd_delay_reject = no.",
    "smtpd_helo_required = yes\nsmtpd_delay_reject = no",
)
add(helo_required_nodelay, Case(helo_required_nodelay, "no-helo", helo=None))

# ------------------------------------------------------------------- restriction classes
classes = Config(
    "restriction-classes",
    "OK inside a class permits the whole stage; DUNNO and falling off the end continue.",
    """\
smtpd_restriction_classes = vip_senders, fall_through, permit_all, reject_all, nested
vip_senders = check_sender_access hash:@DIR@/vips, reject
fall_through = check_sender_access hash:@DIR@/vips
permit_all = permit
reject_all = reject
nested = vip_senders
smtpd_recipient_restrictions =
    check_recipient_access hash:@DIR@/rcpts,
    reject
""",
    tables(
        rcpts="""
        vip@bar.org vip_senders
        fall@bar.org fall_through
        open@bar.org permit_all
        closed@bar.org reject_all
        nested@bar.org nested
        loose@bar.org permit
        """,
        vips="""
        boss@example.com OK
        neutral@example.com DUNNO
        bad@example.com REJECT bad sender in class
        """,
    ),
)
for _rcpt in ("vip", "fall", "open", "closed", "nested", "loose", "unlisted"):
    for _sender in ("boss", "neutral", "bad", "other"):
        add(
            classes,
            Case(
                classes,
                f"{_rcpt}-{_sender}",
                mail_from=f"{_sender}@example.com",
                rcpts=(f"{_rcpt}@bar.org",),
            ),
        )

# ------------------------------------------------------------------- lookup errors
for kind in ("hash", "cidr", "regexp", "texthash", "pcre"):
    cfg = Config(
        f"missing-table-{kind}",
        f"A {kind}: table that does not exist.",
        f"smtpd_sender_restrictions = check_sender_access {kind}:@DIR@/nonexistent",
    )
    add(cfg, Case(cfg, "any", rcpts=("foo@bar.org", "other@bar.org")))
unknown_type = Config(
    "unknown-table-type",
    "An unsupported table type.",
    "smtpd_sender_restrictions = check_sender_access nosuchtype:@DIR@/x",
)
add(unknown_type, Case(unknown_type, "any"))
unknown_restriction = Config(
    "unknown-restriction",
    "A misspelt restriction name in main.cf.",
    "smtpd_recipient_restrictions = permit_mynetwork, reject_unauth_destination",
)
add(unknown_restriction, Case(unknown_restriction, "any"))
undefined_class_main = Config(
    "class-not-listed",
    "A class defined as a parameter but missing from smtpd_restriction_classes.",
    "not_listed = reject\nsmtpd_recipient_restrictions = check_recipient_access hash:@DIR@/rcpts",
    tables(rcpts="foo@bar.org not_listed"),
)
add(undefined_class_main, Case(undefined_class_main, "any"))

# ------------------------------------------------------------------- multi-recipient / misc
multi = Config(
    "multi-recipient",
    "Several recipients with different verdicts in one transaction.",
    "smtpd_recipient_restrictions = check_recipient_access hash:@DIR@/rcpts",
    tables(
        rcpts="""
        a@bar.org REJECT no a
        b@bar.org DEFER not now b
        c@bar.org OK
        d@bar.org 521 d go away
        """
    ),
)
add(
    multi,
    Case(multi, "a-b-c", rcpts=("a@bar.org", "b@bar.org", "c@bar.org", "x@bar.org")),
    Case(multi, "c-d-after", rcpts=("c@bar.org", "d@bar.org", "a@bar.org")),
    Case(multi, "foreign-then-ok", rcpts=("x@elsewhere.example", "c@bar.org")),
)

unlisted = Config(
    "unlisted-maps",
    "reject_unlisted_recipient / reject_unlisted_sender with relay_recipient_maps.",
    """\
relay_recipient_maps = hash:@DIR@/relay_recipients
smtpd_sender_restrictions = reject_unlisted_sender
smtpd_recipient_restrictions = reject_unlisted_recipient
""",
    tables(relay_recipients="foo@bar.org x\n@sub.bar.org x"),
)
add(
    unlisted,
    Case(unlisted, "listed"),
    Case(unlisted, "unlisted", rcpts=("nobody@bar.org",)),
    Case(unlisted, "catchall", rcpts=("anyone@sub.bar.org",)),
    Case(unlisted, "sender-unlisted", mail_from="nobody@bar.org"),
    Case(unlisted, "sender-listed", mail_from="foo@bar.org"),
    Case(unlisted, "foreign-rcpt", rcpts=("x@elsewhere.example",)),
)
implicit_unlisted = Config(
    "unlisted-implicit",
    "smtpd_reject_unlisted_recipient=yes (default) without naming the restriction.",
    "relay_recipient_maps = hash:@DIR@/relay_recipients",
    tables(relay_recipients="foo@bar.org x"),
)
add(
    implicit_unlisted,
    Case(implicit_unlisted, "listed"),
    Case(implicit_unlisted, "unlisted", rcpts=("nobody@bar.org", "foo@bar.org")),
)


def by_config(cases: Iterable[Case]) -> dict[Config, list[Case]]:
    """Group cases by their config, keeping first-seen order."""
    groups: dict[Config, list[Case]] = {}
    for c in cases:
        groups.setdefault(c.config, []).append(c)
    return groups


def _check_unique() -> None:
    seen: set[str] = set()
    names: dict[str, Config] = {}
    for c in CASES:
        assert c.id not in seen, c.id
        seen.add(c.id)
        other = names.setdefault(c.config.name, c.config)
        assert other is c.config, f"two configs named {c.config.name}"


_check_unique()
