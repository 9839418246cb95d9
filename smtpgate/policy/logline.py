"""The one form of Postfix's action log line (``log_whatsup()`` in smtpd_check.c).

``NOQUEUE: reject: RCPT from host[addr]: 554 5.7.1 <x>: text; from=<s> to=<r> proto=ESMTP
helo=<h>``: the restrictions (``engine.py``) and the SMTP machine (``smtp/machine.py``,
for the relay's and DISCARD's lines) both write it through :func:`whatsup_line`.
Addresses are shown in external form (``info_log_address_format = external``, Postfix's
default): a local part that needs quoting is quoted.
"""

from __future__ import annotations

from collections.abc import Sequence

from smtpgate.policy.address import quote_822_local


def whatsup_line(
    *,
    queue_id: str | None,
    whatsup: str,
    where: str,
    namaddr: str,
    text: str,
    sender: str | None,
    recipients: Sequence[str],
    protocol: str,
    helo: str | None,
    extra: str = "",
) -> str:
    """One action line; ``extra`` is appended (the relay's ``relay=host[addr]:port``)."""
    line = f"{queue_id or 'NOQUEUE'}: {whatsup}: {where} from {namaddr}: {text};"
    if sender is not None:
        line += f" from=<{quote_822_local(sender)}>"
    for recipient in recipients:
        line += f" to=<{quote_822_local(recipient)}>"
    if protocol:
        line += f" proto={protocol}"
    if helo is not None:
        line += f" helo=<{helo}>"
    if extra:
        line += f" {extra}"
    return line
