"""smtpgate_shared_state and its lease in main.cf: checked at load, errors with file
and line, and never a password in a message."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgate.config import parse_settings
from smtpgate.config.service import ServiceConfig
from smtpgate.errors import ConfigError

BASE = "relayhost = [127.0.0.1]:25\nmynetworks = 127.0.0.1/32\n"


def load(tmp_path: Path, text: str) -> ServiceConfig:
    settings, _ = parse_settings(BASE + text, str(tmp_path / "main.cf"), hostname="mx.example")
    return ServiceConfig.from_settings(settings)


def test_empty_by_default(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.shared_state == ""
    assert config.shared_state_lease == 30.0


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://redis.example",
        "rediss://smtpgate:secret@redis.example:6380/3",
        "redis://[::1]:6379/1",
    ],
)
def test_good_urls(tmp_path: Path, url: str) -> None:
    config = load(tmp_path, f"smtpgate_shared_state = {url}\nsmtpgate_shared_state_lease = 10s\n")
    assert config.shared_state == url
    assert config.shared_state_lease == 10.0


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:6379/0", "not a redis:// URL"),
        ("127.0.0.1:6379", "not a redis:// URL"),
        ("redis://:6379/0", "no host"),
        ("redis://h:99999/0", "bad port"),
        ("redis://h:port/0", "bad port"),
        ("redis://h:6379/zero", "the database is a number"),
        ("redis://h:6379/0?socket_timeout=5", "no ?options"),
    ],
)
def test_bad_urls_name_file_and_line(tmp_path: Path, url: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f"# shared\nsmtpgate_shared_state = {url}\n")
    error = caught.value
    assert error.path == str(tmp_path / "main.cf")
    assert error.line == 4
    assert f"smtpgate_shared_state = {url}: {why}" in error.message
    assert "redis://host:port/db" in error.message


def test_a_password_is_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "smtpgate_shared_state = redis://smtpgate:s3cret@h:6379/x\n")
    assert "s3cret" not in str(caught.value)
    assert "redis://smtpgate:***@h:6379/x" in caught.value.message


def test_the_lease_has_a_floor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "smtpgate_shared_state = redis://h/0\nsmtpgate_shared_state_lease = 1s\n")
    assert caught.value.line == 4
    assert "smtpgate_shared_state_lease = 1s: at least 3s" in caught.value.message
    # without a store the lease means nothing: no error
    assert load(tmp_path, "smtpgate_shared_state_lease = 1s\n").shared_state == ""
