"""postscreen's cache: which tests a client passed, and until when.

A record is postscreen's own (``postscreen_tests.c``): five expiry times, in seconds
since the epoch, for the pregreet, DNSBL, pipelining, non-SMTP command and bare newline
tests, ``"pregreet;dnsbl;pipelining;non_smtp;bare_newline"``.  0 means the test was
never passed, 1 that it was never passed and was disabled when the record was written
(so that enabling a test later does not turn an old client into a new one).

:class:`PassCache` is the port: :class:`MemoryPassCache` here (one worker's memory,
bounded), ``smtpgate.screencache.StorePassCache`` in ``smtpgate_shared_state`` (Redis:
every worker and every instance).  A record lives until its last test expires plus
``postscreen_cache_retention_time``, as postscreen's cache cleanup keeps it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

TESTS = ("pregreet", "dnsbl", "pipelining", "non_smtp", "bare_newline")
NEW = 0
DISABLED = 1
MAX_ENTRIES = 100_000


@dataclass
class Expiry:
    """The five expiry times of one client (postscreen's ``expire_time[]``)."""

    times: list[int]

    @classmethod
    def new(cls) -> Expiry:
        return cls([NEW] * len(TESTS))

    @classmethod
    def parse(cls, text: str) -> Expiry:
        """A cache record; fields missing or malformed count as disabled (as postscreen)."""
        times = []
        fields = text.split(";")
        for index in range(len(TESTS)):
            field = fields[index].strip() if index < len(fields) else ""
            times.append(int(field) if field.isdigit() else DISABLED)
        return cls(times)

    def format(self) -> str:
        return ";".join(str(t) for t in self.times)

    def get(self, test: str) -> int:
        return self.times[TESTS.index(test)]

    def set(self, test: str, value: int) -> None:
        self.times[TESTS.index(test)] = value

    def last(self) -> int:
        return max(self.times)


class PassCache(Protocol):
    """Where passes are remembered (postscreen_cache_map)."""

    async def get(self, address: str) -> str | None:
        """The record of ``address``, or None."""
        ...

    async def set(self, address: str, record: str, ttl: float) -> None:
        """Remember ``record`` for ``ttl`` seconds."""
        ...


class MemoryPassCache:
    """A :class:`PassCache` in this process's memory (the oldest go first when full)."""

    def __init__(
        self, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._entries: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()

    async def get(self, address: str) -> str | None:
        entry = self._entries.get(address)
        if entry is None:
            return None
        expires, record = entry
        if expires <= self.clock():
            del self._entries[address]
            return None
        return record

    async def set(self, address: str, record: str, ttl: float) -> None:
        if ttl <= 0:
            self._entries.pop(address, None)
            return
        self._entries[address] = (self.clock() + ttl, record)
        self._entries.move_to_end(address)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
