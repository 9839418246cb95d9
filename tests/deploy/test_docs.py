"""The operator docs cannot drift from the code: every command and option of the CLI is
in docs/cli.md, the exit codes match, and the deploy files they name exist."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from smtpgate import cli

ROOT = Path(__file__).parents[2]
CLI_MD = (ROOT / "docs" / "cli.md").read_text()
OPERATOR_DOCS = ["docs/deployment.md", "docs/operations.md", "docs/security.md"]
OPERATOR_DOCS += ["docs/migrating.md", "docs/cli.md", "deploy/README.md"]


def _commands() -> list[tuple[str, click.Command]]:
    assert isinstance(cli.main, click.Group)
    return sorted(cli.main.commands.items())


@pytest.mark.parametrize(("name", "command"), _commands(), ids=[n for n, _ in _commands()])
def test_every_command_and_option_is_documented(name: str, command: click.Command) -> None:
    assert f"\n## {name}\n" in CLI_MD, f"docs/cli.md has no section for {name}"
    section = CLI_MD.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
    for param in command.params:
        if isinstance(param, click.Option):
            if param.name == "help":
                continue
            names = [n for n in param.opts if n.startswith("--")] or param.opts
            documented = any(n in section for n in names) or (
                name != "query" and any(n in CLI_MD.split("## Common options")[1] for n in names)
            )
            assert documented, f"{name}: option {param.opts} is not in docs/cli.md"
        else:
            assert (param.name or "").upper() in section, f"{name}: argument {param.name}"


def test_exit_codes() -> None:
    codes = {cli.EXIT_OK: "0", cli.EXIT_NOT_FOUND: "1", cli.EXIT_CONFIG: "2", cli.EXIT_START: "3"}
    table = CLI_MD.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| (\d) \|", table, re.M)
    assert documented == [codes[c] for c in sorted(codes)]


@pytest.mark.parametrize("doc", OPERATOR_DOCS)
def test_named_deploy_files_exist(doc: str) -> None:
    text = (ROOT / doc).read_text()
    base = ROOT / "deploy" if doc.startswith("deploy/") else ROOT
    for path in re.findall(r"`(deploy/[\w./-]+)`", text):
        assert (ROOT / path.rstrip("/")).exists(), f"{doc}: {path} does not exist"
    if doc == "deploy/README.md":
        for path in re.findall(r"^\| `([\w./-]+)` \|", text, re.M):
            assert (base / path.rstrip("/")).exists(), f"{doc}: {path} does not exist"
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not link.startswith("http"):
            target = (ROOT / doc).parent / link
            assert target.exists(), f"{doc}: link {link} is broken"
