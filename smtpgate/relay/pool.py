"""Backend connections for one next hop: opened on demand, reused with RSET, dropped on doubt.

A :class:`Pool` belongs to one next hop (relayhost, a FILTER destination, the hold
relayhost); the relay keeps one per next hop in use. Its public interface is
:meth:`Pool.checkout` (a ready connection: greeting, EHLO, STARTTLS and EHLO again done,
no transaction open) and :meth:`Pool.checkin` (give it back after a transaction).

A connection from the idle list comes with ``reused`` set and is *not* probed here: the
transaction sends the RSET probe in the same write as its first commands (one round trip
instead of two), and closes the connection and checks out another when the probe fails.
Connections are dropped after a 421, a timeout, any error, ``max_transactions``
transactions or ``max_age`` seconds, and when idle longer than ``idle_timeout``; at most
``max_idle`` idle connections are kept.  With ``smtpgate_backend_proxy_protocol`` no
connection is reused: each begins with a PROXY header naming the client it was opened
for (before the greeting, and before the TLS handshake in wrapper mode), so it serves
that transaction only.

Opening: connect (``smtp_connect_timeout``, which also bounds the greeting), greeting,
EHLO ``$smtpd_proxy_ehlo``, STARTTLS per :mod:`smtpgate.relay.tls`, EHLO again. An
unbracketed next hop (``host`` or ``host:port``) is looked up as MX, as Postfix does,
through :attr:`Pool.next_hops` (set by the server: the resolver's MX lookup in preference
order, then A/AAAA); each address is tried in turn. ``[host]`` forms are exact.
Certificate names are matched against the next hop's name, also for MX hosts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from smtpgate import proxyproto
from smtpgate.config.relayconf import RelayConfig, Relayhost
from smtpgate.facts import ClientFacts
from smtpgate.relay.client import (
    BackendProtocol,
    Connection,
    Fault,
    TLSHandshakeFault,
    classify,
    command,
    open_protocol,
    read_reply,
    start_tls,
)
from smtpgate.relay.tls import TLSPolicy, peer_name_matches
from smtpgate.relay.wire import printable, reply_from_backend
from smtpgate.smtp.ports import NO_METRICS, Metrics

logger = logging.getLogger("smtpgate.relay")

QUIT_TIMEOUT = 2.0

NextHops = Callable[[str, int], Awaitable[list[tuple[str, int]]]]
"""MX lookup: (host, port) -> [(address, port), ...] in the order to try."""


class Pool:
    """Connections to one next hop; see the module docstring."""

    def __init__(
        self, hop: Relayhost, config: RelayConfig, tls: TLSPolicy, *, closed: bool = False
    ) -> None:
        self.hop = hop
        self.config = config
        self.tls = tls
        self.next_hops: NextHops | None = None
        """MX lookup for an unbracketed next hop (None: the host's addresses only)."""
        self._idle: list[Connection] = []
        self._closed = closed  # after close(): check-ins close instead of keeping
        self.connections_opened = 0
        """How many backend connections were opened (for tests and statistics)."""
        self.metrics: Metrics = NO_METRICS

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def checkout(self, client: ClientFacts | None = None) -> Connection:
        """An idle connection (``reused``: probe it before use) or a new one; a Fault
        when no connection can be opened.

        With ``smtpgate_backend_proxy_protocol`` the connection is always new and begins
        with a PROXY header naming *client*; it is never pooled (it speaks for that
        client only), so check-in closes it.
        """
        if self.config.proxy_protocol:
            conn = await self._connect(self._proxy_header(client))
            conn.reused = False
            return conn
        while self._idle:
            conn = self._idle.pop()
            if self._reusable(conn):
                conn.reused = True
                return conn
            conn.close()
        start = time.monotonic()
        try:
            conn = await self._connect()
        except Fault:
            self.metrics.backend_connect(False, time.monotonic() - start)
            raise
        self.metrics.backend_connect(True, time.monotonic() - start)
        conn.reused = False
        return conn

    async def checkin(self, conn: Connection, rset: bool) -> None:
        """Give *conn* back after a transaction; RSET first when one may still be open."""
        conn.last_used = time.monotonic()
        if rset and conn.alive:
            try:
                await command(conn, "RSET", b"RSET\r\n", self.config.command_timeout, 2, False)
            except Fault as fault:
                logger.warning("backend %s: %s (connection dropped)", conn.peer, fault.detail)
                conn.close()
                return
        if self._closed or len(self._idle) >= self.config.max_idle or not self._reusable(conn):
            await self._quit(conn)
            return
        self._idle.append(conn)

    async def close(self) -> None:
        """Close idle connections (QUIT, briefly); later check-ins close instead."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(conn) for conn in idle))

    def _reusable(self, conn: Connection) -> bool:
        now = time.monotonic()
        cfg = self.config
        return (
            not cfg.proxy_protocol
            and conn.alive
            and now - conn.created < cfg.max_age
            and now - conn.last_used < cfg.idle_timeout
            and conn.transactions < cfg.max_transactions
        )

    async def _quit(self, conn: Connection) -> None:
        try:
            if conn.alive:
                await command(conn, "QUIT", b"QUIT\r\n", QUIT_TIMEOUT, 2, False)
        except Fault:
            pass
        finally:
            conn.close()

    # -- opening ---------------------------------------------------------------------------

    def _proxy_header(self, client: ClientFacts | None) -> bytes:
        if client is None:
            return proxyproto.encode(self.config.proxy_protocol, None, None)
        return proxyproto.encode(
            self.config.proxy_protocol, (client.addr, client.port), client.server
        )

    async def _connect(self, preamble: bytes = b"") -> Connection:
        """Connect to the next hop, or to its MX hosts in preference order; *preamble*
        (a PROXY header) is the first thing written."""
        hop = self.hop
        if not hop.mx_lookup or self.next_hops is None:
            return await self._connect_to(hop.host, hop.port, preamble)
        try:
            hops = await self.next_hops(hop.host, hop.port)
        except Exception as exc:  # the resolver's DnsLookupError, whatever its kind
            raise Fault(f"next hop {hop}: {exc}") from None
        last: Fault | None = None
        for address, port in hops:
            try:
                return await self._connect_to(address, port, preamble)
            except Fault as fault:
                if fault.definite:
                    raise
                logger.warning("%s; trying the next MX host", fault.detail)
                last = fault
        raise last or Fault(f"next hop {hop}: no address to connect to")

    async def _connect_to(self, host: str, port: int, preamble: bytes) -> Connection:
        if self.tls.level != "may":
            return await self._session(host, port, self.tls.level != "none", preamble)
        try:
            return await self._session(host, port, True, preamble)
        except TLSHandshakeFault as fault:
            logger.warning(
                "%s; retrying in plaintext (smtp_tls_security_level = may)", fault.detail
            )
            return await self._session(host, port, False, preamble)

    async def _session(self, host: str, port: int, use_tls: bool, preamble: bytes) -> Connection:
        """One new SMTP session: connect (and the preamble), greeting, EHLO, STARTTLS and
        EHLO when asked."""
        wrapped = use_tls and self.tls.wrappermode
        protocol = await self._dial(host, port, wrapped, preamble)
        try:
            conn = Connection(protocol, self.hop, _describe_peer(protocol, self.hop))
            await self._greeting(conn)
            self.connections_opened += 1
            conn.tls = wrapped
            await self._ehlo(conn)
            if use_tls and not wrapped and await self._starttls(conn):
                await self._ehlo(conn)
            if wrapped:
                self._check_tls(conn)
            return conn
        except BaseException:
            protocol.close()
            raise

    async def _dial(self, host: str, port: int, wrapped: bool, preamble: bytes) -> BackendProtocol:
        timeout = self.config.connect_timeout
        context = self.tls.context if wrapped else None
        try:
            return await open_protocol(
                host, port, timeout, context, self.tls.server_name(self.hop.host), preamble
            )
        except TimeoutError:
            raise Fault(f"timeout connecting to backend {self.hop} ({timeout:g}s)") from None
        except ssl.SSLError as exc:
            raise TLSHandshakeFault(f"TLS handshake with {self.hop} failed: {exc}") from None
        except OSError as exc:
            raise Fault(f"connect to backend {self.hop}: {exc}") from None

    async def _greeting(self, conn: Connection) -> None:
        code, text = await read_reply(conn, "the greeting", self.config.connect_timeout)
        if code // 100 == 2:
            return
        conn.close()
        if 400 <= code <= 599:
            reply = reply_from_backend(code, text)
            raise Fault(f"backend {self.hop} greeted with: {reply}", definite=True)
        raise Fault(f"garbled greeting from backend {self.hop}: {printable(text)[:200]!r}")

    async def _ehlo(self, conn: Connection) -> None:
        line = b"EHLO " + self.config.ehlo_name.encode("ascii", "replace") + b"\r\n"
        timeout = self.config.command_timeout
        code, text = await read_reply_after(conn, f"EHLO at {conn.peer}", line, timeout)
        classify(f"EHLO at {conn.peer}", code, text, 2, passthrough=False)
        conn.offered(text)

    async def _starttls(self, conn: Connection) -> bool:
        """STARTTLS per the level; False when ``may`` continues in plaintext."""
        level = self.tls.level
        if "starttls" not in conn.extensions:
            if level == "may":
                return False
            raise Fault(
                f"TLS is required (smtp_tls_security_level = {level}), "
                f"but was not offered by {conn.peer}"
            )
        timeout = self.config.command_timeout
        code, text = await read_reply_after(conn, "STARTTLS", b"STARTTLS\r\n", timeout)
        if code != 220:
            detail = f"{conn.peer} refused STARTTLS: {code} {text}"
            if level != "may" or code == 421 or not conn.alive:
                raise Fault(detail)
            logger.warning("%s; continuing in plaintext (smtp_tls_security_level = may)", detail)
            return False
        assert self.tls.context is not None
        try:
            await start_tls(
                conn.protocol, self.tls.context, self.tls.server_name(self.hop.host), timeout
            )
        except (ssl.SSLError, OSError, TimeoutError, Fault) as exc:
            raise TLSHandshakeFault(f"TLS handshake with {conn.peer} failed: {exc}") from None
        conn.tls = True
        self._check_tls(conn)
        return True

    def _check_tls(self, conn: Connection) -> None:
        """Name check for verify/secure (the chain was verified in the handshake); log."""
        verified = "Anonymous"
        if self.tls.verifies:
            cert = conn.transport_info("peercert") or {}
            if not peer_name_matches(cert, self.tls.match, self.hop.host):
                raise Fault(
                    f"server certificate verification failed for {conn.peer}: "
                    f"name does not match {', '.join(self.tls.match)}"
                )
            verified = "Verified"
        elif self.tls.context is not None:
            verified = "Untrusted"
        if self.tls.loglevel >= 1:
            cipher = conn.transport_info("cipher") or ("?", "?", 0)
            logger.info(
                "%s TLS connection established to %s: %s with cipher %s",
                verified,
                conn.peer,
                cipher[1],
                cipher[0],
            )


async def read_reply_after(
    conn: Connection, verb: str, line: bytes, timeout: float
) -> tuple[int, str]:
    """Write *line* and read its raw reply (for the session set-up commands)."""
    try:
        conn.protocol.write(line)
    except Fault as fault:
        conn.close()
        raise Fault(f"{fault.detail} (sending {verb})") from None
    return await read_reply(conn, verb, timeout)


def _describe_peer(protocol: BackendProtocol, hop: Relayhost) -> str:
    transport = protocol.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    if not peername:
        return f"{hop.host}[?]:{hop.port}"
    return f"{hop.host}[{peername[0]}]:{peername[1]}"
