"""The restriction registry: Postfix keyword -> how to compile it and how to run it.

A restriction is one function registered under its exact Postfix name (compared
case-insensitively, as Postfix does).  ``arg`` says what follows the name in a
restriction list: nothing, a lookup table (``check_sender_access hash:/x``), a DNS
zone (``reject_rbl_client zen.example``) or a policy service
(``check_policy_service inet:127.0.0.1:10023``, or the ``{ ... }`` form with settings).
A restriction that smtpgate knows but does not implement yet has no function and a
``since`` that says what is missing; ``check`` reports it as one error naming file and
line, and skips its argument.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from smtpgate.policy.model import ErrorClass, SessionState, Status

if TYPE_CHECKING:
    from smtpgate.policy.plan import Plan
    from smtpgate.policy.ports import DnsAnswer, Resolver
    from smtpgate.tables import Table

ArgKind = Literal["none", "table", "zone", "service"]


class Ctx(Protocol):
    """What the engine offers a restriction while it runs."""

    plan: Plan
    state: SessionState
    resolver: Resolver | None
    found: bool
    """Whether the last ``check_access`` found a key (a DUNNO value also stops a search)."""

    async def dns(self, name: str, rdtype: str) -> DnsAnswer: ...

    def log_whatsup(self, whatsup: str, text: str) -> None: ...

    def reject(self, error_class: ErrorClass, code: int, dsn: str, text: str) -> Status: ...

    def defer_if_permit(self, error_class: ErrorClass, code: int, dsn: str, text: str) -> None: ...

    def defer_if_reject(self, error_class: ErrorClass, code: int, dsn: str, text: str) -> None: ...

    def config_error(self, why: str) -> Status: ...

    def lookup_failed(self, reply_name: str) -> Status: ...

    def check_access(
        self,
        table: Table,
        keys: Sequence[tuple[str, bool]],
        datum: str,
        reply_name: str,
        reply_class: str,
        suspicious: bool = False,
    ) -> Status: ...

    def check_table_result(
        self, table: str, value: str, datum: str, reply_name: str, reply_class: str
    ) -> Status: ...

    def note(self, what: str, detail: str, result: str) -> None: ...

    def warn(self, text: str) -> None: ...


RestrictionFn = Callable[..., "Status | Awaitable[Status]"]


@dataclass(frozen=True, slots=True)
class RestrictionSpec:
    """A registered restriction."""

    name: str
    fn: RestrictionFn | None
    arg: ArgKind = "none"
    since: str = ""

    @property
    def implemented(self) -> bool:
        return self.fn is not None


RESTRICTIONS: dict[str, RestrictionSpec] = {}


def restriction(*names: str, arg: ArgKind = "none") -> Callable[[RestrictionFn], RestrictionFn]:
    """Register ``fn`` under each Postfix name in ``names``."""

    def register(fn: RestrictionFn) -> RestrictionFn:
        for name in names:
            RESTRICTIONS[name] = RestrictionSpec(name, fn, arg)
        return fn

    return register


def known_later(since: str, arg: ArgKind, *names: str) -> None:
    """Register names smtpgate knows but does not implement yet."""
    for name in names:
        RESTRICTIONS.setdefault(name, RestrictionSpec(name, None, arg, since))


def lookup(name: str) -> RestrictionSpec | None:
    return RESTRICTIONS.get(name.lower())


def call(spec: RestrictionSpec, ctx: Ctx, arg: Any, reply_name: str, reply_class: str) -> Any:
    assert spec.fn is not None
    return spec.fn(ctx, arg, reply_name, reply_class)
