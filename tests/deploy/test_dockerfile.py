"""deploy/Dockerfile: its structure (hadolint is not packaged in Debian, so these are the
rules that matter here), and its build and install steps run for real, outside Docker:
the builder's ``pip wheel`` and the runtime's offline install into a fresh venv."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from smtpgate import __version__
from smtpgate.config.params import PARAMETERS
from tests.deploy.dockerfile import Stage, stages

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
POSTFIX_DOCKERFILE = DEPLOY / "postfix" / "Dockerfile"


@pytest.fixture(scope="module")
def parsed() -> tuple[Stage, Stage]:
    _, found = stages(DOCKERFILE)
    assert len(found) == 2, "multi-stage: a builder and a runtime"
    builder, runtime = found
    return builder, runtime


def _tagged(image: str) -> bool:
    name = image.split("@")[0]
    return "@sha256:" in image or (":" in name.rsplit("/", 1)[-1] and not name.endswith(":latest"))


@pytest.mark.parametrize("path", [DOCKERFILE, POSTFIX_DOCKERFILE], ids=["smtpgate", "postfix"])
def test_base_images_are_pinned_and_not_latest(path: Path) -> None:
    _, found = stages(path)
    for stage in found:
        assert _tagged(stage.image), f"{path.name}: FROM {stage.image} needs an explicit tag"
        assert "latest" not in stage.image


def test_builder_builds_wheels_runtime_is_slim_python_311(parsed: tuple[Stage, Stage]) -> None:
    builder, runtime = parsed
    assert builder.name == "builder"
    assert builder.image == runtime.image
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", runtime.image), runtime.image
    assert any("pip wheel" in run.args for run in builder.all("RUN"))
    copies = [c.words() for c in runtime.all("COPY")]
    assert ["--from=builder", "/wheels", "/tmp/wheels"] in copies
    # The runtime stage installs offline: no index, no compiler.
    install = [r.args for r in runtime.all("RUN") if "pip install" in r.args]
    assert len(install) == 1 and "--no-index" in install[0], install
    assert "apt-get" not in " ".join(r.args for r in runtime.all("RUN"))


def test_runs_as_non_root_user_smtpgate(parsed: tuple[Stage, Stage]) -> None:
    _, runtime = parsed
    users = runtime.all("USER")
    assert users, "USER must be set"
    user = users[-1].args.split(":")[0]
    assert user == "smtpgate" == PARAMETERS["smtpgate_user"].default
    last_run = max(r.line for r in runtime.all("RUN"))
    assert users[-1].line > last_run, "no RUN after USER: nothing at run time is root"
    setup = " ".join(r.args for r in runtime.all("RUN"))
    assert "useradd --system" in setup and "--shell /usr/sbin/nologin smtpgate" in setup
    # pid_file's default folder exists and belongs to smtpgate.
    pid_dir = str(PurePosixPath(PARAMETERS["pid_file"].default).parent)
    assert f"install -d -o smtpgate -g smtpgate -m 0755 {pid_dir}" in setup


def test_port_entrypoint_config_and_healthcheck(parsed: tuple[Stage, Stage]) -> None:
    _, runtime = parsed
    assert [e.args for e in runtime.all("EXPOSE")] == ["25"]
    assert runtime.all("ENTRYPOINT")[-1].words() == ["smtpgate"]
    assert runtime.all("CMD")[-1].words() == ["serve", "-c", "/etc/smtpgate/main.cf"]
    assert ["/etc/smtpgate"] in [v.words() for v in runtime.all("VOLUME")]
    [health] = runtime.all("HEALTHCHECK")
    words = health.words()
    assert "--interval=30s" in words and "--timeout=10s" in words
    # Exec form: no shell needed in the probe.
    assert health.exec_form() == ["/opt/smtpgate/bin/python", "/opt/smtpgate/healthcheck.py"]
    copied = {c.words()[-1]: c.words()[0] for c in runtime.all("COPY") if "--from" not in c.args}
    assert copied["/opt/smtpgate/healthcheck.py"] == "deploy/healthcheck.py"
    env = " ".join(e.args for e in runtime.all("ENV"))
    assert "SMTPGATE_HEALTHCHECK=127.0.0.1:25" in env


def test_copy_sources_exist_in_the_build_context(parsed: tuple[Stage, Stage]) -> None:
    for stage in parsed:
        for copy in stage.all("COPY"):
            words = copy.words()
            if any(w.startswith("--from") for w in words):
                continue
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"line {copy.line}: COPY {source}: missing"


def test_dockerignore_lets_every_copy_source_in(parsed: tuple[Stage, Stage]) -> None:
    """deploy/Dockerfile.dockerignore excludes everything (.venv, .git, var/) but what
    the COPY lines need."""
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:] for rule in rules if rule.startswith("!")}
    for stage in parsed:
        for copy in stage.all("COPY"):
            words = copy.words()
            if not any(w.startswith("--from") for w in words):
                assert set(words[:-1]) <= allowed, f"line {copy.line}: {words[:-1]}"


def _subst(command: str, mapping: dict[str, Path]) -> str:
    for container_path, host_path in mapping.items():
        command = re.sub(
            rf"(?<![\w/]){re.escape(container_path)}(?=[/\s]|$)", str(host_path), command
        )
    return command


def _sh(command: str, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        ["/bin/sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"$ {command}\n{result.stdout}\n{result.stderr}"


@pytest.mark.timeout(300)
def test_build_and_install_steps_in_a_clean_venv(
    parsed: tuple[Stage, Stage], tmp_path: Path
) -> None:
    """The builder's RUN and the runtime's install RUN, as written in the Dockerfile,
    with the container's paths mapped to temporary folders."""
    builder, runtime = parsed
    src = tmp_path / "src"
    src.mkdir()
    for copy in builder.all("COPY"):
        *sources, dest = copy.words()
        for source in sources:
            target = src / dest / Path(source).name if dest.endswith("/") else src / dest
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / source, target)
    # "python" and "pip" of the image: a fresh venv's.
    python_env = tmp_path / "image-python"
    subprocess.run([sys.executable, "-m", "venv", str(python_env)], check=True)
    env = {**os.environ, "PATH": f"{python_env / 'bin'}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    mapping = {
        "/tmp/wheels": tmp_path / "tmp-wheels",
        "/wheels": tmp_path / "wheels",
        "/opt/smtpgate": tmp_path / "opt-smtpgate",
    }
    for run in builder.all("RUN"):
        _sh(_subst(run.args, mapping), src, env)
    wheels = sorted(p.name for p in (tmp_path / "wheels").glob("*.whl"))
    assert f"smtpgate-{__version__}-py3-none-any.whl" in wheels
    assert any(name.startswith("uvloop-") for name in wheels), wheels  # the uvloop extra
    shutil.copytree(tmp_path / "wheels", tmp_path / "tmp-wheels")
    [install] = [r for r in runtime.all("RUN") if "pip install" in r.args]
    _sh(_subst(install.args, mapping), tmp_path, env)
    assert not (tmp_path / "tmp-wheels").exists(), "the install step removes the wheels"

    venv = tmp_path / "opt-smtpgate"
    smtpgate = venv / "bin" / "smtpgate"
    clean_env = {k: v for k, v in env.items() if k != "PATH"} | {"PATH": "/usr/bin:/bin"}
    version = subprocess.run(
        [smtpgate, "--version"], capture_output=True, text=True, env=clean_env, check=True
    )
    assert version.stdout.strip() == f"smtpgate, version {__version__}"
    subprocess.run([venv / "bin" / "python", "-c", "import uvloop"], env=clean_env, check=True)
    check = subprocess.run(
        [smtpgate, "check", "-c", str(ROOT / "examples" / "main.cf")],
        capture_output=True,
        text=True,
        env=clean_env,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().endswith("ok, 0 warning(s)")
    # Only the runtime dependencies: nothing of the dev extra.
    dev = subprocess.run([venv / "bin" / "python", "-c", "import pytest"], capture_output=True)
    assert dev.returncode != 0
