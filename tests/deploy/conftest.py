"""A live ``smtpgate serve`` (the example config) in front of ``smtpgate sink``, both run
as the commands an operator runs, with the log in a file: for the health check and for
fail2ban on a log smtpgate wrote itself."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "main.cf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(
    port: int, process: subprocess.Popen[bytes], output: Path, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}: {output.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)  # poll interval of a bounded wait for a condition
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class LiveGate:
    port: int
    maillog: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.maillog.read_text()


@pytest.fixture(scope="module")
def live_gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGate]:
    tmp = tmp_path_factory.mktemp("live")
    sink_port, gate_port = free_port(), free_port()
    command = [sys.executable, "-m", "smtpgate"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sink_out, gate_out = tmp / "sink.out", tmp / "serve.out"
    with open(sink_out, "wb") as out:
        sink = subprocess.Popen(
            [
                *command,
                "sink",
                "--listen",
                f"127.0.0.1:{sink_port}",
                "--maildir",
                str(tmp / "mail"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    gate = None
    try:
        wait_listening(sink_port, sink, sink_out)
        maillog = tmp / "maillog"
        with open(gate_out, "wb") as out:
            gate = subprocess.Popen(
                [
                    *command,
                    "serve",
                    "-c",
                    str(EXAMPLE),
                    "-o",
                    f"listen=127.0.0.1:{gate_port}",
                    "-o",
                    f"relayhost=[127.0.0.1]:{sink_port}",
                    "-o",
                    f"maillog_file={maillog}",
                    "-o",
                    f"pid_file={tmp / 'smtpgate.pid'}",
                    # When the tests run as root, serve drops privileges (smtpgate_user).
                    "-o",
                    "smtpgate_user=nobody",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_listening(gate_port, gate, gate_out)
        yield LiveGate(gate_port, maillog, gate)
    finally:
        if gate is not None:
            stop(gate)
        stop(sink)
