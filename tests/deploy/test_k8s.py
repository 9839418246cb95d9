"""deploy/k8s/: every manifest validated against the Kubernetes schemas (kubernetes-validate,
which bundles them: nothing is fetched), cross-checked against each other, the Dockerfile
and the main.cf of the ConfigMap; that main.cf passes `smtpgate check`, and `smtpgate
serve` runs it as a non-root user from the start (as the pod does), serves, and drains on
SIGTERM within the pod's grace period."""

from __future__ import annotations

import copy
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from smtpgate.config.params import NOT_SUPPORTED_YET, PARAMETERS
from smtpgate.server import DRAIN_TIMEOUT
from tests.processes import children, wait_until
from tests.test_newcomer import IS_ROOT, SMTPGATE, free_port

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests are meant for (lifecycle, probes, PDB policy/v1 and
# the Pod Security labels are all older) and the newest kubernetes-validate knows.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
UID = 10025  # the image's smtpgate user (deploy/Dockerfile)

# main.cf lines of the ConfigMap for features of issue 14 on branches not merged yet: the
# tests drop such a line while this smtpgate does not implement the parameter, and check
# and serve it as soon as it does.
PENDING = {
    "smtpgate_metrics_listen": "metrics",
    "smtpgate_metrics_directory": "metrics",
    "smtpd_upstream_proxy_protocol": "proxy-protocol",
    "smtpgate_upstream_proxy_networks": "proxy-protocol",
}


def implemented(name: str) -> bool:
    return name in PARAMETERS and name not in NOT_SUPPORTED_YET


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def objects() -> list[dict[str, Any]]:
    """Every object of the kustomization's resources, in order."""
    out = []
    for name in kustomization()["resources"]:
        out += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    return out


def find(kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def main_cf_lines() -> str:
    return str(find("ConfigMap", "smtpgate-config")["data"]["main.cf"])


def main_cf() -> dict[str, str]:
    """The ConfigMap's main.cf as name -> value (continuation lines joined)."""
    out: dict[str, str] = {}
    name = ""
    for line in main_cf_lines().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            out[name] += " " + line.strip()
        else:
            name, _, value = line.partition("=")
            name = name.strip()
            out[name] = value.strip()
    return out


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


# -- the schemas -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(version: str) -> None:
    found = objects()
    kinds = sorted(o["kind"] for o in found)
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "Deployment", "Deployment", "Service", "Service", "Service",
         "PodDisruptionBudget", "NetworkPolicy"]
    )  # fmt: skip
    for obj in found:
        # strict: a property the schema does not know (a typo) is an error too.
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validation_can_fail() -> None:
    deployment = copy.deepcopy(find("Deployment", "smtpgate"))
    good = container(deployment, "smtpgate")["securityContext"]
    good["readOnlyRootFileSystem"] = good.pop("readOnlyRootFilesystem")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    service = copy.deepcopy(find("Service", "smtpgate"))
    service["spec"]["ports"][0]["port"] = "twenty-five"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, VERSIONS[-1], strict=True)


def test_kustomization_names_every_manifest() -> None:
    kz = kustomization()
    assert kz["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kz["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kz["resources"]) == sorted(files)
    assert kz["namespace"] == find("Namespace", kz["namespace"])["metadata"]["name"]
    labels = find("Namespace", kz["namespace"])["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    [image] = kz["images"]
    assert (
        container(find("Deployment", "smtpgate"), "smtpgate")["image"].split(":")[0]
        == image["name"]
    )
    assert image["newTag"] != "latest"


# -- the Deployment --------------------------------------------------------------------------


def test_runs_as_the_images_user_without_privileges() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"--uid {UID}" in dockerfile and f"--gid {UID}" in dockerfile
    deployment = find("Deployment", "smtpgate")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["runAsGroup"] == UID == pod["securityContext"]["fsGroup"]
    assert pod["automountServiceAccountToken"] is False
    gate = container(deployment, "smtpgate")
    security = gate["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}, "no capability added"
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert gate["args"] == ["serve", "-c", "/etc/smtpgate/main.cf"]
    # An unprivileged port, so no capability: the Service maps 25 to it.
    _, port = host_port(main_cf()["listen"])
    assert port >= 1024
    [smtp] = [p for p in gate["ports"] if p["name"] == "smtp"]
    assert smtp["containerPort"] == port


def mounts(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there."""
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    gate = container(deployment, "smtpgate")
    return {m["mountPath"]: {**volumes[m["name"]], **m} for m in gate["volumeMounts"]}


def test_what_smtpgate_writes_is_on_an_emptydir() -> None:
    at = mounts(find("Deployment", "smtpgate"))
    cf = main_cf()
    writable = [path for path, v in at.items() if "emptyDir" in v and not v.get("readOnly")]
    assert "/tmp" in writable  # $TMPDIR (the metric files' default folder)
    for name in ("pid_file", "smtpgate_metrics_directory"):
        assert any(cf[name].startswith(path + "/") for path in writable), name
    config = at["/etc/smtpgate"]
    assert config["readOnly"] is True and config["configMap"]["name"] == "smtpgate-config"


def test_tls_from_a_secret_read_only_readable_by_the_group() -> None:
    at = mounts(find("Deployment", "smtpgate"))
    cf = main_cf()
    folder = str(Path(cf["smtpd_tls_cert_file"]).parent)
    assert str(Path(cf["smtpd_tls_key_file"]).parent) == folder
    tls = at[folder]
    assert tls["readOnly"] is True and tls["secret"]["secretName"] == "smtpgate-tls"
    # kubernetes.io/tls Secrets hold tls.crt and tls.key; 0440 root:fsGroup.
    assert {Path(cf[n]).name for n in ("smtpd_tls_cert_file", "smtpd_tls_key_file")} == {
        "tls.crt",
        "tls.key",
    }
    assert tls["secret"]["defaultMode"] == 0o440


def test_probes_ask_the_metrics_listener() -> None:
    gate = container(find("Deployment", "smtpgate"), "smtpgate")
    _, port = host_port(main_cf()["smtpgate_metrics_listen"])
    [metrics] = [p for p in gate["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == port
    assert gate["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert gate["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert gate["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # /readyz may connect to relayhost itself (smtp_connect_timeout, 5 s) before it answers.
    assert gate["readinessProbe"]["timeoutSeconds"] > 5


def test_grace_period_covers_the_prestop_wait_and_the_drain() -> None:
    deployment = find("Deployment", "smtpgate")
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = container(deployment, "smtpgate")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "/bin/sleep"  # python:3.11-slim-bookworm has coreutils
    wait = int(pre_stop[1])
    assert pod["terminationGracePeriodSeconds"] >= wait + DRAIN_TIMEOUT + 5
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    assert find("PodDisruptionBudget", "smtpgate")["spec"]["minAvailable"] == 1


# -- the Services and Redis ------------------------------------------------------------------


def test_load_balancer_port_25_to_the_smtp_port() -> None:
    service = find("Service", "smtpgate")
    spec = service["spec"]
    assert spec["type"] == "LoadBalancer" and spec["externalTrafficPolicy"] == "Local"
    assert spec["ports"] == [{"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP"}]
    labels = find("Deployment", "smtpgate")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= labels.items()
    assert main_cf()["smtpd_upstream_proxy_protocol"] == "haproxy"
    # The annotations for the cloud balancers are in the comments, with the PROXY flags.
    text = (K8S / "service.yaml").read_text()
    assert "aws-load-balancer-proxy-protocol" in text and "uses-proxyprotocol" in text
    metrics = find("Service", "smtpgate-metrics")["spec"]
    assert metrics["type"] == "ClusterIP" and metrics["ports"][0]["targetPort"] == "metrics"


def test_shared_state_is_the_redis_service() -> None:
    url = urlsplit(main_cf()["smtpgate_shared_state"])
    assert url.scheme == "redis" and url.path == "/0"
    service = find("Service", "redis")
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"] == 6379
    redis = find("Deployment", "redis")
    assert service["spec"]["selector"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items()
    )
    pod = redis["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    server = container(redis, "redis")
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert not re.search(r":latest$|^[^:]+$", server["image"])
    # No persistence: counters only.
    assert server["args"][server["args"].index("--save") + 1] == ""
    policy = find("NetworkPolicy", "redis")["spec"]
    [rule] = policy["ingress"]
    smtpgate_pods = {"matchLabels": {"app.kubernetes.io/name": "smtpgate"}}
    assert rule["from"] == [{"podSelector": smtpgate_pods}]


# -- the ConfigMap's main.cf, run ------------------------------------------------------------


def make_cert(folder: Path) -> None:
    """tls.crt and tls.key as the Secret volume presents them to the pod: root-owned,
    mode 0440, group = the pod's fsGroup (here the group of the user serve runs as)."""
    folder.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.crt"),
         "-days", "2", "-subj", "/CN=mx.example.org"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    for name in ("tls.crt", "tls.key"):
        if IS_ROOT:
            os.chown(folder / name, 0, _nobody()[1])
        (folder / name).chmod(0o440)


def _nobody() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def write_config(folder: Path) -> Path:
    """The ConfigMap's files in ``folder`` (as mounted at /etc/smtpgate), without the
    lines of parameters this smtpgate does not implement yet (PENDING)."""
    data = find("ConfigMap", "smtpgate-config")["data"]
    for name, text in data.items():
        if name == "main.cf":
            kept = []
            for line in text.splitlines():
                parameter = line.partition("=")[0].strip()
                if parameter in PENDING and not implemented(parameter):
                    continue
                kept.append(line)
            text = "\n".join(kept) + "\n"
        (folder / name).write_text(text)
    make_cert(folder / "tls")
    return folder / "main.cf"


def local_overrides(folder: Path, sink_port: int) -> list[str]:
    """The pod's addresses and paths mapped to this machine."""
    cf = main_cf()
    out = [
        f"smtpd_tls_cert_file={folder / 'tls' / Path(cf['smtpd_tls_cert_file']).name}",
        f"smtpd_tls_key_file={folder / 'tls' / Path(cf['smtpd_tls_key_file']).name}",
        f"relayhost=[127.0.0.1]:{sink_port}",
        f"pid_file={folder / 'run' / Path(cf['pid_file']).name}",
        # No cluster DNS here: the peer's name is not looked up, and Redis (its own tests
        # in tests/shared_state) is left out: serve keeps counting in the pod.
        "smtpd_peername_lookup=no",
        "smtpgate_shared_state=",
    ]
    if implemented("smtpgate_metrics_listen"):
        out += [
            f"smtpgate_metrics_listen=127.0.0.1:{free_port()}",
            f"smtpgate_metrics_directory={folder / 'run' / 'metrics'}",
        ]
    return out


def test_configmap_main_cf_passes_check(public_dir: Path) -> None:
    dropped = [p for p in PENDING if p in main_cf() and not implemented(p)]
    cf = write_config(public_dir)
    args = ["check", "-c", str(cf)]
    for option in local_overrides(public_dir, 2526):
        if not option.startswith(("smtpgate_shared_state=", "pid_file=")):
            args += ["-o", option]
    result = subprocess.run([*SMTPGATE, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok, 0 warning(s)"), result.stdout
    # What is left out, if anything, is only what other branches of issue 14 bring.
    assert set(dropped) <= set(PENDING)


def proc_uids(pid: int) -> set[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    [line] = [x for x in status.splitlines() if x.startswith("Uid:")]
    return {int(u) for u in line.split()[1:]}


def smtp(stream: Any, line: str | None) -> str:
    if line is not None:
        stream.write(line.encode() + b"\r\n")
        stream.flush()
    while True:
        reply = stream.readline().decode()
        assert reply, f"connection closed after {line!r}"
        if reply[3:4] != "-":
            return reply.rstrip("\r\n")


def proxy_header(client: str) -> bytes:
    """A PROXY v1 header, as the balancer sends it when smtpd_upstream_proxy_protocol is
    on; nothing while this smtpgate does not read it."""
    if not implemented("smtpd_upstream_proxy_protocol"):
        return b""
    return f"PROXY TCP4 {client} 127.0.0.1 40000 25\r\n".encode()


def test_serve_runs_non_root_from_the_start_and_drains_on_sigterm(public_dir: Path) -> None:
    """As in the pod: a non-root uid from exec on (as_user stands for runAsUser), config
    and key read-only, the pid file in a world-writable folder (the emptyDir)."""
    cf = write_config(public_dir)
    run = public_dir / "run"
    run.mkdir()
    run.chmod(0o1777)
    mail = public_dir / "mail"
    sink_port, gate_port = free_port(), free_port()
    user = "nobody" if IS_ROOT else None
    serve_args = ["serve", "-c", str(cf), "-o", f"listen=127.0.0.1:{gate_port}"]
    for option in local_overrides(public_dir, sink_port):
        serve_args += ["-o", option]
    if user is None:
        command = [*SMTPGATE, *serve_args]
    else:
        command = [sys.executable, "-m", "tests.as_user", user, *serve_args]
    sink = subprocess.Popen(
        [*SMTPGATE, "sink", "--listen", f"127.0.0.1:{sink_port}", "--maildir", str(mail)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log = public_dir / "serve.log"
    with open(log, "wb") as out:
        gate = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        workers = int(main_cf()["smtpgate_workers"])
        assert wait_until(
            lambda: (
                log.read_text().count("smtpgate listening on") >= workers or gate.poll() is not None
            )
        ), log.read_text()
        assert gate.poll() is None, log.read_text()
        # The whole tree runs as the unprivileged user: no drop happened, none was needed.
        tree = [gate.pid, *children(gate.pid)]
        assert len(tree) == 1 + workers
        if IS_ROOT:
            for pid in tree:
                assert proc_uids(pid) == {_nobody()[0]}, pid
        pid_file = run / "smtpgate.pid"
        assert pid_file.read_text().strip() == str(gate.pid)
        assert "privilege" not in log.read_text() and "error" not in log.read_text()

        if implemented("smtpgate_metrics_listen"):
            # The pod's probes: alive, and ready (the backend, the sink, is reachable).
            metrics = metrics_address(serve_args)
            assert http_get(metrics, "/healthz")[0] == 200
            status, body = http_get(metrics, "/readyz")
            assert status == 200, body

        # A message through it, with STARTTLS offered (the key was readable).
        with socket.create_connection(("127.0.0.1", gate_port), timeout=10) as sock:
            sock.sendall(proxy_header("192.0.2.7"))
            stream = sock.makefile("rwb")
            assert smtp(stream, None).startswith("220 mx.example.org")
            stream.write(b"EHLO client.example\r\n")
            stream.flush()
            ehlo = []
            while (line := stream.readline().decode())[3:4] == "-":
                ehlo.append(line)
            assert any("STARTTLS" in x for x in ehlo), ehlo
            assert smtp(stream, "MAIL FROM:<someone@example.net>").startswith("250")
            assert smtp(stream, "RCPT TO:<noreply@example.org>").startswith("550 5.1.1")
            assert smtp(stream, "RCPT TO:<abuse@example.org>").startswith("250")
            assert smtp(stream, "DATA").startswith("354")
            assert smtp(stream, "Subject: k8s\r\n\r\nhello\r\n.").startswith("250")
            smtp(stream, "QUIT")
        assert wait_until(lambda: bool(_delivered(mail)))
        if implemented("smtpd_upstream_proxy_protocol"):
            # The client of the PROXY header, not the balancer, is the client.
            assert "client=unknown[192.0.2.7]" in log.read_text(), log.read_text()

        # SIGTERM (after the preStop wait): an idle session is told 421, serve exits 0
        # well within the grace period, and removes its pid file.
        idle = socket.create_connection(("127.0.0.1", gate_port), timeout=10)
        idle.sendall(proxy_header("192.0.2.8"))
        idle_stream = idle.makefile("rwb")
        assert smtp(idle_stream, None).startswith("220")
        assert smtp(idle_stream, "EHLO idle.example").startswith("250")
        gate.send_signal(signal.SIGTERM)
        assert smtp(idle_stream, None).startswith("421 4.3.2")
        idle.close()
        grace = find("Deployment", "smtpgate")["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        assert gate.wait(grace - 10) == 0, log.read_text()
        assert not pid_file.exists()
        text = log.read_text()
        assert "stopping: no new connections; draining sessions" in text
        assert text.rstrip().endswith("stopped"), text
    finally:
        for process in (gate, sink):
            if process.poll() is None:
                process.kill()
                process.wait()


def metrics_address(args: list[str]) -> tuple[str, int]:
    [value] = [a.split("=", 1)[1] for a in args if a.startswith("smtpgate_metrics_listen=")]
    return host_port(value)


def http_get(where: tuple[str, int], path: str) -> tuple[int, str]:
    import http.client

    connection = http.client.HTTPConnection(*where, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _delivered(mail: Path) -> list[Path]:
    return [p for p in mail.rglob("*") if p.is_file() and b"Subject: k8s" in p.read_bytes()]
