"""The ``postscreen_*`` parameters, typed and checked once per load.

:func:`postscreen_settings` converts what smtpgate supports into
:class:`PostscreenSettings` and reports every bad value as a :class:`Diagnostic` with
file and line; ``smtpgate.postscreen.config`` then parses the DNS list entries (with the
policy layer's zone parser) into the ``PostscreenConfig`` the screening reads.

Whether postscreen runs at all is ``smtpgate_postscreen``: ``yes``, ``no``, or ``auto``
(the default), which turns it on when main.cf (or ``-o``) sets any postscreen parameter
smtpgate supports, the way a Postfix admin's main.cf only has them when master.cf runs
postscreen.  ``postscreen_cache_map`` is accepted and not opened: the cache is in the
supervisor's anvil, and in ``smtpgate_shared_state`` when that is set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from smtpgate.config.diagnostics import Diagnostic, Location
from smtpgate.config.expand import ExpansionError, compat_level
from smtpgate.config.params import PARAMETERS
from smtpgate.config.service import FORBIDDEN_VERBS, Forbidden, Reader
from smtpgate.config.settings import Settings
from smtpgate.errors import ConfigError
from smtpgate.tables import Table, open_table, open_table_or_surrogate

ACTIONS = ("ignore", "enforce", "drop")
SWITCH = ("auto", "yes", "no")
ACL_WORDS = ("permit_mynetworks", "permit", "reject", "dunno")
NOT_A_SWITCH = frozenset({"postscreen_cache_map", "postscreen_cache_retention_time"})
"""Set alone, these do not turn postscreen on (they say where results are kept)."""


@dataclass(frozen=True)
class PostscreenValues:
    """The typed postscreen parameters but the DNS lists; ``enabled`` False: no
    postscreen at all."""

    enabled: bool = False
    access_list: tuple[str, ...] = ("permit_mynetworks",)
    tables: dict[str, Table] = field(default_factory=dict)
    """The access list's tables, by their ``type:name``."""
    denylist_action: str = "ignore"
    dnsbl_threshold: int = 1
    allowlist_threshold: int = 0
    dnsbl_action: str = "ignore"
    reply_map: Table | None = None
    dnsbl_timeout: float = 10.0
    dnsbl_min_ttl: int = 60
    dnsbl_max_ttl: int = 3600
    greet_wait: float = 6.0
    greet_banner: str = ""
    greet_action: str = "ignore"
    greet_ttl: int = 86400
    cache_retention: int = 7 * 86400
    pipelining_enable: bool = False
    pipelining_action: str = "enforce"
    pipelining_ttl: int = 30 * 86400
    non_smtp_enable: bool = False
    non_smtp_action: str = "drop"
    non_smtp_ttl: int = 30 * 86400
    forbidden: Forbidden = field(default_factory=lambda: Forbidden(FORBIDDEN_VERBS))
    bare_newline_enable: bool = False
    bare_newline_action: str = "ignore"
    bare_newline_ttl: int = 30 * 86400
    respectful_logging: bool = True
    """Postfix 3.6+ wording (ALLOWLISTED, DENYLISTED) or the old (WHITELISTED, ...)."""

    @property
    def pregreet_enable(self) -> bool:
        """postscreen runs the pregreet test when the teaser banner is set."""
        return bool(self.greet_banner)

    @property
    def deep_enable(self) -> bool:
        return self.pipelining_enable or self.non_smtp_enable or self.bare_newline_enable

    @property
    def min_ttl(self) -> int:
        """postscreen's psc_min_ttl: the shortest TTL of the tests (for "ignore" passes)."""
        ttls = [self.greet_ttl, self.dnsbl_min_ttl]
        ttls += [self.pipelining_ttl, self.non_smtp_ttl, self.bare_newline_ttl]
        return min(ttls)


@dataclass(frozen=True)
class PostscreenSettings(PostscreenValues):
    """:class:`PostscreenValues` and the ``postscreen_dnsbl_sites`` entries as written."""

    site_specs: tuple[str, ...] = ()
    sites_location: Location | None = None


def _switched_on(settings: Settings, switch: str) -> bool:
    if switch != "auto":
        return switch == "yes"
    return any(
        settings.is_explicit(name)
        for name in PARAMETERS
        if name.startswith("postscreen_") and name not in NOT_A_SWITCH
    ) or any(
        settings.is_explicit(old)
        for old in (
            "postscreen_blacklist_action",
            "postscreen_dnsbl_whitelist_threshold",
            "postscreen_dnsbl_ttl",
        )
    )


def _access_tables(
    r: Reader, access: tuple[str, ...], table: Callable[[str, str], Table | None]
) -> dict[str, Table]:
    tables: dict[str, Table] = {}
    for item in access:
        if ":" in item:
            opened = table("postscreen_access_list", item)
            if opened is not None:
                tables[item] = opened
        elif item.lower() not in ACL_WORDS:
            r.error(
                "postscreen_access_list",
                f'postscreen_access_list: unknown command: "{item}" (use permit_mynetworks, '
                "permit, reject, dunno or a type:table)",
            )
    return tables


def _respectful_logging(settings: Settings) -> str:
    """respectful_logging; Postfix's default: yes from compatibility_level 3.6 on."""
    respectful = (settings.get("respectful_logging") or "").strip().lower()
    if respectful:
        return respectful
    try:
        level = compat_level(settings["compatibility_level"])
    except (ExpansionError, KeyError, ValueError):
        level = (3, 6, 0)
    return "yes" if level >= (3, 6, 0) else "no"


def postscreen_settings(
    settings: Settings, *, strict_tables: bool = False
) -> tuple[PostscreenSettings | None, list[Diagnostic]]:
    """Convert the postscreen parameters; None when any is bad."""
    r = Reader(settings)
    base = settings.config_directory
    switch = r.text("smtpgate_postscreen").strip().lower()
    if switch not in SWITCH:
        r.error(
            "smtpgate_postscreen", f"bad smtpgate_postscreen value: {switch} (use auto, yes or no)"
        )
        return None, r.diagnostics
    if not _switched_on(settings, switch):
        return PostscreenSettings(), r.diagnostics

    def action(name: str) -> str:
        value = r.text(name).strip().lower()
        if value not in ACTIONS:
            r.error(name, f"bad {name} value: {value} (use ignore, enforce or drop)")
        return value

    def whole_seconds(name: str) -> int:
        return int(r.seconds(name))

    def table(name: str, spec: str) -> Table | None:
        location = r.location(name)
        try:
            if strict_tables:
                return open_table(spec, base_dir=base, location=location)
            opened, problem = open_table_or_surrogate(spec, base_dir=base, location=location)
            if problem is not None:
                r.warning(name, f"{name}: {problem.message}")
            return opened
        except ConfigError as exc:
            r.failed(name, exc)
            return None

    access = tuple(w for w in r.words("postscreen_access_list") if w)
    tables = _access_tables(r, access, table)
    reply_spec = r.text("postscreen_dnsbl_reply_map").strip()
    reply_map = table("postscreen_dnsbl_reply_map", reply_spec) if reply_spec else None
    forbidden = r.opened(
        "postscreen_forbidden_commands",
        lambda: Forbidden.parse(
            r.words("postscreen_forbidden_commands"),
            base,
            r.location("postscreen_forbidden_commands"),
        ),
        Forbidden(FORBIDDEN_VERBS),
    )
    respectful = _respectful_logging(settings)
    config = PostscreenSettings(
        enabled=True,
        access_list=access,
        tables=tables,
        denylist_action=action("postscreen_denylist_action"),
        site_specs=tuple(r.words("postscreen_dnsbl_sites")),
        sites_location=settings.location("postscreen_dnsbl_sites"),
        dnsbl_threshold=r.number("postscreen_dnsbl_threshold"),
        allowlist_threshold=r.number("postscreen_dnsbl_allowlist_threshold"),
        dnsbl_action=action("postscreen_dnsbl_action"),
        reply_map=reply_map,
        dnsbl_timeout=r.seconds("postscreen_dnsbl_timeout"),
        dnsbl_min_ttl=whole_seconds("postscreen_dnsbl_min_ttl"),
        dnsbl_max_ttl=whole_seconds("postscreen_dnsbl_max_ttl"),
        greet_wait=r.seconds("postscreen_greet_wait"),
        greet_banner=r.text("postscreen_greet_banner"),
        greet_action=action("postscreen_greet_action"),
        greet_ttl=whole_seconds("postscreen_greet_ttl"),
        cache_retention=whole_seconds("postscreen_cache_retention_time"),
        pipelining_enable=r.flag("postscreen_pipelining_enable"),
        pipelining_action=action("postscreen_pipelining_action"),
        pipelining_ttl=whole_seconds("postscreen_pipelining_ttl"),
        non_smtp_enable=r.flag("postscreen_non_smtp_command_enable"),
        non_smtp_action=action("postscreen_non_smtp_command_action"),
        non_smtp_ttl=whole_seconds("postscreen_non_smtp_command_ttl"),
        forbidden=forbidden,
        bare_newline_enable=r.flag("postscreen_bare_newline_enable"),
        bare_newline_action=action("postscreen_bare_newline_action"),
        bare_newline_ttl=whole_seconds("postscreen_bare_newline_ttl"),
        respectful_logging=respectful not in ("no", "false"),
    )
    if settings.is_explicit("smtpgate_greet_pause"):
        if settings.is_explicit("postscreen_greet_wait"):
            r.warning(
                "smtpgate_greet_pause",
                "smtpgate_greet_pause is not used while postscreen runs: its pregreet test "
                "waits postscreen_greet_wait instead",
            )
        else:  # the old name of the wait, folded into postscreen's
            config = dataclasses.replace(config, greet_wait=r.seconds("smtpgate_greet_pause"))
    if any(d.severity == "error" for d in r.diagnostics):
        return None, r.diagnostics
    return config, r.diagnostics
