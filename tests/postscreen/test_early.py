"""postscreen's tests before the greeting, over real sockets: weighted DNS lists on a
loopback DNS server, allow lists, reply filters, a list that never answers, a client
that talks first, the access list, the cache (PASS OLD)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from smtpgate.proxyproto import encode
from tests.dns.dnsserver import FakeDns
from tests.postscreen.conftest import dns_overrides, listed, session
from tests.serve.backend import RecordingBackend
from tests.serve.client import LineClient
from tests.serve.conftest import running_gate

MAIN_CF = """\
myhostname = mx.example.org
relay_domains = bar.org
mynetworks = 127.0.0.1/32
postscreen_dnsbl_sites = black.test*2 grey.test=127.0.0.[2..3]*1 white.test*-5
    codes.test=127.0.0.4
postscreen_dnsbl_threshold = 3
postscreen_dnsbl_allowlist_threshold = -1
postscreen_dnsbl_action = {action}
postscreen_greet_action = {greet}
postscreen_greet_wait = {wait}
"""
BANNER = ["220-mx.example.org ESMTP Postfix", "220 mx.example.org ESMTP Postfix"]
REASON = "the log in memory, one worker: the serve test below runs the deployed form"


def cf(action: str = "enforce", greet: str = "ignore", wait: str = "1s") -> str:
    return MAIN_CF.format(action=action, greet=greet, wait=wait)


async def mail(s: object) -> list[str]:
    client = s.client  # type: ignore[attr-defined]
    await client.cmd("EHLO client.example.net")
    await client.cmd("MAIL FROM:<a@example.net>")
    return await client.cmd("RCPT TO:<foo@bar.org>")  # type: ignore[no-any-return]


async def test_two_weighted_lists_over_the_threshold_enforce(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    listed(dns, "127.0.0.3", "black.test")
    listed(dns, "127.0.0.3", "grey.test")
    async with running_gate(
        tmp_path, cf("enforce"), backend, overrides=dns_overrides(dns), in_process=REASON
    ) as gate:
        s = await session(gate, "127.0.0.3")
        assert s.greeting == BANNER
        assert 0.9 < s.seconds < 2.5  # the whole greet wait
        assert await mail(s) == [
            "550 5.7.1 Service unavailable; client [127.0.0.3] blocked using black.test"
        ]
        assert await s.client.cmd("QUIT") == ["221 2.0.0 Bye"]
        log = await gate.wait_log(f"DISCONNECT {s.tag}")
        assert re.search(
            rf"postfix/postscreen\[\d+\]: CONNECT from {re.escape(s.tag)} "
            rf"to \[127\.0\.0\.1\]:{gate.port}\n",
            log,
        )
        assert f"DNSBL rank 3 for {s.tag}" in log
        assert "postfix/dnsblog[" in log
        assert "addr 127.0.0.3 listed by domain black.test as 127.0.0.2" in log
        assert "addr 127.0.0.3 listed by domain grey.test as 127.0.0.2" in log
        assert (
            f"NOQUEUE: reject: RCPT from {s.tag}: 550 5.7.1 Service unavailable; "
            "client [127.0.0.3] blocked using black.test; from=<a@example.net>, "
            "to=<foo@bar.org>, proto=ESMTP, helo=<client.example.net>"
        ) in log
        assert "PASS NEW" not in log
        assert not backend.connections  # nothing reached the backend


async def test_drop_answers_521_and_disconnects(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    listed(dns, "127.0.0.3", "black.test")
    listed(dns, "127.0.0.3", "codes.test", "127.0.0.4")
    async with running_gate(
        tmp_path, cf("drop"), backend, overrides=dns_overrides(dns), in_process=REASON
    ) as gate:
        s = await session(gate, "127.0.0.3")
        assert s.greeting == [
            "220-mx.example.org ESMTP Postfix",
            "521 5.7.1 Service unavailable; client [127.0.0.3] blocked using black.test",
        ]
        assert await s.client.closed()
        log = await gate.wait_log(f"DISCONNECT {s.tag}")
        assert f"DNSBL rank 3 for {s.tag}" in log
        assert "connect from" not in log  # smtpd never saw it


async def test_listed_below_the_threshold_passes_and_is_remembered(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    listed(dns, "127.0.0.4", "black.test")  # 2 < 3
    listed(dns, "127.0.0.4", "grey.test", "127.0.0.10")  # the filter does not match: 0
    async with running_gate(
        tmp_path, cf("enforce"), backend, overrides=dns_overrides(dns), in_process=REASON
    ) as gate:
        first = await session(gate, "127.0.0.4")
        assert first.greeting == BANNER
        assert await mail(first) == ["250 2.1.5 Ok"]
        log = await gate.wait_log(f"PASS NEW {first.tag}")
        assert "DNSBL rank" not in log
        queries = len(dns.queries)
        second = await session(gate, "127.0.0.4")
        assert second.greeting == ["220 mx.example.org ESMTP Postfix"]  # no teaser, no wait
        assert second.seconds < 0.5
        assert await mail(second) == ["250 2.1.5 Ok"]
        assert f"PASS OLD {second.tag}" in gate.log
        assert len(dns.queries) == queries  # the lists were not asked again


async def test_allow_list_skips_the_wait_and_the_tests(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    listed(dns, "127.0.0.5", "black.test")  # 2
    listed(dns, "127.0.0.5", "white.test")  # -5: -3 <= -1
    async with running_gate(
        tmp_path, cf("enforce", wait="3s"), backend, overrides=dns_overrides(dns),
        in_process=REASON,
    ) as gate:  # fmt: skip
        s = await session(gate, "127.0.0.5")
        assert s.greeting == BANNER
        assert s.seconds < 1.5  # not the 3s greet wait: the allow list ended it
        assert await mail(s) == ["250 2.1.5 Ok"]
        assert f"PASS NEW {s.tag}" in gate.log


async def test_a_list_that_never_answers_neither_delays_nor_rejects(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    listed(dns, "127.0.0.6", "black.test")
    dns.drop.add("6.0.0.127.grey.test")  # never answers
    async with running_gate(
        tmp_path, cf("enforce") + "postscreen_dnsbl_timeout = 5s\n", backend,
        overrides=dns_overrides(dns), in_process=REASON,
    ) as gate:  # fmt: skip
        s = await session(gate, "127.0.0.6")
        assert s.greeting == BANNER
        assert s.seconds < 1.8  # greet_wait (1s), not dnsbl_timeout (5s)
        assert await mail(s) == ["250 2.1.5 Ok"]
        assert "DNSBL rank" not in gate.log


async def test_pregreet_drop_enforce_and_ignore(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    for action in ("drop", "enforce", "ignore"):
        folder = tmp_path / action
        folder.mkdir()
        async with running_gate(
            folder, cf(greet=action, wait="2s"), backend, overrides=dns_overrides(dns),
            in_process=REASON,
        ) as gate:  # fmt: skip
            s = await session(gate, "127.0.0.7", first=b"EHLO bot.example\r\n")
            line = re.compile(
                rf"PREGREET 18 after 0(\.\d+)? from {re.escape(s.tag)}: EHLO bot\.example\\r\\n"
            )
            if action == "drop":
                assert s.greeting == [
                    "220-mx.example.org ESMTP Postfix",
                    "521 5.5.1 Protocol error",
                ]
                assert s.seconds < 1.0  # at once, not after the greet wait
                assert await s.client.closed()
                log = await gate.wait_log(f"DISCONNECT {s.tag}")
            elif action == "enforce":
                # no 220 line: the pregreeted EHLO is answered as a command (the reader
                # takes the teaser and the EHLO reply as one reply)
                assert s.greeting[:2] == [
                    "220-mx.example.org ESMTP Postfix",
                    "250-mx.example.org",
                ]
                assert "250-PIPELINING" not in s.greeting
                await s.client.cmd("MAIL FROM:<a@example.net>")
                assert await s.client.cmd("RCPT TO:<foo@bar.org>") == ["550 5.5.1 Protocol error"]
                log = gate.log
            else:
                # handed to smtpd with the early bytes unread, as postscreen does; smtpd's
                # smtpd_forbid_unauth_pipelining (yes in smtpgate, Postfix 3.9's default)
                # then refuses the client that spoke first
                assert s.greeting == [
                    "220-mx.example.org ESMTP Postfix",
                    "554 5.5.0 Error: SMTP protocol synchronization",
                ]
                log = gate.log
            assert line.search(log), log
            assert "PASS NEW" not in log


async def test_access_list_permit_and_reject(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    text = cf() + (
        "postscreen_access_list = permit_mynetworks, cidr:@DIR@/psacl\n"
        "postscreen_blacklist_action = drop\n"
    ).replace("@DIR@", str(tmp_path))
    tables = {"psacl": "127.0.0.8/32 permit\n127.0.0.9/32 reject\n127.0.0.10/32 dunno\n"}
    listed(dns, "127.0.0.8", "black.test")
    listed(dns, "127.0.0.8", "grey.test")
    async with running_gate(
        tmp_path, text, backend, tables=tables, overrides=dns_overrides(dns), in_process=REASON
    ) as gate:
        allowed = await session(gate, "127.0.0.8")
        assert allowed.greeting == ["220 mx.example.org ESMTP Postfix"]
        assert allowed.seconds < 0.5
        assert await mail(allowed) == ["250 2.1.5 Ok"]  # listed, but never asked
        assert f"ALLOWLISTED {allowed.tag}" in gate.log
        denied = await session(gate, "127.0.0.9")
        assert denied.greeting == ["521 5.3.2 Service currently unavailable"]
        assert await denied.client.closed()
        log = await gate.wait_log(f"DISCONNECT {denied.tag}")
        assert f"DENYLISTED {denied.tag}" in log
        assert not any("8.0.0.127" in q[0] for q in dns.queries)


async def test_an_enforced_client_talks_to_postscreens_dummy_engine(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    listed(dns, "127.0.0.3", "black.test")
    listed(dns, "127.0.0.3", "grey.test")
    blocked = "550 5.7.1 Service unavailable; client [127.0.0.3] blocked using black.test"
    async with running_gate(
        tmp_path, cf("enforce"), backend, overrides=dns_overrides(dns), in_process=REASON
    ) as gate:
        s = await session(gate, "127.0.0.3")
        c = s.client
        assert await c.cmd("EHLO client.example.net") == [
            "250-mx.example.org",
            "250-SIZE 10240000",
            "250-VRFY",
            "250-ETRN",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            "250-DSN",
            "250-SMTPUTF8",
            "250 CHUNKING",
        ]
        assert await c.cmd("VRFY bob") == [blocked]
        assert await c.cmd("VRFY") == ["501 5.5.4 Syntax: VRFY address"]
        assert await c.cmd("ETRN bar.org") == ["458 Unable to queue messages"]
        assert await c.cmd("FOO bar") == ["502 5.5.2 Error: command not recognized"]
        assert await c.cmd("AUTH PLAIN") == ["502 5.5.2 Error: command not recognized"]
        assert await c.cmd("STARTTLS") == ["502 5.5.1 Error: command not implemented"]
        assert await c.cmd("RCPT TO:<foo@bar.org>") == ["503 5.5.1 Error: need MAIL command"]
        assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
        assert await c.cmd("MAIL FROM:<b@example.net>") == ["503 5.5.1 Error: nested MAIL command"]
        assert await c.cmd("RCPT TO:<foo@bar.org>") == [blocked]
        assert await c.cmd("RSET") == ["250 2.0.0 Ok"]
        assert await c.cmd("NOOP") == ["250 2.0.0 Ok"]
        assert await c.cmd("MAIL FROM:<a@example.net>") == ["250 2.1.0 Ok"]
        assert await c.cmd("DATA") == ["554 5.5.1 Error: no valid recipients"]
        assert await c.closed()
        log = await gate.wait_log(f"DISCONNECT {s.tag}")
        assert f"DATA without valid RCPT from {s.tag}" in log
        assert "HANGUP" not in log
        assert "smtpd[" not in log.split("listening on", 1)[1]  # smtpd never saw it
        left = await session(gate, "127.0.0.3")
        await left.client.cmd("HELO client.example.net")
        await left.client.close()  # gone without QUIT
        log = await gate.wait_log(f"DISCONNECT {left.tag}")
        assert re.search(
            rf"HANGUP after [0-9.]+ from {re.escape(left.tag)} in tests after SMTP handshake\n",
            log,
        )
        polite = await session(gate, "127.0.0.3")
        assert await polite.client.cmd("QUIT") == ["221 2.0.0 Bye"]
        log = await gate.wait_log(f"DISCONNECT {polite.tag}")
        assert f"HANGUP after 0 from {polite.tag}" not in log
        assert not backend.connections


async def test_behind_a_proxy_the_proxied_client_is_screened(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    listed(dns, "192.0.2.66", "black.test")
    listed(dns, "192.0.2.66", "grey.test")
    text = cf("drop") + "smtpd_upstream_proxy_protocol = haproxy\n"
    async with running_gate(
        tmp_path, text, backend, overrides=dns_overrides(dns), in_process=REASON
    ) as gate:
        client = await LineClient.connect(gate.host, gate.port, source="127.0.0.2")
        gate.clients.append(client)
        await client.send_raw(encode(1, ("192.0.2.66", 40001), ("198.51.100.25", 25)))
        assert await client.reply() == [
            "220-mx.example.org ESMTP Postfix",
            "521 5.7.1 Service unavailable; client [192.0.2.66] blocked using black.test",
        ]
        log = await gate.wait_log("DISCONNECT [192.0.2.66]:40001")
        assert "CONNECT from [192.0.2.66]:40001 to [198.51.100.25]:25" in log
        assert "DNSBL rank 3 for [192.0.2.66]:40001" in log
        assert "[127.0.0.2]" not in log  # the balancer is nobody's client


async def test_the_lists_that_answered_count_when_one_never_does(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    listed(dns, "127.0.0.11", "black.test")
    listed(dns, "127.0.0.11", "grey.test")
    dns.drop.add("11.0.0.127.codes.test")  # never answers
    text = cf("drop") + "postscreen_dnsbl_timeout = 5s\n"
    async with running_gate(
        tmp_path, text, backend, overrides=dns_overrides(dns), in_process=REASON
    ) as gate:
        s = await session(gate, "127.0.0.11")
        assert s.greeting == [
            "220-mx.example.org ESMTP Postfix",
            "521 5.7.1 Service unavailable; client [127.0.0.11] blocked using black.test",
        ]
        assert s.seconds < 1.8  # at the end of greet_wait, not dnsbl_timeout
        log = await gate.wait_log(f"DISCONNECT {s.tag}")
        assert f"DNSBL rank 3 for {s.tag}" in log


async def test_a_client_that_hangs_up_before_the_greeting(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    # deployed (uvloop in the workers): the teaser is not written to a closed transport
    text = "mynetworks = 127.0.0.1/32\npostscreen_greet_wait = 1s\n"
    async with running_gate(tmp_path, text, backend) as gate:
        _, writer = await asyncio.open_connection(gate.host, gate.port, local_addr=("127.0.0.7", 0))
        port = writer.get_extra_info("sockname")[1]
        writer.close()
        await writer.wait_closed()
        tag = f"[127.0.0.7]:{port}"
        log = await gate.wait_log(f"DISCONNECT {tag}")
        assert re.search(
            rf"HANGUP after [0-9.]+ from {re.escape(tag)} in tests before SMTP handshake\n", log
        )
        assert "error" not in log


async def test_the_reply_map_names_the_list(
    tmp_path: Path, dns: FakeDns, backend: RecordingBackend
) -> None:
    listed(dns, "127.0.0.12", "black.test")
    listed(dns, "127.0.0.12", "codes.test", "127.0.0.4")
    text = cf("drop") + "postscreen_dnsbl_reply_map = texthash:@DIR@/dnsbl_reply\n".replace(
        "@DIR@", str(tmp_path)
    )
    tables = {"dnsbl_reply": "black.test    a well-known list\n"}
    async with running_gate(
        tmp_path, text, backend, tables=tables, overrides=dns_overrides(dns), in_process=REASON
    ) as gate:
        s = await session(gate, "127.0.0.12")
        assert s.greeting[-1] == (
            "521 5.7.1 Service unavailable; client [127.0.0.12] blocked using a well-known list"
        )
