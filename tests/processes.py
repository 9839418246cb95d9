"""Helpers for tests that run `smtpgate serve` as a process tree, as it is deployed."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from bench.harness import live_children


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc)."""
    return live_children().get(pid, [])


def wait_until(check: Callable[[], bool], deadline: float = 15.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)  # poll interval of a bounded wait for a condition
    return check()


def session(port: int, sender: str = "someone@example.com", recipient: str = "foo@bar.org") -> str:
    """HELO, MAIL, RCPT (to a relayed domain by default); the RCPT reply's first line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rwb")

        def reply() -> str:
            while True:
                line = stream.readline().decode()
                assert line, "connection closed"
                if line[3:4] != "-":
                    return line.rstrip("\r\n")

        assert reply().startswith("220")
        for command in ("HELO client.example", f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>"):
            stream.write(command.encode() + b"\r\n")
            stream.flush()
            answer = reply()
        stream.write(b"QUIT\r\n")
        stream.flush()
        return answer
