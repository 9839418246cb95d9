"""``reject_unverified_recipient``: Postfix's recipient address verification, without
its I/O.

Theory of operation (Postfix 3.7 ``smtpd_check.c::reject_unverified_address`` and
``verify(8)``):

1. The restriction asks the plan's :class:`~smtpgate.policy.ports.AddressVerifier`
   (``smtpgate.verify.RelayVerifier`` keeps Postfix's cache and probes the backend:
   ``MAIL FROM:<$address_verify_sender>``, ``RCPT TO:<address>``, ``RSET``; tests use
   ``FakeVerifier``) for the recipient's status.  A fresh cache entry answers without
   the backend, so a dictionary attack costs the backend one probe per address.
2. The status gives the reply, as in Postfix: deliverable passes (DUNNO); deferred
   uses ``unverified_recipient_defer_code``, bounced ``unverified_recipient_reject_code``
   (450 by default: Postfix's default is cautious); a 4xx code is a deferral under
   ``unverified_recipient_tempfail_action`` with the text ``unverified address:
   <reason>``, a 5xx code a rejection with ``undeliverable address: <reason>``; the
   enhanced code is 4.1.1 (5.1.1).  No answer at all (the backend cannot be reached):
   the warning ``verify service failure`` and ``450 4.1.1 <a>: Recipient address
   rejected: address verification problem`` under the tempfail action; nothing is
   cached.
3. The lock-step shortcut: where the plan marked the restriction (its argument is
   :data:`~smtpgate.policy.plan.LOCKSTEP_PROBE`: nothing after it can refuse the
   recipient) and the SMTP machine relays this RCPT in lock-step, an address the cache
   does not know is not probed separately: the restriction passes and leaves the address
   in ``state.verify_pending``; the machine relays the client's RCPT, and the backend's
   reply is the verification (:func:`backend_status`, then
   :meth:`~smtpgate.policy.session.PolicySession.verified`), remembered and turned into
   the same reply a cached answer gets.  Anything that could still refuse after the
   verification (a deferral already armed, warn_if_reject, a class, a milter, VRFY)
   means a separate probe, because a recipient the backend accepted cannot be withdrawn.
"""

from __future__ import annotations

import re

from smtpgate.policy.model import DUNNO, ErrorClass, Status
from smtpgate.policy.ports import VerifyResult, VerifyStatus
from smtpgate.policy.registry import Ctx, restriction
from smtpgate.reply import Reply

LOCKSTEP_PROBE = "lockstep"  # the plan's mark (smtpgate.policy.plan imports this module)

_RECIPIENT_DSN = re.compile(r"[45]\.1\.(?:1|2|3|4|6|10)")
"""Enhanced codes that speak about a recipient (RFC 3463, RFC 7505): bad mailbox, bad
system, bad syntax, ambiguous, moved, null MX.  Not X.1.0, X.1.7, X.1.8: Postfix gives a
sender those (a refused MAIL FROM is also the reply to a lock-step transaction's RCPT)."""


def _tempfail(ctx: Ctx, code: int, text: str) -> Status:
    """Postfix DEFER_IF_PERMIT3(unverified_recipient_tempfail_action, ...)."""
    if ctx.plan.verify.tempfail_action == "defer_if_permit":
        ctx.defer_if_permit(ErrorClass.POLICY, code, "4.1.1", text)
        return DUNNO
    return ctx.reject(ErrorClass.POLICY, code, "4.1.1", text)


def apply_result(ctx: Ctx, result: VerifyResult, reply_name: str, reply_class: str) -> Status:
    """The reply Postfix's reject_unverified_address gives for ``result``."""
    if result.status is None:
        ctx.warn("verify service failure")
        return _tempfail(
            ctx, 450, f"<{reply_name}>: {reply_class} rejected: address verification problem"
        )
    codes = ctx.plan.codes
    if result.status is VerifyStatus.OK:
        return DUNNO
    if result.status is VerifyStatus.BOUNCE:
        code = codes.unverified_recipient_reject_code
    else:  # DEFER, or TODO (a probe in progress)
        code = codes.unverified_recipient_defer_code
    why = ctx.plan.verify.reject_reason or result.text
    if code // 100 == 4:
        return _tempfail(
            ctx, code, f"<{reply_name}>: {reply_class} rejected: unverified address: {why[:250]}"
        )
    return ctx.reject(
        ErrorClass.POLICY,
        code,
        "4.1.1",
        f"<{reply_name}>: {reply_class} rejected: undeliverable address: {why}",
    )


@restriction("reject_unverified_recipient")
async def reject_unverified_recipient(
    ctx: Ctx, arg: str | None, reply_name: str, reply_class: str
) -> Status:
    st = ctx.state
    address = st.recipient
    if not address:
        return DUNNO
    verifier = ctx.plan.verifier
    if verifier is None:
        ctx.note("verify", address, "no verifier configured")
        return apply_result(ctx, VerifyResult(None), reply_name, reply_class)
    lockstep = (
        arg == LOCKSTEP_PROBE
        and st.verify_by_relay
        and st.where == "RCPT"
        and st.recursion == 1
        and st.warn_if_reject == 0
        and not st.defer_if_permit.active
        and not st.defer_if_reject.active
    )
    result = await verifier.query(address, probe=not lockstep)
    if result is None:
        ctx.note("verify", address, "not cached: the relayed RCPT will be the probe")
        st.verify_pending = address
        return DUNNO
    source = "probe" if result.probed else "cache"
    shown = "failed" if result.status is None else result.status.name.lower()
    ctx.note("verify", address, f"{shown} ({source}){': ' + result.text if result.text else ''}")
    return apply_result(ctx, result, reply_name, reply_class)


def backend_status(reply: Reply, peer: str) -> tuple[VerifyStatus, str] | None:
    """What the backend's reply to the client's own RCPT says about the recipient, with
    the reason in Postfix's form (``host X[a] said: ... (in reply to RCPT TO command)``),
    or None when it says nothing about the recipient: a reply to a lock-step RCPT answers
    for the client's sender too, so only success or a recipient's addressing status
    (:data:`_RECIPIENT_DSN`, such as 5.1.1) counts; a policy refusal (5.7.1 for this
    sender), a refused sender (5.1.8) or a relay fault (4.3.0) is the client's answer
    alone and is not remembered."""
    said = f"host {namaddr(peer)} said: {' '.join(reply.lines())} (in reply to RCPT TO command)"
    if 200 <= reply.code < 300:
        return VerifyStatus.OK, said
    if not _RECIPIENT_DSN.fullmatch(reply.dsn):
        return None
    return (VerifyStatus.DEFER if reply.code < 500 else VerifyStatus.BOUNCE), said


def namaddr(peer: str) -> str:
    """``host[addr]`` of a ``host[addr]:port`` peer (Postfix's session namaddr)."""
    head, bracket, _ = peer.rpartition("]")
    return head + bracket if bracket else peer
