"""Run the ``smtpgate`` command as another user, where that user cannot start Python.

``python -m tests.as_user USER ARGS...`` imports what the command needs while still root,
becomes USER (uid, gid, no supplementary groups) and runs ``smtpgate ARGS...``.  It stands
for a process that is unprivileged from the start -- the Docker image's user, an admin's
own account -- on machines (this one, CI) where the interpreter lives under /root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import sys


def main() -> None:
    user, *args = sys.argv[1:]
    import smtpgate.cli
    import smtpgate.supervisor
    from smtpgate.server import preload_modules

    preload_modules()
    # The codec of serve's pid file: Python imports it on first use, which the user cannot
    # do here (a real non-root deployment reads its standard library, so serve does not).
    import encodings.ascii  # noqa: F401

    # The same for the metrics listener's library (smtpgate_metrics_listen), when installed.
    with contextlib.suppress(ImportError):
        import prometheus_client
        import prometheus_client.multiprocess  # noqa: F401

    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    sys.argv = ["smtpgate", *args]
    smtpgate.cli.main()


if __name__ == "__main__":
    main()
