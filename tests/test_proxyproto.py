"""The PROXY header reader and writer (smtpgate.proxyproto): Postfix's rules, as data.

The expected reasons are Postfix's (global/haproxy_srvr.c); what the writer produces is
read back by aiosmtpd's independent parser as well as by ours.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from aiosmtpd.proxy_protocol import get_proxy

from smtpgate.proxyproto import (
    HEADER_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    encode,
    encode_local,
    escape,
    parse,
)


def v2(command: int, family: int, body: bytes, version: int = 2) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", (version << 4) | command, family, len(body)) + body


V2_TCP4 = v2(1, 0x11, bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack("!HH", 40001, 25))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25\r\nEHLO x\r\n",
            ProxyHeader(1, 44, ("192.0.2.7", 40001), ("198.51.100.1", 25)),
        ),
        (  # Postfix splits at spaces and carriage returns; a bare LF ends the line
            b"PROXY  tcp4 192.0.2.7  198.51.100.1 40001 25 extra\n",
            ProxyHeader(1, 51, ("192.0.2.7", 40001), ("198.51.100.1", 25)),
        ),
        (
            b"PROXY TCP6 2001:DB8:0:0::1 ::ffff:198.51.100.1 65535 0\r\n",
            ProxyHeader(1, 56, ("2001:db8::1", 65535), ("198.51.100.1", 0)),
        ),
        (V2_TCP4 + b"EHLO", ProxyHeader(2, 28, ("192.0.2.7", 40001), ("198.51.100.1", 25))),
        (
            v2(
                1,
                0x21,
                bytes(15) + b"\x01" + bytes(10) + b"\xff\xff\x0a\x00\x00\x01" + b"\x9c\x41\x00\x19",
            ),
            ProxyHeader(2, 52, ("::1", 40001), ("10.0.0.1", 25)),
        ),
        (  # TLVs after the addresses are skipped
            v2(1, 0x11, V2_TCP4[16:] + b"\x04\x00\x02ab"),
            ProxyHeader(2, 33, ("192.0.2.7", 40001), ("198.51.100.1", 25)),
        ),
        (v2(0, 0x00, b""), ProxyHeader(2, 16)),  # LOCAL: the balancer itself
        (v2(0, 0x11, V2_TCP4[16:]), ProxyHeader(2, 28)),  # LOCAL ignores the addresses
    ],
)
def test_headers_that_are_read(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == expected
    assert parse(data, eof=True) == expected


def test_a_local_header_has_no_client() -> None:
    header = parse(encode_local())
    assert header is not None and header.local and header.client is None
    assert parse(V2_TCP4) is not None and not parse(V2_TCP4).local  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25", "missing protocol header terminator"),
        (b"PROXY UNKNOWN\r\n", "bad or missing protocol type"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "bad or missing protocol type"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad or missing client address"),
        (b"PROXY TCP4 0.1.2.3 5.6.7.8 1 2\r\n", "bad or missing client address"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad or missing client address"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad or missing client address"),
        (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "bad or missing server address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad or missing client address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n", "bad or missing client port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad or missing client port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad or missing server port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "bad or missing server port"),
        (b"EHLO client.example\r\n", "unrecognized protocol header"),
        (b"EHLO x\r\n", "short protocol header"),
        (b"GET / HTTP/1.0\r\n\r\n", "unrecognized protocol header"),
        (v2(1, 0x11, V2_TCP4[16:], version=1), "unrecognized protocol version"),
        (v2(2, 0x11, V2_TCP4[16:]), "bad command in proxy header"),
        (v2(1, 0x00, b""), "unsupported network protocol"),
        (v2(1, 0x31, bytes(216)), "unsupported network protocol"),
        (v2(1, 0x12, V2_TCP4[16:]), "unsupported network protocol"),  # UDP
        (v2(1, 0x11, V2_TCP4[16:27]), "short address field"),
        (v2(1, 0x21, bytes(35)), "short address field"),
    ],
)
def test_headers_that_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError) as info:
        parse(data, eof=True)
    assert info.value.reason == reason
    assert str(info.value) == f"{reason}: {escape(data)}"


def test_a_header_arrives_in_pieces() -> None:
    for whole in (b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25\r\n", V2_TCP4):
        for cut in range(1, len(whole)):
            assert parse(whole[:cut]) is None, cut
        assert parse(whole) is not None


def test_what_cannot_be_a_header_is_judged_at_once() -> None:
    with pytest.raises(ProxyHeaderError, match="^short protocol header: HELO"):
        parse(b"HELO")
    with pytest.raises(ProxyHeaderError, match="^short protocol header: PROX\\\\r"):
        parse(b"PROX\r")


def test_end_of_input_judges_what_came() -> None:
    with pytest.raises(ProxyHeaderError) as info:
        parse(b"", eof=True)
    assert str(info.value) == "EOF"
    assert parse(b"") is None
    with pytest.raises(ProxyHeaderError, match="^short version 2 protocol header"):
        parse(V2_TCP4[:20], eof=True)
    with pytest.raises(ProxyHeaderError, match="^short protocol header"):
        parse(V2_TCP4[:10], eof=True)


def test_postfix_looks_at_536_bytes_at_most() -> None:
    line = b"PROXY TCP4 " + b"1" * 600
    with pytest.raises(ProxyHeaderError) as info:
        parse(line)  # no end of line within 536 bytes: no need to wait for more
    assert info.value.reason == "missing protocol header terminator"
    assert len(info.value.data) == HEADER_MAX
    big = v2(1, 0x11, V2_TCP4[16:] + bytes(600))
    assert parse(big[:400]) is None
    with pytest.raises(ProxyHeaderError, match="^short version 2 protocol header"):
        parse(big)


def test_escape_is_postfixs() -> None:
    assert escape(b"a\\b\r\n\t\x00\x7f\xff ~") == "a\\\\b\\r\\n\\t\\000\\177\\377 ~"
    assert escape(V2_SIGNATURE) == "\\r\\n\\r\\n\\000\\r\\nQUIT\\n"


@pytest.mark.parametrize(
    ("client", "server", "v1"),
    [
        (("192.0.2.7", 40001), ("198.51.100.1", 25), "PROXY TCP4 192.0.2.7 198.51.100.1 40001 25"),
        (("2001:db8::7", 1), ("2001:db8::25", 25), "PROXY TCP6 2001:db8::7 2001:db8::25 1 25"),
        (("192.0.2.7", 1), ("2001:db8::25", 25), "PROXY TCP6 ::ffff:c000:207 2001:db8::25 1 25"),
    ],
)
def test_what_is_written_reads_back(
    client: tuple[str, int], server: tuple[str, int], v1: str
) -> None:
    assert encode(1, client, server) == v1.encode() + b"\r\n"
    for version in (1, 2):
        data = encode(version, client, server)
        header = parse(data + b"EHLO x\r\n")
        assert header == ProxyHeader(version, len(data), client, server)
        proxy = asyncio.run(_aiosmtpd_reads(data + b"EHLO x\r\n"))
        assert proxy.valid, proxy.error
        src = getattr(proxy.src_addr, "ipv4_mapped", None) or proxy.src_addr
        dst = getattr(proxy.dst_addr, "ipv4_mapped", None) or proxy.dst_addr
        assert ((str(src), proxy.src_port), (str(dst), proxy.dst_port)) == (client, server)


async def _aiosmtpd_reads(data: bytes):  # type: ignore[no-untyped-def]
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await get_proxy(reader)


@pytest.mark.parametrize(
    ("client", "server"),
    [(None, None), (("unknown", 0), ("192.0.2.1", 25)), (("192.0.2.7", 1), None)],
)
def test_an_unknown_client_is_written_so_that_it_is_refused(
    client: tuple[str, int] | None, server: tuple[str, int] | None
) -> None:
    assert encode(1, client, server) == b"PROXY UNKNOWN\r\n"
    with pytest.raises(ProxyHeaderError, match="bad or missing protocol type"):
        parse(encode(1, client, server))
    with pytest.raises(ProxyHeaderError, match="unsupported network protocol"):
        parse(encode(2, client, server))


def test_only_versions_1_and_2() -> None:
    with pytest.raises(ValueError, match="version 3"):
        encode(3, ("192.0.2.7", 1), ("192.0.2.1", 25))
