"""The client's host name, found and verified the way Postfix's ``smtpd_peer.c`` does.

At connect the SMTP layer calls :func:`lookup_client`.  A PTR lookup of the address
gives the *reverse* name; the name is kept as the *verified* client name only when its
own A (IPv4 client) or AAAA (IPv6 client) records list the address again.

Statuses, as Postfix's ``name_status`` / ``reverse_name_status``:

- ``ok``: found (and, for ``name_status``, verified);
- ``temp``: a temporary DNS failure (reject_unknown_client_hostname answers 450);
- ``perm``: no PTR record, or a numeric PTR name;
- ``forged``: the PTR name does not resolve back to the address (Postfix
  SMTPD_PEER_CODE_FORGED; reject_unknown_client_hostname treats it as ``perm``).

With ``smtpd_peername_lookup = no`` both names are ``unknown`` with status ``perm``.
The warnings are Postfix 3.7's (``hostname %s does not resolve to address %s: %s``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from smtpgate.policy.address import valid_hostaddr
from smtpgate.policy.model import ClientInfo, LogRecord, Step
from smtpgate.policy.ports import DnsAnswer, DnsStatus, Resolver

UNKNOWN = "unknown"

# glibc gai_strerror() texts, as Postfix's MAI_STRERROR prints them.
EAI_NONAME = "Name or service not known"
EAI_NODATA = "No address associated with hostname"
EAI_AGAIN = "Temporary failure in name resolution"


@dataclass(slots=True)
class PeerLookup:
    """The client facts, plus the warnings to log and the steps ``explain`` prints."""

    client: ClientInfo
    logs: list[LogRecord] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


def reverse_name(address: str) -> str:
    """``1.2.3.4`` -> ``4.3.2.1.in-addr.arpa``; IPv6 -> nibbles under ``ip6.arpa``."""
    return ipaddress.ip_address(address).reverse_pointer


def _note(result: PeerLookup, answer: DnsAnswer) -> None:
    result.steps.append(
        Step("CONNECT", 0, "dns", f"{answer.rdtype} {answer.name}", answer.summary())
    )


def _gai_error(answers: list[DnsAnswer]) -> str:
    statuses = {a.status for a in answers}
    if DnsStatus.TEMPFAIL in statuses:
        return EAI_AGAIN
    if DnsStatus.NODATA in statuses:
        return EAI_NODATA
    return EAI_NONAME


async def lookup_client(
    resolver: Resolver | None,
    address: str,
    port: int = 0,
    *,
    peername_lookup: bool = True,
) -> PeerLookup:
    """Find and verify the client name of ``address`` (Postfix ``smtpd_peer_init``)."""
    unknown = ClientInfo(address=address, port=port)
    if not peername_lookup or not valid_hostaddr(address):
        return PeerLookup(unknown)
    if resolver is None:
        return PeerLookup(replace(unknown, name_status="temp", reverse_name_status="temp"))
    result = PeerLookup(unknown)
    ptr = await resolver.lookup(reverse_name(address), "PTR")
    _note(result, ptr)
    if ptr.temporary:
        result.client = replace(unknown, name_status="temp", reverse_name_status="temp")
        return result
    names = [r for r in ptr.records if r] if ptr.ok else []
    if not names:
        return result
    name = names[0]
    if valid_hostaddr(name):
        result.logs.append(LogRecord("warning", f"sockaddr_to_hostname: numeric hostname: {name}"))
        return result
    client = replace(
        unknown, name=name, reverse_name=name, name_status="ok", reverse_name_status="ok"
    )
    rdtype = "AAAA" if ":" in address else "A"
    forward = await resolver.lookup(name, rdtype)
    _note(result, forward)
    if not forward.ok:
        why = _gai_error([forward])
        result.logs.append(
            LogRecord("warning", f"hostname {name} does not resolve to address {address}: {why}")
        )
        status = "temp" if forward.temporary else "forged"
        result.client = replace(client, name=UNKNOWN, name_status=status)
        return result
    wanted = ipaddress.ip_address(address)
    if not any(_same(record, wanted) for record in forward.records):
        result.logs.append(
            LogRecord("warning", f"hostname {name} does not resolve to address {address}")
        )
        result.client = replace(client, name=UNKNOWN, name_status="forged")
        return result
    result.client = client
    return result


def _same(record: str, wanted: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(record) == wanted
    except ValueError:
        return False
