"""The lock-step transaction: the client's 250 is the backend's 250.

Theory of operation (Postfix ``smtpd_proxy_filter`` without ``speed_adjust``,
``src/smtpd/smtpd_proxy.c``):

1. :meth:`Relay.begin` starts a :class:`Transaction` for a MAIL FROM that local policy
   accepted, to relayhost or to the next hop it is given (a FILTER destination, the hold
   relayhost). It does no I/O: the backend is contacted at the first recipient that local
   policy accepted, so rejected spam never costs a backend connection.
2. The first :meth:`Transaction.rcpt` checks a connection out of the next hop's
   :class:`~smtpgate.relay.pool.Pool`, then sends XFORWARD with the attributes the
   backend's EHLO lists and MAIL FROM with the client's parameters. When the backend
   offers PIPELINING, the RSET probe of a reused connection, XFORWARD, MAIL and the first
   RCPT go in one write and their replies are judged in order, as in lock-step; after a
   refused MAIL the RCPT's reply, a 503, is read and dropped, as Postfix's own smtp
   client does. Every RCPT is forwarded and the backend's reply is the client's reply.
3. :meth:`Transaction.start_data` sends DATA when the client says DATA (as Postfix's
   proxy does; a transaction that then ends without :meth:`~Transaction.data` closes the
   backend connection, so nothing is delivered). :meth:`Transaction.data` reads its reply
   (or sends DATA itself), then the message framed here (:mod:`smtpgate.relay.wire`:
   CRLF line ends and dot-stuffing, never the client's raw bytes) and the final dot. A
   backend that offers CHUNKING gets the message with BDAT instead (``BDAT n LAST``, or
   bounded chunks for a big message; no dot-stuffing), and ``start_data`` does nothing.
   The backend's reply to the dot (to the last chunk) is the client's reply.
4. Every doubt is a ``451 4.3.0 Error: queue file write error`` with no internal detail
   (Postfix's ``CLEANUP_STAT_PROXY`` reply); the detail goes to the ``smtpgate.relay``
   logger. Proper 4xx/5xx replies of the backend to MAIL, RCPT, DATA, BDAT and the dot
   are passed through (text censored to printable ASCII, as Postfix's ``printable()``); a
   negative greeting, EHLO or XFORWARD reply, an unexpected 2xx/3xx, a garbled reply, a
   timeout or a lost connection become the 451 and the connection is closed. A backend
   ``421`` is not passed through either (the client did not ask to be disconnected): 451,
   and the connection is dropped. After such a fault the transaction is dead: every later
   call returns the same reply without contacting the backend again.
5. Nothing is retried once the final dot (the last chunk) was written; a fault after that
   sets :attr:`Transaction.outcome_unknown` (a duplicate is acceptable, a loss is not).
   Everything before is safe to redo, so a stale pooled connection is replaced silently.
6. The connection goes back to its pool after a final reply to the dot or after
   :meth:`Transaction.abort` (which sends RSET and never the dot).

Differences from Postfix: the greeting is bounded by ``smtp_connect_timeout`` (Postfix:
the whole proxy exchange is bounded by ``smtpd_proxy_timeout``). The SNI name is
``smtp_tls_servername`` when that is a literal, else the next hop's name (Postfix sends
none by default).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence

from smtpgate.config.relayconf import RelayConfig, Relayhost
from smtpgate.facts import ClientFacts
from smtpgate.policy.address import quote_822_local as quote_local
from smtpgate.relay.client import Connection, Fault, command, read_reply, reply_to
from smtpgate.relay.client import classify as _classify
from smtpgate.relay.pool import NextHops, Pool
from smtpgate.relay.tls import TLSPolicy, tls_policy
from smtpgate.relay.wire import (
    DSN_MAIL_PARAMS,
    DSN_RCPT_PARAMS,
    arg,
    bdat_chunks,
    data_pieces,
    without,
    xforward_commands,
)
from smtpgate.reply import Reply
from smtpgate.smtp.ports import NO_METRICS, Metrics

logger = logging.getLogger("smtpgate.relay")

R451_PROXY = Reply(451, "4.3.0", "Error: queue file write error")
"""Postfix's reply for any proxy (backend) failure: no internal detail for strangers."""
R501_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R501_BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
R554_NO_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
R503_NO_TRANSACTION = Reply(503, "5.5.1", "Error: need MAIL command")

CONTENT_CHUNK = 64 * 1024
"""Content is written in pieces of this size, each followed by flow control."""
_QUEUE_ID = re.compile(r"queued as (\S+)", re.IGNORECASE)


class Relay:
    """The backend side of smtpgate: one connection pool per next hop, and transactions."""

    def __init__(self, config: RelayConfig, tls: TLSPolicy | None = None) -> None:
        self.config = config
        self.tls = tls or TLSPolicy()
        self._pools: dict[Relayhost, Pool] = {}
        self._next_hops: NextHops | None = None
        self._closed = False
        self.metrics: Metrics = NO_METRICS
        """Told of backend connections, replies and faults (set before the first use)."""

    @classmethod
    def from_config(cls, config: RelayConfig) -> Relay:
        """Build the relay; reads the TLS certificate files (ConfigError naming file and
        line when one cannot be used)."""
        return cls(config, tls_policy(config.tls, config))

    @property
    def relayhost(self) -> Relayhost | None:
        return self.config.relayhost

    @property
    def hold_relayhost(self) -> Relayhost | None:
        """``smtpgate_hold_relayhost`` (None: a held message goes to relayhost)."""
        return self.config.hold_relayhost

    @property
    def command_timeout(self) -> float:
        return self.config.command_timeout

    @property
    def next_hops(self) -> NextHops | None:
        """MX lookup for unbracketed next hops (set by the server; None: A lookup only)."""
        return self._next_hops

    @next_hops.setter
    def next_hops(self, lookup: NextHops | None) -> None:
        self._next_hops = lookup
        for pool in self._pools.values():
            pool.next_hops = lookup

    def pool(self, hop: Relayhost) -> Pool:
        """The connection pool of *hop* (made on first use)."""
        pool = self._pools.get(hop)
        if pool is None:
            pool = self._pools[hop] = Pool(hop, self.config, self.tls, closed=self._closed)
            pool.next_hops = self._next_hops
            pool.metrics = self.metrics
        return pool

    @property
    def idle_connections(self) -> int:
        return sum(pool.idle_connections for pool in self._pools.values())

    @property
    def connections_opened(self) -> int:
        """How many backend connections were opened (for tests and statistics)."""
        return sum(pool.connections_opened for pool in self._pools.values())

    async def begin(
        self,
        client: ClientFacts,
        sender: str,
        mail_params: Sequence[str] = (),
        next_hop: Relayhost | None = None,
    ) -> Transaction:
        """Start a transaction for *sender* (the bare address, "" for the null sender) to
        *next_hop*, or to relayhost when it is None.

        Never raises for backend faults and does no I/O: a transaction that cannot go
        anywhere carries its reply in :attr:`Transaction.reply`.
        """
        hop = next_hop or self.config.relayhost
        transaction = Transaction(self, client, sender, mail_params, hop)
        if hop is None:
            logger.warning(
                "relayhost is empty: deferring mail from %s[%s] (451 4.3.0)",
                client.name,
                client.addr,
            )
            transaction.reply = R451_PROXY
        elif arg(sender) is None or any(arg(p) is None or not p for p in mail_params):
            logger.warning("refusing sender %r %r: control characters", sender, mail_params)
            transaction.reply = R501_BAD_SENDER
        return transaction

    async def close(self) -> None:
        """Close idle pooled connections (QUIT, briefly); later check-ins close instead."""
        self._closed = True
        await asyncio.gather(*(pool.close() for pool in self._pools.values()))


def _rcpt_line(conn: Connection, address: bytes, params: list[bytes]) -> bytes:
    if not conn.dsn:
        params = without(params, DSN_RCPT_PARAMS)
    return b" ".join([b"RCPT", b"TO:<" + address + b">", *params]) + b"\r\n"


class Transaction:
    """One mail transaction relayed in lock-step; see the module docstring.

    Call :meth:`abort` whenever the client's transaction ends without a completed
    :meth:`data` (it is a harmless no-op after data()).
    """

    def __init__(
        self,
        relay: Relay,
        client: ClientFacts,
        sender: str,
        mail_params: Sequence[str],
        hop: Relayhost | None = None,
    ) -> None:
        self.relay = relay
        self.client = client
        self.sender = sender
        self.mail_params = tuple(mail_params)
        self.next_hop = hop
        """Where this transaction goes (None: nowhere, relayhost is empty)."""
        self.reply: Reply | None = None
        """Set when the transaction is dead: the reply every later command gets."""
        self.outcome_unknown = False
        """True when the backend failed after the final dot was sent (maybe stored)."""
        self.reply_history: list[tuple[str, Reply]] = []
        """(command, reply given to the client) for every relayed step, for logs."""
        self.fault: str | None = None
        """Log detail of the fault that killed the transaction, if one did."""
        self._conn: Connection | None = None
        self._accepted = 0
        self._finished = False
        self._data_started = False  # DATA written ahead by start_data()
        self._dot_sent = False
        self._peer = ""
        self._tls = False

    @property
    def accepted_recipients(self) -> int:
        return self._accepted

    @property
    def backend_peer(self) -> str:
        """``host[addr]:port`` of the backend connection used (empty before one)."""
        return self._peer

    @property
    def tls(self) -> bool:
        """Whether the backend connection used was TLS-protected."""
        return self._tls

    @property
    def backend_queue_id(self) -> str | None:
        """The queue id in the backend's final reply (``queued as X``), if any."""
        for verb, reply in reversed(self.reply_history):
            if verb == "END-OF-DATA":
                match = _QUEUE_ID.search(reply.text)
                return match.group(1) if match else None
        return None

    def _record(self, verb: str, reply: Reply) -> Reply:
        self.reply_history.append((verb, reply))
        return reply

    def _fail(self, verb: str, fault: Fault) -> Reply:
        """Kill the transaction after a backend fault: close, log, 451 from now on."""
        self._drop()
        if self._dot_sent and not fault.definite:
            self.outcome_unknown = True
        self.fault = fault.detail
        self.relay.metrics.backend_error(verb)
        logger.warning(
            "%s from %s[%s]: backend %s: %s%s",
            verb,
            self.client.name,
            self.client.addr,
            self._peer or self.next_hop,
            fault.detail,
            "; the message may have been delivered (outcome unknown)"
            if self.outcome_unknown
            else "",
        )
        self.reply = R451_PROXY
        return self._record(verb, R451_PROXY)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _give_back(self, rset: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self.relay.pool(conn.hop).checkin(conn, rset=rset)

    # -- envelope --------------------------------------------------------------------------

    async def rcpt(self, recipient: str, params: Sequence[str] = ()) -> Reply:
        """Forward one recipient; returns the reply for the client (see module docstring)."""
        if self._finished:
            return R503_NO_TRANSACTION
        if self.reply is not None:
            return self.reply
        address = arg(quote_local(recipient))
        options = [arg(p) for p in params]
        if address is None or any(o is None or not o for o in options):
            logger.warning("refusing recipient %r %r: control characters", recipient, params)
            return R501_BAD_RECIPIENT
        rcpt_params = [o for o in options if o]
        start = time.monotonic()
        try:
            if self._conn is None:
                first = await self._first_rcpt(address, rcpt_params)
                if first is None:
                    assert self.reply is not None
                    return self.reply
                reply = first
            else:
                line = _rcpt_line(self._conn, address, rcpt_params)
                reply = await command(self._conn, "RCPT TO", line, self.relay.command_timeout)
        except Fault as fault:
            return self._fail("RCPT", fault)
        except BaseException:
            self._drop()
            raise
        if reply.is_success:
            self._accepted += 1
        self.relay.metrics.backend_reply("RCPT", reply.code, time.monotonic() - start)
        return self._record("RCPT", reply)

    async def _first_rcpt(self, address: bytes, rcpt_params: list[bytes]) -> Reply | None:
        """Connection, XFORWARD, MAIL FROM and the first RCPT TO: the reply to the RCPT,
        or None (and self.reply) when MAIL was refused.

        A backend that offers PIPELINING gets the probe of a reused connection (RSET),
        XFORWARD, MAIL and the RCPT in one write (RFC 2920; one round trip instead of
        two); the replies are read and judged one by one, as in lock-step. After a
        refused MAIL the RCPT's reply (a 503) is read and dropped, so that the connection
        stays in step. A reused connection whose RSET fails is replaced silently.
        """
        assert self.next_hop is not None
        pool = self.relay.pool(self.next_hop)
        timeout = self.relay.command_timeout
        while True:
            conn = await pool.checkout(self.client)
            self._conn = conn
            self._peer = conn.peer
            self._tls = conn.tls
            if not conn.pipelining:
                if conn.reused and not await self._probe(conn, None):
                    continue
                return await self._first_rcpt_lockstep(conn, address, rcpt_params)
            xforward = self._xforward(conn)
            group = [
                *([b"RSET\r\n"] if conn.reused else []),
                *xforward,
                self._mail_line(conn),
                _rcpt_line(conn, address, rcpt_params),
            ]
            try:
                conn.protocol.write(b"".join(group))
            except Fault as fault:
                conn.close()
                raise Fault(f"{fault.detail} (sending MAIL FROM)") from None
            if conn.reused and not await self._probe(conn, timeout):
                continue
            for _ in xforward:
                await reply_to(conn, "XFORWARD", timeout, passthrough=False)
            reply = await reply_to(conn, "MAIL FROM", timeout)
            if self._mail_done(conn, reply):
                return await reply_to(conn, "RCPT TO", timeout)
            # MAIL refused (self.reply is the client's answer): the RCPT got a 503.
            try:
                await reply_to(conn, "RCPT TO", timeout)
            except Fault:
                conn.close()  # out of step: not for the pool
            if conn.alive:
                await pool.checkin(conn, rset=False)
            return None

    async def _probe(self, conn: Connection, written: float | None) -> bool:
        """Judge the RSET probe of a reused connection (*written*: the timeout when RSET
        was already written in a group, None to send it now); False when it is stale."""
        timeout = self.relay.command_timeout
        try:
            if written is None:
                await command(conn, "RSET", b"RSET\r\n", timeout, passthrough=False)
            else:
                await reply_to(conn, "RSET", timeout, passthrough=False)
        except Fault as fault:
            logger.info("pooled connection to %s is stale: %s", conn.peer, fault.detail)
            self._drop()
            return False
        return True

    def _xforward(self, conn: Connection) -> list[bytes]:
        return [
            line.encode("ascii") + b"\r\n" for line in xforward_commands(self.client, conn.xforward)
        ]

    def _mail_line(self, conn: Connection) -> bytes:
        sender = arg(quote_local(self.sender)) if self.sender else b""
        assert sender is not None  # checked in begin()
        params = [p.encode("utf-8", "surrogateescape") for p in self.mail_params]
        if not conn.dsn:
            params = without(params, DSN_MAIL_PARAMS)
        return b" ".join([b"MAIL", b"FROM:<" + sender + b">", *params]) + b"\r\n"

    def _mail_done(self, conn: Connection, reply: Reply) -> bool:
        """Record the reply to MAIL; False (self.reply set, self._conn cleared) if refused."""
        self._record("MAIL", reply)
        conn.transactions += 1
        if reply.is_success:
            return True
        logger.warning(
            "backend %s rejected MAIL FROM:<%s> from %s[%s]: %s",
            conn.peer,
            self.sender,
            self.client.name,
            self.client.addr,
            reply,
        )
        self.reply = reply
        self._conn = None
        return False

    async def _first_rcpt_lockstep(
        self, conn: Connection, address: bytes, rcpt_params: list[bytes]
    ) -> Reply | None:
        """XFORWARD, MAIL, RCPT one at a time, for a backend without PIPELINING."""
        timeout = self.relay.command_timeout
        for line in self._xforward(conn):
            await command(conn, "XFORWARD", line, timeout, passthrough=False)
        reply = await command(conn, "MAIL FROM", self._mail_line(conn), timeout)
        if not self._mail_done(conn, reply):
            await self.relay.pool(conn.hop).checkin(conn, rset=False)
            return None
        return await command(conn, "RCPT TO", _rcpt_line(conn, address, rcpt_params), timeout)

    # -- content ---------------------------------------------------------------------------

    def start_data(self) -> None:
        """Send DATA now, while the client sends the content: its reply is read by
        :meth:`data`, so the backend's 354 costs no round trip once the client's dot
        is in (Postfix's before-queue proxy forwards DATA when the client says it too).
        Nothing to do for a backend that takes BDAT (the size comes with the content).

        A transaction that ends without :meth:`data` after this closes the backend
        connection (a backend in DATA mode takes no RSET), so nothing is delivered.
        """
        conn = self._conn
        if self._finished or self.reply is not None or conn is None or self._accepted == 0:
            return
        if self._data_started or conn.chunking:
            return
        try:
            conn.protocol.write(b"DATA\r\n")
        except Fault:
            return  # data() finds the connection dead and answers 451
        self._data_started = True

    async def data(self, message: bytes) -> Reply:
        """Send the message and end it; the backend's reply to the end is the client's.

        *message* is the content as the client meant it: dots unstuffed, lines ending in
        CRLF or a bare LF, a lone CR sent as a space (see :mod:`smtpgate.relay.wire`); it is framed
        here, with DATA or with BDAT when the backend offers CHUNKING.
        """
        if self._finished:
            return R503_NO_TRANSACTION
        self._finished = True
        if self.reply is not None:
            return self.reply
        conn = self._conn
        if conn is None or self._accepted == 0:
            await self._give_back(rset=True)
            return R554_NO_RECIPIENTS
        began = time.monotonic()
        try:
            if conn.chunking:
                verb, reply = await self._send_bdat(conn, message)
                if verb != "END-OF-DATA":
                    await self._give_back(rset=True)
                    return self._record(verb, reply)
            else:
                timeout = self.relay.command_timeout
                if self._data_started:
                    start = await reply_to(conn, "DATA", timeout, 3)
                else:
                    start = await command(conn, "DATA", b"DATA\r\n", timeout, 3)
                if not start.is_success:
                    await self._give_back(rset=True)
                    return self._record("DATA", start)
                await self._send_content(conn, *data_pieces(message))
                reply = await self._end_of_data(conn)
        except Fault as fault:
            return self._fail("END-OF-DATA" if self._dot_sent else "DATA", fault)
        except BaseException:
            if self._dot_sent:
                self.outcome_unknown = True
            self._drop()
            raise
        self.relay.metrics.backend_reply("END-OF-DATA", reply.code, time.monotonic() - began)
        await self._give_back(rset=False)
        return self._record("END-OF-DATA", reply)

    async def _send_content(self, conn: Connection, body: bytes, end: bytes) -> None:
        """Write the framed content with flow control (each wait bounded), then the dot;
        a message up to CONTENT_CHUNK is one write with its dot."""
        protocol = conn.protocol
        timeout = self.relay.command_timeout
        try:
            size = len(body)
            if size > CONTENT_CHUNK:
                view = memoryview(body)
                for offset in range(0, size, CONTENT_CHUNK):
                    protocol.write(view[offset : offset + CONTENT_CHUNK])
                    if protocol.must_drain:
                        await protocol.drain(timeout)
                self._dot_sent = True
                protocol.write(end)
            else:
                self._dot_sent = True  # this write ends with the dot
                protocol.writelines([body, end])
            if protocol.must_drain:
                await protocol.drain(timeout)
        except TimeoutError:
            conn.close()
            raise Fault(f"timeout sending message content ({timeout:g}s)") from None
        except Fault as fault:
            conn.close()
            raise Fault(f"lost connection sending message content: {fault.detail}") from None

    async def _send_bdat(self, conn: Connection, message: bytes) -> tuple[str, Reply]:
        """The message in BDAT chunks (RFC 3030), each chunk's reply read before the next
        is sent; ``("END-OF-DATA", reply to the LAST chunk)``, or ``("BDAT", refusal)``
        when the backend refused an earlier chunk."""
        protocol = conn.protocol
        timeout = self.relay.command_timeout
        for line, chunk in bdat_chunks(message, self.relay.config.chunk_size):
            last = line.endswith(b" LAST\r\n")
            try:
                if last:
                    self._dot_sent = True  # the end of the message is in this write
                if len(chunk) <= CONTENT_CHUNK:
                    protocol.writelines([line, chunk])
                else:
                    protocol.write(line)
                    for offset in range(0, len(chunk), CONTENT_CHUNK):
                        protocol.write(chunk[offset : offset + CONTENT_CHUNK])
                        if protocol.must_drain:
                            await protocol.drain(timeout)
                if protocol.must_drain:
                    await protocol.drain(timeout)
            except TimeoutError:
                conn.close()
                raise Fault(f"timeout sending message content ({timeout:g}s)") from None
            except Fault as fault:
                conn.close()
                raise Fault(f"lost connection sending message content: {fault.detail}") from None
            if last:
                return "END-OF-DATA", await self._end_of_data(conn)
            reply = await reply_to(conn, "BDAT", timeout)
            if not reply.is_success:
                return "BDAT", reply
        raise AssertionError("bdat_chunks ends with a LAST chunk")

    async def _end_of_data(self, conn: Connection) -> Reply:
        code, text = await read_reply(conn, "end of data", self.relay.command_timeout)
        if code == 421:
            conn.close()
        return _classify("end of data", code, text, 2, passthrough=True)

    async def abort(self) -> None:
        """End without the dot: RSET the backend and pool the connection, or close it
        (always after :meth:`start_data`)."""
        if self._finished:
            return
        self._finished = True
        if self._data_started:
            self._drop()  # the backend may be waiting for content: only a close is safe
            return
        try:
            await self._give_back(rset=True)
        except BaseException:
            self._drop()
            raise
