"""The private folders serve makes for its workers before it forks them.

The spool (``smtpgate_spool_directory``) and the metric files
(``smtpgate_metrics_directory``) are both written by the workers after they dropped
root: a configured folder is made if missing, a missing setting means a new folder under
$TMPDIR; either way it ends mode 0700 and owned by the workers' user.
"""

from __future__ import annotations

import os
import stat
import tempfile

from smtpgate.errors import ConfigError


def worker_directory(
    parameter: str, configured: str, owner: tuple[int, int] | None, prefix: str
) -> tuple[str, bool]:
    """Make the folder ``parameter`` names (``configured``; empty: a new temporary one
    named ``prefix``...), mode 0700, owned by ``owner`` (uid, gid) when given.  Returns
    the folder and whether it is temporary (serve removes it at the end).  A folder that
    cannot be made is a ConfigError naming the parameter."""
    if configured:
        path = os.path.abspath(configured)
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise NotADirectoryError(path)
            _own(path, owner)
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise ConfigError(f"{parameter} = {configured}: {why}") from None
        return path, False
    path = tempfile.mkdtemp(prefix=prefix)
    _own(path, owner)
    return path, True


def _own(path: str, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        os.chown(path, *owner)
    os.chmod(path, 0o700)
