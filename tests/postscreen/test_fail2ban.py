"""postscreen's lines, as smtpgate logs them, are caught by fail2ban: smtpgate's own
filter (deploy/fail2ban/) and Debian's stock postfix filter ban a client that postscreen
enforced (its NOQUEUE reject at RCPT), and nothing else of a passing client."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from smtpgate.logs import MailLog

ROOT = Path(__file__).parents[2]
FILTER = ROOT / "deploy" / "fail2ban" / "filter.d" / "smtpgate.conf"
FAIL2BAN = Path("/etc/fail2ban")
STOCK_POSTFIX = FAIL2BAN / "filter.d" / "postfix.conf"

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(
        shutil.which("fail2ban-regex") is None or not STOCK_POSTFIX.exists(),
        reason="Debian's fail2ban is not installed (tests/system-deps.sh installs it)",
    ),
]


def hosts(log: Path, filter_path: Path) -> Counter[str]:
    result = subprocess.run(
        ["fail2ban-regex", "--out", "ip", str(log), str(filter_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return Counter(line.strip() for line in result.stdout.splitlines() if line.strip())


def test_postscreen_rejects_are_banned(tmp_path: Path) -> None:
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
    folder = tmp_path / "filter.d"
    folder.mkdir()
    shutil.copy(FAIL2BAN / "filter.d" / "common.conf", folder)
    shutil.copy(FILTER, folder)
    assert hosts(path, folder / FILTER.name) == Counter({"192.0.2.60": 1})
    assert hosts(path, STOCK_POSTFIX) == Counter({"192.0.2.60": 1})
