"""The ``smtpgate`` command: check, query, explain.

This is the only module that prints or exits.  Exit codes: 0 success, 1 a lookup found
nothing (``query``, as ``postmap -q``), 2 a configuration error, 3 cannot start
(a listener cannot be bound; ``reload`` finds no running server).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

import click

from smtpgate import __version__
from smtpgate.config import Diagnostic
from smtpgate.errors import ConfigError, SmtpgateError, TableLookupError
from smtpgate.policy.model import ClientInfo

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
    from smtpgate.generation import load_generation

    try:
        # serve's load, with one difference: a table that cannot be read is an error here
        generation, diagnostics = load_generation(config, overrides, strict_tables=True)
    except ConfigError as exc:
        _fail(str(exc))
    _print_diagnostics(diagnostics)
    warnings = sum(1 for d in diagnostics if d.severity == "warning")
    errors = sum(1 for d in diagnostics if d.severity == "error")
    if generation is None:
        _fail(f"{config}: {errors} error(s), {warnings} warning(s): smtpgate would not start")
    click.echo(f"smtpgate: {config}: ok, {warnings} warning(s)")


@main.command()
@config_option
@override_option
def serve(config: str, overrides: tuple[str, ...]) -> None:
    """Run the SMTP front end: listen, apply the restrictions, relay to relayhost."""
    from smtpgate import supervisor
    from smtpgate.generation import load_generation
    from smtpgate.logs import MailLog
    from smtpgate.server import ListenError

    try:
        generation, diagnostics = load_generation(config, overrides, number=1)
    except ConfigError as exc:
        _fail(str(exc))
    _print_diagnostics(diagnostics)
    if generation is None:
        _fail(f"{config}: configuration errors: not starting")
    try:
        maillog = MailLog.from_config(generation.config)
    except OSError as exc:
        _fail(f"maillog_file: {exc}")
    try:
        status = supervisor.serve(config, overrides, generation, maillog)
    except ConfigError as exc:
        _fail(str(exc))
    except ListenError as exc:
        _fail(str(exc), EXIT_START)
    finally:
        maillog.close()
    if status:
        sys.exit(status)


@main.command()
@config_option
@override_option
def reload(config: str, overrides: tuple[str, ...]) -> None:
    """Tell the running serve to re-read everything, and wait for its verdict."""
    from smtpgate.supervisor import control_address, pid_file_of, request_reload

    try:
        pid_file = pid_file_of(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    try:
        ok, lines = request_reload(control_address(pid_file, config))
    except OSError as exc:
        why = exc.strerror or str(exc)
        _fail(
            f"no smtpgate serve answers for pid_file {pid_file or config} ({why}): is it running?",
            EXIT_START,
        )
    for line in lines[:-1]:
        click.echo(f"smtpgate: {line.removeprefix('diagnostic: ')}", err=True)
    verdict = lines[-1] if lines else "failed: the server closed the connection"
    if not ok:
        _fail(f"reload {verdict}")
    click.echo(f"smtpgate: {verdict.removeprefix('ok: ')}")


@main.command()
@click.option("--listen", default="127.0.0.1:2526", show_default=True, help="host:port")
@click.option("--maildir", default="var/mail", show_default=True, help="Where messages go.")
def sink(listen: str, maildir: str) -> None:
    """A stand-in backend MTA: accept every message and store it in a Maildir."""
    from smtpgate.config.service import parse_listen
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
@click.option("--from", "sender", default=None, help="Envelope sender; '' or <> for null.")
@click.option("--to", "recipients", multiple=True, help="Recipient (repeatable).")
@click.option("--data", is_flag=True, help="Also send DATA (smtpd_data_restrictions).")
@click.option(
    "--script",
    type=click.File("r"),
    default=None,
    help="The client's side of a dialogue, one command per line ('-': standard input), "
    "instead of --helo/--from/--to/--data.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def explain(
    config: str,
    overrides: tuple[str, ...],
    client: str,
    client_name: str | None,
    dns_servers: str | None,
    helo: str | None,
    ehlo: bool,
    sender: str | None,
    recipients: tuple[str, ...],
    data: bool,
    script: TextIO | None,
    as_json: bool,
) -> None:
    """Run the restrictions on one envelope without a socket and show every step."""
    from smtpgate.delegation import DelegationClient
    from smtpgate.generation import load_configuration
    from smtpgate.policy.address import valid_hostaddr
    from smtpgate.smtp.explain import (
        Exchange,
        render_json,
        render_text,
        run_dialogue,
        script_writes,
    )

    if not valid_hostaddr(client):
        _fail(f"--client {client!r} is not an IPv4 or IPv6 address")
    if script is not None and (sender is not None or recipients or data or helo is not None):
        _fail("--script replaces --helo, --from, --to and --data: give one or the other")
    if script is None and (sender is None or not recipients):
        _fail("give --from and at least one --to (or a --script)")
    writes = script_writes(script.read()) if script is not None else None
    try:
        loaded, diagnostics = load_configuration(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    _print_diagnostics(diagnostics)
    if loaded is None:
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
        from smtpgate.resolver import resolver_from_config

        try:
            resolver = resolver_from_config(loaded.config, split_list(dns_servers))
        except ConfigError as exc:
            _fail(f"--dns-servers: {exc}")

    async def dialogue() -> list[Exchange]:
        try:
            return await run_dialogue(
                loaded.plan,
                info,
                config=loaded.config,
                resolver=resolver,
                milters=loaded.milters.session() if loaded.milters else None,
                lookup_client_name=resolver is not None and client_name is None,
                writes=writes,
                helo=helo,
                sender=_unbracket(sender or ""),
                recipients=[
                    r[1:-1] if r.startswith("<") and r.endswith(">") else r for r in recipients
                ],
                esmtp=ehlo,
                data=data,
            )
        finally:
            client = loaded.plan.policy_client
            if isinstance(client, DelegationClient):
                await client.close()

    exchanges = asyncio.run(dialogue())
    click.echo(render_json(exchanges) if as_json else render_text(exchanges))


def _unbracket(address: str) -> str:
    """Accept ``<a@b>`` as well as ``a@b`` (and ``<>`` for the null sender)."""
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


if __name__ == "__main__":  # pragma: no cover
    main()
