"""The network side of an SMTP connection: bytes, timers and TLS, nothing else.

:class:`GateProtocol` is an ``asyncio.Protocol``: it hands what the client sends to the
connection's :class:`~smtpgate.smtp.machine.SmtpMachine` and performs the effects the
machine returns (write, flush, pause, STARTTLS, close).  Everything SMTP (syntax,
sequencing, limits, framing, the restrictions, the relay's transaction) is in the machine,
which ``explain`` drives too.  What is left here:

* **Timers.**  ``smtpd_timeout`` since the last input arrived, or for the whole request
  with ``smtpd_per_request_deadline`` (stretched by ``smtpd_min_data_rate`` while message
  content comes); the greet pause; the pause before an error reply.
* **Writes.**  Replies to a pipelined group go out in one write: the machine works
  through all the complete input it has, then the replies are written, unless a partial
  command is still arriving (as Postfix flushes only when its input buffer is empty).  A
  flush waits for a slow reader at most ``smtpd_timeout``.
* **TLS.**  STARTTLS upgrades the transport with ``loop.start_tls`` (asyncio's public
  API); input that arrived in plaintext behind the command is dropped.
* **The peer.**  The client address is read once, when the connection is made (with
  Linux's SO_PEERNAME when ``getpeername`` fails for a client that already reset).
  With ``smtpd_upstream_proxy_protocol = haproxy`` a load balancer's PROXY header comes
  first (:mod:`smtpgate.proxyproto` parses it): the machine is built only once it is
  read, with the client it names; a v2 LOCAL header (a health check) makes the balancer
  the client, flagged ``proxy_local``; a bad or late header, or a peer outside
  ``smtpgate_upstream_proxy_networks``, gets Postfix 3.7's hang-up (a session that
  answers 421 4.3.0 Server local error).

The listener is asyncio's own server; aiosmtpd is not used here (it only serves the
``smtpgate sink`` backend).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import ssl
import sys
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from smtpgate import proxyproto
from smtpgate.anvil import AnvilClient, LocalAnvil
from smtpgate.config.service import ServiceConfig
from smtpgate.errors import FilterDestinationError, TableLookupError
from smtpgate.facts import ClientFacts
from smtpgate.generation import Generation
from smtpgate.logs import MailLog, new_queue_id
from smtpgate.milter import Milters
from smtpgate.policy.model import ClientInfo, TlsInfo
from smtpgate.policy.plan import Plan
from smtpgate.policy.ports import Resolver
from smtpgate.postscreen.cache import MemoryPassCache, PassCache
from smtpgate.postscreen.config import PostscreenConfig
from smtpgate.postscreen.dnsbl import Score, dnsblog_lines, query_sites, score
from smtpgate.postscreen.screen import Outcome, Screening
from smtpgate.relay import Relay, parse_filter_destination
from smtpgate.reply import Reply
from smtpgate.smtp.machine import SmtpMachine
from smtpgate.smtp.ports import (
    CLOSE,
    FLUSH,
    NO_METRICS,
    START_TLS,
    Backend,
    BackendTransaction,
    Effect,
    FixedTransaction,
    Metrics,
)
from smtpgate.smtp.store import MessageStore, open_spool
from smtpgate.smtp.syntax import wire
from smtpgate.watch import SessionWatch, WatchChannel

log = logging.getLogger("smtpgate.smtpd")

WRITE_BACKLOG = 65536  # reply bytes held back for a partial command before writing anyway
READ_BACKLOG = 1 << 20  # unprocessed input at which reading pauses


@dataclass
class Shared:
    """What every connection of one server shares: the generation it serves (immutable,
    replaced as one reference) and the server's own mutable state beside it."""

    generation: Generation
    maillog: MailLog
    sessions: set[GateProtocol] = field(default_factory=set)
    draining: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a session ends or finishes a command (the drain waits on it)."""
    anvil: AnvilClient = field(default_factory=LocalAnvil)
    """Connection counts and event rates per client address, and the message bytes held
    in memory (smtpgate_data_memory_limit), for the whole server: every worker asks the
    same anvil."""
    spool_directory: str = ""
    """The server's own spool directory, used when smtpgate_spool_directory is empty."""
    metrics: Metrics = NO_METRICS
    """What the sessions count for Prometheus (smtpgate_metrics_listen)."""
    watch: WatchChannel | None = None
    """Where a session sends its row while someone watches (smtpgate_watch)."""
    pass_cache: PassCache = field(default_factory=MemoryPassCache)
    """postscreen's cache (in smtpgate_shared_state when that is set)."""

    def new_store(self) -> MessageStore:
        """Where one message waits: memory up to smtpgate_message_memory_limit, then an
        anonymous file in the spool directory."""
        config = self.config
        directory = config.spool_directory or self.spool_directory
        spool = open_spool(directory) if directory else None
        return MessageStore(config.message_memory_limit, spool)

    @property
    def plan(self) -> Plan:
        return self.generation.plan

    @property
    def config(self) -> ServiceConfig:
        return self.generation.config

    @property
    def relay(self) -> Relay:
        return self.generation.relay

    @property
    def resolver(self) -> Resolver:
        return self.generation.resolver

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        return self.generation.tls_context

    @property
    def milters(self) -> Milters:
        return self.generation.milters

    @property
    def postscreen(self) -> PostscreenConfig:
        return self.generation.postscreen


class RelayBackend:
    """The relay as the machine's backend port: FILTER and HOLD choose the next hop."""

    def __init__(self, relay: Relay, maillog: MailLog) -> None:
        self.relay = relay
        self.maillog = maillog

    async def begin(
        self,
        client: ClientFacts,
        sender: str,
        mail_params: Sequence[str],
        *,
        filter: str | None = None,
        hold: bool = False,
    ) -> BackendTransaction:
        next_hop = None
        if hold:
            next_hop = self.relay.hold_relayhost
        elif filter is not None:
            try:
                next_hop = parse_filter_destination(filter)
            except FilterDestinationError as exc:
                self.maillog.warning(f"FILTER {filter}: {exc}")
                return FixedTransaction(R451_FILTER, R451_FILTER)
        return await self.relay.begin(client, sender, mail_params, next_hop=next_hop)

    def holds_elsewhere(self) -> bool:
        return self.relay.hold_relayhost is not None


R451_FILTER = Reply(451, "4.3.0", "Error: queue file write error")


class GateProtocol(asyncio.Protocol):
    """One client connection: the machine's I/O."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.config = shared.config
        self.transport: asyncio.Transport | None = None
        self.machine: SmtpMachine | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_input = time.monotonic()
        self._waiter: asyncio.Future[None] | None = None
        self._held: list[bytes] = []  # replies waiting for the rest of a partial command
        self._held_size = 0
        self._write_paused: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._eof = False
        self._arrivals = 0  # data_received calls so far (the wait for input counts them)
        self._proxy_input: bytearray | None = None  # the PROXY header so far
        self._proxy_timer: asyncio.TimerHandle | None = None
        self._proxy_peer = ClientInfo(address="unknown")  # who sent the header
        self._server_address: tuple[str, int] | None = None  # for postscreen's CONNECT line

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.machine is not None:
            return  # loop.start_tls hands the protocol its new transport itself
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        peer = _client_info(_peername(transport))
        if self.config.upstream_proxy:
            self._await_proxy_header(peer)
        else:
            self._open_session(peer.address, peer.port, _server(transport))

    def _open_session(
        self,
        address: str,
        port: int | None,
        server: tuple[str, int] | None,
        *,
        proxy_local: bool = False,
        hangup: bool = False,
    ) -> None:
        """Build the machine for the client at *address* and start the session."""
        shared, transport = self.shared, self.transport
        assert transport is not None
        backend: Backend = RelayBackend(shared.relay, shared.maillog)
        metrics, watch = shared.metrics, None
        # one byte read when nobody watches; a balancer's health check is not shown
        if shared.watch is not None and shared.watch.watched and not proxy_local:
            watch = SessionWatch(shared.watch, metrics, address, port)
            metrics, backend = watch, watch.backend(backend)
        self.machine = SmtpMachine(
            plan=shared.plan,
            config=self.config,
            backend=backend,
            anvil=shared.anvil,
            log=shared.maillog,
            address=address,
            port=port,
            service=_service(transport),
            server=server,
            milters=shared.milters.session(shared.maillog) if shared.milters else None,
            resolver=shared.resolver,
            starttls=shared.tls_context is not None,
            queue_ids=new_queue_id,
            new_store=shared.new_store,
            metrics=metrics,
            observer=watch,
            proxy_local=proxy_local,
            hangup=hangup,
        )
        if watch is not None:
            watch.attach(self.machine)
        if shared.postscreen.enabled and not proxy_local and not hangup:
            self.machine.screening = Screening(
                shared.postscreen,
                shared.maillog.program("postscreen"),
                address,
                port,
                clock=time.time,
                on_pass=self._remember,
            )
            self._server_address = server
        shared.sessions.add(self)
        self.task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self.last_input = time.monotonic()
        machine = self.machine
        if machine is None:
            self._proxy_received(data)
            return
        machine.receive(data)
        self._arrivals += 1
        if machine.buffered > READ_BACKLOG and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        if self.machine is not None:
            self.machine.receive_eof()
        elif self._proxy_input is not None:
            self._proxy_received(b"")
            return True  # keep the transport: the session answers (Postfix's 421) and closes
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.machine is None:
            self._proxy_done()  # gone before its PROXY header: no session
        self.eof_received()
        waiter = self._write_paused
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        if self._write_paused is None:
            self._write_paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self._write_paused = self._write_paused, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the PROXY header (smtpd_upstream_proxy_protocol = haproxy) -------------------------

    def _await_proxy_header(self, peer: ClientInfo) -> None:
        """Read the load balancer's PROXY header before the session starts: the client it
        names is the client.  A peer outside smtpgate_upstream_proxy_networks is refused."""
        networks = self.config.upstream_proxy_networks
        allowed = True
        if networks is not None:
            try:
                allowed = networks.match(peer.address)
            except TableLookupError as exc:
                self.shared.maillog.warning(f"smtpgate_upstream_proxy_networks: {exc}")
                allowed = False
        if not allowed:
            self.shared.maillog.warning(
                f"haproxy: refusing connection from {peer.namaddr}: "
                "not in smtpgate_upstream_proxy_networks"
            )
            self._proxy_failed(peer)
            return
        self._proxy_input = bytearray()
        self._proxy_peer = peer
        self._proxy_timer = asyncio.get_running_loop().call_later(
            self.config.upstream_proxy_timeout, self._proxy_timed_out
        )

    def _proxy_received(self, data: bytes) -> None:
        """Header bytes (b"" at end of input); starts the session once it is complete."""
        pending = self._proxy_input
        if pending is None:
            return
        pending += data
        try:
            header = proxyproto.parse(pending, eof=self._eof)
        except proxyproto.ProxyHeaderError as exc:
            self.shared.maillog.warning(f"haproxy read: {exc}")
            self._proxy_failed(self._proxy_peer)
            return
        if header is None:
            return
        self._proxy_done()
        rest = bytes(pending[header.length :])
        transport = self.transport
        assert transport is not None
        if header.client is None:  # LOCAL: the balancer itself
            peer = self._proxy_peer
            self._open_session(peer.address, peer.port, _server(transport), proxy_local=True)
        else:
            address, port = header.client
            self._open_session(address, port, header.server)
        machine = self.machine
        assert machine is not None
        if rest:
            machine.receive(rest)
            self._arrivals += 1
        if self._eof:
            machine.receive_eof()

    def _proxy_timed_out(self) -> None:
        if self._proxy_input is not None:
            self.shared.maillog.warning("haproxy read: timeout error")
            self._proxy_failed(self._proxy_peer)

    def _proxy_failed(self, peer: ClientInfo) -> None:
        """What Postfix 3.7 does when the handshake fails: a session with the balancer
        as the client that answers 421 4.3.0 Server local error and hangs up."""
        self._proxy_done()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._open_session(peer.address, peer.port, _server(transport), hangup=True)

    def _proxy_done(self) -> None:
        self._proxy_input = None
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
            self._proxy_timer = None

    # -- the connection --------------------------------------------------------------------

    async def _run(self) -> None:
        machine, shared = self.machine, self.shared
        assert machine is not None
        try:
            if not await self._begin(machine):
                return
            deadline = self._deadline(time.monotonic())
            requests, mode = machine.requests, machine.in_content
            while not machine.closing:
                arrivals = self._arrivals
                effects = await machine.advance()
                shared.changed.set()
                await self._perform(effects)
                if self._reading_paused and machine.buffered < READ_BACKLOG // 2:
                    self._reading_paused = False
                    if self.transport is not None:
                        self.transport.resume_reading()
                if machine.closing or machine.may_continue or self._arrivals != arrivals:
                    continue  # more to work through (input came while the machine worked)
                now = time.monotonic()
                if (machine.requests, machine.in_content) != (requests, mode):
                    requests, mode = machine.requests, machine.in_content
                    deadline = self._deadline(now)
                if not await self._wait_input(deadline):
                    await self._perform(machine.timed_out())
                    break
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s: unexpected error", machine.namaddr)
        finally:
            try:
                await machine.close()
            finally:
                shared.sessions.discard(self)
                shared.changed.set()
                self._close()

    # -- postscreen (before the greeting) ---------------------------------------------------

    def _remember(self, record: str) -> None:
        """A client passed: its cache record, written in the background."""
        machine = self.machine
        screening = machine.screening if machine is not None else None
        if screening is None:
            return
        cache, ttl = self.shared.pass_cache, screening.cache_ttl()
        task = asyncio.get_running_loop().create_task(cache.set(screening.address, record, ttl))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def _screen(self, screening: Screening) -> Outcome:
        """postscreen's steps before the greeting: the access list, the cache, then for a
        client with tests to do the teaser, the DNS lists (in parallel) and the greet
        wait, watching for a client that talks first."""
        shared, machine = self.shared, self.machine
        assert machine is not None
        outcome = screening.connect(self._server_address, shared.plan.mynetworks)
        if outcome is not None:
            return outcome
        try:
            record = await shared.pass_cache.get(screening.address)
        except Exception as exc:  # a cache that does not answer: the client is new
            screening.log.warning(f"postscreen cache lookup for {screening.address}: {exc}")
            record = None
        if screening.cached(record) or not screening.early_todo:
            return Outcome()
        return await self._early_tests(screening)

    async def _early_tests(self, screening: Screening) -> Outcome:
        """The teaser, the DNS lists (in parallel) and the greet wait, which ends early
        once every early test is done (a pregreet seen and the lists answered, or an
        allow list)."""
        machine = self.machine
        assert machine is not None
        config = screening.config
        start = time.monotonic()
        deadline = start + config.greet_wait
        teaser = screening.teaser
        transport = self.transport
        if teaser is not None and transport is not None and not transport.is_closing():
            transport.write(teaser)  # (uvloop raises on a transport already closed)
        answers: dict[str, Any] = {}  # filled as the lists answer
        lists = self._ask_lists(screening, answers) if "dnsbl" in screening.todo else None
        result: Score | None = None
        watching = "pregreet" in screening.todo
        try:
            while True:
                now = time.monotonic()
                if watching and machine.buffered:
                    watching = False
                    dropped = screening.pregreeted(machine.peek(), now - start)
                    if dropped is not None:
                        return dropped
                if self._eof:
                    screening.hangup(now - start, "tests before SMTP handshake")
                    return Outcome(greet=False)
                if lists is not None and lists.done() and result is None:
                    result = self._score(config, answers)
                    if result.complete and screening.dnsbl_allows(result):
                        break  # allowlisted: the pregreet test is skipped, no more wait
                if not watching and (lists is None or lists.done()):
                    break  # every early test is done
                if now >= deadline:
                    break
                await self._input_or(lists, deadline - now)
        finally:
            if lists is not None and not lists.done():
                lists.cancel()
        if result is None and lists is not None:
            result = self._score(config, answers)  # partial: the lists that answered
        return screening.after_wait(result)

    def _ask_lists(
        self, screening: Screening, answers: dict[str, Any]
    ) -> asyncio.Task[dict[str, Any]]:
        """Ask every DNS list at once (dnsblog's lines logged as answers come)."""
        shared, config = self.shared, screening.config
        timeout = min(config.dnsbl_timeout, config.greet_wait)
        dnsblog = shared.maillog.program("dnsblog")

        def logged(domain: str, answer: Any) -> None:
            for line in dnsblog_lines(screening.address, domain, answer):
                dnsblog.info(line)

        return asyncio.get_running_loop().create_task(
            query_sites(shared.resolver, config.sites, screening.address, timeout, answers, logged)
        )

    async def _input_or(self, task: asyncio.Future[Any] | None, timeout: float) -> None:
        """Wait until input (or EOF) arrives, ``task`` is done or ``timeout`` passed."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        waits: set[asyncio.Future[Any]] = {waiter}
        if task is not None and not task.done():
            waits.add(task)
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiter = None

    @staticmethod
    def _score(config: PostscreenConfig, answers: dict[str, Any]) -> Score:
        return score(config.sites, answers, config.dnsbl_min_ttl, config.dnsbl_max_ttl)

    async def _begin(self, machine: SmtpMachine) -> bool:
        """postscreen's tests (when it runs), then smtpd's greeting, or postscreen's
        dummy engine for a client it enforces; False: the session ended already."""
        screening = machine.screening
        outcome = Outcome()
        if screening is not None:
            outcome = await self._screen(screening)
            if outcome.reply is not None or self._eof:
                if outcome.reply is not None:
                    self._held.append(wire(outcome.reply))
                machine.screening = None  # the session never reached smtpd
                self._close()
                return False
            if screening.rcpt_reply is not None:
                # enforced: postscreen's dummy engine has the session, smtpd never sees it
                await self._perform(machine.start_dummy(send=outcome.greet))
                return True
        await self._perform(await machine.open(draining=self.shared.draining))
        if not machine.closing:
            early = False if screening is not None else await self._greet_pause()
            await self._perform(machine.greet(early, send=outcome.greet))
        return True

    async def _greet_pause(self) -> bool:
        """Wait out smtpgate_greet_pause (input ends it); whether the client spoke first."""
        machine = self.machine
        assert machine is not None
        pause = self.config.greet_pause
        if pause > 0:
            if not machine.buffered and not self._eof:
                loop = asyncio.get_running_loop()
                waiter = self._waiter = loop.create_future()
                timer = loop.call_later(pause, _settle, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._waiter = None
            return machine.buffered > 0
        if not machine.buffered and self._unread_input():
            await asyncio.sleep(0)  # let the loop read it, to log it as Postfix does
            return True
        return False

    def _deadline(self, now: float) -> float:
        return now + self.config.timeout

    async def _wait_input(self, deadline: float) -> bool:
        """Wait for more input; False when smtpd_timeout passed first."""
        machine, cfg = self.machine, self.config
        assert machine is not None
        loop = asyncio.get_running_loop()
        seen = self._arrivals
        start = time.monotonic()
        while True:
            if self._eof or self._arrivals != seen:
                return True
            now = time.monotonic()
            if cfg.per_request_deadline:
                limit = deadline
                if machine.in_content and cfg.min_data_rate > 0:
                    grown = machine.content_received / cfg.min_data_rate
                    limit = min(deadline + grown, max(start, self.last_input) + cfg.timeout)
            else:
                limit = max(start, self.last_input) + cfg.timeout
            if limit <= now:
                return False
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(limit - now, _settle, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if self._arrivals != seen or self._eof:
                return True

    async def _perform(self, effects: list[Effect]) -> None:
        for effect in effects:
            if type(effect) is bytes:
                self._held.append(effect)
                self._held_size += len(effect)
            elif effect is FLUSH:
                await self._flush()
            elif effect is CLOSE:
                self._close()
                return
            elif effect is START_TLS:
                await self._flush()
                await self._start_tls()
            elif isinstance(effect, float):
                await self._flush()
                await asyncio.sleep(effect)
        machine = self.machine
        assert machine is not None
        if self._held and (
            not machine.buffered or machine.in_content or self._held_size > WRITE_BACKLOG
        ):
            self._push()
        if self._write_paused is not None:
            await self._flush()  # a client that does not read: at most smtpd_timeout

    def _push(self) -> None:
        """Hand the held replies to the transport in one write (one send())."""
        held = self._held
        if not held:
            return
        self.shared.maillog.flush()  # log lines reach the file before the reply the client
        data = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        self._held_size = 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def _flush(self) -> None:
        """Write out what is held and wait (at most smtpd_timeout) until the client has
        taken it."""
        self._push()
        waiter = self._write_paused
        if waiter is None or self.transport is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.config.timeout)
        except TimeoutError:
            machine = self.machine
            assert machine is not None
            self.shared.maillog.info(f"timeout after {machine.where} from {machine.namaddr}")
            machine.closing = True
            self.transport.abort()  # drop what is unsent

    async def _start_tls(self) -> None:
        machine, transport = self.machine, self.transport
        context = self.shared.tls_context
        assert machine is not None and transport is not None and context is not None
        machine.discard_input()  # plaintext behind STARTTLS is never read as commands
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.config.timeout,
            )
        except Exception as exc:  # any handshake failure ends the session
            await self._perform(machine.tls_failed(str(exc) or type(exc).__name__))
            return
        if new is None:
            await self._perform(machine.tls_failed("connection closed"))
            return
        self.transport = new
        machine.discard_input()
        machine.tls_started(_tls_facts(new))

    def _close(self) -> None:
        self._push()
        if self.machine is not None:
            self.machine.closing = True
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _unread_input(self) -> bool:
        """Whether the client sent bytes the event loop has not read yet (Postfix peeks at
        the socket the same way before its greeting: FIONREAD, no waiting)."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return False
        try:
            count = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            return False
        return int.from_bytes(count, sys.byteorder) > 0

    @property
    def busy(self) -> bool:
        return self.machine is not None and self.machine.busy

    async def drain(self) -> None:
        """Shutdown: an idle session gets 421 and is closed; a busy one finishes first."""
        if self.machine is not None and not self.machine.closing:
            await self._perform(self.machine.shutdown())

    def abort(self) -> None:
        """The drain timed out: close now."""
        self._close()
        if self.task is not None:
            self.task.cancel()


_BACKGROUND: set[asyncio.Task[None]] = set()  # cache writes in flight (kept referenced)


def _tls_facts(transport: asyncio.BaseTransport) -> TlsInfo | None:
    """The protocol and cipher of a TLS transport (milter macros, policy attributes)."""
    cipher = transport.get_extra_info("cipher")  # (name, protocol, secret bits)
    return TlsInfo(cipher[1], cipher[0], cipher[2]) if cipher else None


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _service(transport: asyncio.BaseTransport) -> str:
    """The listener as Postfix names an inet service: host:port."""
    name = transport.get_extra_info("sockname")
    if not name:
        return "smtp"
    host = str(name[0])
    return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"


def _server(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """The listener's address and port this client reached ({daemon_addr})."""
    name = transport.get_extra_info("sockname")
    return (str(name[0]), int(name[1])) if name else None


def _peername(transport: asyncio.BaseTransport) -> Any:
    """The client's (address, port), read once, when the connection is made.

    uvloop does not keep the address accept() returned: it asks getpeername(), which
    fails (ENOTCONN) when the client has already reset the connection -- the port
    scanner's connect-and-reset (nmap -sT), whose RST arrives before the accept.  The
    kernel still knows the address; Linux's SO_PEERNAME reads it the way accept() does,
    without getpeername's connected-state check.  Only "unknown" when that fails too.
    """
    peer = transport.get_extra_info("peername")
    if peer or not sys.platform.startswith("linux"):
        return peer
    sock = transport.get_extra_info("socket")
    size = _SOCKADDR_SIZE.get(sock.family) if sock is not None else None
    if size is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERNAME, size)
    except OSError:
        return None
    port = int.from_bytes(raw[2:4], "big")
    if sock.family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


SO_PEERNAME = getattr(socket, "SO_PEERNAME", 28)  # Linux's value (asm-generic/socket.h)
# sizeof(struct sockaddr_in), sizeof(struct sockaddr_in6)
_SOCKADDR_SIZE: dict[int, int] = {socket.AF_INET: 16, socket.AF_INET6: 28}


def _client_info(peer: Any) -> ClientInfo:
    if not peer:
        return ClientInfo(address="unknown")
    host, port = str(peer[0]), int(peer[1])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return ClientInfo(address=host, port=port)
