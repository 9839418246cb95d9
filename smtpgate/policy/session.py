"""One SMTP connection's policy: the stage drivers of Postfix's ``smtpd_check.c``.

:class:`PolicySession` is what ``serve`` and ``explain`` both drive.  It keeps the
per-connection facts (HELO name, sender, recipient count, deferrals) and answers each
command with a :class:`~smtpgate.policy.model.Decision`.  ``decision.reply is None``
means the command passed every restriction; the caller then sends its own success
reply (the SMTP machine's, or the backend's: see ``smtpgate/smtp/machine.py``).
"""

from __future__ import annotations

from smtpgate.policy.address import header_safe
from smtpgate.policy.delegation import new_instance
from smtpgate.policy.engine import Checker, Hits
from smtpgate.policy.model import (
    CLIENT,
    DATA,
    DUNNO,
    EOD,
    ETRN,
    HELO,
    RECIPIENT,
    REJECT,
    SENDER,
    ClientInfo,
    Decision,
    SessionState,
    Stage,
    Status,
)
from smtpgate.policy.plan import Plan
from smtpgate.policy.ports import Resolver, VerifyResult
from smtpgate.reply import Reply

_WHERE = {stage: stage.value for stage in Stage}  # without a descriptor call per command


class PolicySession:
    """The restriction state of one client connection."""

    def __init__(
        self,
        plan: Plan,
        client: ClientInfo,
        resolver: Resolver | None = None,
        *,
        trace: bool = True,
        hits: Hits | None = None,
    ) -> None:
        self.plan = plan
        self.state = SessionState(client=client)
        self.resolver = resolver
        self.trace = trace  # decisions carry the trail of steps (explain); serve needs none
        self.hits = hits  # told which restriction ended each list (metrics)

    # -- helpers ---------------------------------------------------------------------

    def _checker(self, stage: Stage) -> Checker:
        checker = Checker(self.plan, self.state, self.resolver, self.trace, self.hits)
        checker.stage = stage
        self.state.where = _WHERE[stage]
        self.state.error = None
        return checker

    def _decision(self, checker: Checker, stage: Stage, status: Status) -> Decision:
        reply = self.state.error if status is REJECT else None
        return Decision(stage, reply, checker.steps, checker.logs)

    def _denied(self, stage: Stage) -> Decision | None:
        denied = self.state.access_denied
        if denied is None:
            return None
        text = f"Error: access denied for {self.state.client.namaddr}"
        return Decision(stage, Reply(503, "5.7.0", text))

    def access_denied(self, command: str) -> Reply | None:
        """The reply to any command of a client refused at connect, else None.

        With smtpd_delay_reject = no a client that smtpd_client_restrictions reject gets
        the rejection instead of the 220 greeting (:meth:`connect`), and the session stays
        open: every later command except QUIT -- HELO, EHLO, MAIL, RCPT, DATA, BDAT, RSET,
        NOOP, VRFY, ETRN, STARTTLS, AUTH, an unknown verb -- is answered
        ``503 5.7.0 Error: access denied for unknown[192.0.2.1]`` without a log line, and
        counts as an error (smtpd.c: ``state->error_count++``).  QUIT gets its 221.
        """
        if self.state.access_denied is None or command.upper() == "QUIT":
            return None
        text = f"Error: access denied for {self.state.client.namaddr}"
        return Reply(503, "5.7.0", text)

    async def _check_client(self, c: Checker) -> Status:
        st = self.state
        st.defer_if_permit.active = False
        c.note("smtpd_client_restrictions", st.client.namaddr, "evaluate")
        items = self.plan.stage_list("smtpd_client_restrictions")
        status = await c.run_list(items, st.client.namaddr, CLIENT)
        st.defer_if_permit_client = st.defer_if_permit.active
        return status

    async def _check_helo(self, c: Checker, helo: str | None) -> Status:
        st = self.state
        if helo is None:
            return DUNNO
        saved, st.helo_name = st.helo_name, helo
        try:
            st.defer_if_permit.active = st.defer_if_permit_client
            c.note("smtpd_helo_restrictions", helo, "evaluate")
            items = self.plan.stage_list("smtpd_helo_restrictions")
            status = await c.run_list(items, helo, HELO)
            st.defer_if_permit_helo = st.defer_if_permit.active
            return status
        finally:
            st.helo_name = saved

    async def _check_mail(self, c: Checker, sender: str | None) -> Status:
        st = self.state
        if sender is None:
            return DUNNO
        saved, st.sender = st.sender, sender
        try:
            st.defer_if_permit.active = st.defer_if_permit_client or st.defer_if_permit_helo
            st.sender_rcptmap_checked = False
            c.note("smtpd_sender_restrictions", sender or "<>", "evaluate")
            items = self.plan.stage_list("smtpd_sender_restrictions")
            status = await c.run_list(items, sender, SENDER)
            st.defer_if_permit_sender = st.defer_if_permit.active
            if (
                self.plan.reject_unlisted_sender
                and status is not REJECT
                and not st.sender_rcptmap_checked
                and not st.discard
                and sender
            ):
                from smtpgate.policy.restrictions import check_rcpt_maps

                st.sender_rcptmap_checked = True
                status = check_rcpt_maps(c, sender, SENDER)
            return status
        finally:
            st.sender = saved

    # -- commands --------------------------------------------------------------------

    async def connect(self) -> Decision:
        """Client restrictions at connect time (only with smtpd_delay_reject = no)."""
        c = self._checker(Stage.CONNECT)
        if self.plan.delay_reject:
            return Decision(Stage.CONNECT, None, c.steps, c.logs)
        status = await self._check_client(c)
        decision = self._decision(c, Stage.CONNECT, status)
        if decision.reply is not None:
            self.state.access_denied = decision.reply
        return decision

    async def helo(self, name: str, esmtp: bool = False) -> Decision:
        denied = self._denied(Stage.HELO)
        if denied:
            return denied
        c = self._checker(Stage.HELO)
        self.state.where = "EHLO" if esmtp else "HELO"
        if not self.plan.delay_reject:
            # Postfix's helo_cmd()/ehlo_cmd() check first and change nothing on a reject:
            # the log line has the protocol of before (proto=SMTP for a first, rejected
            # EHLO), a transaction in progress stays, the HELO name is not kept.
            status = await self._check_helo(c, name)
            if status is REJECT:
                return self._decision(c, Stage.HELO, status)
        # ehlo_cmd() sets ESMTP; helo_cmd() keeps ESMTP after an EHLO ("downgrading the
        # protocol name breaks the unauthorized pipelining test").
        if esmtp:
            self.state.protocol = "ESMTP"
        elif self.state.protocol not in ("ESMTP", "SMTP"):
            self.state.protocol = "SMTP"
        self.reset()
        # Postfix's helo_cmd(): what is kept (for delayed restrictions, logs, headers) is the
        # name with control and special characters as "?"; an immediate check saw it as sent.
        self.state.helo_name = header_safe(name, neuter=True)
        return Decision(Stage.HELO, None, c.steps, c.logs)

    async def mail(self, sender: str, size: int = 0) -> Decision:
        """MAIL FROM; ``size`` is its SIZE= value (0: none), for policy servers."""
        denied = self._denied(Stage.MAIL)
        if denied:
            return denied
        if self.plan.helo_required and self.state.helo_name is None:
            return Decision(Stage.MAIL, Reply(503, "5.5.1", "Error: send HELO/EHLO first"))
        if self.state.sender is not None:
            return Decision(Stage.MAIL, Reply(503, "5.5.1", "Error: nested MAIL command"))
        c = self._checker(Stage.MAIL)
        if not self.plan.delay_reject:
            status = await self._check_mail(c, sender)
            if status is REJECT:
                return self._decision(c, Stage.MAIL, status)
        # Postfix's mail_cmd(): the transaction (and its instance) begins once the
        # sender checks passed; a policy request at MAIL itself has no instance yet.
        self.state.sender = sender
        self.state.message_size = size
        self.state.instance = new_instance()
        return Decision(Stage.MAIL, None, c.steps, c.logs)

    async def rcpt(self, recipient: str, *, relay_verifies: bool = False) -> Decision:
        """The RCPT checks.  ``relay_verifies``: the caller relays this RCPT to the
        backend in lock-step if it passes, with nothing between (no milter), so the
        backend's reply may be reject_unverified_recipient's probe; when it is to be,
        :attr:`verify_pending` names the recipient and the caller must hand the reply to
        :meth:`verified` (policy/verification.py)."""
        denied = self._denied(Stage.RCPT)
        if denied:
            return denied
        st = self.state
        st.verify_pending = None
        st.verify_by_relay = relay_verifies
        if st.sender is None:
            return Decision(Stage.RCPT, Reply(503, "5.5.1", "Error: need MAIL command"))
        c = self._checker(Stage.RCPT)
        if st.discard:
            c.note("DISCARD", recipient, "the transaction is discarded: no checks")
            return self._accept_rcpt(c, recipient)
        if recipient.lower() == "postmaster":
            c.note("postmaster", recipient, "always accepted (RFC 5321 4.5.1)")
            return self._accept_rcpt(c, recipient)
        st.recipient = recipient
        st.recipient_rcptmap_checked = False
        try:
            status = await self._rcpt_checks(c, recipient)
        finally:
            st.recipient = None
            st.verify_by_relay = False
        if status is REJECT:
            st.verify_pending = None
            return self._decision(c, Stage.RCPT, status)
        return self._accept_rcpt(c, recipient)

    @property
    def verify_pending(self) -> str | None:
        """The recipient the last RCPT left for the backend's reply to verify, or None."""
        return self.state.verify_pending

    async def verified(self, recipient: str, reply: Reply | None, peer: str = "") -> Decision:
        """reject_unverified_recipient, finished with the backend's ``reply`` to the
        relayed RCPT (from ``peer``, ``host[addr]:port``), or with a probe of its own when
        the RCPT was not relayed after all (``reply`` None).

        The decision's reply is the client's when it is not None: the verification's
        deferral or rejection, with its log line.  None: give the backend's reply (it
        accepted, or its refusal says nothing about the recipient and stays its own).
        """
        from smtpgate.policy.verification import apply_result, backend_status

        st = self.state
        st.verify_pending = None
        c = self._checker(Stage.RCPT)
        verifier = self.plan.verifier
        result: VerifyResult | None = None
        if reply is None:
            result = VerifyResult(None) if verifier is None else await verifier.query(recipient)
        else:
            found = backend_status(reply, peer)
            if found is not None:
                if verifier is not None:
                    await verifier.record(recipient, *found)
                result = VerifyResult(found[0], found[1], probed=True)
            c.note("verify", recipient, f"relayed RCPT: {reply}")
        if result is None:
            return Decision(Stage.RCPT, None, c.steps, c.logs)
        st.recipient = recipient
        st.recursion = st.warn_if_reject = 0
        st.defer_if_permit.active = False
        try:
            status = decided = apply_result(c, result, recipient, RECIPIENT)
            if status is not REJECT and st.defer_if_permit.active:
                saved = st.defer_if_permit
                status = c.reject(saved.error_class, saved.code, saved.dsn, saved.text)
        finally:
            st.recipient = None
        # As run_list counts: the restriction's own refusal, not a deferral given at the end.
        if decided is REJECT and self.hits is not None and st.error is not None:
            outcome = "defer" if st.error.code < 500 else "reject"
            self.hits(Stage.RCPT.value, "reject_unverified_recipient", outcome)
        return self._decision(c, Stage.RCPT, status)

    async def vrfy(self, address: str) -> Decision:
        """smtpd_check_rcpt() for VRFY: the RCPT checks, inside a MAIL transaction or not
        (outside one the sender checks see no sender and pass, as in Postfix)."""
        st = self.state
        if st.sender is not None:
            return await self.rcpt(address)
        denied = self._denied(Stage.RCPT)
        if denied is not None:
            return denied
        c = self._checker(Stage.RCPT)
        st.where = "VRFY"
        st.recipient, st.recipient_rcptmap_checked = address, False
        try:
            status = await self._rcpt_checks(c, address)
        finally:
            st.recipient = None
        return self._decision(c, Stage.RCPT, status)

    def _accept_rcpt(self, c: Checker, recipient: str) -> Decision:
        return Decision(Stage.RCPT, None, c.steps, c.logs)

    def confirm_rcpt(self, recipient: str) -> None:
        """Count a recipient that passed the restrictions *and* the backend accepted."""
        st = self.state
        st.rcpt_count += 1
        if st.first_recipient is None:
            st.first_recipient = recipient

    async def _rcpt_checks(self, c: Checker, recipient: str) -> Status:
        st = self.state
        plan = self.plan
        if plan.delay_reject:
            if (
                await self._check_client(c) is REJECT
                or await self._check_helo(c, st.helo_name) is REJECT
                or await self._check_mail(c, st.sender) is REJECT
            ):
                return REJECT
        st.defer_if_permit.active = st.defer_if_permit_sender
        order = ["smtpd_relay_restrictions", "smtpd_recipient_restrictions"]
        if not plan.relay_before_recipient:
            order.reverse()
        status = DUNNO
        for parameter in order:
            c.note(parameter, recipient, "evaluate")
            status = await c.run_list(plan.stage_list(parameter), recipient, RECIPIENT)
            if status is REJECT:
                break
        if status is not REJECT and st.defer_if_permit.active:
            saved = st.defer_if_permit
            status = c.reject(saved.error_class, saved.code, saved.dsn, saved.text)
        if (
            plan.reject_unlisted_recipient
            and status is not REJECT
            and not st.recipient_rcptmap_checked
            and not st.discard
        ):
            from smtpgate.policy.restrictions import check_rcpt_maps

            st.recipient_rcptmap_checked = True
            status = check_rcpt_maps(c, recipient, RECIPIENT)
        return status

    async def _generic_stage(
        self, stage: Stage, parameter: str, name: str, klass: str, where: str | None = None
    ) -> Decision:
        c = self._checker(stage)
        if where is not None:
            self.state.where = where
        st = self.state
        if st.rcpt_count == 1 and st.recipient is None:
            st.recipient = st.first_recipient
        try:
            st.defer_if_permit.active = False
            c.note(parameter, name, "evaluate")
            status = await c.run_list(self.plan.stage_list(parameter), name, klass)
            if status is not REJECT and st.defer_if_permit.active:
                saved = st.defer_if_permit
                status = c.reject(saved.error_class, saved.code, saved.dsn, saved.text)
        finally:
            st.recipient = None
        return self._decision(c, stage, status)

    async def data(self, where: str = "DATA") -> Decision:
        """smtpd_data_restrictions, after the client said DATA (or its first BDAT: the
        log lines then say ``BDAT from``)."""
        return await self._generic_stage(
            Stage.DATA, "smtpd_data_restrictions", "DATA", DATA, where=where
        )

    async def end_of_data(self, size: int = 0) -> Decision:
        """smtpd_end_of_data_restrictions, after the final dot; ``size``: the message's
        size (policy servers' ``size`` attribute), 0 when the caller does not say."""
        self.state.actual_size = size
        return await self._generic_stage(
            Stage.END_OF_DATA, "smtpd_end_of_data_restrictions", "END-OF-MESSAGE", EOD
        )

    async def etrn(self, domain: str) -> Decision:
        """ETRN's restrictions (Postfix smtpd_check_etrn), after etrn_cmd()'s own checks.

        The SMTP layer answers first, without calling this: ``503 Error: MAIL transaction
        in progress`` (no enhanced code) inside a transaction, ``500 Syntax: ETRN domain``
        without exactly one argument, ``501 Error: invalid parameter syntax`` for a domain
        that is not a valid host name (one leading ``@`` or ``#`` is dropped first).  Then,
        with smtpd_delay_reject = yes, the client and the HELO restrictions run (their
        reject is the reply, logged ``NOQUEUE: reject: ETRN from ...``), then
        smtpd_etrn_restrictions with the domain (``<example.org>: Etrn command rejected:
        ...``).  ``decision.reply is None``: the domain passed; the caller gives the
        queue-less answer.  No ``from=``/``to=`` in these log lines.
        """
        denied = self._denied(Stage.ETRN)
        if denied:
            return denied
        st = self.state
        c = self._checker(Stage.ETRN)
        if self.plan.delay_reject:
            if await self._check_client(c) is REJECT:
                return self._decision(c, Stage.ETRN, REJECT)
            if await self._check_helo(c, st.helo_name) is REJECT:
                return self._decision(c, Stage.ETRN, REJECT)
        st.etrn_name = domain
        try:
            st.defer_if_permit.active = False
            c.note("smtpd_etrn_restrictions", domain, "evaluate")
            items = self.plan.stage_list("smtpd_etrn_restrictions")
            status = await c.run_list(items, domain, ETRN)
            if status is not REJECT and st.defer_if_permit.active:
                saved = st.defer_if_permit
                status = c.reject(saved.error_class, saved.code, saved.dsn, saved.text)
        finally:
            st.etrn_name = None
        return self._decision(c, Stage.ETRN, status)

    def reset(self) -> None:
        """End the mail transaction (RSET, HELO, or after the final dot)."""
        st = self.state
        st.sender = None
        st.recipient = None
        st.rcpt_count = 0
        st.first_recipient = None
        st.discard = False
        st.queue_id = None
        st.instance = ""
        st.message_size = 0
        st.actual_size = 0
        st.prepend.clear()
        st.queue_actions.clear()
        st.defer_if_permit_sender = False
