"""Server lifecycle: bind the listeners, run, and stop without losing a transaction.

``Server.start`` binds every address of ``listen``; ``Server.stop`` stops accepting,
answers idle sessions ``421 4.3.2 ... Service shutting down``, lets sessions that are in
the middle of a command (a relay in progress above all) finish within the drain
timeout, and only then closes what is left.  SIGTERM and SIGINT call ``stop``.

A ``Server`` serves one :class:`~smtpgate.generation.Generation` (built by the one load,
immutable); what changes while it runs -- its sessions, whether it drains -- is in its
:class:`~smtpgate.smtpd.Shared`, beside the generation, not in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from smtpgate import proxyproto
from smtpgate.anvil import AnvilClient, LocalAnvil, RemoteAnvil
from smtpgate.config.service import ListenAddress
from smtpgate.errors import ConfigError
from smtpgate.generation import Generation
from smtpgate.logs import MailLog, route_python_logging
from smtpgate.metrics import HealthEndpoint, ServerMetrics
from smtpgate.shared_state import AnvilStore, SharedAnvil, StorePassCache, shared_anvil
from smtpgate.smtpd import GateProtocol, Shared
from smtpgate.watch import WatchChannel, WatchEndpoint
from smtpgate.workdirs import worker_directory

DRAIN_TIMEOUT = 30.0


class ListenError(Exception):
    """A listener could not be bound; ``str()`` says what to do about it."""

    def __init__(self, address: ListenAddress, error: OSError) -> None:
        self.address = address
        self.error = error
        super().__init__(self._advice())

    def _advice(self) -> str:
        where = f"cannot listen on {self.address}"
        if self.error.errno == errno.EADDRINUSE:
            return (
                f"{where}: the address is already in use (another smtpgate or MTA runs "
                "there): stop it, or change listen"
            )
        if self.error.errno == errno.EACCES:
            return (
                f"{where}: permission denied: ports below 1024 need root (smtpgate then "
                "drops to smtpgate_user) or CAP_NET_BIND_SERVICE; or listen on a port "
                "above 1023, e.g. listen = 0.0.0.0:2525"
            )
        if self.error.errno == errno.EADDRNOTAVAIL:
            return f"{where}: no such address on this machine: check listen"
        return f"{where}: {self.error.strerror or self.error}"


def bind_listeners(
    addresses: Sequence[ListenAddress], copies: int = 1
) -> list[list[socket.socket]]:
    """Bind and listen on every address, ``copies`` times (one set per worker process).

    Each address is first bound alone, without SO_REUSEPORT: that fails when any other
    process holds the port, even one that set SO_REUSEPORT itself (a second smtpgate, a
    Postfix built with reuseport) and would otherwise share it, letting the kernel hand
    some clients to the other MTA past every restriction.  Then the copies are bound with
    SO_REUSEPORT, so each worker has its own accept queue and the kernel spreads new
    connections over them, and a small BPF program picks only among these copies: a
    process that joins the port later gets no connection.  Without SO_REUSEPORT (not
    Linux) there is one set, shared by all workers.  Returns one list of sockets per copy.
    Raises ListenError (closing what was already bound) when one cannot be bound.
    """
    reuseport = copies > 1 and hasattr(socket, "SO_REUSEPORT")
    sets: list[list[socket.socket]] = [[] for _ in range(copies if reuseport else 1)]
    try:
        for address in addresses:
            try:
                for family, kind, proto, sockaddr in _passive_addresses(address):
                    sockaddr = _probe(family, kind, proto, sockaddr)
                    group = []
                    for copy in sets:
                        sock = socket.socket(family, kind, proto)
                        copy.append(sock)
                        group.append(sock)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        if reuseport:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        sock.bind(sockaddr)
                        sock.listen(1024)
                        sock.setblocking(False)
                    if reuseport:
                        _keep_port_to_ourselves(group[0], len(group))
            except OSError as exc:
                raise ListenError(address, exc) from None
    except ListenError:
        for copy in sets:
            for sock in copy:
                sock.close()
        raise
    return sets


def _passive_addresses(address: ListenAddress) -> list[tuple[int, int, int, Any]]:
    infos = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    out: list[tuple[int, int, int, Any]] = []
    seen = set()
    for family, kind, proto, _, sockaddr in infos:
        if (family, sockaddr) not in seen:
            seen.add((family, sockaddr))
            out.append((family, kind, proto, sockaddr))
    return out


def _probe(family: int, kind: int, proto: int, sockaddr: Any) -> Any:
    """Bind ``sockaddr`` alone (EADDRINUSE when anyone holds it); the address to use, with
    port 0 replaced by the port the kernel chose."""
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(sockaddr)
        return (sockaddr[0], probe.getsockname()[1], *sockaddr[2:])


SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h


def _keep_port_to_ourselves(sock: socket.socket, count: int) -> bool:
    """Attach "a random number modulo ``count``" as the SO_REUSEPORT group's selector.

    The kernel then hands each new connection to one of the first ``count`` sockets of
    the group (ours, bound first), never to one that another process adds later.  False
    where the kernel refuses the program (not Linux, a seccomp filter): the check at
    start still holds.
    """
    skf_ad_random = -0x1000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM
    program = [
        (0x20, 0, 0, skf_ad_random & 0xFFFFFFFF),  # BPF_LD|BPF_W|BPF_ABS: A = random
        (0x94, 0, 0, count),  # BPF_ALU|BPF_MOD|BPF_K: A %= count
        (0x16, 0, 0, 0),  # BPF_RET|BPF_A: the socket with index A
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError:
        return False
    return True


# Standard modules that are imported on first use deep inside the standard library or a
# dependency (the IDNA codec, asyncio.to_thread's executor, ...).
LAZY_MODULES = (
    "concurrent.futures.thread",
    "encodings.idna",
    "encodings.punycode",
    "stringprep",
    "unicodedata",
    "asyncio.sslproto",
    "email.utils",
)


def preload_modules() -> str:
    """Import now what would otherwise be imported later, and say which event loop
    ``serve`` will use ("uvloop" or "asyncio").

    ``serve`` calls this before dropping privileges: afterwards the interpreter's own
    files may be unreadable (a Python installed under /root, say), and a module imported
    on first use would then be missing (uvloop, or the IDNA codec for an address with a
    non-ASCII domain).
    """
    import importlib

    from smtpgate import resolver

    for name in LAZY_MODULES:
        importlib.import_module(name)
    resolver.preload()
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def event_loop_name() -> str:
    """The running event loop's kind, for the log: "uvloop" or "asyncio"."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def write_pid_file(path: str, maillog: MailLog) -> bool:
    """Record this process id for ``smtpgate reload``; a failure is only a warning."""
    if not path:
        return False
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as exc:
        maillog.warning(
            f"pid_file {path}: {exc.strerror}: not written "
            "(smtpgate reload reaches the server without it)"
        )
        return False
    return True


def unprivileged_user(user: str) -> tuple[int, int] | None:
    """The (uid, gid) a root process becomes, None when not root; ConfigError for a user
    that does not exist or is root.  ``serve`` asks before it forks its first worker."""
    import pwd

    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"smtpgate_user = {user}: no such user: create it (useradd --system "
            f"--no-create-home --shell /usr/sbin/nologin {user}) or set smtpgate_user"
        ) from None
    if entry.pw_uid == 0:
        raise ConfigError(f"smtpgate_user = {user} is root: smtpgate will not run as root")
    return entry.pw_uid, entry.pw_gid


def prepare_spool(directory: str, user: str) -> None:
    """Make ``directory`` (mode 0700, owned by ``user`` when root)."""
    worker_directory("smtpgate_spool_directory", directory, unprivileged_user(user), "")


def private_spool(user: str) -> str:
    """A new private spool directory in the system's temporary directory: mode 0700,
    owned by ``user`` when root (the workers write there once they dropped root)."""
    return worker_directory("", "", unprivileged_user(user), "smtpgate-spool.")[0]


def drop_privileges(user: str) -> None:
    """Become ``user`` (its uid, gid, no supplementary groups); refuse to stay root."""
    ids = unprivileged_user(user)
    if ids is None:
        return
    os.setgroups([])
    os.setgid(ids[1])
    os.setuid(ids[0])
    if os.geteuid() == 0 or os.getuid() == 0:
        raise ConfigError("could not drop root privileges; refusing to run as root")


class Server:
    """Listeners plus the state their connections share."""

    def __init__(
        self,
        generation: Generation,
        maillog: MailLog,
        *,
        anvil: AnvilClient | None = None,
        spool_directory: str | None = None,
        metrics: ServerMetrics | None = None,
        watch: WatchChannel | None = None,
    ) -> None:
        """Serve ``generation`` (see :mod:`smtpgate.generation`); ``anvil``: the counters
        shared with the other workers (a ``RemoteAnvil`` on the supervisor's
        ``AnvilService``); by default this process's own.  With smtpgate_shared_state the
        per-client counters go to Redis, ``anvil`` keeps the rest and stands in for Redis
        while it does not answer (``smtpgate.shared_state``).  ``spool_directory``: where
        messages are spooled when smtpgate_spool_directory is empty (the supervisor's
        private directory); without it the server makes its own and removes it at stop.
        ``metrics``: what this worker counts for Prometheus (None: nothing); ``watch``:
        where sessions send their rows for the live view (smtpgate_watch; None: off)."""
        self.maillog = maillog
        self._own_spool: str | None = None
        if spool_directory is None:
            spool_directory = self._own_spool = tempfile.mkdtemp(prefix="smtpgate-spool.")
        local = anvil if anvil is not None else LocalAnvil()
        config = generation.config
        self.shared_anvil: SharedAnvil | None = None
        if config.shared_state:
            self.shared_anvil = shared_anvil(config.shared_state, local, config.shared_state_lease)
            if generation.verifier is not None:  # the verification cache goes there too
                generation.verifier.store = self.shared_anvil.store
        elif isinstance(local, RemoteAnvil) and generation.verifier is not None:
            # several workers: one verification cache for them all, in the supervisor
            generation.verifier.store = AnvilStore(local)
        self.shared = Shared(
            generation=generation,
            maillog=maillog,
            anvil=self.shared_anvil or local,
            spool_directory=spool_directory,
        )
        # postscreen's cache: the supervisor's anvil (every worker), and Redis when set
        if isinstance(local, LocalAnvil | RemoteAnvil):
            self.shared.pass_cache = local
        if self.shared_anvil is not None:
            self.shared.pass_cache = StorePassCache(self.shared_anvil.store, self.shared.pass_cache)
        self.metrics = metrics
        self.watch = watch if config.watch != "off" else None
        self.shared.watch = self.watch
        self.endpoint: HealthEndpoint | None = None
        self._probing = asyncio.Lock()
        if metrics is not None:
            self.shared.metrics = generation.relay.metrics = metrics
            if generation.policy_client is not None:
                generation.policy_client.metrics = metrics
            generation.milters.metrics = metrics
        self.retiring = False
        self.on_closed: Callable[[], None] | None = None
        """Called once the listeners are closed (a worker tells its supervisor)."""
        self.addresses = list(generation.config.listen)
        self.servers: list[asyncio.base_events.Server] = []
        self.stopped = asyncio.Event()

    @property
    def sockets(self) -> list[tuple[str, int]]:
        """The bound (host, port) pairs: port 0 in ``listen`` becomes the real port."""
        out = []
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    async def start(self, sockets: Sequence[socket.socket] | None = None) -> None:
        """Bind every listener (a clear ListenError when one cannot be bound).

        With ``sockets`` (already bound by ``bind_listeners``, in a worker process) serve
        those instead of binding.
        """
        loop = asyncio.get_running_loop()
        route_python_logging(self.maillog)
        for sock in sockets or ():
            self.servers.append(
                await loop.create_server(lambda: GateProtocol(self.shared), sock=sock, backlog=1024)
            )
        for address in self.addresses if sockets is None else ():
            try:
                server = await loop.create_server(
                    lambda: GateProtocol(self.shared),
                    host=address.host,
                    port=address.port,
                    reuse_address=True,
                    backlog=1024,
                )
            except OSError as exc:
                for bound in self.servers:
                    bound.close()
                raise ListenError(address, exc) from None
            self.servers.append(server)
        if self.shared_anvil is not None:
            self.shared_anvil.start()
        names = ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.sockets)
        self.maillog.info(f"smtpgate listening on {names} (event loop: {event_loop_name()})")
        if self.metrics is not None:
            self.metrics.start()

    async def serve_metrics(self, sock: socket.socket) -> None:
        """Answer /metrics, /healthz and /readyz on ``sock`` (bound by the supervisor)."""
        assert self.metrics is not None
        paths = "metrics, healthz, readyz"
        if self.watch is not None:
            mode = self.shared.config.watch
            self.endpoint = WatchEndpoint(self.metrics, self.readiness, self.watch, mode)
            paths += ", watch" + (" for loopback clients" if mode == "loopback" else "")
        else:
            self.endpoint = HealthEndpoint(self.metrics, self.readiness)
        await self.endpoint.start(sock)
        host, port = sock.getsockname()[:2]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.maillog.info(f"metrics and health checks on http://{where}/ ({paths})")

    async def readiness(self) -> tuple[bool, str]:
        """/readyz: serving a configuration (it is loaded before a worker starts), not
        stopping, and the backend reachable: it accepted a connection within
        smtpgate_readyz_backend_age and has not failed since (in any worker), or it
        accepts one now."""
        if self.shared.draining or self.retiring:
            return False, "not ready: stopping"
        metrics = self.metrics
        assert metrics is not None
        age = self.shared.config.readyz_backend_age
        async with self._probing:  # one probe at a time; the others use its result
            metrics.flush()
            ok_at, failed_at = await asyncio.to_thread(metrics.backend_times)
            since = time.time() - ok_at
            if ok_at >= failed_at and since <= age:
                return True, f"ready: the backend answered {since:.0f}s ago"
            problem = await self.relayhost_problem()
            metrics.backend_seen(problem is None)
            metrics.flush()
        if problem is not None:
            return False, f"not ready: {problem}"
        return True, "ready: relayhost accepts connections"

    async def probe_relayhost(self) -> None:
        """Warn (and keep serving) when the backend cannot be reached at start."""
        relayhost = self.shared.relay.relayhost
        if relayhost is None:
            self.maillog.warning("relayhost is empty: every message will be deferred (451)")
            return
        problem = await self.relayhost_problem()
        if self.metrics is not None:
            self.metrics.backend_seen(problem is None)
        if problem is not None:
            self.maillog.warning(
                f"{problem}: smtpgate keeps serving and answers 451 4.3.0 until the backend is back"
            )

    async def relayhost_problem(self) -> str | None:
        """Why relayhost cannot be reached now (a TCP connection), or None when it can.

        An unbracketed relayhost is looked up as the relay does (its MX hosts, with the
        configured resolver); one host that answers is enough.
        """
        relay = self.shared.relay
        relayhost = relay.relayhost
        if relayhost is None:
            return "relayhost is empty"
        timeout = min(relay.config.connect_timeout, 5.0)
        why = "no address to connect to"
        try:
            if relayhost.mx_lookup and relay.next_hops is not None:
                hops = await relay.next_hops(relayhost.host, relayhost.port)
            else:
                hops = [(relayhost.host, relayhost.port)]
        except Exception as exc:  # the resolver's DnsLookupError, whatever its kind
            hops, why = [], str(exc)
        for host, port in hops:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            except TimeoutError:
                why = "timed out"
                continue
            except OSError as exc:  # a negative errno is getaddrinfo's: its own text
                errno_ = exc.errno or 0
                why = os.strerror(errno_) if errno_ > 0 else exc.strerror or str(exc)
                continue
            version = relay.config.proxy_protocol
            if version:  # a backend that reads PROXY: this connection is smtpgate's own
                own = writer.get_extra_info("sockname")
                writer.write(
                    proxyproto.encode_local()
                    if version == 2
                    else proxyproto.encode(1, own[:2], (host, port))
                )
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return None
        return f"relayhost {relayhost} is not reachable now ({why})"

    async def serve_forever(self) -> None:
        await self.stopped.wait()

    async def _drained(self) -> None:
        """Return once every session has ended; idle ones are told 421 as they finish."""
        while self.shared.sessions:
            self.shared.changed.clear()
            for session in list(self.shared.sessions):
                await session.drain()
            if self.shared.sessions:
                await self.shared.changed.wait()

    def _close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        if self.endpoint is not None:
            self.endpoint.close()
        if self.on_closed is not None:
            self.on_closed()
            self.on_closed = None

    async def retire(self) -> None:
        """A newer generation took over the listeners (reload): stop accepting, let every
        session end as its client ends it, then stop."""
        if self.retiring or self.shared.draining:
            return
        self.retiring = True
        self._close_listeners()
        while self.shared.sessions and not self.shared.draining:
            self.shared.changed.clear()
            await self.shared.changed.wait()
        await self.stop()

    async def stop(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        if self.shared.draining:
            return
        self.shared.draining = True
        self.maillog.info("stopping: no new connections; draining sessions")
        self._close_listeners()
        for session in list(self.shared.sessions):
            await session.drain()
        try:
            await asyncio.wait_for(self._drained(), drain_timeout)
        except TimeoutError:
            self.maillog.warning(
                f"drain timeout: closing {len(self.shared.sessions)} session(s) still busy"
            )
        for session in list(self.shared.sessions):
            session.abort()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        verifier = self.shared.generation.verifier
        if verifier is not None:
            await verifier.close()  # background refresh probes use the relay
        await self.shared.relay.close()
        if self.shared_anvil is not None:
            await self.shared_anvil.close()
        policy_client = self.shared.generation.policy_client
        if policy_client is not None:
            await policy_client.close()
        if self._own_spool is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._own_spool)
        if self.metrics is not None:
            self.metrics.stop()
        self.maillog.info("stopped")
        self.stopped.set()


WORKER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1})
"""Blocked in a new worker process until its event loop handles them (``worker_ready``)."""


def worker_ready() -> None:
    """In a worker, once its signal handlers are installed: let the signals in."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)


def run_fast(main_coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (the ``uvloop`` extra), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coro)
        return
    uvloop.run(main_coro)
