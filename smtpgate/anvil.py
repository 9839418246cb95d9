"""Postfix's anvil(8) for the whole server, and the in-flight DATA byte budget.

Postfix keeps connection counts and event rates in one anvil service for all its smtpd
processes; smtpgate does the same for all its workers.  The pieces:

* :class:`Anvil` and :class:`DataBudget` are the counters, with no I/O.  :class:`Anvil`
  keeps, per client address, the number of open connections and three event rates
  (connections, MAIL commands, RCPT/VRFY commands), each counted in a fixed window of
  ``anvil_rate_time_unit`` that starts at the client's first event, as anvil does; plus
  the total of open connections (``smtpgate_connection_limit``).  Memory is bounded:
  entries with no open connection whose window has passed are pruned, and when the table
  is full the oldest idle entries go first.  :class:`DataBudget` counts message bytes
  held in memory by all sessions, from the DATA command until the relay has finished.
* :class:`AnvilClient` is what a session asks (``smtpd.py`` uses nothing else).  Limits
  and the rate time unit come with each request, so a reload changes them without the
  counters knowing any configuration.  A shared store (Redis, for several machines) is
  one more implementation of this protocol.
* :class:`LocalAnvil` holds the counters in the process: one process, or tests.
* :class:`AnvilService` holds them in the supervisor (the parent, a synchronous
  ``selectors`` loop) and :class:`RemoteAnvil` asks it from a worker, over one
  ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair per worker (one datagram per message, in
  order).  When a worker's socket reaches EOF (it exited or died) the service gives back
  everything that worker held: open connections, DATA bytes (rates are not given back).
  The parent runs as root: every request is untrusted input, bounded and checked; a
  worker that sends anything else is logged and cut off (as if it had died).

The wire format is lines of ASCII words separated by one space, several lines to a
datagram (the requests of one turn of a worker's event loop, the answers to one
datagram).  Requests (worker to service)::

    C id unit address   connect          ->  id connections rate total
    E                   excepted connect (counted in the total only; no reply)
    D address           disconnect       (no reply)
    X                   excepted disconnect (no reply)
    M id unit address   MAIL             ->  id rate
    R id unit address   RCPT or VRFY     ->  id rate
    B id nbytes limit   reserve bytes    ->  id 1|0 in_flight
    F nbytes            release bytes    (no reply)
    P id address        postscreen pass  ->  id record, or id - (none)
    Q ttl address record  remember a postscreen pass (no reply)
    G id key            a remembered value  ->  id value, or id - (none)
    S ttl key value     remember a value (no reply); key and value in base64url

The values (``G``/``S``) are the recipient verification cache of ``verify.py`` when there
is no ``smtpgate_shared_state``: one cache for every worker
(:class:`~smtpgate.shared_state.AnvilStore`).

Round trips: one per connection (none for an excepted client, whose comings and goings
are sent netted, with the next request or within ``TALLY_DELAY``), one per MAIL or RCPT
only when that rate limit is set, one per DATA reservation grain (see ``smtpd.py``).  A worker
never stops mail for the service: a request that gets no answer within
:data:`ANSWER_TIMEOUT` (the parent stalls while it loads a new configuration, or is gone)
is answered from the worker's own counters, which :class:`RemoteAnvil` keeps alongside
(the per-worker counting of old), and while the service is silent later requests do not
wait for it either.  They are still sent, so the service's counts stay right once it
answers again.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import logging
import math
import re
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from smtpgate.logs import MailLog

log = logging.getLogger("smtpgate.anvil")

MAX_CLIENTS = 100_000
"""Most client addresses tracked at once (about 100 bytes each)."""


@dataclass
class Passes:
    """postscreen's cache records by client address, each until its time is up (at most
    :data:`MAX_CLIENTS`, the oldest go first): the whole server's memory of passes, so
    that a client passed by one worker is known to every other (and across reloads)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._records: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()

    def get(self, address: str) -> str | None:
        entry = self._records.get(address)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._records[address]
            return None
        return entry[1]

    def set(self, address: str, record: str, ttl: float) -> None:
        if ttl <= 0:
            self._records.pop(address, None)
            return
        self._records[address] = (self.clock() + ttl, record)
        self._records.move_to_end(address)
        while len(self._records) > MAX_CLIENTS:
            self._records.popitem(last=False)


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

    def connect_excepted(self) -> int:
        """A connection from a client in smtpd_client_event_limit_exceptions: counted in
        the total only; the new total."""
        self.total += 1
        return self.total

    def disconnect(self, address: str | None) -> None:
        """A connection ended (``address`` None: an excepted client's)."""
        if address is not None:
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


# --------------------------------------------------------------------------- the interface


class Counts(NamedTuple):
    """What a new connection learns: this client's open connections (this one included)
    and its connection rate, and the open connections of the whole server."""

    connections: int
    rate: int
    total: int


class Reserved(NamedTuple):
    """The answer to a reservation: granted or not, and the bytes in flight after it."""

    granted: bool
    in_flight: int


class AnvilClient(Protocol):
    """Counters shared by every session of the server (and, later, of several servers).

    ``unit`` is anvil_rate_time_unit in seconds, ``limit`` smtpgate_data_memory_limit
    (0: none).  Every connect is paired with one disconnect of the same address, every
    granted reservation with releases of as many bytes.
    """

    async def connect(self, address: str | None, unit: float) -> Counts:
        """A new connection from ``address``; None for a client in
        smtpd_client_event_limit_exceptions, which is counted in the total only and needs
        no answer (the counts returned are then zero: nothing limits that client)."""
        ...

    def disconnect(self, address: str | None) -> None:
        """A connection counted by ``connect(address)`` ended."""
        ...

    async def mail(self, address: str, unit: float) -> int:
        """A MAIL command: the client's message rate."""
        ...

    async def rcpt(self, address: str, unit: float) -> int:
        """A RCPT or VRFY command: the client's recipient rate."""
        ...

    async def reserve(self, nbytes: int, limit: int) -> Reserved:
        """Hold ``nbytes`` more message bytes, if the total stays within ``limit``."""
        ...

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` bytes of granted reservations."""
        ...


_NO_COUNTS = Counts(0, 0, 0)


class LocalAnvil:
    """The counters in this process: right for one process (and for tests)."""

    def __init__(self, anvil: Anvil | None = None, budget: DataBudget | None = None) -> None:
        self.anvil = anvil or Anvil()
        self.budget = budget or DataBudget()
        self.passes = Passes()

    async def get(self, address: str) -> str | None:
        """postscreen's cache record of ``address`` (the PassCache port)."""
        return self.passes.get(address)

    async def set(self, address: str, record: str, ttl: float) -> None:
        self.passes.set(address, record, ttl)

    async def connect(self, address: str | None, unit: float) -> Counts:
        if address is None:
            self.anvil.connect_excepted()
            return _NO_COUNTS
        count, rate = self.anvil.connect(address, unit)
        return Counts(count, rate, self.anvil.total)

    def disconnect(self, address: str | None) -> None:
        self.anvil.disconnect(address)

    async def mail(self, address: str, unit: float) -> int:
        return self.anvil.mail(address, unit)

    async def rcpt(self, address: str, unit: float) -> int:
        return self.anvil.rcpt(address, unit)

    async def reserve(self, nbytes: int, limit: int) -> Reserved:
        granted = self.budget.take(nbytes, limit)
        return Reserved(granted, self.budget.in_flight)

    def release(self, nbytes: int) -> None:
        self.budget.give_back(nbytes)


# --------------------------------------------------------------------------- the service

MAX_MESSAGE = 8192
"""Longest datagram either side accepts (several requests or answers, one a line)."""
TALLY_DELAY = 0.05
"""Seconds an excepted client's connect or disconnect may wait to be sent (netted)."""
MAX_LINE = 2048
"""Longest request (most are under 40 bytes; an S line with its value the longest)."""
MAX_KEY = 512  # base64url characters of a G/S key
MAX_VALUE = 1400  # ... and of an S value (a verification record with its reply text)
_B64 = re.compile(rb"[A-Za-z0-9_=-]+")
MAX_ADDRESS = 255
MAX_UNIT = 10**7  # seconds: anvil_rate_time_unit beyond this is nonsense
MAX_BYTES = 2**62
MAX_TTL = 10**9  # seconds a postscreen record may be kept
_RECORD = re.compile(rb"[0-9;]{1,120}")  # postscreen's cache record: expiry times
MAX_WORKER_CONNECTIONS = 1_000_000
"""Open connections one worker may hold in the service (memory bound against a rogue)."""
MAX_BACKLOG = 100_000
"""Messages queued for a peer that does not read before it counts as gone."""
BATCH = 64  # datagrams read from one worker per wake-up (the others get their turn)


def _pack(lines: list[bytes]) -> list[bytes]:
    """Lines joined into as few datagrams (of MAX_MESSAGE at most) as they fit in."""
    if len(lines) == 1:
        return lines
    out: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for line in lines:
        if batch and size + len(line) + 1 > MAX_MESSAGE:
            out.append(b"\n".join(batch))
            batch, size = [], 0
        batch.append(line)
        size += len(line) + 1
    if batch:
        out.append(b"\n".join(batch))
    return out


class ProtocolError(Exception):
    """A message that is not a valid request or reply."""


def _int(word: bytes, high: int) -> int:
    if not word.isdigit() or len(word) > 20:
        raise ProtocolError(f"bad number {word[:24]!r}")
    value = int(word)
    if value > high:
        raise ProtocolError(f"number out of range: {value}")
    return value


def _unit(word: bytes) -> float:
    try:
        value = float(word) if len(word) <= 24 else math.nan
    except ValueError:
        raise ProtocolError(f"bad time unit {word[:24]!r}") from None
    if not 0 < value <= MAX_UNIT:  # also refuses nan and inf
        raise ProtocolError(f"bad time unit {word[:24]!r}")
    return value


def _address(word: bytes) -> str:
    if not 0 < len(word) <= MAX_ADDRESS or not all(0x21 <= b < 0x7F for b in word):
        raise ProtocolError(f"bad client address {word[:40]!r}")
    return word.decode("ascii")


@dataclass(eq=False)
class _Worker:
    """One attached worker: its socket and what it holds."""

    sock: socket.socket
    connections: collections.Counter[str] = field(default_factory=collections.Counter)
    counted: int = 0  # its open connections, the sum of ``connections``
    excepted: int = 0  # its open connections from excepted clients
    held: int = 0  # its reserved DATA bytes
    outbox: collections.deque[bytes] = field(default_factory=collections.deque)


class AnvilService:
    """The anvil of the whole server, in the supervisor's ``selectors`` loop.

    ``attach`` gives a worker its socket; the service answers on the other end from the
    selector's callbacks (zero-argument callables in ``key.data``).
    """

    def __init__(
        self,
        selector: selectors.BaseSelector,
        maillog: MailLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.selector = selector
        self.maillog = maillog
        self.anvil = Anvil(clock)
        self.budget = DataBudget()
        self.passes = Passes()
        self.values = Passes()  # G/S: keys and values as sent (base64url)
        self.workers: dict[socket.socket, _Worker] = {}

    def attach(self) -> socket.socket:
        """A new worker's end of a fresh socket pair; the service listens on the other.

        The caller hands it to the worker (it survives fork) and closes its own copy in
        the parent afterwards.
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mine.setblocking(False)
        worker = _Worker(mine)
        self.workers[mine] = worker
        self.selector.register(mine, selectors.EVENT_READ, functools.partial(self._ready, worker))
        return theirs

    def close_in_child(self) -> None:
        """In a freshly forked worker: close the service's sockets (the parent keeps its
        own; the selector is not touched, it may share its kernel object with the parent)."""
        for sock in list(self.workers):
            sock.close()
        self.workers.clear()

    def close(self) -> None:
        """Detach every worker (the supervisor is stopping)."""
        for worker in list(self.workers.values()):
            self._drop(worker)

    @property
    def total(self) -> int:
        return self.anvil.total

    def _ready(self, worker: _Worker) -> None:
        if worker.outbox:
            self._flush(worker)
            if worker.sock.fileno() < 0:
                return
        for _ in range(BATCH):
            try:
                message = worker.sock.recv(MAX_MESSAGE + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop(worker, f"receive failed: {exc}")
                return
            if not message:  # EOF: the worker exited or died
                self._drop(worker)
                return
            if len(message) > MAX_MESSAGE:
                self._drop(worker, "message too long")
                return
            answers = []
            try:
                for line in message.split(b"\n"):
                    answer = self._handle(worker, line)
                    if answer is not None:
                        answers.append(answer)
            except ProtocolError as exc:
                self._drop(worker, str(exc))
                return
            for datagram in _pack(answers) if answers else ():
                self._send(worker, datagram)
                if worker.sock.fileno() < 0:
                    return

    def _handle(self, worker: _Worker, message: bytes) -> bytes | None:
        """Apply one request; its answer, or None for a request that has none."""
        if len(message) > MAX_LINE:
            raise ProtocolError("request too long")
        verb, *args = message.split(b" ")
        entry = _REQUESTS.get(verb)
        if entry is None or len(args) != entry[1]:
            raise ProtocolError(f"bad request {message[:40]!r}")
        return entry[0](self, worker, args)

    def _connect(self, worker: _Worker, args: list[bytes]) -> bytes:
        ident, unit, address = _int(args[0], MAX_BYTES), _unit(args[1]), _address(args[2])
        self._room(worker)
        count, rate = self.anvil.connect(address, unit)
        worker.connections[address] += 1
        worker.counted += 1
        return b"%d %d %d %d" % (ident, count, rate, self.anvil.total)

    def _disconnect(self, worker: _Worker, args: list[bytes]) -> None:
        address = _address(args[0])
        held = worker.connections[address]  # a Counter: no entry made for a miss
        if held > 0:  # a worker gives back only what it holds
            if held == 1:
                del worker.connections[address]
            else:
                worker.connections[address] = held - 1
            worker.counted -= 1
            self.anvil.disconnect(address)

    def _connect_excepted(self, worker: _Worker, args: list[bytes]) -> None:
        self._room(worker)
        worker.excepted += 1
        self.anvil.connect_excepted()

    def _disconnect_excepted(self, worker: _Worker, args: list[bytes]) -> None:
        if worker.excepted > 0:
            worker.excepted -= 1
            self.anvil.disconnect(None)

    @staticmethod
    def _room(worker: _Worker) -> None:
        if worker.counted + worker.excepted >= MAX_WORKER_CONNECTIONS:
            raise ProtocolError("too many open connections")

    def _mail(self, worker: _Worker, args: list[bytes]) -> bytes:
        ident, unit, address = _int(args[0], MAX_BYTES), _unit(args[1]), _address(args[2])
        return b"%d %d" % (ident, self.anvil.mail(address, unit))

    def _rcpt(self, worker: _Worker, args: list[bytes]) -> bytes:
        ident, unit, address = _int(args[0], MAX_BYTES), _unit(args[1]), _address(args[2])
        return b"%d %d" % (ident, self.anvil.rcpt(address, unit))

    def _reserve(self, worker: _Worker, args: list[bytes]) -> bytes:
        ident, nbytes, limit = (_int(a, MAX_BYTES) for a in args)
        granted = self.budget.take(nbytes, limit)
        if granted:
            worker.held += nbytes
        return b"%d %d %d" % (ident, granted, self.budget.in_flight)

    def _pass_get(self, worker: _Worker, args: list[bytes]) -> bytes:
        ident, address = _int(args[0], MAX_BYTES), _address(args[1])
        record = self.passes.get(address)
        return b"%d %s" % (ident, record.encode() if record else b"-")

    def _pass_set(self, worker: _Worker, args: list[bytes]) -> None:
        ttl, address = _int(args[0], MAX_TTL), _address(args[1])
        if not _RECORD.fullmatch(args[2]):
            raise ProtocolError(f"bad postscreen record {args[2][:40]!r}")
        self.passes.set(address, args[2].decode(), ttl)

    def _value_get(self, worker: _Worker, args: list[bytes]) -> bytes:
        ident, key = _int(args[0], MAX_BYTES), _b64(args[1], MAX_KEY)
        value = self.values.get(key)
        return b"%d %s" % (ident, value.encode() if value else b"-")

    def _value_set(self, worker: _Worker, args: list[bytes]) -> None:
        ttl, key = _int(args[0], MAX_TTL), _b64(args[1], MAX_KEY)
        self.values.set(key, _b64(args[2], MAX_VALUE), ttl)

    def _release(self, worker: _Worker, args: list[bytes]) -> None:
        nbytes = min(_int(args[0], MAX_BYTES), worker.held)
        worker.held -= nbytes
        self.budget.give_back(nbytes)

    def _send(self, worker: _Worker, reply: bytes) -> None:
        if worker.outbox:
            if len(worker.outbox) >= MAX_BACKLOG:
                self._drop(worker, "the worker does not read its answers")
                return
            worker.outbox.append(reply)
            return
        try:
            worker.sock.send(reply)
        except (BlockingIOError, InterruptedError):
            worker.outbox.append(reply)
            self.selector.modify(
                worker.sock,
                selectors.EVENT_READ | selectors.EVENT_WRITE,
                functools.partial(self._ready, worker),
            )
        except OSError as exc:
            self._drop(worker, f"send failed: {exc}")

    def _flush(self, worker: _Worker) -> None:
        while worker.outbox:
            try:
                worker.sock.send(worker.outbox[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(worker, f"send failed: {exc}")
                return
            worker.outbox.popleft()
        self.selector.modify(
            worker.sock, selectors.EVENT_READ, functools.partial(self._ready, worker)
        )

    def _drop(self, worker: _Worker, problem: str | None = None) -> None:
        """Forget a worker and give back what it held (its rates stay)."""
        if problem is not None:
            self.maillog.warning(f"anvil: worker channel closed: {problem}")
        self.workers.pop(worker.sock, None)
        if worker.sock.fileno() >= 0:
            try:
                self.selector.unregister(worker.sock)
            except (KeyError, ValueError):
                pass
            worker.sock.close()
        for address, count in worker.connections.items():
            for _ in range(count):
                self.anvil.disconnect(address)
        for _ in range(worker.excepted):
            self.anvil.disconnect(None)
        worker.connections.clear()
        worker.counted = worker.excepted = 0
        self.budget.give_back(worker.held)
        worker.held = 0
        worker.outbox.clear()


_Handler = Callable[[AnvilService, _Worker, list[bytes]], bytes | None]
_REQUESTS: dict[bytes, tuple[_Handler, int]] = {
    # verb: (handler, number of arguments); the wire format is in the module docstring
    b"C": (AnvilService._connect, 3),
    b"D": (AnvilService._disconnect, 1),
    b"E": (AnvilService._connect_excepted, 0),
    b"X": (AnvilService._disconnect_excepted, 0),
    b"M": (AnvilService._mail, 3),
    b"R": (AnvilService._rcpt, 3),
    b"B": (AnvilService._reserve, 3),
    b"F": (AnvilService._release, 1),
    b"P": (AnvilService._pass_get, 2),
    b"Q": (AnvilService._pass_set, 3),
    b"G": (AnvilService._value_get, 2),
    b"S": (AnvilService._value_set, 3),
}


def _b64(word: bytes, limit: int) -> str:
    if len(word) > limit or not _B64.fullmatch(word):
        raise ProtocolError(f"bad key or value {word[:40]!r}")
    return word.decode("ascii")


# --------------------------------------------------------------------------- the worker's end

ANSWER_TIMEOUT = 0.2
"""Seconds a request waits for the service before the worker's own counters answer it."""
WARN_EVERY = 60.0


def _sendable(address: str) -> bool:
    """Whether ``address`` can travel in a request (client addresses always can)."""
    return (
        0 < len(address) <= MAX_ADDRESS
        and address.isascii()
        and address.isprintable()
        and (" " not in address)
    )


def _unit_word(unit: float) -> bytes:
    return repr(min(max(float(unit), 0.001), float(MAX_UNIT))).encode()


@dataclass(eq=False)
class _Pending:
    verb: bytes
    nbytes: int = 0
    future: asyncio.Future[list[bytes] | None] | None = None
    deadline: float = 0.0


class RemoteAnvil:
    """A worker's client of :class:`AnvilService`, on the worker's event loop.

    The requests of one turn of the event loop go out together, one a line, in one
    non-blocking send (queued while the socket is full); answers come back the same way,
    in order, matched by request id.  The worker's own counters are
    kept alongside (``counts``, ``budget``: what this worker holds); they answer when the
    service does not (see the module docstring).
    """

    def __init__(self, sock: socket.socket, timeout: float = ANSWER_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.counts = Anvil()
        self.budget = DataBudget()
        self.passes = Passes()
        self.fallbacks = 0  # requests answered from the worker's own counters
        self._local_only = 0  # bytes granted by ``budget`` alone (the service was silent)
        self._ids = 0
        self._pending: dict[int, _Pending] = {}
        self._batch: list[bytes] = []  # requests of this turn of the event loop
        self._tally = 0  # excepted connections opened less closed, not yet sent
        self._tally_timer: asyncio.TimerHandle | None = None
        self._outbox: collections.deque[bytes] = collections.deque()  # while the socket is full
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._silent = False  # an answer was late: do not wait again until one comes
        self.gone = False
        self._warned = -math.inf

    # -- the interface

    async def connect(self, address: str | None, unit: float) -> Counts:
        if address is None:
            self.counts.connect_excepted()
            self._tally_change(1)
            return _NO_COUNTS
        count, rate = self.counts.connect(address, unit)
        if _sendable(address):
            answer = await self._ask(b"C", _unit_word(unit) + b" " + address.encode())
            if answer is not None and len(answer) == 3:
                return Counts(int(answer[0]), int(answer[1]), int(answer[2]))
        self.fallbacks += 1
        return Counts(count, rate, self.counts.total)

    def disconnect(self, address: str | None) -> None:
        self.counts.disconnect(address)
        if address is None:
            self._tally_change(-1)
        elif _sendable(address):
            self._post(b"D " + address.encode())

    async def mail(self, address: str, unit: float) -> int:
        return await self._rate(b"M", self.counts.mail(address, unit), address, unit)

    async def rcpt(self, address: str, unit: float) -> int:
        return await self._rate(b"R", self.counts.rcpt(address, unit), address, unit)

    async def _rate(self, verb: bytes, local: int, address: str, unit: float) -> int:
        if _sendable(address):
            answer = await self._ask(verb, _unit_word(unit) + b" " + address.encode())
            if answer is not None and len(answer) == 1:
                return int(answer[0])
        self.fallbacks += 1
        return local

    async def reserve(self, nbytes: int, limit: int) -> Reserved:
        nbytes = min(max(nbytes, 0), MAX_BYTES)
        answer = await self._ask(b"B", b"%d %d" % (nbytes, min(limit, MAX_BYTES)), nbytes)
        if answer is not None and len(answer) == 2:
            granted = answer[0] == b"1"
            if granted:
                self.budget.take(nbytes, 0)
            return Reserved(granted, int(answer[1]))
        self.fallbacks += 1
        granted = self.budget.take(nbytes, limit)
        if granted:
            self._local_only += nbytes
        return Reserved(granted, self.budget.in_flight)

    async def get(self, address: str) -> str | None:
        """postscreen's cache record of ``address``: the service's, else this worker's."""
        if _sendable(address):
            answer = await self._ask(b"P", address.encode())
            if answer is not None and len(answer) == 1:
                return None if answer[0] == b"-" else answer[0].decode("ascii", "replace")
        return self.passes.get(address)

    async def set(self, address: str, record: str, ttl: float) -> None:
        self.passes.set(address, record, ttl)
        if _sendable(address) and _RECORD.fullmatch(record.encode("ascii", "replace")):
            ttl_word = b"%d" % min(max(int(ttl), 0), MAX_TTL)
            self._post(b"Q " + ttl_word + b" " + address.encode() + b" " + record.encode())

    async def value_get(self, key: bytes) -> tuple[bool, bytes | None]:
        """(whether the service answered, the value remembered under ``key`` by any
        worker or None)."""
        word = base64.urlsafe_b64encode(key)
        if len(word) > MAX_KEY:
            return True, None  # never sent, so never remembered
        answer = await self._ask(b"G", word)
        if answer is None or len(answer) != 1:
            return False, None
        if answer[0] == b"-":
            return True, None
        try:
            return True, base64.urlsafe_b64decode(answer[0])
        except ValueError:
            return True, None

    @property
    def silent(self) -> bool:
        """The service did not answer in time lately (no request waits for it now)."""
        return self._silent

    def value_set(self, key: bytes, value: bytes, ttl: float) -> bool:
        """Remember ``value`` under ``key`` for ``ttl`` seconds, for every worker; False
        when it is too long to send or the service is gone."""
        word, data = base64.urlsafe_b64encode(key), base64.urlsafe_b64encode(value)
        if len(word) > MAX_KEY or len(data) > MAX_VALUE or self.gone:
            return False
        self._post(b"S %d %s %s" % (min(max(int(ttl), 0), MAX_TTL), word, data))
        return True

    def release(self, nbytes: int) -> None:
        nbytes = min(max(nbytes, 0), self.budget.in_flight)
        self.budget.give_back(nbytes)
        local = min(nbytes, self._local_only)
        self._local_only -= local
        if nbytes > local:
            self._post(b"F %d" % (nbytes - local))

    # -- the plumbing

    def _start(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            self._loop = loop = asyncio.get_running_loop()
            self.sock.setblocking(False)
            loop.add_reader(self.sock.fileno(), self._readable)
        return loop

    async def _ask(self, verb: bytes, arguments: bytes, nbytes: int = 0) -> list[bytes] | None:
        """Send a request (its id goes after the verb); its answer's words, or None
        when the service is gone, silent, or does not answer in time."""
        loop = self._start()
        if self.gone:
            self._warn("the anvil service is gone")
            return None
        self._ids += 1
        ident = self._ids
        self._post(b"%s %d %s" % (verb, ident, arguments))
        pending = self._pending[ident] = _Pending(verb, nbytes)
        if self._silent:
            self._warn("the anvil service does not answer")
            return None
        pending.future = future = loop.create_future()
        pending.deadline = loop.time() + self.timeout
        if self._watchdog is None:
            self._watchdog = loop.call_at(pending.deadline, self._watch)
        answer: list[bytes] | None = await future
        return answer

    def _watch(self) -> None:
        """Answer requests whose time is up from the worker's own counters."""
        self._watchdog = None
        loop = self._start()
        now, later = loop.time(), math.inf
        for pending in self._pending.values():
            future = pending.future
            if future is None or future.done():
                continue
            if pending.deadline <= now:
                future.set_result(None)
                self._silent = True
                self._warn(f"the anvil service did not answer within {self.timeout:g}s")
            else:
                later = min(later, pending.deadline)
        if later < math.inf:
            self._watchdog = loop.call_at(later, self._watch)

    def _warn(self, why: str) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning(
                "%s: connection, rate and memory limits are counted by this worker alone for now",
                why,
            )

    def _post(self, line: bytes) -> None:
        """Send one request, with the others of this turn of the event loop (one
        datagram for them all: one wake-up of the service, not one per request)."""
        if self.gone:
            return
        self._batch.append(line)
        if len(self._batch) == 1:
            self._start().call_soon(self._flush_batch)

    def _tally_change(self, delta: int) -> None:
        """An excepted client came or went.  Such changes only move the total, which
        only a later ``connect`` of a limited client reads: they go with the next
        request, or after TALLY_DELAY, netted (a session that came and went within it
        costs no datagram; the total another worker reads may be that much late)."""
        self._tally += delta
        if self._tally_timer is None and not self.gone:
            self._tally_timer = self._start().call_later(TALLY_DELAY, self._send_tally)

    def _send_tally(self) -> None:
        self._tally_timer = None
        if self._tally and not self._batch:
            self._flush_batch()

    def _flush_batch(self) -> None:
        lines, self._batch = self._batch, []
        if self._tally:
            lines[:0] = [b"E" if self._tally > 0 else b"X"] * abs(self._tally)
            self._tally = 0
        for datagram in _pack(lines) if lines and not self.gone else ():
            self._send(datagram)

    def _send(self, datagram: bytes) -> None:
        if self.gone:
            return
        if self._outbox:
            if len(self._outbox) >= MAX_BACKLOG:
                self._lose("the anvil service does not read its requests")
            else:
                self._outbox.append(datagram)
            return
        try:
            self.sock.send(datagram)
        except (BlockingIOError, InterruptedError):
            self._outbox.append(datagram)
            self._start().add_writer(self.sock.fileno(), self._writable)
        except OSError as exc:
            self._lose(f"the anvil service is gone ({exc.strerror or exc})")

    def _writable(self) -> None:
        while self._outbox:
            try:
                self.sock.send(self._outbox[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lose(f"the anvil service is gone ({exc.strerror or exc})")
                return
            self._outbox.popleft()
        if self._loop is not None:
            self._loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        while True:
            try:
                message = self.sock.recv(MAX_MESSAGE + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lose(f"the anvil service is gone ({exc.strerror or exc})")
                return
            if not message:
                self._lose("the anvil service is gone")
                return
            self._silent = False
            for line in message.split(b"\n"):
                self._answer(line.split(b" "))

    def _answer(self, words: list[bytes]) -> None:
        try:
            pending = self._pending.pop(int(words[0]), None)
        except ValueError:
            return
        if pending is None:
            return
        if pending.future is not None and not pending.future.done():
            pending.future.set_result(words[1:])
        elif pending.verb == b"B" and words[1:2] == [b"1"]:
            # Granted after its session stopped waiting: not held by anyone.
            self._post(b"F %d" % pending.nbytes)

    def _lose(self, why: str | None) -> None:
        """The service is gone: from now on the worker counts alone."""
        if self.gone:
            return
        self.gone = True
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self._outbox.clear()
        self._batch.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.future is not None and not entry.future.done():
                entry.future.set_result(None)
        if why is not None:
            self._warned = -math.inf  # always say so once
            self._warn(why)

    def close(self) -> None:
        """Stop using the service (the worker is exiting); later requests count locally."""
        self._flush_batch()
        self._lose(None)
