"""smtpgate_watch: the live view on the metrics listener (/watch, /watch/events).

A deployed serve (a supervisor, two workers that drop their privileges) with the metrics
listener on; sessions go through whichever worker takes them and their rows reach the
page that the first worker serves.  Read with a plain HTTP client (the server-sent
events parsed here) and in Debian's headless chromium, driven through its chromedriver
by selenium (the DOM read back, a screenshot taken).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from smtpgate.watch import SessionWatch, WatchChannel, WatchEndpoint, loopback
from tests.serve.backend import RecordingBackend
from tests.serve.conftest import LOG_DEADLINE, SEED_MAIN_CF, SEED_TABLES, Gate, running_gate
from tests.serve.test_metrics import METRICS_ON, dialogue, http_get, metrics_port

BROWSER_DEADLINE = 30.0


async def send_two_sessions(gate: Gate) -> None:
    """One refused recipient (restricted_senders says 554), one message relayed."""
    refused = await dialogue(
        gate, "EHLO refused.example", "MAIL FROM:<a@qq.com>", "RCPT TO:<foo@bar.org>"
    )
    assert refused[-2][0].startswith("554 5.7.1 "), refused
    relayed = await dialogue(
        gate,
        "EHLO relayed.example",
        "MAIL FROM:<a@example.com>",
        "RCPT TO:<foo@bar.org>",
        "DATA",
        "Subject: hi\r\n\r\nhello\r\n.",
    )
    assert relayed[-2][0].startswith("250 "), relayed


class EventStream:
    """GET /watch/events, parsed: (event, data) pairs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> tuple[EventStream, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /watch/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), LOG_DEADLINE)
        return cls(reader, writer), head.decode()

    async def next(self) -> tuple[str, str]:
        event, data = "message", []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), LOG_DEADLINE)).decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if not line:
                if data:
                    return event, "\n".join(data)
                event = "message"
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)

    def close(self) -> None:
        self.writer.close()


async def finished_rows(stream: EventStream, count: int) -> dict[str, dict[str, Any]]:
    """The last rows of the first ``count`` sessions that ended, by HELO name."""
    done: dict[str, dict[str, Any]] = {}
    end = time.monotonic() + LOG_DEADLINE
    while len(done) < count:
        assert time.monotonic() < end, done
        event, data = await stream.next()
        assert event == "session", (event, data)
        row = json.loads(data)
        if row["done"]:
            done[row["helo"]] = row
    return done


async def test_events_stream_the_sessions(tmp_path: Path, backend: RecordingBackend) -> None:
    async with running_gate(
        tmp_path, SEED_MAIN_CF, backend, SEED_TABLES, overrides=METRICS_ON
    ) as gate:
        port = await metrics_port(gate)
        assert "(metrics, healthz, readyz, watch for loopback clients)" in gate.log
        stream, head = await EventStream.open(port)
        try:
            assert head.startswith("HTTP/1.1 200 "), head
            assert "Content-Type: text/event-stream" in head, head
            assert await stream.next() == ("hello", "{}")
            await send_two_sessions(gate)
            rows = await finished_rows(stream, 2)
            # the rows come from every worker, not only the one that answers HTTP
            pids = {row["pid"] for row in rows.values()}
            for _ in range(60):
                if len(pids) >= 2:
                    break
                await dialogue(gate, "EHLO more.example")
                pids |= {row["pid"] for row in (await finished_rows(stream, 1)).values()}
            assert len(pids) == 2, pids
            # the page is still open when serve stops: it does not hold the stop up
        except BaseException:
            stream.close()
            raise
    ended = await asyncio.wait_for(stream.reader.read(), LOG_DEADLINE)  # the end of stream
    assert b"event: hello" not in ended, ended
    stream.close()
    refused, relayed = rows["refused.example"], rows["relayed.example"]
    assert refused["outcome"] == "rejected", refused
    assert refused["client"].endswith("[127.0.0.2]") or "[127.0.0.2]" in refused["client"]
    assert refused["sender"] == "a@qq.com"
    assert refused["recipients"][0]["address"] == "foo@bar.org"
    assert refused["recipients"][0]["reply"].startswith("554 5.7.1 "), refused
    sender_access = f"check_sender_access hash:{tmp_path}/restricted_senders"
    assert refused["decided"] == f"{sender_access} (RCPT reject)", refused
    assert {"stage": "RCPT", "rule": sender_access, "result": "reject"} in refused["hits"]
    assert refused["backend"] == [] and refused["reply"].startswith("554 5.7.1 "), refused
    assert relayed["outcome"] == "accepted", relayed
    assert relayed["sender"] == "a@example.com"
    assert relayed["decided"].endswith("(RCPT permit)"), relayed
    assert relayed["reply"].startswith("250 2.0.0 Ok: queued as "), relayed
    assert [b["command"] for b in relayed["backend"]] == ["RCPT", "END-OF-DATA"], relayed
    assert relayed["backend"][1]["reply"].startswith("250 "), relayed
    assert relayed["messages"][0]["result"] == "accepted", relayed
    assert relayed["ms"] >= relayed["backend"][1]["ms"] > 0, relayed


async def test_page_and_what_is_refused(tmp_path: Path, backend: RecordingBackend) -> None:
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    async with running_gate(
        tmp_path / "on", SEED_MAIN_CF, backend, SEED_TABLES, overrides=METRICS_ON
    ) as gate:
        port = await metrics_port(gate)
        status, body = await http_get(port, "/watch")
        assert status == 200 and "<title>smtpgate: live view</title>" in body, body
        assert "http:" not in body.replace("http://", "")  # nothing fetched from elsewhere
        assert "<script src" not in body and "<link" not in body, body
    overrides = (*METRICS_ON, "smtpgate_watch = off")
    async with running_gate(tmp_path / "off", SEED_MAIN_CF, backend, overrides=overrides) as gate:
        port = await metrics_port(gate)
        assert "(metrics, healthz, readyz)" in gate.log
        assert (await http_get(port, "/watch"))[0] == 404
        assert (await http_get(port, "/watch/events"))[0] == 404


async def test_loopback_only_by_default() -> None:
    assert loopback(("127.0.0.1", 5000)) and loopback(("::1", 5000, 0, 0))
    assert loopback(("::ffff:127.0.0.5", 5000, 0, 0))
    assert not loopback(("10.0.0.1", 5000)) and not loopback(("2001:db8::1", 5000, 0, 0))
    assert not loopback(None)
    channel = WatchChannel()
    try:

        async def ready() -> tuple[bool, str]:
            return True, "ready"

        guarded = WatchEndpoint(None, ready, channel, "loopback")  # type: ignore[arg-type]
        assert (await guarded.route("/watch", ("10.0.0.1", 5000)))[0] == 403  # type: ignore[index]
        assert (await guarded.route("/watch/events", ("10.0.0.1", 5000)))[0] == 403  # type: ignore[index]
        assert (await guarded.route("/watch", ("127.0.0.1", 5000)))[0] == 200  # type: ignore[index]
        assert await guarded.route("/other", ("127.0.0.1", 5000)) is None
        opened = WatchEndpoint(None, ready, channel, "on")  # type: ignore[arg-type]
        assert (await opened.route("/watch", ("10.0.0.1", 5000)))[0] == 200  # type: ignore[index]
    finally:
        channel.close()


def test_nobody_watches_nothing_is_sent() -> None:
    """The flag is down: a worker builds no row; a full buffer drops rows, never blocks."""
    channel = WatchChannel()
    try:
        assert not channel.watched
        channel.set_watched(True)
        channel.set_watched(True)  # two pages (a reload: the old slot 0 and the new)
        channel.set_watched(False)
        assert channel.watched
        channel.set_watched(False)
        assert not channel.watched
        channel.set_watched(False)
        assert not channel.watched and channel.flag[0] == 0
        channel.set_watched(True)
        sent = 0
        start = time.monotonic()
        while channel.dropped == 0:  # fill the kernel's buffer: the sender never waits
            channel.send({"id": str(sent), "pad": "x" * 1000})
            sent += 1
        assert time.monotonic() - start < 5 and sent > 1
        rows = channel.receive(10**6)
        assert [row["id"] for row in rows] == [str(i) for i in range(sent - 1)]
    finally:
        channel.close()


def _browse(url: str, screenshot: Path, sent: asyncio.Future[None], loop: Any) -> dict[str, Any]:
    """In a thread: open the page in headless chromium, wait for it to be live, let the
    test send its sessions, wait for both rows; the DOM as read back."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Debian's chromium and chromium-driver (.ci/run)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, BROWSER_DEADLINE)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-live"))
        asyncio.run_coroutine_threadsafe(_set(sent), loop)
        done = "#rows tr[data-done='yes']"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) >= 2)
        rows = {}
        for tr in driver.find_elements(By.CSS_SELECTOR, done):
            cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            rows[cells[2]] = {
                "outcome": tr.get_attribute("data-outcome"),
                "class": tr.get_attribute("class"),
                "cells": cells,
                "colour": tr.value_of_css_property("background-color"),
            }
        counters = {
            (tr.get_attribute("data-rule"), tr.get_attribute("data-result")): int(
                tr.get_attribute("data-hits") or 0
            )
            for tr in driver.find_elements(By.CSS_SELECTOR, "#counters tr")
        }
        driver.save_screenshot(str(screenshot))
        return {"rows": rows, "counters": counters}
    finally:
        driver.quit()


async def _set(future: asyncio.Future[None]) -> None:
    future.set_result(None)


async def test_page_in_headless_chromium(tmp_path: Path, backend: RecordingBackend) -> None:
    async with running_gate(
        tmp_path, SEED_MAIN_CF, backend, SEED_TABLES, overrides=METRICS_ON
    ) as gate:
        port = await metrics_port(gate)
        loop = asyncio.get_running_loop()
        live: asyncio.Future[None] = loop.create_future()
        screenshot = tmp_path / "watch.png"
        browsing = asyncio.ensure_future(
            asyncio.to_thread(_browse, f"http://127.0.0.1:{port}/watch", screenshot, live, loop)
        )
        done, _ = await asyncio.wait({browsing, live}, timeout=BROWSER_DEADLINE * 2,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        assert live in done, browsing.result() if browsing.done() else "the page never went live"
        await send_two_sessions(gate)
        seen = await asyncio.wait_for(browsing, BROWSER_DEADLINE * 2)
    rows = seen["rows"]
    assert set(rows) == {"refused.example", "relayed.example"}, rows
    refused, relayed = rows["refused.example"], rows["relayed.example"]
    assert refused["outcome"] == "rejected" and refused["class"] == "rejected", refused
    assert relayed["outcome"] == "accepted" and relayed["class"] == "accepted", relayed
    assert refused["colour"] != relayed["colour"], rows  # coloured by outcome
    assert "a@qq.com" in refused["cells"][3] and "554 5.7.1" in refused["cells"][4], refused
    assert "check_sender_access" in refused["cells"][5], refused
    assert "END-OF-DATA 250" in relayed["cells"][6], relayed
    rule = f"check_sender_access hash:{tmp_path}/restricted_senders"
    assert seen["counters"].get((rule, "reject")) == 1, seen["counters"]
    data = screenshot.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n"), len(data)


def test_a_bad_value_names_file_and_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "main.cf"
    config.write_text("myhostname = mx.example.org\nsmtpgate_watch = maybe\n")
    done = subprocess.run(
        [sys.executable, "-m", "smtpgate", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done
    expected = f"{config}, line 2: error: smtpgate_watch = maybe: give off, loopback or on"
    assert expected in done.stdout + done.stderr, done
    config.write_text(
        "myhostname = mx.example.org\nrelayhost = [10.0.0.25]:25\nsmtpgate_watch = ON\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "smtpgate", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done


def _session(channel: WatchChannel) -> SessionWatch:
    from smtpgate.smtp.ports import NO_METRICS

    return SessionWatch(channel, NO_METRICS, "192.0.2.1", 4000)


def _last_row(channel: WatchChannel) -> dict[str, Any]:
    rows = channel.receive(10**6)
    assert rows
    return rows[-1]


def test_outcomes_of_a_row() -> None:
    """The outcome a row is coloured by, from the replies and verdicts the session saw."""
    from smtpgate.reply import Reply

    channel = WatchChannel()
    try:
        deferred = _session(channel)
        deferred.reply(Reply(220, "", "mx.example.org ESMTP"))
        assert _last_row(channel)["outcome"] == "open"
        deferred.command("HELO client.example")
        deferred.reply(Reply(250, "", "mx.example.org"))
        deferred.command("MAIL FROM:<a@example.com> SIZE=10")
        deferred.reply(Reply(250, "2.1.0", "Ok"))
        deferred.command("RCPT TO:<b@example.net>")
        deferred.restriction("RCPT", "check_policy_service inet:127.0.0.1:10023", "defer")
        deferred.reply(Reply(450, "4.2.0", "<b@example.net>: Recipient address rejected"))
        deferred.disconnect()
        row = _last_row(channel)
        assert row["outcome"] == "deferred" and row["done"], row
        assert row["sender"] == "a@example.com" and row["helo"] == "client.example", row
        assert row["decided"] == "check_policy_service inet:127.0.0.1:10023 (RCPT defer)"
        assert row["client"] == "unknown[192.0.2.1]:4000", row

        discarded = _session(channel)
        discarded.command("EHLO client.example")
        discarded.reply(Reply(250, "", "mx.example.org"))
        discarded.command("DATA")
        discarded.reply(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))
        discarded.milter_verdict("END-OF-MESSAGE", "discard")
        discarded.reply(Reply(250, "2.0.0", "Ok: queued as ABC"))
        assert _last_row(channel)["outcome"] == "discarded"

        many = _session(channel)
        for index in range(30):
            many.command(f"RCPT TO:<r{index}@example.net>")
            many.reply(Reply(250, "2.1.5", "Ok"))
        many.command("BDAT 10 LAST")
        many.reply(Reply(554, "5.7.1", "no"))
        row = _last_row(channel)
        assert len(row["recipients"]) == 20 and row["more_recipients"] == 10, row
        assert row["outcome"] == "rejected" and row["messages"][0]["result"] == "rejected"
    finally:
        channel.close()
