"""What the restriction engine reads from main.cf, typed: the input of the plan compiler.

:class:`PolicyConfig` holds the restriction lists and classes as words, the match lists
and table specifications as written (the plan opens them), the reply codes, the DNS
restriction texts and actions, and the switches of Postfix's smtpd_check.  It is built by
:func:`policy_config`, which reports a bad value as a :class:`Diagnostic` with file and
line; :mod:`smtpgate.policy.plan` compiles it and restrictions read the plan's typed
fields (``plan.codes.reject_code``), never a parameter by its name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType

from smtpgate.config.diagnostics import Diagnostic
from smtpgate.config.maincf import split_list, split_nameval, strip_braces
from smtpgate.config.service import Reader
from smtpgate.config.settings import Settings
from smtpgate.errors import ConfigError

STAGE_PARAMETERS = (
    "smtpd_client_restrictions",
    "smtpd_helo_restrictions",
    "smtpd_sender_restrictions",
    "smtpd_relay_restrictions",
    "smtpd_recipient_restrictions",
    "smtpd_data_restrictions",
    "smtpd_end_of_data_restrictions",
    "smtpd_etrn_restrictions",
)
"""The restriction lists, one per SMTP stage, in the order smtpd checks them."""

TEMPFAIL_ACTIONS = ("defer", "defer_if_permit")


@dataclass(frozen=True)
class ReplyCodes:
    """The ``*_reject_code`` / ``*_defer_code`` parameters, each a 4xx or 5xx code."""

    access_map_reject_code: int = 554
    access_map_defer_code: int = 450
    reject_code: int = 554
    defer_code: int = 450
    relay_domains_reject_code: int = 554
    unknown_relay_recipient_reject_code: int = 550
    unknown_local_recipient_reject_code: int = 550
    non_fqdn_reject_code: int = 504
    invalid_hostname_reject_code: int = 501
    unknown_address_reject_code: int = 450
    unknown_client_reject_code: int = 450
    unknown_hostname_reject_code: int = 450
    multi_recipient_bounce_reject_code: int = 550
    maps_rbl_reject_code: int = 554
    unverified_recipient_reject_code: int = 450
    unverified_recipient_defer_code: int = 450


@dataclass(frozen=True, slots=True)
class PolicyService:
    """One ``check_policy_service`` endpoint with its settings (Postfix SMTPD_POLICY_CLNT).

    ``name`` is the word as written after ``check_policy_service`` (``inet:127.0.0.1:9998``
    or the whole ``{ inet:127.0.0.1:9998, timeout=10s }``): Postfix keys its clients by
    it, and two spellings are two clients.  ``endpoint`` is the ``inet:host:port`` or
    ``unix:/path`` part; the times are seconds.  The main.cf parameters
    ``smtpd_policy_service_*`` give the defaults, the brace form overrides them.
    """

    name: str
    endpoint: str
    timeout: float = 100.0
    max_idle: float = 300.0
    max_ttl: float = 1000.0
    try_limit: int = 2
    retry_delay: float = 1.0
    request_limit: int = 0
    default_action: str = "451 4.3.5 Server configuration problem"  # DEFAULT_POLICY_ACTION
    policy_context: str = ""

    @property
    def transport(self) -> str:
        """``inet`` or ``unix``."""
        return self.endpoint.partition(":")[0]

    @property
    def address(self) -> str:
        """The endpoint without its transport: ``127.0.0.1:9998``, ``/run/policy.sock``
        (what Postfix's log lines name: ``problem talking to server 127.0.0.1:9998``)."""
        return self.endpoint.partition(":")[2]


DEFAULT_POLICY_ACTION = "451 4.3.5 Server configuration problem"
POLICY_TRANSPORTS = ("inet", "unix", "local")
_TIME = re.compile(r"(\d+)([smhdw]?)")
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# The brace form's option names: Postfix's parameter names without the
# "smtpd_policy_service_" prefix (smtpd_check.c: time_table, int_table, str_table), which
# are also PolicyService's field names.
_OPTIONS = frozenset(
    {
        "timeout",
        "max_idle",
        "max_ttl",
        "retry_delay",
        "request_limit",
        "try_limit",
        "default_action",
        "policy_context",
    }
)
_TIMES = frozenset({"timeout", "max_idle", "max_ttl", "retry_delay"})
_MINIMUM = {"try_limit": 1, "request_limit": 0}


def _endpoint_error(endpoint: str) -> str | None:
    transport, colon, where = endpoint.partition(":")
    if not colon or not transport or not where:
        return f'need service transport:endpoint instead of "{endpoint}"'
    if transport not in POLICY_TRANSPORTS:
        return (
            f'unsupported policy service transport "{transport}" in "{endpoint}" '
            "(use inet: or unix:)"
        )
    if transport == "inet":
        host, _, port = where.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f'policy service "{endpoint}": expected inet:host:port'
    elif not where.startswith("/"):
        return (
            f'policy service "{endpoint}": a unix socket needs an absolute path '
            "(smtpgate has no Postfix queue directory to resolve private/... against)"
        )
    return None


def policy_service(word: str, defaults: PolicyService) -> PolicyService:
    """The service a ``check_policy_service`` argument names, with ``defaults`` (the
    main.cf parameters) overridden by its brace options; ConfigError says what is wrong
    in Postfix's words (``unknown option``, ``bad time value or unit``...)."""
    text = word
    options: list[str] = []
    if word.startswith("{"):
        try:
            parts = split_list(strip_braces(word))
        except ValueError as exc:
            raise ConfigError(f"policy service syntax error: {exc}") from None
        if not parts:
            raise ConfigError(f'empty policy service: "{word}"')
        text, options = parts[0], parts[1:]
    problem = _endpoint_error(text)
    if problem:
        raise ConfigError(problem)
    changes: dict[str, object] = {"name": word, "endpoint": text}
    for option in options:
        key, value = _option(option)
        changes[key] = _option_value(key, value)
    return replace(defaults, **changes)  # type: ignore[arg-type]


def _option(option: str) -> tuple[str, str]:
    """``name=value`` or ``{ name = value }`` (Postfix attr_override)."""
    if option.startswith("{"):
        try:
            option = strip_braces(option)
        except ValueError as exc:
            raise ConfigError(f'{exc} in "{option}"') from None
    parsed = split_nameval(option)
    if isinstance(parsed, str):
        raise ConfigError(f'malformed option: {parsed}: "...{option}..."')
    key, value = parsed
    if key not in _OPTIONS:
        raise ConfigError(f'unknown option: "{key} = {value}"')
    return key, value


def _option_value(key: str, value: str) -> float | int | str:
    if key in _TIMES:
        match = _TIME.fullmatch(value)
        if match is None:
            raise ConfigError(f"{key}: bad time value or unit: {value}")
        seconds = int(match.group(1)) * _TIME_UNITS[match.group(2)]
        if seconds < 1:
            raise ConfigError(f"invalid {key} parameter value {seconds} < 1")
        return float(seconds)
    if key in _MINIMUM:
        if not re.fullmatch(r"-?\d+", value):
            raise ConfigError(f"bad numerical configuration: {key} = {value}")
        if int(value) < _MINIMUM[key]:
            raise ConfigError(f"invalid {key} parameter value {value} < {_MINIMUM[key]}")
        return int(value)
    if not value:
        raise ConfigError(f"bad parameter value: {key} = {value}")
    return value


def _policy_defaults(r: Reader) -> PolicyService:
    """The smtpd_policy_service_* parameters, checked against Postfix's minimums."""

    def at_least(name: str, value: float, minimum: int) -> float:
        if value < minimum:
            r.error(name, f"{name}: bad value {value:g} (must be at least {minimum})")
            return float(minimum)
        return value

    prefix = "smtpd_policy_service_"
    action = r.text(prefix + "default_action").strip()
    if not action:
        r.error(prefix + "default_action", f"{prefix}default_action: the value is empty")
        action = DEFAULT_POLICY_ACTION
    return PolicyService(
        name="",
        endpoint="",
        timeout=at_least(prefix + "timeout", r.seconds(prefix + "timeout"), 1),
        max_idle=at_least(prefix + "max_idle", r.seconds(prefix + "max_idle"), 1),
        max_ttl=at_least(prefix + "max_ttl", r.seconds(prefix + "max_ttl"), 1),
        try_limit=int(at_least(prefix + "try_limit", r.number(prefix + "try_limit"), 1)),
        retry_delay=at_least(prefix + "retry_delay", r.seconds(prefix + "retry_delay"), 1),
        request_limit=int(
            at_least(prefix + "request_limit", r.number(prefix + "request_limit"), 0)
        ),
        default_action=action,
        policy_context=r.text(prefix + "policy_context"),
    )


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    """Recipient verification (reject_unverified_recipient): the address_verify_* and
    unverified_recipient_* parameters, times in seconds (Postfix's verify(8) and
    smtpd_check.c)."""

    tempfail_action: str = "defer_if_permit"
    reject_reason: str = ""
    negative_cache: bool = True
    positive_expire: float = 31 * 86400.0
    positive_refresh: float = 7 * 86400.0
    negative_expire: float = 3 * 86400.0
    negative_refresh: float = 3 * 3600.0
    sender: str = "double-bounce"
    """The probe's MAIL FROM as Postfix makes it: qualified with @$myorigin; "" is the
    null sender (without the time stamp of sender_ttl, added per probe)."""
    sender_ttl: float = 0.0


def _verify_sender(r: Reader, myorigin: str) -> str:
    name = "address_verify_sender"
    value = r.text(name).strip()
    if value in ("", "<>"):
        return ""
    if value.startswith("@") or value.endswith("@"):
        where = "start" if value.startswith("@") else "end"
        r.error(name, f"parameter {name}: value \"{value}\" must not {where} with '@'")
        return "double-bounce@" + myorigin
    return value if "@" in value else f"{value}@{myorigin}"


def verify_config(r: Reader, myorigin: str) -> VerifyConfig:
    """The address_verify_* parameters (address_verify_map: syntax only)."""
    table = r.text("address_verify_map").strip()
    if table and ":" not in table.strip("{}"):
        r.error(
            "address_verify_map",
            f'address_verify_map: bad table "{table}" (expected type:name, or empty)',
        )
    times: dict[str, float] = {}
    for what in ("positive_expire", "positive_refresh", "negative_expire", "negative_refresh"):
        name = f"address_verify_{what}_time"
        before = len(r.diagnostics)
        times[what] = r.seconds(name)
        if times[what] < 1 and len(r.diagnostics) == before:
            r.error(name, f"invalid {name} parameter value {times[what]:g} < 1")
            times[what] = 1.0
    ttl = r.seconds("address_verify_sender_ttl")
    return VerifyConfig(
        tempfail_action=_tempfail_action(r, "unverified_recipient_tempfail_action"),
        reject_reason=r.text("unverified_recipient_reject_reason"),
        negative_cache=r.flag("address_verify_negative_cache"),
        sender=_verify_sender(r, myorigin),
        sender_ttl=ttl,
        **times,
    )


@dataclass(frozen=True)
class PolicyConfig:
    """The plan compiler's input, one field per parameter it reads."""

    myhostname: str
    myorigin: str
    restriction_lists: Mapping[str, tuple[str, ...]]
    """Each of :data:`STAGE_PARAMETERS` -> its words."""
    restriction_classes: tuple[str, ...]
    class_definitions: Mapping[str, tuple[str, ...]]
    """Each class of smtpd_restriction_classes -> its words (empty: not defined)."""
    mynetworks: tuple[str, ...]
    relay_domains: tuple[str, ...]
    mydestination: tuple[str, ...]
    parent_domain_matches_subdomains: frozenset[str]
    relay_recipient_maps: tuple[str, ...]
    local_recipient_maps: tuple[str, ...]
    rbl_reply_maps: tuple[str, ...]
    codes: ReplyCodes
    default_rbl_reply: str
    expansion_filter: str
    """smtpd_expansion_filter as written (with its backslash escapes)."""
    unknown_address_tempfail_action: str
    unknown_helo_hostname_tempfail_action: str
    rbl_tempfail_action: str
    recipient_delimiter: str
    null_access_lookup_key: str
    show_unknown_table_name: bool
    delay_reject: bool
    helo_required: bool
    soft_bounce: bool
    relay_before_recipient: bool
    reject_unlisted_sender: bool
    reject_unlisted_recipient: bool
    allow_untrusted_routing: bool
    allow_percent_hack: bool
    swap_bangpath: bool
    policy_service_defaults: PolicyService
    """The smtpd_policy_service_* parameters; a check_policy_service argument's brace
    options override them (:func:`policy_service`)."""
    verify: VerifyConfig = VerifyConfig()
    """reject_unverified_recipient's cache and probe settings."""


def _tempfail_action(r: Reader, name: str, extra: tuple[str, ...] = ()) -> str:
    value = (r.text(name) or "defer_if_permit").strip().lower()
    allowed = TEMPFAIL_ACTIONS + extra
    if value not in allowed:
        r.error(name, f"{name}: bad value {value!r} (expected {' or '.join(allowed)})")
        return "defer_if_permit"
    return value


def policy_config(settings: Settings) -> tuple[PolicyConfig, list[Diagnostic]]:
    """Convert what the plan compiler reads; a bad value is an error diagnostic (and the
    config returned is then only good for finding more errors)."""
    r = Reader(settings)
    classes = r.words("smtpd_restriction_classes")
    codes = ReplyCodes(**{f.name: r.code(f.name) for f in fields(ReplyCodes)})
    config = PolicyConfig(
        myhostname=r.text("myhostname"),
        myorigin=r.text("myorigin"),
        restriction_lists=MappingProxyType({p: r.words(p) for p in STAGE_PARAMETERS}),
        restriction_classes=classes,
        class_definitions=MappingProxyType(
            {name: tuple(split_list(settings.get(name) or "")) for name in classes}
        ),
        mynetworks=r.words("mynetworks"),
        relay_domains=r.words("relay_domains"),
        mydestination=r.words("mydestination"),
        parent_domain_matches_subdomains=frozenset(r.words("parent_domain_matches_subdomains")),
        relay_recipient_maps=r.words("relay_recipient_maps"),
        local_recipient_maps=r.words("local_recipient_maps"),
        rbl_reply_maps=r.words("rbl_reply_maps"),
        codes=codes,
        default_rbl_reply=r.text("default_rbl_reply"),
        expansion_filter=r.text("smtpd_expansion_filter"),
        unknown_address_tempfail_action=_tempfail_action(r, "unknown_address_tempfail_action"),
        unknown_helo_hostname_tempfail_action=_tempfail_action(
            r, "unknown_helo_hostname_tempfail_action"
        ),
        rbl_tempfail_action=_tempfail_action(r, "rbl_tempfail_action", ("dunno",)),
        recipient_delimiter=r.text("recipient_delimiter"),
        null_access_lookup_key=r.text("smtpd_null_access_lookup_key") or "<>",
        show_unknown_table_name=r.flag("show_user_unknown_table_name"),
        delay_reject=r.flag("smtpd_delay_reject"),
        helo_required=r.flag("smtpd_helo_required"),
        soft_bounce=r.flag("soft_bounce"),
        relay_before_recipient=r.flag("smtpd_relay_before_recipient_restrictions"),
        reject_unlisted_sender=r.flag("smtpd_reject_unlisted_sender"),
        reject_unlisted_recipient=r.flag("smtpd_reject_unlisted_recipient"),
        allow_untrusted_routing=r.flag("allow_untrusted_routing"),
        allow_percent_hack=r.flag("allow_percent_hack"),
        swap_bangpath=r.flag("swap_bangpath"),
        policy_service_defaults=_policy_defaults(r),
        verify=verify_config(r, r.text("myorigin")),
    )
    return config, r.diagnostics
