"""Postfix's SMTP restrictions, one function each, registered by their Postfix names.

Every function takes ``(ctx, arg, reply_name, reply_class)`` and returns a
:class:`~smtpgate.policy.model.Status`; replies go through ``ctx.reject`` so that
warn_if_reject, defer_if_reject and soft_bounce apply uniformly.  Texts, codes and
enhanced codes are Postfix 3.7's (``smtpd_check.c``).

A restriction that needs data the stage does not have yet (a recipient at HELO) does
nothing, as in Postfix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smtpgate.errors import TableLookupError
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
from smtpgate.policy.model import (
    CLIENT,
    HELO,
    RECIPIENT,
    SENDER,
    ErrorClass,
    Status,
)
from smtpgate.policy.registry import Ctx, known_later, restriction

if TYPE_CHECKING:
    from smtpgate.tables import Table

# -- generic ---------------------------------------------------------------------------


@restriction("permit")
def permit(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    return Status.OK


@restriction("reject")
def reject(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes["reject_code"],
        "5.7.1",
        f"<{reply_name}>: {reply_class} rejected: Access denied",
    )


@restriction("defer")
def defer(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes["defer_code"],
        "4.3.2",
        f"<{reply_name}>: {reply_class} rejected: Try again later",
    )


@restriction("defer_if_permit")
def defer_if_permit(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    ctx.defer_if_permit(
        ErrorClass.POLICY,
        ctx.plan.codes["defer_code"],
        "4.7.0",
        f"<{reply_name}>: {reply_class} rejected: defer_if_permit requested",
    )
    return Status.DUNNO


@restriction("defer_if_reject")
def defer_if_reject(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    ctx.defer_if_reject(
        ErrorClass.POLICY,
        ctx.plan.codes["defer_code"],
        "4.7.0",
        f"<{reply_name}>: {reply_class} rejected: defer_if_reject requested",
    )
    return Status.DUNNO


@restriction("reject_unauth_pipelining")
def reject_unauth_pipelining(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    st = ctx.state
    if st.input_pending and (st.protocol.upper() != "ESMTP" or st.where == "DATA"):
        return ctx.reject(
            ErrorClass.PROTOCOL,
            503,
            "5.5.0",
            f"<{reply_name}>: {reply_class} rejected: Improper use of SMTP command pipelining",
        )
    return Status.DUNNO


@restriction("permit_sasl_authenticated")
def permit_sasl_authenticated(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    # smtpgate offers no AUTH (smtpd_sasl_auth_enable = no): nobody is authenticated.
    return Status.DUNNO


# -- client ----------------------------------------------------------------------------


@restriction("permit_mynetworks")
def permit_mynetworks(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    try:
        matched = ctx.plan.mynetworks.match(ctx.state.client.address)
    except TableLookupError:
        return ctx.lookup_failed(ctx.state.client.namaddr)
    return Status.OK if matched else Status.DUNNO


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


# -- HELO ------------------------------------------------------------------------------


@restriction("check_helo_access", arg="table")
def check_helo_access(ctx: Ctx, table: Table, reply_name: str, reply_class: str) -> Status:
    helo = ctx.state.helo_name
    if helo is None:
        return Status.DUNNO
    return ctx.check_access(table, domain_keys(helo, ctx.plan.parent_style), helo, helo, HELO)


def _reject_invalid_hostaddr(ctx: Ctx, addr: str, reply_name: str, reply_class: str) -> Status:
    inner = addr[1:-1] if len(addr) > 2 and addr[0] == "[" and addr[-1] == "]" else addr
    if valid_mailhost_addr(inner):
        return Status.DUNNO
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes["invalid_hostname_reject_code"],
        "5.5.2",
        f"<{reply_name}>: {reply_class} rejected: invalid ip address",
    )


@restriction("reject_invalid_helo_hostname", "reject_invalid_hostname")
def reject_invalid_helo_hostname(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    helo = ctx.state.helo_name
    if helo is None:
        return Status.DUNNO
    if helo.startswith("["):
        return _reject_invalid_hostaddr(ctx, helo, helo, HELO)
    name = dup_if_truncate(helo)
    if valid_hostname(name) or valid_hostaddr(name):
        return Status.DUNNO
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes["invalid_hostname_reject_code"],
        "5.5.2",
        f"<{helo}>: {HELO} rejected: Invalid name",
    )


@restriction("reject_non_fqdn_helo_hostname", "reject_non_fqdn_hostname")
def reject_non_fqdn_helo_hostname(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    helo = ctx.state.helo_name
    if helo is None:
        return Status.DUNNO
    if helo.startswith("["):
        return _reject_invalid_hostaddr(ctx, helo, helo, HELO)
    name = dup_if_truncate(helo)
    if valid_hostname(name) and "." in name:
        return Status.DUNNO
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes["non_fqdn_reject_code"],
        "5.5.2",
        f"<{helo}>: {HELO} rejected: need fully-qualified hostname",
    )


# -- addresses -------------------------------------------------------------------------


def _mail_access(ctx: Ctx, table: Table, addr: str, reply_class: str) -> Status:
    """Postfix check_mail_access: keys of the resolved address."""
    plan = ctx.plan
    resolved = plan.resolver.resolve(addr)
    if "@" not in resolved.address:
        return Status.DUNNO
    keys = address_keys(resolved.address, plan.recipient_delimiter, plan.parent_style)
    suspicious = not plan.allow_untrusted_routing and resolved.routed and reply_class == RECIPIENT
    return ctx.check_access(table, keys, resolved.address, addr, reply_class, suspicious)


@restriction("check_sender_access", arg="table")
def check_sender_access(ctx: Ctx, table: Table, reply_name: str, reply_class: str) -> Status:
    sender = ctx.state.sender
    if sender is None:
        return Status.DUNNO
    if sender:
        return _mail_access(ctx, table, sender, SENDER)
    key = ctx.plan.null_access_lookup_key
    return ctx.check_access(table, [(key, False)], key, sender, SENDER)


@restriction("check_recipient_access", arg="table")
def check_recipient_access(ctx: Ctx, table: Table, reply_name: str, reply_class: str) -> Status:
    rcpt = ctx.state.recipient
    if rcpt is None:
        return Status.DUNNO
    return _mail_access(ctx, table, rcpt, RECIPIENT)


def _reject_non_fqdn_address(ctx: Ctx, addr: str, reply_class: str) -> Status:
    _, domain = split_address(addr)
    if "@" not in addr:
        domain = ""
    if domain.startswith("[") and domain.endswith("]"):
        return Status.DUNNO
    test = dup_if_truncate(domain)
    if test and valid_hostname(test) and "." in test:
        return Status.DUNNO
    return ctx.reject(
        ErrorClass.POLICY,
        ctx.plan.codes["non_fqdn_reject_code"],
        "4.5.2",
        f"<{addr}>: {reply_class} rejected: need fully-qualified address",
    )


@restriction("reject_non_fqdn_sender")
def reject_non_fqdn_sender(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    sender = ctx.state.sender
    if not sender:
        return Status.DUNNO
    return _reject_non_fqdn_address(ctx, sender, SENDER)


@restriction("reject_non_fqdn_recipient")
def reject_non_fqdn_recipient(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    rcpt = ctx.state.recipient
    if rcpt is None:
        return Status.DUNNO
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
    local = resolved.klass.value == "local"
    maps = plan.local_recipient_maps if local else plan.relay_recipient_maps
    if resolved.klass.value not in ("local", "relay") or maps is None:
        return Status.DUNNO
    localpart = split_address(resolved.address)[0]
    if local and localpart.lower() in _NEVER_UNKNOWN:
        return Status.DUNNO
    title = "local recipient table" if local else "relay recipient table"
    try:
        for i, key in enumerate(_rcpt_map_keys(resolved.address, plan.recipient_delimiter, local)):
            value = maps.find(key, partial=i > 0)
            ctx.note(maps.title, key, "not found" if value is None else "found")
            if value is not None:
                return Status.DUNNO
    except TableLookupError:
        return ctx.lookup_failed(addr)
    code = plan.codes[
        "unknown_local_recipient_reject_code" if local else "unknown_relay_recipient_reject_code"
    ]
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
        return Status.DUNNO
    st.sender_rcptmap_checked = True
    return check_rcpt_maps(ctx, st.sender, SENDER)


@restriction("reject_unlisted_recipient", "check_recipient_maps")
def reject_unlisted_recipient(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    st = ctx.state
    if not st.recipient or st.recipient_rcptmap_checked:
        return Status.DUNNO
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
    ctx.note("resolve", resolved.address, f"class {resolved.klass.value}")
    return resolved.klass.value in ("local", "relay")


@restriction("permit_auth_destination")
def permit_auth_destination(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    rcpt = ctx.state.recipient
    if rcpt is None:
        return Status.DUNNO
    return Status.OK if _auth_destination(ctx, rcpt) else Status.DUNNO


def _unauth_destination(ctx: Ctx, code: int, dsn: str) -> Status:
    rcpt = ctx.state.recipient
    if rcpt is None or _auth_destination(ctx, rcpt):
        return Status.DUNNO
    return ctx.reject(ErrorClass.POLICY, code, dsn, f"<{rcpt}>: Relay access denied")


@restriction("reject_unauth_destination")
def reject_unauth_destination(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    return _unauth_destination(ctx, ctx.plan.codes["relay_domains_reject_code"], "5.7.1")


@restriction("defer_unauth_destination")
def defer_unauth_destination(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    return _unauth_destination(ctx, ctx.plan.codes["relay_domains_reject_code"] - 100, "4.7.1")


@restriction("reject_multi_recipient_bounce")
def reject_multi_recipient_bounce(ctx: Ctx, arg: None, reply_name: str, reply_class: str) -> Status:
    st = ctx.state
    limit = 1 if st.where == "DATA" else 0
    if st.sender == "" and st.rcpt_count > limit:
        return ctx.reject(
            ErrorClass.POLICY,
            ctx.plan.codes["multi_recipient_bounce_reject_code"],
            "5.5.3",
            f"<{reply_name}>: {reply_class} rejected: Multi-recipient bounce",
        )
    return Status.DUNNO


# -- known to smtpgate, implemented by a later issue ------------------------------------

_DNS = "the DNS restrictions (issue 6)"
known_later(
    _DNS,
    "zone",
    "reject_rbl_client",
    "permit_dnswl_client",
    "reject_rhsbl_client",
    "reject_rhsbl_sender",
    "reject_rhsbl_helo",
    "reject_rhsbl_recipient",
    "reject_rhsbl_reverse_client",
    "permit_rhswl_client",
    "reject_rbl",
)
known_later(
    _DNS,
    "none",
    "reject_unknown_sender_domain",
    "reject_unknown_recipient_domain",
    "reject_unknown_helo_hostname",
    "reject_unknown_hostname",
    "reject_unknown_client_hostname",
    "reject_unknown_client",
    "reject_unknown_reverse_client_hostname",
    "reject_unknown_forward_client_hostname",
    "permit_mx_backup",
    "reject_unknown_address",
)
known_later(
    _DNS,
    "table",
    "check_sender_mx_access",
    "check_sender_ns_access",
    "check_sender_a_access",
    "check_recipient_mx_access",
    "check_recipient_ns_access",
    "check_recipient_a_access",
    "check_client_mx_access",
    "check_client_ns_access",
    "check_client_a_access",
    "check_helo_mx_access",
    "check_helo_ns_access",
    "check_helo_a_access",
    "check_reverse_client_hostname_mx_access",
    "check_reverse_client_hostname_ns_access",
    "check_reverse_client_hostname_a_access",
)
_LATER = "a later issue: smtpgate has no address verification, SASL or client TLS certificates"
known_later(
    _LATER,
    "none",
    "reject_unverified_sender",
    "reject_unverified_recipient",
    "permit_tls_clientcerts",
    "permit_tls_all_clientcerts",
    "reject_sender_login_mismatch",
    "reject_authenticated_sender_login_mismatch",
    "reject_known_sender_login_mismatch",
    "reject_unauthenticated_sender_login_mismatch",
    "reject_plaintext_session",
    "permit_inet_interfaces",
    "reject_unknown_forward_client_hostname",
)
known_later(_LATER, "table", "check_ccert_access", "check_sasl_access", "check_etrn_access")
known_later("a later issue: policy delegation", "zone", "check_policy_service", "sleep")
