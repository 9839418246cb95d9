"""One exception tree for smtpgate.

::

    SmtpgateError                 anything smtpgate raises on purpose
     +-- ConfigError              bad configuration; names file and line when known
     |    +-- TableOpenError      a table cannot be opened or parsed
     +-- TableLookupError         a lookup failed for now (a temporary error, never a miss)
     |    +-- TableUnavailableError   the table could not be opened: every lookup fails
     +-- RelayError               the backend MTA failed (refused, timeout, garbled)
     |    +-- FilterDestinationError  a FILTER next hop smtpgate cannot relay to
     +-- MilterError              a milter failed (down, slow, closed, garbled)
          +-- MilterProtocolError     a milter sent bytes that break the protocol

Library code raises these; only ``cli.py`` turns them into messages and exit codes.
"""

from __future__ import annotations


class SmtpgateError(Exception):
    """Base class of every error smtpgate raises on purpose."""


class ConfigError(SmtpgateError):
    """Configuration that cannot be used; ``str()`` reads ``file, line N: message``."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = path
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.path and self.line:
            return f"{self.path}, line {self.line}: {self.message}"
        if self.path:
            return f"{self.path}: {self.message}"
        return self.message


class TableOpenError(ConfigError):
    """A lookup table cannot be opened or one of its lines cannot be parsed."""


class TableLookupError(SmtpgateError):
    """A table lookup failed temporarily; callers must not treat it as "not found"."""


class TableUnavailableError(TableLookupError):
    """A lookup in a table that could not be opened (Postfix's surrogate table)."""


class RelayError(SmtpgateError):
    """The backend MTA did not complete an exchange."""


class FilterDestinationError(RelayError):
    """A FILTER destination smtpgate cannot relay to (``lmtp:``, a master.cf service...)."""


class MilterError(SmtpgateError):
    """A milter did not complete an exchange; its ``default_action`` applies."""


class MilterProtocolError(MilterError):
    """A milter's reply breaks the protocol; the message is the text Postfix logs."""
