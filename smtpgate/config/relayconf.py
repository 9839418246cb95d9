"""The relay's configuration as typed values: where to relay, how long to wait, how to use TLS.

:func:`relay_config` reads every parameter the relay uses from :class:`Settings`, once,
and returns a frozen :class:`RelayConfig`; the relay (``smtpgate.relay``) never reads a
parameter by its name. Values that cannot be used are :class:`ConfigError`s naming file
and line. Files (CA certificates, client certificate and key) are named here but read by
the relay when it builds its TLS context: this layer does no I/O beyond the main.cf. The
file parameters keep their location (:meth:`RelayConfig.location`), so an unreadable file is
still reported with its line.

Next hops are written as Postfix writes them: ``relayhost`` and ``smtpgate_hold_relayhost``
as ``[host]:port`` (exact) or ``host:port`` (MX lookup), see :func:`parse_relayhost`; an
access(5) ``FILTER`` action as ``transport:[host]:port``, see
:func:`parse_filter_destination`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from smtpgate.config.diagnostics import Location
from smtpgate.config.settings import Settings
from smtpgate.errors import ConfigError, FilterDestinationError

TLS_LEVELS = ("none", "may", "encrypt", "verify", "secure")
FILTER_TRANSPORTS = ("smtp", "relay")
"""FILTER transports smtpgate can honour: Postfix's SMTP client under its usual names."""

SERVICE_PORTS = {"smtp": 25, "submission": 587, "submissions": 465, "smtps": 465}
"""Service names a port may be given as (the config layer does not read /etc/services)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_Blame = Callable[[str, str], ConfigError]


@dataclass(frozen=True)
class Relayhost:
    """A next hop: ``[host]:port`` (exact) or ``host:port`` (Postfix: MX lookup)."""

    host: str
    port: int
    mx_lookup: bool

    def __str__(self) -> str:
        if self.mx_lookup:
            return f"{self.host}:{self.port}"
        return f"[{self.host}]:{self.port}"


def parse_relayhost(value: str) -> Relayhost | None:
    """Parse a Postfix relayhost; None when empty. Raises ValueError with the reason."""
    text = value.strip()
    if not text:
        return None
    if any(c.isspace() or c == "," for c in text):
        raise ValueError("smtpgate relays to one destination; give one [host]:port")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError('expected "[host]" or "[host]:port"')
        port_text, mx_lookup = rest[1:], False
        if host.lower().startswith("ipv6:"):
            host = host[5:]
    else:
        if text.count(":") > 1:
            raise ValueError("an IPv6 address must be written in brackets: [::1]:25")
        host, _, port_text = text.partition(":")
        mx_lookup = True
    if not host or _CONTROL.search(host):
        raise ValueError("missing or invalid host name")
    return Relayhost(host, _parse_port(port_text, text), mx_lookup)


def _parse_port(text: str, whole: str) -> int:
    if not text:
        if whole.endswith(":"):
            raise ValueError("missing port after ':'")
        return 25
    if text.isdigit():
        port = int(text)
        if 0 < port < 65536:
            return port
        raise ValueError(f"bad port number: {text}")
    service = SERVICE_PORTS.get(text.lower())
    if service is None:
        known = ", ".join(SERVICE_PORTS)
        raise ValueError(f"unknown service name: {text} (use a port number, or one of {known})")
    return service


def parse_filter_destination(text: str) -> Relayhost:
    """The next hop of an access(5) ``FILTER transport:destination`` action.

    ``smtp:[host]:port``, ``smtp:host:port``, ``relay:[host]`` ... (the destination as
    :func:`parse_relayhost` reads it). Any other transport -- ``lmtp``, a named
    master.cf service -- is a :class:`FilterDestinationError`: smtpgate has no master.cf
    and cannot know what that service does. So is a missing or unusable destination
    (Postfix would use the transport's default next hop, which a proxy does not have).
    """
    value = text.strip()
    transport, colon, destination = value.partition(":")
    if not colon:
        raise FilterDestinationError(f'FILTER {value}: expected "transport:[host]:port"')
    if transport.lower() not in FILTER_TRANSPORTS:
        raise FilterDestinationError(
            f'FILTER {value}: transport "{transport}" is not supported '
            f"(smtpgate relays with SMTP only: {', '.join(FILTER_TRANSPORTS)})"
        )
    try:
        hop = parse_relayhost(destination)
    except ValueError as exc:
        raise FilterDestinationError(f"FILTER {value}: {exc}") from None
    if hop is None:
        raise FilterDestinationError(f"FILTER {value}: no next hop after the transport")
    return hop


@dataclass(frozen=True)
class TLSConfig:
    """``smtp_tls_*``: how to use TLS with the next hop (files named, not read yet)."""

    level: str = "none"
    """none, may, encrypt, verify or secure (wrapper mode raises none/may to encrypt)."""
    wrappermode: bool = False
    cafile: str | None = None
    capath: str | None = None
    chain_files: tuple[str, ...] = ()
    cert_file: str | None = None
    key_file: str | None = None
    match: tuple[str, ...] = ()
    """Certificate name strategies for verify/secure (lower case)."""
    servername: str | None = None
    """SNI: a literal name, ``hostname``/``nexthop`` (the next hop's name), or None."""
    loglevel: int = 0

    @property
    def verifies(self) -> bool:
        return self.level in ("verify", "secure")


@dataclass(frozen=True)
class RelayConfig:
    """Everything the relay reads from the configuration, checked and typed."""

    relayhost: Relayhost | None
    """None: ``relayhost`` is empty (every transaction gets 451)."""
    ehlo_name: str
    hold_relayhost: Relayhost | None = None
    """``smtpgate_hold_relayhost``: where a message that triggered HOLD goes (None: relayhost)."""
    connect_timeout: float = 30.0
    command_timeout: float = 100.0
    tls: TLSConfig = TLSConfig()
    max_idle: int = 32
    """Idle connections kept per next hop."""
    max_age: float = 300.0
    """Seconds a backend connection may be reused (Postfix smtp_connection_reuse_time_limit)."""
    max_transactions: int = 100
    idle_timeout: float = 30.0
    """Seconds an idle pooled connection is kept (backends drop idle clients themselves)."""
    chunk_size: int = 1 << 20
    """Largest BDAT chunk; a message up to this size is one ``BDAT n LAST``."""
    proxy_protocol: int = 0
    """``smtpgate_backend_proxy_protocol``: 1 or 2 (send a PROXY header of that version
    before the greeting, one connection per transaction), 0: none."""
    path: str | None = None
    locations: dict[str, Location] = field(default_factory=dict, compare=False)
    """Where the file parameters were set, for errors about their files."""

    def location(self, name: str) -> Location | None:
        """Where file parameter *name* was set (as :meth:`Settings.location`)."""
        return self.locations.get(name)


def config_error(name: str, message: str, where: Location | None, path: str | None) -> ConfigError:
    """A ConfigError about parameter *name*, naming the file and line that set it."""
    if where is None:
        return ConfigError(f"{name}: {message}", path)
    return ConfigError(f"{name}: {message}", where.path, where.line or None)


_FILE_PARAMETERS = (
    "smtp_tls_CAfile",
    "smtp_tls_CApath",
    "smtp_tls_chain_files",
    "smtp_tls_cert_file",
    "smtp_tls_key_file",
)


BACKEND_PROXY_PROTOCOLS = {"": 0, "v1": 1, "v2": 2}


def relay_config(settings: Settings) -> RelayConfig:
    """Read ``relayhost``, ``smtpgate_hold_relayhost``, ``smtpd_proxy_ehlo``,
    ``smtp_connect_timeout``, ``smtpd_proxy_timeout``, ``smtpgate_backend_proxy_protocol``
    and ``smtp_tls_*``."""

    def bad(name: str, message: str) -> ConfigError:
        return config_error(name, message, settings.location(name), settings.path)

    hops: dict[str, Relayhost | None] = {}
    for name in ("relayhost", "smtpgate_hold_relayhost"):
        try:
            hops[name] = parse_relayhost(settings[name])
        except ValueError as exc:
            raise bad(name, f"{settings[name]}: {exc}") from None
    ehlo = settings["smtpd_proxy_ehlo"].strip()
    if not ehlo or any(c.isspace() for c in ehlo) or _CONTROL.search(ehlo):
        raise bad("smtpd_proxy_ehlo", f"bad EHLO name: {ehlo!r}")
    proxy = settings["smtpgate_backend_proxy_protocol"].strip().lower()
    if proxy not in BACKEND_PROXY_PROTOCOLS:
        raise bad(
            "smtpgate_backend_proxy_protocol",
            f"unsupported value: {proxy} (use v1, v2, or leave it empty)",
        )
    return RelayConfig(
        relayhost=hops["relayhost"],
        proxy_protocol=BACKEND_PROXY_PROTOCOLS[proxy],
        hold_relayhost=hops["smtpgate_hold_relayhost"],
        ehlo_name=ehlo,
        connect_timeout=settings.as_time("smtp_connect_timeout"),
        command_timeout=settings.as_time("smtpd_proxy_timeout"),
        tls=_tls_config(settings, bad),
        path=settings.path,
        locations={name: where for name in _FILE_PARAMETERS if (where := settings.location(name))},
    )


def _tls_config(settings: Settings, bad: _Blame) -> TLSConfig:
    level = settings["smtp_tls_security_level"].strip().lower() or "none"
    if level not in TLS_LEVELS:
        raise bad(
            "smtp_tls_security_level",
            f'unsupported level "{level}" (smtpgate supports {", ".join(TLS_LEVELS)})',
        )
    wrappermode = settings.as_bool("smtp_tls_wrappermode")
    if wrappermode and level in ("none", "may"):
        level = "encrypt"  # Postfix: wrapper mode needs TLS, an unencrypted session is moot
    loglevel = settings.as_int("smtp_tls_loglevel")
    if level == "none":
        return TLSConfig(loglevel=loglevel)
    match_name = "smtp_tls_verify_cert_match" if level == "verify" else "smtp_tls_secure_cert_match"
    match = tuple(
        word.lower() for item in settings.as_list(match_name) for word in item.split(":") if word
    )
    return TLSConfig(
        level=level,
        wrappermode=wrappermode,
        cafile=settings["smtp_tls_CAfile"].strip() or None,
        capath=settings["smtp_tls_CApath"].strip() or None,
        chain_files=tuple(settings.as_list("smtp_tls_chain_files")),
        cert_file=settings["smtp_tls_cert_file"].strip() or None,
        key_file=settings["smtp_tls_key_file"].strip() or None,
        match=match,
        servername=settings["smtp_tls_servername"].strip() or None,
        loglevel=loglevel,
    )
