"""deploy/compose.yml and the Postfix backend it builds: parsed and cross-checked against
the Dockerfile, the example config and the backend's main.cf; validated by docker-compose
(which needs no Docker engine for ``config``) and the backend by Postfix's postconf."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from smtpgate.config import load_settings
from smtpgate.config.params import PARAMETERS
from tests.deploy.dockerfile import stages

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yml"
BACKEND = DEPLOY / "postfix"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def gate(compose: dict[str, Any]) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"]["smtpgate"]
    return service


def _overrides(command: list[str]) -> list[str]:
    return [command[i + 1] for i, word in enumerate(command) if word == "-o"]


def _backend_main_cf() -> dict[str, str]:
    out = {}
    for line in (BACKEND / "main.cf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"smtpgate", "postfix"}


def test_smtpgate_builds_from_the_dockerfile(gate: dict[str, Any]) -> None:
    context = (DEPLOY / gate["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / gate["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert not gate["image"].endswith(":latest") and ":" in gate["image"]


def test_port_25_inside_as_non_root(gate: dict[str, Any]) -> None:
    assert gate["ports"] == ["25:25"]
    listen = [o for o in _overrides(gate["command"]) if o.startswith("listen=")]
    assert listen == ["listen=0.0.0.0:25"]
    # Port 25 is unprivileged in the container's network namespace: no capability needed.
    assert gate["sysctls"] == {"net.ipv4.ip_unprivileged_port_start": 25}
    assert gate["cap_drop"] == ["ALL"]
    assert "cap_add" not in gate and "user" not in gate  # the image's USER smtpgate
    assert gate["security_opt"] == ["no-new-privileges:true"]
    assert gate["read_only"] is True


def test_example_config_mounted_read_only(gate: dict[str, Any]) -> None:
    [mount] = gate["volumes"]
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert mount["target"] == "/etc/smtpgate"
    assert (DEPLOY / mount["source"]).resolve() == ROOT / "examples"
    assert gate["command"][:3] == ["serve", "-c", "/etc/smtpgate/main.cf"]
    # pid_file's folder is writable in the read-only container.
    pid_dir = str(PurePosixPath(PARAMETERS["pid_file"].default).parent)
    assert any(t.split(":")[0] == pid_dir for t in gate["tmpfs"])


def test_the_command_line_config_passes_check(gate: dict[str, Any]) -> None:
    """The example config with compose's -o overrides is what the container serves."""
    args = ["check", "-c", str(ROOT / "examples" / "main.cf")]
    for override in _overrides(gate["command"]):
        args += ["-o", override]
    result = subprocess.run(
        [sys.executable, "-m", "smtpgate", *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok, 0 warning(s)")


def test_healthcheck_matches_the_image(gate: dict[str, Any]) -> None:
    _, [_, runtime] = stages(DEPLOY / "Dockerfile")
    [image_check] = runtime.all("HEALTHCHECK")
    health = gate["healthcheck"]
    assert health["test"][:3] == ["CMD", *image_check.exec_form()]
    assert health["test"][3] == "127.0.0.1:25"  # where the command above listens
    assert health["interval"] == "30s" and health["retries"] == 3
    assert gate["depends_on"] == {"postfix": {"condition": "service_healthy"}}


def test_relayhost_is_the_postfix_service(compose: dict[str, Any], gate: dict[str, Any]) -> None:
    assert "relayhost=[postfix]:25" in _overrides(gate["command"])
    backend = compose["services"]["postfix"]
    assert backend["expose"] == ["25"]
    assert "ports" not in backend, "the backend is not published"
    assert (DEPLOY / backend["build"]["context"]).resolve() == BACKEND
    assert (BACKEND / "Dockerfile").is_file()


def test_backend_trusts_smtpgate_for_xforward(
    compose: dict[str, Any], gate: dict[str, Any]
) -> None:
    address = gate["networks"]["mail"]["ipv4_address"]
    subnet = compose["networks"]["mail"]["ipam"]["config"][0]["subnet"]
    import ipaddress

    assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet)
    backend = _backend_main_cf()
    # compose-ha.yml's two smtpgate addresses are there too (test_compose_ha.py).
    assert address in backend["smtpd_authorized_xforward_hosts"].split()
    # The backend accepts what smtpgate relays: the example's relay_domains.
    settings, _ = load_settings(str(ROOT / "examples" / "main.cf"), [])
    assert settings.as_list("relay_domains") == backend["virtual_mailbox_domains"].split()
    # ...and does not trust smtpgate (or anyone but itself) to relay elsewhere.
    assert backend["mynetworks"] == "127.0.0.0/8"


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_docker_compose_config_validates() -> None:
    """docker-compose checks the file against the Compose schema; no engine needed."""
    command = _compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config"], capture_output=True, text=True, cwd=DEPLOY
    )
    assert result.returncode == 0, result.stderr
    normalized = yaml.safe_load(result.stdout)
    gate = normalized["services"]["smtpgate"]
    assert gate["ports"][0]["target"] == 25 and int(gate["ports"][0]["published"]) == 25
    assert str(gate["sysctls"]["net.ipv4.ip_unprivileged_port_start"]) == "25"
    [mount] = gate["volumes"]
    assert mount["read_only"] is True and mount["source"] == str(ROOT / "examples")


@pytest.mark.skipif(shutil.which("postconf") is None, reason="Debian's postfix not installed")
def test_backend_main_cf_is_valid_postfix(tmp_path: Path) -> None:
    shutil.copy(BACKEND / "main.cf", tmp_path / "main.cf")
    # The image's master.cf is Debian's, as installed by the package.
    shutil.copy("/usr/share/postfix/master.cf.dist", tmp_path / "master.cf")
    result = subprocess.run(["postconf", "-c", str(tmp_path), "-n"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    vmailbox = f"texthash:{BACKEND / 'vmailbox'}"
    for key, maildir in [("foo@bar.org", "bar.org/foo/"), ("@bar.org", "bar.org/catchall/")]:
        found = subprocess.run(
            ["postmap", "-q", key, vmailbox], capture_output=True, text=True, check=True
        )
        assert found.stdout.strip() == maildir
