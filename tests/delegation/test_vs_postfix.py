"""Postfix 3.7 itself and smtpgate ask the same policy server: the same attributes in the
same order, the same values where they do not depend on the process, and the same reply,
log line and warnings for its answer and for its absence.

Postfix runs as a throwaway instance on loopback (tests/postfix_instance.py); the policy
server is a thread of this test that records every request.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.delegation.fakeserver import FakePolicyServer
from tests.postfix_instance import PostfixInstance
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import running_gate

pytestmark = pytest.mark.postfix

BASE = """\
myhostname = mx.example.org
relay_domains = bar.org
mynetworks = 127.0.0.1/32
smtpd_peername_lookup = no
"""
# Values that depend on the process, the clock or the connection, not on the request.
VOLATILE = {
    "client_port",
    "server_port",
    "instance",
    "queue_id",
    "client_name",
    "reverse_client_name",
}


class Recorder:
    """A policy server in a thread: records each request's (name, value) pairs in order."""

    def __init__(self, answer: Callable[[dict[str, str]], str]) -> None:
        self.requests: list[list[tuple[str, str]]] = []
        recorder = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                pairs: list[tuple[str, str]] = []
                for raw in self.rfile:
                    line = raw.decode().rstrip("\n")
                    if line:
                        name, _, value = line.partition("=")
                        pairs.append((name, value))
                        continue
                    recorder.requests.append(pairs)
                    self.wfile.write(f"action={answer(dict(pairs))}\n\n".encode())
                    pairs = []

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"inet:127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def greylist(attrs: dict[str, str]) -> str:
    return "DEFER_IF_PERMIT 4.2.0 Greylisted" if attrs["recipient"] == "grey@bar.org" else "DUNNO"


def main_cf(endpoint: str) -> str:
    return BASE + (
        "smtpd_recipient_restrictions = reject_unauth_destination,\n"
        f"    check_policy_service {endpoint}\n"
    )


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with Recorder(greylist) as r:
        yield r


async def smtpgate_requests(
    tmp_path: Path, endpoint: str, backend: RecordingBackend
) -> tuple[list[list[str]], str]:
    async with running_gate(tmp_path, main_cf(endpoint), backend) as gate:
        c = await gate.connect(source="127.0.0.2")
        await c.cmd("EHLO client.example.net")
        await c.cmd("MAIL FROM:<a@sender.test>")
        replies = [await c.cmd("RCPT TO:<grey@bar.org>"), await c.cmd("RCPT TO:<ok@bar.org>")]
        await c.cmd("QUIT")
        log = await gate.wait_log("disconnect from")
    return replies, log


async def test_the_same_request_reply_and_log_line(
    tmp_path: Path, recorder: Recorder, backend: RecordingBackend
) -> None:
    with PostfixInstance(main_cf(recorder.endpoint)) as postfix:
        d = postfix.dialogue(
            "127.0.0.2",
            "client.example.net",
            "a@sender.test",
            ["grey@bar.org", "ok@bar.org"],
            ehlo=True,
        )
    postfix_requests = list(recorder.requests)
    recorder.requests.clear()
    replies, log = await smtpgate_requests(tmp_path, recorder.endpoint, backend)
    ours = recorder.requests
    assert len(postfix_requests) == len(ours) == 2
    for theirs, mine in zip(postfix_requests, ours, strict=True):
        assert [name for name, _ in mine] == [name for name, _ in theirs]
        assert {n: v for n, v in mine if n not in VOLATILE} == {
            n: v for n, v in theirs if n not in VOLATILE
        }
    # one transaction: one instance for both of its requests, in Postfix and in smtpgate
    for requests in (postfix_requests, ours):
        instances = [dict(r)["instance"] for r in requests]
        assert instances[0] == instances[1] != ""
    postfix_replies = [e.reply for e in d.exchanges if e.command.startswith("RCPT")]
    assert replies == postfix_replies
    (postfix_line,) = d.noqueue
    assert postfix_line.split("NOQUEUE: ", 1)[1] in log


async def test_the_same_warnings_and_default_action_when_the_server_is_down(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with FakePolicyServer() as server:
        endpoint, address = server.endpoint, server.address
    with PostfixInstance(main_cf(endpoint)) as postfix:
        d = postfix.dialogue(
            "127.0.0.2", "client.example.net", "a@sender.test", ["grey@bar.org"], ehlo=True
        )
    replies, log = await smtpgate_requests(tmp_path, endpoint, backend)
    assert (
        replies[0]
        == d.exchanges[-2].reply
        == ["451 4.3.5 <grey@bar.org>: Recipient address rejected: Server configuration problem"]
    )
    theirs = [line for line in d.log if address in line]
    ours = [line.split(": ", 1)[1] for line in log.splitlines() if address in line]
    assert len(theirs) == 4 and ours[:4] == theirs, log  # ours: two RCPTs, two rounds
