"""What the SMTP machine asks of the outside world, as protocols with no I/O here, and
the effects it hands its driver.

The driver (``smtpd.py``) performs the effects; ``serve`` plugs the relay into
:class:`Backend`, the server-wide counters into :class:`Anvil`, the log into
:class:`LogSink`.  ``explain`` plugs in :class:`AcceptingBackend` and
:class:`LocalCounters`, which are here because they do no I/O either.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from smtpgate.facts import ClientFacts
from smtpgate.policy.model import Decision, TlsInfo
from smtpgate.reply import Reply
from smtpgate.smtp import syntax as s
from smtpgate.smtp.store import Message


class Action(enum.Enum):
    """Effects other than bytes to send and pauses."""

    FLUSH = "flush"
    START_TLS = "start-tls"
    CLOSE = "close"


FLUSH, START_TLS, CLOSE = Action.FLUSH, Action.START_TLS, Action.CLOSE
Effect = bytes | float | Action


# -- ports ---------------------------------------------------------------------------------


class BackendTransaction(Protocol):
    """One relayed mail transaction (the relay's ``Transaction``)."""

    @property
    def backend_peer(self) -> str: ...

    @property
    def outcome_unknown(self) -> bool: ...

    async def rcpt(self, recipient: str, params: Sequence[str] = ()) -> Reply: ...

    def start_data(self) -> None: ...

    async def data(self, message: bytes | Iterable[bytes]) -> Reply:
        """The message as bytes or as pieces (a :class:`~smtpgate.smtp.store.Message`),
        read once, in order, as it is sent."""

    async def abort(self) -> None: ...


class Backend(Protocol):
    """Where accepted mail goes: ``begin`` opens a transaction (connects lazily)."""

    async def begin(
        self,
        client: ClientFacts,
        sender: str,
        mail_params: Sequence[str],
        *,
        filter: str | None = None,
        hold: bool = False,
    ) -> BackendTransaction: ...

    def holds_elsewhere(self) -> bool:
        """Whether HOLD mail goes to its own next hop (smtpgate_hold_relayhost)."""
        ...


class LogSink(Protocol):
    """The mail log (Postfix's syslog lines): ``logs.MailLog``, or a list for explain."""

    def info(self, text: str) -> None: ...

    def warning(self, text: str) -> None: ...


class Anvil(Protocol):
    """What the machine asks ``anvil.AnvilClient`` (see there)."""

    async def connect(self, address: str | None, unit: float) -> Any: ...

    def disconnect(self, address: str | None) -> None: ...

    async def mail(self, address: str, unit: float) -> int: ...

    async def rcpt(self, address: str, unit: float) -> int: ...

    async def reserve(self, nbytes: int, limit: int) -> Any: ...

    def release(self, nbytes: int) -> None: ...


@dataclass(frozen=True, slots=True)
class _Counts:
    count: int
    rate: int
    total: int

    def __iter__(self) -> Any:
        return iter((self.count, self.rate, self.total))


@dataclass(frozen=True, slots=True)
class _Granted:
    granted: bool = True
    in_flight: int = 0


class LocalCounters:
    """The counters of a single dialogue (``explain``): one connection, no limit reached."""

    async def connect(self, address: str | None, unit: float) -> _Counts:
        return _Counts(1, 1, 1)

    def disconnect(self, address: str | None) -> None:
        pass

    async def mail(self, address: str, unit: float) -> int:
        return 1

    async def rcpt(self, address: str, unit: float) -> int:
        return 1

    async def reserve(self, nbytes: int, limit: int) -> _Granted:
        return _Granted()

    def release(self, nbytes: int) -> None:
        pass


class Observer(Protocol):
    """Follows the dialogue (``explain`` builds its trail from these calls)."""

    def command(self, line: str) -> None: ...

    def decision(self, decision: Decision) -> None: ...

    def reply(self, reply: Reply) -> None: ...


class Metrics(Protocol):
    """What the server counts for Prometheus (``smtpgate.metrics``; docs/metrics.md).

    The machine calls the first group at the points Postfix logs them, the relay, the
    policy delegation client and the milters the rest.  Each call must be cheap (it is
    made on every session): an implementation adds to counters in memory and writes
    them out elsewhere.  :data:`NO_METRICS` does nothing.
    """

    def connect(self) -> None:
        """A client connected (Postfix's ``connect from``)."""

    def disconnect(self) -> None:
        """A session ended (``disconnect from``)."""

    def lost(self, where: str) -> None:
        """The client went away without QUIT while the session was at ``where``."""

    def reject(self, where: str, code: int, queued: bool) -> None:
        """The restrictions refused a command at ``where`` with ``code``; ``queued``: the
        transaction had a queue id already (Postfix's ``NOQUEUE`` lines are not)."""

    def queued(self) -> None:
        """A transaction got its queue id (Postfix's ``client=`` line)."""

    def message(self, code: int) -> None:
        """The reply to the end of a message (the backend's, or smtpgate's own)."""

    def tls(self, info: TlsInfo | None) -> None:
        """A STARTTLS handshake completed."""

    def refused(self, limit: str) -> None:
        """A limit of the anvil refused a connection or a command."""

    def restriction(self, stage: str, restriction: str, result: str) -> None:
        """A restriction list ended on ``restriction`` (permit, reject, defer, error)."""

    def milter_verdict(self, where: str, action: str) -> None:
        """What the milters together decided at ``where``."""

    def milter_reply(self, milter: str, event: str, seconds: float) -> None:
        """One milter answered one event (connect, helo, mail, rcpt, data, unknown,
        eom: the whole message) after ``seconds``."""

    def policy_reply(self, service: str, action: str, seconds: float) -> None:
        """A policy server answered (``action`` its first word) or did not (``error``)."""

    def backend_connect(self, ok: bool, seconds: float) -> None:
        """A new backend connection was opened (greeting, EHLO, TLS done), or failed."""

    def backend_reply(self, command: str, code: int, seconds: float) -> None:
        """The backend answered RCPT or the end of data after ``seconds``."""

    def backend_error(self, command: str) -> None:
        """A backend fault (timeout, lost connection, garbled reply) at ``command``."""


class _NoMetrics:
    """Counts nothing (``explain``, tests, serve without smtpgate_metrics_listen)."""

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def lost(self, where: str) -> None:
        pass

    def reject(self, where: str, code: int, queued: bool) -> None:
        pass

    def queued(self) -> None:
        pass

    def message(self, code: int) -> None:
        pass

    def tls(self, info: TlsInfo | None) -> None:
        pass

    def refused(self, limit: str) -> None:
        pass

    def restriction(self, stage: str, restriction: str, result: str) -> None:
        pass

    def milter_verdict(self, where: str, action: str) -> None:
        pass

    def milter_reply(self, milter: str, event: str, seconds: float) -> None:
        pass

    def policy_reply(self, service: str, action: str, seconds: float) -> None:
        pass

    def backend_connect(self, ok: bool, seconds: float) -> None:
        pass

    def backend_reply(self, command: str, code: int, seconds: float) -> None:
        pass

    def backend_error(self, command: str) -> None:
        pass


NO_METRICS: Metrics = _NoMetrics()


class FixedTransaction:
    """A transaction whose every RCPT and message get fixed replies (no backend)."""

    backend_peer = "none"
    outcome_unknown = False

    def __init__(self, rcpt: Reply, data: Reply) -> None:
        self.rcpt_reply, self.data_reply = rcpt, data

    async def rcpt(self, recipient: str, params: Sequence[str] = ()) -> Reply:
        return self.rcpt_reply

    def start_data(self) -> None:
        pass

    async def data(self, message: bytes | Iterable[bytes]) -> Reply:
        return self.data_reply

    async def abort(self) -> None:
        pass


class AcceptingBackend:
    """A backend that accepts every recipient and message (``explain``'s backend)."""

    def __init__(self, queue_id: Callable[[], str] | None = None) -> None:
        self._queue_id = queue_id or (lambda: "BACKEND")
        self.transactions: list[tuple[ClientFacts, str, str | None, bool]] = []

    async def begin(
        self,
        client: ClientFacts,
        sender: str,
        mail_params: Sequence[str],
        *,
        filter: str | None = None,
        hold: bool = False,
    ) -> BackendTransaction:
        self.transactions.append((client, sender, filter, hold))
        return FixedTransaction(
            s.RECIPIENT_OK, Reply(250, "2.0.0", f"Ok: queued as {self._queue_id()}")
        )

    def holds_elsewhere(self) -> bool:
        return False


class MilterVerdict(Protocol):
    """What the milters decided at one stage (``smtpgate.milter.Verdict``)."""

    @property
    def action(self) -> str:
        """continue, accept, reject, tempfail, discard or quarantine."""

    @property
    def code(self) -> int | None: ...

    @property
    def enhanced(self) -> str | None: ...

    @property
    def text(self) -> str | None: ...

    @property
    def reason(self) -> str: ...


class MilterMessage(Protocol):
    """The milters' end-of-message outcome: a verdict and their edits, applied."""

    @property
    def verdict(self) -> MilterVerdict: ...

    @property
    def content(self) -> bytes | Message:
        """The message after header and body edits (the message given when none)."""

    @property
    def sender(self) -> tuple[str, Sequence[str]] | None:
        """A new sender and its ESMTP parameters, or None."""

    @property
    def add_recipients(self) -> Sequence[tuple[str, Sequence[str]]]: ...

    @property
    def delete_recipients(self) -> Sequence[str]: ...


class Milters(Protocol):
    """The session's milters, in order (``smtpgate.milter.MilterSession``).  ``macros``
    is looked up by name when a milter wants a macro (Postfix's smtpd_milter_eval())."""

    async def connect(
        self,
        macros: Mapping[str, str],
        hostname: str,
        address: str | None,
        port: int | None,
        family: str,
    ) -> MilterVerdict: ...

    async def helo(self, macros: Mapping[str, str], name: str) -> MilterVerdict: ...

    async def mail(
        self, macros: Mapping[str, str], sender: str, params: Sequence[str]
    ) -> MilterVerdict: ...

    async def rcpt(
        self,
        macros: Mapping[str, str],
        recipient: str,
        params: Sequence[str],
        *,
        rejected: str | None = None,
    ) -> MilterVerdict:
        """``rejected``: the restrictions refused it with this reply (only milters that
        asked for rejected recipients hear of it; their answer changes nothing)."""

    async def data(self, macros: Mapping[str, str]) -> MilterVerdict: ...

    async def unknown(self, macros: Mapping[str, str], command: str) -> MilterVerdict: ...

    async def message(
        self, macros: Mapping[str, str], content: bytes | Message, *, hidden_headers: int = 0
    ) -> MilterMessage:
        """The first ``hidden_headers`` headers are smtpgate's own (PREPEND, Received):
        Postfix does not show its own to milters."""

    def other(self) -> MilterVerdict:
        """The standing reply for VRFY, ETRN and STARTTLS (a connect-stage refusal)."""

    async def reset_helo(self) -> None:
        """STARTTLS: the HELO the milters heard is forgotten."""

    async def abort(self) -> None: ...

    async def close(self) -> None: ...
