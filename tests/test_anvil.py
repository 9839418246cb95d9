"""The anvil of the whole server: AnvilService and RemoteAnvil over real socket pairs.

The service runs as the supervisor runs it, from a ``selectors`` selector whose keys carry
zero-argument callbacks; here the selector is polled from the test's event loop (its
descriptor is watched with ``add_reader``), and ``step`` runs it by hand when a test must
know that the service has seen something (an EOF) before it goes on.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
import selectors
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from smtpgate.anvil import (
    MAX_MESSAGE,
    AnvilService,
    Counts,
    LocalAnvil,
    RemoteAnvil,
    Reserved,
    _Worker,
)
from smtpgate.logs import MailLog


class Service:
    """An AnvilService on a selector, driven from the running event loop."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.log = io.StringIO()
        self.service = AnvilService(self.selector, MailLog("mx", stream=self.log))
        asyncio.get_running_loop().add_reader(self.selector.fileno(), self.step)

    def step(self) -> None:
        """One turn of the supervisor's loop: ``for key, _ in select(): key.data()``."""
        for key, _ in self.selector.select(0):
            key.data()

    def remote(self, timeout: float = 5.0) -> RemoteAnvil:
        return RemoteAnvil(self.service.attach(), timeout=timeout)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.selector.fileno())
        self.service.close()
        self.selector.close()


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    s = Service()
    try:
        yield s
    finally:
        s.close()


async def test_counts_are_shared_by_workers(service: Service) -> None:
    one, two = service.remote(), service.remote()
    assert await one.connect("192.0.2.1", 60) == Counts(1, 1, 1)
    assert await two.connect("192.0.2.1", 60) == Counts(2, 2, 2)
    assert await two.connect(None, 60) == Counts(0, 0, 0)  # excepted: the total only
    # ... which goes out with that worker's next request, or after TALLY_DELAY
    assert await one.connect("192.0.2.9", 60) == Counts(1, 1, 3)
    two._send_tally()  # what TALLY_DELAY's timer does
    service.step()
    assert service.service.total == 4
    one.disconnect("192.0.2.1")
    assert await two.connect("192.0.2.1", 60) == Counts(2, 3, 4)  # rates are not given back
    assert [await one.mail("192.0.2.1", 60), await two.mail("192.0.2.1", 60)] == [1, 2]
    assert [await one.rcpt("192.0.2.1", 60), await two.rcpt("192.0.2.1", 60)] == [1, 2]
    scoped = "fe80::1%eth0"  # an IPv6 address with a zone: a "%" in the request
    assert await one.connect(scoped, 60) == Counts(1, 1, 5)
    one.disconnect(scoped)
    two.disconnect(None)
    one._flush_batch()  # what this turn of the event loop would send
    two._flush_batch()
    service.step()  # no answer to wait for: run the service by hand
    assert service.service.total == 3
    assert one.fallbacks == two.fallbacks == 0


async def test_excepted_clients_that_come_and_go_cost_no_datagram(service: Service) -> None:
    one = service.remote()
    sent: list[bytes] = []
    send = one._send
    one._send = lambda datagram: (sent.append(datagram), send(datagram))  # type: ignore[method-assign]
    for _ in range(5):
        await one.connect(None, 60)
        one.disconnect(None)
    await one.connect(None, 60)
    one._send_tally()
    service.step()
    assert service.service.total == 1
    assert sent == [b"E"]  # the net change, sent once


async def test_values_are_shared_by_workers(service: Service) -> None:
    # the recipient verification cache without smtpgate_shared_state (AnvilStore)
    one, two = service.remote(), service.remote()
    assert await two.value_get(b"smtpgate:verify:a b@x") == (True, None)
    assert one.value_set(b"smtpgate:verify:a b@x", b"2:0:1700000000:550 5.1.1 no", 60)
    one._flush_batch()
    service.step()
    assert await two.value_get(b"smtpgate:verify:a b@x") == (
        True,
        b"2:0:1700000000:550 5.1.1 no",
    )
    assert one.value_set(b"k", b"gone", 0)  # a TTL of 0 forgets
    one._flush_batch()
    service.step()
    assert await two.value_get(b"k") == (True, None)
    assert not one.value_set(b"k", b"x" * 2000, 60)  # too long to send: not remembered


async def test_budget_is_shared_and_exact(service: Service) -> None:
    one, two = service.remote(), service.remote()
    assert await one.reserve(600, 1000) == Reserved(True, 600)
    assert await two.reserve(500, 1000) == Reserved(False, 600)
    assert await two.reserve(400, 1000) == Reserved(True, 1000)
    one.release(600)
    assert await two.reserve(600, 1000) == Reserved(True, 1000)
    assert service.service.budget.peak == 1000
    two.release(1000)
    assert await one.reserve(10**12, 0) == Reserved(True, 10**12)  # 0: no limit


async def test_a_worker_that_dies_gives_back_what_it_held(service: Service) -> None:
    """Its open connections, its excepted ones and its DATA bytes; not its rates."""
    dying, other = service.remote(), service.remote()
    for _ in range(3):
        await dying.connect("192.0.2.1", 60)
    await dying.connect(None, 60)
    assert (await dying.reserve(700, 1000)).granted
    assert await other.connect("192.0.2.1", 60) == Counts(4, 4, 5)
    dying.sock.close()  # as a worker killed with SIGKILL: the kernel closes its end
    service.step()
    assert service.service.total == 1
    assert service.service.budget.in_flight == 0
    assert await other.connect("192.0.2.1", 60) == Counts(2, 5, 2)
    assert (await other.reserve(1000, 1000)).granted
    assert len(service.service.workers) == 1
    assert "warning" not in service.log.getvalue()  # an exit is not an error


async def test_a_worker_gives_back_only_what_it_holds(service: Service) -> None:
    one, two = service.remote(), service.remote()
    await one.connect("192.0.2.1", 60)
    assert (await one.reserve(500, 1000)).granted
    # Raw requests from the other worker for what it never had: ignored.
    for request in (b"D 192.0.2.1", b"X", b"F 500"):
        two.sock.send(request)
    assert await two.connect("192.0.2.7", 60) == Counts(1, 1, 2)
    assert service.service.budget.in_flight == 500
    assert await one.connect("192.0.2.1", 60) == Counts(2, 2, 3)


async def test_postscreen_passes_are_shared_by_workers(service: Service) -> None:
    one, two = service.remote(), service.remote()
    assert await two.get("192.0.2.1") is None
    await one.set("192.0.2.1", "1;2;1;1;1", 60)
    one._flush_batch()  # what this turn of the event loop would send
    service.step()
    assert await two.get("192.0.2.1") == "1;2;1;1;1"
    await two.set("192.0.2.1", "1;2;1;1;1", 0)  # ttl 0: forgotten
    two._flush_batch()
    service.step()
    assert await one.get("192.0.2.1") is None
    assert one.fallbacks == two.fallbacks == 0


GARBAGE = [
    b"",
    b"P 1",
    b"P 1 " + b"a" * 300,
    b"Q 60 192.0.2.1 1;2 extra",
    b"Q 60 192.0.2.1 not-a-record",
    b"Q x 192.0.2.1 1;2",
    b"Q 99999999999 192.0.2.1 1;2",
    b"hello",
    b"C 1 60",
    b"C 1 60 192.0.2.1 extra",
    b"C x 60 192.0.2.1",
    b"C 1 nan 192.0.2.1",
    b"C 1 inf 192.0.2.1",
    b"C 1 -5 192.0.2.1",
    b"C 1 0 192.0.2.1",
    b"C 1 60 " + b"a" * 300,
    b"C 1 60 bad\x01address",
    b"C 1 60 \xff\xfe",
    b"C 1 60  192.0.2.1",
    b"B 1 -1 1000",
    b"B 1 " + b"9" * 30 + b" 1000",
    b"B 1 99999999999999999999 1000",
    b"F -3",
    b"D",
    b"X 1",
    b"M 1 60 192.0.2.1 " + b"x" * (MAX_MESSAGE),
    bytes(range(256)),
    b"x" * (MAX_MESSAGE + 100),  # longer than a datagram may be
    b"C 1 60 192.0.2.1\nbogus",  # one good line, one bad
    b"C 1 60 192.0.2.1\n",  # an empty line
    b"F 1\n" * 2000,  # a long datagram of short lines, one of them empty
    b"S 60 a2V5 not+base64",
    b"S 60 a2V5 " + b"A" * 1401,  # a value longer than MAX_VALUE
    b"G 1 " + b"A" * 513,  # a key longer than MAX_KEY
]


@pytest.mark.parametrize("request_", GARBAGE, ids=range(len(GARBAGE)))
async def test_garbage_cuts_that_worker_off(service: Service, request_: bytes) -> None:
    """Logged; the worker's channel is closed and what it held given back; the service
    and the other workers go on."""
    rogue, good = service.remote(), service.remote()
    await rogue.connect("192.0.2.1", 60)
    assert (await rogue.reserve(100, 1000)).granted
    rogue.sock.send(request_)
    service.step()
    if request_:  # an empty datagram reads as EOF: the worker is cut off without a word
        assert "warning: anvil: worker channel closed: " in service.log.getvalue()
    assert len(service.service.workers) == 1
    assert service.service.total == 0 and service.service.budget.in_flight == 0
    counts = await good.connect("192.0.2.1", 60)  # (its rate counts the rogue's good lines)
    assert (counts.connections, counts.total) == (1, 1)
    # The rogue notices, and counts alone from then on.
    assert await rogue.connect("192.0.2.1", 60) == Counts(2, 2, 2)
    assert rogue.gone


async def test_lots_of_requests_in_flight(service: Service) -> None:
    """More requests than a socket buffer holds, from many sessions at once."""
    one, two = service.remote(), service.remote()
    addresses = [f"192.0.2.{i % 7}" for i in range(3000)]
    results = await asyncio.gather(*(w.connect(a, 60) for a in addresses for w in (one, two)))
    assert max(r.total for r in results) == 6000
    assert max(r.connections for r in results) == 2 * addresses.count("192.0.2.0")
    for address in addresses:
        one.disconnect(address)
        two.disconnect(address)
    assert await two.rcpt("192.0.2.99", 60) == 1  # the service has seen two's disconnects
    rate = 2 * addresses.count("192.0.2.1") + 1
    assert await one.connect("192.0.2.1", 60) == Counts(1, rate, 1)
    assert one.fallbacks == two.fallbacks == 0


async def test_silent_service_falls_back_to_local_counts() -> None:
    """A supervisor that stalls (loading a new configuration) or is gone: the worker's own
    counts answer after a short wait, later requests do not wait, and a warning says so."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    remote = RemoteAnvil(ours, timeout=0.05)
    log_lines: list[str] = []
    handler = _capture("smtpgate.anvil", log_lines)
    try:
        started = time.monotonic()
        assert await remote.connect("192.0.2.1", 60) == Counts(1, 1, 1)
        assert time.monotonic() - started >= 0.05
        started = time.monotonic()
        assert await remote.connect("192.0.2.1", 60) == Counts(2, 2, 2)  # no waiting now
        assert (await remote.reserve(700, 1000)).granted  # counted locally
        assert not (await remote.reserve(400, 1000)).granted
        assert time.monotonic() - started < 0.05
        assert remote.fallbacks == 4
        assert len([line for line in log_lines if "did not answer" in line]) == 1
        # The stalled service wakes up: it sees every request, in order.
        remote._flush_batch()  # what this turn of the event loop would send
        loop = asyncio.get_running_loop()
        selector = selectors.DefaultSelector()
        service = AnvilService(selector, MailLog("mx", stream=io.StringIO()))
        service.workers[theirs] = worker = _adopt(service, selector, theirs)
        try:
            for key, _ in selector.select(0):
                key.data()
            assert worker.connections["192.0.2.1"] == 2
            assert worker.held == 700  # granted late: the worker had counted it locally
            remote._readable()  # the late answers: the worker sends the 700 bytes back
            loop.add_reader(selector.fileno(), lambda: [k.data() for k, _ in selector.select(0)])
            assert await remote.mail("192.0.2.1", 60) == 1
            assert remote.fallbacks == 4  # answered by the service again
            assert worker.held == 0 and service.budget.in_flight == 0
            remote.release(700)  # the session ends: its bytes were local ones
            assert await remote.connect("192.0.2.1", 60) == Counts(3, 3, 3)
            assert service.budget.in_flight == 0 and remote.budget.in_flight == 0
        finally:
            loop.remove_reader(selector.fileno())
            service.close()
            selector.close()
        # The parent is gone: no waiting at all, local counts.
        assert await remote.connect("192.0.2.1", 60) == Counts(4, 4, 4)
        assert remote.gone
        assert any("gone" in line for line in log_lines)
    finally:
        _uncapture("smtpgate.anvil", handler)
        remote.close()


def _adopt(service: AnvilService, selector: selectors.BaseSelector, sock: socket.socket) -> _Worker:
    """Attach an existing socket to the service (as ``attach`` does for a new pair)."""
    sock.setblocking(False)
    worker = _Worker(sock)
    selector.register(sock, selectors.EVENT_READ, functools.partial(service._ready, worker))
    return worker


def _capture(name: str, lines: list[str]) -> logging.Handler:
    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Handler()
    logging.getLogger(name).addHandler(handler)
    return handler


def _uncapture(name: str, handler: logging.Handler) -> None:
    logging.getLogger(name).removeHandler(handler)


async def test_local_anvil_counts_like_the_service() -> None:
    local = LocalAnvil()
    assert await local.connect("192.0.2.1", 60) == Counts(1, 1, 1)
    assert await local.connect(None, 60) == Counts(0, 0, 0)
    assert await local.connect("192.0.2.1", 60) == Counts(2, 2, 3)
    local.disconnect(None)
    local.disconnect("192.0.2.1")
    assert local.anvil.total == 1
    assert await local.reserve(600, 1000) == Reserved(True, 600)
    assert await local.reserve(500, 1000) == Reserved(False, 600)
    local.release(600)
    assert local.budget.in_flight == 0


def test_forked_worker_death_releases() -> None:
    """The supervisor's way: attach, fork, close the service's sockets in the child and
    the worker's end in the parent; the worker holds, then dies."""
    selector = selectors.DefaultSelector()
    service = AnvilService(selector, MailLog("mx", stream=io.StringIO()))
    other = service.attach()  # an older worker's socket: the child must not keep it open
    sock = service.attach()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        status = 1
        try:
            service.close_in_child()
            other.close()
            os.close(go_w)

            async def work() -> None:
                remote = RemoteAnvil(sock)
                await remote.connect("192.0.2.1", 60)
                await remote.connect("192.0.2.1", 60)
                assert (await remote.reserve(5000, 10000)).granted
                os.read(go_r, 1)  # then exit without giving anything back

            asyncio.run(work())
            status = 0
        finally:
            os._exit(status)
    sock.close()
    os.close(go_r)

    def pump_until(check: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + 10
        while not check() and time.monotonic() < deadline:
            for key, _ in selector.select(0.1):
                key.data()
        return check()

    try:
        assert pump_until(lambda: service.budget.in_flight == 5000)
        assert service.total == 2 and len(service.workers) == 2
        os.write(go_w, b"x")
        assert os.waitpid(pid, 0)[1] == 0
        assert pump_until(lambda: len(service.workers) == 1)
        assert service.total == 0 and service.budget.in_flight == 0
        assert service.anvil.clients["192.0.2.1"].conn_rate == 2
    finally:
        os.close(go_w)
        other.close()
        service.close()
        selector.close()
