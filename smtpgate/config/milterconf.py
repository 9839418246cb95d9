"""The milters' configuration as typed values: which milters, in which order, how.

:func:`milter_config` reads ``smtpd_milters`` and the ``milter_*`` parameters once and
returns a frozen :class:`MilterConfig`; the milter client (``smtpgate.milter``) never
reads a parameter by its name. Values that cannot be used are :class:`ConfigError`\\ s
naming file and line.

``smtpd_milters`` is read as Postfix's ``milter_new`` reads it: entries separated by
comma or blanks; an entry in braces is ``{ endpoint, name=value, ... }`` with per-milter
``connect_timeout``, ``command_timeout``, ``content_timeout``, ``default_action`` and
``protocol`` (the main.cf names without ``milter_``). An endpoint is ``inet:host:port``
(``inet:[::1]:port`` for IPv6), ``unix:/path`` or ``local:/path``; a relative path is
relative to the configuration's folder (Postfix: to its queue directory, the chroot).

Where smtpgate is stricter than Postfix, at load instead of per connection: an unknown
``default_action`` (Postfix logs a warning per session and answers 451 4.3.5), a bad
``protocol`` (Postfix: a warning and 451 4.3.5 per session), a bad endpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from smtpgate.config.maincf import SPACE, split_list, split_nameval, strip_braces
from smtpgate.config.relayconf import config_error
from smtpgate.config.settings import Settings
from smtpgate.errors import ConfigError

DEFAULT_ACTIONS = ("accept", "reject", "tempfail", "quarantine")
MACRO_STAGES = (
    "connect",
    "helo",
    "mail",
    "rcpt",
    "data",
    "end_of_header",
    "end_of_data",
    "unknown_command",
)
"""The stages of ``milter_<stage>_macros``."""
POSTFIX_MACROS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "connect": ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
        "helo": ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
        "mail": (
            "i",
            "{auth_type}",
            "{auth_authen}",
            "{auth_author}",
            "{mail_addr}",
            "{mail_host}",
            "{mail_mailer}",
        ),
        "rcpt": ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
        "data": ("i",),
        "end_of_header": ("i",),
        "end_of_data": ("i",),
        "unknown_command": (),
    }
)
"""Postfix 3.7's default ``milter_<stage>_macros`` (``postconf -d``)."""
_VERSIONS = {"2": 2, "3": 3, "4": 4, "6": 6}
_EXTENSIONS = ("no_header_reply",)
_TIMEOUTS = ("connect_timeout", "command_timeout", "content_timeout")
_BRACED_NAME = re.compile(r"\{[^{}]*\}\s*=")
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class MilterSpec:
    """One milter of ``smtpd_milters``, with its settings (main.cf's unless overridden)."""

    name: str
    """The endpoint as written (``inet:127.0.0.1:11332``): the milter's name in log lines."""
    transport: str
    """``inet`` or ``unix`` (``local`` is ``unix``)."""
    host: str = ""
    port: int = 0
    path: str = ""
    connect_timeout: float = 30.0
    command_timeout: float = 30.0
    content_timeout: float = 300.0
    default_action: str = "tempfail"
    protocol: str = "6"
    """The protocol text as written (``6``, ``6 no_header_reply`` ...)."""
    version: int = 6
    no_header_reply: bool = False


@dataclass(frozen=True)
class MilterConfig:
    """``smtpd_milters`` and the ``milter_*`` parameters, checked and typed."""

    milters: tuple[MilterSpec, ...] = ()
    macros: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: POSTFIX_MACROS)
    """Stage (:data:`MACRO_STAGES`) -> the macro names sent, as written (``j``, ``{v}``)."""
    macro_defaults: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """``milter_macro_defaults``: ``{name}`` -> the value used when the session has none."""
    daemon_name: str = ""
    """``milter_macro_daemon_name``: the value of ``{daemon_name}``."""
    v: str = ""
    """``milter_macro_v``: the value of ``v``."""

    def __bool__(self) -> bool:
        return bool(self.milters)


def _time(text: str) -> float | None:
    """Seconds from a Postfix time value (default unit s); None when malformed or < 1."""
    value = text.strip()
    digits = len(value) - len(value.lstrip("0123456789"))
    unit = value[digits:] or "s"
    if digits == 0 or unit not in _TIME_UNITS:
        return None
    seconds = int(value[:digits]) * _TIME_UNITS[unit]
    return float(seconds) if seconds >= 1 else None


def parse_protocol(text: str) -> tuple[int, bool]:
    """``milter_protocol``: exactly one version (2, 3, 4 or 6), optionally
    ``no_header_reply``. Raises ValueError with Postfix's wording."""
    version = 0
    no_header_reply = False
    for word in split_list(text):
        if word in _EXTENSIONS:
            no_header_reply = True
        elif word in _VERSIONS and version == 0:
            version = _VERSIONS[word]
        else:
            raise ValueError(f"bad protocol information: {word}")
    if version == 0:
        raise ValueError("no protocol version information")
    return version, no_header_reply


def parse_endpoint(name: str, config_directory: str = "") -> tuple[str, str, int, str]:
    """``inet:host:port``, ``unix:/path`` or ``local:/path`` -> (transport, host, port, path).

    Raises ValueError with the reason.
    """
    transport, colon, endpoint = name.partition(":")
    if not colon or not transport or not endpoint:
        raise ValueError(f'Milter service needs transport:endpoint instead of "{name}"')
    if transport in ("unix", "local"):
        path = endpoint
        if not os.path.isabs(path) and config_directory:
            path = os.path.join(config_directory, path)
        return "unix", "", 0, path
    if transport != "inet":
        raise ValueError(f"invalid transport name: {transport} in Milter service: {name}")
    if endpoint.startswith("["):
        host, bracket, rest = endpoint[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f'expected "inet:[address]:port" instead of "{name}"')
        port_text = rest[1:]
    else:
        host, colon, port_text = endpoint.rpartition(":")
        if not colon:
            raise ValueError(f'expected "inet:host:port" instead of "{name}"')
    if host.lower().startswith("ipv6:"):
        host = host[5:]
    if not host or any(c in SPACE for c in host):
        raise ValueError(f'missing or bad host in "{name}"')
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f'bad port "{port_text}" in "{name}" (use a number 1-65535)')
    return "inet", host, int(port_text), ""


def _default_action(value: str) -> str:
    action = value.strip().lower()
    if action not in DEFAULT_ACTIONS:
        raise ValueError(
            f"unrecognized default action: {value.strip()} (use {', '.join(DEFAULT_ACTIONS)})"
        )
    return action


@dataclass
class _Defaults:
    connect_timeout: float
    command_timeout: float
    content_timeout: float
    default_action: str
    protocol: str


def _overrides(text: str) -> dict[str, str | float]:
    """The ``name=value`` settings after a braced entry's endpoint (attr_override.c)."""
    out: dict[str, str | float] = {}
    for item in split_list(text):
        nameval = strip_braces(item) if item.startswith("{") else item
        parsed = split_nameval(nameval)
        if isinstance(parsed, str):
            raise ValueError(f'malformed option: {parsed}: "...{nameval}..."')
        key, value = parsed
        if key in _TIMEOUTS:
            seconds = _time(value)
            if seconds is None:
                raise ValueError(f"{key}: bad time value or unit: {value}")
            out[key] = seconds
        elif key == "default_action":
            out[key] = _default_action(value)
        elif key == "protocol":
            parse_protocol(value)
            out[key] = value
        else:
            raise ValueError(f'unknown option: "{key} = {value}"')
    return out


def parse_milters(
    value: str, defaults: _Defaults, config_directory: str = ""
) -> tuple[MilterSpec, ...]:
    """``smtpd_milters`` as a tuple of :class:`MilterSpec`. Raises ValueError."""
    specs = []
    for token in split_list(value):
        settings: dict[str, str | float] = {}
        name = token
        if token.startswith("{"):
            inner = strip_braces(token)
            words = split_list(inner)
            if not words:
                raise ValueError(f'empty milter definition: "{value.strip()}"')
            name = words[0]
            settings = _overrides(inner[inner.index(name) + len(name) :])
        transport, host, port, path = parse_endpoint(name, config_directory)
        protocol = str(settings.get("protocol", defaults.protocol))
        version, no_header_reply = parse_protocol(protocol)
        specs.append(
            MilterSpec(
                name=name,
                transport=transport,
                host=host,
                port=port,
                path=path,
                connect_timeout=float(settings.get("connect_timeout", defaults.connect_timeout)),
                command_timeout=float(settings.get("command_timeout", defaults.command_timeout)),
                content_timeout=float(settings.get("content_timeout", defaults.content_timeout)),
                default_action=str(settings.get("default_action", defaults.default_action)),
                protocol=protocol,
                version=version,
                no_header_reply=no_header_reply,
            )
        )
    return tuple(specs)


def parse_macro_defaults(value: str) -> dict[str, str]:
    """``milter_macro_defaults``: ``name=value`` or ``{ name = value }`` entries, keyed
    ``{name}`` (milter.c milter_macro_defaults_create). Raises ValueError."""
    out: dict[str, str] = {}
    for item in split_list(value):
        # "{ name = value }" is unwrapped; "{name}=value" is a name in braces.
        nameval = item
        if item.startswith("{") and not _BRACED_NAME.match(item):
            nameval = strip_braces(item)
        parsed = split_nameval(nameval)
        if isinstance(parsed, str):
            raise ValueError(f'malformed default macro entry: {parsed} in "{value.strip()}"')
        name, macro_value = parsed
        key = name if name.startswith("{") else "{" + name + "}"
        out.setdefault(key, macro_value)
    return out


def milter_config(settings: Settings) -> MilterConfig:
    """Read ``smtpd_milters``, ``milter_*`` (timeouts, protocol, default action, macro
    lists and defaults, ``{daemon_name}`` and ``v``)."""

    def bad(name: str, message: str) -> ConfigError:
        return config_error(name, message, settings.location(name), settings.path)

    def timeout(name: str) -> float:
        seconds = settings.as_time(name)
        if seconds < 1:
            raise bad(name, f"invalid {name} parameter value {settings[name]} < 1s")
        return seconds

    try:
        action = _default_action(settings["milter_default_action"])
    except ValueError as exc:
        raise bad("milter_default_action", str(exc)) from None
    protocol = settings["milter_protocol"]
    try:
        parse_protocol(protocol)
    except ValueError as exc:
        raise bad("milter_protocol", f"{protocol.strip()}: {exc}") from None
    defaults = _Defaults(
        connect_timeout=timeout("milter_connect_timeout"),
        command_timeout=timeout("milter_command_timeout"),
        content_timeout=timeout("milter_content_timeout"),
        default_action=action,
        protocol=protocol,
    )
    try:
        milters = parse_milters(settings["smtpd_milters"], defaults, settings.config_directory)
    except ValueError as exc:
        raise bad("smtpd_milters", str(exc)) from None
    try:
        macro_defaults = parse_macro_defaults(settings["milter_macro_defaults"])
    except ValueError as exc:
        raise bad("milter_macro_defaults", str(exc)) from None
    macros = {
        stage: tuple(split_list(settings[f"milter_{stage}_macros"])) for stage in MACRO_STAGES
    }
    return MilterConfig(
        milters=milters,
        macros=MappingProxyType(macros),
        macro_defaults=MappingProxyType(macro_defaults),
        daemon_name=settings["milter_macro_daemon_name"],
        v=settings["milter_macro_v"],
    )
