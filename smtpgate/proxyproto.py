"""The PROXY protocol (HAProxy's, versions 1 and 2) as Postfix reads it: bytes in, values out.

A load balancer in front of smtpgate opens its own TCP connection and writes a PROXY
header first, naming the real client (and the address the client connected to); behind
it the SMTP session starts as usual.  Postfix reads it with ``smtpd_upstream_proxy_protocol
= haproxy`` (``global/haproxy_srvr.c``); this module is that reader and the matching writer,
without I/O:

* :func:`parse` takes the bytes received so far and returns a :class:`ProxyHeader`
  (with how many bytes it took), ``None`` while the bytes are the start of a header
  that is still arriving, or raises :class:`ProxyHeaderError` with Postfix's reason
  (``bad or missing client address``, ``short protocol header``, ...) and the bytes
  escaped as Postfix logs them.  Like Postfix it looks at most ``HEADER_MAX`` (536) bytes,
  accepts ``TCP4``/``TCP6`` (v1) and ``PROXY`` over TCP/IPv4 or TCP/IPv6 and ``LOCAL``
  (v2), skips v2 TLVs, and refuses v1 ``UNKNOWN`` and v2 ``UNSPEC``/``UNIX`` (a header
  without an address would sidestep every address-based restriction).  Addresses come
  out in canonical form, an IPv4-mapped IPv6 address as IPv4.
* v2 ``LOCAL`` is the balancer speaking for itself (HAProxy's health checks): the header
  carries no client, :attr:`ProxyHeader.local` is set, and the connection's own peer is
  the client.
* :func:`encode` writes a v1 or v2 header for a client, for a backend that reads PROXY.

Why not ``aiosmtpd.proxy_protocol``: its public API is an async reader over a stream
(smtpgate's listener is an ``asyncio.Protocol``, and Postfix must not read past the
header), it accepts v1 ``UNKNOWN`` and v2 ``UNSPEC`` headers that Postfix refuses, its
errors are not Postfix's log text, and the core layers do not import aiosmtpd.  The
tests use it as an independent reader of what :func:`encode` writes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from smtpgate.errors import SmtpgateError

HEADER_MAX = 536
"""Postfix's HAPROXY_HEADER_MAX_LEN: the bytes it looks at for a header."""
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LEN = 16
_V2_LOCAL, _V2_PROXY = 0x00, 0x01
_V2_TCP4, _V2_TCP6 = 0x11, 0x21
_V2_ADDR_LEN = {_V2_TCP4: 12, _V2_TCP6: 36}

Endpoint = tuple[str, int]
"""(address, port)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A PROXY header read from the start of a connection."""

    version: int
    """1 or 2."""
    length: int
    """How many bytes the header took (the SMTP session starts after them)."""
    client: Endpoint | None = None
    """The real client; None for a v2 LOCAL header."""
    server: Endpoint | None = None
    """The address and port the client connected to (the balancer's front end)."""

    @property
    def local(self) -> bool:
        """v2 LOCAL: the balancer's own connection (a health check), not a client's."""
        return self.client is None


class ProxyHeaderError(SmtpgateError):
    """A PROXY header that cannot be used; ``str()`` is Postfix's log text without
    its ``haproxy read:`` prefix: ``reason: escaped bytes``."""

    def __init__(self, reason: str, data: bytes = b"") -> None:
        self.reason = reason
        self.data = data
        super().__init__(f"{reason}: {escape(data)}" if data else reason)


def parse(data: bytes | bytearray, *, eof: bool = False) -> ProxyHeader | None:
    """The header at the start of *data*; None when more bytes must come first.

    *eof*: nothing more will come (the client closed, or the time is up), so what is
    there is judged as it is.  Raises :class:`ProxyHeaderError` for a bad header.
    """
    data = bytes(data[:HEADER_MAX])
    if not data:
        if eof:
            raise ProxyHeaderError("EOF")
        return None
    if not eof and len(data) < HEADER_MAX and _incomplete(data):
        return None
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    return _parse_v2(data)


def _incomplete(data: bytes) -> bool:
    """Whether *data* is the start of a header that is still arriving (a complete
    header, or bytes that cannot start one, are judged now)."""
    if data.startswith(V1_PREFIX):
        return b"\n" not in data
    if len(data) < len(V1_PREFIX) and V1_PREFIX.startswith(data):
        return True
    if len(data) < len(V2_SIGNATURE):
        return V2_SIGNATURE.startswith(data)
    if not data.startswith(V2_SIGNATURE):
        return False
    if len(data) < V2_HEADER_LEN:
        return True
    size: int = struct.unpack_from("!H", data, 14)[0]
    return len(data) < V2_HEADER_LEN + size


def _parse_v1(data: bytes) -> ProxyHeader:
    line, newline, _ = data.partition(b"\n")
    if not newline:
        raise ProxyHeaderError("missing protocol header terminator", data)
    # Postfix copies the line as a C string (it ends at a NUL) and splits it at spaces
    # and carriage returns.
    text = line.split(b"\x00", 1)[0].decode("latin-1")
    tokens = text.replace("\r", " ").split()
    tokens += [""] * (6 - len(tokens))
    if tokens[0] != "PROXY":
        raise ProxyHeaderError("bad or missing protocol header", data)
    family = {"TCP4": 4, "TCP6": 6}.get(tokens[1].upper())
    if family is None:
        raise ProxyHeaderError("bad or missing protocol type", data)
    client = _v1_address(tokens[2], family)
    if client is None:
        raise ProxyHeaderError("bad or missing client address", data)
    server = _v1_address(tokens[3], family)
    if server is None:
        raise ProxyHeaderError("bad or missing server address", data)
    client_port = _v1_port(tokens[4])
    if client_port is None:
        raise ProxyHeaderError("bad or missing client port", data)
    server_port = _v1_port(tokens[5])
    if server_port is None:
        raise ProxyHeaderError("bad or missing server port", data)
    return ProxyHeader(1, len(line) + 1, (client, client_port), (server, server_port))


def _v1_address(text: str, family: int) -> str | None:
    """Postfix's valid_ipv4_hostaddr/valid_ipv6_hostaddr, then the canonical form."""
    if not text or len(text) >= 46:  # INET6_ADDRSTRLEN
        return None
    if family == 4:
        octets = text.split(".")
        if len(octets) != 4 or not all(o.isdigit() and o.isascii() for o in octets):
            return None
        values = [int(o) for o in octets]
        if max(values) > 255 or (values[0] == 0 and any(values[1:])):
            return None  # Postfix allows 0.0.0.0 but not 0.1.2.3
        return ".".join(str(v) for v in values)
    if "%" in text or not text.isascii():
        return None
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return _canonical(address)


def _v1_port(text: str) -> int | None:
    """Postfix's valid_hostport: digits, no leading zero, at most 65535."""
    if not text or not (text.isdigit() and text.isascii()) or len(text) > 5:
        return None
    if text[0] == "0" and len(text) > 1:
        return None
    port = int(text)
    return port if port <= 65535 else None


def _parse_v2(data: bytes) -> ProxyHeader:
    if len(data) < V2_HEADER_LEN:
        raise ProxyHeaderError("short protocol header", data)
    if not data.startswith(V2_SIGNATURE):
        raise ProxyHeaderError("unrecognized protocol header", data)
    ver_cmd, family, size = struct.unpack_from("!BBH", data, 12)
    if ver_cmd & 0xF0 != 0x20:
        raise ProxyHeaderError("unrecognized protocol version", data)
    if len(data) < V2_HEADER_LEN + size:
        raise ProxyHeaderError("short version 2 protocol header", data)
    length = V2_HEADER_LEN + size  # TLVs after the addresses are skipped
    command = ver_cmd & 0x0F
    if command == _V2_LOCAL:
        return ProxyHeader(2, length)
    if command != _V2_PROXY:
        raise ProxyHeaderError("bad command in proxy header", data)
    if family not in _V2_ADDR_LEN:
        raise ProxyHeaderError("unsupported network protocol", data)
    if size < _V2_ADDR_LEN[family]:
        raise ProxyHeaderError("short address field", data)
    body = data[V2_HEADER_LEN:]
    width = 4 if family == _V2_TCP4 else 16
    src = _canonical(ipaddress.ip_address(body[:width]))
    dst = _canonical(ipaddress.ip_address(body[width : 2 * width]))
    src_port, dst_port = struct.unpack_from("!HH", body, 2 * width)
    return ProxyHeader(2, length, (src, src_port), (dst, dst_port))


def _canonical(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def escape(data: bytes) -> str:
    """Postfix's escape(): printable ASCII as is (a backslash doubled), C escapes for
    \\a \\b \\f \\n \\r \\t \\v, three-digit octal for every other byte."""
    out = []
    for byte in data:
        if 0x20 <= byte < 0x7F:
            out.append("\\\\" if byte == 0x5C else chr(byte))
        else:
            out.append(_ESCAPES.get(byte) or f"\\{byte:03o}")
    return "".join(out)


_ESCAPES = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v"}


# -- writing -----------------------------------------------------------------------------


def encode(version: int, client: Endpoint | None, server: Endpoint | None) -> bytes:
    """A PROXY header (*version* 1 or 2) for *client* connected to *server*.

    Without a usable client or server address (``unknown``) the header says so -- v1
    ``UNKNOWN``, v2 ``PROXY`` with family ``UNSPEC`` -- which a reader such as Postfix
    refuses: a backend must never take such a client for the sender of the header (a
    v2 ``LOCAL`` would make it the front end itself, which backends often trust).  When
    one address is IPv4 and the other IPv6, the IPv4 one is written IPv4-mapped.
    """
    endpoints = _endpoints(client, server)
    if version == 1:
        if endpoints is None:
            return b"PROXY UNKNOWN\r\n"
        (src, sport), (dst, dport) = endpoints
        proto = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode("ascii")
    if version != 2:
        raise ValueError(f"PROXY protocol version {version}: use 1 or 2")
    if endpoints is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _V2_PROXY, 0x00, 0)
    (src, sport), (dst, dport) = endpoints
    family = _V2_TCP4 if src.version == 4 else _V2_TCP6
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _V2_PROXY, family, len(body)) + body


def encode_local() -> bytes:
    """A v2 LOCAL header (the sender's own connection, as HAProxy's health checks)."""
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _V2_LOCAL, 0x00, 0)


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _endpoints(
    client: Endpoint | None, server: Endpoint | None
) -> tuple[tuple[_Address, int], tuple[_Address, int]] | None:
    if client is None or server is None:
        return None
    try:
        src = ipaddress.ip_address(client[0])
        dst = ipaddress.ip_address(server[0])
    except ValueError:
        return None
    if not (0 <= client[1] <= 65535 and 0 <= server[1] <= 65535):
        return None
    if src.version != dst.version:
        if src.version == 4:
            src = ipaddress.IPv6Address(f"::ffff:{src}")
        else:
            dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    return (src, client[1]), (dst, server[1])
