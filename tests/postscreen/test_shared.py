"""A passed client is remembered across connections, workers, instances and restarts
when postscreen's cache is in smtpgate_shared_state: two `smtpgate serve` instances
(supervisor and two workers each, privileges dropped when run as root) and a real
redis-server."""

from __future__ import annotations

import re
from pathlib import Path

from tests.postscreen.conftest import session
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import running_gate
from tests.shared_state.redis_server import RedisServer

MAIN_CF = """\
mynetworks = 127.0.0.1/32
relay_domains = bar.org
postscreen_greet_action = enforce
postscreen_greet_wait = 1s
"""
NEW = ["220-mx.example.org ESMTP Postfix", "220 mx.example.org ESMTP Postfix"]
OLD = ["220 mx.example.org ESMTP Postfix"]


async def test_passes_are_shared_by_workers_instances_and_restarts(
    tmp_path: Path, backend: RecordingBackend, redis_server: RedisServer
) -> None:
    shared = (f"smtpgate_shared_state={redis_server.url}",)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    async with running_gate(one, MAIN_CF, backend, overrides=shared) as gate:
        first = await session(gate, "127.0.0.2")
        assert first.greeting == NEW
        assert await first.client.cmd("QUIT") == ["221 2.0.0 Bye"]
        await gate.wait_log(f"PASS NEW {first.tag}")
        pids = set()
        for _ in range(40):  # until both workers took one: both know the client
            if len(pids) == 2:
                break
            again = await session(gate, "127.0.0.2")
            assert again.greeting == OLD
            assert await again.client.cmd("QUIT") == ["221 2.0.0 Bye"]
            log = await gate.wait_log(f"PASS OLD {again.tag}")
            pids |= set(re.findall(rf"postscreen\[(\d+)\]: PASS OLD {re.escape(again.tag)}", log))
        assert len(pids) == 2, log
        assert "PASS NEW" not in log.split(f"PASS NEW {first.tag}", 1)[1]
    async with running_gate(two, MAIN_CF, backend, overrides=shared) as other:
        s = await session(other, "127.0.0.2")
        assert s.greeting == OLD  # another instance
        await other.wait_log(f"PASS OLD {s.tag}")
    again = tmp_path / "one-restarted"  # a fresh log: the same Redis, nothing else
    again.mkdir()
    async with running_gate(again, MAIN_CF, backend, overrides=shared) as restarted:
        s = await session(restarted, "127.0.0.2")
        assert s.greeting == OLD  # after a restart
        await restarted.wait_log(f"PASS OLD {s.tag}")
        fresh = await session(restarted, "127.0.0.3")
        assert fresh.greeting == NEW  # another client is still new


async def test_passes_are_shared_by_the_workers_without_redis(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    # the supervisor's anvil keeps them for every worker
    async with running_gate(tmp_path, MAIN_CF, backend) as gate:
        first = await session(gate, "127.0.0.2")
        assert first.greeting == NEW
        assert await first.client.cmd("QUIT") == ["221 2.0.0 Bye"]
        await gate.wait_log(f"PASS NEW {first.tag}")
        pids = set()
        for _ in range(40):  # until both workers took one
            if len(pids) == 2:
                break
            again = await session(gate, "127.0.0.2")
            assert again.greeting == OLD
            await again.client.cmd("QUIT")
            log = await gate.wait_log(f"PASS OLD {again.tag}")
            pids |= set(re.findall(rf"postscreen\[(\d+)\]: PASS OLD {re.escape(again.tag)}", log))
        assert len(pids) == 2, log
