"""The policy delegation client: Postfix's attribute protocol over asyncio sockets.

:class:`DelegationClient` implements the core's
:class:`~smtpgate.policy.ports.PolicyClient`.  One client serves one generation in one
process (each worker has its own copy, with no connection open before the fork); the
load builds it (``smtpgate.generation``) and the server closes it when the generation
retires.

Theory of operation, after Postfix 3.7's ``attr_clnt.c``, ``auto_clnt.c``,
``attr_print_plain.c`` and ``attr_scan_plain.c``:

1. **The protocol.**  A request is ``name=value`` lines and an empty line
   (:func:`encode_request`); the reply is read up to its empty line and must hold
   ``action=`` (:func:`parse_reply`: other attributes are skipped, as Postfix does).
2. **Connections are reused** per service: a request takes an idle connection -- the
   one that served the same mail transaction (``instance``) when there is one, else the
   least recently used -- or opens one.  A connection is closed after ``max_idle``
   seconds unused, ``max_ttl`` seconds after it was opened (when next idle), after
   ``request_limit`` requests (0: no limit), when the server closes it or sends
   anything unasked.  Unlike one Postfix smtpd process, a worker serves many sessions
   at once, so it may hold several connections to one service (at most
   :data:`MAX_CONNECTIONS`); requests beyond that wait for one.
3. **Tries.**  A try that fails (cannot connect, no complete reply within ``timeout``,
   a closed connection, a reply without ``action``) is retried after ``retry_delay`` on
   a new connection, up to ``try_limit`` tries; then the answer has no action and the
   core performs the service's default action.  The warnings are Postfix's, in its
   words and at its moments: ``connect to 127.0.0.1:9998: Connection refused``,
   ``problem talking to server 127.0.0.1:9998: Connection timed out`` (at once for an
   error other than a closed or reset connection, and at the last try always),
   ``missing attribute action in input from ...``, ``premature end-of-input on ...``.
   They go back to the core with the answer, which logs them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from smtpgate.config.policyconf import PolicyService
from smtpgate.policy.ports import PolicyAnswer
from smtpgate.smtp.ports import NO_METRICS, Metrics

MAX_CONNECTIONS = 100
"""Connections one worker holds to one policy service at most (Postfix: one per smtpd
process, whose count master.cf limits, 100 by default)."""
MAX_REPLY = 65536
"""The longest reply read (Postfix has no limit; a server that never ends its reply
must not fill a worker's memory)."""

# errno values after which Postfix does not warn before its last try (attr_clnt.c).
_QUIET = frozenset({0, errno.EPIPE, errno.ENOENT, errno.ECONNRESET})


# -- the codec ------------------------------------------------------------------------


def _clean(value: str) -> str:
    # An attribute value must not contain a newline (it would end the attribute) or NUL
    # (Postfix's C strings end there); neither passes the SMTP layer, this is a backstop.
    return value.replace("\n", " ").replace("\0", " ")


def encode_request(attributes: Sequence[tuple[str, str]]) -> bytes:
    """``name=value`` lines and the empty line that ends a request (attr_print_plain)."""
    text = "".join(f"{name}={_clean(value)}\n" for name, value in attributes) + "\n"
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply as :func:`parse_reply` reads it."""

    action: str | None
    """The ``action`` value; None: the reply had none, or was malformed."""
    warning: str = ""
    """Postfix's warning about a malformed reply ("" for a good one)."""


def reply_end(buffer: bytes | bytearray) -> int:
    """The length of the first complete reply in ``buffer``, or 0: a reply ends at its
    first empty line (an empty line at once is a reply too, an empty one)."""
    if buffer[:1] == b"\n":
        return 1
    end = buffer.find(b"\n\n")
    return end + 2 if end >= 0 else 0


def parse_reply(block: bytes, where: str) -> Reply:
    """The ``action`` of one complete reply (up to and including its empty line), with
    attr_scan_plain's warnings; ``where`` is the server as Postfix names it."""
    text = block.decode("utf-8", "surrogateescape")
    action: str | None = None
    for line in text.split("\n")[:-2] if text != "\n" else []:
        name, eq, value = line.partition("=")
        if action is not None or name != "action":
            continue  # an attribute nobody asked for is skipped
        if not eq:
            return Reply(None, f"missing value for string attribute action from {where}")
        action = value
    if action is None:
        return Reply(None, f"missing attribute action in input from {where}")
    return Reply(action)


# -- connections ----------------------------------------------------------------------


class _TryFailed(Exception):
    """One try failed: ``code`` is the errno Postfix's %m would show (0: "Success")."""

    def __init__(self, code: int, warnings: Sequence[str] = ()) -> None:
        super().__init__(code)
        self.code = code
        self.warnings = list(warnings)


class _Channel(asyncio.Protocol):
    """One connection to a policy server: a buffer, and whether it is still usable."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost: Exception | None = None
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self.opened = time.monotonic()
        self.last_used = self.opened
        self.requests = 0
        self.instance = ""
        self.idle_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_REPLY:
            self.close()
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def usable(self) -> bool:
        """Open, and nothing arrived unasked (Postfix drops such a stream before use)."""
        return not (self.closed or self.eof or self.buffer)

    def close(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def context(self) -> str:
        """What attr_scan_plain was reading when a partial reply stopped: the action's
        value, or an attribute name (the value of another attribute is skipped)."""
        lines = bytes(self.buffer).split(b"\n")
        if lines[-1].startswith(b"action=") and not any(
            line.startswith(b"action=") or line == b"action" for line in lines[:-1]
        ):
            return "input attribute value"
        return "input attribute name"

    async def exchange(self, request: bytes, where: str) -> Reply:
        """Write ``request``, read one reply (the caller bounds the time)."""
        assert self.transport is not None
        self.buffer.clear()
        self.transport.write(request)
        while True:
            end = reply_end(self.buffer)
            if end:
                block = bytes(self.buffer[:end])
                del self.buffer[:end]
                return parse_reply(block, where)
            if self.closed or self.eof:
                if len(self.buffer) > MAX_REPLY:
                    raise _TryFailed(0, [f"reply from {where} exceeds {MAX_REPLY} bytes"])
                if not self.buffer:
                    # attr_vscan_plain: end of input before the reply starts is no
                    # conversion, without a warning; %m then shows the reset or "Success"
                    raise _TryFailed(_errno(self.lost))
                raise _TryFailed(
                    _errno(self.lost),
                    [f"premature end-of-input on {where} while reading {self.context()}"],
                )
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


def _errno(exc: BaseException | None) -> int:
    return exc.errno if isinstance(exc, OSError) and exc.errno else 0


def _strerror(code: int) -> str:
    return os.strerror(code)  # 0: "Success", as glibc's %m


@dataclass
class _Pool:
    """The connections of one process to one service."""

    service: PolicyService
    idle: list[_Channel] = field(default_factory=list)
    slots: asyncio.Semaphore | None = None
    busy: set[_Channel] = field(default_factory=set)

    def checkout(self, instance: str, now: float) -> _Channel | None:
        """An idle connection still fit for use: the transaction's own when there is
        one, else the least recently used; the unfit ones are closed on the way."""
        service = self.service
        fit: list[_Channel] = []
        for channel in self.idle:
            if (
                not channel.usable
                or now - channel.last_used >= service.max_idle
                or now - channel.opened >= service.max_ttl
            ):
                channel.close()
            else:
                fit.append(channel)
        self.idle = fit
        if not fit:
            return None
        mine = [c for c in fit if instance and c.instance == instance]
        channel = mine[0] if mine else min(fit, key=lambda c: c.last_used)
        fit.remove(channel)
        if channel.idle_timer is not None:
            channel.idle_timer.cancel()
            channel.idle_timer = None
        return channel

    def checkin(self, channel: _Channel, closing: bool) -> None:
        """Give a connection back after a good reply (or close it)."""
        service = self.service
        now = time.monotonic()
        channel.last_used = now
        if (
            closing
            or not channel.usable
            or (service.request_limit > 0 and channel.requests >= service.request_limit)
            or now - channel.opened >= service.max_ttl
        ):
            channel.close()
            return
        self.idle.append(channel)
        # close it when it has been idle max_idle seconds, or reaches max_ttl
        wait = min(service.max_idle, service.max_ttl - (now - channel.opened))
        channel.idle_timer = asyncio.get_running_loop().call_later(
            max(wait, 0.0), self._expire, channel
        )

    def _expire(self, channel: _Channel) -> None:
        channel.idle_timer = None
        if channel in self.idle:
            self.idle.remove(channel)
        channel.close()

    def close(self) -> None:
        for channel in [*self.idle, *self.busy]:
            channel.close()
        self.idle.clear()


class DelegationClient:
    """A :class:`~smtpgate.policy.ports.PolicyClient` over inet: and unix: sockets."""

    def __init__(self, *, sleep: Callable[[float], object] | None = None) -> None:
        self._pools: dict[str, _Pool] = {}
        self._pid = os.getpid()
        self._closed = False
        self._sleep = sleep or asyncio.sleep
        self.metrics: Metrics = NO_METRICS
        """Told each answer's action and how long it took (set in a worker)."""

    def _pool(self, service: PolicyService) -> _Pool:
        if self._pid != os.getpid():
            # A forked worker never uses its parent's connections (there should be
            # none: the supervisor asks nothing), nor its loop's objects.
            self._pools = {}
            self._pid = os.getpid()
        pool = self._pools.get(service.name)
        if pool is None:
            pool = self._pools[service.name] = _Pool(service)
        return pool

    async def ask(
        self, service: PolicyService, attributes: Sequence[tuple[str, str]]
    ) -> PolicyAnswer:
        """One request, with Postfix's tries, delays and warnings."""
        pool = self._pool(service)
        if pool.slots is None:
            pool.slots = asyncio.Semaphore(MAX_CONNECTIONS)
        request = encode_request(attributes)
        instance = next((value for name, value in attributes if name == "instance"), "")
        where = service.address
        warnings: list[str] = []
        tries = 0
        start = time.monotonic()
        async with pool.slots:
            while True:
                try:
                    action = await self._try(pool, request, instance, warnings)
                except _TryFailed as failed:
                    warnings.extend(failed.warnings)
                    code = failed.code
                else:
                    verb = action.split(None, 1)[0].upper() if action.strip() else "(empty)"
                    self.metrics.policy_reply(service.name, verb, time.monotonic() - start)
                    return PolicyAnswer(action, tuple(warnings))
                tries += 1
                last = tries >= service.try_limit
                if last or code not in _QUIET:
                    warnings.append(f"problem talking to server {where}: {_strerror(code)}")
                if last or self._closed:
                    self.metrics.policy_reply(service.name, "error", time.monotonic() - start)
                    return PolicyAnswer(None, tuple(warnings))
                await self._sleep(service.retry_delay)  # type: ignore[misc]

    async def _try(self, pool: _Pool, request: bytes, instance: str, warnings: list[str]) -> str:
        service = pool.service
        where = service.address
        channel = pool.checkout(instance, time.monotonic())
        if channel is None:
            channel = await self._open(service)
        pool.busy.add(channel)
        good = False
        try:
            try:
                async with asyncio.timeout(service.timeout):
                    reply = await channel.exchange(request, where)
            except TimeoutError:
                partial = [f"timeout on {where} while reading {channel.context()}"]
                raise _TryFailed(errno.ETIMEDOUT, partial if channel.buffer else []) from None
            except OSError as exc:
                raise _TryFailed(exc.errno or 0) from None
            if reply.action is None:
                raise _TryFailed(0, [reply.warning])
            channel.requests += 1
            channel.instance = instance
            good = True
            return reply.action
        finally:
            pool.busy.discard(channel)
            if good:
                pool.checkin(channel, closing=self._closed)
            else:
                channel.close()

    async def _open(self, service: PolicyService) -> _Channel:
        loop = asyncio.get_running_loop()
        where = service.address
        try:
            async with asyncio.timeout(service.timeout):
                if service.transport == "inet":
                    host, _, port = where.rpartition(":")
                    host = host[1:-1] if host.startswith("[") else host
                    _, channel = await loop.create_connection(_Channel, host, int(port))
                else:
                    _, channel = await loop.create_unix_connection(_Channel, where)
        except TimeoutError:
            code = errno.ETIMEDOUT
        except OSError as exc:
            code = exc.errno or 0
            if code <= 0:  # getaddrinfo's codes, or several addresses that all failed
                raise _TryFailed(0, [f"connect to {where}: {exc.strerror or exc}"]) from None
        else:
            return channel
        raise _TryFailed(code, [f"connect to {where}: {_strerror(code)}"])

    async def close(self) -> None:
        """Close every connection; later requests are answered with no action."""
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        await asyncio.sleep(0)  # let the transports' close callbacks run
