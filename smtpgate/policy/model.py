"""Values the policy engine takes and returns.

The engine is Postfix's ``smtpd_check.c`` without its I/O: a session feeds it what the
client said (:class:`ClientInfo`, HELO name, sender, recipients) and gets back a
:class:`Decision` per command.  A decision carries the reply to send (``None`` when the
command passed every restriction), the Postfix-style log lines the check produced and the
:class:`Step` trail that ``explain`` prints.  Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from smtpgate.reply import Reply


class Stage(StrEnum):
    """An SMTP stage with restrictions; the value is Postfix's ``state->where``."""

    CONNECT = "CONNECT"
    HELO = "HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    END_OF_DATA = "END-OF-MESSAGE"
    ETRN = "ETRN"


class Status(IntEnum):
    """Result of one restriction (Postfix SMTPD_CHECK_*)."""

    DUNNO = 0
    OK = 1
    REJECT = 2


# The members as plain module constants: in Python 3.11 every ``Status.X`` is a
# descriptor call (~0.1 us), and the restriction engine reads them constantly.
DUNNO, OK, REJECT = Status.DUNNO, Status.OK, Status.REJECT


class ErrorClass(StrEnum):
    """Postfix MAIL_ERROR_* classes: software errors cannot be turned into warnings."""

    POLICY = "policy"
    PROTOCOL = "protocol"
    SOFTWARE = "software"
    RESOURCE = "resource"
    BOUNCE = "bounce"


# Postfix SMTPD_NAME_*: what a reply says was rejected.
CLIENT = "Client host"
REV_CLIENT = "Unverified Client host"
HELO = "Helo command"
SENDER = "Sender address"
RECIPIENT = "Recipient address"
DATA = "Data command"
EOD = "End-of-data"
ETRN = "Etrn command"


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What is known of the client before it says anything."""

    address: str
    name: str = "unknown"
    reverse_name: str = "unknown"
    port: int = 0
    # Postfix peer-name status: "ok", "temp" (temporary failure) or "perm".
    name_status: str = "perm"
    reverse_name_status: str = "perm"

    @property
    def namaddr(self) -> str:
        return f"{self.name}[{self.address}]"


@dataclass(frozen=True, slots=True)
class Step:
    """One line of the trail: a restriction evaluated, or a table key tried."""

    stage: str
    depth: int
    what: str
    detail: str
    result: str

    def as_dict(self) -> dict[str, object]:
        return {
            "stage": self.stage,
            "depth": self.depth,
            "what": self.what,
            "detail": self.detail,
            "result": self.result,
        }


@dataclass(frozen=True, slots=True)
class LogRecord:
    """A log line in Postfix's words; ``level`` is "info" or "warning"."""

    level: str
    text: str


@dataclass(slots=True)
class Decision:
    """The outcome of one command's restrictions."""

    stage: Stage
    reply: Reply | None
    steps: list[Step] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.reply is None

    @property
    def disconnect(self) -> bool:
        return self.reply is not None and self.reply.disconnect


@dataclass(slots=True)
class Deferral:
    """A saved defer_if_permit / defer_if_reject reply."""

    active: bool = False
    error_class: ErrorClass = ErrorClass.POLICY
    code: int = 450
    dsn: str = "4.7.1"
    text: str = ""

    def arm(self, error_class: ErrorClass, code: int, dsn: str, text: str) -> None:
        if not self.active:
            self.active = True
            self.error_class, self.code, self.dsn, self.text = error_class, code, dsn, text


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """The client connection's TLS, as policy servers are told it (Postfix tls_context)."""

    protocol: str
    """``TLSv1.3``..."""
    cipher: str
    keysize: int
    """The cipher's secret bits (Postfix cipher_usebits)."""


@dataclass(slots=True)
class SessionState:
    """Everything the checks read or remember during one connection."""

    client: ClientInfo
    helo_name: str | None = None
    sender: str | None = None
    recipient: str | None = None
    protocol: str = "SMTP"
    where: str = "CONNECT"
    rcpt_count: int = 0
    first_recipient: str | None = None
    input_pending: bool = False
    illegal_pipelining: bool = False
    """Sticky: the SMTP layer saw improper pipelining (it logged "improper command
    pipelining after ..."); Postfix >= 2.6 reject_unauth_pipelining tests only this."""
    etrn_name: str | None = None
    """The ETRN domain while smtpd_etrn_restrictions run (Postfix state->etrn_name)."""
    discard: bool = False
    access_denied: Reply | None = None
    queue_id: str | None = None
    instance: str = ""
    """The mail transaction's id for policy servers (Postfix state->instance): made when
    MAIL is accepted, the same for every request of that transaction, empty outside one."""
    message_size: int = 0
    """The MAIL FROM SIZE= value (Postfix msg_size); 0 when not given."""
    actual_size: int = 0
    """The message's size once its end is read (Postfix act_size); 0 before."""
    server_address: str = ""
    """The local address the client connected to (Postfix dest_addr); "" when unknown."""
    server_port: int = 0
    tls: TlsInfo | None = None
    """The client connection's TLS; None in plaintext."""
    recursion: int = 0
    warn_if_reject: int = 0
    defer_if_permit: Deferral = field(default_factory=Deferral)
    defer_if_reject: Deferral = field(default_factory=Deferral)
    defer_if_permit_client: bool = False
    defer_if_permit_helo: bool = False
    defer_if_permit_sender: bool = False
    recipient_rcptmap_checked: bool = False
    sender_rcptmap_checked: bool = False
    prepend: list[str] = field(default_factory=list)
    queue_actions: list[tuple[str, str]] = field(default_factory=list)
    verify_by_relay: bool = False
    """During one RCPT: the SMTP machine relays it in lock-step and no milter follows, so
    the backend's reply may verify the recipient (policy/verification.py)."""
    verify_pending: str | None = None
    """After RCPT checks: the recipient whose verification the relayed RCPT will be."""
    error: Reply | None = None
