"""Container health check: is smtpgate answering SMTP?

Connects to HOST:PORT (the argument, else $SMTPGATE_HEALTHCHECK, else 127.0.0.1:25),
expects the 220 greeting, says QUIT, and exits 0; anything else (refused, timeout, a 421
or 554 greeting) exits 1 with one line saying why.  It tests the process that serves
mail, not just the configuration file, and needs nothing but Python's standard library.
Every probe is a session in the log ("connect from unknown[127.0.0.1]" ...
"disconnect from unknown[127.0.0.1] quit=1 commands=1").
"""

from __future__ import annotations

import os
import smtplib
import sys


def probe(address: str, timeout: float = 5.0) -> str | None:
    """None when HOST:PORT greets with 220, else the reason."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        client = smtplib.SMTP(timeout=timeout)
        code, text = client.connect(host, int(port))
    except (OSError, ValueError, smtplib.SMTPException) as exc:
        return f"{address}: {exc}"
    try:
        if code != 220:
            return f"{address}: greeting {code} {text.decode(errors='replace')}"
        client.quit()
    except (OSError, smtplib.SMTPException):
        pass  # the greeting was 220: the server is up
    finally:
        client.close()
    return None


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else os.environ.get("SMTPGATE_HEALTHCHECK", "127.0.0.1:25")
    problem = probe(address)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
