"""Recipient verification against the backend: Postfix's verify(8) cache, and probes.

:class:`RelayVerifier` is the :class:`~smtpgate.policy.ports.AddressVerifier` that
``serve`` binds to a plan that names ``reject_unverified_recipient``.

Theory of operation (Postfix 3.7 ``src/verify/verify.c``):

1. An entry is Postfix's record ``status:probed:updated:text``: the recipient status
   (0 deliverable, 1 deferred, 2 bounced), when a refresh probe was last sent (0: none
   outstanding), when the answer arrived, and the reason.  It is used until it expires
   (``address_verify_positive_expire_time``, 31d; ``_negative_expire_time``, 3d); once
   older than the refresh time (7d; 3h) it is still used, and a probe is sent in the
   background to refresh it (one per :data:`PROBE_TTL` at most, as Postfix).
2. An address with no usable entry is probed now (Postfix answers "in progress" and
   polls; smtpgate waits for the probe, which takes one backend round trip): the first
   RCPT for an unknown address gets the real answer.  Concurrent queries for one address
   share one probe.
3. A probe is the backend's own RCPT answer on a pooled relay connection:
   ``MAIL FROM:<$address_verify_sender>`` (``double-bounce@$myorigin`` by default, with a
   time stamp in the local part when ``address_verify_sender_ttl`` is set),
   ``RCPT TO:<address>``, then ``RSET`` and the connection goes back to the pool.  2xx is
   deliverable, 4xx deferred, 5xx bounced; the reason is Postfix's smtp client's
   ``host mx[192.0.2.1] said: 550 5.1.1 ... (in reply to RCPT TO command)`` (a refused
   MAIL gives the whole probe that status, ``in reply to MAIL FROM command``).
4. Answers are remembered by the rules of Postfix's verify service: a success always; a
   failure only with ``address_verify_negative_cache = yes``, and never over a success
   that has not expired (the address is probed again at the next query instead).
5. A probe that gets no answer (the backend cannot be reached, times out, garbles) is a
   verification failure: nothing is remembered and the restriction answers "address
   verification problem".  Postfix would remember a deferral with the connection error
   for 3 hours and show it to the client; smtpgate shows no internal detail to strangers
   and tries again at the next RCPT.
6. Where: with several workers, in the supervisor (the anvil service's G and S
   requests), shared by every worker of the serve; with one, in its memory; with
   ``smtpgate_shared_state`` in the shared store (``smtpgate:verify:<address>``, the
   Postfix record as the value, expiring with the entry), shared by every worker and
   instance.  While the store does not answer, the worker's memory stands in (at most
   :data:`LOCAL_ENTRIES` addresses, the oldest dropped first).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from smtpgate.config.policyconf import VerifyConfig
from smtpgate.policy.address import quote_822_local
from smtpgate.policy.ports import VerifyResult, VerifyStatus
from smtpgate.policy.verification import namaddr
from smtpgate.relay.client import Connection, Fault, command
from smtpgate.relay.wire import arg

if TYPE_CHECKING:
    from smtpgate.relay import Relay

log = logging.getLogger("smtpgate.verify")


class ValueStore(Protocol):
    """Where entries are shared: a ``shared_state.SharedStore`` (Redis, every instance)
    or ``shared_state.AnvilStore`` (the supervisor, every worker of one serve).  Both raise
    ``shared_state.StoreUnavailable`` when they do not answer."""

    @property
    def available(self) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes | str, ttl: float) -> None: ...


PROBE_TTL = 1000.0
"""Seconds during which a sent refresh probe is not sent again (Postfix's PROBE_TTL)."""
LOCAL_ENTRIES = 100_000
"""Addresses a worker remembers without a shared store."""
KEY_PREFIX = "verify:"

_SAFE_CHARS = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"


@dataclass(frozen=True, slots=True)
class Entry:
    """One cache record (Postfix's ``status:probed:updated:text``)."""

    status: VerifyStatus
    probed: float
    updated: float
    text: str

    def encode(self) -> str:
        return f"{int(self.status)}:{int(self.probed)}:{int(self.updated)}:{self.text}"

    @classmethod
    def decode(cls, raw: bytes | str) -> Entry | None:
        """The entry, or None for a malformed one (Postfix: a warning, then "unknown")."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        parts = text.split(":", 3)
        if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
            return None
        status, probed, updated = (int(p) for p in parts[:3])
        if status not in (0, 1, 2, 3) or not (probed or updated):
            return None
        return cls(VerifyStatus(status), float(probed), float(updated), parts[3])


def store_key(address: str) -> str:
    """The shared store's key: the address, with bytes that are not UTF-8 (kept as lone
    surrogates) escaped, so that no address can make the store fail."""
    return KEY_PREFIX + address.encode("utf-8", "surrogateescape").decode(
        "utf-8", "backslashreplace"
    )


def probe_sender(config: VerifyConfig, now: float) -> str:
    """The probe's MAIL FROM (Postfix make_verify_sender_addr): the time stamp
    ``now / address_verify_sender_ttl`` in base 31 appended to the local part."""
    sender = config.sender
    if not sender or config.sender_ttl <= 0:
        return sender
    value = int(now // config.sender_ttl)
    digits = ""
    while value:
        value, digit = divmod(value, 31)
        digits = _SAFE_CHARS[digit] + digits
    local, at, domain = sender.rpartition("@")
    return f"{local}{digits}{at}{domain}" if at else sender + digits


class RelayVerifier:
    """Recipient verification by the backend (see the module docstring)."""

    def __init__(
        self,
        relay: Relay,
        config: VerifyConfig,
        *,
        store: ValueStore | None = None,
        clock: Callable[[], float] = time.time,
        local_entries: int = LOCAL_ENTRIES,
    ) -> None:
        self.relay = relay
        self.config = config
        self.store = store
        """The shared store (set by the worker when smtpgate_shared_state is set)."""
        self.clock = clock
        self.local_entries = local_entries
        self._local: OrderedDict[str, Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[VerifyResult]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.probes = 0
        """Probes sent (for tests and statistics)."""

    # -- the port ------------------------------------------------------------------------

    async def query(self, address: str, *, probe: bool = True) -> VerifyResult | None:
        now = self.clock()
        entry = await self._get(address)
        if entry is not None and not self._expired(entry, now):
            if self._refresh_due(address, entry, now):
                await self._put(address, replace(entry, probed=now))
                self._spawn(self._shared_probe(address))
            if entry.status is not VerifyStatus.TODO:
                return VerifyResult(entry.status, entry.text)
        if not probe:
            return None
        return await self._shared_probe(address)

    async def record(self, address: str, status: VerifyStatus, text: str) -> None:
        await self._update(address, status, text)

    async def close(self) -> None:
        """Wait for background refresh probes (a worker that stops)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- cache rules (Postfix verify.c) --------------------------------------------------

    def _expired(self, entry: Entry, now: float) -> bool:
        if entry.status is VerifyStatus.OK:
            return entry.updated + self.config.positive_expire < now
        return entry.updated + self.config.negative_expire < now

    def _refresh_due(self, address: str, entry: Entry, now: float) -> bool:
        if now - entry.probed <= PROBE_TTL or address in self._inflight:
            return False
        if entry.status is VerifyStatus.OK:
            return entry.updated + self.config.positive_refresh < now
        return entry.updated + self.config.negative_refresh < now

    def _ttl(self, entry: Entry, now: float) -> float:
        life = (
            self.config.positive_expire
            if entry.status is VerifyStatus.OK
            else self.config.negative_expire
        )
        return max(1.0, entry.updated + life - now)

    async def _update(self, address: str, status: VerifyStatus, text: str) -> None:
        """Remember a probe's answer (Postfix verify_update_service + verify_append)."""
        if status is not VerifyStatus.OK:
            if not self.config.negative_cache:
                return
            old = await self._get(address)
            if (
                old is not None
                and old.status is VerifyStatus.OK
                and not self._expired(old, self.clock())
            ):
                return  # a failed probe never clobbers a success before it expires
        printable = "".join(c if c.isprintable() else "?" for c in text)
        await self._put(address, Entry(status, 0.0, self.clock(), printable))

    # -- storage -------------------------------------------------------------------------

    async def _get(self, address: str) -> Entry | None:
        store = self.store
        if store is not None and store.available:
            from smtpgate.shared_state import StoreUnavailable

            try:
                raw = await store.get(store_key(address))
            except StoreUnavailable:
                pass
            else:
                if raw is None:
                    return None
                entry = Entry.decode(raw)
                if entry is None:
                    log.warning("bad address verify table entry: %.100r", raw)
                return entry
        return self._local.get(address)

    async def _put(self, address: str, entry: Entry) -> None:
        store = self.store
        if store is not None and store.available:
            from smtpgate.shared_state import StoreUnavailable

            try:
                ttl = self._ttl(entry, self.clock())
                await store.set(store_key(address), entry.encode(), ttl)
            except StoreUnavailable:
                pass
            else:
                return
        local = self._local
        local[address] = entry
        local.move_to_end(address)
        while len(local) > self.local_entries:
            local.popitem(last=False)

    # -- probes --------------------------------------------------------------------------

    async def _shared_probe(self, address: str) -> VerifyResult:
        """One probe per address at a time: later callers wait for the first's answer.
        The probe is a task of its own, so a caller that goes away does not end it."""
        task = self._inflight.get(address)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._probe_and_remember(address))
            self._inflight[address] = task
            task.add_done_callback(lambda _: self._inflight.pop(address, None))
        return await asyncio.shield(task)

    async def _probe_and_remember(self, address: str) -> VerifyResult:
        found = await self._probe(address)
        if found is None:
            return VerifyResult(None, probed=True)
        await self._update(address, *found)
        return VerifyResult(*found, probed=True)

    async def _probe(self, address: str) -> tuple[VerifyStatus, str] | None:
        """MAIL, RCPT, RSET on a relay connection: the status and reason, or None when
        the backend gave no answer (logged)."""
        hop = self.relay.relayhost
        rcpt = arg(quote_822_local(address))
        sender = arg(quote_822_local(probe_sender(self.config, self.clock())))
        if hop is None or rcpt is None or sender is None:
            why = "relayhost is empty" if hop is None else "control characters in the address"
            log.warning("cannot probe <%s>: %s", address, why)
            return None
        self.probes += 1
        pool = self.relay.pool(hop)
        timeout = self.relay.command_timeout
        conn: Connection | None = None
        try:
            for _ in range(2):  # a stale pooled connection is replaced once
                conn = await pool.checkout(None)
                if not conn.reused:
                    break
                try:
                    await command(conn, "RSET", b"RSET\r\n", timeout, passthrough=False)
                    break
                except Fault:
                    conn.close()
                    conn = None
            if conn is None:
                conn = await pool.checkout(None)
            conn.transactions += 1
            mail_line = b"MAIL FROM:<" + sender + b">"
            if not address.isascii() and "smtputf8" in conn.extensions:
                mail_line += b" SMTPUTF8"  # Postfix: smtputf8_autodetect_classes has verify
            mail = await command(conn, "MAIL FROM", mail_line + b"\r\n", timeout)
            verb = "MAIL FROM"
            reply = mail
            if mail.is_success:
                verb = "RCPT TO"
                reply = await command(conn, "RCPT TO", b"RCPT TO:<" + rcpt + b">\r\n", timeout)
        except Fault as fault:
            if conn is not None:
                conn.close()
            peer = conn.peer if conn is not None else hop
            log.warning("verification probe for <%s>: backend %s: %s", address, peer, fault.detail)
            return None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        await pool.checkin(conn, rset=True)
        said = f"host {namaddr(conn.peer)} said: {' '.join(reply.lines())}"
        said += f" (in reply to {verb} command)"
        if reply.is_success:
            return VerifyStatus.OK, said
        return (VerifyStatus.DEFER if reply.code < 500 else VerifyStatus.BOUNCE), said

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(_finished(self._tasks))


def _finished(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background verification probe failed: %r", task.exception())

    return done
