"""The parameters smtpgate supports, with Postfix's defaults, and the names Postfix knows.

:data:`PARAMETERS` is the single table of supported parameters: name, default text (taken
verbatim from Postfix 3.7 ``postconf -d`` unless ``postfix_difference`` says otherwise),
kind (how callers convert it), a one-sentence doc, and any difference from Postfix. The
parameter reference in the docs is generated from it.

:data:`POSTFIX_DEFAULTS` holds every Postfix 3.7 parameter name with its built-in default
(``postfix_parameters.txt``, generated from ``postconf -d``). A name set in main.cf that is
in neither table is an "unknown parameter"; one that is only in the second is "known to
Postfix but not supported by smtpgate", in one of two classes (:func:`classify`):

- ``not_yet``: it changes what mail is accepted or how it is screened (per-client milters,
  policy services, SASL, address verification, postscreen, content checks, virtual domains, ...)
  and smtpgate does not implement it yet. Set to anything but Postfix's default, it is an
  error: ignoring it would let mail through that the admin's Postfix refused or scanned.
  :data:`NOT_SUPPORTED_YET` maps each such name to the feature it belongs to.
- ``ignored``: it changes nothing a front end does (queue, delivery, local, tuning of a
  feature that the enabling parameter already refuses, such as
  ``smtpd_policy_service_*``; ``non_smtpd_milters``, which applies to mail that Postfix
  receives other than by SMTP and smtpgate never does): a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Literal, cast

from smtpgate.config.maincf import split_nameval

Kind = Literal["str", "bool", "int", "time", "list", "restrictions", "code", "size"]


@dataclass(frozen=True)
class ParamSpec:
    """One supported parameter: its default text, kind, doc and difference from Postfix."""

    name: str
    default: str
    kind: Kind
    doc: str
    postfix_difference: str = ""
    expand: bool = True
    """False for the few values Postfix never ``$name``-expands at load (reply templates)."""


_DIFFERENCES = {
    "smtpd_forbid_bare_newline": (
        "Postfix 3.7 defaults to no; smtpgate defaults to normalize, Postfix 3.9's default, "
        "because a front end must never pass an ambiguous end of data to its backend."
    ),
    "local_recipient_maps": (
        "Postfix's default (proxy:unix:passwd.byname $alias_maps) reads the host's users; "
        "a front end has none, so the default is empty: no check."
    ),
    "myhostname": (
        "Postfix asks the system for the host's fully qualified name; smtpgate's config layer "
        "does no network I/O and uses platform.node(), appending .localdomain when that name "
        "has no dot, as Postfix does. Set it explicitly on a real MX."
    ),
    "mydomain": (
        "Computed the Postfix way from myhostname: the part after the first dot, or localdomain."
    ),
    "mynetworks": (
        "Postfix computes the default from the host's interfaces according to "
        "mynetworks_style; smtpgate uses the loopback networks only."
    ),
    "config_directory": (
        "The folder of the configuration file (Postfix: the -c directory or /etc/postfix)."
    ),
    "compatibility_level": (
        "Postfix's built-in default is 0; smtpgate defaults to 3.6, the level Debian's "
        "shipped main.cf sets, so the relay restrictions default to permit_mynetworks, "
        "permit_sasl_authenticated, defer_unauth_destination."
    ),
    "smtpd_forbid_unauth_pipelining": (
        "Postfix 3.7 defaults to no; smtpgate defaults to yes, Postfix 3.9's default."
    ),
    "smtpd_per_request_deadline": (
        "Postfix's default also honours smtpd_per_record_deadline, the pre-3.7 name, which "
        "smtpgate does not support."
    ),
    "smtpd_client_event_limit_exceptions": (
        "Postfix's default is ${smtpd_client_connection_limit_exceptions:$mynetworks}; "
        "smtpgate does not support the old name and defaults to $mynetworks. It also exempts "
        "these clients from smtpgate_connection_limit."
    ),
    "relayhost": (
        "Postfix uses it for outbound mail; smtpgate relays every accepted message to it "
        "(the backend MTA)."
    ),
    "maillog_file": (
        "Postfix logs to syslog when it is empty; smtpgate never uses syslog and writes to "
        "standard error, which systemd's journal and docker logs collect."
    ),
    "smtpd_proxy_timeout": "In smtpgate it bounds every exchange with the backend MTA.",
    "smtpd_policy_service_timeout": (
        "Postfix applies it to each read and write; smtpgate to the request and its whole "
        "reply, so a server that trickles its reply cannot hold a session longer."
    ),
    "smtpd_policy_service_max_idle": (
        "A worker serves many sessions at once and may hold several connections to one "
        "service (one per request in flight, at most 100); each is closed when unused "
        "this long."
    ),
    "smtpd_milters": (
        "A relative unix: path is relative to the configuration's folder (Postfix: to the "
        "queue directory, where smtpd runs chrooted). A bad endpoint, default_action or "
        "protocol is an error at load (Postfix: a warning and 451 4.3.5 in each session)."
    ),
    "milter_default_action": (
        "An unknown action is an error at load (Postfix: a warning and 451 4.3.5 in each "
        "session that needs it)."
    ),
    "address_verify_map": (
        "Postfix's verify(8) keeps its cache in this table; smtpgate accepts the value (it must "
        "be type:name or empty) but keeps the cache in the serve process (every worker "
        "shares it), or in Redis when smtpgate_shared_state is set (then every instance "
        "shares it too)."
    ),
    "address_verify_sender": (
        "smtpgate sends the probe itself, to relayhost: MAIL FROM this address, RCPT TO the "
        "recipient, RSET (Postfix: a probe message through its queue and smtp client)."
    ),
    "smtp_connect_timeout": (
        "In smtpgate it bounds the TCP connection to the backend MTA and its greeting "
        "(Postfix's smtp_helo_timeout covers the greeting there)."
    ),
}

_RAW = frozenset({"smtpd_reject_footer", "smtpd_expansion_filter", "default_rbl_reply"})


def _p(name: str, default: str, kind: Kind, doc: str) -> ParamSpec:
    return ParamSpec(name, default, kind, doc, _DIFFERENCES.get(name, ""), name not in _RAW)


_SPECS = [
    _p(
        "myhostname",
        "",
        "str",
        "The fully qualified name of this host, used in the banner, HELO and Received: headers.",
    ),
    _p(
        "mydomain",
        "",
        "str",
        "The internet domain of this host; the default for several other parameters.",
    ),
    _p(
        "myorigin",
        "$myhostname",
        "str",
        "The domain that locally posted mail appears to come from.",
    ),
    _p(
        "mydestination",
        "$myhostname, localhost.$mydomain, localhost",
        "list",
        "Domains this mail system delivers locally; mail for them passes the relay check.",
    ),
    _p(
        "mynetworks",
        "127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128",
        "list",
        "Trusted client networks for permit_mynetworks (net/prefix, [ipv6]/prefix or type:table).",
    ),
    _p(
        "mynetworks_style",
        "${{$compatibility_level} <level {2} ? {subnet} : {host}}",
        "str",
        "How Postfix builds a default mynetworks (host, subnet, class); smtpgate only records it.",
    ),
    _p(
        "relay_domains",
        "${{$compatibility_level} <level {2} ? {$mydestination} : {}}",
        "list",
        "Domains (or type:table) this gateway relays mail to; the relay check permits them.",
    ),
    _p(
        "local_recipient_maps",
        "",
        "list",
        "Tables of the valid recipients in mydestination (keys user@domain or user).",
    ),
    _p(
        "show_user_unknown_table_name",
        "yes",
        "bool",
        "Name the recipient table in 'User unknown in ... table' replies.",
    ),
    _p(
        "relay_recipient_maps",
        "",
        "list",
        "Tables of the valid recipients in relay_domains; other recipients there are rejected.",
    ),
    _p(
        "smtpd_client_restrictions",
        "",
        "restrictions",
        "Restrictions applied to the client IP address and name.",
    ),
    _p(
        "smtpd_helo_restrictions",
        "",
        "restrictions",
        "Restrictions applied to the HELO/EHLO argument.",
    ),
    _p(
        "smtpd_sender_restrictions",
        "",
        "restrictions",
        "Restrictions applied to the MAIL FROM address.",
    ),
    _p(
        "smtpd_relay_restrictions",
        "${{$compatibility_level} <level {1} ? {} : {permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination}}",  # noqa: E501
        "restrictions",
        "Relay-control restrictions applied at RCPT TO, before smtpd_recipient_restrictions.",
    ),
    _p(
        "smtpd_recipient_restrictions",
        "",
        "restrictions",
        "Spam-blocking restrictions applied at RCPT TO.",
    ),
    _p("smtpd_data_restrictions", "", "restrictions", "Restrictions applied to the DATA command."),
    _p(
        "smtpd_end_of_data_restrictions",
        "",
        "restrictions",
        "Restrictions applied after the end of the message content.",
    ),
    _p(
        "smtpd_etrn_restrictions",
        "",
        "restrictions",
        "Restrictions applied to the ETRN domain (after the client and HELO restrictions "
        "with smtpd_delay_reject = yes).",
    ),
    _p(
        "smtpd_relay_before_recipient_restrictions",
        "${{$compatibility_level} <level {3.6} ? {no} : {yes}}",
        "bool",
        "Check smtpd_relay_restrictions before (yes) or after (no) smtpd_recipient_restrictions.",
    ),
    _p(
        "smtpd_restriction_classes",
        "",
        "list",
        "User-defined restriction classes; each name becomes a parameter holding restrictions.",
    ),
    _p(
        "smtpd_delay_reject",
        "yes",
        "bool",
        "Wait until RCPT TO before answering client, HELO and sender rejections.",
    ),
    _p("smtpd_helo_required", "no", "bool", "Require HELO or EHLO before MAIL FROM."),
    _p(
        "smtpd_null_access_lookup_key",
        "<>",
        "str",
        "The access-table lookup key used for the null sender address <>.",
    ),
    _p(
        "parent_domain_matches_subdomains",
        "debug_peer_list,fast_flush_domains,mynetworks,permit_mx_backup_networks,qmqpd_authorized_clients,relay_domains,smtpd_access_maps",
        "list",
        'Features for which a table entry "domain.tld" also matches subdomains.',
    ),
    _p(
        "recipient_delimiter",
        "",
        "str",
        "Characters that separate a local part from an address extension (user+ext).",
    ),
    _p("access_map_reject_code", "554", "code", "Reply code for REJECT from an access table."),
    _p("access_map_defer_code", "450", "code", "Reply code for DEFER from an access table."),
    _p(
        "relay_domains_reject_code",
        "554",
        "code",
        "Reply code when a client is not allowed to relay.",
    ),
    _p(
        "unknown_relay_recipient_reject_code",
        "550",
        "code",
        "Reply code for a relay_domains recipient that relay_recipient_maps does not list.",
    ),
    _p("reject_code", "554", "code", "Reply code for the reject restriction."),
    _p("defer_code", "450", "code", "Reply code for the defer restriction."),
    _p(
        "smtpd_reject_unlisted_sender",
        "no",
        "bool",
        "Reject a sender address in a domain we handle that no table lists.",
    ),
    _p(
        "smtpd_reject_unlisted_recipient",
        "yes",
        "bool",
        "Reject a recipient address in a domain we handle that no table lists.",
    ),
    _p(
        "unknown_address_reject_code",
        "450",
        "code",
        "Reply code for reject_unknown_sender_domain and reject_unknown_recipient_domain.",
    ),
    _p(
        "unknown_client_reject_code",
        "450",
        "code",
        "Reply code for reject_unknown_client_hostname.",
    ),
    _p(
        "unknown_hostname_reject_code",
        "450",
        "code",
        "Reply code for reject_unknown_helo_hostname.",
    ),
    _p("non_fqdn_reject_code", "504", "code", "Reply code for the reject_non_fqdn_* restrictions."),
    _p(
        "invalid_hostname_reject_code",
        "501",
        "code",
        "Reply code for reject_invalid_helo_hostname.",
    ),
    _p(
        "unknown_local_recipient_reject_code",
        "550",
        "code",
        "Reply code for a local recipient that no table lists.",
    ),
    _p(
        "multi_recipient_bounce_reject_code",
        "550",
        "code",
        "Reply code for reject_multi_recipient_bounce.",
    ),
    _p("plaintext_reject_code", "450", "code", "Reply code for restrictions that require TLS."),
    _p(
        "smtpd_peername_lookup",
        "yes",
        "bool",
        'Look up the client\'s host name in DNS (no: every client is "unknown").',
    ),
    _p(
        "default_rbl_reply",
        "$rbl_code Service unavailable; $rbl_class [$rbl_what] blocked using "
        "$rbl_domain${rbl_reason?; $rbl_reason}",
        "str",
        "Reply template for reject_rbl_client and reject_rhsbl_* (expanded per reply).",
    ),
    _p(
        "rbl_reply_maps",
        "",
        "list",
        "Tables of per-zone reply templates (key: the zone as written, value: a template).",
    ),
    _p(
        "maps_rbl_reject_code",
        "554",
        "code",
        "The $rbl_code of DNS block list replies.",
    ),
    _p(
        "reject_tempfail_action",
        "defer_if_permit",
        "str",
        "What a temporary DNS failure in a reject_unknown_* restriction does: "
        "defer_if_permit or defer.",
    ),
    _p(
        "unknown_address_tempfail_action",
        "$reject_tempfail_action",
        "str",
        "reject_unknown_sender_domain/recipient_domain after a temporary DNS failure.",
    ),
    _p(
        "unknown_helo_hostname_tempfail_action",
        "$reject_tempfail_action",
        "str",
        "reject_unknown_helo_hostname after a temporary DNS failure.",
    ),
    ParamSpec(
        "rbl_tempfail_action",
        "defer_if_permit",
        "str",
        "reject_rbl_client and reject_rhsbl_* after a temporary DNS failure: "
        "defer_if_permit (450 4.7.1 unless something rejects), defer, or dunno.",
        "smtpgate only. Postfix 3.7 always gives the client the benefit of the doubt "
        "(dunno: the lookup error is logged and the list is skipped); smtpgate defers by "
        "default so that a DNS outage never lets listed mail in.",
    ),
    _p(
        "unverified_recipient_reject_code",
        "450",
        "code",
        "reject_unverified_recipient: the reply code when the backend refused the recipient "
        "(a 4xx code is given as a deferral, with unverified_recipient_tempfail_action).",
    ),
    _p(
        "unverified_recipient_defer_code",
        "450",
        "code",
        "reject_unverified_recipient: the reply code when the backend deferred the recipient.",
    ),
    _p(
        "unverified_recipient_tempfail_action",
        "$reject_tempfail_action",
        "str",
        "reject_unverified_recipient when the answer is a 4xx or verification failed: "
        "defer_if_permit or defer.",
    ),
    _p(
        "unverified_recipient_reject_reason",
        "",
        "str",
        "reject_unverified_recipient: the text given in place of the backend's reason "
        "(empty: the backend's reason).",
    ),
    _p(
        "address_verify_negative_cache",
        "yes",
        "bool",
        "Remember failed verification probes (no: probe an unknown address at every attempt).",
    ),
    _p(
        "address_verify_positive_expire_time",
        "31d",
        "time",
        "How long a successful probe is remembered.",
    ),
    _p(
        "address_verify_positive_refresh_time",
        "7d",
        "time",
        "After this, a successful probe is still used but probed again in the background.",
    ),
    _p(
        "address_verify_negative_expire_time",
        "3d",
        "time",
        "How long a failed probe is remembered.",
    ),
    _p(
        "address_verify_negative_refresh_time",
        "3h",
        "time",
        "After this, a failed probe is still used but probed again in the background.",
    ),
    _p(
        "address_verify_sender",
        "$double_bounce_sender",
        "str",
        "The MAIL FROM of verification probes (an unqualified name gets @$myorigin; "
        "empty or <> is the null sender).",
    ),
    _p(
        "double_bounce_sender",
        "double-bounce",
        "str",
        "The sender of verification probes unless address_verify_sender says otherwise.",
    ),
    _p(
        "address_verify_sender_ttl",
        "0s",
        "time",
        "When not 0: the probe sender's local part gets a time stamp that changes this often "
        "(so that probe senders cannot be listed).",
    ),
    _p(
        "address_verify_map",
        "btree:$data_directory/verify_cache",
        "str",
        "Accepted for compatibility (type:name or empty); smtpgate keeps the verification "
        "cache in the serve process (shared by its workers), or in smtpgate_shared_state "
        "when that is set.",
    ),
    ParamSpec(
        "dns_servers",
        "",
        "list",
        "Name servers for smtpgate's DNS lookups (ip, ip:port, [ipv6]:port), instead of "
        "those in /etc/resolv.conf; empty: /etc/resolv.conf.",
        "smtpgate only; Postfix uses the system resolver.",
    ),
    ParamSpec(
        "dns_timeout",
        "5s",
        "time",
        "How long to wait for each DNS reply before sending the query again.",
        "smtpgate only (Postfix: the resolv.conf timeout option).",
    ),
    ParamSpec(
        "dns_tries",
        "2",
        "int",
        "How many times a DNS query that gets no reply is sent before the lookup fails "
        "temporarily.",
        "smtpgate only (Postfix: the resolv.conf attempts option).",
    ),
    ParamSpec(
        "dns_concurrency_limit",
        "100",
        "int",
        "Most DNS queries in flight at once, over all connections.",
        "smtpgate only.",
    ),
    ParamSpec(
        "dns_cache_size",
        "10000",
        "int",
        "Most DNS answers (negative ones too) cached by TTL; 0 disables the cache.",
        "smtpgate only (Postfix relies on the system's caching resolver).",
    ),
    _p(
        "message_size_limit",
        "10240000",
        "size",
        "Largest message in bytes that the gateway accepts (0 = no limit).",
    ),
    _p("smtpd_banner", "$myhostname ESMTP $mail_name", "str", "Text after 220 in the greeting."),
    _p("mail_name", "Postfix", "str", "The mail system name shown in the banner and replies."),
    _p(
        "soft_bounce",
        "no",
        "bool",
        "Turn every 5xx reject into a 4xx defer, for testing a new policy safely.",
    ),
    _p(
        "smtpd_reject_footer",
        "",
        "str",
        "Text appended to every 4xx/5xx reply (not $name-expanded at load; expanded per reply).",
    ),
    _p(
        "smtpd_expansion_filter",
        "\\t\\40!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\\\]^_`abcdefghijklmnopqrstuvwxyz{|}~",
        "str",
        "Characters allowed in $name expansions of reply templates (not $name-expanded).",
    ),
    _p(
        "smtpd_log_access_permit_actions",
        "",
        "list",
        "Access-table actions (such as static:all) for which a permit is logged.",
    ),
    _p(
        "allow_untrusted_routing",
        "no",
        "bool",
        "Let untrusted clients use sender-specified routing (user%domain@ourdomain, !, @...:).",
    ),
    _p("swap_bangpath", "yes", "bool", "Rewrite site!user to user@site."),
    _p("allow_percent_hack", "yes", "bool", "Rewrite user%domain to user@domain."),
    _p(
        "resolve_dequoted_address",
        "yes",
        "bool",
        "Resolve the address after removing quotes from the local part.",
    ),
    _p("resolve_null_domain", "no", "bool", "Resolve an address ending in @ to the null domain."),
    _p("disable_vrfy_command", "no", "bool", "Answer VRFY with 502."),
    _p(
        "smtpd_timeout",
        "${stress?{10}:{300}}s",
        "time",
        "How long to wait for a client command or reply write before giving up.",
    ),
    _p(
        "smtpd_error_sleep_time",
        "1s",
        "time",
        "Delay before answering a client that has made errors.",
    ),
    _p("smtpd_soft_error_limit", "10", "int", "Errors after which replies are delayed."),
    _p(
        "smtpd_hard_error_limit",
        "${stress?{1}:{20}}",
        "int",
        "Errors after which the client is disconnected.",
    ),
    _p(
        "smtpd_junk_command_limit",
        "${stress?{1}:{100}}",
        "int",
        "NOOP/VRFY/ETRN/RSET commands allowed before they count as errors.",
    ),
    _p("smtpd_recipient_limit", "1000", "int", "Maximum RCPT TO commands per message."),
    _p(
        "smtpd_client_connection_count_limit",
        "50",
        "int",
        "Simultaneous connections allowed per client IP address (0 = no limit).",
    ),
    _p(
        "smtpd_recipient_overshoot_limit",
        "1000",
        "int",
        "RCPT commands beyond smtpd_recipient_limit answered 452 before each further one "
        "counts as an error.",
    ),
    _p(
        "smtpd_per_request_deadline",
        "${stress?{yes}:{no}}",
        "bool",
        "Make smtpd_timeout a limit for a whole command line or DATA request instead of for "
        "each read.",
    ),
    _p(
        "smtpd_min_data_rate",
        "500",
        "int",
        "With smtpd_per_request_deadline, the DATA deadline grows by bytes received divided "
        "by this rate (bytes/s), up to smtpd_timeout.",
    ),
    _p(
        "smtpd_client_connection_rate_limit",
        "0",
        "int",
        "Connections a client address may open per anvil_rate_time_unit (0 = no limit).",
    ),
    _p(
        "smtpd_client_message_rate_limit",
        "0",
        "int",
        "MAIL commands a client address may send per anvil_rate_time_unit (0 = no limit).",
    ),
    _p(
        "smtpd_client_recipient_rate_limit",
        "0",
        "int",
        "RCPT and VRFY commands a client address may send per anvil_rate_time_unit (0 = no limit).",
    ),
    _p(
        "anvil_rate_time_unit",
        "60s",
        "time",
        "The time window of the smtpd_client_*_rate_limit counters.",
    ),
    _p(
        "smtpd_client_event_limit_exceptions",
        "$mynetworks",
        "list",
        "Clients exempt from the connection count, rate and global connection limits.",
    ),
    _p(
        "smtpd_forbid_unauth_pipelining",
        "yes",
        "bool",
        "Answer 554 5.5.0 Error: SMTP protocol synchronization and disconnect when a client "
        "sends commands ahead of time where RFC 2920 does not allow it.",
    ),
    _p(
        "smtpd_forbidden_commands",
        "CONNECT GET POST regexp:{{/^[^A-Z]/ Bogus}}",
        "list",
        "Unknown commands (and any header-like line) answered 221 2.7.0 and disconnected.",
    ),
    ParamSpec(
        "smtpgate_connection_limit",
        "1000",
        "int",
        "Simultaneous client connections over all addresses; beyond it new clients get "
        "421 4.7.0 and are disconnected (0 = no limit).",
        "smtpgate only (Postfix: the smtpd process limit in master.cf).",
    ),
    ParamSpec(
        "smtpgate_shared_state",
        "",
        "str",
        "Share the per-client connection counts and rates (smtpd_client_connection_count_limit "
        "and the smtpd_client_*_rate_limit counters) with every smtpgate instance that names "
        "the same Redis: redis://host:port/db, or rediss:// for TLS, with user:password@ "
        "when Redis wants them. Empty: each instance counts alone (its workers together). "
        "When Redis does not answer, each instance counts alone until it does.",
        "smtpgate only (Postfix's anvil counts for one machine).",
    ),
    ParamSpec(
        "smtpgate_shared_state_lease",
        "30s",
        "time",
        "How long a connection counted in smtpgate_shared_state keeps counting when its "
        "instance stops renewing it (crashed, or cut off from Redis); renewed every third.",
        "smtpgate only.",
    ),
    ParamSpec(
        "smtpgate_greet_pause",
        "0s",
        "time",
        "How long to wait for input before the 220 greeting when postscreen does not run; a "
        "client that talks first gets 554 5.5.0 with smtpd_forbid_unauth_pipelining (0: only "
        "input already there counts). While postscreen runs, its pregreet test takes its "
        "place and this is the old name of postscreen_greet_wait (see docs/postscreen.md).",
        "smtpgate only (Postfix: postscreen_greet_wait, in postscreen).",
    ),
    *(
        ParamSpec(name, default, cast(Kind, kind), doc, difference)
        for name, default, kind, doc, difference in (
            (
                "smtpgate_postscreen",
                "auto",
                "str",
                "Whether postscreen's tests run before the greeting: auto (when a "
                "postscreen test or action is configured, see docs/postscreen.md), yes or no.",
                "smtpgate only (Postfix: postscreen runs when master.cf names it).",
            ),
        )
    ),
    *(
        _p(name, default, cast(Kind, kind), doc)
        for name, default, kind, doc in (
            (
                "postscreen_access_list",
                "permit_mynetworks",
                "list",
                "Permanent allow and deny list of client addresses checked first: "
                "permit_mynetworks, permit, reject, dunno and type:table lookups "
                "(postscreen_access_list(5)).",
            ),
            (
                "postscreen_denylist_action",
                "${postscreen_blacklist_action?{$postscreen_blacklist_action}:{ignore}}",
                "str",
                "What a client that postscreen_access_list rejects gets: ignore (log only), "
                "enforce (550 at every RCPT) or drop (521 and disconnect).",
            ),
            (
                "postscreen_dnsbl_sites",
                "",
                "list",
                "DNS lists queried in parallel for each new client: domain[=filter][*weight]; "
                "a negative weight makes an allow list.",
            ),
            (
                "postscreen_dnsbl_threshold",
                "1",
                "int",
                "The combined DNSBL weight at which a client fails the DNSBL test.",
            ),
            (
                "postscreen_dnsbl_allowlist_threshold",
                "${postscreen_dnsbl_whitelist_threshold?"
                "{$postscreen_dnsbl_whitelist_threshold}:{0}}",
                "int",
                "A negative combined weight at or below which the client skips the other "
                "tests (0: never).",
            ),
            (
                "postscreen_dnsbl_action",
                "ignore",
                "str",
                "What a client scored at or over postscreen_dnsbl_threshold gets: ignore, "
                "enforce or drop.",
            ),
            (
                "postscreen_dnsbl_reply_map",
                "",
                "str",
                "Table that maps a DNSBL domain to the name shown in the reject reply.",
            ),
            (
                "postscreen_dnsbl_timeout",
                "10s",
                "time",
                "How long the DNS lists may take together; the greeting never waits longer "
                "than postscreen_greet_wait.",
            ),
            (
                "postscreen_dnsbl_min_ttl",
                "60s",
                "time",
                "The shortest time a DNSBL result is remembered for.",
            ),
            (
                "postscreen_dnsbl_max_ttl",
                "${postscreen_dnsbl_ttl?{$postscreen_dnsbl_ttl}:{1}}h",
                "time",
                "The longest time a DNSBL result is remembered for.",
            ),
            (
                "postscreen_greet_wait",
                "${stress?{2}:{6}}s",
                "time",
                "How long a new client is watched for talking first before the greeting.",
            ),
            (
                "postscreen_greet_banner",
                "$smtpd_banner",
                "str",
                "The first line of the greeting (220-) sent before the wait; empty: none, "
                "and no pregreet test.",
            ),
            (
                "postscreen_greet_action",
                "ignore",
                "str",
                "What a client that talks before its turn gets: ignore, enforce or drop.",
            ),
            ("postscreen_greet_ttl", "1d", "time", "How long a pregreet pass is remembered."),
            (
                "postscreen_cache_map",
                "btree:$data_directory/postscreen_cache",
                "str",
                "Where passes are remembered; accepted for compatibility: the cache is in "
                "memory, or in smtpgate_shared_state when that is set.",
            ),
            (
                "postscreen_cache_retention_time",
                "7d",
                "time",
                "How long a cache entry is kept after all its tests expired.",
            ),
            (
                "postscreen_pipelining_enable",
                "no",
                "bool",
                "Test that a new client does not send commands ahead of replies "
                "(PIPELINING is not announced until it passed).",
            ),
            (
                "postscreen_pipelining_action",
                "enforce",
                "str",
                "What a client that pipelines without PIPELINING gets: ignore, enforce or drop.",
            ),
            (
                "postscreen_pipelining_ttl",
                "30d",
                "time",
                "How long a pipelining pass is remembered.",
            ),
            (
                "postscreen_non_smtp_command_enable",
                "no",
                "bool",
                "Test that a new client sends no non-SMTP command (HTTP, header lines).",
            ),
            (
                "postscreen_non_smtp_command_action",
                "drop",
                "str",
                "What a client that sends a non-SMTP command gets: ignore, enforce or drop.",
            ),
            (
                "postscreen_non_smtp_command_ttl",
                "30d",
                "time",
                "How long a non-SMTP command pass is remembered.",
            ),
            (
                "postscreen_forbidden_commands",
                "$smtpd_forbidden_commands",
                "list",
                "The commands the non-SMTP command test fails on (besides header lines).",
            ),
            (
                "postscreen_bare_newline_enable",
                "no",
                "bool",
                "Test that a new client ends command lines with CR LF.",
            ),
            (
                "postscreen_bare_newline_action",
                "ignore",
                "str",
                "What a client that sends a bare LF gets: ignore, enforce or drop.",
            ),
            (
                "postscreen_bare_newline_ttl",
                "30d",
                "time",
                "How long a bare newline pass is remembered.",
            ),
        )
    ),
    ParamSpec(
        "smtpgate_hold_relayhost",
        "",
        "str",
        "Where a message that triggered an access(5) HOLD action is relayed, in relayhost "
        "syntax (a quarantine MTA); empty: to relayhost, with an X-Smtpgate-Hold: header "
        "that a Postfix backend holds it by (header_checks: /^X-Smtpgate-Hold:/ HOLD).",
        "smtpgate only (Postfix puts such a message in its own hold queue).",
    ),
    ParamSpec(
        "smtpgate_data_memory_limit",
        "268435456",
        "int",
        "Message bytes all sessions together may hold in memory; DATA beyond it gets "
        "451 4.3.1 Insufficient system resources (0 = no limit).",
        "smtpgate only (Postfix spools messages to disk instead).",
    ),
    ParamSpec(
        "smtpgate_message_memory_limit",
        "1048576",
        "int",
        "Bytes of one message kept in memory while it waits for the milters and the "
        "backend; beyond them the whole message goes to an anonymous file in "
        "smtpgate_spool_directory (0: every message goes to a file).",
        "smtpgate only (Postfix writes every message to its queue file).",
    ),
    ParamSpec(
        "smtpgate_spool_directory",
        "",
        "str",
        "Where messages beyond smtpgate_message_memory_limit wait, in files without a "
        "name (deleted whatever happens); empty: a private directory that serve makes "
        "in the system's temporary directory and removes at exit.  A directory that "
        "does not exist is made, mode 0700, owned by smtpgate_user.",
        "smtpgate only (Postfix: queue_directory).",
    ),
    _p(
        "smtpd_forbid_bare_newline",
        "normalize",
        "str",
        "Bare LF line endings (SMTP smuggling): normalize (treat as CRLF; only CRLF.CRLF "
        "ends DATA), reject (550 5.5.2 Error: bare <LF> received), or no.",
    ),
    _p(
        "smtpd_forbid_bare_newline_exclusions",
        "$mynetworks",
        "list",
        "Clients exempt from smtpd_forbid_bare_newline = reject (they get normalize).",
    ),
    _p(
        "smtpd_forbid_bare_newline_reject_code",
        "550",
        "code",
        "Reply code for smtpd_forbid_bare_newline = reject (521 also disconnects).",
    ),
    _p(
        "line_length_limit",
        "2048",
        "int",
        "Longest command line read; longer DATA lines are relayed intact, never rejected.",
    ),
    # -- the PROXY protocol: from a load balancer in front, to the backend behind --
    _p(
        "smtpd_upstream_proxy_protocol",
        "",
        "str",
        "The protocol a load balancer in front speaks before SMTP: empty (none) or haproxy "
        "(a PROXY header, version 1 or 2, whose client address is the client for "
        "everything: restrictions, limits, logs, XFORWARD, milters, policy services).",
    ),
    _p(
        "smtpd_upstream_proxy_timeout",
        "5s",
        "time",
        "How long to wait for the PROXY header (smtpd_upstream_proxy_protocol = haproxy).",
    ),
    ParamSpec(
        "smtpgate_upstream_proxy_networks",
        "",
        "list",
        "The load balancers that may send a PROXY header, in mynetworks syntax (net/prefix, "
        "[ipv6]/prefix, type:table); a connection from elsewhere is logged and refused "
        "(421 4.3.0 Server local error). Empty: any client may (Postfix's behaviour: let "
        "only the balancers reach the port).",
        "smtpgate only (Postfix trusts whoever reaches the port).",
    ),
    ParamSpec(
        "smtpgate_backend_proxy_protocol",
        "",
        "str",
        "Send the backend MTA a PROXY header naming the real client before its greeting: "
        "v1, v2, or empty (none; XFORWARD only). Each transaction then gets a backend "
        "connection of its own (no reuse across clients).",
        "smtpgate only (Postfix's smtp client does not send PROXY headers).",
    ),
    _p(
        "smtpd_proxy_timeout",
        "100s",
        "time",
        "How long to wait for the backend MTA (smtpgate's relay timeout).",
    ),
    _p(
        "smtpd_proxy_ehlo",
        "$myhostname",
        "str",
        "The name smtpgate sends in EHLO to the backend MTA.",
    ),
    _p(
        "strict_rfc821_envelopes",
        "no",
        "bool",
        "Require <> around MAIL FROM and RCPT TO addresses.",
    ),
    _p(
        "smtputf8_enable",
        "${{$compatibility_level} <level {1} ? {no} : {yes}}",
        "bool",
        "Offer SMTPUTF8.",
    ),
    _p(
        "relayhost",
        "",
        "str",
        "The backend MTA for accepted mail: [host]:port (no MX lookup) or host (MX lookup).",
    ),
    _p(
        "maillog_file",
        "",
        "str",
        "Write log lines to this file (empty: to standard error).",
    ),
    _p(
        "syslog_name",
        "${multi_instance_name?{$multi_instance_name}:{postfix}}",
        "str",
        "The name that log lines are tagged with.",
    ),
    _p(
        "config_directory",
        "",
        "str",
        "The folder of the configuration file; relative table names are relative to it.",
    ),
    _p(
        "compatibility_level",
        "3.6",
        "str",
        "Which Postfix defaults apply (0, 1, 2, 3.6, ...), e.g. for smtpd_relay_restrictions.",
    ),
    _p(
        "smtpd_tls_security_level",
        "",
        "str",
        "Offer STARTTLS to clients: empty or none (no), may (offer), encrypt (require).",
    ),
    _p("smtpd_tls_cert_file", "", "str", "PEM certificate file for STARTTLS."),
    _p(
        "smtpd_tls_key_file",
        "$smtpd_tls_cert_file",
        "str",
        "PEM private key file for smtpd_tls_cert_file.",
    ),
    _p(
        "smtpd_tls_chain_files",
        "",
        "list",
        "PEM files holding key and certificate chain(s), in Postfix 3.4 order.",
    ),
    _p("smtpd_tls_CAfile", "", "str", "CA certificates for verifying client certificates."),
    _p(
        "smtpd_tls_CApath",
        "",
        "str",
        "Directory of CA certificates for verifying client certificates.",
    ),
    _p(
        "smtpd_tls_protocols",
        ">=TLSv1",
        "str",
        "TLS protocol versions offered to clients with opportunistic TLS.",
    ),
    _p(
        "smtpd_tls_mandatory_protocols",
        ">=TLSv1",
        "str",
        "TLS protocol versions required with mandatory TLS.",
    ),
    _p("smtpd_tls_ciphers", "medium", "str", "Cipher grade for opportunistic TLS."),
    _p("smtpd_tls_mandatory_ciphers", "medium", "str", "Cipher grade for mandatory TLS."),
    _p("smtpd_tls_exclude_ciphers", "", "list", "Ciphers never used with clients."),
    _p("smtpd_tls_loglevel", "0", "int", "How much TLS activity to log (0-4)."),
    _p(
        "smtpd_tls_received_header",
        "no",
        "bool",
        "Add TLS protocol and cipher to the Received: header.",
    ),
    _p("smtpd_tls_auth_only", "no", "bool", "Offer AUTH only after STARTTLS."),
    _p("smtpd_tls_ask_ccert", "no", "bool", "Ask clients for a certificate."),
    _p(
        "smtpd_tls_req_ccert",
        "no",
        "bool",
        "Require a verified client certificate (with smtpd_tls_security_level = encrypt).",
    ),
    _p(
        "smtpd_tls_wrappermode",
        "no",
        "bool",
        "Speak TLS from the first byte (port 465 style) instead of STARTTLS.",
    ),
    _p(
        "smtpd_tls_fingerprint_digest",
        "${{$compatibility_level} <level {3.6} ? {md5} : {sha256}}",
        "str",
        "Digest for client certificate fingerprints (check_ccert_access).",
    ),
    _p(
        "smtp_tls_security_level",
        "",
        "str",
        "TLS towards the backend MTA: empty or none, may, encrypt, verify, secure.",
    ),
    _p("smtp_tls_cert_file", "", "str", "PEM client certificate presented to the backend MTA."),
    _p(
        "smtp_tls_key_file", "$smtp_tls_cert_file", "str", "PEM private key for smtp_tls_cert_file."
    ),
    _p(
        "smtp_tls_chain_files",
        "",
        "list",
        "PEM files holding the client key and certificate chain for the backend.",
    ),
    _p("smtp_tls_CAfile", "", "str", "CA certificates for verifying the backend MTA."),
    _p("smtp_tls_CApath", "", "str", "Directory of CA certificates for verifying the backend MTA."),
    _p("smtp_tls_protocols", ">=TLSv1", "str", "TLS protocol versions used with the backend MTA."),
    _p(
        "smtp_tls_mandatory_protocols",
        ">=TLSv1",
        "str",
        "TLS protocol versions required with mandatory TLS to the backend.",
    ),
    _p("smtp_tls_ciphers", "medium", "str", "Cipher grade for TLS to the backend MTA."),
    _p("smtp_tls_loglevel", "0", "int", "How much backend TLS activity to log (0-4)."),
    _p("smtp_tls_servername", "", "str", "SNI name sent to the backend MTA (empty: none)."),
    _p("smtp_tls_wrappermode", "no", "bool", "Speak TLS from the first byte to the backend MTA."),
    _p(
        "smtp_tls_verify_cert_match",
        "hostname",
        "list",
        "Names the backend certificate must match at smtp_tls_security_level = verify.",
    ),
    _p(
        "smtp_tls_secure_cert_match",
        "nexthop, dot-nexthop",
        "list",
        "Names the backend certificate must match at smtp_tls_security_level = secure.",
    ),
    _p(
        "smtp_connect_timeout",
        "30s",
        "time",
        "How long to wait for the backend MTA to accept a connection and greet.",
    ),
    # -- policy delegation (check_policy_service): Postfix 3.7's names and defaults --
    _p(
        "smtpd_policy_service_timeout",
        "100s",
        "time",
        "Time limit to connect to, write to or read from a policy server (check_policy_service).",
    ),
    _p(
        "smtpd_policy_service_max_idle",
        "300s",
        "time",
        "How long an unused connection to a policy server stays open.",
    ),
    _p(
        "smtpd_policy_service_max_ttl",
        "1000s",
        "time",
        "How long a connection to a policy server is used before it is closed and reopened.",
    ),
    _p(
        "smtpd_policy_service_try_limit",
        "2",
        "int",
        "How many times a policy request is tried before the default action applies.",
    ),
    _p(
        "smtpd_policy_service_retry_delay",
        "1s",
        "time",
        "The pause between two tries of one policy request.",
    ),
    _p(
        "smtpd_policy_service_request_limit",
        "0",
        "int",
        "Requests per connection to a policy server before it is closed (0: no limit).",
    ),
    _p(
        "smtpd_policy_service_default_action",
        "451 4.3.5 Server configuration problem",
        "str",
        "The access(5) action taken when a policy server cannot be reached or gives "
        "no usable answer.",
    ),
    _p(
        "smtpd_policy_service_policy_context",
        "",
        "str",
        "Sent to every policy server as the policy_context attribute.",
    ),
    ParamSpec(
        "listen",
        "0.0.0.0:25",
        "list",
        "Addresses smtpgate listens on: host:port or [ipv6]:port, e.g. 0.0.0.0:25, [::]:25.",
        "smtpgate only; Postfix takes listen addresses from master.cf.",
    ),
    ParamSpec(
        "smtpgate_workers",
        "auto",
        "str",
        "How many worker processes serve answers from: auto (one per CPU core) or a number; "
        "the parent binds one listening socket per worker on each address (SO_REUSEPORT: "
        "the kernel spreads connections), a worker that dies is replaced on its socket, "
        "SIGHUP and SIGTERM reach every worker. 1: a single process, no workers.",
        "smtpgate only (Postfix: the smtpd process limit in master.cf).",
    ),
    _p(
        "smtpd_milters",
        "",
        "list",
        "Milters (Sendmail mail filters) every SMTP session talks to, in order: "
        "inet:host:port, unix:/path, or { endpoint, name=value ... } with per-milter "
        "connect_timeout, command_timeout, content_timeout, default_action, protocol.",
    ),
    _p(
        "milter_default_action",
        "tempfail",
        "str",
        "What a milter that is down, slow or garbled means: accept, reject, tempfail "
        "or quarantine.",
    ),
    _p("milter_connect_timeout", "30s", "time", "How long connecting to a milter may take."),
    _p(
        "milter_command_timeout",
        "30s",
        "time",
        "How long a milter may take to answer a connection or envelope event.",
    ),
    _p(
        "milter_content_timeout",
        "300s",
        "time",
        "How long a milter may take to answer a message header, body or end of message "
        "event (SMFIR_PROGRESS restarts the wait).",
    ),
    _p(
        "milter_protocol",
        "6",
        "str",
        "The milter protocol version offered (2, 3, 4 or 6; optionally no_header_reply).",
    ),
    _p(
        "milter_connect_macros",
        "j {daemon_name} {daemon_addr} v _",
        "list",
        "Macros sent to milters with the connection.",
    ),
    _p(
        "milter_helo_macros",
        "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
        "list",
        "Macros sent to milters with HELO/EHLO.",
    ),
    _p(
        "milter_mail_macros",
        "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}",
        "list",
        "Macros sent to milters with MAIL FROM.",
    ),
    _p(
        "milter_rcpt_macros",
        "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
        "list",
        "Macros sent to milters with RCPT TO.",
    ),
    _p("milter_data_macros", "i", "list", "Macros sent to milters with DATA."),
    _p(
        "milter_end_of_header_macros",
        "i",
        "list",
        "Macros sent to milters with each header and the end of the headers.",
    ),
    _p(
        "milter_end_of_data_macros",
        "i",
        "list",
        "Macros sent to milters with the body and the end of the message.",
    ),
    _p(
        "milter_unknown_command_macros",
        "",
        "list",
        "Macros sent to milters with an unknown SMTP command.",
    ),
    _p(
        "milter_macro_defaults",
        "",
        "str",
        "Macro values (name=value) sent when the session has none for that macro.",
    ),
    _p(
        "milter_macro_daemon_name",
        "$myhostname",
        "str",
        "The value of the {daemon_name} macro.",
    ),
    _p("milter_macro_v", "$mail_name $mail_version", "str", "The value of the v macro."),
    ParamSpec(
        "smtpgate_user",
        "smtpgate",
        "str",
        "When started as root, serve binds its sockets and then runs as this user.",
        "smtpgate only; the counterpart of Postfix's mail_owner.",
    ),
    ParamSpec(
        "smtpgate_metrics_listen",
        "",
        "str",
        "Where serve answers HTTP for Prometheus and health checks: host:port or "
        "[ipv6]:port; /metrics (Prometheus text, every worker counted), /healthz (alive), "
        "/readyz (configuration loaded and the backend reachable). Empty: off. A change "
        "needs a restart. See docs/metrics.md.",
        "smtpgate only (Postfix has no metrics; postfix_exporter reads its log).",
    ),
    ParamSpec(
        "smtpgate_metrics_directory",
        "",
        "str",
        "The folder where the worker processes keep their metric files (prometheus_client's "
        "multiprocess mode): made by serve at start, owned by smtpgate_user, emptied of "
        "metric files at start; best on a tmpfs. Empty: a new private folder under $TMPDIR "
        "(or /tmp), removed when serve stops.",
        "smtpgate only.",
    ),
    ParamSpec(
        "smtpgate_watch",
        "loopback",
        "str",
        "The live view on the metrics listener (/watch, a page; /watch/events, server-sent "
        "events): off; loopback (clients on a loopback address only, others get 403); on "
        "(anyone who reaches smtpgate_metrics_listen). See docs/metrics.md.",
        "smtpgate only.",
    ),
    ParamSpec(
        "smtpgate_readyz_backend_age",
        "60s",
        "time",
        "/readyz answers ready while the backend (relayhost) accepted a connection within "
        "this time and has not failed since; otherwise it connects to relayhost itself "
        "(at most smtp_connect_timeout, 5s) before it answers.",
        "smtpgate only.",
    ),
    ParamSpec(
        "pid_file",
        "/run/smtpgate/smtpgate.pid",
        "str",
        "Where serve writes its process id; smtpgate reload signals that process.",
        "smtpgate only (Postfix: $queue_directory/pid/master.pid).",
    ),
]

PARAMETERS: Mapping[str, ParamSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def _load_postfix_defaults() -> dict[str, str]:
    text = resources.files("smtpgate.config").joinpath("postfix_parameters.txt").read_text()
    defaults: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            result = split_nameval(line)
            if not isinstance(result, str):
                defaults[result[0]] = result[1]
    return defaults


POSTFIX_DEFAULTS: Mapping[str, str] = MappingProxyType(_load_postfix_defaults())


# Features smtpgate does not implement yet, with the Postfix parameters that switch them on
# or change what they accept. A name ending in "*" stands for every Postfix parameter with
# that prefix. Parameters that only tune a feature whose switch is listed here
# (smtpd_sasl_* besides smtpd_sasl_auth_enable) stay warnings: the switch already fails.
# Restrictions of these features (reject_unverified_*, ...) are refused by the restriction
# registry.
NOT_YET_FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("per-client milters", ("smtpd_milter_maps",)),
    ("milter header checks", ("milter_header_checks",)),
    ("before-queue content filter", ("smtpd_proxy_filter",)),
    ("after-queue content filter", ("content_filter",)),
    ("SASL (SMTP AUTH)", ("smtpd_sasl_auth_enable",)),
    (
        "address verification probes routed other than to relayhost",
        (
            "address_verify_relayhost",
            "address_verify_transport_maps",
            "address_verify_local_transport",
            "address_verify_virtual_transport",
            "address_verify_relay_transport",
            "address_verify_default_transport",
            "address_verify_sender_dependent_relayhost_maps",
            "address_verify_sender_dependent_default_transport_maps",
        ),
    ),
    (
        "sender address verification (it would probe the sender's own MX on the internet)",
        ("unverified_sender_*",),
    ),
    (
        "postscreen features smtpgate does not have",
        (
            "postscreen_allowlist_interfaces",
            "postscreen_client_connection_count_limit",
            "postscreen_command_filter",
            "postscreen_discard_ehlo_keyword_address_maps",
            "postscreen_discard_ehlo_keywords",
            "postscreen_disable_vrfy_command",
            "postscreen_enforce_tls",
            "postscreen_helo_required",
            "postscreen_reject_footer",
            "postscreen_reject_footer_maps",
            "postscreen_tls_security_level",
            "postscreen_upstream_proxy_protocol",
            "postscreen_use_tls",
        ),
    ),
    (
        "header and body checks",
        ("header_checks", "mime_header_checks", "nested_header_checks", "body_checks"),
    ),
    (
        "message content limits",
        (
            "message_reject_characters",
            "strict_7bit_headers",
            "strict_8bitmime",
            "strict_8bitmime_body",
            "strict_mime_encoding_domain",
            "strict_smtputf8",
        ),
    ),
    (
        "virtual and canonical address tables (recipient validation)",
        (
            "virtual_alias_maps",
            "virtual_alias_domains",
            "virtual_mailbox_maps",
            "virtual_mailbox_domains",
            "relocated_maps",
            "canonical_maps",
            "recipient_canonical_maps",
        ),
    ),
    ("SMTP command filter", ("smtpd_command_filter",)),
    ("DNS reply filter", ("smtpd_dns_reply_filter",)),
    ("TLS session rate limit", ("smtpd_client_new_tls_session_rate_limit",)),
    (
        "pre-Postfix-2.3 TLS switches (use smtpd_tls_security_level)",
        ("smtpd_use_tls", "smtpd_enforce_tls"),
    ),
)


def _not_yet() -> dict[str, str]:
    table: dict[str, str] = {}
    for feature, patterns in NOT_YET_FEATURES:
        for pattern in patterns:
            if pattern.endswith("*"):
                names = [n for n in POSTFIX_DEFAULTS if n.startswith(pattern[:-1])]
            else:
                names = [pattern]
            for name in names:
                if name not in POSTFIX_DEFAULTS or name in PARAMETERS:
                    raise AssertionError(f"{name}: not a Postfix parameter smtpgate lacks")
                table[name] = feature
    return table


NOT_SUPPORTED_YET: Mapping[str, str] = MappingProxyType(_not_yet())
"""Postfix parameter -> the feature smtpgate does not implement yet (an error when set)."""

Class = Literal["supported", "not_yet", "ignored", "unknown"]


def classify(name: str) -> Class:
    """What smtpgate does with parameter *name* (see the module docstring)."""
    if name in PARAMETERS:
        return "supported"
    if name in NOT_SUPPORTED_YET:
        return "not_yet"
    if name in POSTFIX_DEFAULTS:
        return "ignored"
    return "unknown"
