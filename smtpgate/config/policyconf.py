"""What the restriction engine reads from main.cf, typed: the input of the plan compiler.

:class:`PolicyConfig` holds the restriction lists and classes as words, the match lists
and table specifications as written (the plan opens them), the reply codes, the DNS
restriction texts and actions, and the switches of Postfix's smtpd_check.  It is built by
:func:`policy_config`, which reports a bad value as a :class:`Diagnostic` with file and
line; :mod:`smtpgate.policy.plan` compiles it and restrictions read the plan's typed
fields (``plan.codes.reject_code``), never a parameter by its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

from smtpgate.config.diagnostics import Diagnostic
from smtpgate.config.maincf import split_list
from smtpgate.config.service import Reader
from smtpgate.config.settings import Settings

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
    )
    return config, r.diagnostics
