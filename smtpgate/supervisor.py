"""The ``serve`` process tree: a supervisor that keeps root, and workers that do not.

Postfix's master(8) model, in one program::

    supervisor (stays root: binds port 25, reads keys and tables, reloads, restarts)
     +-- worker 0 ... worker N-1   (smtpgate_user: one event loop each, its own socket)

At start and at every reload the supervisor reads everything ``serve`` needs -- main.cf,
the tables, the TLS certificates and keys (often readable by root only), the relayhost --
into a :class:`~smtpgate.generation.Generation` with the one load
(:func:`~smtpgate.generation.load_generation`, the same tables strictness both times), and
forks one worker per listening socket set around it.  A worker drops its privileges
first thing after the fork; it never opens those files again.

A reload (SIGHUP, or ``smtpgate reload`` over the control socket) is a generation swap:
the new configuration is loaded and validated completely; a new worker starts for each
slot; once they all listen, the old workers stop accepting and finish their sessions
undisturbed, then exit.  ``smtpgate reload`` gets the verdict only then, so "reload
succeeded" means that every new connection is served with the new files.  A reload that
fails keeps the running generation and says why (exit status 2).

The control socket is a Unix socket in the abstract namespace (no file: it works on a
read-only file system and in a container whose run directory is not writable), named
after the pid file's path, and it answers only root and the supervisor's own user
(SO_PEERCRED).

The supervisor runs a plain ``selectors`` loop, no asyncio: signals arrive through
``signal.set_wakeup_fd``, each worker reports on a small status socket ("R": listening,
"C": listeners closed), a dead worker is reaped and replaced, and the anvil of the whole
server (``smtpgate.anvil.AnvilService``: connection counts, rates, the DATA budget) answers
every worker on a socket of its own, as Postfix's anvil(8) answers every smtpd.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import selectors
import shutil
import signal
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from smtpgate.anvil import AnvilService, RemoteAnvil
from smtpgate.config import Diagnostic, load_settings
from smtpgate.config.service import pid_file_of as _pid_file
from smtpgate.errors import ConfigError
from smtpgate.generation import Generation, load_generation
from smtpgate.logs import MailLog
from smtpgate.metrics import SupervisorMetrics, prepare_directory, remove_directory
from smtpgate.server import (
    WORKER_SIGNALS,
    Server,
    drop_privileges,
    prepare_spool,
    private_spool,
    unprivileged_user,
    worker_ready,
    write_pid_file,
)
from smtpgate.watch import WatchChannel

RESTART_LIMIT = 5
"""A worker that dies this many times within RESTART_WINDOW seconds stops the service."""
RESTART_WINDOW = 60.0
RELOAD_TIMEOUT = 30.0
"""How long new workers may take to listen (and old ones to stop) before a reload fails."""
CONTROL_TIMEOUT = 2.0
"""How long the supervisor waits for a control client to send its request line."""

# What a worker sends on its status socket.
READY = b"R"
"""The worker listens: its Server has started on its sockets."""
CLOSED = b"C"
"""The worker stopped accepting (retired, or stopping); it finishes its sessions."""


def control_address(pid_file: str, config_path: str) -> str:
    """The abstract Unix socket name of the server that owns ``pid_file`` (or, without a
    pid file, that was started with ``config_path``): the same for serve and reload."""
    key = os.path.abspath(pid_file or config_path)
    return "\0smtpgate-control-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def request_reload(address: str, timeout: float = RELOAD_TIMEOUT + 15) -> tuple[bool, list[str]]:
    """Ask the supervisor at ``address`` to reload; (succeeded, the lines it answered).

    Raises OSError when no supervisor listens there.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"reload\n")  # a refusal may come first: read it all the same
        data = b""
        while not _verdict(data) and (chunk := sock.recv(65536)):
            data += chunk
    lines = data.decode("utf-8", "replace").splitlines()
    return bool(lines) and lines[-1].startswith("ok"), lines


def _verdict(data: bytes) -> bool:
    """Whether ``data`` ends with the verdict line (``ok: ...`` or ``failed: ...``)."""
    last = data[: -1 if data.endswith(b"\n") else None].rpartition(b"\n")[2]
    return data.endswith(b"\n") and last.startswith((b"ok", b"failed"))


@dataclass
class _Worker:
    pid: int
    slot: int
    generation: Generation
    status: socket.socket
    ready: bool = False
    closed: bool = False
    retiring: bool = False


@dataclass
class _Reload:
    """A generation swap in progress: new workers starting, then old ones retiring."""

    generation: Generation
    waiters: list[socket.socket] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    """What ``smtpgate reload`` is told before the verdict (the diagnostics)."""
    started: float = field(default_factory=time.monotonic)
    retired_old: bool = False


class Supervisor:
    """The parent of the worker processes; see the module docstring."""

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(
        self,
        *,
        socket_sets: Sequence[Sequence[socket.socket]],
        generation: Generation,
        maillog: MailLog,
        user: str,
        config_path: str,
        overrides: Sequence[str] = (),
        control: str | None = None,
        spool: str = "",
        metrics_socket: socket.socket | None = None,
        metrics: SupervisorMetrics | None = None,
        watch: WatchChannel | None = None,
    ) -> None:
        self.socket_sets = [list(s) for s in socket_sets]
        self.watch = watch
        """The live view's channel (smtpgate_watch), inherited by every worker."""
        self.metrics_socket = metrics_socket
        """The metrics listener (smtpgate_metrics_listen), served by the worker of slot 0."""
        self.metrics = metrics
        self.generation = generation
        self.maillog = maillog
        self.user = user
        self.config_path = config_path
        self.overrides = tuple(overrides)
        self.control_name = control
        self.spool = spool
        """The private spool directory (smtpgate_spool_directory empty)."""
        self.workers: dict[int, _Worker] = {}  # pid -> worker
        self.selector = selectors.DefaultSelector()
        self.anvil = AnvilService(self.selector, maillog)
        """The connection counts, rates and DATA budget of all workers together."""
        self._deaths: list[float] = []
        self._reload: _Reload | None = None
        self._stopping = False
        self._failed = False
        self._control: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None

    # -- start and the loop ---------------------------------------------------------------

    def run(self) -> int:
        """Fork the workers and supervise them until they have all stopped; the exit code."""
        wake_r, wake_w = socket.socketpair()
        for sock in (wake_r, wake_w):
            sock.setblocking(False)
        self._wake = (wake_r, wake_w)
        for signum in self.HANDLED:
            signal.signal(signum, _record)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(wake_r, selectors.EVENT_READ, self._on_signals)
        if self.control_name:
            self._listen_control(self.control_name)
        for slot in range(len(self.socket_sets)):
            self._spawn(slot, self.generation)
        count = len(self.socket_sets)
        self.maillog.info(f"smtpgate started {count} worker process{'es' if count > 1 else ''}")
        while not (self._stopping and not self.workers):
            for key, _ in self.selector.select(1.0):
                key.data()
            self._reap()
            self._check_reload()
        self.anvil.close()
        self.maillog.info("stopped")
        return 1 if self._failed else 0

    def _listen_control(self, name: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(name)
        except OSError as exc:
            sock.close()
            # Another supervisor answers for this pid file: two servers would fight over it.
            raise ConfigError(
                f"pid_file: another smtpgate serve runs with this pid_file "
                f"({exc.strerror or exc}): stop it, or give this one its own pid_file"
            ) from None
        sock.listen(8)
        sock.setblocking(False)
        self._control = sock
        self.selector.register(sock, selectors.EVENT_READ, self._on_control)

    # -- workers ----------------------------------------------------------------------------

    def _spawn(self, slot: int, generation: Generation) -> None:
        """Fork a worker for ``slot`` that serves ``generation``."""
        if generation.config.spool_directory:  # a reload may name a new one
            try:
                prepare_spool(generation.config.spool_directory, self.user)
            except ConfigError as exc:
                self.maillog.error(str(exc))  # big messages will get 451 until it is fixed
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        anvil = self.anvil.attach()
        self.maillog.flush()
        # Objects alive now (modules, the plan, tables) are never collected in a worker:
        # the collector leaves them alone, so their pages stay shared with the parent.
        gc.freeze()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                mine.close()
                self._become_worker(slot)
                sockets = self.socket_sets[slot]
                run_worker(
                    slot,
                    generation,
                    sockets,
                    theirs,
                    anvil,
                    self.user,
                    self.maillog,
                    self.spool,
                    metrics=self.metrics is not None,
                    metrics_socket=self.metrics_socket if slot == 0 else None,
                    watch=self.watch,
                )
                status = 0
            except BaseException as exc:  # the worker must never return to the caller
                with contextlib.suppress(BaseException):
                    self.maillog.error(f"worker {slot} failed: {exc}")
            finally:
                with contextlib.suppress(BaseException):
                    self.maillog.close()
                os._exit(status)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        theirs.close()
        anvil.close()
        mine.setblocking(False)
        worker = _Worker(pid, slot, generation, mine)
        self.workers[pid] = worker
        self.selector.register(mine, selectors.EVENT_READ, lambda: self._on_status(worker))

    def _become_worker(self, slot: int) -> None:
        """In a new child: let go of everything that is the supervisor's."""
        signal.set_wakeup_fd(-1)
        for signum in self.HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        # The control socket, the other workers' status sockets, the signal wake-up pair:
        # closing this child's copies leaves the supervisor's open.
        self.anvil.close_in_child()
        owned = [key.fileobj for key in self.selector.get_map().values()]
        owned += self._reload.waiters if self._reload else []
        self.selector.close()
        for obj in [*owned, *(self._wake or ())]:
            if isinstance(obj, socket.socket):
                obj.close()
        for number, slot_sockets in enumerate(self.socket_sets):
            if number != slot:  # this child's copies only: the parent keeps its own
                for sock in slot_sockets:
                    sock.close()
        if slot != 0 and self.metrics_socket is not None:
            self.metrics_socket.close()

    def _on_status(self, worker: _Worker) -> None:
        try:
            data = worker.status.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker has gone; waitpid tells how
            self.selector.unregister(worker.status)
            worker.status.close()
            return
        if READY in data:
            worker.ready = True
        if CLOSED in data:
            worker.closed = True

    def _signal(self, workers: Sequence[_Worker], signum: int) -> None:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def _reap(self) -> None:
        """Collect dead workers; replace those of the current generation."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(worker.status)
            worker.status.close()
            if self.metrics is not None:
                self.metrics.worker_gone(pid, died=not (self._stopping or worker.retiring))
            if self._stopping or worker.retiring:
                continue
            if os.WIFSIGNALED(status):
                how = f"killed by signal {os.WTERMSIG(status)}"
            else:
                how = f"exit status {os.waitstatus_to_exitcode(status)}"
            pending = self._reload
            if pending and worker.generation is pending.generation and not pending.retired_old:
                self._abort_reload(f"a new worker died before it listened ({how})")
                continue
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
            if len(self._deaths) >= RESTART_LIMIT:
                self.maillog.error(
                    f"worker {pid} died ({how}); {len(self._deaths)} worker deaths within "
                    f"{RESTART_WINDOW:.0f}s: stopping smtpgate"
                )
                self._failed = True
                self._stop()
                continue
            self.maillog.warning(f"worker {pid} died ({how}); starting a new one")
            self._spawn(worker.slot, worker.generation)

    # -- signals ----------------------------------------------------------------------------

    def _on_signals(self) -> None:
        assert self._wake is not None
        try:
            data = self._wake[0].recv(512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop()
            elif signum == signal.SIGHUP:
                self._begin_reload(None)

    def _stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.maillog.info("stopping: telling the workers to drain")
        if self._reload is not None:
            self._finish_reload(False, ["failed: smtpgate is stopping"])
        if self._control is not None:
            self.selector.unregister(self._control)
            self._control.close()
            self._control = None
        self._signal(list(self.workers.values()), signal.SIGTERM)

    # -- reload -----------------------------------------------------------------------------

    def _on_control(self) -> None:
        assert self._control is not None
        try:
            conn, _ = self._control.accept()
        except (BlockingIOError, InterruptedError):
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        conn.settimeout(CONTROL_TIMEOUT)
        request = b""
        with contextlib.suppress(OSError):
            while b"\n" not in request and len(request) < 64:
                chunk = conn.recv(64)
                if not chunk:
                    break
                request += chunk
        if uid not in (0, os.getuid()):
            self.maillog.warning(f"control: request from uid {uid} refused")
            _answer(conn, ["failed: permission denied (root or the serve user only)"])
        elif request.strip() == b"reload":
            self._begin_reload(conn)
        else:
            _answer(conn, ["failed: unknown request (this server knows: reload)"])

    def _begin_reload(self, waiter: socket.socket | None) -> None:
        """Load and validate everything as at start; on success start the new workers."""
        if self._stopping:
            if waiter is not None:
                _answer(waiter, ["failed: smtpgate is stopping"])
            return
        if self._reload is not None:  # one swap at a time: this request shares its verdict
            if waiter is not None:
                self._reload.waiters.append(waiter)
            return
        self.maillog.info(f"reload: reading {self.config_path}")
        lines: list[str] = []
        generation: Generation | None
        try:
            generation, diagnostics = load_generation(
                self.config_path, self.overrides, number=self.generation.number + 1
            )
        except ConfigError as exc:
            diagnostics, generation = [Diagnostic("error", str(exc), None)], None
        for diagnostic in diagnostics:
            lines.append(f"diagnostic: {diagnostic}")
            self.maillog.info(f"reload: {diagnostic}")
        if generation is None:
            errors = sum(1 for d in diagnostics if d.severity == "error")
            why = f"{errors} error(s) in the configuration"
            self.maillog.error(f"reload failed ({why}), keeping the running configuration")
            if self.metrics is not None:
                self.metrics.reloaded(None)
            if waiter is not None:
                _answer(waiter, [*lines, f"failed: {why}; the running configuration is kept"])
            return
        for changed in _needs_restart(self.generation, generation):
            warning = f"reload: {changed} changed; restart smtpgate to rebind"
            self.maillog.warning(warning)
            lines.append(f"diagnostic: warning: {warning}")
        self._reload = _Reload(generation, lines=lines)
        if waiter is not None:
            self._reload.waiters.append(waiter)
        for slot in range(len(self.socket_sets)):
            self._spawn(slot, generation)

    def _check_reload(self) -> None:
        """Move a generation swap on: retire the old workers once the new ones listen."""
        pending = self._reload
        if pending is None:
            return
        new = [w for w in self.workers.values() if w.generation is pending.generation]
        old = [w for w in self.workers.values() if w.generation is not pending.generation]
        if not pending.retired_old:
            if len(new) == len(self.socket_sets) and all(w.ready for w in new):
                for worker in old:
                    worker.retiring = True
                self._signal(old, signal.SIGUSR1)
                pending.retired_old = True
            elif time.monotonic() - pending.started > RELOAD_TIMEOUT:
                self._abort_reload(f"the new workers did not listen within {RELOAD_TIMEOUT:.0f}s")
                return
        if pending.retired_old:
            late = time.monotonic() - pending.started > RELOAD_TIMEOUT
            if all(w.closed for w in old) or late:
                if late and not all(w.closed for w in old):
                    self.maillog.warning("reload: an old worker is slow to stop accepting")
                self.generation = pending.generation
                if self.metrics is not None:
                    self.metrics.reloaded(self.generation.number)
                self.maillog.info(f"reloaded {self.config_path}")
                self._finish_reload(True, [*pending.lines, f"ok: reloaded {self.config_path}"])

    def _abort_reload(self, why: str) -> None:
        pending = self._reload
        assert pending is not None
        new = [w for w in self.workers.values() if w.generation is pending.generation]
        for worker in new:
            worker.retiring = True  # no replacement for these
        self._signal(new, signal.SIGTERM)
        self.maillog.error(f"reload failed ({why}), keeping the running configuration")
        if self.metrics is not None:
            self.metrics.reloaded(None)
        self._finish_reload(
            False, [*pending.lines, f"failed: {why}; the running configuration is kept"]
        )

    def _finish_reload(self, ok: bool, lines: list[str]) -> None:
        pending = self._reload
        self._reload = None
        for waiter in pending.waiters if pending else ():
            _answer(waiter, lines)


def _needs_restart(old: Generation, new: Generation) -> list[str]:
    """The parameters a reload cannot apply (the supervisor bound their sockets)."""
    out = []
    if new.config.listen != old.config.listen:
        out.append("listen")
    if new.config.metrics_listen != old.config.metrics_listen:
        out.append("smtpgate_metrics_listen")
    if (new.config.watch == "off") != (old.config.watch == "off"):
        out.append("smtpgate_watch")
    return out


def _record(signum: int, frame: object) -> None:
    """The supervisor's signal handler: the number reaches the loop via the wakeup fd."""


def _answer(conn: socket.socket, lines: Sequence[str]) -> None:
    with contextlib.suppress(OSError), conn:
        conn.settimeout(CONTROL_TIMEOUT)
        conn.sendall("".join(f"{line}\n" for line in lines).encode())


def run_worker(
    slot: int,
    generation: Generation,
    sockets: Sequence[socket.socket],
    status: socket.socket,
    anvil: socket.socket,
    user: str,
    maillog: MailLog,
    spool: str = "",
    *,
    metrics: bool = False,
    metrics_socket: socket.socket | None = None,
    watch: WatchChannel | None = None,
) -> None:
    """A worker's life: drop privileges, serve ``sockets`` with ``generation``, exit.

    ``status`` tells the supervisor when the worker listens and when it stopped
    accepting; ``anvil`` is this worker's line to the supervisor's AnvilService.
    ``metrics``: count for Prometheus; ``metrics_socket``: answer its HTTP too;
    ``watch``: the live view's channel (smtpgate_watch)."""
    import asyncio

    from smtpgate.metrics import ServerMetrics
    from smtpgate.server import run_fast

    drop_privileges(user)
    counts = ServerMetrics() if metrics else None

    def report(what: bytes) -> None:
        with contextlib.suppress(OSError):
            status.send(what)

    async def work() -> None:
        loop = asyncio.get_running_loop()
        server = Server(
            generation,
            maillog,
            anvil=RemoteAnvil(anvil),
            spool_directory=spool,
            metrics=counts,
            watch=watch,
        )
        await server.start(sockets)
        if metrics_socket is not None:
            await server.serve_metrics(metrics_socket)
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(server.stop()))
        loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(server.stop()))
        loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(server.retire()))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor reloads, not a worker
        server.on_closed = lambda: report(CLOSED)
        worker_ready()
        report(READY)
        if slot == 0:
            await server.probe_relayhost()
        await server.serve_forever()

    run_fast(work())


def serve(config: str, overrides: Sequence[str], generation: Generation, maillog: MailLog) -> int:
    """``smtpgate serve`` once the first generation is loaded (by root, before any fork):
    bind, supervise; the exit code.

    Raises ListenError (a listener cannot be bound) and ConfigError.
    """
    from smtpgate.server import bind_listeners, preload_modules

    service = generation.config
    user = service.user
    unprivileged_user(user)  # a user that cannot be used stops serve here, not each worker
    preload_modules()  # the workers would import these on first use, after the drop
    if service.shared_state:
        from smtpgate.shared_state import preload

        preload()
    socket_sets = bind_listeners(service.listen, copies=service.workers)
    if service.spool_directory:
        prepare_spool(service.spool_directory, user)
    spool = private_spool(user)
    try:
        metrics_socket, metrics, watch, directory, temporary = _observability(generation)
    except BaseException:
        _close_all(socket_sets)
        raise
    pid_file = service.pid_file
    supervisor = Supervisor(
        socket_sets=socket_sets,
        generation=generation,
        maillog=maillog,
        user=user,
        config_path=config,
        overrides=overrides,
        control=control_address(pid_file, config),
        spool=spool,
        metrics_socket=metrics_socket,
        metrics=metrics,
        watch=watch,
    )
    wrote_pid = False
    try:
        wrote_pid = write_pid_file(pid_file, maillog)
        return supervisor.run()
    finally:
        _close_all(socket_sets)
        if metrics_socket is not None:
            metrics_socket.close()
        if watch is not None:
            watch.close()
        if temporary:
            remove_directory(directory)
        if wrote_pid:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)
        with contextlib.suppress(OSError):
            shutil.rmtree(spool)


def _observability(
    generation: Generation,
) -> tuple[socket.socket | None, SupervisorMetrics | None, WatchChannel | None, str, bool]:
    """The metrics listener, its counters' folder (and whether it is a temporary one)
    and the live view's channel; Nones when smtpgate_metrics_listen is empty."""
    from smtpgate.server import bind_listeners

    service = generation.config
    if service.metrics_listen is None:
        return None, None, None, "", False
    metrics_socket = bind_listeners([service.metrics_listen])[0][0]
    try:
        directory, temporary = prepare_directory(
            service.metrics_directory, unprivileged_user(service.user)
        )
    except BaseException:
        metrics_socket.close()
        raise
    metrics = SupervisorMetrics(directory, generation.number)
    watch = WatchChannel() if service.watch != "off" else None
    return metrics_socket, metrics, watch, directory, temporary


def _close_all(socket_sets: Sequence[Sequence[socket.socket]]) -> None:
    for sockets in socket_sets:
        for sock in sockets:
            sock.close()


def pid_file_of(config: str, overrides: Sequence[str]) -> str:
    """The pid_file a configuration names (for ``smtpgate reload``)."""
    settings, _ = load_settings(config, overrides)
    return _pid_file(settings)
