"""Enhanced status codes fitted to what is rejected (Postfix ``smtpd_dsn_fix.c``).

An access table may be shared by sender, recipient and client checks, so an address
code such as ``5.1.1`` (bad destination mailbox) is rewritten for the role: into the
sender twin when a sender is rejected, back into the recipient twin for a recipient,
and into ``X.0.0`` for anything that is not an address.  Other codes pass unchanged.
The first digit is fixed later, when the reply code is known.
"""

from __future__ import annotations

from smtpgate.policy.model import RECIPIENT, SENDER

# micro code -> (sender replacement, recipient replacement), as Postfix 3.7 answers
# (measured: 5.1.1, 5.1.4 and 5.1.6 become 5.1.7 for a sender; later Postfix releases
# map them to 5.1.0).
_DSN_MAP = {
    "1": ("4.1.7", "4.1.1"),
    "2": ("4.1.8", "4.1.2"),
    "3": ("4.1.7", "4.1.3"),
    "4": ("4.1.7", "4.1.4"),
    "5": ("4.1.0", "4.1.5"),
    "6": ("4.1.7", "4.1.6"),
    "7": ("4.1.7", "4.1.3"),
    "8": ("4.1.8", "4.1.2"),
}
_DEFAULT = ("4.1.0", "4.1.0")


def smtpd_dsn_fix(status: str, reply_class: str) -> str:
    """The DSN to use when ``status`` rejects something of ``reply_class``."""
    if not (status[:1].isdigit() and status[1:4] == ".1."):
        return status
    sender_dsn, rcpt_dsn = _DSN_MAP.get(status[4:], _DEFAULT)
    if reply_class == SENDER:
        return sender_dsn
    if reply_class == RECIPIENT:
        return rcpt_dsn
    return "4.0.0"
