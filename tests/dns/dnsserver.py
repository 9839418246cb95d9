"""A small authoritative DNS server on 127.0.0.1 for the tests, built on dnspython.

It answers UDP and TCP on the same port (port 0: the kernel picks one) from records the
test writes, and can misbehave on purpose:

- ``servfail`` / ``refused``: names answered with that RCODE;
- ``drop``: names never answered (the client times out); ``drop_all`` for an outage;
- names that exist without the asked type answer NODATA, unknown names NXDOMAIN, both
  with an SOA whose MINIMUM (``negative_ttl``) is the negative-caching TTL;
- CNAMEs are followed within the data; a UDP answer too big for the client is sent
  truncated (TC) so that the client retries over TCP.

Every query is recorded in ``queries`` as ``(name, type, transport)``.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections import defaultdict

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

SOA = "ns.test. hostmaster.test. 1 3600 600 86400 {minimum}"


class FakeDns:
    """Records and misbehaviours; ``start()`` serves them until ``stop()``."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.ttls: dict[tuple[str, str], int] = {}
        self.ttl = 300
        self.negative_ttl = 60
        self.servfail: set[str] = set()
        self.refused: set[str] = set()
        self.drop: set[str] = set()
        self.drop_all = False
        self.delay = 0.0
        self.queries: list[tuple[str, str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self.host = "127.0.0.1"
        self.port = 0
        self._servers: list[socketserver.BaseServer] = []

    # -- data ------------------------------------------------------------------------

    def add(self, name: str, rdtype: str, *values: str, ttl: int | None = None) -> None:
        key = (name.lower().rstrip("."), rdtype.upper())
        self.records[key].extend(values)
        if ttl is not None:
            self.ttls[key] = ttl

    def remove(self, name: str, rdtype: str | None = None) -> None:
        low = name.lower().rstrip(".")
        for key in [k for k in self.records if k[0] == low and rdtype in (None, k[1])]:
            del self.records[key]

    def _exists(self, name: str) -> bool:
        return any(k[0] == name for k in self.records)

    def count(self, name: str, rdtype: str | None = None) -> int:
        low = name.lower().rstrip(".")
        return sum(1 for q in self.queries if q[0] == low and rdtype in (None, q[1]))

    # -- answering -------------------------------------------------------------------

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((name, rdtype, transport))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)  # a slow name server is the behaviour under test
            if self.drop_all or name in self.drop:
                return None
            response = self._response(query, name, rdtype)
        finally:
            with self._lock:
                self.in_flight -= 1
        limit = 65535
        if transport == "udp":
            limit = query.payload if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | dns.flags.AA
            return truncated.to_wire()

    def _response(self, query: dns.message.Message, name: str, rdtype: str) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if name in self.refused:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        current = name
        for _ in range(8):
            cname = self.records.get((current, "CNAME"))
            if not cname or rdtype == "CNAME":
                break
            response.answer.append(self._rrset(current, "CNAME", cname))
            current = cname[0].lower().rstrip(".")
        values = self.records.get((current, rdtype))
        if values:
            response.answer.append(self._rrset(current, rdtype, values))
            return response
        if not self._exists(current):
            response.set_rcode(dns.rcode.NXDOMAIN)
        soa = dns.rrset.from_text(
            "test.", self.negative_ttl, "IN", "SOA", SOA.format(minimum=self.negative_ttl)
        )
        response.authority.append(soa)
        return response

    def _rrset(self, name: str, rdtype: str, values: list[str]) -> dns.rrset.RRset:
        ttl = self.ttls.get((name, rdtype), self.ttl)
        texts = [_absolute(rdtype, v) for v in values]
        return dns.rrset.from_text_list(name + ".", ttl, "IN", rdtype, texts)

    # -- serving ---------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeDns:
        """Serve on ``host``; ``port`` 0 lets the kernel pick one (for UDP, then TCP on it).

        A fixed port (53, for software that reads /etc/resolv.conf) is taken as is.
        """
        fake = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = fake.answer(data, "udp")
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                while True:
                    head = _recv(sock, 2)
                    if head is None:
                        return
                    data = _recv(sock, struct.unpack("!H", head)[0])
                    if data is None:
                        return
                    reply = fake.answer(data, "tcp")
                    if reply is None:
                        return
                    sock.sendall(struct.pack("!H", len(reply)) + reply)

        for _ in range(50 if port == 0 else 1):
            udp = socketserver.ThreadingUDPServer((host, port), Udp)
            bound = udp.server_address[1]
            try:
                tcp = _ReusingTcpServer((host, bound), Tcp)
            except OSError:
                udp.server_close()
                if port:
                    raise
                continue
            break
        else:  # pragma: no cover
            raise RuntimeError("no free port for UDP and TCP")
        udp.daemon_threads = tcp.daemon_threads = True
        self.host, self.port = host, bound
        self._servers = [udp, tcp]
        for server in self._servers:
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


class _ReusingTcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # a fixed port (53) is bound again by the next test


def _absolute(rdtype: str, value: str) -> str:
    """Host names in the test data are written without the final dot."""
    if rdtype in ("CNAME", "NS", "PTR"):
        return value if value.endswith(".") else value + "."
    if rdtype == "MX":
        pref, _, host = value.partition(" ")
        return f"{pref} {host if host.endswith('.') else host + '.'}"
    if rdtype == "TXT" and not value.startswith('"'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _recv(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
