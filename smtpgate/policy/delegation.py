"""``check_policy_service``: Postfix's policy delegation, without its I/O.

Theory of operation (Postfix 3.7 ``smtpd_check.c::check_policy_service``):

1. The restriction builds the request's attributes from the session state, in the
   order and with the values Postfix 3.7 sends (:func:`request_attributes`).
2. It asks the plan's :class:`~smtpgate.policy.ports.PolicyClient` (the adapter in
   ``smtpgate/delegation.py`` speaks the protocol, reuses connections, retries and
   times out; tests use ``FakePolicyClient``), and logs the warnings the client met.
3. The answer's ``action`` is an access(5) action, performed by the engine's own
   ``check_table_result`` with the service as the "table" and ``policy query`` as the
   key: ``OK``, ``REJECT text``, ``450 text``, ``DEFER_IF_PERMIT``, ``PREPEND``, a
   restriction class name... exactly as a table value.
4. No usable answer (server down, timeout, garbage, closed), or an action that is not
   valid UTF-8: the service's ``default_action`` is performed the same way
   (``451 4.3.5 Server configuration problem`` by default).
"""

from __future__ import annotations

import os
import time

from smtpgate.config.policyconf import PolicyService
from smtpgate.policy.model import SessionState, Status
from smtpgate.policy.ports import PolicyAnswer
from smtpgate.policy.registry import Ctx, restriction

POLICY_QUERY = "policy query"
"""The "key" Postfix names in the warnings about a policy answer it cannot use."""

_COUNTED_STAGES = frozenset({"DATA", "BDAT", "END-OF-MESSAGE"})


def request_attributes(state: SessionState, service: PolicyService) -> list[tuple[str, str]]:
    """The attributes of one request, in Postfix 3.7's order (smtpd_check.c).

    Postfix 3.8 added ``compatibility_level`` and ``mail_version``; 3.7 does not send
    them, and neither does smtpgate.
    """
    st = state
    where = st.where
    client = st.client
    size = st.actual_size if st.actual_size > 0 else st.message_size
    tls = st.tls
    return [
        ("request", "smtpd_access_policy"),
        ("protocol_state", "DATA" if where == "BDAT" else where),
        ("protocol_name", st.protocol),
        ("client_address", client.address),
        ("client_name", client.name),
        ("client_port", str(client.port)),
        ("reverse_client_name", client.reverse_name),
        ("server_address", st.server_address),
        ("server_port", str(st.server_port)),
        ("helo_name", st.helo_name or ""),
        ("sender", st.sender or ""),
        ("recipient", st.recipient or ""),
        ("recipient_count", str(st.rcpt_count if where.upper() in _COUNTED_STAGES else 0)),
        ("queue_id", st.queue_id or ""),
        ("instance", st.instance),
        ("size", str(size)),
        ("etrn_domain", st.etrn_name or ""),
        ("stress", ""),
        ("sasl_method", ""),
        ("sasl_username", ""),
        ("sasl_sender", ""),
        ("ccert_subject", ""),
        ("ccert_issuer", ""),
        ("ccert_fingerprint", ""),
        ("ccert_pubkey_fingerprint", ""),
        ("encryption_protocol", tls.protocol if tls else ""),
        ("encryption_cipher", tls.cipher if tls else ""),
        ("encryption_keysize", str(tls.keysize if tls else 0)),
        ("policy_context", service.policy_context),
    ]


_sequence = 0


def new_instance() -> str:
    """A transaction id in Postfix's form: pid, seconds, microseconds, sequence, in hex
    (``%x.%lx.%lx.%x``); unique within a worker process."""
    global _sequence
    now = time.time()
    seconds = int(now)
    value = f"{os.getpid():x}.{seconds:x}.{int((now - seconds) * 1e6):x}.{_sequence:x}"
    _sequence += 1
    return value


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        return False
    return True


@restriction("check_policy_service", arg="service")
async def check_policy_service(
    c: Ctx, service: PolicyService, reply_name: str, reply_class: str
) -> Status:
    """Ask the policy server and perform its action (see the module docstring)."""
    client = c.plan.policy_client
    attributes = request_attributes(c.state, service)
    if client is None:
        # A plan built without the adapter (a unit test that gave none): as a server
        # that cannot be reached, so that nothing passes that Postfix would refuse.
        answer = PolicyAnswer(None, (f"no policy client: cannot ask {service.endpoint}",))
    else:
        answer = await client.ask(service, attributes)
    for warning in answer.warnings:
        c.warn(warning)
    action = answer.action
    if action is not None and not _valid_utf8(action):
        shown = action.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        c.warn(f'malformed UTF-8 in policy server {service.name} response: "{shown}"')
        action = None
    if action is None:
        c.note(
            service.endpoint, POLICY_QUERY, f"no answer: default action {service.default_action}"
        )
        action = service.default_action
    else:
        c.note(service.endpoint, POLICY_QUERY, f"action={action}")
    return c.check_table_result(service.name, action, POLICY_QUERY, reply_name, reply_class)
