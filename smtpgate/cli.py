"""The ``smtpgate`` command: check, query, explain.

This is the only module that prints or exits.  Exit codes: 0 success, 1 a lookup found
nothing (``query``, as ``postmap -q``), 2 a configuration error, 3 cannot start
(a listener cannot be bound; ``reload`` finds no running server).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from smtpgate import __version__
from smtpgate.config import Diagnostic, Settings, load_settings
from smtpgate.errors import ConfigError, SmtpgateError, TableLookupError
from smtpgate.policy.model import ClientInfo
from smtpgate.policy.plan import Plan, build_plan

if TYPE_CHECKING:
    from smtpgate.logs import MailLog

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_CONFIG = 2
EXIT_START = 3


def _fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    click.echo(f"smtpgate: fatal: {message}", err=True)
    sys.exit(code)


def _print_diagnostics(diagnostics: Sequence[Diagnostic]) -> None:
    for diagnostic in diagnostics:
        click.echo(f"smtpgate: {diagnostic}", err=True)


def load_plan(
    config: str, overrides: Sequence[str], *, strict_tables: bool = True
) -> tuple[Plan | None, list[Diagnostic]]:
    """Read the config and compile it: the load step serve, check and explain share.

    The plan is None when any diagnostic is an error, the settings' own included (a
    parameter that is not supported yet).
    """
    settings: Settings
    settings, diagnostics = load_settings(config, overrides)
    plan, more = build_plan(settings, strict_tables=strict_tables)
    found = [*diagnostics, *more]
    if any(d.severity == "error" for d in found):
        plan = None
    return plan, found


config_option = click.option(
    "-c",
    "--config",
    "config",
    default="/etc/smtpgate/main.cf",
    show_default=True,
    help="main.cf-style configuration file.",
)
override_option = click.option(
    "-o",
    "overrides",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override a parameter, as in master.cf (repeatable).",
)


@click.group()
@click.version_option(__version__, prog_name="smtpgate")
def main() -> None:
    """smtpgate: a filtering SMTP front end that speaks Postfix's restriction model."""


@main.command()
@config_option
@override_option
def check(config: str, overrides: tuple[str, ...]) -> None:
    """Validate everything serve would load; print warnings and errors with file and line."""
    from smtpgate.server import load_and_validate

    try:
        plan, diagnostics = load_and_validate(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    _print_diagnostics(diagnostics)
    warnings = sum(1 for d in diagnostics if d.severity == "warning")
    errors = sum(1 for d in diagnostics if d.severity == "error")
    if plan is None:
        _fail(f"{config}: {errors} error(s), {warnings} warning(s): smtpgate would not start")
    click.echo(f"smtpgate: {config}: ok, {warnings} warning(s)")


def _run_fast(main_coro: Coroutine[Any, Any, None]) -> None:
    """Run the server on uvloop when it is installed (the ``uvloop`` extra), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coro)
        return
    uvloop.run(main_coro)


def _serve_workers(
    config: str, overrides: Sequence[str], plan: Plan, maillog: MailLog, workers: int
) -> int:
    """``serve`` with ``smtpgate_workers`` > 1: the parent of the worker processes."""
    from smtpgate.server import (
        Server,
        Supervisor,
        bind_listeners,
        drop_privileges,
        parse_listen,
        worker_ready,
        write_pid_file,
    )

    settings = plan.settings
    user = settings.get("smtpgate_user") or "smtpgate"

    # The parent binds (the same errors as a single process), writes the pid file with
    # its own pid, drops privileges, then forks the workers around the bound sockets.
    # One set of sockets per worker (SO_REUSEPORT), or one set they all share.
    socket_sets = bind_listeners(parse_listen(settings.as_list("listen")), copies=workers)
    pid_file = settings.get("pid_file") or ""
    wrote_pid = write_pid_file(pid_file, maillog)
    drop_privileges(user)

    def run_worker(slot: int, reload_first: bool) -> None:
        mine = socket_sets[slot % len(socket_sets)]
        for sockets in socket_sets:
            if sockets is not mine:
                for sock in sockets:
                    sock.close()  # the parent keeps them for that slot's next worker

        async def work() -> None:
            server = Server(settings, plan, maillog, config_path=config, overrides=overrides)
            drop_privileges(user)  # already done by the parent: a no-op check
            if reload_first:
                await server.reload()
            await server.start(mine)
            server.install_signal_handlers()
            worker_ready()
            if slot == 0:
                await server.probe_relayhost()
            await server.serve_forever()

        _run_fast(work())

    try:
        return Supervisor(workers, run_worker, maillog).run()
    finally:
        for sockets in socket_sets:
            for sock in sockets:
                sock.close()
        if wrote_pid:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)


@main.command()
@config_option
@override_option
def serve(config: str, overrides: tuple[str, ...]) -> None:
    """Run the SMTP front end: listen, apply the restrictions, relay to relayhost."""
    from smtpgate.logs import MailLog
    from smtpgate.server import (
        ListenError,
        Server,
        drop_privileges,
        preload_modules,
        validate_service,
        workers_from_settings,
    )

    try:
        plan, diagnostics = load_plan(config, overrides, strict_tables=False)
    except ConfigError as exc:
        _fail(str(exc))
    _print_diagnostics(diagnostics)
    if plan is None:
        _fail(f"{config}: configuration errors: not starting")
    service = validate_service(plan.settings)
    _print_diagnostics(service)
    if any(d.severity == "error" for d in service):
        _fail(f"{config}: configuration errors: not starting")
    try:
        maillog = MailLog.from_settings(plan.settings)
    except OSError as exc:
        _fail(f"maillog_file: {exc}")
    settings = plan.settings
    workers = workers_from_settings(settings)
    user = settings.get("smtpgate_user") or "smtpgate"
    preload_modules()  # while the files are readable: privileges are dropped later

    async def run() -> None:
        server = Server(settings, plan, maillog, config_path=config, overrides=overrides)
        await server.start()
        server.write_pid_file(settings.get("pid_file") or "")
        drop_privileges(user)
        server.install_signal_handlers()
        await server.probe_relayhost()
        await server.serve_forever()

    try:
        if workers == 1:
            _run_fast(run())
        else:
            status = _serve_workers(config, overrides, plan, maillog, workers)
            if status:
                sys.exit(status)
    except ConfigError as exc:
        _fail(str(exc))
    except ListenError as exc:
        _fail(str(exc), EXIT_START)
    finally:
        maillog.close()


@main.command()
@config_option
@override_option
def reload(config: str, overrides: tuple[str, ...]) -> None:
    """Validate the configuration, then tell the running serve to re-read it (SIGHUP)."""
    import signal

    from smtpgate.server import load_and_validate

    try:
        plan, diagnostics = load_and_validate(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    _print_diagnostics(diagnostics)
    if plan is None:
        _fail(f"{config}: configuration errors: not reloading (the running server is unchanged)")
    pid_file = plan.settings.get("pid_file") or ""
    try:
        with open(pid_file, encoding="ascii") as f:
            pid = int(f.read().strip())
        if not _is_smtpgate(pid):
            raise ValueError(f"process {pid} is not smtpgate (a stale pid file)")
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _fail(f"pid_file {pid_file}: {why}: is smtpgate serve running? (or send it SIGHUP)", 3)
    click.echo(f"smtpgate: reload requested (pid {pid})")


@main.command()
@click.option("--listen", default="127.0.0.1:2526", show_default=True, help="host:port")
@click.option("--maildir", default="var/mail", show_default=True, help="Where messages go.")
def sink(listen: str, maildir: str) -> None:
    """A stand-in backend MTA: accept every message and store it in a Maildir."""
    from smtpgate.server import parse_listen
    from smtpgate.sink import run_sink

    try:
        [address] = parse_listen([listen])
    except (ConfigError, ValueError) as exc:
        _fail(f"--listen: {exc}")
    click.echo(f"smtpgate sink: listening on {address}; messages go to {maildir}/new/")
    try:
        asyncio.run(run_sink(address.host, address.port, maildir))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        _fail(f"sink: cannot listen on {address}: {exc.strerror or exc}", 3)


@main.command()
@click.argument("table")
@click.argument("key")
@click.option("-c", "--config", "config", default=None, help="Resolve relative paths from here.")
def query(table: str, key: str, config: str | None) -> None:
    """Look KEY up in TYPE:NAME and print the value, as postmap -q does."""
    from pathlib import Path

    from smtpgate.tables import open_table

    base = str(Path(config).parent) if config else None
    try:
        opened = open_table(table, base_dir=base)
        value = opened.lookup(key)
    except TableLookupError as exc:
        _fail(f"{table}: lookup error: {exc}")
    except SmtpgateError as exc:
        _fail(str(exc))
    if value is None:
        sys.exit(EXIT_NOT_FOUND)
    click.echo(value)


@main.command()
@config_option
@override_option
@click.option("--client", "client", required=True, help="Client IP address.")
@click.option(
    "--client-name",
    default=None,
    help="Verified client name (default: looked up in DNS with --dns-servers, else unknown).",
)
@click.option(
    "--dns-servers",
    default=None,
    metavar="LIST",
    help="Use DNS (e.g. 127.0.0.1:5353) for the DNS restrictions and the client name; "
    "without it every DNS lookup is a temporary failure.",
)
@click.option("--helo", default=None, help="HELO name (omit to skip HELO).")
@click.option("--ehlo", is_flag=True, help="Say EHLO instead of HELO (protocol ESMTP).")
@click.option("--from", "sender", required=True, help="Envelope sender; '' or <> for null.")
@click.option("--to", "recipients", multiple=True, required=True, help="Recipient (repeatable).")
@click.option("--data", is_flag=True, help="Also send DATA (smtpd_data_restrictions).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def explain(
    config: str,
    overrides: tuple[str, ...],
    client: str,
    client_name: str | None,
    dns_servers: str | None,
    helo: str | None,
    ehlo: bool,
    sender: str,
    recipients: tuple[str, ...],
    data: bool,
    as_json: bool,
) -> None:
    """Run the restrictions on one envelope without a socket and show every step."""
    from smtpgate.policy.address import valid_hostaddr
    from smtpgate.policy.explain import render_json, render_text, run_dialogue

    if not valid_hostaddr(client):
        _fail(f"--client {client!r} is not an IPv4 or IPv6 address")
    try:
        plan, diagnostics = load_plan(config, overrides, strict_tables=False)
    except ConfigError as exc:
        _fail(str(exc))
    _print_diagnostics(diagnostics)
    if plan is None:
        _fail(f"{config}: configuration errors: smtpgate would not start")
    name = client_name or "unknown"
    info = ClientInfo(
        address=client,
        name=name,
        reverse_name=name,
        name_status="ok" if name != "unknown" else "perm",
        reverse_name_status="ok" if name != "unknown" else "perm",
    )
    resolver = None
    if dns_servers is not None:
        from smtpgate.config import split_list
        from smtpgate.resolver import resolver_from_settings

        try:
            resolver = resolver_from_settings(plan.settings, split_list(dns_servers))
        except ConfigError as exc:
            _fail(f"--dns-servers: {exc}")
    exchanges = asyncio.run(
        run_dialogue(
            plan,
            info,
            resolver=resolver,
            lookup_client_name=resolver is not None and client_name is None,
            helo=helo,
            sender=_unbracket(sender),
            recipients=[
                r[1:-1] if r.startswith("<") and r.endswith(">") else r for r in recipients
            ],
            esmtp=ehlo,
            data=data,
        )
    )
    click.echo(render_json(exchanges) if as_json else render_text(exchanges))


def _is_smtpgate(pid: int) -> bool:
    """Whether ``pid`` runs smtpgate (never signal a process that reused a stale pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"smtpgate" in f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc here: trust the pid file


def _unbracket(address: str) -> str:
    """Accept ``<a@b>`` as well as ``a@b`` (and ``<>`` for the null sender)."""
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


if __name__ == "__main__":  # pragma: no cover
    main()
