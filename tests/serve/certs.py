"""Throwaway X.509 material for TLS tests, made with the ``openssl`` command line.

:func:`test_pki` returns (and caches for the test session) a small PKI in a temporary
folder:

- ``ca_cert`` -- a self-signed test CA;
- ``server_cert`` / ``server_key`` -- a server certificate signed by that CA, valid for
  ``DNS:localhost``, ``DNS:backend.test``, ``DNS:mx.backend.test`` and ``IP:127.0.0.1``,
  ``IP:::1`` (subject CN ``backend.test``);
- ``client_cert`` / ``client_key`` -- a client certificate signed by the same CA;
- ``other_ca_cert`` -- an unrelated CA, for "wrong trust anchor" tests.

The ``cryptography`` package is not a dependency of smtpgate, so the command line is used;
EC P-256 keys keep generation fast (well under a second).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SERVER_NAMES = ("localhost", "backend.test", "mx.backend.test")
SERVER_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class TestPKI:
    """Paths of the PEM files of one throwaway PKI."""

    __test__ = False  # not a pytest test class

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key.name, "-out", cert.name, "-days", "3",
        "-subj", f"/CN=smtpgate {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _make_leaf(
    directory: Path, name: str, ca: tuple[Path, Path], cn: str, extensions: str
) -> tuple[Path, Path]:
    cert, key, csr = directory / f"{name}.pem", directory / f"{name}.key", f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key.name, "-out", csr, "-subj", f"/CN={cn}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0].name, "-CAkey", ca[1].name,
        "-CAcreateserial", "-out", cert.name, "-days", "2", "-extfile", ext.name,
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_test_pki(directory: Path) -> TestPKI:
    """Create the PKI described in the module docstring inside *directory*."""
    ca = _make_ca(directory, "ca")
    other = _make_ca(directory, "other-ca")
    alt = ",".join([*(f"DNS:{n}" for n in SERVER_NAMES), *(f"IP:{ip}" for ip in SERVER_IPS)])
    server = _make_leaf(
        directory,
        "server",
        ca,
        "backend.test",
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={alt}\n",
    )
    client = _make_leaf(
        directory,
        "client",
        ca,
        "smtpgate.test",
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n"
        "subjectAltName=DNS:smtpgate.test\n",
    )
    return TestPKI(directory, ca[0], server[0], server[1], client[0], client[1], other[0])


@functools.cache
def test_pki() -> TestPKI:
    """The session-wide PKI (made on first use, removed at interpreter exit)."""
    directory = Path(tempfile.mkdtemp(prefix="smtpgate-pki-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return make_test_pki(directory)


test_pki.__test__ = False  # type: ignore[attr-defined]
make_test_pki.__test__ = False  # type: ignore[attr-defined]
