"""What the backend is told about the client: shared by the SMTP machine and the relay."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """What XFORWARD tells the backend about the SMTP client."""

    name: str
    """Client host name, or "unknown"."""
    addr: str
    """Client IP address."""
    port: int
    proto: str
    """"SMTP" or "ESMTP"."""
    helo: str | None
    ident: str | None = None
    """Log correlation id (XFORWARD IDENT, Postfix sends its queue id); None: unavailable."""
    source: str = "REMOTE"
    """XFORWARD SOURCE: "LOCAL" or "REMOTE" (Postfix: LOCAL for local_header_rewrite_clients)."""
    server: tuple[str, int] | None = None
    """The address and port the client connected to (a PROXY header to the backend names
    it); None: unknown."""
