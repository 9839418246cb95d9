"""A fast, minimal authoritative DNS server (UDP) for the zombie-load row's block lists.

The tests' FakeDns (tests/dns/dnsserver.py) starts a thread per query and parses every
message with dnspython: fine for tests, but at thousands of queries per second on a
2-core machine it would take a core from the servers under test. This one answers from a
dict with hand-built wire messages on one (uvloop) event loop:

* a name with records: its A records for an A query, NOERROR and no answer (NODATA) for
  any other type;
* any other name: NXDOMAIN with an SOA (the negative TTL) in the authority section.

Usage: ``python -m bench.dnsbl --listen 127.53.0.1:53 --records FILE`` where FILE is JSON
``{"name": ["127.0.0.2", ...], ...}``; it prints ``ready`` once it listens and serves until
SIGTERM; it counts queries and prints the count on stderr at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import struct
import sys
from collections.abc import Sequence

TTL = 300
NEGATIVE_TTL = 60


def _name_end(wire: bytes, pos: int) -> int:
    """The offset just past the (uncompressed) name starting at ``pos``."""
    while True:
        n = wire[pos]
        if n == 0:
            return pos + 1
        pos += n + 1


def _soa(zone: bytes) -> bytes:
    """An SOA record for the authority section: the owner is the question (pointer)."""
    rdata = b"\x02ns\x00\x0ahostmaster\x00" + struct.pack(
        "!IIIII", 1, 3600, 600, 86400, NEGATIVE_TTL
    )
    return b"\xc0\x0c" + struct.pack("!HHIH", 6, 1, NEGATIVE_TTL, len(rdata)) + rdata


class Server(asyncio.DatagramProtocol):
    def __init__(self, records: dict[str, list[str]]) -> None:
        self.answers: dict[bytes, bytes] = {}
        for name, addrs in records.items():
            rrs = b"".join(
                b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, TTL, 4) + socket.inet_aton(a)
                for a in addrs
            )
            self.answers[name.lower().rstrip(".").encode()] = struct.pack("!H", len(addrs)) + rrs
        self.soa = _soa(b"")
        self.queries = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries += 1
        try:
            end = _name_end(data, 12)
            qtype = struct.unpack_from("!H", data, end)[0]
            labels = []
            pos = 12
            while data[pos]:
                labels.append(data[pos + 1 : pos + 1 + data[pos]])
                pos += data[pos] + 1
        except (IndexError, struct.error):
            return
        question = data[12 : end + 4]
        rd = data[2] & 0x01
        name = b".".join(labels).lower()
        found = self.answers.get(name)
        if found is None:  # NXDOMAIN, authoritative, the SOA for negative caching
            head = data[:2] + bytes([0x84 | rd, 0x03]) + b"\x00\x01\x00\x00\x00\x01\x00\x00"
            reply = head + question + self.soa
        elif qtype == 1:
            head = (
                data[:2] + bytes([0x84 | rd, 0x00]) + b"\x00\x01" + found[:2] + b"\x00\x00\x00\x00"
            )
            reply = head + question + found[2:]
        else:  # NODATA
            head = data[:2] + bytes([0x84 | rd, 0x00]) + b"\x00\x01\x00\x00\x00\x01\x00\x00"
            reply = head + question + self.soa
        assert self.transport is not None
        self.transport.sendto(reply, addr)


async def serve(host: str, port: int, records: dict[str, list[str]]) -> None:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: Server(records), local_addr=(host, port)
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    transport.close()
    print(f"queries {server.queries}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.dnsbl")
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--records", required=True, metavar="FILE")
    args = ap.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    with open(args.records) as f:
        records = json.load(f)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(serve(host, int(port), records))


if __name__ == "__main__":
    main()
