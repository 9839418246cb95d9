"""Fixtures: the real milters of ``daemons.py``, each started once per test session.

``rspamd_milter``, ``clamav_milter`` (its signature: :data:`EICAR_LIKE`), ``dkim_signer``
and ``dkim_verifier`` (with ``milter_dns``, the loopback DNS server that publishes the
signer's key) are session-scoped: rspamd takes 20-30 s to start. Tests must not stop them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dns.dnsserver import FakeDns
from tests.milter.daemons import (
    Daemon,
    OpenDkim,
    ndb_signature,
    start_clamav,
    start_opendkim,
    start_rspamd,
)

EICAR_LIKE = b"SMTPGATE-CLAMAV-TEST-SIGNATURE-7f3a9c"
"""A body containing this is infected for the ClamAV fixture (``Smtpgate.Test.Sig``)."""
RSPAMD_CACHE = Path("/var/tmp/smtpgate-test-rspamd-hs")
"""rspamd's compiled regular expressions, kept between runs to start faster."""


@pytest.fixture(scope="session")
def daemon_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="smtpgate-milters-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def milter_dns() -> Iterator[FakeDns]:
    server = FakeDns().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rspamd_milter(daemon_dir: Path, milter_dns: FakeDns) -> Iterator[Daemon]:
    with start_rspamd(
        daemon_dir / "rspamd", dns=milter_dns.address, cache_dir=RSPAMD_CACHE
    ) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def clamav_milter(daemon_dir: Path) -> Iterator[Daemon]:
    signature = ndb_signature("Smtpgate.Test.Sig", EICAR_LIKE)
    with start_clamav(daemon_dir / "clamav", [signature]) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def dkim_signer(daemon_dir: Path, milter_dns: FakeDns) -> Iterator[OpenDkim]:
    with start_opendkim(daemon_dir / "dkim-signer", mode="s", internal_hosts="0.0.0.0/0") as daemon:
        record = daemon.txt_record
        strings = " ".join(f'"{record[i : i + 200]}"' for i in range(0, len(record), 200))
        milter_dns.add(daemon.key_name, "TXT", strings)
        yield daemon


@pytest.fixture(scope="session")
def dkim_verifier(
    daemon_dir: Path, milter_dns: FakeDns, dkim_signer: OpenDkim
) -> Iterator[OpenDkim]:
    with start_opendkim(
        daemon_dir / "dkim-verifier", mode="v", selector="verifier", dns=milter_dns.address
    ) as daemon:
        yield daemon
