"""In-process counterparts of Postfix's anvil(8) and a global in-flight DATA byte budget.

:class:`Anvil` keeps, per client address, the number of open connections and three event
rates (connections, MAIL commands, RCPT/VRFY commands), each counted in a fixed window of
``anvil_rate_time_unit`` that starts at the client's first event, as anvil does.  Memory is
bounded: entries with no open connection whose window has passed are pruned, and when the
table is full the oldest idle entries go first.

:class:`DataBudget` counts message bytes held in memory by all sessions, from the DATA
command until the relay to the backend has finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_CLIENTS = 100_000
"""Most client addresses tracked at once (about 100 bytes each)."""


@dataclass
class _Client:
    connections: int = 0
    start: float = 0.0
    conn_rate: int = 0
    mail_rate: int = 0
    rcpt_rate: int = 0


class Anvil:
    """Connection counts and event rates per client address."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_clients: int = MAX_CLIENTS
    ) -> None:
        self.clock = clock
        self.max_clients = max_clients
        self.clients: dict[str, _Client] = {}
        self.total = 0
        self._next_prune = 0.0

    def _entry(self, address: str, unit: float) -> _Client:
        now = self.clock()
        entry = self.clients.get(address)
        if entry is None:
            if len(self.clients) >= self.max_clients or now >= self._next_prune:
                self.prune(unit)
            entry = self.clients[address] = _Client(start=now)
        elif now - entry.start >= unit:
            entry.start, entry.conn_rate, entry.mail_rate, entry.rcpt_rate = now, 0, 0, 0
        return entry

    def prune(self, unit: float) -> None:
        """Forget idle clients whose window has passed; when still full, the oldest idle."""
        now = self.clock()
        self._next_prune = now + unit
        stale = [a for a, e in self.clients.items() if not e.connections and now - e.start >= unit]
        for address in stale:
            del self.clients[address]
        excess = len(self.clients) - self.max_clients + 1
        if excess > 0:
            idle = sorted((e.start, a) for a, e in self.clients.items() if not e.connections)
            for _, address in idle[:excess]:
                del self.clients[address]

    def connect(self, address: str, unit: float) -> tuple[int, int]:
        """A new connection: (open connections of this client, its connection rate)."""
        entry = self._entry(address, unit)
        entry.connections += 1
        entry.conn_rate += 1
        self.total += 1
        return entry.connections, entry.conn_rate

    def disconnect(self, address: str) -> None:
        entry = self.clients.get(address)
        if entry is not None and entry.connections > 0:
            entry.connections -= 1
        self.total = max(self.total - 1, 0)

    def mail(self, address: str, unit: float) -> int:
        """A MAIL command: the client's message rate."""
        entry = self._entry(address, unit)
        entry.mail_rate += 1
        return entry.mail_rate

    def rcpt(self, address: str, unit: float) -> int:
        """A RCPT or VRFY command: the client's recipient rate."""
        entry = self._entry(address, unit)
        entry.rcpt_rate += 1
        return entry.rcpt_rate


class DataBudget:
    """Message bytes held in memory by every session together."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0

    def full(self, limit: int, reserve: int = 0) -> bool:
        """No room for ``reserve`` more bytes (at least one byte) under ``limit``."""
        return bool(limit) and self.in_flight + max(min(reserve, limit), 1) > limit

    def take(self, size: int, limit: int) -> bool:
        """Count ``size`` more bytes; False (nothing counted) when that exceeds ``limit``."""
        if limit and self.in_flight + size > limit:
            return False
        self.in_flight += size
        self.peak = max(self.peak, self.in_flight)
        return True

    def give_back(self, size: int) -> None:
        self.in_flight = max(self.in_flight - size, 0)
