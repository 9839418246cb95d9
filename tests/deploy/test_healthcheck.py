"""deploy/healthcheck.py, the image's HEALTHCHECK, against a live smtpgate serve."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.deploy.conftest import LiveGate, free_port

pytestmark = pytest.mark.deploy

SCRIPT = Path(__file__).parents[2] / "deploy" / "healthcheck.py"


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_healthy_when_smtpgate_greets(live_gate: LiveGate) -> None:
    result = probe(f"127.0.0.1:{live_gate.port}")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # The probe is an ordinary session in the log, closed with QUIT.
    log = live_gate.log()
    assert "connect from localhost[127.0.0.1]" in log or "connect from unknown[127.0.0.1]" in log
    assert "quit=1" in log


def test_address_from_the_environment(live_gate: LiveGate) -> None:
    result = probe(env={"SMTPGATE_HEALTHCHECK": f"127.0.0.1:{live_gate.port}"})
    assert result.returncode == 0, result.stderr


def test_unhealthy_when_nothing_listens() -> None:
    port = free_port()
    result = probe(f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"unhealthy: 127.0.0.1:{port}: ")


def test_unhealthy_on_a_421_greeting() -> None:
    """A draining smtpgate (421 Service shutting down) is not healthy."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"421 4.3.2 mx.example.org Service shutting down\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        result = probe(f"127.0.0.1:{port}")
        thread.join(5)
    assert result.returncode == 1
    assert "greeting 421 4.3.2 mx.example.org Service shutting down" in result.stderr
