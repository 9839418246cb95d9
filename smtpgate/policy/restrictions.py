"""Postfix's SMTP restrictions, one function each, registered by their Postfix names.

Every function takes ``(ctx, arg, reply_name, reply_class)`` and returns a
:class:`~smtpgate.policy.model.Status`; replies go through ``ctx.reject`` so that
warn_if_reject, defer_if_reject and soft_bounce apply uniformly.  Texts, codes and
enhanced codes are Postfix 3.7's (``smtpd_check.c``).

A restriction that needs data the stage does not have yet (a recipient at HELO) does
nothing, as in Postfix.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from smtpgate.errors import TableLookupError
from smtpgate.policy.actions import dsn_split
from smtpgate.policy.address import (
    address_keys,
    domain_keys,
    dup_if_truncate,
    ip_keys,
    split_address,
    strip_extension,
    valid_hostaddr,
    valid_hostname,
    valid_mailhost_addr,
)
from smtpgate.policy.dnsbl import (
    TemplateError,
    Zone,
    ZoneError,
    address_query,
    domain_query,
    expand_template,
    parse_zone,
    split_answers,
    split_reply,
    txt_reason,
)
from smtpgate.policy.dsn import smtpd_dsn_fix
from smtpgate.policy.model import (
    CLIENT,
    DUNNO,
    ETRN,
    HELO,
    OK,
    RECIPIENT,
    REV_CLIENT,
    SENDER,
    ErrorClass,
    Status,
)
from smtpgate.policy.ports import DnsAnswer, DnsStatus
from smtpgate.policy.registry import Ctx, known_later, restriction

if TYPE_CHECKING:
    from smtpgate.tables import Table

# -- generic ---------------------------------------------------------------------------


@restriction("permit")
def permit(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    return OK


@restriction("reject")
def reject(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes.reject_code,
        "5.7.1",
        f"<{reply_name}>: {reply_class} rejected: Access denied",
    )


@restriction("defer")
def defer(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes.defer_code,
        "4.3.2",
        f"<{reply_name}>: {reply_class} rejected: Try again later",
    )


@restriction("defer_if_permit")
def defer_if_permit(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    ctx.defer_if_permit(
        ErrorClass.POLICY,
        ctx.plan.codes.defer_code,
        "4.7.0",
        f"<{reply_name}>: {reply_class} rejected: defer_if_permit requested",
    )
    return DUNNO


@restriction("defer_if_reject")
def defer_if_reject(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    ctx.defer_if_reject(
        ErrorClass.POLICY,
        ctx.plan.codes.defer_code,
        "4.7.0",
        f"<{reply_name}>: {reply_class} rejected: defer_if_reject requested",
    )
    return DUNNO


@restriction("reject_unauth_pipelining")
def reject_unauth_pipelining(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    # Postfix (since 2.6) tests a per-session flag that the SMTP layer sets when it logs
    # "improper command pipelining after X": once set, every later use rejects (a HELO
    # client that sent HELO and MAIL in one write is refused at its next, unpipelined,
    # RCPT).  input_pending is the older per-command approximation, kept for an SMTP
    # layer that does not set the flag yet; it is a subset of the flag's cases.
    st = ctx.state
    if st.illegal_pipelining or (
        st.input_pending and (st.protocol.upper() != "ESMTP" or st.where == "DATA")
    ):
        return ctx.reject(
            ErrorClass.PROTOCOL,
            503,
            "5.5.0",
            f"<{reply_name}>: {reply_class} rejected: Improper use of SMTP command pipelining",
        )
    return DUNNO


@restriction("permit_sasl_authenticated")
def permit_sasl_authenticated(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    # smtpgate offers no AUTH (smtpd_sasl_auth_enable = no): nobody is authenticated.
    return DUNNO


# -- client ----------------------------------------------------------------------------


@restriction("permit_mynetworks")
def permit_mynetworks(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    try:
        matched = ctx.plan.mynetworks.match(ctx.state.client.address)
    except TableLookupError:
        return ctx.lookup_failed(ctx.state.client.namaddr)
    return OK if matched else DUNNO


def _namadr_access(ctx: Ctx, table: Table, name: str, reply_class: str) -> Status:
    client = ctx.state.client
    keys = domain_keys(name, ctx.plan.parent_style) + ip_keys(client.address)
    return ctx.check_access(table, keys, name, client.namaddr, reply_class)


@restriction("check_client_access", arg="table")
def check_client_access(ctx: Ctx, table: Table, reply_name: str, reply_class: str) -> Status:
    return _namadr_access(ctx, table, ctx.state.client.name, CLIENT)


@restriction("check_reverse_client_hostname_access", arg="table")
def check_reverse_client_hostname_access(
    ctx: Ctx, table: Table, reply_name: str, reply_class: str
) -> Status:
    return _namadr_access(ctx, table, ctx.state.client.reverse_name, CLIENT)


# -- ETRN ------------------------------------------------------------------------------


@restriction("check_etrn_access", arg="table")
def check_etrn_access(ctx: Ctx, table: Table, reply_name: str, reply_class: str) -> Status:
    """Postfix CHECK_ETRN_ACL: the ETRN domain and its parents (check_domain_access)."""
    domain = ctx.state.etrn_name
    if domain is None:
        return DUNNO
    keys = domain_keys(domain, ctx.plan.parent_style)
    return ctx.check_access(table, keys, domain, domain, ETRN)


# -- HELO ------------------------------------------------------------------------------


@restriction("check_helo_access", arg="table")
def check_helo_access(ctx: Ctx, table: Table, reply_name: str, reply_class: str) -> Status:
    helo = ctx.state.helo_name
    if helo is None:
        return DUNNO
    return ctx.check_access(table, domain_keys(helo, ctx.plan.parent_style), helo, helo, HELO)


def _reject_invalid_hostaddr(ctx: Ctx, addr: str, reply_name: str, reply_class: str) -> Status:
    inner = addr[1:-1] if len(addr) > 2 and addr[0] == "[" and addr[-1] == "]" else addr
    if valid_mailhost_addr(inner):
        return DUNNO
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes.invalid_hostname_reject_code,
        "5.5.2",
        f"<{reply_name}>: {reply_class} rejected: invalid ip address",
    )


@restriction("reject_invalid_helo_hostname", "reject_invalid_hostname")
def reject_invalid_helo_hostname(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    helo = ctx.state.helo_name
    if helo is None:
        return DUNNO
    if helo.startswith("["):
        return _reject_invalid_hostaddr(ctx, helo, helo, HELO)
    name = dup_if_truncate(helo)
    if valid_hostname(name) or valid_hostaddr(name):
        return DUNNO
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes.invalid_hostname_reject_code,
        "5.5.2",
        f"<{helo}>: {HELO} rejected: Invalid name",
    )


@restriction("reject_non_fqdn_helo_hostname", "reject_non_fqdn_hostname")
def reject_non_fqdn_helo_hostname(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    helo = ctx.state.helo_name
    if helo is None:
        return DUNNO
    if helo.startswith("["):
        return _reject_invalid_hostaddr(ctx, helo, helo, HELO)
    name = dup_if_truncate(helo)
    if valid_hostname(name) and "." in name:
        return DUNNO
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes.non_fqdn_reject_code,
        "5.5.2",
        f"<{helo}>: {HELO} rejected: need fully-qualified hostname",
    )


# -- addresses -------------------------------------------------------------------------


def _mail_access(ctx: Ctx, table: Table, addr: str, reply_class: str) -> Status:
    """Postfix check_mail_access: keys of the resolved address."""
    plan = ctx.plan
    resolved = plan.resolver.resolve(addr)
    if "@" not in resolved.address:
        return DUNNO
    keys = address_keys(resolved.address, plan.recipient_delimiter, plan.parent_style)
    suspicious = not plan.allow_untrusted_routing and resolved.routed and reply_class == RECIPIENT
    return ctx.check_access(table, keys, resolved.address, addr, reply_class, suspicious)


@restriction("check_sender_access", arg="table")
def check_sender_access(ctx: Ctx, table: Table, reply_name: str, reply_class: str) -> Status:
    sender = ctx.state.sender
    if sender is None:
        return DUNNO
    if sender:
        return _mail_access(ctx, table, sender, SENDER)
    key = ctx.plan.null_access_lookup_key
    return ctx.check_access(table, [(key, False)], key, sender, SENDER)


@restriction("check_recipient_access", arg="table")
def check_recipient_access(ctx: Ctx, table: Table, reply_name: str, reply_class: str) -> Status:
    rcpt = ctx.state.recipient
    if rcpt is None:
        return DUNNO
    return _mail_access(ctx, table, rcpt, RECIPIENT)


def _reject_non_fqdn_address(ctx: Ctx, addr: str, reply_class: str) -> Status:
    _, domain = split_address(addr)
    if "@" not in addr:
        domain = ""
    if domain.startswith("[") and domain.endswith("]"):
        return DUNNO
    test = dup_if_truncate(domain)
    if test and valid_hostname(test) and "." in test:
        return DUNNO
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes.non_fqdn_reject_code,
        "4.5.2",
        f"<{addr}>: {reply_class} rejected: need fully-qualified address",
    )


@restriction("reject_non_fqdn_sender")
def reject_non_fqdn_sender(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    sender = ctx.state.sender
    if not sender:
        return DUNNO
    return _reject_non_fqdn_address(ctx, sender, SENDER)


@restriction("reject_non_fqdn_recipient")
def reject_non_fqdn_recipient(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    rcpt = ctx.state.recipient
    if rcpt is None:
        return DUNNO
    return _reject_non_fqdn_address(ctx, rcpt, RECIPIENT)


_NEVER_UNKNOWN = ("double-bounce", "postmaster", "mailer-daemon")


def _rcpt_map_keys(address: str, delimiter: str, local: bool) -> list[str]:
    """mail_addr_find's keys: user+ext@domain, user@domain, [user+ext, user,] @domain."""
    localpart, domain = split_address(address)
    bare = strip_extension(localpart, delimiter)
    keys = [address]
    if bare is not None:
        keys.append(f"{bare}@{domain}")
    if local:
        keys.append(localpart)
        if bare is not None:
            keys.append(bare)
    keys.append(f"@{domain}")
    return keys


def check_rcpt_maps(ctx: Ctx, addr: str, reply_class: str) -> Status:
    """Reject an address of a local or relay domain that its recipient tables lack."""
    plan = ctx.plan
    resolved = plan.resolver.resolve(addr)
    local = resolved.klass == "local"  # a StrEnum: no .value (a descriptor call in 3.11)
    maps = plan.local_recipient_maps if local else plan.relay_recipient_maps
    if resolved.klass not in ("local", "relay") or maps is None:
        return DUNNO
    localpart = split_address(resolved.address)[0]
    if local and localpart.lower() in _NEVER_UNKNOWN:
        return DUNNO
    title = "local recipient table" if local else "relay recipient table"
    try:
        for i, key in enumerate(_rcpt_map_keys(resolved.address, plan.recipient_delimiter, local)):
            value = maps.find(key, partial=i > 0)
            ctx.note(maps.title, key, "not found" if value is None else "found")
            if value is not None:
                return DUNNO
    except TableLookupError:
        return ctx.lookup_failed(addr)
    codes = plan.codes
    code = (
        codes.unknown_local_recipient_reject_code
        if local
        else codes.unknown_relay_recipient_reject_code
    )
    where = f" in {title}" if plan.show_unknown_table_name else ""
    return ctx.reject(
        ErrorClass.BOUNCE,
        code,
        "5.1.0" if reply_class == SENDER else "5.1.1",
        f"<{addr}>: {reply_class} rejected: User unknown{where}",
    )


@restriction("reject_unlisted_sender")
def reject_unlisted_sender(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    st = ctx.state
    if not st.sender or st.sender_rcptmap_checked:
        return DUNNO
    st.sender_rcptmap_checked = True
    return check_rcpt_maps(ctx, st.sender, SENDER)


@restriction("reject_unlisted_recipient", "check_recipient_maps")
def reject_unlisted_recipient(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    st = ctx.state
    if not st.recipient or st.recipient_rcptmap_checked:
        return DUNNO
    st.recipient_rcptmap_checked = True
    return check_rcpt_maps(ctx, st.recipient, RECIPIENT)


# -- relay control ---------------------------------------------------------------------


def _auth_destination(ctx: Ctx, recipient: str) -> bool:
    """Postfix permit_auth_destination: a local or relay domain, not source-routed."""
    plan = ctx.plan
    try:
        resolved = plan.resolver.resolve(recipient)
    except TableLookupError:
        ctx.lookup_failed(recipient)
        return False
    if "@" not in resolved.address:
        return True
    if not plan.allow_untrusted_routing and resolved.routed:
        ctx.note("resolve", resolved.address, "source-routed: not an authorized destination")
        return False
    ctx.note("resolve", resolved.address, f"class {resolved.klass}")
    return resolved.klass in ("local", "relay")


@restriction("permit_auth_destination")
def permit_auth_destination(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    rcpt = ctx.state.recipient
    if rcpt is None:
        return DUNNO
    return OK if _auth_destination(ctx, rcpt) else DUNNO


def _unauth_destination(ctx: Ctx, code: int, dsn: str) -> Status:
    rcpt = ctx.state.recipient
    if rcpt is None or _auth_destination(ctx, rcpt):
        return DUNNO
    return ctx.reject(ErrorClass.POLICY, code, dsn, f"<{rcpt}>: Relay access denied")


@restriction("reject_unauth_destination")
def reject_unauth_destination(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    return _unauth_destination(ctx, ctx.plan.codes.relay_domains_reject_code, "5.7.1")


@restriction("defer_unauth_destination")
def defer_unauth_destination(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    return _unauth_destination(ctx, ctx.plan.codes.relay_domains_reject_code - 100, "4.7.1")


@restriction("reject_multi_recipient_bounce")
def reject_multi_recipient_bounce(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    st = ctx.state
    limit = 1 if st.where == "DATA" else 0
    if st.sender == "" and st.rcpt_count > limit:
        return ctx.reject(
            ErrorClass.POLICY,
            ctx.plan.codes.multi_recipient_bounce_reject_code,
            "5.5.3",
            f"<{reply_name}>: {reply_class} rejected: Multi-recipient bounce",
        )
    return DUNNO


# -- DNS (issue 6) ------------------------------------------------------------------------
#
# Postfix 3.7 smtpd_check.c: reject_unknown_client / reject_unknown_reverse_name,
# reject_unknown_hostname, reject_unknown_mailhost / reject_unknown_address,
# find_dnsxl_addr / find_dnsxl_domain / rbl_reject_reply / permit_dnswl_*,
# check_server_access and forbid_allowlist.  Lookups go through ``ctx.dns`` (the
# resolver port); statuses combine as in dns_lookup_rl(): the best status wins, in
# Postfix's precedence order OK > RETRY > INVAL > NULLMX > NOTFOUND.


class _Dns(IntEnum):
    NOTFOUND = -7
    NULLMX = -5
    INVAL = -3
    RETRY = -2
    OK = 0


# Postfix dns_strerror() texts for h_errno values.
_H_ERRNO = {
    DnsStatus.NXDOMAIN: "Host not found",
    DnsStatus.NODATA: "Host found but no data record of requested type",
    DnsStatus.TEMPFAIL: "Host not found, try again",
}


def _dns_status(answer: DnsAnswer) -> _Dns:
    if answer.temporary:
        return _Dns.RETRY
    if not answer.ok:
        return _Dns.NOTFOUND
    if answer.rdtype in ("MX", "NS", "PTR", "CNAME"):
        hosts = [r.partition(" ")[2] if answer.rdtype == "MX" else r for r in answer.records]
        if answer.rdtype == "MX" and any(h == "" for h in hosts):
            return _Dns.NULLMX
        if not any(valid_hostname(h) or valid_hostaddr(h) for h in hosts):
            return _Dns.INVAL
    return _Dns.OK


async def _dns_lookup_l(ctx: Ctx, name: str, types: tuple[str, ...], stop: set[_Dns]) -> _Dns:
    """Postfix dns_lookup_l(): try ``types`` in order; stop at a status in ``stop``."""
    if valid_hostaddr(name) or not valid_hostname(name):
        ctx.note("dns", name, "not looked up: invalid host or domain name")
        return _Dns.NOTFOUND
    best: _Dns | None = None
    for rdtype in types:
        status = _dns_status(await ctx.dns(name, rdtype))
        if status in stop:
            return status
        best = status if best is None else max(best, status)
    assert best is not None
    return best


def _ascii(domain: str) -> str:
    """Postfix midna_domain_to_ascii() for a non-ASCII domain (unchanged on failure)."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _tempfail(ctx: Ctx, action: str, code: int, dsn: str, text: str) -> Status:
    """Postfix DEFER_IF_PERMIT2(action, ...): a saved deferral, or an immediate one."""
    if action == "defer_if_permit":
        ctx.defer_if_permit(ErrorClass.POLICY, code, dsn, text)
        return DUNNO
    return ctx.reject(ErrorClass.POLICY, code, dsn, text)


# -- client names (the names themselves are looked up at connect: policy/peer.py) --


@restriction("reject_unknown_client_hostname", "reject_unknown_client")
def reject_unknown_client_hostname(
    ctx: Ctx, arg: None, reply_name: str, reply_class: str
) -> Status:
    client = ctx.state.client
    if client.name_status == "ok":
        return DUNNO
    code = 450 if client.name_status == "temp" else ctx.plan.codes.unknown_client_reject_code
    return ctx.reject(
        ErrorClass.POLICY,
        code,
        "4.7.25",
        f"Client host rejected: cannot find your hostname, [{client.address}]",
    )


@restriction("reject_unknown_reverse_client_hostname")
def reject_unknown_reverse_client_hostname(
    ctx: Ctx, arg: None, reply_name: str, reply_class: str
) -> Status:
    client = ctx.state.client
    if client.reverse_name_status == "ok":
        return DUNNO
    perm = client.reverse_name_status != "temp"
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes.unknown_client_reject_code if perm else 450,
        "4.7.1",
        f"Client host rejected: cannot find your reverse hostname, [{client.address}]",
    )


# -- unknown names ------------------------------------------------------------------


async def _reject_unknown_hostname(ctx: Ctx, name: str, reply_name: str, klass: str) -> Status:
    status = await _dns_lookup_l(ctx, name, ("A", "AAAA", "MX"), {_Dns.OK})
    if status in (_Dns.OK, _Dns.NULLMX):  # MTA names may have a null MX
        return DUNNO
    if status is not _Dns.RETRY:
        why = "Malformed DNS server reply" if status is _Dns.INVAL else "Host not found"
        return ctx.reject(
            ErrorClass.POLICY,
            ctx.plan.codes.unknown_hostname_reject_code,
            "4.7.1",
            f"<{reply_name}>: {klass} rejected: {why}",
        )
    return _tempfail(
        ctx,
        ctx.plan.dns.unknown_helo_hostname_tempfail_action,
        450,
        "4.7.1",
        f"<{reply_name}>: {klass} rejected: Host not found",
    )


@restriction("reject_unknown_helo_hostname", "reject_unknown_hostname")
async def reject_unknown_helo_hostname(
    ctx: Ctx, arg: None, reply_name: str, reply_class: str
) -> Status:
    helo = ctx.state.helo_name
    if helo is None:
        return DUNNO
    if helo.startswith("["):
        return _reject_invalid_hostaddr(ctx, helo, helo, HELO)
    return await _reject_unknown_hostname(ctx, helo, helo, HELO)


async def _reject_unknown_mailhost(ctx: Ctx, name: str, reply_name: str, klass: str) -> Status:
    name = _ascii(name)
    stop = {_Dns.OK, _Dns.INVAL, _Dns.NULLMX}
    status = await _dns_lookup_l(ctx, name, ("MX", "A", "AAAA"), stop)
    if status is _Dns.OK:
        return DUNNO
    sender = klass == SENDER
    if status is _Dns.NULLMX:
        return ctx.reject(
            ErrorClass.POLICY,
            550 if sender else 556,
            "4.7.27" if sender else "4.1.10",
            f"<{reply_name}>: {klass} rejected: Domain {name} does not accept mail (nullMX)",
        )
    dsn = "4.1.8" if sender else "4.1.2"
    if status is not _Dns.RETRY:
        why = "Malformed DNS server reply" if status is _Dns.INVAL else "Domain not found"
        return ctx.reject(
            ErrorClass.POLICY,
            ctx.plan.codes.unknown_address_reject_code,
            dsn,
            f"<{reply_name}>: {klass} rejected: {why}",
        )
    return _tempfail(
        ctx,
        ctx.plan.dns.unknown_address_tempfail_action,
        450,
        dsn,
        f"<{reply_name}>: {klass} rejected: Domain not found",
    )


async def _reject_unknown_address(ctx: Ctx, addr: str, klass: str) -> Status:
    """Skip our own domains and address literals; look the rest up in DNS."""
    try:
        resolved = ctx.plan.resolver.resolve(addr)
    except TableLookupError:
        return ctx.lookup_failed(addr)
    if "@" not in resolved.address:
        return DUNNO
    domain = resolved.address.rpartition("@")[2]
    if resolved.final or (domain.startswith("[") and domain.endswith("]")):
        return DUNNO
    return await _reject_unknown_mailhost(ctx, domain, addr, klass)


@restriction("reject_unknown_sender_domain", "reject_unknown_address")
async def reject_unknown_sender_domain(
    ctx: Ctx, arg: None, reply_name: str, reply_class: str
) -> Status:
    sender = ctx.state.sender
    if not sender:
        return DUNNO
    return await _reject_unknown_address(ctx, sender, SENDER)


@restriction("reject_unknown_recipient_domain")
async def reject_unknown_recipient_domain(
    ctx: Ctx, arg: None, reply_name: str, reply_class: str
) -> Status:
    rcpt = ctx.state.recipient
    if rcpt is None:
        return DUNNO
    return await _reject_unknown_address(ctx, rcpt, RECIPIENT)


# -- DNS block and allow lists ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Listing:
    kind: str  # "none", "soft" (temporary failure) or "listed"
    reason: str = ""


async def _find_dnsxl(ctx: Ctx, zone: Zone, query: str | None) -> _Listing:
    """Postfix find_dnsxl_addr/find_dnsxl_domain, with smtpgate's answer validation."""
    if query is None:
        return _Listing("none")
    answer = await ctx.dns(query, "A")
    if answer.temporary:
        ctx.warn(
            f"{query}: RBL lookup error: Host or domain name not found. "
            f"Name service error for name={query} type=A: Host not found, try again"
        )
        return _Listing("soft")
    if not answer.ok:
        return _Listing("none")
    good, bad = split_answers(answer.records)
    if bad:
        ctx.warn(
            f"{query}: RBL lookup error: {zone.domain} answered {', '.join(bad)}: a list "
            "error code, not a listing (only 127.0.0.0/8 counts; 127.0.0.1 and "
            "127.255.255.0/24 are errors)"
        )
    if not any(zone.matches(a) for a in good):
        if good:
            ctx.note("reply filter", zone.pattern or "", f"{', '.join(good)}: no match")
        return _Listing("none")
    txt = await ctx.dns(query, "TXT")
    return _Listing("listed", txt_reason(txt.records) if txt.ok else "")


def _zone(ctx: Ctx, text: str) -> Zone:
    try:
        return parse_zone(text)
    except ZoneError as exc:
        ctx.config_error(f"RBL reply error: {exc}")
        raise AssertionError("config_error returns only by raising") from None


def _rbl_tempfail(ctx: Ctx, what: str, reply_class: str) -> Status:
    action = ctx.plan.dns.rbl_tempfail_action
    if action == "dunno":
        return DUNNO
    return _tempfail(
        ctx, action, 450, "4.7.1", f"<{what}>: {reply_class} rejected: Service unavailable"
    )


def _expand_addr(addr: str | None, suffix: str) -> str | None:
    """Postfix smtpd_expand_addr: $sender, $sender_name, $sender_domain (and recipient)."""
    if addr is None:
        return ""
    local, at, domain = addr.rpartition("@")
    if suffix == "":
        return addr or "<>"
    if suffix == "_name":
        return (local if at else addr) or "<>"
    if suffix == "_domain":
        return domain if at else ""
    return None


def _rbl_macros(ctx: Ctx, zone: Zone, what: str, reply_class: str, txt: str) -> dict[str, str]:
    st = ctx.state
    client = st.client
    return {
        "rbl_code": str(ctx.plan.codes.maps_rbl_reject_code),
        "rbl_domain": zone.domain,
        "rbl_reason": txt,
        "rbl_txt": txt,
        "rbl_what": what,
        "rbl_class": reply_class,
        "client": client.namaddr,
        "client_address": client.address,
        "client_name": client.name,
        "reverse_client_name": client.reverse_name,
        "client_port": str(client.port),
        "helo_name": st.helo_name or "",
    }


def _rbl_reject_reply(ctx: Ctx, zone: Zone, what: str, reply_class: str, txt: str) -> Status:
    """Postfix rbl_reject_reply(): the rbl_reply_maps or default_rbl_reply template."""
    dns = ctx.plan.dns
    template: str | None = None
    if dns.rbl_reply_maps is not None:
        try:
            template = dns.rbl_reply_maps.find(zone.text)
        except TableLookupError as exc:
            ctx.config_error(str(exc))
    macros = _rbl_macros(ctx, zone, what, reply_class, txt)
    st = ctx.state

    def value(name: str) -> str | None:
        if name in macros:
            return macros[name]
        if name.startswith("sender"):
            return _expand_addr(st.sender, name[len("sender") :])
        if name.startswith("recipient"):
            return _expand_addr(st.recipient, name[len("recipient") :])
        return None

    while True:
        current = template if template is not None else dns.default_rbl_reply
        try:
            why = expand_template(current, value, dns.expansion_filter, ctx.warn)
            break
        except TemplateError:
            if template is None:
                return ctx.config_error(
                    f"rbl_reject_reply: bad default rbl reply template: {current}"
                )
            ctx.warn(f"rbl_reject_reply: bad rbl reply template for domain {zone.text}: {current}")
            template = None
    parsed = split_reply(why)
    if parsed is None:
        ctx.warn(f"rbl response code configuration error: {why}")
        return ctx.reject(ErrorClass.POLICY, 450, "4.7.1", "Service unavailable")
    code, rest = parsed
    dsn, text = dsn_split("4.7.1", rest)
    return ctx.reject(
        ErrorClass.POLICY, code, smtpd_dsn_fix(dsn, reply_class), text or "Service unavailable"
    )


async def _reject_rbl_addr(ctx: Ctx, zone_text: str, addr: str, reply_class: str) -> Status:
    zone = _zone(ctx, zone_text)
    listing = await _find_dnsxl(ctx, zone, address_query(addr, zone))
    if listing.kind == "soft":
        return _rbl_tempfail(ctx, addr, reply_class)
    if listing.kind == "none":
        return DUNNO
    return _rbl_reject_reply(ctx, zone, addr, reply_class, listing.reason)


async def _reject_rbl_domain(ctx: Ctx, zone_text: str, what: str, reply_class: str) -> Status:
    zone = _zone(ctx, zone_text)
    listing = await _find_dnsxl(ctx, zone, domain_query(what, zone))
    if listing.kind == "soft":
        return _rbl_tempfail(ctx, what, reply_class)
    if listing.kind == "none":
        return DUNNO
    return _rbl_reject_reply(ctx, zone, what, reply_class, listing.reason)


async def _permit_dnswl(ctx: Ctx, zone: Zone, query: str | None, what: str, klass: str) -> Status:
    st = ctx.state
    # Safety: never allowlist a recipient we would not relay for.
    if st.where == "RCPT" and st.recipient is not None and not _auth_destination(ctx, st.recipient):
        return DUNNO
    listing = await _find_dnsxl(ctx, zone, query)
    if listing.kind == "soft":
        ctx.defer_if_reject(
            ErrorClass.POLICY, 450, "4.7.1", f"<{what}>: {klass} rejected: Service unavailable"
        )
        return DUNNO
    return OK if listing.kind == "listed" else DUNNO


@restriction("reject_rbl_client", "reject_rbl", arg="zone")
async def reject_rbl_client(ctx: Ctx, zone: str, reply_name: str, reply_class: str) -> Status:
    return await _reject_rbl_addr(ctx, zone, ctx.state.client.address, CLIENT)


@restriction("permit_dnswl_client", arg="zone")
async def permit_dnswl_client(ctx: Ctx, zone: str, reply_name: str, reply_class: str) -> Status:
    parsed = _zone(ctx, zone)
    addr = ctx.state.client.address
    return await _permit_dnswl(ctx, parsed, address_query(addr, parsed), addr, CLIENT)


@restriction("reject_rhsbl_client", arg="zone")
async def reject_rhsbl_client(ctx: Ctx, zone: str, reply_name: str, reply_class: str) -> Status:
    name = ctx.state.client.name
    if name.lower() == "unknown":
        return DUNNO
    return await _reject_rbl_domain(ctx, zone, name, CLIENT)


@restriction("permit_rhswl_client", arg="zone")
async def permit_rhswl_client(ctx: Ctx, zone: str, reply_name: str, reply_class: str) -> Status:
    name = ctx.state.client.name
    if name.lower() == "unknown":
        return DUNNO
    parsed = _zone(ctx, zone)
    return await _permit_dnswl(ctx, parsed, domain_query(name, parsed), name, CLIENT)


@restriction("reject_rhsbl_reverse_client", arg="zone")
async def reject_rhsbl_reverse_client(
    ctx: Ctx, zone: str, reply_name: str, reply_class: str
) -> Status:
    name = ctx.state.client.reverse_name
    if name.lower() == "unknown":
        return DUNNO
    return await _reject_rbl_domain(ctx, zone, name, REV_CLIENT)


@restriction("reject_rhsbl_helo", arg="zone")
async def reject_rhsbl_helo(ctx: Ctx, zone: str, reply_name: str, reply_class: str) -> Status:
    helo = ctx.state.helo_name
    if helo is None:
        return DUNNO
    return await _reject_rbl_domain(ctx, zone, helo, HELO)


@restriction("reject_rhsbl_sender", arg="zone")
async def reject_rhsbl_sender(ctx: Ctx, zone: str, reply_name: str, reply_class: str) -> Status:
    sender = ctx.state.sender
    if not sender:
        return DUNNO
    return await _reject_rbl_domain(ctx, zone, sender, SENDER)


@restriction("reject_rhsbl_recipient", arg="zone")
async def reject_rhsbl_recipient(ctx: Ctx, zone: str, reply_name: str, reply_class: str) -> Status:
    rcpt = ctx.state.recipient
    if rcpt is None:
        return DUNNO
    return await _reject_rbl_domain(ctx, zone, rcpt, RECIPIENT)


# -- name-server checks (check_server_access) ------------------------------------------


async def _host_addresses(ctx: Ctx, host: str) -> tuple[list[str], str]:
    """Postfix hostname_to_sockaddr(): A and AAAA; on failure a gai_strerror() text."""
    answers = [await ctx.dns(host, rdtype) for rdtype in ("A", "AAAA")]
    addrs = [a for answer in answers if answer.ok for a in answer.records]
    if addrs:
        return addrs, ""
    statuses = {a.status for a in answers}
    if DnsStatus.TEMPFAIL in statuses:
        return [], "Temporary failure in name resolution"
    if DnsStatus.NODATA in statuses:
        return [], "No address associated with hostname"
    return [], "Name or service not known"


async def _server_list(ctx: Ctx, domain: str, name: str, rdtype: str) -> list[str] | None:
    """The MX or NS hosts of ``domain`` (MX: the domain itself when it has none)."""
    answer = await ctx.dns(domain, rdtype)
    status = _dns_status(answer)
    where: str | None = domain
    if status is _Dns.NULLMX:
        return None
    if status is _Dns.NOTFOUND:
        if rdtype == "MX":
            return [domain]
        while where is not None:
            dot = where.find(".")
            if dot < 0 or dot + 1 >= len(where):
                where = None
                break
            where = where[dot + 1 :]
            answer = await ctx.dns(where, rdtype)
            status = _dns_status(answer)
            if status is not _Dns.NOTFOUND:
                break
    if status is not _Dns.OK:
        why = (
            _H_ERRNO.get(answer.status, "Unknown error 0")
            if status is not _Dns.INVAL
            else ("Unknown error 0")
        )
        ctx.warn(f"Unable to look up {rdtype} host for {where if where else name}: {why}")
        return None
    if rdtype == "MX":
        return [r.partition(" ")[2] for r in answer.records]
    return list(answer.records)


async def _check_server_access(
    ctx: Ctx, table: Table, name: str, rdtype: str, reply_name: str, reply_class: str
) -> Status:
    """Postfix check_server_access(): the name's MX, NS or A hosts against ``table``."""
    _, at, domain = name.rpartition("@")
    if not at:
        domain = name
    if domain.startswith("["):
        if rdtype not in ("A", "MX") or not domain.endswith("]"):
            return DUNNO
        inner = domain[1:-1]
        if not valid_mailhost_addr(inner):
            return DUNNO
        bare = inner[5:] if inner[:5].lower() == "ipv6:" else inner
        return ctx.check_access(table, ip_keys(bare), bare, reply_name, reply_class)
    domain = _ascii(domain)
    servers = [domain] if rdtype == "A" else await _server_list(ctx, domain, name, rdtype)
    for server in servers or ():
        if valid_hostaddr(server):
            status = ctx.check_access(table, ip_keys(server), server, reply_name, reply_class)
            if status is not DUNNO or ctx.found:
                return status
            continue
        if rdtype != "A":
            keys = domain_keys(server, ctx.plan.parent_style)
            status = ctx.check_access(table, keys, server, reply_name, reply_class)
            if status is not DUNNO or ctx.found:
                return status
        addrs, why = await _host_addresses(ctx, server)
        if not addrs and rdtype != "A":
            ctx.warn(
                f"Unable to look up {rdtype} host {server} for {reply_class} {reply_name}: {why}"
            )
        for addr in addrs:
            status = ctx.check_access(table, ip_keys(addr), addr, reply_name, reply_class)
            if status is not DUNNO or ctx.found:
                return status
    return DUNNO


def _forbid_allowlist(ctx: Ctx, name: str, status: Status, target: str) -> Status:
    """Postfix forbid_allowlist(): these checks may reject, never permit."""
    if not ctx.state.discard and status is OK:
        ctx.warn(f"restriction {name} returns OK for {target}")
        ctx.warn("this is not allowed for security reasons")
        return ctx.config_error("use DUNNO instead of OK if you want to make an exception")
    return status


def _server_subject(ctx: Ctx, subject: str) -> tuple[str, str, str] | None:
    """(name to look up, reply name, reply class) for a check_<subject>_*_access."""
    st = ctx.state
    client = st.client
    if subject == "client":
        if client.name.lower() == "unknown":
            return None
        return client.name, client.namaddr, CLIENT
    if subject == "reverse_client_hostname":
        if client.reverse_name.lower() == "unknown":
            return None
        return client.reverse_name, client.reverse_name, REV_CLIENT
    if subject == "helo":
        return None if st.helo_name is None else (st.helo_name, st.helo_name, HELO)
    if subject == "sender":
        return (st.sender, st.sender, SENDER) if st.sender else None
    return (st.recipient, st.recipient, RECIPIENT) if st.recipient else None


def _register_server_check(subject: str, kind: str) -> None:
    restriction_name = f"check_{subject}_{kind}_access"
    rdtype = kind.upper()

    async def check(ctx: Ctx, table: Table, reply_name: str, reply_class: str) -> Status:
        facts = _server_subject(ctx, subject)
        if facts is None:
            return DUNNO
        name, rname, klass = facts
        status = await _check_server_access(ctx, table, name, rdtype, rname, klass)
        target = name if subject != "client" else ctx.state.client.name
        return _forbid_allowlist(ctx, restriction_name, status, target)

    check.__name__ = check.__qualname__ = restriction_name
    restriction(restriction_name, arg="table")(check)


for _subject in ("client", "reverse_client_hostname", "helo", "sender", "recipient"):
    for _kind in ("mx", "ns", "a"):
        _register_server_check(_subject, _kind)


# -- known to smtpgate, implemented by a later issue ------------------------------------

_INTERFACES = "smtpgate does not know this host's interface addresses"
known_later(_INTERFACES, "none", "permit_mx_backup", "permit_inet_interfaces")
known_later(
    "smtpgate verifies recipients only (reject_unverified_recipient): verifying a sender "
    "would probe the sender's own MX on the internet",
    "none",
    "reject_unverified_sender",
)
_SASL = "smtpgate has no SASL (SMTP AUTH)"
known_later(
    _SASL,
    "none",
    "reject_sender_login_mismatch",
    "reject_authenticated_sender_login_mismatch",
    "reject_known_sender_login_mismatch",
    "reject_unauthenticated_sender_login_mismatch",
)
known_later(_SASL, "table", "check_sasl_access")
_CCERT = "smtpgate does not check client TLS certificates"
known_later(_CCERT, "none", "permit_tls_clientcerts", "permit_tls_all_clientcerts")
known_later(_CCERT, "table", "check_ccert_access")
known_later("smtpgate has no TLS-only restriction yet", "none", "reject_plaintext_session")
known_later(
    "smtpgate does not look up the client's forward name separately",
    "none",
    "reject_unknown_forward_client_hostname",
)
# The argument is seconds, not a zone; "zone" only tells the compiler that one word follows.
known_later("smtpgate does not pause sessions on request", "zone", "sleep")
