"""The pure parts of postscreen, from data: the parameters, the DNSBL score, the cache
record, the log formats, and one client's screening driven by hand."""

from __future__ import annotations

import pytest

from smtpgate.config import parse_settings
from smtpgate.config.postscreenconf import postscreen_settings
from smtpgate.config.settings import Settings
from smtpgate.generation import compile_configuration
from smtpgate.policy.dnsbl import ZoneError
from smtpgate.policy.ports import DnsAnswer, DnsStatus
from smtpgate.postscreen.cache import Expiry, MemoryPassCache
from smtpgate.postscreen.config import PostscreenConfig, postscreen_config
from smtpgate.postscreen.dnsbl import Score, parse_site, parse_sites, score
from smtpgate.postscreen.screen import Screening, escape_text, format_delta

# -- the parameters -------------------------------------------------------------------


def both(
    settings: Settings, strict_tables: bool = False
) -> tuple[PostscreenConfig | None, list[object]]:
    """The two steps the load makes (generation.compile_configuration)."""
    values, diagnostics = postscreen_settings(settings, strict_tables=strict_tables)
    if values is None:
        return None, list(diagnostics)
    config, more = postscreen_config(values)
    return config, [*diagnostics, *more]


def load(text: str, *overrides: str) -> tuple[PostscreenConfig | None, list[str]]:
    settings, found = parse_settings(text, "main.cf", overrides, hostname="mx.example.org")
    config, diagnostics = both(settings)
    return config, [str(d) for d in [*found, *diagnostics]]


def test_postscreen_is_off_until_a_parameter_asks_for_it() -> None:
    config, problems = load("")
    assert config is not None and not config.enabled and problems == []
    config, _ = load("postscreen_dnsbl_sites = zen.test*2\n")
    assert config is not None and config.enabled
    config, _ = load("postscreen_cache_map = btree:/var/lib/postfix/postscreen_cache\n")
    assert config is not None and not config.enabled  # where, not whether
    config, _ = load("postscreen_greet_action = enforce\n", "smtpgate_postscreen=no")
    assert config is not None and not config.enabled
    config, _ = load("", "smtpgate_postscreen=yes")
    assert config is not None and config.enabled
    assert config.greet_wait == 6 and config.greet_banner == "mx.example.org ESMTP Postfix"


def test_postfix_defaults_and_old_names() -> None:
    config, problems = load(
        "postscreen_blacklist_action = drop\npostscreen_dnsbl_whitelist_threshold = -2\n"
    )
    assert problems == []  # the old names are known: they feed the new names' defaults
    assert config is not None
    assert (config.denylist_action, config.allowlist_threshold) == ("drop", -2)
    assert (config.dnsbl_min_ttl, config.dnsbl_max_ttl, config.dnsbl_timeout) == (60, 3600, 10)
    assert (config.greet_ttl, config.pipelining_ttl, config.cache_retention) == (
        86400,
        30 * 86400,
        7 * 86400,
    )
    assert (config.pipelining_action, config.non_smtp_action, config.bare_newline_action) == (
        "enforce",
        "drop",
        "ignore",
    )
    assert config.forbidden.match("GET") and config.forbidden.match("Subject:")
    assert config.access_list == ("permit_mynetworks",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "postscreen_dnsbl_action = reject\n",
            "main.cf, line 1: error: bad postscreen_dnsbl_action value: reject "
            "(use ignore, enforce or drop)",
        ),
        (
            "# c\npostscreen_dnsbl_sites = zen.test*x\n",
            'main.cf, line 2: error: postscreen_dnsbl_sites: bad DNSBL weight "x" in "zen.test*x"',
        ),
        (
            "postscreen_dnsbl_sites = zen.test=127.0.0.[2..300]\n",
            "main.cf, line 1: error: postscreen_dnsbl_sites: "
            'in "127.0.0.[2..300]": bad octet value: "300"',
        ),
        (
            "postscreen_greet_wait = soon\n",
            "main.cf, line 1: error: bad time configuration: postscreen_greet_wait = soon "
            "(use a number with an optional unit s, m, h, d or w)",
        ),
        (
            "postscreen_access_list = permit_mynetwork\n",
            'main.cf, line 1: error: postscreen_access_list: unknown command: "permit_mynetwork" '
            "(use permit_mynetworks, permit, reject, dunno or a type:table)",
        ),
        (
            "smtpgate_postscreen = maybe\n",
            "main.cf, line 1: error: bad smtpgate_postscreen value: maybe (use auto, yes or no)",
        ),
    ],
)
def test_bad_values_name_file_and_line(text: str, message: str) -> None:
    config, problems = load(text)
    assert config is None
    assert message in problems, problems


def test_a_table_that_cannot_be_opened_names_its_line(tmp_path: object) -> None:
    settings, _ = parse_settings(
        "\npostscreen_access_list = permit_mynetworks, cidr:/nonexistent/psacl\n",
        "main.cf",
        hostname="mx.example.org",
    )
    config, diagnostics = both(settings, strict_tables=True)
    assert config is None
    assert str(diagnostics[0]).startswith("main.cf, line 2: error: postscreen_access_list")


def test_what_smtpgate_lacks_is_still_refused_and_tuning_is_a_warning() -> None:
    settings, found = parse_settings(
        "relayhost = [127.0.0.1]:2526\npostscreen_upstream_proxy_protocol = haproxy\n"
        "postscreen_command_time_limit = 10s\n",
        "main.cf",
        hostname="mx.example.org",
    )
    compiled, diagnostics = compile_configuration(settings, found)
    assert compiled is None
    text = [str(d) for d in diagnostics]
    assert any(
        t.startswith("main.cf, line 2: error: not supported yet: postscreen_upstream_proxy")
        for t in text
    ), text
    assert any(t.startswith("main.cf, line 3: warning:") for t in text), text


def test_greet_pause_is_postscreens_greet_wait_unless_that_is_set() -> None:
    config, problems = load("smtpgate_greet_pause = 2s\npostscreen_greet_action = drop\n")
    assert config is not None and problems == []
    assert config.greet_wait == 2  # the old name of the wait
    config, problems = load(
        "smtpgate_greet_pause = 2s\npostscreen_greet_wait = 3s\npostscreen_greet_action = drop\n"
    )
    assert config is not None and config.greet_wait == 3
    assert problems == [
        "main.cf, line 1: warning: smtpgate_greet_pause is not used while postscreen runs: "
        "its pregreet test waits postscreen_greet_wait instead"
    ]


# -- the DNSBL score ---------------------------------------------------------------------


def test_sites_parse_weights_and_filters() -> None:
    site = parse_site("zen.test=127.0.0.[2..11]*3")
    assert (site.domain, site.weight, site.zone.matches("127.0.0.4")) == ("zen.test", 3, True)
    assert parse_site("dnswl.test*-5").weight == -5
    assert parse_site("plain.test").weight == 1
    with pytest.raises(ZoneError):
        parse_site("zen.test*")


def ok(*codes: str, ttl: int = 300) -> DnsAnswer:
    return DnsAnswer("q", "A", DnsStatus.OK, codes, ttl)


NX = DnsAnswer("q", "A", DnsStatus.NXDOMAIN, (), 600)
NX_LONG = DnsAnswer("q", "A", DnsStatus.NXDOMAIN, (), 86400)
SITES = "zen.test*2 bl.test*1 zen.test=127.0.0.[10..11]*4 dnswl.test=127.0.[0..255].[1..3]*-5"


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ({"zen.test": ok("127.0.0.2"), "bl.test": ok("127.0.0.2")}, Score(3, "zen.test", 300)),
        ({"zen.test": ok("127.0.0.2", "127.0.0.4")}, Score(2, "zen.test", 300)),  # once each
        ({"zen.test": ok("127.0.0.10")}, Score(6, "zen.test", 300)),  # both zen entries
        ({"bl.test": ok("127.0.0.2"), "zen.test": NX}, Score(1, "bl.test", 300)),
        # a passing client: the smallest TTL of the lists that did not list it (bl) and
        # the allow lists that did (dnswl)
        ({"zen.test": ok("127.0.0.2"), "dnswl.test": ok("127.0.10.2")}, Score(-3, "zen.test", 300)),
        ({"dnswl.test": ok("127.0.10.9")}, Score(0, None, 300)),  # the filter: no match
        ({"zen.test": ok("127.0.0.1")}, Score(0, None, 300)),  # a list error never counts
        ({"zen.test": ok("127.255.255.254")}, Score(0, None, 300)),
        ({"zen.test": NX, "bl.test": NX, "dnswl.test": NX}, Score(0, None, 600)),
        ({"zen.test": ok("127.0.0.2", ttl=5)}, Score(2, "zen.test", 60)),  # min_ttl
        (
            {"zen.test": ok("127.0.0.2", ttl=86400), "dnswl.test": NX_LONG},
            Score(2, "zen.test", 3600),  # max_ttl
        ),
    ],
)
def test_score(answers: dict[str, DnsAnswer], expected: Score) -> None:
    sites = parse_sites(SITES.split())
    full = {"zen.test": NX, "bl.test": NX, "dnswl.test": NX, **answers}
    assert score(sites, full, 60, 3600) == expected


def test_a_list_that_did_not_answer_makes_a_partial_score() -> None:
    sites = parse_sites(SITES.split())
    result = score(sites, {"zen.test": ok("127.0.0.2"), "bl.test": None}, 60, 3600)
    assert (result.total, result.complete, result.ttl) == (2, False, 60)


# -- the cache record and the log formats ------------------------------------------------


def test_cache_records_are_postscreens() -> None:
    record = Expiry.parse("1700000000;1700003600;0;1;1")
    assert record.get("dnsbl") == 1700003600 and record.get("pipelining") == 0
    assert record.format() == "1700000000;1700003600;0;1;1"
    assert Expiry.parse("1700000000;x").times == [1700000000, 1, 1, 1, 1]  # old or bad


async def test_memory_cache_forgets_at_the_ttl() -> None:
    now = [1000.0]
    cache = MemoryPassCache(max_entries=2, clock=lambda: now[0])
    await cache.set("192.0.2.1", "r1", 10)
    await cache.set("192.0.2.2", "r2", 10)
    await cache.set("192.0.2.3", "r3", 10)
    assert await cache.get("192.0.2.1") is None  # the oldest went first
    assert await cache.get("192.0.2.3") == "r3"
    now[0] += 10
    assert await cache.get("192.0.2.3") is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0"), (0.003, "0"), (0.04, "0.04"), (0.5, "0.5"), (1.234, "1.2"), (6.01, "6")],
)
def test_format_delta_is_postfix_format_tv(seconds: float, text: str) -> None:
    assert format_delta(seconds) == text


def test_escape_text() -> None:
    assert escape_text(b"EHLO x\r\n") == "EHLO x\\r\\n"
    assert escape_text(b"\x00bin\tary \xff") == "\\000bin\\tary \\377"
    assert len(escape_text(b"x" * 500)) == 100


# -- one screening, by hand ----------------------------------------------------------------


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, text: str) -> None:
        self.lines.append(text)

    def warning(self, text: str) -> None:
        self.lines.append(f"warning: {text}")


class Nets:
    def match(self, address: str) -> bool:
        return address == "127.0.0.1"


def screening(text: str, address: str = "192.0.2.1") -> tuple[Screening, Lines]:
    config, problems = load(text)
    assert config is not None, problems
    log = Lines()
    return Screening(config, log, address, 4000, clock=lambda: 1_000_000.0), log


def test_a_clean_client_passes_new_then_old() -> None:
    s, log = screening("postscreen_dnsbl_sites = zen.test\n")
    assert s.connect(("192.0.2.25", 25), Nets()) is None
    assert not s.cached(None)
    assert s.todo == {"pregreet", "dnsbl"}
    records: list[str] = []
    s.on_pass = records.append
    outcome = s.after_wait(Score(0, None, 300))
    assert outcome.reply is None and outcome.greet
    assert log.lines == [
        "CONNECT from [192.0.2.1]:4000 to [192.0.2.25]:25",
        "PASS NEW [192.0.2.1]:4000",
    ]
    assert records == ["1086400;1000300;1;1;1"]
    again, log = screening("postscreen_dnsbl_sites = zen.test\n")
    again.connect(None, Nets())
    assert again.cached(records[0])
    assert log.lines[-1] == "PASS OLD [192.0.2.1]:4000"


def test_an_expired_test_is_done_again_and_logs_pass_old() -> None:
    s, log = screening("postscreen_dnsbl_sites = zen.test\n")
    s.connect(None, Nets())
    assert not s.cached("1086400;999999;1;1;1")  # the DNSBL result expired
    assert s.todo == {"dnsbl"} and s.teaser is None  # no pregreet test, no teaser
    s.after_wait(Score(0, None, 300))
    assert log.lines[-1] == "PASS OLD [192.0.2.1]:4000"


def test_dnsbl_ignore_logs_the_rank_and_does_not_pass() -> None:
    s, log = screening("postscreen_dnsbl_sites = zen.test*3\n")
    s.connect(None, Nets())
    s.cached(None)
    assert s.after_wait(Score(3, "zen.test", 300)).reply is None
    assert log.lines[1:] == ["DNSBL rank 3 for [192.0.2.1]:4000"]
    assert s.rcpt_reply is None  # ignore: nothing enforced


def test_permit_mynetworks_and_respectful_logging() -> None:
    s, log = screening("postscreen_greet_action = drop\n", address="127.0.0.1")
    assert s.connect(None, Nets()) is not None
    assert log.lines[-1] == "ALLOWLISTED [127.0.0.1]:4000"
    s, log = screening(
        "postscreen_greet_action = drop\nrespectful_logging = no\n", address="127.0.0.1"
    )
    s.connect(None, Nets())
    assert log.lines[-1] == "WHITELISTED [127.0.0.1]:4000"
    s, log = screening(
        "postscreen_greet_action = drop\ncompatibility_level = 2\n", address="127.0.0.1"
    )
    s.connect(None, Nets())
    assert log.lines[-1] == "WHITELISTED [127.0.0.1]:4000"


def test_an_allow_list_passes_every_other_test() -> None:
    s, log = screening(
        "postscreen_dnsbl_sites = dnswl.test*-5\npostscreen_dnsbl_allowlist_threshold = -1\n"
        "postscreen_pipelining_enable = yes\n"
    )
    s.connect(None, Nets())
    s.cached(None)
    result = Score(-5, "dnswl.test", 300)
    assert s.dnsbl_allows(result)
    s.after_wait(result)
    assert not s.running_deep_tests  # skipped: PIPELINING is announced at once
    assert log.lines[-1] == "PASS NEW [192.0.2.1]:4000"


# -- the dummy engine ----------------------------------------------------------------------


def engine() -> tuple[object, Lines]:
    from smtpgate.postscreen.engine import DummyEngine, EngineSettings

    s, log = screening("postscreen_dnsbl_sites = zen.test*3\npostscreen_dnsbl_action = enforce\n")
    s.connect(None, Nets())
    s.cached(None)
    s.after_wait(Score(3, "zen.test", 300))
    settings = EngineSettings("mx.example.org", 10240000, False, False)
    return DummyEngine(s, settings), log


@pytest.mark.parametrize(
    ("lines", "last"),
    [
        (["HELO"], "501 Syntax: HELO hostname"),
        (["HELO x.example"], "250 mx.example.org"),
        (
            ["MAIL FROM:<a@example.net>", "MAIL FROM:<b@example.net>"],
            "503 5.5.1 Error: nested MAIL command",
        ),
        (["MAIL"], "501 5.5.4 Syntax: MAIL FROM:<address>"),
        (["RCPT TO:<b@example.org>"], "503 5.5.1 Error: need MAIL command"),
        (["MAIL FROM:<>", "RCPT"], "501 5.5.4 Syntax: RCPT TO:<address>"),
        (["ETRN"], "500 Syntax: ETRN domain"),
        (["ETRN example.org"], "458 Unable to queue messages"),
        (["XCLIENT ADDR=1.2.3.4"], "502 5.5.2 Error: command not recognized"),
        (["DATA x"], "501 5.5.4 Syntax: DATA"),
        (["DATA"], "503 5.5.1 Error: need RCPT command"),
        (["BDAT"], "501 5.5.4 Syntax: BDAT count [LAST]"),
        (["BDAT 10 LAST"], "554 5.5.1 Error: need MAIL command"),
    ],
)
def test_dummy_engine_replies(lines: list[str], last: str) -> None:
    dummy, _ = engine()
    reply = None
    for line in lines:
        verb, _, args = line.partition(" ")
        reply = dummy.command(verb, args)  # type: ignore[attr-defined]
    assert reply is not None
    assert " ".join(reply.lines()) == last


def test_dummy_engine_rcpt_logs_postscreens_noqueue_line() -> None:
    dummy, log = engine()
    dummy.command("EHLO", "bot.example")  # type: ignore[attr-defined]
    dummy.command("MAIL", "FROM:<a@example.net> SIZE=10")  # type: ignore[attr-defined]
    reply = dummy.command("RCPT", "TO:<@relay.example:b@example.org>")  # type: ignore[attr-defined]
    assert reply.lines() == [
        "550 5.7.1 Service unavailable; client [192.0.2.1] blocked using zen.test"
    ]
    assert log.lines[-1] == (
        "NOQUEUE: reject: RCPT from [192.0.2.1]:4000: 550 5.7.1 Service unavailable; "
        "client [192.0.2.1] blocked using zen.test; from=<a@example.net>, "
        "to=<b@example.org>, proto=ESMTP, helo=<bot.example>"
    )
    for _ in range(17):
        dummy.command("NOOP", "")  # type: ignore[attr-defined]
    last = dummy.command("NOOP", "")  # type: ignore[attr-defined]
    assert last.lines() == ["421 mx.example.org Service unavailable - try again later"]
    assert log.lines[-1] == "COMMAND COUNT LIMIT from [192.0.2.1]:4000 after NOOP"
