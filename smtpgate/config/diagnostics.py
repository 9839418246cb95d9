"""Where a setting came from, and what the loader has to say about it.

A :class:`Location` is a file and the number of the first physical line of a logical
line (Postfix ``readlline`` keeps that number too). Line 0 means "not from a file":
``-o`` overrides carry ``Location("command line", 0)``. A :class:`Diagnostic` is one
warning or error, printed the way Postfix prints them::

    /etc/smtpgate/main.cf, line 12: warning: unknown parameter: smtpd_foo = bar
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

COMMAND_LINE = "command line"


@dataclass(frozen=True)
class Location:
    """A file and line; line 0 means the value did not come from a file."""

    path: str
    line: int

    def __str__(self) -> str:
        if self.line <= 0:
            return self.path
        return f"{self.path}, line {self.line}"


COMMAND_LINE_LOCATION = Location(COMMAND_LINE, 0)


@dataclass(frozen=True)
class Diagnostic:
    """One finding of the loader: ``warning`` (it still works) or ``error`` (it cannot be used)."""

    severity: Literal["warning", "error"]
    message: str
    location: Location | None = None

    def __str__(self) -> str:
        if self.location is None:
            return f"{self.severity}: {self.message}"
        return f"{self.location}: {self.severity}: {self.message}"
