"""The load generator against a real recording SMTP server on loopback (no root needed).

It must bind each session to its source address, send MAIL, the RCPTs and DATA in one
write in ``pipeline`` mode, time the final dot to the 250, and count a 5xx greeting as a
rejected zombie.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.loadgen import pool_address

ROOT = Path(__file__).resolve().parents[2]


class Recorder(asyncio.Protocol):
    """A minimal SMTP server: records each chunk received and the peer address; answers
    per line. Clients from ``refused`` get a 521 greeting and are disconnected."""

    def __init__(self, chunks: list[bytes], peers: list[str], refused: set[str]) -> None:
        self.chunks, self.peers, self.refused = chunks, peers, refused
        self.buf = b""
        self.data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")[0]
        self.peers.append(peer)
        if peer in self.refused:
            self.t.write(b"521 5.7.1 go away\r\n")
            self.t.close()
            return
        self.t.write(b"220 rec ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.buf += chunk
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            if self.data:
                if line == b".":
                    self.data = False
                    self.t.write(b"250 2.0.0 Ok\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.t.write(b"250-rec\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                self.data = True
                self.t.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                self.t.write(b"221 bye\r\n")
                self.t.close()
            else:
                self.t.write(b"250 Ok\r\n")


async def _serve(argv: list[str], refused: set[str]) -> tuple[dict, list[bytes], list[str]]:
    chunks: list[bytes] = []
    peers: list[str] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Recorder(chunks, peers, refused), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen", "--server", f"127.0.0.1:{port}", *argv,
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    server.close()
    assert proc.returncode == 0
    return json.loads(out), chunks, peers


@pytest.mark.timeout(90)
def test_pipeline_mode_sends_the_envelope_in_one_write_from_the_source_address() -> None:
    argv = ["--mode", "pipeline", "--sessions", "2", "--count", "4", "--rcpts", "3"]
    argv += ["--source", "127.0.0.7"]
    result, chunks, peers = asyncio.run(_serve(argv, set()))
    assert result["counts"] == {"accepted": 4}
    assert len(result["latencies"]) == 4 and all(ms > 0 for ms in result["latencies"])
    assert peers == ["127.0.0.7"] * 4
    groups = [c for c in chunks if c.startswith(b"MAIL FROM:")]
    assert len(groups) == 4
    for group in groups:
        assert group.count(b"RCPT TO:") == 3 and group.endswith(b"DATA\r\n"), group


@pytest.mark.timeout(90)
def test_zombie_mode_counts_a_refused_greeting_and_walks_the_pool() -> None:
    refused = {pool_address(i) for i in range(10) if i % 2}
    argv = ["--mode", "zombie", "--sessions", "3", "--count", "10", "--pool", "10"]
    result, _, peers = asyncio.run(_serve(argv, refused))
    assert result["counts"] == {"rejected at connect": 5, "accepted": 5}
    assert sorted(peers) == sorted(pool_address(i) for i in range(10))
