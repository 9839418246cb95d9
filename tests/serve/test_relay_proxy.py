"""smtpgate_backend_proxy_protocol in the relay: the header, before anything else, on a
connection of its own per transaction (real sockets; the backend here is a minimal SMTP
server that reads the header with smtpgate's parser and records it).

tests/serve/test_proxy_postfix.py does the same against a real Postfix that expects it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest

from smtpgate.config.relayconf import RelayConfig, Relayhost, TLSConfig
from smtpgate.facts import ClientFacts
from smtpgate.proxyproto import ProxyHeader, parse
from smtpgate.relay import Relay
from tests.serve.certs import test_pki

CLIENT = ClientFacts(
    "mail.example.net",
    "203.0.113.7",
    40123,
    "ESMTP",
    "mail.example.net",
    server=("198.51.100.25", 25),
)
OTHER = replace(CLIENT, addr="203.0.113.8", port=40124)


class ProxyReadingBackend:
    """Reads a PROXY header, then accepts any mail."""

    def __init__(self) -> None:
        self.headers: list[ProxyHeader] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = b""
            while (header := parse(data)) is None:
                data += await reader.read(1)  # byte by byte: never past the header
            self.headers.append(header)
            writer.write(b"220 backend.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-backend.test\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    while (await reader.readline()) != b".\r\n":
                        pass
                    writer.write(b"250 2.0.0 Ok: queued as BACKEND1\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        finally:
            writer.close()


@asynccontextmanager
async def proxy_backend() -> AsyncIterator[ProxyReadingBackend]:
    backend = ProxyReadingBackend()
    server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
    backend.port = server.sockets[0].getsockname()[1]
    try:
        yield backend
    finally:
        server.close()


async def relay_one(relay: Relay, client: ClientFacts) -> str:
    txn = await relay.begin(client, "friend@example.net", [])
    reply = await txn.rcpt("foo@bar.org")
    assert reply.code == 250, reply
    txn.start_data()
    final = await txn.data(b"Subject: hi\r\n\r\nhi\r\n")
    return str(final)


@pytest.mark.parametrize("version", [1, 2])
async def test_each_transaction_gets_its_own_connection_and_header(version: int) -> None:
    async with proxy_backend() as backend:
        config = RelayConfig(
            relayhost=Relayhost("127.0.0.1", backend.port, mx_lookup=False),
            ehlo_name="mx.example.org",
            proxy_protocol=version,
        )
        relay = Relay(config)
        try:
            for client in (CLIENT, OTHER, CLIENT):
                assert "queued as BACKEND1" in await relay_one(relay, client)
            assert relay.idle_connections == 0  # nothing is kept for another client
            assert relay.connections_opened == 3
        finally:
            await relay.close()
    assert [(h.version, h.client, h.server) for h in backend.headers] == [
        (version, ("203.0.113.7", 40123), ("198.51.100.25", 25)),
        (version, ("203.0.113.8", 40124), ("198.51.100.25", 25)),
        (version, ("203.0.113.7", 40123), ("198.51.100.25", 25)),
    ]


def wrapped_backend(listener: socket.socket, tls: ssl.SSLContext, seen: list[ProxyHeader]) -> None:
    """One session, blocking, in a thread: the header read byte by byte (the ClientHello
    right behind it must stay in the kernel for the handshake), then TLS, then SMTP."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        data = b""
        while (header := parse(data)) is None:
            data += conn.recv(1)
        seen.append(header)
        with tls.wrap_socket(conn, server_side=True) as wrapped, wrapped.makefile("rwb") as f:
            f.write(b"220 backend.test ESMTP\r\n")
            f.flush()
            while line := f.readline():
                verb = line[:4].upper()
                if verb == b"DATA":
                    f.write(b"354 go ahead\r\n")
                    f.flush()
                    while f.readline() not in (b".\r\n", b""):
                        pass
                    f.write(b"250 2.0.0 Ok: queued as BACKEND1\r\n")
                elif verb == b"QUIT":
                    f.write(b"221 2.0.0 Bye\r\n")
                    f.flush()
                    break
                else:
                    f.write(b"250 2.0.0 Ok\r\n")
                f.flush()


async def test_in_wrapper_mode_the_header_comes_before_the_handshake() -> None:
    pki = test_pki()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki.server_cert, pki.server_key)
    seen: list[ProxyHeader] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=wrapped_backend, args=(listener, server_tls, seen))
        thread.start()
        config = RelayConfig(
            relayhost=Relayhost("127.0.0.1", listener.getsockname()[1], mx_lookup=False),
            ehlo_name="mx.example.org",
            proxy_protocol=2,
            tls=TLSConfig(level="encrypt", wrappermode=True),
        )
        relay = Relay.from_config(config)
        try:
            assert "queued as BACKEND1" in await relay_one(relay, CLIENT)
        finally:
            await relay.close()
            await asyncio.to_thread(thread.join, 10)
    assert [h.client for h in seen] == [("203.0.113.7", 40123)]
