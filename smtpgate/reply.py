"""SMTP replies as values: the engine decides, the edge performs.

A :class:`Reply` carries the three-digit code, the RFC 3463 enhanced status code
(empty when there is none) and the text. ``disconnect`` says that the server closes
the connection after sending it (Postfix's 421/521 access actions).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: ``code dsn text``; may be multi-line when ``text`` holds newlines."""

    code: int
    dsn: str
    text: str
    disconnect: bool = False

    def lines(self) -> list[str]:
        """The reply as wire lines without CRLF (``250-...`` continuation form)."""
        parts = self.text.split("\n")
        prefix = f"{self.dsn} " if self.dsn else ""
        out = []
        for i, part in enumerate(parts):
            sep = " " if i == len(parts) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{part}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500


R451_CONFIG = Reply(451, "4.3.5", "Server configuration error")
R451_LOOKUP = Reply(451, "4.3.0", "Temporary lookup failure")
R451_LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error while processing")
