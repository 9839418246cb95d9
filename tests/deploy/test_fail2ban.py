"""The fail2ban filter and jail of deploy/fail2ban/, run by Debian's fail2ban
(``fail2ban-regex``, ``fail2ban-client --test``) on logs in smtpgate's exact format:
lines written by ``smtpgate.logs.MailLog`` from ``smtpgate explain --json`` output, and
the log of a live ``smtpgate serve``. The stock ``postfix`` filter is run too, to show
what it catches of smtpgate's lines and what it misses."""

from __future__ import annotations

import json
import shutil
import smtplib
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from smtpgate.logs import MailLog
from tests.deploy.conftest import LiveGate

ROOT = Path(__file__).parents[2]
FILTER = ROOT / "deploy" / "fail2ban" / "filter.d" / "smtpgate.conf"
JAIL = ROOT / "deploy" / "fail2ban" / "jail.d" / "smtpgate.local"
EXAMPLE = ROOT / "examples" / "main.cf"
FAIL2BAN = Path("/etc/fail2ban")
STOCK_POSTFIX = FAIL2BAN / "filter.d" / "postfix.conf"

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(
        shutil.which("fail2ban-regex") is None or not STOCK_POSTFIX.exists(),
        reason="Debian's fail2ban is not installed (tests/system-deps.sh installs it)",
    ),
]

# (client, helo, sender, recipient, overrides) -> the reply explain prints.
ENVELOPES = [
    # The seed: a 521 sender reject (and a disconnect).
    ("203.0.113.82", "me.testing.example.com", "318787866@qq.com", "foo@bar.org", ()),
    # The same from IPv6.
    ("2001:db8::25", "mail.163.com", "someone@163.com", "foo@bar.org", ()),
    # A relay attempt: 454 at compatibility_level 3.6 (defer_unauth_destination).
    ("198.51.100.9", "x.example.net", "a@example.net", "b@elsewhere.example", ()),
    # A relay attempt with Postfix's classic relay restrictions: 554.
    (
        "198.51.100.10",
        "x.example.net",
        "a@example.net",
        "b@elsewhere.example",
        ("smtpd_relay_restrictions=permit_mynetworks, reject_unauth_destination",),
    ),
    # A bare HELO name: 504 need fully-qualified hostname.
    (
        "192.0.2.50",
        "localhost",
        "a@example.net",
        "foo@bar.org",
        ("smtpd_helo_restrictions=reject_non_fqdn_helo_hostname",),
    ),
    # Accepted: no reject line.
    ("192.0.2.33", "mail.example.net", "friend@example.net", "foo@bar.org", ()),
    # Our fault, not the sender's: 451 4.3.5 Server configuration error. Never banned.
    (
        "192.0.2.34",
        "mail.example.net",
        "friend@example.net",
        "foo@bar.org",
        ("smtpd_sender_restrictions=check_sender_access hash:/nonexistent/table",),
    ),
]
REPLIES = [
    "521 5.7.1 <318787866@qq.com>: Sender address rejected: go away",
    "521 5.7.1 <someone@163.com>: Sender address rejected: go away",
    "454 4.7.1 <b@elsewhere.example>: Relay access denied",
    "554 5.7.1 <b@elsewhere.example>: Relay access denied",
    "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname",
    "250 2.1.5 Ok",
    "451 4.3.5 <friend@example.net>: Sender address rejected: Server configuration error",
]

# Lines only a live session produces (formats of smtpd.py, docs/operations.md).
SERVE_ONLY = [
    # A reject inside a transaction carries its queue id instead of NOQUEUE.
    "4F2A100001: client=unknown[192.0.2.40]",
    "4F2A100001: reject: RCPT from unknown[192.0.2.40]: 554 5.7.1 <c@elsewhere.example>: "
    "Relay access denied; from=<a@example.net> to=<c@elsewhere.example> proto=ESMTP "
    "helo=<mail.example.net>",
    # The backend refuses a recipient (address harvesting shows this way).
    "4F2A100002: proxy-reject: RCPT from unknown[192.0.2.41]: 550 5.1.1 <nobody@bar.org>: "
    "Recipient address rejected: User unknown in virtual mailbox table; "
    "from=<a@example.net> to=<nobody@bar.org> proto=ESMTP helo=<mail.example.net> "
    "relay=backend[10.0.0.25]:25",
    # Delivered; and a backend fault (never the client's): neither is banned.
    "4F2A100003: proxy-accept: END-OF-MESSAGE from unknown[192.0.2.33]: 250 2.0.0 Ok: "
    "queued as 4XyZ; from=<friend@example.net> to=<foo@bar.org> proto=ESMTP "
    "helo=<mail.example.net> relay=backend[10.0.0.25]:25",
    "4F2A100004: proxy-reject: END-OF-MESSAGE from unknown[192.0.2.35]: 451 4.3.0 Error: "
    "queue file write error; from=<friend@example.net> to=<foo@bar.org> proto=ESMTP "
    "helo=<mail.example.net> relay=backend[10.0.0.25]:25",
    # An HTTP request to port 25.
    "warning: non-SMTP command from unknown[198.51.100.3]: GET / HTTP/1.1",
    "timeout after RCPT from unknown[192.0.2.36]",
]


def explain(
    client: str, helo: str, sender: str, rcpt: str, overrides: tuple[str, ...]
) -> dict[str, Any]:
    args = [sys.executable, "-m", "smtpgate", "explain", "-c", str(EXAMPLE), "--json"]
    for override in overrides:
        args += ["-o", override]
    args += ["--client", client, "--helo", helo, "--from", sender, "--to", rcpt]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture(scope="module")
def maillog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log written by MailLog: explain's log lines framed by connect/disconnect, then the
    serve-only lines, then one line with syslog_name = smtpgate."""
    path = tmp_path_factory.mktemp("f2b") / "maillog"
    log = MailLog("mx.example.org", "postfix", path=str(path))
    for envelope, expected in zip(ENVELOPES, REPLIES, strict=True):
        data = explain(*envelope)
        assert data["reply"] == [expected]
        client = f"unknown[{envelope[0]}]"
        log.info(f"connect from {client}")
        for exchange in [data["greeting"], *data["exchanges"]]:
            for line in exchange["logs"]:
                log.info(line)
        log.info(f"disconnect from {client} helo=1 mail=1 rcpt=0/1 commands=2/3")
    for line in SERVE_ONLY:
        if line.startswith("warning: "):
            log.warning(line.removeprefix("warning: "))
        else:
            log.info(line)
    log.close()
    renamed = MailLog("mx.example.org", "smtpgate", path=str(path))
    renamed.info(
        "NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <d@elsewhere.example>: "
        "Relay access denied; from=<a@example.net> to=<d@elsewhere.example> proto=SMTP "
        "helo=<x.example.net>"
    )
    renamed.close()
    return path


def filter_copy(tmp_path: Path) -> Path:
    """The filter beside Debian's common.conf, which it includes."""
    folder = tmp_path / "filter.d"
    folder.mkdir(exist_ok=True)
    shutil.copy(FAIL2BAN / "filter.d" / "common.conf", folder)
    shutil.copy(FILTER, folder)
    return folder / FILTER.name


def matched_hosts(log: Path, filter_path: Path) -> Counter[str]:
    result = subprocess.run(
        ["fail2ban-regex", "--out", "ip", str(log), str(filter_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return Counter(line.strip() for line in result.stdout.splitlines() if line.strip())


def test_log_is_in_postfix_format(maillog: Path) -> None:
    lines = maillog.read_text().splitlines()
    rejects = sum(not reply.startswith("250") for reply in REPLIES)  # one log line each
    assert len(lines) == 2 * len(ENVELOPES) + rejects + len(SERVE_ONLY) + 1
    assert all(" mx postfix/smtpd[" in line for line in lines[:-1])
    assert " mx smtpgate/smtpd[" in lines[-1]


def test_smtpgate_filter(maillog: Path, tmp_path: Path) -> None:
    hosts = matched_hosts(maillog, filter_copy(tmp_path))
    assert hosts == Counter(
        {
            "203.0.113.82": 1,  # 521 sender rejected
            "2001:db8::25": 1,  # 521, IPv6
            "198.51.100.9": 1,  # 454 relay access denied
            "198.51.100.10": 1,  # 554 relay access denied
            "192.0.2.50": 1,  # 504 HELO
            "192.0.2.40": 1,  # queue-id form
            "192.0.2.41": 1,  # proxy-reject RCPT 550 from the backend
            "198.51.100.3": 1,  # non-SMTP command
            "192.0.2.99": 1,  # syslog_name = smtpgate
        }
    )
    # Not banned: accepted mail (192.0.2.33), 451 server configuration error (192.0.2.34),
    # 451 backend fault (192.0.2.35), timeout (192.0.2.36).


def test_stock_postfix_filter(maillog: Path) -> None:
    """Debian's postfix filter catches the classic rejects, but neither 521 replies,
    proxy-reject, nor non-SMTP commands; nor another syslog_name than postfix."""
    hosts = matched_hosts(maillog, STOCK_POSTFIX)
    assert hosts == Counter(
        {"198.51.100.9": 1, "198.51.100.10": 1, "192.0.2.50": 1, "192.0.2.40": 1}
    )


def test_jail_loads(tmp_path: Path, maillog: Path) -> None:
    """The jail file and the filter in a copy of Debian's /etc/fail2ban."""
    config = tmp_path / "fail2ban"
    shutil.copytree(FAIL2BAN, config)
    for stray in (config / "jail.d").iterdir():
        stray.unlink()  # Debian's defaults (sshd) need logs this machine may not have
    shutil.copy(FILTER, config / "filter.d")
    jail = JAIL.read_text()
    assert "logpath  = /var/log/smtpgate/maillog" in jail
    (config / "jail.d" / JAIL.name).write_text(
        jail.replace("/var/log/smtpgate/maillog", str(maillog))
    )
    test = subprocess.run(
        ["fail2ban-client", "-c", str(config), "--test"], capture_output=True, text=True
    )
    assert test.returncode == 0, test.stdout + test.stderr
    dump = subprocess.run(
        ["fail2ban-client", "-c", str(config), "-d"], capture_output=True, text=True
    )
    assert dump.returncode == 0, dump.stderr
    assert "['add', 'smtpgate', 'polling']" in dump.stdout
    assert f"['set', 'smtpgate', 'addlogpath', '{maillog}', 'head']" in dump.stdout
    assert "['set', 'smtpgate', 'maxretry', 5]" in dump.stdout


def _session(port: int, source: str, sender: str, recipients: list[str]) -> None:
    client = smtplib.SMTP(timeout=10, source_address=(source, 0))
    client.connect("127.0.0.1", port)
    try:
        client.ehlo("mail.example.net")
        client.mail(sender)
        accepted = False
        for rcpt in recipients:
            code, _ = client.rcpt(rcpt)
            accepted = accepted or code == 250
        if accepted:
            client.data(b"Subject: hello\r\n\r\nhi there\r\n")
        client.quit()
    except smtplib.SMTPServerDisconnected:
        pass  # 521: smtpgate closed the connection
    finally:
        client.close()


def test_filter_on_a_live_serve_log(live_gate: LiveGate, tmp_path: Path) -> None:
    """Sessions from loopback addresses (the example trusts no network) to a running
    smtpgate serve; fail2ban reads the log serve wrote."""
    port = live_gate.port
    _session(port, "127.0.0.2", "318787866@qq.com", ["foo@bar.org"])  # 521 + close
    _session(port, "127.0.0.3", "a@example.net", ["b@elsewhere.example"])  # 454 relay
    # A good recipient, then a relay attempt in the same transaction (queue-id form),
    # then the message is delivered.
    _session(port, "127.0.0.5", "friend@example.net", ["foo@bar.org", "c@elsewhere.example"])
    with socket.create_connection(("127.0.0.1", port), 10, ("127.0.0.4", 0)) as http:
        http.recv(512)
        http.sendall(b"GET / HTTP/1.1\r\nHost: mx\r\n\r\n")
        assert http.recv(512).startswith(b"221 2.7.0 Error: I can break rules, too.")
    log = live_gate.log()
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 521 5.7.1" in log
    assert "proxy-accept: END-OF-MESSAGE from unknown[127.0.0.5]: 250 2.0.0" in log
    hosts = matched_hosts(live_gate.maillog, filter_copy(tmp_path))
    assert hosts == Counter({"127.0.0.2": 1, "127.0.0.3": 1, "127.0.0.4": 1, "127.0.0.5": 1})
    stock = matched_hosts(live_gate.maillog, STOCK_POSTFIX)
    assert stock == Counter({"127.0.0.3": 1, "127.0.0.5": 1})


def test_postscreen_rejects_are_banned(tmp_path: Path) -> None:
    """postscreen's lines as smtpgate logs them: both filters ban the client postscreen
    enforced (its NOQUEUE reject at RCPT), and nothing of a passing client."""
    path = tmp_path / "maillog"
    maillog = MailLog("mx.example.org", "postfix", path=str(path))
    postscreen = maillog.program("postscreen")
    postscreen.info("CONNECT from [192.0.2.60]:40001 to [192.0.2.25]:25")
    postscreen.info("DNSBL rank 3 for [192.0.2.60]:40001")
    postscreen.info(
        "NOQUEUE: reject: RCPT from [192.0.2.60]:40001: 550 5.7.1 Service unavailable; "
        "client [192.0.2.60] blocked using zen.test; from=<a@example.net>, "
        "to=<b@example.org>, proto=ESMTP, helo=<bot.example>"
    )
    postscreen.info("DISCONNECT [192.0.2.60]:40001")
    postscreen.info("CONNECT from [192.0.2.61]:40002 to [192.0.2.25]:25")
    postscreen.info("PASS NEW [192.0.2.61]:40002")
    maillog.close()
    assert " mx postfix/postscreen[" in path.read_text()
    assert matched_hosts(path, filter_copy(tmp_path)) == Counter({"192.0.2.60": 1})
    assert matched_hosts(path, STOCK_POSTFIX) == Counter({"192.0.2.60": 1})
