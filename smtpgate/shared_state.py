"""State shared by several smtpgate instances, in Redis (``smtpgate_shared_state``).

One machine's workers count together in the supervisor's anvil (``smtpgate.anvil``).
Several machines behind one MX name or one load balancer each see part of a client's
connections, so the per-client limits would each hold only per machine.  With
``smtpgate_shared_state = redis://host:port/db`` the per-client counters live in Redis:

* :class:`SharedStore` is what the rest of smtpgate may ask of the store: plain values
  and counters with a time to live (for later caches: DNS list answers, recipient
  verification, greylisting, postscreen's cache) and the anvil's operations.
  :class:`RedisStore` implements it with redis-py's asyncio client: every operation one
  Lua script or one command (atomic: concurrent instances cannot overshoot a limit),
  bounded by :data:`TIMEOUT`.
* :class:`SharedAnvil` is the ``AnvilClient`` (the machine's ``Anvil`` port) of a worker
  when the store is set: per-client connection counts and rates from the store, the
  total (``smtpgate_connection_limit``) and the DATA memory budget from the instance's
  own anvil, which keeps counting everything too, so it can answer alone at any time.

What is shared and what is not: the connection count and the three rates of a client
address are shared (they limit a client, wherever it lands).  ``smtpgate_connection_limit``
and ``smtpgate_data_memory_limit`` stay per instance: they protect the instance's own file
descriptors and memory, which another instance's load does not use.

Key layout (``smtpgate:`` prefix, in the URL's database)::

    smtpgate:anvil:conn:<address>   sorted set: one member per open connection
                                    ("<instance>:<n>"), scored by its lease's end
                                    (Redis server time, ms); key TTL = the lease
    smtpgate:anvil:rate:<address>   hash: conn, mail, rcpt; TTL anvil_rate_time_unit
                                    from the client's first event (anvil's window)
    smtpgate:verify:<address>       recipient verification (smtpgate.verify): Postfix's
                                    verify(8) record, expiring with the entry
    smtpgate:<namespace>:<key>      get/set/incr of later caches

A connection's member is added at connect and removed at disconnect.  Each worker renews
the leases of its open connections every third of ``smtpgate_shared_state_lease``; the
connect script drops members whose lease has passed before it counts.  So the
connections of an instance that crashed (or lost Redis) stop counting after one lease,
and never block a client for longer.  A renewal adds members that are missing, so
connections opened while Redis was away count again as soon as it is back.

Redis unreachable: an operation that fails or does not answer within :data:`TIMEOUT`
marks the store down; while it is down, operations fail at once (no session waits for
Redis) and the anvil answers from the instance's own counters.  A probe (PING) every
:data:`PROBE_EVERY` seconds brings it back.  The warning
``smtpgate_shared_state redis://host:port/db: <why>; using local counters`` is logged
once a minute at most, and a line when Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import secrets
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from smtpgate.anvil import AnvilClient, Counts, RemoteAnvil, Reserved

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("smtpgate.shared_state")

T = TypeVar("T")

TIMEOUT = 0.25
"""Seconds any one Redis operation may take before the store counts as down."""
PROBE_EVERY = 1.0
"""Seconds between PINGs while the store is down."""
WARN_EVERY = 60.0
"""The down warning is logged at most this often."""
PREFIX = "smtpgate:"
RENEW_BATCH = 500
"""Connections renewed by one script call."""
MAX_UNREMOVED = 10_000
"""Ended connections remembered for removal once the store answers again."""
MAX_POOL = 64
"""Redis connections one worker opens at most (a session waits for one, within TIMEOUT)."""


class StoreUnavailable(Exception):
    """The store did not answer (down, timed out, or refused the operation)."""


class SharedStore(Protocol):
    """A key-value store shared by instances.  Every operation raises
    :class:`StoreUnavailable` rather than wait or fail otherwise; callers fall back to
    what they know alone.  ``ttl`` and ``unit`` are in seconds."""

    @property
    def name(self) -> str:
        """How the log names the store (no password)."""
        ...

    @property
    def available(self) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes | str, ttl: float) -> None: ...

    async def incr(self, key: str, ttl: float) -> int:
        """Add one; a new key lives ``ttl`` seconds from this first increment."""
        ...

    async def connect(
        self, address: str, member: str, lease: float, unit: float
    ) -> tuple[int, int]:
        """Count connection ``member`` of ``address`` (held for ``lease`` seconds unless
        renewed): (open connections of the address, its connection rate)."""
        ...

    async def disconnect(self, address: str, member: str) -> None: ...

    async def renew(self, members: Sequence[tuple[str, str]], lease: float) -> None:
        """Extend the leases of these (address, member) connections, re-adding missing ones."""
        ...

    async def event(self, address: str, kind: str, unit: float) -> int:
        """Count a "mail" or "rcpt" event of ``address``: its rate."""
        ...

    def on_recover(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the store answers again after being down."""
        ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- Redis

# Redis's own clock (TIME) scores the leases: the instances' clocks need not agree.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A rate counter's window starts at the first event and lasts one unit (anvil's).
_COUNT_IN_WINDOW = """
local function count_in_window(key, field, unit_ms)
  local n = redis.call('HINCRBY', key, field, 1)
  if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, unit_ms) end
  return n
end
"""

CONNECT_SCRIPT = (
    _NOW_MS
    + _COUNT_IN_WINDOW
    + """
-- KEYS: conn zset, rate hash; ARGV: member, lease_ms, unit_ms
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
local count = redis.call('ZCARD', KEYS[1])
return {count, count_in_window(KEYS[2], 'conn', tonumber(ARGV[3]))}
"""
)

EVENT_SCRIPT = (
    _COUNT_IN_WINDOW
    + """
-- KEYS: rate hash; ARGV: field, unit_ms
return count_in_window(KEYS[1], ARGV[1], tonumber(ARGV[2]))
"""
)

INCR_SCRIPT = """
-- KEYS: key; ARGV: ttl_ms
local n = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""

RENEW_SCRIPT = (
    _NOW_MS
    + """
-- KEYS: conn zsets; ARGV: lease_ms, then one member per key
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, ARGV[i + 1])
  local ttl = redis.call('PTTL', key)
  if ttl < lease then redis.call('PEXPIRE', key, lease) end
end
return #KEYS
"""
)


def display_url(url: str) -> str:
    """The URL without user and password, for the log."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def conn_key(address: str) -> str:
    return f"{PREFIX}anvil:conn:{address}"


def rate_key(address: str) -> str:
    return f"{PREFIX}anvil:rate:{address}"


def _ms(seconds: float) -> int:
    return max(int(math.ceil(seconds * 1000)), 1)


class RedisStore:
    """:class:`SharedStore` on one Redis server (redis-py's asyncio client).

    Built in a worker, on its event loop (the client connects on first use).  Not safe
    to share between event loops.
    """

    def __init__(
        self,
        url: str,
        timeout: float = TIMEOUT,
        probe_every: float = PROBE_EVERY,
        warn_every: float = WARN_EVERY,
    ) -> None:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.timeout = timeout
        self.probe_every = probe_every
        self.warn_every = warn_every
        self._name = display_url(url)
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_POOL,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self.redis: Redis = Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self._connect = self.redis.register_script(CONNECT_SCRIPT)
        self._event = self.redis.register_script(EVENT_SCRIPT)
        self._incr = self.redis.register_script(INCR_SCRIPT)
        self._renew = self.redis.register_script(RENEW_SCRIPT)
        self._down = False
        self._why = ""
        self._warned = -math.inf
        self._probe: asyncio.Task[None] | None = None
        self._recovered: list[Callable[[], None]] = []
        self.failures = 0
        """Operations that failed (for tests and, later, metrics)."""

    @property
    def name(self) -> str:
        return self._name

    @property
    def available(self) -> bool:
        return not self._down

    def on_recover(self, callback: Callable[[], None]) -> None:
        self._recovered.append(callback)

    # -- the operations

    async def get(self, key: str) -> bytes | None:
        value = await self._call(lambda: self.redis.get(PREFIX + key))
        return value.encode() if isinstance(value, str) else value

    async def set(self, key: str, value: bytes | str, ttl: float) -> None:
        await self._call(lambda: self.redis.set(PREFIX + key, value, px=_ms(ttl)))

    async def incr(self, key: str, ttl: float) -> int:
        return int(await self._call(lambda: self._incr(keys=[PREFIX + key], args=[_ms(ttl)])))

    async def connect(
        self, address: str, member: str, lease: float, unit: float
    ) -> tuple[int, int]:
        keys = [conn_key(address), rate_key(address)]
        count, rate = await self._call(
            lambda: self._connect(keys=keys, args=[member, _ms(lease), _ms(unit)])
        )
        return int(count), int(rate)

    async def disconnect(self, address: str, member: str) -> None:
        await self._call(lambda: self.redis.zrem(conn_key(address), member))

    async def renew(self, members: Sequence[tuple[str, str]], lease: float) -> None:
        for start in range(0, len(members), RENEW_BATCH):
            batch = members[start : start + RENEW_BATCH]
            keys = [conn_key(address) for address, _ in batch]
            args = [_ms(lease), *(member for _, member in batch)]
            await self._call(lambda k=keys, a=args: self._renew(keys=k, args=a))  # type: ignore[misc]

    async def event(self, address: str, kind: str, unit: float) -> int:
        if kind not in ("mail", "rcpt"):
            raise ValueError(f"unknown event {kind!r}")
        keys = [rate_key(address)]
        return int(await self._call(lambda: self._event(keys=keys, args=[kind, _ms(unit)])))

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(BaseException):
                await self._probe
            self._probe = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), 1.0)

    # -- availability

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one operation within the timeout; StoreUnavailable (at once while down)."""
        if self._down:
            raise StoreUnavailable(self._why)
        try:
            async with asyncio.timeout(self.timeout):
                return await operation()
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self._fail(f"no answer within {self.timeout:g}s")
        except Exception as exc:  # redis-py's errors, OSError: all mean "not now"
            self._fail(_describe(exc))
        raise StoreUnavailable(self._why)

    def _fail(self, why: str) -> None:
        self.failures += 1
        self._why = why
        if not self._down:
            self._down = True
            self._probe = asyncio.get_running_loop().create_task(self._wait_for_redis())
        now = time.monotonic()
        if now - self._warned >= self.warn_every:
            self._warned = now
            log.warning("smtpgate_shared_state %s: %s; using local counters", self.name, why)

    async def _wait_for_redis(self) -> None:
        """While down: PING every probe_every seconds; up again on the first answer."""
        while True:
            await asyncio.sleep(self.probe_every)
            try:
                async with asyncio.timeout(self.timeout):
                    await self.redis.ping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._why = "no answer" if isinstance(exc, TimeoutError) else _describe(exc)
                now = time.monotonic()
                if now - self._warned >= self.warn_every:
                    self._warned = now
                    log.warning(
                        "smtpgate_shared_state %s: %s; using local counters", self.name, self._why
                    )
                continue
            break
        self._down = False
        self._probe = None
        log.info("smtpgate_shared_state %s: answering again; counting shared", self.name)
        for callback in self._recovered:
            callback()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    while text.startswith("Error ") and " connecting to " in text and ". " in text:
        text = text.split(". ", 1)[
            1
        ]  # redis-py's "Error 111 connecting to h:p. Connection refused."
    return (text.rstrip(".") or type(exc).__name__)[:200]


# --------------------------------------------------------------------------- the anvil


def instance_name() -> str:
    """This worker's part of every connection member: host, pid and a random word
    (a pid is reused after a restart; a member never is)."""
    host = socket.gethostname().split(".")[0] or "smtpgate"
    return f"{host}:{os.getpid()}:{secrets.token_hex(3)}"


class SharedAnvil:
    """The ``AnvilClient`` of a worker whose per-client counters are in a store.

    ``local`` (the supervisor's anvil, through ``RemoteAnvil``) counts everything as
    before: it answers the total and the DATA budget always, and the per-client
    questions while the store is unavailable.  See the module docstring.
    """

    def __init__(
        self,
        store: SharedStore,
        local: AnvilClient,
        lease: float,
        instance: str | None = None,
    ) -> None:
        self.store = store
        self.local = local
        self.lease = lease
        self.instance = instance or instance_name()
        self.fallbacks = 0
        """Per-client answers that came from the local counters."""
        self._numbers = itertools.count(1)
        self._open: dict[str, list[_Member]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._renewing: set[str] | None = None
        self._gone_while_renewing: list[tuple[str, str]] = []
        self._unremoved: list[tuple[str, str]] = []
        """Connections that ended while the store did not answer."""
        store.on_recover(self._renew_soon)

    # -- the lifecycle

    def start(self) -> None:
        """Start renewing leases (on the worker's event loop)."""
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def close(self) -> None:
        """Stop renewing; wait (briefly) for the removals on their way; close the store."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(BaseException):
                await self._renewer
            self._renewer = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2 * TIMEOUT)
        await self.store.close()

    async def settle(self) -> None:
        """Wait until the store operations on their way (removals) are done."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    # -- the AnvilClient interface

    async def connect(self, address: str | None, unit: float) -> Counts:
        if address is None:
            return await self.local.connect(None, unit)
        member = _Member(f"{self.instance}:{next(self._numbers)}")
        self._open.setdefault(address, []).append(member)
        shared = self._spawn(self.store.connect(address, member.name, self.lease, unit))
        member.counting = shared
        local = await self.local.connect(address, unit)
        try:
            count, rate = await asyncio.shield(shared)
        except StoreUnavailable:
            self.fallbacks += 1
            return local
        return Counts(count, rate, local.total)

    def disconnect(self, address: str | None) -> None:
        self.local.disconnect(address)
        if address is None:
            return
        members = self._open.get(address)
        if not members:
            return
        member = members.pop()
        if not members:
            del self._open[address]
        if self._renewing is not None and member.name in self._renewing:
            self._gone_while_renewing.append((address, member.name))
        self._spawn(self._remove(address, member))

    async def mail(self, address: str, unit: float) -> int:
        return await self._rate(address, "mail", self.local.mail(address, unit), unit)

    async def rcpt(self, address: str, unit: float) -> int:
        return await self._rate(address, "rcpt", self.local.rcpt(address, unit), unit)

    async def reserve(self, nbytes: int, limit: int) -> Reserved:
        return await self.local.reserve(nbytes, limit)

    def release(self, nbytes: int) -> None:
        self.local.release(nbytes)

    # -- inside

    async def _rate(self, address: str, kind: str, local: Awaitable[int], unit: float) -> int:
        shared = self._spawn(self.store.event(address, kind, unit))
        own = await local
        try:
            return await asyncio.shield(shared)
        except StoreUnavailable:
            self.fallbacks += 1
            return own

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        """A store operation as a task of its own: a session cancelled while it waits
        does not cut it off halfway (the disconnect follows it, see ``_remove``)."""
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_consume)
        return task

    async def _remove(self, address: str, member: _Member) -> None:
        if member.counting is not None and not member.counting.done():
            with contextlib.suppress(Exception):
                await member.counting  # a connect still on its way: remove after it
        try:
            await self.store.disconnect(address, member.name)
        except StoreUnavailable:
            if len(self._unremoved) < MAX_UNREMOVED:  # beyond: their leases end them
                self._unremoved.append((address, member.name))

    def _renew_soon(self) -> None:
        """The store is back: renew now (the connections it lost count again) and remove
        the connections that ended while it was away (they would count until their
        lease ends)."""
        self._spawn(self._renew_once())
        if self._unremoved:
            self._spawn(self._remove_ended())

    async def _remove_ended(self) -> None:
        ended, self._unremoved = self._unremoved, []
        for address, name in ended:
            with contextlib.suppress(StoreUnavailable):
                await self.store.disconnect(address, name)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            await self._renew_once()

    async def _renew_once(self) -> None:
        members = [(a, m.name) for a, ms in self._open.items() for m in ms]
        if not members or not self.store.available:
            return
        self._renewing = {name for _, name in members}
        try:
            await self.store.renew(members, self.lease)
        except StoreUnavailable:
            pass
        finally:
            self._renewing = None
            gone, self._gone_while_renewing = self._gone_while_renewing, []
        for address, name in gone:  # a renewal may have re-added it after its removal
            with contextlib.suppress(StoreUnavailable):
                await self.store.disconnect(address, name)


class _Member:
    __slots__ = ("counting", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.counting: asyncio.Task[tuple[int, int]] | None = None


def _consume(task: asyncio.Task[Any]) -> None:
    """Mark a task's exception as retrieved (StoreUnavailable is expected)."""
    if not task.cancelled():
        task.exception()


def shared_anvil(url: str, local: AnvilClient, lease: float) -> SharedAnvil:
    """The anvil of a worker with ``smtpgate_shared_state = url``."""
    return SharedAnvil(RedisStore(url), local, lease)


def preload() -> None:
    """Import redis-py now (``serve`` calls this before it drops privileges)."""
    import importlib

    for name in ("redis.asyncio", "redis.asyncio.connection", "redis.asyncio.retry"):
        importlib.import_module(name)
    from redis.utils import get_lib_version

    # Each new connection tells Redis redis-py's version, read from the package's
    # metadata with modules (email.parser, ...) that would be imported on first use.
    get_lib_version()


class StorePassCache:
    """postscreen's cache (``smtpgate.postscreen.cache.PassCache``) in the shared store:
    every worker and every instance sees a client's passes.  While the store does not
    answer, the worker's own memory (``local``) answers and remembers; a pass made then
    is known to that worker only."""

    NAMESPACE = "postscreen:"

    def __init__(self, store: SharedStore, local: Any) -> None:
        self.store = store
        self.local = local

    async def get(self, address: str) -> str | None:
        try:
            value = await self.store.get(self.NAMESPACE + address)
        except StoreUnavailable:
            return await self.local.get(address)  # type: ignore[no-any-return]
        if value is None:
            return await self.local.get(address)  # type: ignore[no-any-return]
        return value.decode("ascii", "replace")

    async def set(self, address: str, record: str, ttl: float) -> None:
        await self.local.set(address, record, ttl)
        with contextlib.suppress(StoreUnavailable):
            await self.store.set(self.NAMESPACE + address, record, ttl)


class AnvilStore:
    """The part of :class:`SharedStore` that ``verify.py`` uses, kept by the supervisor's
    anvil service (its G and S requests): one cache for all the workers of one serve,
    none across instances or restarts (that is what ``smtpgate_shared_state`` is for).
    While the service does not answer, :attr:`available` says so and the worker's own
    memory stands in."""

    def __init__(self, anvil: RemoteAnvil) -> None:
        self.anvil = anvil

    @property
    def name(self) -> str:
        return "the serve process"

    @property
    def available(self) -> bool:
        return not self.anvil.gone and not self.anvil.silent

    async def get(self, key: str) -> bytes | None:
        answered, value = await self.anvil.value_get(key.encode("utf-8", "surrogateescape"))
        if not answered:
            raise StoreUnavailable("the anvil service did not answer")
        return value

    async def set(self, key: str, value: bytes | str, ttl: float) -> None:
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        if not self.anvil.value_set(key.encode("utf-8", "surrogateescape"), data, ttl):
            raise StoreUnavailable("the value does not fit, or the anvil service is gone")
