"""``smtpgate explain`` asks the real policy server, as serve does (the same plan, the
same client), and shows the request in its trail."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.delegation.fakeserver import FakePolicyServer


async def explain(config: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtpgate", "explain", "-c", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return out.decode()


async def test_explain_asks_the_policy_server(tmp_path: Path) -> None:
    async with FakePolicyServer(
        lambda attrs, conn, n: "DEFER_IF_PERMIT 4.2.0 Greylisted" if n == 0 else "DUNNO"
    ) as server:
        config = tmp_path / "main.cf"
        config.write_text(
            "myhostname = mx.example.org\nrelay_domains = bar.org\nrelayhost = [127.0.0.1]:9\n"
            "smtpd_recipient_restrictions = reject_unauth_destination,\n"
            f"    check_policy_service {server.endpoint}\n"
        )
        out = await explain(
            config, "--client", "192.0.2.1", "--ehlo", "--helo", "client.test",
            "--from", "a@sender.test", "--to", "foo@bar.org", "--to", "bob@bar.org",
        )  # fmt: skip
        assert (
            f"[RCPT] {server.endpoint} policy query -> action=DEFER_IF_PERMIT 4.2.0 Greylisted"
            in out
        )
        assert "<<< 450 4.2.0 <foo@bar.org>: Recipient address rejected: Greylisted" in out, out
        assert "<<< 250 2.1.5 Ok" in out  # bob: the server said DUNNO
        (_, first), (_, second) = server.requests
        assert (first["client_address"], first["helo_name"], first["recipient"]) == (
            "192.0.2.1",
            "client.test",
            "foo@bar.org",
        )
        assert first["instance"] == second["instance"] != ""


async def test_explain_shows_a_server_that_is_down(tmp_path: Path) -> None:
    async with FakePolicyServer() as server:
        endpoint, address = server.endpoint, server.address
    config = tmp_path / "main.cf"
    config.write_text(
        "myhostname = mx.example.org\nrelay_domains = bar.org\nrelayhost = [127.0.0.1]:9\n"
        "smtpd_recipient_restrictions = reject_unauth_destination,\n"
        f"    check_policy_service {{ {endpoint}, try_limit=1 }}\n"
    )
    out = await explain(
        config, "--client", "192.0.2.1", "--from", "a@x.test", "--to", "foo@bar.org"
    )
    assert f"log: warning: connect to {address}: Connection refused" in out
    assert f"log: warning: problem talking to server {address}: Connection refused" in out
    assert out.rstrip().endswith(
        "451 4.3.5 <foo@bar.org>: Recipient address rejected: Server configuration problem"
    ), out
