"""The Sendmail milter protocol, MTA side: smtpgate as Postfix's milter client.

- :mod:`.protocol` -- the wire format without I/O: commands encoded, replies decoded.
- :mod:`.edits` -- end-of-message edits as pure functions (headers, body, envelope).
- :mod:`.client` -- :class:`Milters` (one per configuration generation) and
  :class:`MilterSession` (one per SMTP session, every milter in order) on asyncio.

The configuration is :class:`smtpgate.config.milterconf.MilterConfig`.
"""

from smtpgate.milter.client import (
    MessageResult,
    Milters,
    MilterSession,
    Verdict,
    WarningLog,
)

__all__ = ["MessageResult", "MilterSession", "Milters", "Verdict", "WarningLog"]
