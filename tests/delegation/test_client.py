"""The delegation client over real sockets: the protocol, connection reuse, and every
fault (down, timeout, garbage, no action, closed early or mid-reply) with Postfix's
warnings and tries.  The restriction core's side is in tests/policy/test_delegation.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from smtpgate.config.policyconf import PolicyService
from smtpgate.delegation import DelegationClient, encode_request, parse_reply, reply_end
from tests.delegation.fakeserver import CLOSE, SILENT, FakePolicyServer, Raw

ATTRS = [("request", "smtpd_access_policy"), ("protocol_state", "RCPT"), ("instance", "a.1")]


def service(endpoint: str, **settings: object) -> PolicyService:
    return PolicyService(endpoint, endpoint, **settings)  # type: ignore[arg-type]


class Sleeps:
    """The client's retry pause, recorded and taken at once (no test waits a second)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def client(sleeps: Sleeps):  # type: ignore[no-untyped-def]
    c = DelegationClient(sleep=sleeps)
    yield c
    await c.close()


# -- the codec ------------------------------------------------------------------------


def test_a_request_is_name_value_lines_and_an_empty_line() -> None:
    assert encode_request([("request", "smtpd_access_policy"), ("helo_name", "a\nb")]) == (
        b"request=smtpd_access_policy\nhelo_name=a b\n\n"
    )


@pytest.mark.parametrize(
    ("data", "end"),
    [(b"", 0), (b"action=OK\n", 0), (b"action=OK\n\n", 11), (b"\n", 1), (b"a=b\n\nx", 5)],
)
def test_a_reply_ends_at_its_empty_line(data: bytes, end: int) -> None:
    assert reply_end(data) == end


@pytest.mark.parametrize(
    ("block", "action", "warning"),
    [
        (b"action=DUNNO\n\n", "DUNNO", ""),
        (b"foo=bar\naction=REJECT no way\nmore=1\n\n", "REJECT no way", ""),
        (b"action=first\naction=second\n\n", "first", ""),
        (b"action=\n\n", "", ""),
        (b"\n", None, "missing attribute action in input from S"),
        (b"hello there\n\n", None, "missing attribute action in input from S"),
        (b"foo=bar\n\n", None, "missing attribute action in input from S"),
        (b"action\n\n", None, "missing value for string attribute action from S"),
    ],
)
def test_the_reply_is_read_as_attr_scan_plain_does(
    block: bytes, action: str | None, warning: str
) -> None:
    reply = parse_reply(block, "S")
    assert (reply.action, reply.warning) == (action, warning)


# -- answers and connection reuse -------------------------------------------------------


async def test_requests_reuse_one_connection(client: DelegationClient) -> None:
    async with FakePolicyServer("REJECT go away") as server:
        svc = service(server.endpoint)
        answers = [await client.ask(svc, ATTRS) for _ in range(3)]
        assert [(a.action, a.warnings) for a in answers] == [("REJECT go away", ())] * 3
        assert server.opened == 1 and [i for i, _ in server.requests] == [0, 0, 0]
        assert server.requests[0][1] == dict(ATTRS)


async def test_a_unix_socket(client: DelegationClient, tmp_path: Path) -> None:
    server = await FakePolicyServer("OK").start(str(tmp_path / "policy"))
    try:
        answer = await client.ask(service(server.endpoint), ATTRS)
        assert (answer.action, answer.warnings) == ("OK", ())
    finally:
        await server.stop()


async def test_request_limit_closes_after_so_many_requests(client: DelegationClient) -> None:
    async with FakePolicyServer("DUNNO") as server:
        svc = service(server.endpoint, request_limit=2)
        for _ in range(5):
            await client.ask(svc, ATTRS)
        assert [i for i, _ in server.requests] == [0, 0, 1, 1, 2]
        await server.wait_for(lambda: server.closed == 2)


async def test_an_idle_connection_is_closed_after_max_idle(client: DelegationClient) -> None:
    async with FakePolicyServer("DUNNO") as server:
        await client.ask(service(server.endpoint, max_idle=0.2), ATTRS)
        await server.wait_for(lambda: server.closed == 1)  # the client closed it


async def test_max_ttl_opens_a_new_connection(client: DelegationClient) -> None:
    async with FakePolicyServer("DUNNO") as server:
        svc = service(server.endpoint, max_ttl=0.2)
        await client.ask(svc, ATTRS)
        await server.wait_for(lambda: server.closed == 1)
        await client.ask(svc, ATTRS)
        assert [i for i, _ in server.requests] == [0, 1]


async def test_a_connection_the_server_closed_is_replaced_without_a_warning(
    client: DelegationClient, sleeps: Sleeps
) -> None:
    async with FakePolicyServer(lambda a, conn, n: "DUNNO" if n == 0 else "OK") as server:
        svc = service(server.endpoint)
        await client.ask(svc, ATTRS)
        for writer in server._writers:  # the server ends an idle connection
            writer.close()
        await server.wait_for(lambda: server.closed == 1)
        answer = await client.ask(svc, ATTRS)
        assert (answer.action, answer.warnings, sleeps.delays) == ("DUNNO", (), [])
        assert [i for i, _ in server.requests] == [0, 1]


async def test_concurrent_requests_use_several_connections_and_keep_the_transaction(
    client: DelegationClient,
) -> None:
    async with FakePolicyServer("DUNNO") as server:
        svc = service(server.endpoint)
        await asyncio.gather(
            client.ask(svc, [("instance", "A")]), client.ask(svc, [("instance", "B")])
        )
        assert server.opened == 2  # each request in flight has its own connection
        conn_of = {a["instance"]: i for i, a in server.requests}
        # the next request of transaction B goes where B's went, A's where A's went
        for instance in ("B", "A", "B", "A"):
            await client.ask(svc, [("instance", instance)])
            assert server.requests[-1][0] == conn_of[instance]


# -- faults: Postfix's tries and warnings ----------------------------------------------


async def test_a_server_that_is_down(client: DelegationClient, sleeps: Sleeps) -> None:
    async with FakePolicyServer() as server:
        endpoint, address = server.endpoint, server.address
    answer = await client.ask(service(endpoint), ATTRS)
    assert answer.action is None
    assert answer.warnings == (
        f"connect to {address}: Connection refused",
        f"problem talking to server {address}: Connection refused",
        f"connect to {address}: Connection refused",
        f"problem talking to server {address}: Connection refused",
    )
    assert sleeps.delays == [1.0]


async def test_a_missing_unix_socket_warns_at_the_last_try(
    client: DelegationClient, sleeps: Sleeps, tmp_path: Path
) -> None:
    path = tmp_path / "nowhere"
    answer = await client.ask(service(f"unix:{path}", try_limit=3, retry_delay=2.0), ATTRS)
    assert answer.action is None
    assert answer.warnings == (
        f"connect to {path}: No such file or directory",
        f"connect to {path}: No such file or directory",
        f"connect to {path}: No such file or directory",
        f"problem talking to server {path}: No such file or directory",
    )
    assert sleeps.delays == [2.0, 2.0]


async def test_a_server_that_never_answers_times_out(client: DelegationClient) -> None:
    async with FakePolicyServer(lambda a, c, n: SILENT) as server:
        answer = await client.ask(service(server.endpoint, timeout=0.2), ATTRS)
        assert answer.action is None
        assert (
            answer.warnings
            == (f"problem talking to server {server.address}: Connection timed out",) * 2
        )
        assert server.opened == 2


async def test_a_reply_cut_by_the_timeout(client: DelegationClient) -> None:
    async with FakePolicyServer(lambda a, c, n: Raw(b"action=DUN")) as server:
        answer = await client.ask(service(server.endpoint, timeout=0.2, try_limit=1), ATTRS)
        assert answer.warnings == (
            f"timeout on {server.address} while reading input attribute value",
            f"problem talking to server {server.address}: Connection timed out",
        )


@pytest.mark.parametrize(
    ("reply", "warning"),
    [
        (Raw(b"hello\n\n"), "missing attribute action in input from {}"),
        (Raw(b"foo=bar\n\n"), "missing attribute action in input from {}"),
        (Raw(b"\n"), "missing attribute action in input from {}"),
        (Raw(b"action\n\n"), "missing value for string attribute action from {}"),
        (
            Raw(b"action=DUN", close=True),
            "premature end-of-input on {} while reading input attribute value",
        ),
        (
            Raw(b"action=DUNNO\nx=y", close=True),
            "premature end-of-input on {} while reading input attribute name",
        ),
        (CLOSE, None),
    ],
)
async def test_a_bad_reply_is_tried_again_then_the_default(
    client: DelegationClient, sleeps: Sleeps, reply: object, warning: str | None
) -> None:
    async with FakePolicyServer(lambda a, c, n: reply) as server:
        answer = await client.ask(service(server.endpoint), ATTRS)
        where = server.address
        one = () if warning is None else (warning.format(where),)
        assert answer.action is None
        # errno is 0 for these: Postfix's %m says "Success", and only at the last try
        assert answer.warnings == (*one, *one, f"problem talking to server {where}: Success")
        assert server.opened == 2 and sleeps.delays == [1.0]


async def test_a_second_try_that_succeeds_is_the_answer(
    client: DelegationClient, sleeps: Sleeps
) -> None:
    async with FakePolicyServer(lambda a, conn, n: CLOSE if conn == 0 else "OK") as server:
        answer = await client.ask(service(server.endpoint), ATTRS)
        assert (answer.action, answer.warnings, sleeps.delays) == ("OK", (), [1.0])


async def test_a_huge_reply_is_refused(client: DelegationClient) -> None:
    async with FakePolicyServer(lambda a, c, n: Raw(b"action=" + b"x" * 70000)) as server:
        answer = await client.ask(service(server.endpoint, try_limit=1), ATTRS)
        assert answer.action is None
        assert answer.warnings[-1] == f"problem talking to server {server.address}: Success"


async def test_the_retry_pause_is_real_by_default() -> None:
    # One real pause of retry_delay (1 s, the smallest Postfix allows): the default sleep.
    client = DelegationClient()
    async with FakePolicyServer(lambda a, conn, n: CLOSE if conn == 0 else "OK") as server:
        loop = asyncio.get_running_loop()
        start = loop.time()
        answer = await client.ask(service(server.endpoint), ATTRS)
        assert answer.action == "OK" and loop.time() - start >= 1.0
    await client.close()


class Recorded:
    """The metrics port's policy_reply calls (the rest of the port is not called here)."""

    def __init__(self) -> None:
        self.replies: list[tuple[str, str]] = []
        self.seconds: list[float] = []

    def policy_reply(self, service: str, action: str, seconds: float) -> None:
        self.replies.append((service, action))
        self.seconds.append(seconds)


async def test_each_answer_and_each_failure_is_counted(client: DelegationClient) -> None:
    recorded = Recorded()
    client.metrics = recorded  # type: ignore[assignment]
    async with FakePolicyServer("450 4.7.1 try later") as server:
        svc = service(server.endpoint)
        await client.ask(svc, ATTRS)
    await client.ask(svc, ATTRS)  # the server is gone: no answer after the tries
    assert recorded.replies == [(svc.name, "450"), (svc.name, "error")]
    assert all(0 <= s < 10 for s in recorded.seconds)
