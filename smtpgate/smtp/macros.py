"""The Sendmail macros a milter may ask for, with the values Postfix's smtpd gives them.

Postfix evaluates a macro when a milter's macro list names it (``smtpd_milter_eval()`` in
``smtpd_milter.c``); :class:`SessionMacros` does the same, lazily, from what the machine
knows at the moment of the lookup, so one object serves every stage of a session.  A
macro with no value (``{auth_type}`` without AUTH, ``i`` before a queue id exists) is
absent, and a milter then gets nothing for it, as from Postfix.

``{mail_host}``, ``{mail_mailer}``, ``{rcpt_host}`` and ``{rcpt_mailer}`` come from
Postfix's address resolver (trivial-rewrite); smtpgate has none, so a relayed address
resolves as relayhost would: the mailer is ``smtp`` and the host the domain of the
address.  A recipient that the restrictions rejected has the ``error`` mailer and, as its
host and address, the parts of the reject reply, as Postfix gives them to a milter that
asked to see rejected recipients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from smtpgate.policy.address import quote_822_local
from smtpgate.policy.model import ClientInfo, TlsInfo

#: Every macro name Postfix can give a value (smtpd_milter.c).
KNOWN = (
    "{daemon_name}", "v", "_", "j", "{client_addr}", "{client_port}",
    "{client_connections}", "{client_name}", "{client_ptr}", "{client_resolve}",
    "{daemon_addr}", "{daemon_port}", "{tls_version}", "{cipher}", "{cipher_bits}",
    "{cert_subject}", "{cert_issuer}", "i", "{auth_type}", "{auth_authen}",
    "{auth_author}", "{mail_addr}", "{mail_host}", "{mail_mailer}", "{rcpt_addr}",
    "{rcpt_host}", "{rcpt_mailer}",
)  # fmt: skip


class SessionMacros(Mapping[str, str]):
    """Macro values looked up when asked for; ``value(name)`` is the machine's."""

    def __init__(self, value: Callable[[str], str | None]) -> None:
        self._value = value

    def __getitem__(self, name: str) -> str:
        found = self._value(name)
        if found is None:
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        return (name for name in KNOWN if self._value(name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def external(address: str) -> str:
    """``{mail_addr}``/``{rcpt_addr}``: the address in external form, the null address as
    the empty string (Sendmail 8.13 does not externalize it).  Postfix quotes by RFC 821's
    rules here; for a local part with no specials the two forms are the same."""
    return quote_822_local(address) if address else ""


def domain_of(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


@dataclass(frozen=True, slots=True)
class MacroContext:
    """What the machine knows at the moment a macro is looked up."""

    hostname: str
    client: ClientInfo
    connections: int
    server: tuple[str, int] | None
    tls: TlsInfo | None
    queue_id: str | None
    sender: str | None  # the transaction's, or the one MAIL is checking
    recipient: str | None  # the one RCPT is checking


def _underscore(c: MacroContext) -> str:
    client = c.client
    text = f"{client.reverse_name} [{client.address}]"
    forged = client.name.lower() != client.reverse_name.lower()
    return text + " (may be forged)" if forged else text


def _resolve(c: MacroContext) -> str:
    status = c.client.name_status
    if status == "ok":
        return "OK"
    if status == "temp":
        return "TEMP"
    return "FORGED" if c.client.reverse_name_status == "ok" else "FAIL"


def _if(value: str | None, then: Callable[[str], str | None]) -> str | None:
    return None if value is None else then(value)


_VALUES: dict[str, Callable[[MacroContext], str | None]] = {
    "j": lambda c: c.hostname,
    "_": _underscore,
    "{client_addr}": lambda c: (
        f"IPv6:{c.client.address}" if ":" in c.client.address else c.client.address
    ),
    "{client_port}": lambda c: str(c.client.port or 0),
    "{client_connections}": lambda c: str(c.connections),
    "{client_name}": lambda c: c.client.name,
    "{client_ptr}": lambda c: c.client.reverse_name,
    "{client_resolve}": _resolve,
    "{daemon_addr}": lambda c: c.server[0] if c.server else None,
    "{daemon_port}": lambda c: str(c.server[1]) if c.server else None,
    "{tls_version}": lambda c: c.tls.protocol if c.tls else None,
    "{cipher}": lambda c: c.tls.cipher if c.tls else None,
    "{cipher_bits}": lambda c: str(c.tls.keysize) if c.tls else None,
    "i": lambda c: c.queue_id,
    "{mail_addr}": lambda c: _if(c.sender, external),
    "{mail_host}": lambda c: _if(c.sender, domain_of),
    "{mail_mailer}": lambda c: _if(c.sender, lambda _: "smtp"),
    "{rcpt_addr}": lambda c: _if(c.recipient, external),
    "{rcpt_host}": lambda c: _if(c.recipient, domain_of),
    "{rcpt_mailer}": lambda c: _if(c.recipient, lambda _: "smtp"),
}


def macro_value(name: str, context: MacroContext) -> str | None:
    """The value Postfix's smtpd would give macro ``name``; None when it has none."""
    value = _VALUES.get(name)
    return value(context) if value is not None else None
