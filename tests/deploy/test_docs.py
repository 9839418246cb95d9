"""The docs cannot drift from the code: every command and option of the CLI is in
docs/cli.md, the exit codes match, the deploy files they name exist, and their examples
run: every main.cf snippet passes `smtpgate check` and every `$ smtpgate ...` console
block prints what it shows (the markers are described above the tests that run them)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from smtpgate import cli

pytestmark = pytest.mark.deploy

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


# -- the examples run ----------------------------------------------------------------------
#
# README.md and docs/*.md mark what the tests run with the fence's info string:
#
#   ```main.cf        a complete configuration: written to a folder of its own as main.cf,
#                     with the document's ```table NAME blocks beside it as NAME, then
#                     `smtpgate check -c main.cf` must say "ok, 0 warning(s)". Nothing is
#                     added: a snippet that needs more says so in the snippet.
#   ```table NAME     a table file the main.cf blocks of the same document use.
#   ```postfix main.cf  Postfix's own main.cf lines of an experiment against Postfix 3.7
#                     (docs/postfix-behaviour.md): run by tests/differential
#                     (postfix_research.py, sessions.py), not by smtpgate check.
#   ```console        a terminal session: each "$ smtpgate ..." line (a trailing "\" joins
#                     the next line) is run as a real process in the checkout, and what it
#                     prints (standard output and error, in order) must be the lines shown
#                     up to the next "$", after _normalise; a line "..." stands for any
#                     lines. "cd DIR && " runs in the checkout and prints it as DIR.
#
# A fence without a tag whose lines look like main.cf fails test_main_cf_snippets_are_tagged,
# so an untagged snippet cannot escape the check. Console blocks that need a running
# server are listed in SKIPPED_CONSOLE, with why.

DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SKIPPED_CONSOLE = {
    # (document, first command): why it is not run here
    ("README.md", "telnet 127.0.0.1 2525"): (
        "a session with the running demo (make run); tests/test_demo.py runs the same "
        "session against smtpgate serve and sink processes and checks the same replies"
    ),
}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", re.M | re.S)
NORMALISE = [
    (re.compile(r"\b[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d\b"), "<time>"),  # log time stamps
    (re.compile(r"(/smtpd|smtpgate sink|pid )\[?\d+\]?"), r"\1<pid>"),  # process ids
    (re.compile(r"\b[0-9A-F]{10}\b"), "<queue id>"),  # smtpgate's queue ids
]


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    tag: str
    text: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


def _blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text()
    return [
        Block(doc, text[: m.start()].count("\n") + 1, m.group(1).strip(), m.group(2))
        for m in FENCE.finditer(text)
    ]


ALL_BLOCKS = [block for doc in DOCS for block in _blocks(doc)]
MAIN_CF = [b for b in ALL_BLOCKS if b.tag == "main.cf"]
CONSOLE = [b for b in ALL_BLOCKS if b.tag == "console"]


def _normalise(text: str) -> str:
    for pattern, replacement in NORMALISE:
        text = pattern.sub(replacement, text)
    return text


def _smtpgate(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # standard output and error in order
    result = subprocess.run(
        [sys.executable, "-m", "smtpgate", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout


def _sessions(block: Block) -> list[tuple[str, list[str]]]:
    """The block's commands, each with the lines shown after it."""
    sessions: list[tuple[str, list[str]]] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith("$ "):
            assert sessions, f"{block}: output before the first $ command: {line!r}"
            sessions[-1][1].append(line)
            continue
        command = line[2:]
        while command.endswith("\\"):
            command = command[:-1] + " " + lines[i].strip()
            i += 1
        sessions.append((command, []))
    return sessions


def _matches(shown: list[str], printed: list[str]) -> bool:
    """Whether printed equals shown, where a shown "..." line stands for any lines."""
    if not shown:
        return not printed
    if shown[0] == "...":
        return any(_matches(shown[1:], printed[k:]) for k in range(len(printed) + 1))
    return bool(printed) and shown[0] == printed[0] and _matches(shown[1:], printed[1:])


def test_every_doc_is_read_and_the_markers_are_used() -> None:
    # The collection must find what the docs hold: a broken fence regexp would make every
    # test below pass on nothing.
    assert len(MAIN_CF) >= 1 and len(CONSOLE) >= 4
    assert "docs/cli.md" in DOCS and "docs/security.md" in {b.doc for b in CONSOLE}


def test_main_cf_snippets_are_tagged() -> None:
    from smtpgate.config import PARAMETERS, POSTFIX_DEFAULTS

    setting = re.compile(r"^([a-z][a-z0-9_]*)\s*=", re.M)
    for block in ALL_BLOCKS:
        if block.tag in ("main.cf", "console", "postfix main.cf") or block.tag.startswith("table "):
            continue
        names = [n for n in setting.findall(block.text) if n in PARAMETERS or n in POSTFIX_DEFAULTS]
        assert not names, f"{block}: looks like main.cf ({names}): tag the fence main.cf"


@pytest.mark.parametrize("block", MAIN_CF, ids=str)
def test_main_cf_snippet_passes_check(block: Block, tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text(block.text)
    for table in _blocks(block.doc):
        if table.tag.startswith("table "):
            (tmp_path / table.tag.split(None, 1)[1]).write_text(table.text)
    printed = _smtpgate(["check", "-c", str(tmp_path / "main.cf")], ROOT)
    assert printed == f"smtpgate: {tmp_path / 'main.cf'}: ok, 0 warning(s)\n", f"{block}"


@pytest.mark.parametrize("block", CONSOLE, ids=str)
def test_console_block_prints_what_it_shows(block: Block) -> None:
    sessions = _sessions(block)
    if (block.doc, sessions[0][0]) in SKIPPED_CONSOLE:
        assert not any(c.startswith(("smtpgate ", "cd ")) for c, _ in sessions), (
            f"{block}: a skipped block runs smtpgate: do not skip it"
        )
        pytest.skip(SKIPPED_CONSOLE[(block.doc, sessions[0][0])])
    shown_dir: str | None = None
    for command, shown in sessions:
        cd = re.fullmatch(r"cd (\S+) && (.*)", command)
        if cd:
            shown_dir, command = cd.group(1), cd.group(2)
        words = shlex.split(command)
        assert words[0] == "smtpgate", f"{block}: {command!r}: only smtpgate commands run here"
        printed = _smtpgate(words[1:], ROOT)
        if shown_dir is not None:
            printed = printed.replace(str(ROOT), shown_dir)
        expected = [_normalise(line) for line in shown]
        actual = [_normalise(line) for line in printed.splitlines()]
        assert _matches(expected, actual), (
            f"{block}: $ {command}\nshown:\n" + "\n".join(shown) + "\nprinted:\n" + printed
        )


def test_the_skipped_console_blocks_still_exist() -> None:
    firsts = {(b.doc, _sessions(b)[0][0]) for b in CONSOLE}
    assert set(SKIPPED_CONSOLE) <= firsts
