"""deploy/compose-ha.yml (HAProxy, two smtpgate, Redis, Postfix) and the haproxy.cfg it
mounts: parsed and cross-checked, validated by docker-compose (no engine needed for
``config``) and by Debian's HAProxy (``haproxy -c``); the smtpgate command line passes
`smtpgate check`."""

from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.test_compose import _backend_main_cf, _compose_command, _overrides
from tests.deploy.test_k8s import PENDING, implemented

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_HA = DEPLOY / "compose-ha.yml"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
GATES = ["smtpgate1", "smtpgate2"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_HA.read_text())
    assert isinstance(data, dict)
    return data


def options(service: dict[str, Any]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in _overrides(service["command"]))


def address(service: dict[str, Any]) -> str:
    return str(service["networks"]["mail"]["ipv4_address"])


def haproxy_cfg(compose: dict[str, Any]) -> Path:
    [mount] = compose["services"]["haproxy"]["volumes"]
    assert mount["target"] == "/usr/local/etc/haproxy/haproxy.cfg" and mount["read_only"]
    return (DEPLOY / mount["source"]).resolve()


def test_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"haproxy", *GATES, "redis", "postfix"}
    one, two = (services[g] for g in GATES)
    assert {k: v for k, v in one.items() if k != "networks"} == {
        k: v for k, v in two.items() if k != "networks"
    }, "the two instances differ only in their address"
    subnet = ipaddress.ip_network(compose["networks"]["mail"]["ipam"]["config"][0]["subnet"])
    assert all(ipaddress.ip_address(address(s)) in subnet for s in services.values())
    # Not compose.yml's network: both demos can run at once.
    other = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    assert not subnet.overlaps(
        ipaddress.ip_network(other["networks"]["mail"]["ipam"]["config"][0]["subnet"])
    )


def test_only_haproxy_is_published(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["haproxy"]["ports"] == ["25:25", "127.0.0.1:8404:8404"]
    assert services["haproxy"]["sysctls"] == {"net.ipv4.ip_unprivileged_port_start": 25}
    assert [name for name, s in services.items() if "ports" in s] == ["haproxy"]


def test_smtpgate_instances(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gate = services["smtpgate1"]
    assert gate["command"][:3] == ["serve", "-c", "/etc/smtpgate/main.cf"]
    assert gate["cap_drop"] == ["ALL"] and gate["read_only"] is True and "user" not in gate
    given = options(gate)
    # Behind HAProxy, from HAProxy's address only.
    assert given["smtpd_upstream_proxy_protocol"] == "haproxy"
    networks = [ipaddress.ip_network(n) for n in given["smtpgate_upstream_proxy_networks"].split()]
    assert any(ipaddress.ip_address(address(services["haproxy"])) in n for n in networks)
    assert not any(ipaddress.ip_address(address(services["smtpgate1"])) in n for n in networks)
    # The shared Redis, the Postfix backend.
    url = urlsplit(given["smtpgate_shared_state"])
    assert url.hostname == "redis" and str(url.port) in services["redis"]["expose"]
    assert given["relayhost"] == "[postfix]:25"
    backend = _backend_main_cf()["smtpd_authorized_xforward_hosts"].split()
    assert all(address(services[g]) in backend for g in GATES)
    # Health from /readyz of the metrics listener (SMTP needs the PROXY header).
    _, port = given["smtpgate_metrics_listen"].rsplit(":", 1)
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(gate["healthcheck"]["test"])
    assert port in gate["expose"]
    assert gate["tmpfs"][0].split(":")[0] == "/run/smtpgate"
    assert given["smtpgate_metrics_directory"].startswith("/run/smtpgate/")
    assert int(gate["stop_grace_period"].rstrip("s")) >= 30 + 10  # the drain, and margin


def test_the_command_line_config_passes_check(compose: dict[str, Any]) -> None:
    """The example config with the instances' overrides, less those of parameters this
    smtpgate does not implement yet (issue 14's other branches: PENDING)."""
    args = ["check", "-c", str(ROOT / "examples" / "main.cf")]
    for name, value in options(compose["services"]["smtpgate1"]).items():
        if name in PENDING and not implemented(name):
            continue
        args += ["-o", f"{name}={value}"]
    result = subprocess.run(
        [sys.executable, "-m", "smtpgate", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok, 0 warning(s)")


def test_haproxy_cfg_sends_proxy_v2_to_both_instances(compose: dict[str, Any]) -> None:
    text = haproxy_cfg(compose).read_text()
    listen_port = options(compose["services"]["smtpgate1"])["listen"].rsplit(":", 1)[1]
    servers = re.findall(r"^\s+server (\S+) (\S+):(\d+)\s*$", text, re.M)
    assert servers == [(g, g, listen_port) for g in GATES]
    assert re.search(r"^\s+option smtpchk EHLO \S+$", text, re.M)
    [defaults] = re.findall(r"^\s+default-server (.*)$", text, re.M)
    assert "send-proxy-v2" in defaults.split() and "check" in defaults.split()
    assert re.search(r"^\s+bind :25$", text, re.M)
    assert "mode tcp" in text


def test_haproxy_accepts_the_cfg(compose: dict[str, Any]) -> None:
    """Debian's HAProxy parses the file; the only warnings allowed are the servers' names,
    which resolve in the compose network only (init-addr none keeps them)."""
    result = subprocess.run(
        [HAPROXY, "-c", "-f", str(haproxy_cfg(compose))], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line or "ALERT" in line]
    for line in warnings:
        assert re.search(r"could not resolve address 'smtpgate[12]'", line), line


def test_haproxy_check_fails_on_a_broken_cfg(compose: dict[str, Any], tmp_path: Path) -> None:
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(haproxy_cfg(compose).read_text().replace("send-proxy-v2", "send-proxy-v9"))
    result = subprocess.run([HAPROXY, "-c", "-f", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0


def test_docker_compose_config_validates() -> None:
    command = _compose_command()
    if command is None:
        pytest.fail("neither docker-compose nor the docker compose plugin is installed (.ci/run)")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_HA), "config"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    normalized = yaml.safe_load(result.stdout)
    services = normalized["services"]
    # The anchor was merged into both instances.
    for gate in GATES:
        assert services[gate]["command"] == services["smtpgate1"]["command"]
        [mount] = services[gate]["volumes"]
        assert mount["read_only"] is True and mount["source"] == str(ROOT / "examples")
    [cfg] = services["haproxy"]["volumes"]
    assert cfg["source"] == str(DEPLOY / "haproxy" / "haproxy.cfg")
    assert services["postfix"]["build"]["context"] == str(DEPLOY / "postfix")


def local_cfg(text: str, port: int, stats: int, gates: list[int]) -> str:
    """haproxy.cfg as compose-ha.yml mounts it, with the compose network's names and ports
    replaced by loopback ones (no Docker DNS here)."""
    text = re.sub(r"^resolvers docker\n(?:    .*\n)*", "", text, flags=re.M)
    text = text.replace(" resolvers docker", "")
    text = text.replace("    bind :25\n", f"    bind 127.0.0.1:{port}\n")
    text = text.replace("    bind :8404\n", f"    bind 127.0.0.1:{stats}\n")
    for name, gate_port in zip(GATES, gates, strict=True):
        text = re.sub(
            rf"server {name} \S+$", f"server {name} 127.0.0.1:{gate_port}", text, flags=re.M
        )
    return text


def server_states(stats: int) -> dict[str, str]:
    """HAProxy's status page as CSV: server -> "status check_status" ("UP L7OK" once the
    SMTP checks pass); nothing while HAProxy does not answer yet."""
    import csv
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", stats, timeout=5)
    try:
        connection.request("GET", "/;csv")
        text = connection.getresponse().read().decode()
    except OSError:
        return {}
    finally:
        connection.close()
    rows = list(csv.DictReader(text.lstrip("# ").splitlines()))
    return {r["svname"]: f"{r['status']} {r['check_status']}" for r in rows if r["svname"] in GATES}


def test_two_instances_behind_this_haproxy_cfg(compose: dict[str, Any], public_dir: Path) -> None:
    """Debian's HAProxy with deploy/haproxy/haproxy.cfg (on loopback) in front of two
    `smtpgate serve` with compose-ha.yml's options: both pass the SMTP checks, and a client
    bound to 127.0.0.2 reaches one of them, which logs the client's own address."""
    if not implemented("smtpd_upstream_proxy_protocol"):
        pytest.skip("needs smtpd_upstream_proxy_protocol (issue 14, branch proxy-protocol)")
    from tests.deploy.conftest import free_port, stop
    from tests.processes import wait_until

    given = options(compose["services"]["smtpgate1"])
    sink_port, port, stats = free_port(), free_port(), free_port()
    gate_ports = [free_port(), free_port()]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "smtpgate",
                    "sink",
                    "--listen",
                    f"127.0.0.1:{sink_port}",
                    "--maildir",
                    str(public_dir / "mail"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        )
        logs = []
        for n, gate_port in enumerate(gate_ports):
            overrides = {
                **{k: v for k, v in given.items() if not k.startswith("smtpgate_metrics")},
                "listen": f"127.0.0.1:{gate_port}",
                "relayhost": f"[127.0.0.1]:{sink_port}",
                "smtpgate_upstream_proxy_networks": "127.0.0.1/32",
                "smtpgate_shared_state": "",  # tests/shared_state runs two with a Redis
                "pid_file": str(public_dir / f"gate{n}.pid"),
                "maillog_file": str(public_dir / f"gate{n}.log"),
                "smtpgate_user": "nobody",
            }
            args = ["serve", "-c", str(ROOT / "examples" / "main.cf")]
            for name, value in overrides.items():
                args += ["-o", f"{name}={value}"]
            logs.append(public_dir / f"gate{n}.log")
            processes.append(subprocess.Popen([sys.executable, "-m", "smtpgate", *args]))
        assert wait_until(lambda: all(p.exists() and "listening on" in p.read_text() for p in logs))
        cfg = public_dir / "haproxy.cfg"
        cfg.write_text(local_cfg(haproxy_cfg(compose).read_text(), port, stats, gate_ports))
        with open(public_dir / "haproxy.out", "wb") as out:
            processes.append(
                subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=out, stderr=out)
            )
        # Both UP with a passed SMTP check (inter 5s: the first within about 5 s).
        assert wait_until(lambda: set(server_states(stats).values()) == {"UP L7OK"}, deadline=20), (
            server_states(stats)
        )
        with socket.create_connection(("127.0.0.1", port), 10, ("127.0.0.2", 0)) as sock:
            stream = sock.makefile("rwb")
            assert stream.readline().startswith(b"220 ")
            for line, code in [(b"HELO client.example", b"250"), (b"QUIT", b"221")]:
                stream.write(line + b"\r\n")
                stream.flush()
                assert stream.readline().startswith(code)
        assert wait_until(
            lambda: any("connect from unknown[127.0.0.2]" in p.read_text() for p in logs)
        ), [p.read_text() for p in logs]
    finally:
        for process in reversed(processes):
            stop(process)
