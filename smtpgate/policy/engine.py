"""The restriction engine: Postfix's ``smtpd_check.c`` semantics, without its I/O.

A :class:`PolicySession` lives as long as one SMTP connection.  Each command method
(``connect``, ``helo``, ``mail``, ``rcpt``, ``data``, ``end_of_data``) runs the stage's
restriction lists and returns a :class:`~smtpgate.policy.model.Decision`.

Rules kept from Postfix, in the order a reader meets them:

1. ``generic_checks`` walks a list and stops at the first result that is not DUNNO.
   A restriction class is a list run in place; OK inside it ends the whole stage.
2. A reject passes through :meth:`Checker.reject`, which formats the reply, turns it
   into a warning under ``warn_if_reject``, into the saved deferral under
   ``defer_if_reject``, applies ``soft_bounce`` and makes the enhanced code agree with
   the reply code.  421 and 521 replies disconnect.
3. ``defer_if_permit`` is remembered per stage and wins over a later permit.
4. With ``smtpd_delay_reject = yes`` the client, HELO and sender lists run again at
   every RCPT, in that order, before the relay and recipient lists.
5. A configuration error (unknown restriction, table in a table value, recursion)
   answers ``451 4.3.5 Server configuration error``; an access-table lookup error
   answers ``451 4.3.5 <name>: ... rejected: Server configuration error`` and other
   lookup errors ``451 4.3.0 <name>: Temporary lookup failure``.  All end the stage.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from smtpgate.errors import TableLookupError, TableUnavailableError
from smtpgate.policy import delegation, model, restrictions  # noqa: F401  (registers restrictions)
from smtpgate.policy.actions import dsn_split, dsn_valid, parse_action
from smtpgate.policy.dsn import smtpd_dsn_fix
from smtpgate.policy.logline import whatsup_line
from smtpgate.policy.model import (
    DUNNO,
    OK,
    REJECT,
    ErrorClass,
    LogRecord,
    SessionState,
    Stage,
    Status,
    Step,
)
from smtpgate.policy.plan import Compiled, Plan, compile_runtime_list
from smtpgate.policy.ports import DnsAnswer, Resolver, no_resolver_answer
from smtpgate.reply import Reply
from smtpgate.tables import Table

MAX_RECURSION = 100
CONFIG_ERROR_TEXT = "Server configuration error"

Hits = Callable[[str, str, str], None]
"""Told (stage, restriction, result) when a restriction list ends on a restriction: the
innermost item that did not answer DUNNO; result is permit, reject, defer (a 4xx) or
error (a configuration or lookup error)."""


class _Abort(Exception):
    """Postfix's longjmp out of a stage: the reply is already made."""


class Checker:
    """Runs restriction lists against a session; implements the registry's ``Ctx``."""

    def __init__(
        self,
        plan: Plan,
        state: SessionState,
        resolver: Resolver | None = None,
        trace: bool = True,
        hits: Hits | None = None,
    ) -> None:
        self.plan = plan
        self.state = state
        self.resolver = resolver
        self.trace = trace  # keep the trail (explain); serve only needs replies and logs
        self.hits = hits
        self.decided = ""  # the label of the item that ended the list being run
        self.found = False
        self.stage = Stage.CONNECT
        self.steps: list[Step] = []
        self.logs: list[LogRecord] = []

    async def dns(self, name: str, rdtype: str) -> DnsAnswer:
        """One DNS lookup, noted in the trail; no resolver means a temporary failure."""
        if self.resolver is None:
            answer = no_resolver_answer(name, rdtype)
        else:
            answer = await self.resolver.lookup(name, rdtype)
        self.note("dns", f"{rdtype} {name}", answer.summary())
        return answer

    # -- trail and logs ------------------------------------------------------------

    def note(self, what: str, detail: str, result: str) -> None:
        if self.trace:
            self.steps.append(Step(self.stage.value, self.state.recursion, what, detail, result))

    def warn(self, text: str) -> None:
        self.logs.append(LogRecord("warning", text))

    def log_whatsup(self, whatsup: str, text: str) -> None:
        st = self.state
        line = whatsup_line(
            queue_id=st.queue_id,
            whatsup=whatsup,
            where=st.where,
            namaddr=st.client.namaddr,
            text=text,
            sender=st.sender,
            recipients=() if st.recipient is None else (st.recipient,),
            protocol=st.protocol,
            helo=st.helo_name,
        )
        self.logs.append(LogRecord("info", line))

    # -- the reject path (smtpd_check_reject) --------------------------------------

    def reject(self, error_class: ErrorClass, code: int, dsn: str, text: str) -> Status:
        st = self.state
        warn_only = bool(st.warn_if_reject) and error_class is not ErrorClass.SOFTWARE
        full = f"{code} {dsn} {text}"
        if code < 400 or code > 599:
            self.warn(f"SMTP reply code configuration error: {full}")
            code, dsn, text = 450, "4.7.1", "Service unavailable"
        elif not dsn_valid(dsn):
            self.warn(f"DSN detail code configuration error: {full}")
            code, dsn, text = 450, "4.7.1", "Service unavailable"
        text = _printable(f"{code} {dsn} {text}"[:510])[len(f"{code} {dsn} ") :]
        if not warn_only and st.defer_if_reject.active and str(code)[0] == "5":
            saved = st.defer_if_reject
            st.warn_if_reject = 0
            saved.active = False
            return self.reject(saved.error_class, saved.code, saved.dsn, saved.text)
        if self.plan.soft_bounce and code >= 500:
            code -= 100
        dsn = str(code)[0] + dsn[1:]
        reply = Reply(code, dsn, text, disconnect=code in (421, 521))
        self.log_whatsup("reject_warning" if warn_only else "reject", " ".join(reply.lines()))
        self.note("reply", str(reply), "warning only" if warn_only else "reject")
        if warn_only:
            return DUNNO
        st.error = reply
        return REJECT

    def defer_if_permit(self, error_class: ErrorClass, code: int, dsn: str, text: str) -> None:
        if self.state.warn_if_reject == 0:
            self.state.defer_if_permit.arm(error_class, code, dsn, text)
            self.note("defer_if_permit", f"{code} {dsn} {text}", "armed")
        else:
            self.reject(error_class, code, dsn, text)

    def defer_if_reject(self, error_class: ErrorClass, code: int, dsn: str, text: str) -> None:
        self.state.defer_if_reject.arm(error_class, code, dsn, text)
        self.note("defer_if_reject", f"{code} {dsn} {text}", "armed")

    def config_error(self, why: str) -> Status:
        self.warn(why)
        self.reject(ErrorClass.SOFTWARE, 451, "4.3.5", CONFIG_ERROR_TEXT)
        raise _Abort

    def lookup_failed(self, reply_name: str) -> Status:
        self.reject(ErrorClass.RESOURCE, 451, "4.3.0", f"<{reply_name}>: Temporary lookup failure")
        raise _Abort

    # -- tables (check_access and friends) -----------------------------------------

    def check_access(
        self,
        table: Table,
        keys: Sequence[tuple[str, bool]],
        datum: str,
        reply_name: str,
        reply_class: str,
        suspicious: bool = False,
    ) -> Status:
        """Try ``keys`` in order; the first hit decides (Postfix check_*_access)."""
        label = f"{table.type}:{table.name}"
        self.found = False
        for key, partial in keys:
            if partial and table.is_pattern:
                continue
            try:
                value = table.lookup(key)
                if value == "":
                    self.warn(f"{label} lookup of {key} returns an empty string result")
                    self.warn(f"{label} should return NO RESULT in case of NOT FOUND")
                    raise TableLookupError("empty string result")
            except TableLookupError as exc:
                # Postfix 3.7 answers every access-map lookup error (a table that could
                # not be opened, a failed or empty lookup) the same way.
                self.note(label, key, f"lookup error: {exc}")
                if isinstance(exc, TableUnavailableError):
                    self.warn(f"{label} is unavailable. {exc}")
                self.warn(f'{label} lookup error for "{key}"')
                self.reject(
                    ErrorClass.SOFTWARE,
                    451,
                    "4.3.5",
                    f"<{reply_name}>: {reply_class} rejected: {CONFIG_ERROR_TEXT}",
                )
                raise _Abort from None
            if value is None:
                self.note(label, key, "not found")
                continue
            self.note(label, key, f"found: {value}")
            self.found = True
            try:
                status = self.check_table_result(label, value, datum, reply_name, reply_class)
            except _Nested as nested:
                nested.suspicious = suspicious
                raise
            if status is OK and suspicious:
                self.note(label, key, "OK ignored: source-routed recipient")
                return DUNNO
            return status
        return DUNNO

    def check_table_result(
        self, table: str, value: str, datum: str, reply_name: str, reply_class: str
    ) -> Status:
        """Perform an access(5) action (Postfix check_table_result)."""
        action = parse_action(value)
        verb, text = action.verb, action.text
        handler = _TABLE_ACTIONS.get(verb)
        if handler is not None:
            return handler(self, action, table, datum, reply_name, reply_class)
        if verb == "TABLE":
            self.warn(f"access table {table} has entry with lookup table: {value}")
            self.warn("do not specify lookup tables inside SMTPD access maps")
            self.warn("define a restriction class and specify its name instead.")
            return self.config_error(f"access table {table}: lookup table in value")
        if self.state.recursion > MAX_RECURSION:
            return self.config_error(
                f"access table {table} entry {value} causes unreasonable recursion"
            )
        items = compile_runtime_list(self.plan, text)
        if not items:
            self.warn(f"access table {table} entry {value} has empty value")
            return OK
        raise _Nested(items)

    # -- generic_checks ------------------------------------------------------------

    async def generic_checks(
        self, items: tuple[Compiled, ...], reply_name: str, reply_class: str
    ) -> Status:
        st = self.state
        saved = st.recursion
        st.recursion += 1
        status = DUNNO
        try:
            if st.recursion > MAX_RECURSION:
                return self.config_error("restriction class recursion is too deep")
            trace = self.trace
            for item in items:
                if item.name == "warn_if_reject":  # names are normalised by the plan
                    self._warn_if_reject(item)
                    continue
                if item.class_name is not None:
                    status = await self._run_class(item, reply_name, reply_class)
                elif item.error:
                    status = self.config_error(item.error)
                else:
                    slot = self._open_step(item, "") if trace else 0
                    spec = item.spec
                    assert spec is not None and spec.fn is not None
                    try:
                        result = spec.fn(self, item.arg, reply_name, reply_class)
                        if result.__class__ is not Status and inspect.isawaitable(result):
                            result = await result
                        status = result if result.__class__ is Status else Status(result)
                    except _Nested as nested:
                        status = await self._nested(item, nested, reply_name, reply_class)
                    except _Abort:
                        self.decided = self.decided or item.label
                        raise
                    if trace:
                        self._close_step(slot, item, "", status)
                if st.warn_if_reject >= st.recursion:
                    st.warn_if_reject = 0
                if status is not DUNNO:
                    self.decided = self.decided or item.label  # the innermost item decides
                    break
                if st.defer_if_permit.active and st.defer_if_reject.active:
                    break
        finally:
            st.recursion = saved
        return status

    def _warn_if_reject(self, item: Compiled) -> None:
        st = self.state
        if st.warn_if_reject == 0:
            st.warn_if_reject = st.recursion
        self.note(item.label, "", "next reject becomes a warning")

    def _open_step(self, item: Compiled, detail: str) -> int:
        """Note an item as started in the trail; its slot, for :meth:`_close_step`."""
        slot = len(self.steps)
        self.note(item.label, detail, "...")
        return slot

    def _close_step(self, slot: int, item: Compiled, detail: str, status: Status) -> None:
        self.steps[slot] = Step(
            self.stage.value, self.state.recursion, item.label, detail, status.name
        )

    async def _run_class(self, item: Compiled, reply_name: str, reply_class: str) -> Status:
        """A restriction class, run in place."""
        assert item.class_name is not None
        slot = self._open_step(item, "restriction class") if self.trace else 0
        class_items = self.plan.classes[item.class_name]
        status = await self.generic_checks(class_items, reply_name, reply_class)
        if self.trace:
            self._close_step(slot, item, "restriction class", status)
        return status

    async def _nested(
        self, item: Compiled, nested: _Nested, reply_name: str, reply_class: str
    ) -> Status:
        """Run the restrictions a table value named, in place of the value."""
        result = await self.generic_checks(nested.items, reply_name, reply_class)
        if result is OK and nested.suspicious:
            self.note(item.label, "", "OK ignored: source-routed recipient")
            self.decided = ""
            return DUNNO
        return result

    async def run_list(
        self, items: tuple[Compiled, ...], reply_name: str, reply_class: str
    ) -> Status:
        """One stage list with Postfix's SMTPD_CHECK_RESET and longjmp catch."""
        st = self.state
        st.recursion = 0
        st.warn_if_reject = 0
        st.defer_if_reject.active = False
        if not items:
            return DUNNO
        self.decided = ""
        try:
            status = await self.generic_checks(items, reply_name, reply_class)
        except _Abort:
            if self.hits is not None:
                self.hits(self.stage.value, self.decided or "(configuration error)", "error")
            return REJECT
        if status is not DUNNO and self.hits is not None:
            error = st.error
            if status is OK:
                result = "permit"
            else:
                result = "defer" if error is not None and error.code < 500 else "reject"
            self.hits(self.stage.value, self.decided, result)
        return status


class _Nested(Exception):
    """A table value that names restrictions: run them in place of the value."""

    def __init__(self, items: tuple[Compiled, ...]) -> None:
        super().__init__()
        self.items = items
        self.suspicious = False


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else " " for ch in text)


# -- access(5) actions --------------------------------------------------------------


def _act_dunno(c: Checker, a: object, table: str, datum: str, name: str, klass: str) -> Status:
    return DUNNO


def _act_ok(c: Checker, a: object, table: str, datum: str, name: str, klass: str) -> Status:
    return OK


def _act_reject(c: Checker, a: object, table: str, datum: str, name: str, klass: str) -> Status:
    assert hasattr(a, "text") and hasattr(a, "verb")
    is_reject = a.verb == "REJECT"
    dsn, text = dsn_split("5.7.1" if is_reject else "4.7.1", a.text)
    codes = c.plan.codes
    code = codes.access_map_reject_code if is_reject else codes.access_map_defer_code
    return c.reject(
        ErrorClass.POLICY,
        code,
        smtpd_dsn_fix(dsn, klass),
        f"<{name}>: {klass} rejected: {text or 'Access denied'}",
    )


def _act_code(c: Checker, a: object, table: str, datum: str, name: str, klass: str) -> Status:
    assert hasattr(a, "text") and hasattr(a, "code")
    code: int = a.code
    dsn, text = dsn_split(f"{str(code)[0]}.7.1", a.text)
    return c.reject(
        ErrorClass.POLICY,
        code,
        smtpd_dsn_fix(dsn, klass),
        f"<{name}>: {klass} rejected: {text or 'Access denied'}",
    )


def _act_log(c: Checker, a: object, table: str, datum: str, name: str, klass: str) -> Status:
    assert hasattr(a, "text") and hasattr(a, "verb")
    c.log_whatsup(a.verb.lower(), a.text)
    return DUNNO


def _act_defer_if(c: Checker, a: object, table: str, datum: str, name: str, klass: str) -> Status:
    assert hasattr(a, "text") and hasattr(a, "verb")
    dsn, text = dsn_split("4.7.1", a.text)
    args = (
        ErrorClass.POLICY,
        c.plan.codes.access_map_defer_code,
        smtpd_dsn_fix(dsn, klass),
        f"<{name}>: {klass} rejected: {text or 'Service unavailable'}",
    )
    if a.verb == "DEFER_IF_PERMIT":
        c.defer_if_permit(*args)
    else:
        c.defer_if_reject(*args)
    return DUNNO


def _queue_action_allowed(c: Checker, table: str, verb: str) -> bool:
    """Postfix's not_in_client_helo: with delay_reject=no, no actions before MAIL."""
    if c.state.sender is None:
        c.warn(
            f"access table {table}: with smtpd_delay_reject=no, action {verb} is always "
            "skipped in Client host or Helo command restrictions"
        )
        return False
    return True


def _act_queue(c: Checker, a: object, table: str, datum: str, name: str, klass: str) -> Status:
    """HOLD, FILTER, REDIRECT, BCC: logged as Postfix does, recorded for the relay."""
    assert hasattr(a, "text") and hasattr(a, "verb")
    verb: str = a.verb
    text: str = a.text
    if not _queue_action_allowed(c, table, verb):
        return DUNNO
    if verb == "FILTER" and ":" not in text:
        what = "has FILTER entry without value" if not text else "requires transport:destination"
        c.warn(f'access table {table} entry "{datum}" {what}')
        return DUNNO
    if verb in ("REDIRECT", "BCC") and "@" not in text:
        c.warn(f'access table {table} entry "{datum}" requires user@domain target')
        return DUNNO
    if verb == "HOLD":
        if any(done == "HOLD" for done, _ in c.state.queue_actions):
            return DUNNO  # Postfix logs a HOLD once per transaction
        c.log_whatsup("hold", f"<{name}>: {klass} {text or 'triggers HOLD action'}")
    else:
        c.log_whatsup(verb.lower(), f"<{name}>: {klass} triggers {verb} {text}")
    c.state.queue_actions.append((verb, text))
    return DUNNO


def _act_discard(c: Checker, a: object, table: str, datum: str, name: str, klass: str) -> Status:
    assert hasattr(a, "text")
    if not _queue_action_allowed(c, table, "DISCARD"):
        return DUNNO
    c.log_whatsup("discard", f"<{name}>: {klass} {a.text or 'triggers DISCARD action'}")
    c.state.discard = True
    return OK


def _act_prepend(c: Checker, a: object, table: str, datum: str, name: str, klass: str) -> Status:
    assert hasattr(a, "text")
    text: str = a.text
    if not _queue_action_allowed(c, table, "PREPEND"):
        return DUNNO
    head, colon, _ = text.partition(":")
    if not text or not colon or not head or any(ch in head for ch in " \t"):
        c.warn(f'access table {table} entry "{datum}" requires header: text')
        return DUNNO
    c.state.prepend.append(text)
    return DUNNO


_TABLE_ACTIONS = {
    "DUNNO": _act_dunno,
    "OK": _act_ok,
    "RELAY": _act_ok,
    "NUMERIC": _act_ok,
    "REJECT": _act_reject,
    "DEFER": _act_reject,
    "CODE": _act_code,
    "WARN": _act_log,
    "INFO": _act_log,
    "DEFER_IF_PERMIT": _act_defer_if,
    "DEFER_IF_REJECT": _act_defer_if,
    "HOLD": _act_queue,
    "FILTER": _act_queue,
    "REDIRECT": _act_queue,
    "BCC": _act_queue,
    "DISCARD": _act_discard,
    "PREPEND": _act_prepend,
}
