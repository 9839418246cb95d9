"""TLS towards the backend, as Postfix's ``smtp_tls_security_level`` says.

``none`` never sends STARTTLS; ``may`` uses it when offered, without verification,
continues in plaintext when STARTTLS is refused and retries on a new plaintext connection
when the handshake fails; ``encrypt`` requires it (no verification); ``verify`` and
``secure`` also verify the chain against ``smtp_tls_CAfile``/``smtp_tls_CApath`` (no system
CAs, like Postfix without ``tls_append_default_CA``) and the name per
``smtp_tls_verify_cert_match`` / ``smtp_tls_secure_cert_match`` (``hostname``, ``nexthop``,
``dot-nexthop``, a literal name, or ``.domain`` for its subdomains; the next hop and the
host name are both the next hop's name -- relayhost, a FILTER destination or the hold
relayhost; an IP-literal next hop matches an IP subjectAltName). TLS 1.2 or newer.

:func:`tls_policy` reads the files once, at load; :func:`load_cert_files` is shared with
the listener's certificates and names parameter and file in every error.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from smtpgate.config.diagnostics import Location
from smtpgate.config.relayconf import TLSConfig, config_error
from smtpgate.errors import ConfigError


class _Where(Protocol):
    """Where parameters were set: :class:`~smtpgate.config.Settings` or a RelayConfig."""

    @property
    def path(self) -> str | None: ...

    def location(self, name: str) -> Location | None: ...


@dataclass(frozen=True)
class TLSPolicy:
    """How to use TLS with the backend: the level and the context built from the files."""

    level: str = "none"
    context: ssl.SSLContext | None = None
    match: tuple[str, ...] = ()
    servername: str | None = None
    """A literal SNI name, ``hostname``/``nexthop`` (the next hop's name) or None."""
    wrappermode: bool = False
    loglevel: int = 0

    @property
    def verifies(self) -> bool:
        return self.level in ("verify", "secure")

    def server_name(self, nexthop: str) -> str | None:
        """The SNI name to send to *nexthop* (Postfix sends none by default)."""
        if self.servername in ("hostname", "nexthop"):
            return nexthop
        return self.servername


def tls_policy(config: TLSConfig, where: _Where) -> TLSPolicy:
    """Build the policy, reading the certificate files; an unreadable one is a ConfigError."""
    if config.level == "none":
        return TLSPolicy(loglevel=config.loglevel)
    context = _tls_context(config, where)
    return TLSPolicy(
        config.level,
        context,
        config.match,
        config.servername,
        config.wrappermode,
        config.loglevel,
    )


def _error(where: _Where, name: str, message: str) -> ConfigError:
    return config_error(name, message, where.location(name), where.path)


def _tls_context(config: TLSConfig, where: _Where) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # names are matched the Postfix way, see peer_name_matches
    context.verify_mode = ssl.CERT_REQUIRED if config.verifies else ssl.CERT_NONE
    if config.verifies and (config.cafile or config.capath):
        try:
            context.load_verify_locations(cafile=config.cafile, capath=config.capath)
        except (OSError, ssl.SSLError) as exc:
            name = "smtp_tls_CAfile" if config.cafile else "smtp_tls_CApath"
            raise _error(where, name, f"cannot load CA certificates: {exc}") from None
    for chain in config.chain_files:
        load_cert_files(context, where, ("smtp_tls_chain_files", chain))
    if config.cert_file and not config.chain_files:
        key_file = config.key_file or config.cert_file
        load_cert_files(
            context,
            where,
            ("smtp_tls_cert_file", config.cert_file),
            ("smtp_tls_key_file", key_file),
        )
    return context


def load_cert_files(
    context: ssl.SSLContext,
    where: _Where,
    cert: tuple[str, str],
    key: tuple[str, str] | None = None,
) -> None:
    """``load_cert_chain`` from (parameter, file) pairs, with errors that name both.

    Each file is opened first, so that an unreadable one (a root-only key read after the
    privilege drop, a typo) is named with its parameter rather than as a bare errno.
    *where* (Settings or a RelayConfig) tells the file and line of each parameter.
    """
    for name, path in (cert, key) if key else (cert,):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise _error(where, name, f"cannot read {path}: {why}") from None
    try:
        context.load_cert_chain(cert[1], key[1] if key else None)
    except (OSError, ssl.SSLError) as exc:
        pair = f"{cert[1]} with {key[0]} = {key[1]}" if key else cert[1]
        raise _error(where, cert[0], f"cannot load {pair}: {exc}") from None


def _cert_names(cert: dict[str, Any]) -> tuple[list[str], list[str]]:
    dns: list[str] = []
    ips: list[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            dns.append(value.lower().rstrip("."))
        elif kind == "IP Address":
            ips.append(value.strip())
    if not dns:
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    dns.append(value.lower().rstrip("."))
    return dns, ips


def _name_matches(pattern: str, dns: list[str], ips: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(pattern)
    except ValueError:
        address = None
    if address is not None:
        return any(_same_ip(address, ip) for ip in ips)
    if pattern.startswith("."):
        return any(name.endswith(pattern) for name in dns)
    for name in dns:
        if name == pattern:
            return True
        if name.startswith("*.") and "." in pattern and pattern.split(".", 1)[1] == name[2:]:
            return True
    return False


def _same_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False


def peer_name_matches(cert: dict[str, Any], match: Sequence[str], nexthop: str) -> bool:
    """Postfix's certificate name check for verify/secure (``tls_verify.c`` strategies)."""
    dns, ips = _cert_names(cert)
    host = nexthop.lower().rstrip(".")
    for strategy in match:
        if strategy in ("hostname", "nexthop"):
            pattern = host
        elif strategy == "dot-nexthop":
            pattern = "." + host
        else:
            pattern = strategy.rstrip(".")
        if _name_matches(pattern, dns, ips):
            return True
    return False
