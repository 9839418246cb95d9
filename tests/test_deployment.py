"""`smtpgate serve` as it is deployed: root, workers, root-only keys, reload, shared ports.

Every test here runs the CLI as a process tree (supervisor + workers), and, when the suite
runs as root (CI does), with the privilege drop to ``nobody`` and key files that only root
may read, as Let's Encrypt leaves them.
"""

from __future__ import annotations

import hashlib
import pwd
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.processes import children, session, wait_until
from tests.test_newcomer import IS_ROOT, SMTPGATE, free_port, write_config

pytestmark = pytest.mark.deploy

needs_root = pytest.mark.skipif(not IS_ROOT, reason="root-only files need root")


def make_cert(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key (EC P-256), both mode 600 (root-only when
    the suite runs as root)."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    cert.chmod(0o600)
    key.chmod(0o600)
    return cert, key


def fingerprint_of(cert: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return hashlib.sha256(der).hexdigest()


def starttls_fingerprint(port: int) -> str:
    """The SHA-256 of the certificate a STARTTLS session on ``port`` is shown."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        stream = raw.makefile("rwb")

        def command(line: str) -> str:
            stream.write(line.encode() + b"\r\n")
            stream.flush()
            while (answer := stream.readline().decode())[3:4] == "-":
                pass
            return answer

        assert stream.readline().startswith(b"220")
        command("EHLO client.example")
        assert command("STARTTLS").startswith("220")
        with context.wrap_socket(raw, server_hostname="mx.example.org") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            tls.sendall(b"QUIT\r\n")
            return hashlib.sha256(der).hexdigest()


def command(args: tuple[str, ...] | list[str], user: str | None) -> list[str]:
    """The command line of ``smtpgate args`` run as ``user`` (None: as the suite runs)."""
    if user is None:
        return [*SMTPGATE, *args]
    return [sys.executable, "-m", "tests.as_user", user, *args]


def run_cli(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(args, user), capture_output=True, text=True, timeout=120)


class Serving:
    """A running `smtpgate serve`: the process, its port, its folder and log."""

    def __init__(self, proc: subprocess.Popen[str], port: int, folder: Path, cf: Path) -> None:
        self.proc, self.port, self.folder, self.cf = proc, port, folder, cf
        self.pid_file = folder / "smtpgate.pid"

    @property
    def log(self) -> str:
        path = self.folder / "maillog"
        return path.read_text() if path.exists() else ""

    def reload(self, user: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli("reload", "-c", str(self.cf), "-o", f"pid_file={self.pid_file}", user=user)


@contextmanager
def serving(
    folder: Path, *options: str, workers: int = 2, user: str | None = None
) -> Iterator[Serving]:
    """`smtpgate serve` on a free port with ``workers`` workers, as ``user`` (default: the
    suite's own user, which drops to nobody when it is root)."""
    port = free_port()
    cf = folder / "main.cf"
    args = [
        "serve", "-c", str(cf),
        "-o", f"listen=127.0.0.1:{port}",
        "-o", f"pid_file={folder / 'smtpgate.pid'}",
        "-o", f"maillog_file={folder / 'maillog'}",
        "-o", "smtpgate_user=nobody",
        "-o", f"smtpgate_workers={workers}",
        *options,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command(args, user), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    server = Serving(proc, port, folder, cf)
    try:
        assert wait_until(
            lambda: server.log.count("smtpgate listening on") >= workers or proc.poll() is not None
        ), server.log
        assert proc.poll() is None, proc.communicate(timeout=10)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"serve did not stop within 30 s:\n{server.log}") from None


@pytest.fixture
def etc(public_dir: Path) -> Path:
    folder = public_dir / "etc"
    write_config(folder)
    return folder


def with_tls(folder: Path, cert: Path, key: Path) -> None:
    cf = folder / "main.cf"
    cf.write_text(
        cf.read_text()
        + "smtpd_tls_security_level = may\n"
        + f"smtpd_tls_cert_file = {cert}\n"
        + f"smtpd_tls_key_file = {key}\n"
    )


def root_only_tls(etc: Path, folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate and key in ``folder`` (mode 700, as /etc/letsencrypt/live), used by
    the main.cf in ``etc``."""
    folder.mkdir(mode=0o700)
    cert, key = make_cert(folder, name)
    with_tls(etc, cert, key)
    return cert, key


def all_fingerprints(port: int, count: int = 8) -> set[str]:
    """The certificates of ``count`` sessions (spread over the workers by the kernel)."""
    return {starttls_fingerprint(port) for _ in range(count)}


@needs_root
def test_root_only_key_is_read_before_the_privilege_drop(etc: Path, public_dir: Path):
    cert, _ = root_only_tls(etc, public_dir / "private", "mx-one")
    with serving(etc) as server:
        assert all_fingerprints(server.port) == {fingerprint_of(cert)}
        workers = children(server.proc.pid)
        assert len(workers) == 2
        nobody = str(pwd.getpwnam("nobody").pw_uid)
        for pid in workers:
            status = Path(f"/proc/{pid}/status").read_text()
            assert f"Uid:\t{nobody}\t{nobody}" in status
        assert "Permission denied" not in server.log


@needs_root
def test_certificate_renewal_then_reload_serves_the_new_certificate(etc: Path, public_dir: Path):
    keys = public_dir / "live"
    cert, key = root_only_tls(etc, keys, "mx-2026")
    with serving(etc) as server:
        assert all_fingerprints(server.port) == {fingerprint_of(cert)}
        # certbot writes the new files, then its deploy hook runs `systemctl reload`
        renewed, renewed_key = make_cert(keys, "mx-2027")
        renewed.replace(cert)
        renewed_key.replace(key)
        result = server.reload()
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"smtpgate: reloaded {server.cf}\n"
        # the verdict came once the new workers listened: every new session sees it
        assert all_fingerprints(server.port, 12) == {fingerprint_of(cert)}


def test_unreadable_key_names_the_file_and_the_parameter(etc: Path, public_dir: Path):
    cert, key = make_cert(public_dir, "mx")
    with_tls(etc, cert, public_dir / "missing.key")
    result = run_cli("check", "-c", str(etc / "main.cf"))
    assert result.returncode == 2
    number = (
        (etc / "main.cf")
        .read_text()
        .splitlines()
        .index(f"smtpd_tls_key_file = {public_dir / 'missing.key'}")
    )
    line = f"error: {etc / 'main.cf'}, line {number + 1}: smtpd_tls_key_file: cannot read "
    assert f"{line}{public_dir / 'missing.key'}: No such file or directory" in result.stderr


@needs_root
def test_root_only_key_checked_as_another_user_names_file_and_parameter(
    etc: Path, public_dir: Path
):
    cert, key = make_cert(public_dir, "mx")
    with_tls(etc, cert, key)
    result = run_cli("check", "-c", str(etc / "main.cf"), user="nobody")
    assert result.returncode == 2
    assert f"smtpd_tls_cert_file: cannot read {cert}: Permission denied" in result.stderr


def test_failed_reload_exits_nonzero_with_the_reason_and_keeps_serving(etc: Path):
    with serving(etc) as server:
        assert session(server.port, "someone@qq.com").startswith("554")
        cf = etc / "main.cf"
        cf.write_text(cf.read_text() + "smtpd_sender_restrictions = permit_mynetwork\n")
        result = server.reload()
        assert result.returncode == 2
        assert 'unknown restriction "permit_mynetwork"' in result.stderr
        assert "reload failed: 1 error(s) in the configuration" in result.stderr
        assert "the running configuration is kept" in result.stderr
        assert "reload failed" in server.log
        assert session(server.port, "someone@qq.com").startswith("554")


@needs_root
def test_reload_reads_root_only_tables(etc: Path):
    """The supervisor stays root: a table only root may read loads at a reload too."""
    senders = etc / "senders"
    senders.chmod(0o600)
    with serving(etc) as server:
        assert session(server.port, "someone@qq.com").startswith("554")
        senders.write_text("qq.com 521 go away\n")
        senders.chmod(0o600)
        assert server.reload().returncode == 0
        assert session(server.port, "someone@qq.com").startswith("521 5.7.1")


def reuseport_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_refuses_a_port_another_mta_shares(etc: Path, workers: int):
    """An MTA that set SO_REUSEPORT would otherwise split the connections with us."""
    with reuseport_socket(0) as other:
        port = other.getsockname()[1]
        result = run_cli(
            "serve", "-c", str(etc / "main.cf"), "-o", f"listen=127.0.0.1:{port}",
            "-o", "pid_file=", "-o", "smtpgate_user=nobody", "-o", f"smtpgate_workers={workers}",
        )  # fmt: skip
    assert result.returncode == 3
    assert result.stderr == (
        f"smtpgate: fatal: cannot listen on 127.0.0.1:{port}: the address is already in use "
        "(another smtpgate or MTA runs there): stop it, or change listen\n"
    )


def test_a_later_process_on_the_port_gets_no_connection(etc: Path):
    with serving(etc) as server, reuseport_socket(server.port) as intruder:
        intruder.setblocking(False)
        for _ in range(40):
            assert session(server.port, "someone@qq.com").startswith("554")
        with pytest.raises(BlockingIOError):
            intruder.accept()


def test_second_serve_with_the_same_pid_file_is_refused(etc: Path):
    with serving(etc) as server:
        result = run_cli(
            "serve", "-c", str(server.cf), "-o", f"listen=127.0.0.1:{free_port()}",
            "-o", f"pid_file={server.pid_file}", "-o", "smtpgate_user=nobody",
        )  # fmt: skip
        assert result.returncode == 2
        assert "another smtpgate serve runs with this pid_file" in result.stderr


@needs_root
def test_docker_reload_with_a_root_owned_run_directory(etc: Path, public_dir: Path):
    """The image runs serve as an unprivileged user; `--tmpfs /run/smtpgate` comes up
    root-owned, mode 755, so the pid file cannot be written.  `docker exec smtpgate
    smtpgate reload` (the same user) must still reach the server."""
    run_dir = public_dir / "run-smtpgate"
    run_dir.mkdir(mode=0o755)
    etc.chmod(0o755)
    (etc / "maillog").touch()
    (etc / "maillog").chmod(0o666)
    with serving(etc, "-o", f"pid_file={run_dir / 'smtpgate.pid'}", user="nobody") as server:
        server.pid_file = run_dir / "smtpgate.pid"
        assert not server.pid_file.exists()
        assert "smtpgate reload reaches the server without it" in server.log
        (etc / "senders").write_text("qq.com 521 go away\n")
        result = server.reload(user="nobody")
        assert result.returncode == 0, result.stderr
        assert session(server.port, "someone@qq.com").startswith("521 5.7.1")
        other = pwd.getpwnam("daemon").pw_name
        refused = server.reload(user=other)
        assert refused.returncode == 2
        assert "permission denied" in refused.stderr


def test_reload_without_a_server_says_so(etc: Path):
    result = run_cli("reload", "-c", str(etc / "main.cf"), "-o", f"pid_file={etc / 'smtpgate.pid'}")
    assert result.returncode == 3
    assert "no smtpgate serve answers for pid_file" in result.stderr


def test_reload_lets_open_sessions_finish_under_the_old_rules(etc: Path):
    """As with Postfix's reload: a session open across the reload keeps its worker and
    its rules until it ends; every new connection gets the new ones."""
    with serving(etc) as server:
        old_workers = set(children(server.proc.pid))
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as early:
            stream = early.makefile("rwb")

            def command(line: str) -> str:
                stream.write(line.encode() + b"\r\n")
                stream.flush()
                return stream.readline().decode()

            assert stream.readline().startswith(b"220")
            command("HELO client.example")
            (etc / "senders").write_text("qq.com 521 go away\n")
            assert server.reload().returncode == 0
            assert session(server.port, "someone@qq.com").startswith("521 5.7.1")
            command("MAIL FROM:<b@qq.com>")
            assert command("RCPT TO:<foo@bar.org>").startswith("554 5.7.1 <b@qq.com>")
            assert len(set(children(server.proc.pid)) & old_workers) == 1  # its worker only
            command("QUIT")
        assert wait_until(lambda: not set(children(server.proc.pid)) & old_workers)
        assert len(children(server.proc.pid)) == 2


class Talk:
    """One held-open SMTP connection from ``source`` (a line at a time)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=15, source_address=(source, 0)
        )
        self.stream = self.sock.makefile("rwb")
        self.greeting = self.reply()

    def reply(self) -> str:
        while (line := self.stream.readline().decode())[3:4] == "-":
            pass
        return line.rstrip("\r\n")

    def command(self, line: str) -> str:
        self.stream.write(line.encode() + b"\r\n")
        self.stream.flush()
        return self.reply()

    def close(self) -> None:
        self.stream.close()  # the socket's file descriptor closes with its last user
        self.sock.close()


@contextmanager
def talks(port: int, count: int, sources: list[str] | None = None) -> Iterator[list[Talk]]:
    opened = [Talk(port, (sources or ["127.0.0.1"] * count)[i]) for i in range(count)]
    try:
        yield opened
    finally:
        for talk in opened:
            talk.close()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_connection_count_limit_holds_for_the_whole_server(etc: Path, workers: int):
    """12 connections from one address, limit 5: exactly 5 greetings, whatever the
    number of workers (one anvil in the supervisor, as Postfix's)."""
    limit = "smtpd_client_connection_count_limit=5"
    with serving(etc, "-o", limit, workers=workers) as server, talks(server.port, 12) as held:
        greetings = [t.greeting for t in held]
        assert sum(g.startswith("220 ") for g in greetings) == 5, greetings
        refused = "421 4.7.0 mx.example.org Error: too many connections from 127.0.0.1"
        assert greetings.count(refused) == 7, greetings
        assert server.log.count("Connection concurrency limit exceeded") == 7


def test_connection_rate_and_message_rate_hold_for_the_whole_server(etc: Path):
    options = (
        "-o", "smtpd_client_connection_rate_limit=10",
        "-o", "smtpd_client_message_rate_limit=5",
        "-o", "anvil_rate_time_unit=3600s",
    )  # fmt: skip
    with serving(etc, *options, workers=3) as server:
        with talks(server.port, 20) as held:
            assert sum(t.greeting.startswith("220 ") for t in held) == 10
        with talks(server.port, 9, ["127.0.0.3"] * 9) as held:  # spread over the workers
            replies = []
            for talk in held:
                talk.command("HELO client.example")
                replies.append(talk.command("MAIL FROM:<a@example.net>"))
        assert sum(r.startswith("250 ") for r in replies) == 5, replies
        assert replies[5] == "450 4.7.1 Error: too much mail from 127.0.0.3"


def test_global_connection_limit_holds_for_the_whole_server(etc: Path):
    sources = [f"127.0.0.{n}" for n in range(2, 10)]
    option = "smtpgate_connection_limit=4"
    with serving(etc, "-o", option, workers=3) as server, talks(server.port, 8, sources) as held:
        assert sum(t.greeting.startswith("220 ") for t in held) == 4, [t.greeting for t in held]


def test_data_memory_budget_holds_for_the_whole_server(etc: Path, public_dir: Path):
    """Each DATA holds 64 KiB of the budget until its message ends: a budget of four
    such reservations lets exactly four of six concurrent messages in."""
    backend = free_port()
    sink = subprocess.Popen(
        [
            *SMTPGATE,
            "sink",
            "--listen",
            f"127.0.0.1:{backend}",
            "--maildir",
            str(public_dir / "mail"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_until(lambda: _listening(backend))
        options = (
            "-o", f"relayhost=[127.0.0.1]:{backend}",
            "-o", f"smtpgate_data_memory_limit={4 * 65536}",
        )  # fmt: skip
        with serving(etc, *options, workers=3) as server, talks(server.port, 6) as held:
            for talk in held:
                talk.command("HELO client.example")
                assert talk.command("MAIL FROM:<a@example.net>").startswith("250")
                assert talk.command("RCPT TO:<foo@bar.org>").startswith("250")
            answers = [talk.command("DATA") for talk in held]
            assert sum(a.startswith("354") for a in answers) == 4, answers
            assert answers.count("451 4.3.1 Insufficient system resources") == 2
            for talk, answer in zip(held, answers, strict=True):
                if answer.startswith("354"):
                    assert talk.command("Subject: t\r\n\r\nbody\r\n.").startswith("250")
            late = Talk(server.port)
            late.command("HELO client.example")
            late.command("MAIL FROM:<b@example.net>")
            late.command("RCPT TO:<foo@bar.org>")
            assert late.command("DATA").startswith("354")  # the budget was given back
            late.close()
    finally:
        sink.terminate()
        sink.communicate(timeout=10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
