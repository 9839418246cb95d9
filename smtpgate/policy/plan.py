"""Compile settings into a Plan: every name resolved and every table opened, once.

``build_plan`` is the policy half of the one load (:mod:`smtpgate.generation`) that
``check``, ``explain``, ``serve`` and the reload share.  Its input is the typed
:class:`~smtpgate.config.policyconf.PolicyConfig`; the Settings only say where a value was
set.  It returns the plan and all diagnostics at once (errors and warnings, each naming
file and line); :func:`compile_plan` raises when there is an error.  A plan is
immutable: a reload builds a new one, in a new generation.

Restriction lists compile to :class:`Compiled` items.  A table argument is opened
here, so a missing file stops startup instead of failing at the first RCPT.  Restriction
classes are compiled the same way; cycles between classes are errors.  Table *values*
that name restrictions are compiled when first met (Postfix does the same), through
:func:`compile_runtime_list`, and cached.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from smtpgate.config import Diagnostic, Location, Settings
from smtpgate.config.policyconf import (
    STAGE_PARAMETERS,
    PolicyConfig,
    PolicyService,
    ReplyCodes,
    VerifyConfig,
    policy_config,
    policy_service,
)
from smtpgate.errors import ConfigError, SmtpgateError
from smtpgate.policy import delegation as _delegation  # noqa: F401  (fills the registry)
from smtpgate.policy import restrictions as _restrictions  # noqa: F401  (fills the registry)
from smtpgate.policy import verification as _verification  # noqa: F401  (fills the registry)
from smtpgate.policy.actions import lint_action
from smtpgate.policy.address import Resolver
from smtpgate.policy.dnsbl import ZoneError, parse_zone, unescape
from smtpgate.policy.ports import AddressVerifier, PolicyClient
from smtpgate.policy.registry import RestrictionSpec, lookup
from smtpgate.policy.verification import LOCKSTEP_PROBE
from smtpgate.tables import AddressList, DomainList, Maps, SurrogateTable, Table, open_table

# The access restriction a bare "type:table" stands for in each list (Postfix def_acl).
DEFAULT_ACL = {
    "smtpd_client_restrictions": "check_client_access",
    "smtpd_helo_restrictions": "check_helo_access",
    "smtpd_sender_restrictions": "check_sender_access",
    "smtpd_relay_restrictions": "check_recipient_access",
    "smtpd_recipient_restrictions": "check_recipient_access",
    "smtpd_etrn_restrictions": "check_etrn_access",
}

REQUIRED_FOR_RELAY = (
    "reject_unauth_destination",
    "defer_unauth_destination",
    "reject",
    "defer",
    "defer_if_permit",
)

DEFAULT_RBL_REPLY = (
    "$rbl_code Service unavailable; $rbl_class [$rbl_what] blocked using "
    "$rbl_domain${rbl_reason?; $rbl_reason}"
)

RESTRICTION_SEPARATORS = re.compile(r"[,\s]+")

_ARGUMENT_WHAT = {
    "table": "a type:table",
    "zone": "a domain name",
    "service": "a policy service (inet:host:port or unix:/path)",
}


@dataclass(frozen=True, slots=True)
class Compiled:
    """One restriction list item, ready to run."""

    name: str
    label: str
    spec: RestrictionSpec | None = None
    arg: Any = None
    class_name: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class DnsPolicy:
    """What the DNS restrictions need besides the reply codes."""

    default_rbl_reply: str = DEFAULT_RBL_REPLY
    rbl_reply_maps: Maps | None = None
    expansion_filter: str | None = None
    """smtpd_expansion_filter, unescaped; None: no filtering."""
    unknown_address_tempfail_action: str = "defer_if_permit"
    unknown_helo_hostname_tempfail_action: str = "defer_if_permit"
    rbl_tempfail_action: str = "defer_if_permit"
    """smtpgate's own: defer_if_permit, defer or dunno (Postfix 3.7: dunno)."""


@dataclass(frozen=True)
class Plan:
    """Everything the engine needs, validated; shared by every session."""

    myhostname: str
    lists: dict[str, tuple[Compiled, ...]]
    classes: dict[str, tuple[Compiled, ...]]
    mynetworks: AddressList
    relay_domains: DomainList
    mydestination: DomainList
    relay_recipient_maps: Maps | None
    local_recipient_maps: Maps | None
    show_unknown_table_name: bool
    resolver: Resolver
    codes: ReplyCodes
    parent_style: bool
    recipient_delimiter: str
    null_access_lookup_key: str
    delay_reject: bool
    helo_required: bool
    soft_bounce: bool
    relay_before_recipient: bool
    reject_unlisted_sender: bool
    reject_unlisted_recipient: bool
    allow_untrusted_routing: bool
    dns: DnsPolicy = field(default_factory=DnsPolicy)
    policy_services: dict[str, PolicyService] = field(default_factory=dict)
    """Every check_policy_service argument of the lists and classes, as written -> its
    service (Postfix's policy_clnt_table: a table value may only name these)."""
    policy_client: PolicyClient | None = field(default=None, compare=False)
    """The port check_policy_service asks through; None until the load binds the
    adapter (``smtpgate.generation``; tests bind a FakePolicyClient with
    :meth:`with_policy_client`).  Unbound, every request gets the default action."""
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    """reject_unverified_recipient's settings (address_verify_*, unverified_recipient_*)."""
    verifier: AddressVerifier | None = field(default=None, compare=False)
    """The port reject_unverified_recipient asks through; None until the load binds the
    adapter (``smtpgate.generation``; tests bind a FakeVerifier with
    :meth:`with_verifier`).  Unbound, every query is a verification failure."""
    runtime_cache: dict[str, tuple[Compiled, ...]] = field(default_factory=dict, compare=False)

    def stage_list(self, parameter: str) -> tuple[Compiled, ...]:
        return self.lists.get(parameter, ())

    def with_policy_client(self, client: PolicyClient | None) -> Plan:
        """The same plan asking policy servers through ``client``."""
        return replace(self, policy_client=client)

    def with_verifier(self, verifier: AddressVerifier | None) -> Plan:
        """The same plan verifying recipients through ``verifier``."""
        return replace(self, verifier=verifier)

    @property
    def verifies_recipients(self) -> bool:
        """Whether a list or class names reject_unverified_recipient."""
        return any(
            item.name == VERIFY_RESTRICTION
            for items in (*self.lists.values(), *self.classes.values())
            for item in items
        )


class _Builder:
    """Collects diagnostics while compiling; one per build."""

    def __init__(self, settings: Settings, strict_tables: bool = True) -> None:
        self.settings = settings
        self.strict_tables = strict_tables
        self.diagnostics: list[Diagnostic] = []
        self.tables: dict[str, Table] = {}
        self.access_tables: set[str] = set()
        self.class_names: list[str] = []
        self.policy_defaults = PolicyService("", "")
        self.policy_services: dict[str, PolicyService] = {}

    def error(self, message: str, location: Location | None) -> None:
        self.diagnostics.append(Diagnostic("error", message, location))

    def warning(self, message: str, location: Location | None) -> None:
        self.diagnostics.append(Diagnostic("warning", message, location))

    def where(self, parameter: str) -> Location | None:
        return self.settings.location(parameter)

    def loc_tuple(self, parameter: str) -> tuple[str, int] | None:
        loc = self.where(parameter)
        return (loc.path, loc.line) if loc is not None else None

    def open(self, spec: str, parameter: str) -> Table | None:
        if spec in self.tables:
            return self.tables[spec]
        try:
            table = open_table(
                spec,
                base_dir=self.settings.config_directory,
                location=self.loc_tuple(parameter),
            )
        except ConfigError as exc:
            loc = self.where(parameter) if not exc.path else None
            if self.strict_tables:
                self.error(f"{parameter}: {exc}", loc)
                return None
            self.warning(f"{parameter}: {exc}; every lookup in {spec} fails (451 4.3.5)", loc)
            kind, _, name = spec.partition(":")
            table = SurrogateTable(kind, name, exc.message)
            self.tables[spec] = table
            return table
        self.tables[spec] = table
        for warning in getattr(table, "warnings", ()):
            self.warning(f"{spec}: {warning}", None)
        return table

    def maps(self, parameter: str, specs: Sequence[str]) -> Maps | None:
        """The tables a parameter lists, as one ordered search; None when it lists none."""
        if not specs:
            return None
        tables = [t for t in (self.open(spec, parameter) for spec in specs) if t is not None]
        return Maps(parameter, tables)

    def compile_list(self, parameter: str, text_tokens: Sequence[str]) -> tuple[Compiled, ...]:
        items: list[Compiled] = []
        loc = self.where(parameter)
        tokens = list(text_tokens)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            i += 1
            bare_table: str | None = None
            if ":" in token and lookup(token) is None:
                acl = DEFAULT_ACL.get(parameter)
                if acl is None:
                    self.error(
                        f'{parameter}: a lookup table "{token}" must follow a '
                        "check_*_access restriction here",
                        loc,
                    )
                    continue
                bare_table, token = token, acl
            if token.lower() == "warn_if_reject":
                items.append(Compiled("warn_if_reject", "warn_if_reject"))
                continue
            spec = lookup(token)
            if spec is None:
                items.append(self._class_or_unknown(parameter, token, loc))
                continue
            if not spec.implemented:
                i += self._not_yet(parameter, token, spec, loc, bare_table is None)
                continue
            arg: Any = None
            label = spec.name
            if spec.arg != "none":
                if bare_table is None:
                    if i >= len(tokens) or (spec.arg == "table" and ":" not in tokens[i]):
                        what = _ARGUMENT_WHAT[spec.arg]
                        self.error(
                            f'{parameter}: restriction "{token}" requires {what} argument', loc
                        )
                        continue
                    bare_table = tokens[i]
                    i += 1
                arg = self._argument(parameter, token, spec, bare_table, loc)
                if arg is None:
                    continue
                label = f"{spec.name} {bare_table}"
            items.append(Compiled(spec.name, label, spec, arg))
        return tuple(items)

    def _argument(
        self,
        parameter: str,
        token: str,
        spec: RestrictionSpec,
        word: str,
        loc: Location | None,
    ) -> Any:
        """What a restriction's argument compiles to (None: an error was reported)."""
        if spec.arg == "service":
            return self._service(parameter, token, word, loc)
        if spec.arg == "table":
            table = self.open(word, parameter)
            if table is not None:
                self.access_tables.add(word)
            return table
        if not self._zone_ok(parameter, token, word, loc):
            return None
        return word

    def _service(
        self, parameter: str, token: str, word: str, loc: Location | None
    ) -> PolicyService | None:
        """The policy service a check_policy_service argument names (registered once per
        spelling, as Postfix's policy_client_register does)."""
        known = self.policy_services.get(word)
        if known is not None:
            return known
        try:
            service = policy_service(word, self.policy_defaults)
        except ConfigError as exc:
            self.error(f'{parameter}: restriction "{token}": {exc.message}', loc)
            return None
        self.policy_services[word] = service
        return service

    def _not_yet(
        self, parameter: str, token: str, spec: RestrictionSpec, loc: Location | None, own: bool
    ) -> int:
        """One error for a known restriction that is not implemented; the words to skip.

        Its argument (when it has one of its *own*) is skipped unread: it is not a table to
        open or a DNS zone to parse (``sleep 10``).
        """
        self.error(f'{parameter}: restriction "{token}" is not supported yet ({spec.since})', loc)
        return 1 if spec.arg != "none" and own else 0

    def _zone_ok(self, parameter: str, token: str, zone: str, loc: Location | None) -> bool:
        try:
            parse_zone(zone)
        except ZoneError as exc:
            self.error(f'{parameter}: restriction "{token}": {exc}', loc)
            return False
        return True

    def _class_or_unknown(self, parameter: str, token: str, loc: Location | None) -> Compiled:
        if token in self.class_names:
            return Compiled(token, token, class_name=token)
        hint = ""
        if self.settings.is_explicit(token):
            hint = f"; {token} is defined but not listed in smtpd_restriction_classes"
        self.error(f'{parameter}: unknown restriction "{token}"{hint}', loc)
        return Compiled(token, token, error=f'unknown smtpd restriction: "{token}"')


VERIFY_RESTRICTION = "reject_unverified_recipient"
# LOCKSTEP_PROBE (policy/verification.py) is the argument the plan gives
# reject_unverified_recipient where the client's own RCPT, relayed in lock-step, may be
# the verification probe (_mark_lockstep_probes).
_NEVER_REJECT = frozenset(
    {"permit", "permit_mynetworks", "permit_sasl_authenticated", "permit_auth_destination"}
)


def _mark_lockstep_probes(
    lists: dict[str, tuple[Compiled, ...]], relay_first: bool, rcpt_maps: bool
) -> None:
    """Mark each reject_unverified_recipient after which nothing can refuse a recipient.

    The backend cannot be told to forget a recipient it accepted, so the client's RCPT
    may only be the probe when, once verification passes, the recipient is accepted for
    sure: every later item of its list, and of the RCPT lists run after it, can only
    permit (Postfix's ``permit*`` words), and no recipient table check follows
    (smtpd_reject_unlisted_recipient with recipient maps).  The session adds what only
    it knows (no deferral armed, no warn_if_reject, not inside a class, no milter).
    """
    if rcpt_maps:
        return
    order = ["smtpd_relay_restrictions", "smtpd_recipient_restrictions"]
    if not relay_first:
        order.reverse()
    safe_after = True
    for parameter in reversed(order):
        items = list(lists.get(parameter, ()))
        for i in range(len(items) - 1, -1, -1):
            item = items[i]
            if item.name == VERIFY_RESTRICTION and safe_after and item.arg is None:
                items[i] = replace(item, arg=LOCKSTEP_PROBE)
            if item.name not in _NEVER_REJECT:
                safe_after = False
        lists[parameter] = tuple(items)


def _dns_policy(config: PolicyConfig, b: _Builder) -> DnsPolicy:
    return DnsPolicy(
        default_rbl_reply=config.default_rbl_reply or DEFAULT_RBL_REPLY,
        rbl_reply_maps=b.maps("rbl_reply_maps", config.rbl_reply_maps),
        expansion_filter=unescape(config.expansion_filter),
        unknown_address_tempfail_action=config.unknown_address_tempfail_action,
        unknown_helo_hostname_tempfail_action=config.unknown_helo_hostname_tempfail_action,
        rbl_tempfail_action=config.rbl_tempfail_action,
    )


def build_plan(
    settings: Settings, *, strict_tables: bool = True
) -> tuple[Plan | None, list[Diagnostic]]:
    """Compile ``settings``; the plan is None when any diagnostic is an error.

    The values come typed from :func:`~smtpgate.config.policyconf.policy_config`; the
    settings themselves only say where each parameter was set (for the diagnostics) and
    whether a name is set at all (the hint for an unlisted class).

    With ``strict_tables`` (``check``), a table that cannot be opened is an error.
    Without (``serve``, its reload, ``explain``), it is a warning and the table is
    replaced by a surrogate whose every lookup answers ``451 4.3.5``, as Postfix's
    daemons do.
    """
    config, diagnostics = policy_config(settings)
    b = _Builder(settings, strict_tables)
    b.diagnostics.extend(diagnostics)
    b.class_names = list(config.restriction_classes)
    b.policy_defaults = config.policy_service_defaults
    for name in b.class_names:
        if not config.class_definitions[name]:
            b.error(
                f"restriction class `{name}' needs a definition",
                b.where("smtpd_restriction_classes"),
            )
    lists = {p: b.compile_list(p, config.restriction_lists[p]) for p in STAGE_PARAMETERS}
    classes = {name: b.compile_list(name, config.class_definitions[name]) for name in b.class_names}
    _check_cycles(b, classes)
    _check_required(b, lists, classes)
    _lint_relay_order(b, lists)
    pdms = config.parent_domain_matches_subdomains
    try:
        mynetworks = AddressList.parse(
            config.mynetworks,
            base_dir=settings.config_directory,
            title="mynetworks",
            location=b.loc_tuple("mynetworks"),
        )
        relay_domains = DomainList.parse(
            config.relay_domains,
            base_dir=settings.config_directory,
            parent_matches_subdomains="relay_domains" in pdms,
            title="relay_domains",
            location=b.loc_tuple("relay_domains"),
        )
        mydestination = DomainList.parse(
            config.mydestination,
            base_dir=settings.config_directory,
            parent_matches_subdomains="mydestination" in pdms,
            title="mydestination",
            location=b.loc_tuple("mydestination"),
        )
    except SmtpgateError as exc:
        b.error(str(exc), None)
        return None, b.diagnostics
    relay_recipient_maps = b.maps("relay_recipient_maps", config.relay_recipient_maps)
    local_recipient_maps = b.maps("local_recipient_maps", config.local_recipient_maps)
    dns = _dns_policy(config, b)
    _lint_tables(b, classes)
    if any(d.severity == "error" for d in b.diagnostics):
        return None, b.diagnostics
    _mark_lockstep_probes(
        lists,
        config.relay_before_recipient,
        config.reject_unlisted_recipient
        and bool(config.relay_recipient_maps or config.local_recipient_maps),
    )
    resolver = Resolver(
        myorigin=config.myorigin,
        is_local_domain=mydestination.match,
        is_relay_domain=relay_domains.match,
        allow_percent_hack=config.allow_percent_hack,
        swap_bangpath=config.swap_bangpath,
    )
    plan = Plan(
        myhostname=config.myhostname,
        lists=lists,
        classes=classes,
        mynetworks=mynetworks,
        relay_domains=relay_domains,
        mydestination=mydestination,
        relay_recipient_maps=relay_recipient_maps,
        local_recipient_maps=local_recipient_maps,
        show_unknown_table_name=config.show_unknown_table_name,
        resolver=resolver,
        codes=config.codes,
        parent_style="smtpd_access_maps" in pdms,
        recipient_delimiter=config.recipient_delimiter,
        null_access_lookup_key=config.null_access_lookup_key,
        delay_reject=config.delay_reject,
        helo_required=config.helo_required,
        soft_bounce=config.soft_bounce,
        relay_before_recipient=config.relay_before_recipient,
        reject_unlisted_sender=config.reject_unlisted_sender,
        reject_unlisted_recipient=config.reject_unlisted_recipient,
        allow_untrusted_routing=config.allow_untrusted_routing,
        dns=dns,
        policy_services=b.policy_services,
        verify=config.verify,
    )
    return plan, b.diagnostics


def compile_plan(
    settings: Settings, *, strict_tables: bool = True
) -> tuple[Plan, list[Diagnostic]]:
    """Like :func:`build_plan`, but raise ConfigError listing every error."""
    plan, diagnostics = build_plan(settings, strict_tables=strict_tables)
    if plan is None:
        errors = [str(d) for d in diagnostics if d.severity == "error"]
        raise ConfigError("\n".join(errors))
    return plan, diagnostics


def compile_runtime_list(plan: Plan, text: str) -> tuple[Compiled, ...]:
    """Compile restriction names found in a table value (no table arguments)."""
    cached = plan.runtime_cache.get(text)
    if cached is not None:
        return cached
    items: list[Compiled] = []
    tokens = [t for t in RESTRICTION_SEPARATORS.split(text) if t]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token.lower() == "warn_if_reject":
            items.append(Compiled("warn_if_reject", "warn_if_reject"))
            continue
        spec = lookup(token)
        if spec is None:
            if token in plan.classes:
                items.append(Compiled(token, token, class_name=token))
            else:
                items.append(Compiled(token, token, error=f'unknown smtpd restriction: "{token}"'))
            continue
        if not spec.implemented:
            items.append(Compiled(token, token, error=f'restriction "{token}" is not supported'))
            continue
        if spec.arg == "service":
            # Postfix only knows the services its lists named at startup (a table value
            # naming another one makes smtpd panic); name those, or refuse.
            word = tokens[i] if i < len(tokens) else ""
            service = plan.policy_services.get(word)
            i += 1
            if service is None:
                why = f"{token} {word}: a policy service not named in main.cf's restrictions"
                items.append(Compiled(token, token, error=why))
            else:
                items.append(Compiled(spec.name, f"{spec.name} {word}", spec, service))
            continue
        if spec.arg != "none":
            if i >= len(tokens) or spec.arg == "table":
                items.append(
                    Compiled(token, token, error=f"restriction {token} needs an argument here")
                )
                i += 1
                continue
            items.append(Compiled(spec.name, f"{spec.name} {tokens[i]}", spec, tokens[i]))
            i += 1
            continue
        items.append(Compiled(spec.name, spec.name, spec))
    result = tuple(items)
    if len(plan.runtime_cache) < 10_000:
        plan.runtime_cache[text] = result
    return result


def _class_refs(items: Iterable[Compiled]) -> list[str]:
    return [item.class_name for item in items if item.class_name]


def _check_cycles(b: _Builder, classes: dict[str, tuple[Compiled, ...]]) -> None:
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*path[path.index(name) :], name])
            b.error(f"restriction classes refer to each other in a loop: {cycle}", b.where(name))
            return
        state[name] = 1
        for ref in _class_refs(classes.get(name, ())):
            visit(ref, [*path, name])
        state[name] = 2

    for name in classes:
        visit(name, [])


def _contains_required(
    items: tuple[Compiled, ...], classes: dict[str, tuple[Compiled, ...]], seen: set[str]
) -> bool:
    skip = False
    for item in items:
        if skip:
            skip = False
            continue
        if item.name == "warn_if_reject":
            skip = True
            continue
        if item.name in REQUIRED_FOR_RELAY:
            return True
        if item.class_name and item.class_name not in seen:
            seen.add(item.class_name)
            if _contains_required(classes.get(item.class_name, ()), classes, seen):
                return True
    return False


def _check_required(
    b: _Builder, lists: dict[str, tuple[Compiled, ...]], classes: dict[str, tuple[Compiled, ...]]
) -> None:
    relay = lists["smtpd_relay_restrictions"]
    rcpt = lists["smtpd_recipient_restrictions"]
    if _contains_required(relay, classes, set()) or _contains_required(rcpt, classes, set()):
        return
    b.error(
        "in parameter smtpd_relay_restrictions or smtpd_recipient_restrictions, specify at "
        "least one working instance of: "
        + ", ".join(REQUIRED_FOR_RELAY[:-1])
        + f" or {REQUIRED_FOR_RELAY[-1]} (Postfix refuses to start without one: "
        "it would be an open relay)",
        b.where("smtpd_recipient_restrictions") or b.where("smtpd_relay_restrictions"),
    )


def _lint_relay_order(b: _Builder, lists: dict[str, tuple[Compiled, ...]]) -> None:
    """Warn about ``permit`` before the relay check: everything after it is skipped."""
    for parameter in ("smtpd_relay_restrictions", "smtpd_recipient_restrictions"):
        names = [item.name for item in lists[parameter]]
        guard = next((n for n in names if n in REQUIRED_FOR_RELAY[:2]), None)
        if guard is None:
            continue
        before = names[: names.index(guard)]
        if "permit" in before:
            b.warning(
                f"{parameter}: permit before {guard} accepts every recipient: "
                "this is an open relay; put permit after it",
                b.where(parameter),
            )


def _lint_tables(b: _Builder, classes: dict[str, tuple[Compiled, ...]]) -> None:
    """Check every value of every enumerable table: traps and unknown names."""
    for spec in sorted(b.access_tables):
        table = b.tables[spec]
        items = getattr(table, "items", None)
        if items is None:
            continue
        for key, value, line in items():
            where = Location(_table_path(table), line) if line else None
            hint = lint_action(value)
            if hint:
                b.warning(f"{spec}: {key}: {hint}", where)
            for token in _value_names(value):
                if token in classes or lookup(token) is not None:
                    continue
                extra = ""
                if b.settings.is_explicit(token):
                    extra = f"; {token} is defined but not listed in smtpd_restriction_classes"
                b.warning(
                    f'{spec}: {key}: "{token}" is neither an action nor a restriction or '
                    f"class; a lookup answers 451 4.3.5 Server configuration error{extra}",
                    where,
                )


def _value_names(value: str) -> list[str]:
    from smtpgate.policy.actions import parse_action

    action = parse_action(value)
    if action.verb != "RESTRICTIONS":
        return []
    return [t for t in RESTRICTION_SEPARATORS.split(value) if t and not t.isdigit()]


def _table_path(table: Table) -> str:
    return str(getattr(table, "path", None) or table.name)
