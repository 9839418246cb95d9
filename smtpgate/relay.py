"""Relay accepted mail to the backend MTA in lock-step: the client's 250 is the backend's 250.

Theory of operation (Postfix ``smtpd_proxy_filter`` without ``speed_adjust``,
``src/smtpd/smtpd_proxy.c``):

1. :meth:`Relay.begin` starts a :class:`Transaction` for a MAIL FROM that local policy
   accepted. It does no I/O: the backend is contacted at the first recipient that local
   policy accepted, so rejected spam never costs a backend connection.
2. The first :meth:`Transaction.rcpt` takes a pooled connection (probed with RSET) or opens
   one: connect (``smtp_connect_timeout``), greeting, EHLO ``$smtpd_proxy_ehlo``, STARTTLS
   per ``smtp_tls_security_level``, EHLO again; then XFORWARD with the attributes the
   backend's EHLO lists, and MAIL FROM with the client's parameters (when the backend
   offers PIPELINING, the RSET probe, XFORWARD, MAIL and the first RCPT go in one write
   and their replies are judged in order, as in lock-step; after a refused MAIL the
   RCPT's reply, a 503, is read and dropped, as Postfix's own smtp client does). Every
   RCPT is forwarded and the backend's reply is the client's reply.
3. :meth:`Transaction.start_data` sends DATA when the client says DATA (as Postfix's
   proxy does; a transaction that then ends without the client's dot closes the backend
   connection, so nothing is delivered), and :meth:`Transaction.data` reads its reply
   (or sends DATA itself), then the content with CRLF line ends and
   dot-stuffing (built here, never raw client bytes: no bare CR or LF, no unstuffed dot
   can reach the backend, see :func:`frame_data`), then the final dot; the backend's reply
   to the dot is the client's reply.
4. Every doubt is a ``451 4.3.0 Error: queue file write error`` with no internal detail
   (Postfix's ``CLEANUP_STAT_PROXY`` reply); the detail goes to the ``smtpgate.relay``
   logger. Proper 4xx/5xx replies of the backend to MAIL, RCPT, DATA and the dot are passed
   through (text censored to printable ASCII, as Postfix's ``printable()``); a negative
   greeting, EHLO or XFORWARD reply, an unexpected 2xx/3xx, a garbled reply, a timeout or
   a lost connection become the 451 and the connection is closed. A backend ``421`` is
   not passed through either (the client did not ask to be disconnected): 451, and the
   connection is dropped. After such a fault the transaction is dead: every later call
   returns the same reply without contacting the backend again.
5. Nothing is retried once the final dot was written; a fault after that sets
   :attr:`Transaction.outcome_unknown` (a duplicate is acceptable, a loss is not).
   Everything before the dot is safe to redo, so a stale pooled connection is replaced
   silently and ``may`` TLS falls back to a new plaintext connection.
6. Connections are reused across transactions (at most one transaction at a time each):
   back to the pool after a final reply to the dot or after :meth:`Transaction.abort`
   (which sends RSET and never the dot); probed with RSET when taken out again; dropped
   after a 421, a timeout, any error, too many transactions or too much age; at most
   ``max_idle`` idle connections are kept.

TLS follows Postfix's ``smtp_tls_security_level``: ``none`` never sends STARTTLS;
``may`` uses it when offered, without verification, continues in plaintext when STARTTLS
is refused and retries on a new plaintext connection when the handshake fails;
``encrypt`` requires it (no verification); ``verify`` and ``secure`` also verify the chain
against ``smtp_tls_CAfile``/``smtp_tls_CApath`` (no system CAs, like Postfix without
``tls_append_default_CA``) and the name per ``smtp_tls_verify_cert_match`` /
``smtp_tls_secure_cert_match`` (``hostname``, ``nexthop``, ``dot-nexthop``, a literal
name, or ``.domain`` for its subdomains; the next hop and the host name are both the
relayhost name; an IP-literal relayhost matches an IP subjectAltName). TLS 1.2 or newer.
A mandatory-TLS failure is the 451 for the client and a warning in the log; it never
falls back to plaintext.

An unbracketed relayhost (``host`` or ``host:port``) is looked up as MX, as Postfix
does: the server sets ``Relay.next_hops`` to the resolver's MX lookup (preference order,
then A/AAAA); each address is tried in turn. ``[host]`` forms are exact. Certificate
names are matched against the relayhost name, also for MX hosts.

Differences from Postfix: the greeting is bounded by ``smtp_connect_timeout`` (Postfix:
the whole proxy exchange is bounded by ``smtpd_proxy_timeout``). The SNI name is
``smtp_tls_servername`` when that is a literal, else the relayhost name (Postfix sends
none by default).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiosmtplib
from aiosmtplib import SMTPResponse

from smtpgate.config import Settings
from smtpgate.errors import ConfigError, RelayError
from smtpgate.facts import ClientFacts
from smtpgate.reply import Reply

logger = logging.getLogger("smtpgate.relay")

R451_PROXY = Reply(451, "4.3.0", "Error: queue file write error")
"""Postfix's reply for any proxy (backend) failure: no internal detail for strangers."""
R501_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R501_BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
R554_NO_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
R503_NO_TRANSACTION = Reply(503, "5.5.1", "Error: need MAIL command")

MAX_IDLE = 32
MAX_AGE = 300.0
"""Seconds a backend connection may be reused (Postfix smtp_connection_reuse_time_limit)."""
MAX_TRANSACTIONS = 100
IDLE_TIMEOUT = 30.0
"""Seconds an idle pooled connection is kept (backends drop idle clients themselves)."""
QUIT_TIMEOUT = 2.0
CONTENT_CHUNK = 64 * 1024

XFORWARD_ORDER = ("NAME", "ADDR", "PORT", "HELO", "IDENT", "PROTO", "SOURCE")
"""The attributes in the order Postfix's smtpd_proxy.c sends them."""
XFORWARD_UNAVAILABLE = "[UNAVAILABLE]"
XFORWARD_PAYLOAD_LIMIT = 512 - len("250 XFORWARD\r\n")
"""Postfix's PAYLOAD_LIMIT: the attributes of one XFORWARD command fit in 512 octets."""
XFORWARD_VALUE_LIMIT = 255
"""XFORWARD_README: attribute values are at most 255 characters (xtext-encoded here)."""

TLS_LEVELS = ("none", "may", "encrypt", "verify", "secure")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_DSN = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_QUEUE_ID = re.compile(r"queued as (\S+)", re.IGNORECASE)
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


# -- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relayhost:
    """A parsed ``relayhost``: ``[host]:port`` (exact) or ``host:port`` (Postfix: MX lookup)."""

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
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        raise ValueError(f"unknown service name: {text}") from None


_DOT_LINE = re.compile(rb"\n\.")  # a regex search beats bytes.find for a 2-byte needle
_XTEXT_PLAIN = re.compile(r"[!-*,-<>-~]*")  # "!".."~" without "+" and "="


def xtext(value: str, limit: int = XFORWARD_VALUE_LIMIT) -> str:
    """RFC 3461 xtext (``+HH`` for octets outside ``!``..``~`` and for ``+``/``=``).

    The result is cut at a character boundary so that it is at most *limit* octets.
    """
    if len(value) <= limit and _XTEXT_PLAIN.fullmatch(value):
        return value  # the usual case: nothing to encode
    out: list[str] = []
    size = 0
    for char in value:
        piece = "".join(
            chr(b) if 33 <= b <= 126 and b not in (43, 61) else f"+{b:02X}"
            for b in char.encode("utf-8", "surrogateescape")
        )
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _xforward_value(client: ClientFacts, attribute: str) -> str | None:
    if attribute == "NAME":
        return client.name if client.name and client.name != "unknown" else None
    if attribute == "ADDR":
        if not client.addr or client.addr == "unknown":
            return None
        return f"IPv6:{client.addr}" if ":" in client.addr else client.addr
    if attribute == "PORT":
        return str(client.port) if client.port > 0 else None
    if attribute == "HELO":
        return client.helo or None
    if attribute == "IDENT":
        return client.ident or None
    if attribute == "PROTO":
        return client.proto or None
    return client.source or "REMOTE"


def xforward_commands(client: ClientFacts, offered: Collection[str]) -> list[str]:
    """XFORWARD command lines (no CRLF) for the attributes *offered*, in Postfix's order.

    Missing values are ``[UNAVAILABLE]``; a command is flushed before it would exceed
    Postfix's 512-octet limit (``smtpd_proxy_xforward_send``).
    """
    commands: list[str] = []
    payload = ""
    for attribute in XFORWARD_ORDER:
        if attribute not in offered:
            continue
        value = _xforward_value(client, attribute)
        item = f" {attribute}={XFORWARD_UNAVAILABLE if value is None else xtext(value)}"
        if payload and len(payload) + len(item) > XFORWARD_PAYLOAD_LIMIT:
            commands.append("XFORWARD" + payload)
            payload = ""
        payload += item
    if payload:
        commands.append("XFORWARD" + payload)
    return commands


def plain_content(data: bytes) -> bool:
    """Every CR and LF is part of a CRLF and no line starts with a dot: such content is
    its own wire form (nothing to unstuff, normalise or stuff again).

    Counting runs at C speed and is cheaper than the copies it avoids; the cheapest
    tests come first, so content that is not plain fails fast.
    """
    lf = data.count(b"\n")
    return (
        data.count(b"\r") == lf
        and not data.startswith(b".")
        and _DOT_LINE.search(data) is None
        and data.count(b"\r\n") == lf
    )


def frame_data(message: bytes, plain: bool = False) -> bytes:
    """The wire form of *message* after DATA: CRLF line ends, dot-stuffed, then ``.`` CRLF.

    Every CR, LF or CRLF becomes CRLF, so no bare CR or LF survives (SMTP smuggling), and
    every line that starts with a dot gets a second one (RFC 5321 section 4.5.2).
    ``plain`` says the caller found :func:`plain_content` true: only the end is added.
    """
    if not message:
        return b".\r\n"
    # Fast paths (counts and searches run at C speed; the regexes build a new message):
    # every CR and LF already part of a CRLF, and no line that starts with a dot.
    if plain:
        body = message
    else:
        lf = message.count(b"\n")
        if message.count(b"\r") == lf and message.count(b"\r\n") == lf:
            body = message
        else:
            body = _LINE_ENDINGS.sub(b"\r\n", message)
        if body.startswith(b".") or _DOT_LINE.search(body) is not None:
            body = _LEADING_DOT.sub(b"..", body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def _printable(text: str) -> str:
    return _NOT_PRINTABLE.sub("?", text)


def reply_from_response(response: SMTPResponse) -> Reply:
    """A backend reply as a :class:`Reply`: code, enhanced code (when every line has the
    same one), text with non-printable characters censored to ``?``; lines kept."""
    return _reply(response.code, response.message)


@functools.lru_cache(maxsize=1024)  # backends say "250 2.1.5 Ok" again and again
def _reply(code: int, message: str) -> Reply:
    lines = [_printable(line) for line in message.split("\n")]
    first = lines[0].split(" ", 1)[0]
    if (
        _DSN.fullmatch(first)
        and first[0] == str(code)[0]
        and all(line == first or line.startswith(first + " ") for line in lines)
    ):
        return Reply(code, first, "\n".join(line[len(first) + 1 :] for line in lines))
    return Reply(code, "", "\n".join(lines))


_ATOM_SPECIALS = frozenset('()<>@,;:\\".[] \t')
_DSN_MAIL_PARAMS = ("RET=", "ENVID=")
_DSN_RCPT_PARAMS = ("NOTIFY=", "ORCPT=")


def quote_local(address: str) -> str:
    """The SMTP form of an internal address (Postfix ``quote_821_local``).

    The SMTP layer hands over addresses in internal form (``a b@example`` for the client's
    ``"a b"@example``); a local part that is not a dot-atom is quoted again here.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    dot_atom = (
        local != ""
        and not local.startswith(".")
        and not local.endswith(".")
        and ".." not in local
        and not any(c in _ATOM_SPECIALS and c != "." for c in local)
    )
    if dot_atom or not local:
        return address
    quoted = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{quoted}@{domain}" if at else quoted


def _without(params: Sequence[bytes], prefixes: Sequence[str]) -> list[bytes]:
    """Drop parameters the backend did not advertise (Postfix's smtp client does too)."""
    wanted = tuple(p.encode("ascii") for p in prefixes)
    return [p for p in params if not p.upper().startswith(wanted)]


def _arg(text: str) -> bytes | None:
    """*text* as command-argument bytes, or None when it must not reach the backend."""
    if _CONTROL.search(text):
        return None
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


# -- pipelining --------------------------------------------------------------------------------


class _PipeliningProtocol(aiosmtplib.protocol.SMTPProtocol):
    """aiosmtplib's protocol, able to read the replies to a pipelined group of commands.

    aiosmtplib expects one reply per command written and drops reply bytes that arrive
    while an earlier reply waits to be picked up. While ``pipelined`` is set (see
    :func:`_send_group`) such bytes are kept for the next read instead.
    """

    pipelined = False

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        """aiosmtplib's read_response with a plain timer that fails the reply's future
        instead of ``wait_for`` (a waiter future, a task cancellation and callbacks per
        reply); the same errors."""
        waiter = self._response_waiter
        if waiter is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._response_pending = True
        timer = None if timeout is None else self._loop.call_later(timeout, _expire, waiter)
        try:
            result: SMTPResponse = await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._response_pending = False
            self._response_waiter = None if self.transport is None else self._loop.create_future()
        return result

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if self.pipelined and waiter is not None and (waiter.done() or not self._response_pending):
            self._buffer.extend(data)
            return
        super().data_received(data)


def _expire(waiter: asyncio.Future[SMTPResponse]) -> None:
    if not waiter.done():
        waiter.set_exception(
            aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response")
        )


_SMTP_MODULE = vars(aiosmtplib.smtp)
if _SMTP_MODULE.get("SMTPProtocol") is aiosmtplib.protocol.SMTPProtocol:
    # aiosmtplib.SMTP has no protocol factory argument: it looks the class up here.
    _SMTP_MODULE["SMTPProtocol"] = _PipeliningProtocol


def _send_group(conn: _Connection, commands: Sequence[Sequence[bytes]]) -> None:
    """Write a pipelined group of commands in one write (their arguments already checked)."""
    protocol = conn.smtp.protocol
    if protocol is None:
        raise _Fault("lost connection before sending commands")
    if isinstance(protocol, _PipeliningProtocol):
        protocol.pipelined = True
    protocol._response_pending = True
    try:
        protocol.write(b"".join(b" ".join(args) + b"\r\n" for args in commands))
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise _Fault(f"lost connection sending commands: {exc}") from None


def _end_group(conn: _Connection) -> None:
    protocol = conn.smtp.protocol
    if isinstance(protocol, _PipeliningProtocol):
        protocol.pipelined = False


async def _group_reply(
    conn: _Connection, verb: str, timeout: float, expect: int = 2, passthrough: bool = True
) -> Reply:
    """The next reply of a pipelined group, classified as :func:`_command` does."""
    protocol = conn.smtp.protocol
    with _transport_faults(verb, timeout):
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        response = protocol._read_response_from_buffer() if protocol._buffer else None
        if response is None:
            response = await protocol.read_response(timeout=timeout)
    return _classify(verb, response, expect, passthrough)


# -- faults --------------------------------------------------------------------------------


class _Fault(RelayError):
    """A backend failure: *detail* is for the log, the client gets the generic 451.

    *definite* means the backend gave a proper negative verdict (e.g. 421): nothing stored.
    """

    def __init__(self, detail: str, definite: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.definite = definite


class _TLSHandshakeFault(_Fault):
    """The TLS handshake failed (``may`` retries in plaintext on a new connection)."""


# -- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSPolicy:
    """How to use TLS with the backend (from the ``smtp_tls_*`` parameters)."""

    level: str = "none"
    context: ssl.SSLContext | None = None
    match: tuple[str, ...] = ()
    servername: str | None = None
    wrappermode: bool = False
    loglevel: int = 0

    @property
    def verifies(self) -> bool:
        return self.level in ("verify", "secure")


def _config_error(settings: Settings, name: str, message: str) -> ConfigError:
    location = settings.location(name)
    if location is None:
        return ConfigError(f"{name}: {message}", settings.path)
    return ConfigError(f"{name}: {message}", location.path, location.line or None)


def tls_policy_from_settings(settings: Settings, relayhost: Relayhost | None) -> TLSPolicy:
    """Build the TLS policy; unreadable files and unsupported levels are ConfigErrors."""
    level = settings["smtp_tls_security_level"].strip().lower() or "none"
    if level not in TLS_LEVELS:
        raise _config_error(
            settings,
            "smtp_tls_security_level",
            f'unsupported level "{level}" (smtpgate supports {", ".join(TLS_LEVELS)})',
        )
    wrappermode = settings.as_bool("smtp_tls_wrappermode")
    if wrappermode and level in ("none", "may"):
        level = "encrypt"  # Postfix: wrapper mode needs TLS, an unencrypted session is moot
    if level == "none":
        return TLSPolicy()
    context = _tls_context(settings, verify=level in ("verify", "secure"))
    match_name = "smtp_tls_verify_cert_match" if level == "verify" else "smtp_tls_secure_cert_match"
    match = tuple(
        word.lower() for item in settings.as_list(match_name) for word in item.split(":") if word
    )
    servername = settings["smtp_tls_servername"].strip()
    if servername in ("hostname", "nexthop"):
        servername = relayhost.host if relayhost else ""
    return TLSPolicy(
        level,
        context,
        match,
        servername or None,
        wrappermode,
        settings.as_int("smtp_tls_loglevel"),
    )


def _tls_context(settings: Settings, verify: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # names are matched the Postfix way, see _check_peer_name
    context.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    if verify:
        cafile = settings["smtp_tls_CAfile"].strip() or None
        capath = settings["smtp_tls_CApath"].strip() or None
        if cafile or capath:
            try:
                context.load_verify_locations(cafile=cafile, capath=capath)
            except (OSError, ssl.SSLError) as exc:
                name = "smtp_tls_CAfile" if cafile else "smtp_tls_CApath"
                raise _config_error(settings, name, f"cannot load CA certificates: {exc}") from None
    chain_files = settings.as_list("smtp_tls_chain_files")
    cert_file = settings["smtp_tls_cert_file"].strip()
    for chain in chain_files:
        load_cert_files(context, settings, ("smtp_tls_chain_files", chain))
    if cert_file and not chain_files:
        key_file = settings["smtp_tls_key_file"].strip() or cert_file
        load_cert_files(
            context, settings, ("smtp_tls_cert_file", cert_file), ("smtp_tls_key_file", key_file)
        )
    return context


def load_cert_files(
    context: ssl.SSLContext,
    settings: Settings,
    cert: tuple[str, str],
    key: tuple[str, str] | None = None,
) -> None:
    """``load_cert_chain`` from (parameter, file) pairs, with errors that name both.

    Each file is opened first, so that an unreadable one (a root-only key read after the
    privilege drop, a typo) is named with its parameter rather than as a bare errno.
    """
    for name, path in (cert, key) if key else (cert,):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise _config_error(settings, name, f"cannot read {path}: {why}") from None
    try:
        context.load_cert_chain(cert[1], key[1] if key else None)
    except (OSError, ssl.SSLError) as exc:
        pair = f"{cert[1]} with {key[0]} = {key[1]}" if key else cert[1]
        raise _config_error(settings, cert[0], f"cannot load {pair}: {exc}") from None


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


# -- connections -------------------------------------------------------------------------------


class _Connection:
    """One backend SMTP session, owned by at most one transaction at a time."""

    __slots__ = ("created", "dsn", "last_used", "peer", "smtp", "tls", "transactions", "xforward")

    def __init__(self, smtp: aiosmtplib.SMTP, peer: str, tls: bool, xforward: frozenset[str]):
        self.smtp = smtp
        self.peer = peer
        self.tls = tls
        self.xforward = xforward
        self.dsn = False
        self.created = self.last_used = time.monotonic()
        self.transactions = 0

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def close(self) -> None:
        self.smtp.close()


def _classify(verb: str, response: SMTPResponse, expect: int, passthrough: bool) -> Reply:
    """The reply to give for *response*, or a _Fault (Postfix ``smtpd_proxy_cmd`` rules)."""
    code = response.code
    if not 200 <= code <= 599:
        raise _Fault(f"garbled reply to {verb}: {_printable(response.message)[:200]!r}")
    reply = reply_from_response(response)
    if code // 100 == expect:
        return reply
    if code == 421:
        raise _Fault(f"backend closed the session at {verb}: {reply}", definite=True)
    if code >= 400:
        if passthrough:
            return reply
        raise _Fault(f"backend rejected {verb}: {reply}", definite=True)
    raise _Fault(f"unexpected reply to {verb}: {reply}")


async def _command(
    conn: _Connection,
    verb: str,
    args: Sequence[bytes],
    timeout: float,
    expect: int = 2,
    passthrough: bool = True,
) -> Reply:
    """Send one command and classify its reply; transport failures are _Faults.

    Written straight to aiosmtplib's protocol: the arguments were checked by the relay
    (no control characters) and one transaction owns a connection at a time, so
    ``SMTP.execute_command``'s lock and argument scan are not needed.  As there, a fault
    closes the connection (its replies could no longer be paired with commands) and so
    does a 421.
    """
    smtp = conn.smtp
    try:
        with _transport_faults(verb, timeout):
            protocol = smtp.protocol
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("Server not connected")
            protocol._response_pending = True
            protocol.write(b" ".join(args) + b"\r\n")
            response = await protocol.read_response(timeout=timeout)
    except _Fault:
        smtp.close()
        raise
    if response.code == 421:
        smtp.close()
    return _classify(verb, response, expect, passthrough)


class _transport_faults:
    """``with _transport_faults(verb, timeout):`` turns aiosmtplib's transport errors
    during *verb* into _Faults (for the log).  A class: a generator-based context
    manager costs several times more, and this wraps every backend reply."""

    __slots__ = ("verb", "timeout")

    def __init__(self, verb: str, timeout: float) -> None:
        self.verb = verb
        self.timeout = timeout

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> Literal[False]:
        if exc is None:
            return False
        verb = self.verb
        if isinstance(exc, aiosmtplib.SMTPTimeoutError):
            raise _Fault(f"timeout after {verb} ({self.timeout:g}s)") from None
        if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
            raise _Fault(f"lost connection after {verb}") from None
        if isinstance(exc, aiosmtplib.SMTPResponseException):  # garbled or over-long reply
            raise _Fault(f"bad reply to {verb}: {_printable(exc.message)[:200]!r}") from None
        if isinstance(exc, aiosmtplib.SMTPException | OSError | ValueError):
            raise _Fault(f"{verb}: {exc}") from None
        return False


# -- the relay ---------------------------------------------------------------------------------


class Relay:
    """Pool of backend connections for one relayhost; built from Settings."""

    def __init__(
        self,
        relayhost: Relayhost | None,
        *,
        ehlo_name: str,
        connect_timeout: float = 30.0,
        command_timeout: float = 100.0,
        tls: TLSPolicy | None = None,
        max_idle: int = MAX_IDLE,
        max_age: float = MAX_AGE,
        max_transactions: int = MAX_TRANSACTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.relayhost = relayhost
        self.next_hops: Callable[[str, int], Awaitable[list[tuple[str, int]]]] | None = None
        """MX lookup for an unbracketed relayhost (set by the server; None: A lookup only)."""
        self.ehlo_name = ehlo_name
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.tls = tls or TLSPolicy()
        self.max_idle = max_idle
        self.max_age = max_age
        self.max_transactions = max_transactions
        self.idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        self._closed = False
        self.connections_opened = 0
        """How many backend connections were opened (for tests and statistics)."""

    @classmethod
    def from_settings(cls, settings: Settings, **pool: Any) -> Relay:
        """Build from ``relayhost``, ``smtp_connect_timeout``, ``smtpd_proxy_timeout``,
        ``smtpd_proxy_ehlo`` and ``smtp_tls_*``; *pool* overrides max_idle, max_age,
        max_transactions, idle_timeout. Raises ConfigError for unusable values."""
        try:
            relayhost = parse_relayhost(settings["relayhost"])
        except ValueError as exc:
            raise _config_error(settings, "relayhost", f"{settings['relayhost']}: {exc}") from None
        ehlo = settings["smtpd_proxy_ehlo"].strip()
        if not ehlo or any(c.isspace() for c in ehlo) or _CONTROL.search(ehlo):
            raise _config_error(settings, "smtpd_proxy_ehlo", f"bad EHLO name: {ehlo!r}")
        # An empty relayhost is reported by check (validate_service) and at serve start
        # (Server.probe_relayhost); every transaction then gets 451 (begin()).
        return cls(
            relayhost,
            ehlo_name=ehlo,
            connect_timeout=settings.as_time("smtp_connect_timeout"),
            command_timeout=settings.as_time("smtpd_proxy_timeout"),
            tls=tls_policy_from_settings(settings, relayhost),
            **pool,
        )

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def begin(
        self, client: ClientFacts, sender: str, mail_params: Sequence[str] = ()
    ) -> Transaction:
        """Start a transaction for *sender* (the bare address, "" for the null sender).

        Never raises for backend faults and does no I/O: a transaction that cannot go
        anywhere carries its reply in :attr:`Transaction.reply`.
        """
        transaction = Transaction(self, client, sender, mail_params)
        if self.relayhost is None:
            logger.warning(
                "relayhost is empty: deferring mail from %s[%s] (451 4.3.0)",
                client.name,
                client.addr,
            )
            transaction.reply = R451_PROXY
        elif _arg(sender) is None or any(_arg(p) is None or not p for p in mail_params):
            logger.warning("refusing sender %r %r: control characters", sender, mail_params)
            transaction.reply = R501_BAD_SENDER
        return transaction

    async def close(self) -> None:
        """Close idle pooled connections (QUIT, briefly); later releases close instead."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(conn) for conn in idle))

    # -- pool ------------------------------------------------------------------------------

    async def _quit(self, conn: _Connection) -> None:
        try:
            if conn.alive:
                await asyncio.wait_for(conn.smtp.quit(timeout=QUIT_TIMEOUT), QUIT_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            conn.close()

    def _reusable(self, conn: _Connection) -> bool:
        now = time.monotonic()
        return (
            conn.alive
            and now - conn.created < self.max_age
            and now - conn.last_used < self.idle_timeout
            and conn.transactions < self.max_transactions
        )

    def _take(self) -> _Connection | None:
        """An idle connection that may be reused (not probed yet), or None."""
        while self._idle:
            conn = self._idle.pop()
            if self._reusable(conn):
                return conn
            conn.close()
        return None

    async def acquire(self) -> _Connection:
        """A ready backend connection (EHLO done, no transaction open); raises _Fault."""
        while (conn := self._take()) is not None:
            try:
                await _command(conn, "RSET", [b"RSET"], self.command_timeout, passthrough=False)
            except _Fault as fault:
                logger.info("pooled connection to %s is stale: %s", conn.peer, fault.detail)
                conn.close()
                continue
            return conn
        return await self._connect()

    async def release(self, conn: _Connection, rset: bool) -> None:
        """Give *conn* back after a transaction; RSET first when one may still be open."""
        conn.last_used = time.monotonic()
        if rset and conn.alive:
            try:
                await _command(conn, "RSET", [b"RSET"], self.command_timeout, passthrough=False)
            except _Fault as fault:
                logger.warning("backend %s: %s (connection dropped)", conn.peer, fault.detail)
                conn.close()
                return
        if self._closed or len(self._idle) >= self.max_idle or not self._reusable(conn):
            await self._quit(conn)
            return
        self._idle.append(conn)

    # -- connecting --------------------------------------------------------------------------

    async def _connect(self) -> _Connection:
        """Connect to the relayhost, or to its MX hosts in preference order."""
        relayhost = self.relayhost
        assert relayhost is not None
        if not relayhost.mx_lookup or self.next_hops is None:
            return await self._connect_to(None)
        try:
            hops = await self.next_hops(relayhost.host, relayhost.port)
        except Exception as exc:  # the resolver's DnsLookupError, whatever its kind
            raise _Fault(f"relayhost {relayhost}: {exc}") from None
        last: _Fault | None = None
        for address, port in hops:
            try:
                return await self._connect_to((address, port))
            except _Fault as fault:
                if fault.definite:
                    raise
                logger.warning("%s; trying the next MX host", fault.detail)
                last = fault
        raise last or _Fault(f"relayhost {relayhost}: no address to connect to")

    async def _connect_to(self, hop: tuple[str, int] | None) -> _Connection:
        if self.tls.level != "may":
            return await self._open(use_tls=self.tls.level != "none", hop=hop)
        try:
            return await self._open(use_tls=True, hop=hop)
        except _TLSHandshakeFault as fault:
            logger.warning(
                "%s; retrying in plaintext (smtp_tls_security_level = may)", fault.detail
            )
            return await self._open(use_tls=False, hop=hop)

    async def _open(self, use_tls: bool, hop: tuple[str, int] | None = None) -> _Connection:
        relayhost = self.relayhost
        assert relayhost is not None
        host, port = hop or (relayhost.host, relayhost.port)
        wrapped = use_tls and self.tls.wrappermode
        smtp = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            timeout=self.command_timeout,
            local_hostname=self.ehlo_name,
            start_tls=False,
            use_tls=wrapped,
            tls_context=self.tls.context if wrapped else None,
        )
        try:
            await self._greeting(smtp, relayhost)
            self.connections_opened += 1
            peer = _describe_peer(smtp, relayhost)
            conn = _Connection(smtp, peer, wrapped, frozenset())
            await self._ehlo(conn)
            if use_tls and not wrapped and await self._starttls(conn):
                await self._ehlo(conn)
            if wrapped:
                self._check_tls(conn)
            return conn
        except BaseException:
            smtp.close()
            raise

    async def _greeting(self, smtp: aiosmtplib.SMTP, relayhost: Relayhost) -> None:
        try:
            await smtp.connect(timeout=self.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            reply = reply_from_response(SMTPResponse(exc.code, exc.message))
            raise _Fault(f"backend {relayhost} greeted with: {reply}", definite=True) from None
        except aiosmtplib.SMTPConnectTimeoutError:
            raise _Fault(
                f"timeout connecting to backend {relayhost} ({self.connect_timeout:g}s)"
            ) from None
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            raise _Fault(f"connect to backend {relayhost}: {exc}") from None

    async def _ehlo(self, conn: _Connection) -> None:
        args = [b"EHLO", self.ehlo_name.encode("ascii", "replace")]
        try:
            response = await conn.smtp.execute_command(*args, timeout=self.command_timeout)
        except aiosmtplib.SMTPTimeoutError:
            raise _Fault(f"timeout after EHLO at {conn.peer}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _Fault(f"EHLO at {conn.peer}: {exc}") from None
        _classify(f"EHLO at {conn.peer}", response, 2, passthrough=False)
        conn.smtp.last_ehlo_response = response
        words = conn.smtp.esmtp_extensions.get("xforward", "").upper().split()
        conn.xforward = frozenset(words) & frozenset(XFORWARD_ORDER)
        conn.dsn = "dsn" in conn.smtp.esmtp_extensions

    async def _starttls(self, conn: _Connection) -> bool:
        """STARTTLS per the level; False when ``may`` continues in plaintext."""
        level = self.tls.level
        if not conn.smtp.supports_extension("starttls"):
            if level == "may":
                return False
            raise _Fault(
                f"TLS is required (smtp_tls_security_level = {level}), "
                f"but was not offered by {conn.peer}"
            )
        try:
            await conn.smtp.starttls(
                server_hostname=self.tls.servername,
                tls_context=self.tls.context,
                timeout=self.command_timeout,
            )
        except aiosmtplib.SMTPResponseException as exc:
            detail = f"{conn.peer} refused STARTTLS: {exc.code} {_printable(exc.message)}"
            if level != "may" or exc.code == 421 or not conn.alive:
                raise _Fault(detail) from None
            logger.warning("%s; continuing in plaintext (smtp_tls_security_level = may)", detail)
            return False
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            raise _TLSHandshakeFault(f"TLS handshake with {conn.peer} failed: {exc}") from None
        conn.tls = True
        self._check_tls(conn)
        return True

    def _check_tls(self, conn: _Connection) -> None:
        """Name check for verify/secure (the chain was verified in the handshake); log."""
        assert self.relayhost is not None
        verified = "Anonymous"
        if self.tls.verifies:
            cert = conn.smtp.get_transport_info("peercert") or {}
            if not peer_name_matches(cert, self.tls.match, self.relayhost.host):
                raise _Fault(
                    f"server certificate verification failed for {conn.peer}: "
                    f"name does not match {', '.join(self.tls.match)}"
                )
            verified = "Verified"
        elif self.tls.context is not None:
            verified = "Untrusted"
        if self.tls.loglevel >= 1:
            cipher = conn.smtp.get_transport_info("cipher") or ("?", "?", 0)
            logger.info(
                "%s TLS connection established to %s: %s with cipher %s",
                verified,
                conn.peer,
                cipher[1],
                cipher[0],
            )


def _describe_peer(smtp: aiosmtplib.SMTP, relayhost: Relayhost) -> str:
    try:
        peername = smtp.get_transport_info("peername")
    except aiosmtplib.SMTPException:
        peername = None
    if not peername:
        return f"{relayhost.host}[?]:{relayhost.port}"
    return f"{relayhost.host}[{peername[0]}]:{peername[1]}"


# -- the transaction -------------------------------------------------------------------------


def _rcpt_args(conn: _Connection, address: bytes, params: list[bytes]) -> list[bytes]:
    if not conn.dsn:
        params = _without(params, _DSN_RCPT_PARAMS)
    return [b"RCPT", b"TO:<" + address + b">", *params]


class Transaction:
    """One mail transaction relayed in lock-step; see the module docstring.

    Call :meth:`abort` whenever the client's transaction ends without a completed
    :meth:`data` (it is a harmless no-op after data()).
    """

    def __init__(
        self, relay: Relay, client: ClientFacts, sender: str, mail_params: Sequence[str]
    ) -> None:
        self.relay = relay
        self.client = client
        self.sender = sender
        self.mail_params = tuple(mail_params)
        self.reply: Reply | None = None
        """Set when the transaction is dead: the reply every later command gets."""
        self.outcome_unknown = False
        """True when the backend failed after the final dot was sent (maybe stored)."""
        self.reply_history: list[tuple[str, Reply]] = []
        """(command, reply given to the client) for every relayed step, for logs."""
        self.fault: str | None = None
        """Log detail of the fault that killed the transaction, if one did."""
        self._conn: _Connection | None = None
        self._accepted = 0
        self._finished = False
        self._data_started = False  # DATA written ahead by start_data()
        self._dot_sent = False
        self._peer = ""
        self._tls = False

    @property
    def accepted_recipients(self) -> int:
        return self._accepted

    @property
    def backend_peer(self) -> str:
        """``host[addr]:port`` of the backend connection used (empty before one)."""
        return self._peer

    @property
    def tls(self) -> bool:
        """Whether the backend connection used was TLS-protected."""
        return self._tls

    @property
    def backend_queue_id(self) -> str | None:
        """The queue id in the backend's final reply (``queued as X``), if any."""
        for command, reply in reversed(self.reply_history):
            if command == "END-OF-DATA":
                match = _QUEUE_ID.search(reply.text)
                return match.group(1) if match else None
        return None

    def _record(self, command: str, reply: Reply) -> Reply:
        self.reply_history.append((command, reply))
        return reply

    def _fail(self, command: str, fault: _Fault) -> Reply:
        """Kill the transaction after a backend fault: close, log, 451 from now on."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if self._dot_sent and not fault.definite:
            self.outcome_unknown = True
        self.fault = fault.detail
        logger.warning(
            "%s from %s[%s]: backend %s: %s%s",
            command,
            self.client.name,
            self.client.addr,
            self._peer or self.relay.relayhost,
            fault.detail,
            "; the message may have been delivered (outcome unknown)"
            if self.outcome_unknown
            else "",
        )
        self.reply = R451_PROXY
        return self._record(command, R451_PROXY)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def rcpt(self, recipient: str, params: Sequence[str] = ()) -> Reply:
        """Forward one recipient; returns the reply for the client (see module docstring)."""
        if self._finished:
            return R503_NO_TRANSACTION
        if self.reply is not None:
            return self.reply
        address = _arg(quote_local(recipient))
        options = [_arg(p) for p in params]
        if address is None or any(o is None or not o for o in options):
            logger.warning("refusing recipient %r %r: control characters", recipient, params)
            return R501_BAD_RECIPIENT
        rcpt_params = [o for o in options if o]
        try:
            if self._conn is None:
                opened = await self._open(address, rcpt_params)
                if opened is None:
                    assert self.reply is not None
                    return self.reply
                reply = opened
            else:
                args = _rcpt_args(self._conn, address, rcpt_params)
                reply = await _command(self._conn, "RCPT TO", args, self.relay.command_timeout)
        except _Fault as fault:
            return self._fail("RCPT", fault)
        except BaseException:
            self._drop()
            raise
        if reply.is_success:
            self._accepted += 1
        return self._record("RCPT", reply)

    async def _open(self, address: bytes, rcpt_params: list[bytes]) -> Reply | None:
        """Connection, XFORWARD, MAIL FROM and the first RCPT TO: the reply to the RCPT,
        or None (and self.reply) when MAIL was refused.

        A backend that offers PIPELINING gets the probe of a pooled connection (RSET),
        XFORWARD, MAIL and the RCPT in one write (RFC 2920; one round trip instead of
        two); the replies are read and judged one by one, as in lock-step. After a
        refused MAIL the RCPT's reply (a 503) is read and dropped, so that the connection
        stays in step. A pooled connection whose RSET fails is replaced silently.
        """
        relay = self.relay
        timeout = relay.command_timeout
        while True:
            conn = relay._take()
            pooled = conn is not None
            if conn is None:
                conn = await relay._connect()
            self._conn = conn
            self._peer = conn.peer
            self._tls = conn.tls
            if not conn.smtp.supports_extension("pipelining"):
                if pooled:
                    try:
                        await _command(conn, "RSET", [b"RSET"], timeout, passthrough=False)
                    except _Fault as fault:
                        logger.info("pooled connection to %s is stale: %s", conn.peer, fault.detail)
                        self._drop()
                        continue
                return await self._open_lockstep(conn, address, rcpt_params)
            xforward = [line.encode("ascii").split(b" ") for line in self._xforward(conn)]
            mail = self._mail_args(conn)
            rcpt = _rcpt_args(conn, address, rcpt_params)
            group = [*([[b"RSET"]] if pooled else []), *xforward, mail, rcpt]
            _send_group(conn, group)
            try:
                if pooled:
                    try:
                        await _group_reply(conn, "RSET", timeout, passthrough=False)
                    except _Fault as fault:
                        logger.info("pooled connection to %s is stale: %s", conn.peer, fault.detail)
                        self._drop()
                        continue
                for _ in xforward:
                    await _group_reply(conn, "XFORWARD", timeout, passthrough=False)
                reply = await _group_reply(conn, "MAIL FROM", timeout)
                if self._mail_done(conn, reply):
                    return await _group_reply(conn, "RCPT TO", timeout)
                # MAIL refused (self.reply is the client's answer): the RCPT got a 503.
                try:
                    await _group_reply(conn, "RCPT TO", timeout)
                except _Fault:
                    conn.close()  # out of step: not for the pool
            finally:
                _end_group(conn)
            if conn.alive:
                await relay.release(conn, rset=False)
            return None

    def _xforward(self, conn: _Connection) -> list[str]:
        return xforward_commands(self.client, conn.xforward)

    def _mail_args(self, conn: _Connection) -> list[bytes]:
        sender = _arg(quote_local(self.sender)) if self.sender else b""
        assert sender is not None  # checked in begin()
        params = [p.encode("utf-8", "surrogateescape") for p in self.mail_params]
        if not conn.dsn:
            params = _without(params, _DSN_MAIL_PARAMS)
        return [b"MAIL", b"FROM:<" + sender + b">", *params]

    def _mail_done(self, conn: _Connection, reply: Reply) -> bool:
        """Record the reply to MAIL; False (self.reply set, self._conn cleared) if refused."""
        self._record("MAIL", reply)
        conn.transactions += 1
        if reply.is_success:
            return True
        logger.warning(
            "backend %s rejected MAIL FROM:<%s> from %s[%s]: %s",
            conn.peer,
            self.sender,
            self.client.name,
            self.client.addr,
            reply,
        )
        self.reply = reply
        self._conn = None
        return False

    async def _open_lockstep(
        self, conn: _Connection, address: bytes, rcpt_params: list[bytes]
    ) -> Reply | None:
        """XFORWARD, MAIL, RCPT one at a time, for a backend without PIPELINING."""
        timeout = self.relay.command_timeout
        for line in self._xforward(conn):
            await _command(
                conn, "XFORWARD", line.encode("ascii").split(b" "), timeout, passthrough=False
            )
        reply = await _command(conn, "MAIL FROM", self._mail_args(conn), timeout)
        if not self._mail_done(conn, reply):
            await self.relay.release(conn, rset=False)
            return None
        args = _rcpt_args(conn, address, rcpt_params)
        return await _command(conn, "RCPT TO", args, timeout)

    def start_data(self) -> None:
        """Send DATA now, while the client sends the content: its reply is read by
        :meth:`data`, so the backend's 354 costs no round trip once the client's dot
        is in (Postfix's before-queue proxy forwards DATA when the client says it too).

        A transaction that ends without :meth:`data` after this closes the backend
        connection (a backend in DATA mode takes no RSET), so nothing is delivered.
        """
        conn = self._conn
        if self._finished or self.reply is not None or conn is None or self._accepted == 0:
            return
        if self._data_started:
            return
        try:
            _send_group(conn, [[b"DATA"]])
        except _Fault:
            return  # data() finds the connection dead and answers 451
        self._data_started = True

    async def data(self, message: bytes, plain: bool = False) -> Reply:
        """Send DATA, the framed content and the dot; the backend's reply to the dot.

        ``plain``: the caller checked :func:`plain_content` (no framing work to do).
        """
        if self._finished:
            return R503_NO_TRANSACTION
        self._finished = True
        if self.reply is not None:
            return self.reply
        conn = self._conn
        if conn is None or self._accepted == 0:
            await self._give_back(rset=True)
            return R554_NO_RECIPIENTS
        try:
            if self._data_started:
                try:
                    start = await _group_reply(conn, "DATA", self.relay.command_timeout, 3)
                finally:
                    _end_group(conn)
            else:
                timeout = self.relay.command_timeout
                start = await _command(conn, "DATA", [b"DATA"], timeout, expect=3)
            if not start.is_success:
                await self._give_back(rset=True)
                return self._record("DATA", start)
            await self._send_content(conn, frame_data(message, plain))
            reply = await self._end_of_data(conn)
        except _Fault as fault:
            return self._fail("END-OF-DATA" if self._dot_sent else "DATA", fault)
        except BaseException:
            if self._dot_sent:
                self.outcome_unknown = True
            self._drop()
            raise
        await self._give_back(rset=False)
        return self._record("END-OF-DATA", reply)

    async def _send_content(self, conn: _Connection, payload: bytes) -> None:
        """Write the content with flow control (each wait bounded); the dot goes with the
        last chunk (a small message is one write)."""
        timeout = self.relay.command_timeout
        protocol = conn.smtp.protocol
        view = memoryview(payload)
        size = len(payload)
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            for offset in range(0, size, CONTENT_CHUNK):
                if offset + CONTENT_CHUNK >= size:
                    self._dot_sent = True  # this write ends with the dot
                protocol.write(view[offset : offset + CONTENT_CHUNK])  # type: ignore[arg-type]
                if protocol._paused or protocol._connection_lost:  # else nothing to wait for
                    await asyncio.wait_for(protocol._drain_helper(), timeout)
        except TimeoutError:
            raise _Fault(f"timeout sending message content ({timeout:g}s)") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _Fault(f"lost connection sending message content: {exc}") from None

    async def _end_of_data(self, conn: _Connection) -> Reply:
        timeout = self.relay.command_timeout
        protocol = conn.smtp.protocol
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            response = await protocol.read_response(timeout=timeout)
        except aiosmtplib.SMTPTimeoutError:
            raise _Fault(f"timeout after end of data ({timeout:g}s)") from None
        except aiosmtplib.SMTPServerDisconnected:
            raise _Fault("lost connection after end of data") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _Fault(f"bad reply to end of data: {_printable(exc.message)[:200]!r}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _Fault(f"end of data: {exc}") from None
        if response.code == 421:
            conn.close()
        return _classify("end of data", response, 2, passthrough=True)

    async def _give_back(self, rset: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self.relay.release(conn, rset=rset)

    async def abort(self) -> None:
        """End without the dot: RSET the backend and pool the connection, or close it
        (always after :meth:`start_data`)."""
        if self._finished:
            return
        self._finished = True
        if self._data_started:
            self._drop()  # the backend may be waiting for content: only a close is safe
            return
        try:
            await self._give_back(rset=True)
        except BaseException:
            self._drop()
            raise
