"""Where a message goes: the envelope and next hop that access(5) actions ask for.

A queueing Postfix changes what it delivers after the fact (cleanup applies REDIRECT, BCC,
FILTER and HOLD to the queue file); a proxy must decide the envelope it relays.  These
functions turn the actions a transaction collected (``SessionState.queue_actions``, in the
order they fired) into that envelope, as close as a proxy can come to what Postfix's queue
would deliver:

- REDIRECT replaces every recipient with its target (the last REDIRECT wins, as in
  cleanup) and wins over BCC and FILTER;
- BCC adds its address once;
- FILTER sends the message to its next hop instead of relayhost (the last one wins);
- HOLD goes to ``smtpgate_hold_relayhost`` when there is one (``holds_elsewhere``), else
  to relayhost, marked (the machine adds the header).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    """Where a transaction's message goes, as the access(5) actions left it."""

    recipients: tuple[str, ...]
    filter: str | None = None
    hold: bool = False
    redirected: bool = False


def route_of(
    recipients: Sequence[str],
    actions: Sequence[tuple[str, str]],
    holds_elsewhere: bool,
) -> Route:
    """The envelope and next hop for these accepted recipients and actions."""
    envelope = list(recipients)
    redirect: str | None = None
    bcc: list[str] = []
    filter_to: str | None = None
    hold = False
    for verb, value in actions:
        if verb == "REDIRECT":
            redirect = value
        elif verb == "BCC":
            bcc.append(value)
        elif verb == "FILTER":
            filter_to = value
        elif verb == "HOLD":
            hold = True
    held_elsewhere = hold and holds_elsewhere
    if redirect is not None:
        # one delivery to the target, through relayhost, as Postfix's queue makes it
        return Route((redirect,), None, held_elsewhere, redirected=True)
    for address in bcc:
        if address not in envelope:
            envelope.append(address)
    return Route(tuple(envelope), None if held_elsewhere else filter_to, held_elsewhere)


def lockstep(actions: Sequence[tuple[str, str]], holds_elsewhere: bool) -> bool:
    """Whether RCPT goes to the backend while the client waits: not once REDIRECT, FILTER
    or a HOLD with its own next hop decided that the message goes elsewhere (that
    transaction is opened at DATA, with the final envelope)."""
    return not any(
        verb in ("REDIRECT", "FILTER") or verb == "HOLD" and holds_elsewhere for verb, _ in actions
    )
