"""What the SMTP front end and the server read from main.cf, typed and converted once.

:class:`ServiceConfig` holds every value the protocol adapter, the server, the supervisor,
the mail log and the DNS resolver use: limits and timeouts, the banner, the front end's TLS
files and level, the listen addresses and worker count, the user to run as, the pid and
log files.  It is built once per (re)load by :func:`service_config` (which reports every
problem as a :class:`Diagnostic` naming file and line) or :meth:`ServiceConfig.from_settings`
(which raises the first as :class:`ConfigError`); the code that uses it reads attributes,
never a parameter by its name.

Three values are match lists or tables (``smtpd_forbidden_commands``,
``smtpd_forbid_bare_newline_exclusions``, ``smtpd_client_event_limit_exceptions``): they
are opened here, at load, like the plan's tables.  The TLS certificate and key are only
named here; the server's load step reads them into an ``ssl.SSLContext`` (it runs as root,
the files are often root-only).  Relay settings (``relayhost``, ``smtp_*``) belong to the
relay's own configuration, not here.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from smtpgate.config.diagnostics import Diagnostic, Location
from smtpgate.config.settings import Settings
from smtpgate.errors import ConfigError, TableLookupError
from smtpgate.tables import AddressList, Table, open_table

T = TypeVar("T")

# smtpd_forbidden_commands default: CONNECT GET POST regexp:{{/^[^A-Z]/ Bogus}} (the
# regexp is case-insensitive), plus Postfix's own check for a message header line.
FORBIDDEN_VERBS = frozenset({"CONNECT", "GET", "POST"})
_HEADER_LIKE = re.compile(r"^[\x21-\x39\x3b-\x7e]+:")
_TABLE_SPEC = re.compile(r"^[A-Za-z0-9_]+:.")
BARE_NEWLINE_MODES = ("normalize", "reject", "no")
UPSTREAM_PROXY_PROTOCOLS = ("", "haproxy")


@dataclass(frozen=True)
class Forbidden:
    """smtpd_forbidden_commands: words (any case) and tables (any match forbids)."""

    words: frozenset[str]
    tables: tuple[Table, ...] = ()

    @classmethod
    def parse(
        cls,
        items: Sequence[str],
        base_dir: str | None = None,
        location: tuple[str, int] | None = None,
    ) -> Forbidden:
        words: set[str] = set()
        tables: list[Table] = []
        for item in items:
            if _TABLE_SPEC.match(item):
                tables.append(open_table(item, base_dir=base_dir, location=location))
            else:
                words.add(item.upper())
        return cls(frozenset(words), tuple(tables))

    def match(self, verb: str) -> bool:
        """A header-like line, or a verb in the list (lookup errors are ignored, as Postfix)."""
        if _HEADER_LIKE.match(verb) or verb.upper() in self.words:
            return True
        for table in self.tables:
            try:
                if table.lookup(verb.lower()) is not None:
                    return True
            except TableLookupError:
                continue
        return False


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


WATCH_MODES = ("off", "loopback", "on")


def parse_watch(text: str) -> str:
    """``smtpgate_watch``: off, loopback or on."""
    value = text.strip().lower()
    if value not in WATCH_MODES:
        raise ConfigError(f"smtpgate_watch = {text}: give off, loopback or on")
    return value


def parse_metrics_listen(text: str) -> ListenAddress | None:
    """``smtpgate_metrics_listen``: one ``host:port`` or ``[ipv6]:port``; empty: None."""
    words = text.replace(",", " ").split()
    if not words:
        return None
    if len(words) > 1:
        raise ConfigError(f"smtpgate_metrics_listen = {text}: give one address (host:port)")
    try:
        return parse_listen(words)[0]
    except ConfigError as exc:
        raise ConfigError(exc.message.replace("listen:", "smtpgate_metrics_listen:", 1)) from None


def parse_workers(text: str) -> int:
    """``smtpgate_workers``: ``auto`` (one per CPU core) or a whole number, at least 1."""
    text = text.strip().lower()
    if text == "auto":
        return max(1, os.cpu_count() or 1)
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ConfigError(
        f"smtpgate_workers = {text}: use auto (one process per CPU core) or a number, 1 or more"
    )


SHARED_STATE_SCHEMES = ("redis", "rediss")
MIN_LEASE = 3.0


def parse_shared_state(text: str) -> str:
    """``smtpgate_shared_state``: empty, or ``redis[s]://[user:password@]host[:port][/db]``.

    Only the form is checked here (the config layer does no network I/O); the URL is
    returned as written."""
    url = text.strip()
    if not url:
        return ""
    example = "use redis://host:port/db, e.g. redis://127.0.0.1:6379/0"
    parts = urllib.parse.urlsplit(url)
    text = _without_password(url, parts)  # what the messages show
    if parts.scheme.lower() not in SHARED_STATE_SCHEMES:
        raise ConfigError(f"smtpgate_shared_state = {text}: not a redis:// URL: {example}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"smtpgate_shared_state = {text}: bad port: {example}") from None
    if not parts.hostname:
        raise ConfigError(f"smtpgate_shared_state = {text}: no host: {example}")
    if port == 0:
        raise ConfigError(f"smtpgate_shared_state = {text}: bad port: {example}")
    db = parts.path.strip("/")
    if db and not (db.isdigit() and int(db) < 2**31):
        raise ConfigError(
            f"smtpgate_shared_state = {text}: the database is a number (/0, /1, ...): {example}"
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            f"smtpgate_shared_state = {text}: no ?options or #fragment here: {example}"
        )
    return url


def _without_password(url: str, parts: urllib.parse.SplitResult) -> str:
    """``url`` with the password (if any) replaced by ``***``."""
    user, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in user:
        return url
    name = user.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def _default_forbidden() -> Forbidden:
    return Forbidden(FORBIDDEN_VERBS)


@dataclass(frozen=True)
class ServiceConfig:
    """The front end's and the server's settings, converted once per (re)load.

    The first fields are those the protocol adapter has always read (``GateConfig``'s
    names); the defaults below them are Postfix's, for code that builds one by hand.
    """

    hostname: str
    banner: str
    mail_name: str
    size_limit: int
    line_limit: int
    timeout: float
    recipient_limit: int
    disable_vrfy: bool
    tls_level: str
    """smtpd_tls_security_level, lower case: "" or none (no STARTTLS), may, encrypt."""
    tls_cert_file: str
    tls_key_file: str
    bare_newline: str
    bare_newline_code: int
    bare_newline_exclusions: AddressList
    per_request_deadline: bool = False
    min_data_rate: int = 500
    hard_error_limit: int = 20
    soft_error_limit: int = 10
    error_sleep: float = 1.0
    junk_limit: int = 100
    recipient_overshoot: int = 1000
    connection_count_limit: int = 50
    connection_limit: int = 1000
    connection_rate_limit: int = 0
    message_rate_limit: int = 0
    recipient_rate_limit: int = 0
    rate_time_unit: float = 60.0
    limit_exceptions: AddressList | None = None
    forbid_unauth_pipelining: bool = True
    forbidden: Forbidden = field(default_factory=_default_forbidden)
    data_memory_limit: int = 0
    message_memory_limit: int = 1 << 20
    """smtpgate_message_memory_limit: a message's bytes kept in memory, then spooled."""
    spool_directory: str = ""
    """smtpgate_spool_directory (empty: the server's private temporary directory)."""
    greet_pause: float = 0.0
    peername_lookup: bool = True
    """smtpd_peername_lookup: look the client's name up in DNS at connect."""
    helo_required: bool = False
    """smtpd_helo_required (the plan holds the same value for the policy session)."""
    delay_reject: bool = True
    """smtpd_delay_reject (the plan holds the same value for the policy session)."""
    listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 25),)
    workers: int = 1
    """smtpgate_workers, ``auto`` already replaced by the number of CPU cores."""
    user: str = "smtpgate"
    """smtpgate_user: who the workers run as when serve starts as root."""
    pid_file: str = ""
    maillog_file: str = ""
    """Empty: standard error."""
    syslog_name: str = "postfix"
    dns_servers: tuple[str, ...] = ()
    """As written (``addr``, ``addr:port``, ``[v6]:port``); empty: the system's."""
    dns_timeout: float = 5.0
    dns_tries: int = 2
    dns_concurrency_limit: int = 100
    dns_cache_size: int = 10000
    metrics_listen: ListenAddress | None = None
    """smtpgate_metrics_listen; None: no metrics listener."""
    metrics_directory: str = ""
    """smtpgate_metrics_directory; empty: a private temporary folder."""
    readyz_backend_age: float = 60.0
    watch: str = "loopback"
    """smtpgate_watch: off, loopback or on (the live view on the metrics listener)."""
    shared_state: str = ""
    """smtpgate_shared_state, checked (redis:// or rediss://); empty: counted here alone."""
    shared_state_lease: float = 30.0
    upstream_proxy: str = ""
    """smtpd_upstream_proxy_protocol: "" (none) or "haproxy" (a PROXY header, v1 or v2)."""
    upstream_proxy_timeout: float = 5.0
    upstream_proxy_networks: AddressList | None = None
    """smtpgate_upstream_proxy_networks; None (empty): any peer may send the header."""

    @property
    def counts_clients(self) -> bool:
        """Whether any limit reads a client's counts (Postfix creates its anvil client only
        then; with none, a connection is counted in the total alone, without a round
        trip)."""
        return bool(
            self.connection_count_limit
            or self.connection_limit
            or self.connection_rate_limit
            or self.message_rate_limit
            or self.recipient_rate_limit
        )

    @property
    def tls_offered(self) -> bool:
        """Whether STARTTLS is offered: a level of may or encrypt and a certificate."""
        return self.tls_level in ("may", "encrypt") and bool(self.tls_cert_file)

    @property
    def tls_required(self) -> bool:
        """smtpd_tls_security_level = encrypt: no mail before STARTTLS."""
        return self.tls_level == "encrypt" and self.tls_offered

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceConfig:
        """Convert; raises ConfigError (with file and line) for the first problem."""
        config, diagnostics = service_config(settings)
        for diagnostic in diagnostics:
            if diagnostic.severity == "error":
                where = diagnostic.location
                raise ConfigError(
                    diagnostic.message,
                    where.path if where else settings.path,
                    (where.line or None) if where else None,
                )
        assert config is not None
        return config


class Reader:
    """Typed reads from Settings that record a problem as an error and carry on.

    A bad value gives a placeholder of the right type and an error diagnostic (the same
    one Settings reports for it, so a loader that merges both lists it once); a caller
    that finds an error discards what it built.  For config modules only: the rest of
    the program reads typed fields.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.diagnostics: list[Diagnostic] = []

    def error(self, name: str, message: str) -> None:
        self.diagnostics.append(Diagnostic("error", message, self.settings.location(name)))

    def warning(self, name: str, message: str) -> None:
        self.diagnostics.append(Diagnostic("warning", message, self.settings.location(name)))

    def failed(self, name: str, exc: ConfigError) -> None:
        """A value that cannot be used: where the error says, else where *name* is set."""
        message = exc.message if exc.message.startswith(name) else f"{name}: {exc.message}"
        where = Location(exc.path, exc.line or 0) if exc.path else self.settings.location(name)
        self.diagnostics.append(Diagnostic("error", message, where))

    def location(self, name: str) -> tuple[str, int] | None:
        """Where *name* is set, in the form the table layer takes."""
        where = self.settings.location(name)
        return (where.path, where.line) if where is not None else None

    def _convert(self, name: str, convert: Callable[[str], T], placeholder: T) -> T:
        try:
            return convert(name)
        except ConfigError as exc:
            self.error(name, exc.message)
            return placeholder

    def text(self, name: str) -> str:
        return self.settings[name]

    def flag(self, name: str) -> bool:
        return self._convert(name, self.settings.as_bool, False)

    def number(self, name: str) -> int:
        return self._convert(name, self.settings.as_int, 0)

    def code(self, name: str) -> int:
        return self._convert(name, self.settings.as_code, 0)

    def seconds(self, name: str) -> float:
        return self._convert(name, self.settings.as_time, 0.0)

    def words(self, name: str) -> tuple[str, ...]:
        return tuple(self.settings.as_list(name))

    def opened(self, name: str, open_: Callable[[], T], placeholder: T) -> T:
        """A match list or table, opened now; an error names its file and line."""
        try:
            return open_()
        except ConfigError as exc:
            self.failed(name, exc)
            return placeholder


def service_config(settings: Settings) -> tuple[ServiceConfig | None, list[Diagnostic]]:
    """Convert every value the front end and the server use; None when any is bad.

    The diagnostics name file and line (a bad number, a table that cannot be opened, a
    TLS level without a certificate, a listen address that cannot be parsed).
    """
    r = Reader(settings)
    base = settings.config_directory

    def address_list(name: str) -> AddressList:
        return r.opened(
            name,
            lambda: AddressList.parse(
                r.words(name), base_dir=base, title=name, location=r.location(name)
            ),
            AddressList.parse([], title=name),
        )

    forbidden = r.opened(
        "smtpd_forbidden_commands",
        lambda: Forbidden.parse(
            r.words("smtpd_forbidden_commands"), base, r.location("smtpd_forbidden_commands")
        ),
        _default_forbidden(),
    )
    nowhere: tuple[ListenAddress, ...] = ()
    listen = r.opened("listen", lambda: tuple(parse_listen(r.words("listen"))), nowhere)
    metrics_listen = r.opened(
        "smtpgate_metrics_listen",
        lambda: parse_metrics_listen(r.text("smtpgate_metrics_listen")),
        None,
    )
    workers = r.opened("smtpgate_workers", lambda: parse_workers(r.text("smtpgate_workers")), 1)
    shared_state = r.opened(
        "smtpgate_shared_state", lambda: parse_shared_state(r.text("smtpgate_shared_state")), ""
    )
    lease = r.seconds("smtpgate_shared_state_lease")
    if shared_state and lease < MIN_LEASE:
        r.error(
            "smtpgate_shared_state_lease",
            f"smtpgate_shared_state_lease = {r.text('smtpgate_shared_state_lease')}: "
            f"at least {MIN_LEASE:g}s (it is renewed every third of it)",
        )
    tls_level = r.text("smtpd_tls_security_level").strip().lower()
    tls_cert = r.text("smtpd_tls_cert_file")
    if tls_level in ("may", "encrypt") and not tls_cert:
        (r.warning if tls_level == "may" else r.error)(
            "smtpd_tls_security_level",
            f"smtpd_tls_security_level = {tls_level} needs smtpd_tls_cert_file",
        )
    upstream_proxy = r.text("smtpd_upstream_proxy_protocol").strip()
    if upstream_proxy not in UPSTREAM_PROXY_PROTOCOLS:
        r.error(
            "smtpd_upstream_proxy_protocol",
            f"unsupported smtpd_upstream_proxy_protocol value: {upstream_proxy} "
            "(use haproxy, or leave it empty)",
        )
    proxy_networks = None
    if r.words("smtpgate_upstream_proxy_networks"):
        proxy_networks = address_list("smtpgate_upstream_proxy_networks")
    config = ServiceConfig(
        hostname=r.text("myhostname"),
        banner=r.text("smtpd_banner"),
        mail_name=r.text("mail_name") or "Postfix",
        size_limit=r.number("message_size_limit"),
        line_limit=max(r.number("line_length_limit"), 512),
        timeout=r.seconds("smtpd_timeout"),
        recipient_limit=r.number("smtpd_recipient_limit"),
        disable_vrfy=r.flag("disable_vrfy_command"),
        tls_level=tls_level,
        tls_cert_file=tls_cert,
        tls_key_file=r.text("smtpd_tls_key_file") or tls_cert,
        bare_newline=(r.text("smtpd_forbid_bare_newline") or "normalize").lower(),
        bare_newline_code=r.code("smtpd_forbid_bare_newline_reject_code"),
        bare_newline_exclusions=address_list("smtpd_forbid_bare_newline_exclusions"),
        per_request_deadline=r.flag("smtpd_per_request_deadline"),
        min_data_rate=r.number("smtpd_min_data_rate"),
        hard_error_limit=r.number("smtpd_hard_error_limit"),
        soft_error_limit=r.number("smtpd_soft_error_limit"),
        error_sleep=r.seconds("smtpd_error_sleep_time"),
        junk_limit=r.number("smtpd_junk_command_limit"),
        recipient_overshoot=r.number("smtpd_recipient_overshoot_limit"),
        connection_count_limit=r.number("smtpd_client_connection_count_limit"),
        connection_limit=r.number("smtpgate_connection_limit"),
        connection_rate_limit=r.number("smtpd_client_connection_rate_limit"),
        message_rate_limit=r.number("smtpd_client_message_rate_limit"),
        recipient_rate_limit=r.number("smtpd_client_recipient_rate_limit"),
        rate_time_unit=r.seconds("anvil_rate_time_unit"),
        limit_exceptions=address_list("smtpd_client_event_limit_exceptions"),
        forbid_unauth_pipelining=r.flag("smtpd_forbid_unauth_pipelining"),
        forbidden=forbidden,
        data_memory_limit=r.number("smtpgate_data_memory_limit"),
        message_memory_limit=r.number("smtpgate_message_memory_limit"),
        spool_directory=r.text("smtpgate_spool_directory"),
        greet_pause=r.seconds("smtpgate_greet_pause"),
        peername_lookup=r.flag("smtpd_peername_lookup"),
        helo_required=r.flag("smtpd_helo_required"),
        delay_reject=r.flag("smtpd_delay_reject"),
        listen=listen,
        workers=workers,
        user=r.text("smtpgate_user") or "smtpgate",
        pid_file=r.text("pid_file"),
        maillog_file=r.text("maillog_file"),
        syslog_name=r.text("syslog_name") or "postfix",
        dns_servers=r.words("dns_servers"),
        dns_timeout=r.seconds("dns_timeout"),
        dns_tries=r.number("dns_tries"),
        dns_concurrency_limit=r.number("dns_concurrency_limit"),
        dns_cache_size=r.number("dns_cache_size"),
        metrics_listen=metrics_listen,
        metrics_directory=r.text("smtpgate_metrics_directory").strip(),
        readyz_backend_age=r.seconds("smtpgate_readyz_backend_age"),
        watch=r.opened("smtpgate_watch", lambda: parse_watch(r.text("smtpgate_watch")), "off"),
        shared_state=shared_state,
        shared_state_lease=lease,
        upstream_proxy=upstream_proxy,
        upstream_proxy_timeout=r.seconds("smtpd_upstream_proxy_timeout"),
        upstream_proxy_networks=proxy_networks,
    )
    if any(d.severity == "error" for d in r.diagnostics):
        return None, r.diagnostics
    return config, r.diagnostics


def pid_file_of(settings: Settings) -> str:
    """The pid_file a configuration names (``smtpgate reload`` needs only that)."""
    return settings["pid_file"]


def relay_diagnostics(settings: Settings) -> list[Diagnostic]:
    """What ``check`` says about the backend besides what the relay refuses to build.

    (Relay settings belong to the relay's own typed configuration; these two checks move
    there with them.)
    """
    out: list[Diagnostic] = []
    if not settings["relayhost"].strip():
        # smtpgate exists to relay: without a backend every message would get 451.
        typos = "".join(
            f" ({where} sets {name}: did you mean relayhost?)"
            for name, where in settings.misspellings("relayhost")
        )
        out.append(
            Diagnostic(
                "error",
                "relayhost is empty: smtpgate relays every accepted message to it; "
                f"set relayhost = [backend.example]:25{typos}",
                settings.blame("relayhost"),
            )
        )
    level = settings["smtp_tls_security_level"].lower()
    has_ca = settings["smtp_tls_CAfile"] or settings["smtp_tls_CApath"]
    if level in ("verify", "secure") and not has_ca:
        out.append(
            Diagnostic(
                "warning",
                f"smtp_tls_security_level = {level} without smtp_tls_CAfile or "
                "smtp_tls_CApath: no backend certificate can be verified",
                settings.location("smtp_tls_security_level"),
            )
        )
    return out
