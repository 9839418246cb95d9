"""Server lifecycle: bind the listeners, run, and stop without losing a transaction.

``Server.start`` binds every address of ``listen``; ``Server.stop`` stops accepting,
answers idle sessions ``421 4.3.2 ... Service shutting down``, lets sessions that are in
the middle of a command (a relay in progress above all) finish within the drain
timeout, and only then closes what is left.  SIGTERM and SIGINT call ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smtpgate.anvil import AnvilClient, LocalAnvil
from smtpgate.config import Diagnostic, Settings
from smtpgate.errors import ConfigError
from smtpgate.logs import MailLog, route_python_logging
from smtpgate.policy.plan import Plan
from smtpgate.relay import Relay
from smtpgate.resolver import mx_hosts, resolver_from_settings
from smtpgate.smtpd import GateConfig, GateProtocol, Shared

DRAIN_TIMEOUT = 30.0


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(entries: Sequence[str]) -> list[ListenAddress]:
    """``host:port``, ``[ipv6]:port``, ``:port`` (all addresses) or ``port``."""
    out = []
    for entry in entries:
        text = entry.strip()
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ConfigError(f'listen: bad address "{entry}" (expected [ipv6]:port)')
        elif text.isdigit():
            host, port = "", text
        else:
            host, sep, port = text.rpartition(":")
            if not sep:
                raise ConfigError(f'listen: bad address "{entry}" (expected host:port)')
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f'listen: bad port in "{entry}"')
        out.append(ListenAddress(host or "0.0.0.0", int(port)))
    if not out:
        raise ConfigError("listen: no address to listen on")
    return out


def workers_from_settings(settings: Settings) -> int:
    """``smtpgate_workers``: ``auto`` (one per CPU core) or a whole number, at least 1."""
    text = (settings.get("smtpgate_workers") or "auto").strip().lower()
    if text == "auto":
        return max(1, os.cpu_count() or 1)
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ConfigError(
        f"smtpgate_workers = {text}: use auto (one process per CPU core) or a number, 1 or more"
    )


def validate_service(settings: Settings) -> list[Diagnostic]:
    """Check what ``serve`` builds besides the Plan: listeners, TLS files, the relay.

    ``check`` runs this; ``Server`` builds the same objects, so a config that passes here
    starts (unless its port is taken or needs privileges).
    """
    out: list[Diagnostic] = []

    def error(exc: ConfigError, parameter: str) -> None:
        where = None if exc.path else settings.location(parameter)
        out.append(Diagnostic("error", str(exc), where))

    try:
        parse_listen(settings.as_list("listen"))
    except ConfigError as exc:
        error(exc, "listen")
    try:
        workers_from_settings(settings)
    except ConfigError as exc:
        error(exc, "smtpgate_workers")
    try:
        GateConfig.from_settings(settings)
    except (OSError, ssl.SSLError) as exc:
        where = settings.location("smtpd_tls_cert_file")
        out.append(Diagnostic("error", f"smtpd_tls_cert_file: cannot load: {exc}", where))
    except ConfigError as exc:
        # GateConfig's errors name their parameter (and file and line when they have one)
        out.append(Diagnostic("error", str(exc), None))
    try:
        Relay.from_settings(settings)
    except ConfigError as exc:
        error(exc, "relayhost")
    try:
        resolver_from_settings(settings)
    except ConfigError as exc:
        error(exc, "dns_servers")
    if not (settings.get("relayhost") or "").strip():
        out.append(
            Diagnostic(
                "warning",
                "relayhost is empty: every message would be deferred with 451 4.3.0; "
                "set relayhost = [backend.example]:25",
                settings.location("relayhost"),
            )
        )
    level = (settings.get("smtp_tls_security_level") or "").lower()
    has_ca = settings.get("smtp_tls_CAfile") or settings.get("smtp_tls_CApath")
    if level in ("verify", "secure") and not has_ca:
        out.append(
            Diagnostic(
                "warning",
                f"smtp_tls_security_level = {level} without smtp_tls_CAfile or "
                "smtp_tls_CApath: no backend certificate can be verified",
                settings.location("smtp_tls_security_level"),
            )
        )
    tls_level = (settings.get("smtpd_tls_security_level") or "").lower()
    if tls_level in ("may", "encrypt") and not settings.get("smtpd_tls_cert_file"):
        out.append(
            Diagnostic(
                "warning" if tls_level == "may" else "error",
                f"smtpd_tls_security_level = {tls_level} needs smtpd_tls_cert_file",
                settings.location("smtpd_tls_security_level"),
            )
        )
    return out


def load_and_validate(
    config_path: str, overrides: Sequence[str] = ()
) -> tuple[Plan | None, list[Diagnostic]]:
    """Read and check everything serve would load: the step check, reload and SIGHUP share.

    The plan is None when any diagnostic is an error. Raises ConfigError when the file
    cannot be read or parsed at all.
    """
    from smtpgate.config import load_settings
    from smtpgate.policy.plan import build_plan

    settings, diagnostics = load_settings(config_path, overrides)
    plan, more = build_plan(settings)
    diagnostics = [*diagnostics, *more]
    if plan is not None:
        diagnostics += validate_service(settings)
    if any(d.severity == "error" for d in diagnostics):
        plan = None
    return plan, diagnostics


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

    With ``copies`` > 1 every socket has SO_REUSEPORT, so each worker has its own accept
    queue and the kernel spreads new connections over them (a shared queue lets whichever
    worker wakes first take a whole burst).  Without SO_REUSEPORT (not Linux) there is
    one set, shared by all workers.  Port 0 is bound once; the copies take the same port.
    Returns one list of sockets per copy.  Raises ListenError (closing what was already
    bound) when one cannot be bound.
    """
    reuseport = copies > 1 and hasattr(socket, "SO_REUSEPORT")
    sets: list[list[socket.socket]] = [[] for _ in range(copies if reuseport else 1)]
    try:
        for address in addresses:
            try:
                infos = socket.getaddrinfo(
                    address.host,
                    address.port,
                    type=socket.SOCK_STREAM,
                    flags=socket.AI_PASSIVE,
                )
                seen = set()
                for family, kind, proto, _, sockaddr in infos:
                    if (family, sockaddr) in seen:
                        continue
                    seen.add((family, sockaddr))
                    for copy in sets:
                        sock = socket.socket(family, kind, proto)
                        copy.append(sock)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        if reuseport:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        sock.bind(sockaddr)
                        sock.listen(1024)
                        sock.setblocking(False)
                        # listen = host:0: the first copy picked the port, the rest follow.
                        sockaddr = (sockaddr[0], sock.getsockname()[1], *sockaddr[2:])
            except OSError as exc:
                raise ListenError(address, exc) from None
    except ListenError:
        for copy in sets:
            for sock in copy:
                sock.close()
        raise
    return sets


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
            f"pid_file {path}: {exc.strerror}: smtpgate reload cannot find this process "
            "(send SIGHUP instead, or set pid_file)"
        )
        return False
    return True


def drop_privileges(user: str) -> None:
    """Become ``user`` (its uid, gid, no supplementary groups); refuse to stay root."""
    import pwd

    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"smtpgate_user = {user}: no such user: create it (useradd --system "
            f"--no-create-home --shell /usr/sbin/nologin {user}) or set smtpgate_user"
        ) from None
    if entry.pw_uid == 0:
        raise ConfigError(f"smtpgate_user = {user} is root: smtpgate will not run as root")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.geteuid() == 0 or os.getuid() == 0:
        raise ConfigError("could not drop root privileges; refusing to run as root")


class Server:
    """Listeners plus the state their connections share."""

    def __init__(
        self,
        settings: Settings,
        plan: Plan,
        maillog: MailLog,
        *,
        config_path: str | None = None,
        overrides: Sequence[str] = (),
        anvil: AnvilClient | None = None,
    ) -> None:
        """``anvil``: the counters shared with the other workers (a ``RemoteAnvil`` on the
        supervisor's ``AnvilService``); by default this process's own."""
        self.settings = settings
        self.maillog = maillog
        self.config_path = config_path
        self.overrides = tuple(overrides)
        self.pid_file: str | None = None
        self.shared = Shared(
            plan=plan,
            config=GateConfig.from_settings(settings),
            relay=Relay.from_settings(settings),
            maillog=maillog,
            resolver=resolver_from_settings(settings),
            anvil=anvil if anvil is not None else LocalAnvil(),
        )
        self._wire_next_hops()
        self.addresses = parse_listen(settings.as_list("listen"))
        self.servers: list[asyncio.base_events.Server] = []
        self.stopped = asyncio.Event()

    def _wire_next_hops(self) -> None:
        """Give the relay the MX lookup for an unbracketed relayhost."""
        resolver = self.shared.resolver
        if resolver is None:
            return

        async def next_hops(host: str, port: int) -> list[tuple[str, int]]:
            return await mx_hosts(resolver, host, port)

        self.shared.relay.next_hops = next_hops

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
        names = ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.sockets)
        self.maillog.info(f"smtpgate listening on {names} (event loop: {event_loop_name()})")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

    async def probe_relayhost(self) -> None:
        """Warn (and keep serving) when the backend cannot be reached at start."""
        relayhost = self.shared.relay.relayhost
        if relayhost is None:
            self.maillog.warning("relayhost is empty: every message will be deferred (451)")
            return
        timeout = min(self.settings.as_time("smtp_connect_timeout"), 5.0)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(relayhost.host, relayhost.port), timeout
            )
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                why = "timed out"
            else:
                why = os.strerror(exc.errno) if exc.errno else str(exc)
            self.maillog.warning(
                f"relayhost {self.settings['relayhost']} is not reachable now ({why}): "
                "smtpgate keeps serving and answers 451 4.3.0 until the backend is back"
            )
            return
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    def write_pid_file(self, path: str) -> None:
        """Record the process id for ``smtpgate reload``; a failure is only a warning."""
        if write_pid_file(path, self.maillog):
            self.pid_file = path

    async def reload(self) -> bool:
        """Re-read config and tables; swap them in only when they validate completely."""
        if self.config_path is None:
            self.maillog.warning("reload: this server was not started from a file")
            return False
        try:
            plan, diagnostics = load_and_validate(self.config_path, self.overrides)
        except ConfigError as exc:
            self.maillog.error(f"reload failed, keeping the running configuration: {exc}")
            return False
        errors = [d for d in diagnostics if d.severity == "error"]
        for diagnostic in diagnostics:
            self.maillog.info(f"reload: {diagnostic}")
        if plan is None or errors:
            self.maillog.error(
                f"reload failed ({len(errors)} error(s)), keeping the running configuration"
            )
            return False
        settings = plan.settings
        if settings.as_list("listen") != self.settings.as_list("listen"):
            self.maillog.warning("reload: listen changed; restart smtpgate to rebind")
        old_relay = self.shared.relay
        self.shared.plan = plan
        self.shared.config = GateConfig.from_settings(settings)
        self.shared.relay = Relay.from_settings(settings)
        self.shared.resolver = resolver_from_settings(settings)
        self._wire_next_hops()
        self.settings = settings
        await old_relay.close()
        self.maillog.info(f"reloaded {self.config_path}")
        return True

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

    async def stop(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        if self.shared.draining:
            return
        self.shared.draining = True
        self.maillog.info("stopping: no new connections; draining sessions")
        for server in self.servers:
            server.close()
        for session in list(self.shared.sessions):
            await session.drain()
        try:
            await asyncio.wait_for(self._drained(), drain_timeout)
        except TimeoutError:
            self.maillog.warning(
                f"drain timeout: closing {len(self.shared.sessions)} session(s) still busy"
            )
        for session in list(self.shared.sessions):
            session._close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        await self.shared.relay.close()
        if self.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(self.pid_file)
        self.maillog.info("stopped")
        self.stopped.set()


RESTART_LIMIT = 5
"""A worker that dies this many times within RESTART_WINDOW seconds stops the service."""
RESTART_WINDOW = 60.0


class Supervisor:
    """The parent of ``smtpgate_workers`` worker processes sharing the bound sockets.

    It forks the workers (before any event loop exists), forwards SIGTERM/SIGINT (each
    worker drains; the parent waits for all) and SIGHUP (each worker reloads itself), and
    replaces a worker that dies, up to RESTART_LIMIT deaths within RESTART_WINDOW.
    """

    SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})
    WORKER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    """Blocked in a new worker until it has its handlers (``worker_ready``)."""

    def __init__(
        self, count: int, run_worker: Callable[[int, bool], None], maillog: MailLog
    ) -> None:
        self.count = count
        self.run_worker = run_worker
        self.maillog = maillog
        self.workers: dict[int, int] = {}  # pid -> slot
        self._deaths: list[float] = []
        self._old_mask: set[int | signal.Signals] = set()
        self._reloaded = False

    def _spawn(self, slot: int) -> None:
        self.maillog.flush()
        # Objects alive now (modules, the plan, tables) are never collected in a worker:
        # the collector leaves them alone, so their pages stay shared with the parent.
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                # SIGTERM, SIGINT and SIGHUP stay blocked (pending, not lost) until the
                # worker's event loop handles them: see worker_ready.
                signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask | self.WORKER_SIGNALS)
                # A worker started after a SIGHUP reloads first, like the others did.
                self.run_worker(slot, self._reloaded)
                status = 0
            except BaseException as exc:  # the worker must never return to the caller
                with contextlib.suppress(BaseException):
                    self.maillog.error(f"worker {slot} failed: {exc}")
            finally:
                with contextlib.suppress(BaseException):
                    self.maillog.close()
                os._exit(status)
        self.workers[pid] = slot

    def _signal_all(self, signum: int) -> None:
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _reap(self, stopping: bool) -> bool:
        """Collect dead workers and replace them; True when they die too often."""
        give_up = False
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                break
            if pid == 0:
                break
            if pid not in self.workers:
                continue
            slot = self.workers.pop(pid)
            if stopping:
                continue
            if os.WIFSIGNALED(status):
                how = f"killed by signal {os.WTERMSIG(status)}"
            else:
                how = f"exit status {os.waitstatus_to_exitcode(status)}"
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
            if len(self._deaths) >= RESTART_LIMIT:
                self.maillog.error(
                    f"worker {pid} died ({how}); {len(self._deaths)} worker deaths within "
                    f"{RESTART_WINDOW:.0f}s: stopping smtpgate"
                )
                stopping = give_up = True
                self._signal_all(signal.SIGTERM)
                continue
            self.maillog.warning(f"worker {pid} died ({how}); starting a new one")
            self._spawn(slot)
        return give_up

    def run(self) -> int:
        """Fork the workers and supervise them until they have all stopped; the exit code."""
        self._old_mask = set(signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS))
        stopping = False
        failed = False
        for number in range(self.count):
            self._spawn(number)
        self.maillog.info(f"smtpgate started {self.count} worker processes")
        while True:
            info = signal.sigtimedwait(self.SIGNALS, 1.0)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                if not stopping:
                    self.maillog.info("stopping: telling the workers to drain")
                stopping = True
                self._signal_all(signal.SIGTERM)
            elif info is not None and info.si_signo == signal.SIGHUP and not stopping:
                self.maillog.info("reload: telling the workers to reload")
                self._reloaded = True
                self._signal_all(signal.SIGHUP)
            if self._reap(stopping):
                stopping = failed = True
            if stopping and not self.workers:
                break
        self.maillog.info("stopped")
        return 1 if failed else 0


def worker_ready() -> None:
    """In a worker, once its signal handlers are installed: let the signals in."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, Supervisor.WORKER_SIGNALS)
