"""A small Dockerfile reader for the deploy tests (hadolint is not packaged in Debian)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined with a space
    line: int  # 1-based line of the instruction's first line

    def words(self) -> list[str]:
        """The arguments split like a shell would (JSON form honoured)."""
        if self.args.startswith("["):
            try:
                value = json.loads(self.args)
            except json.JSONDecodeError:
                pass
            else:
                return [str(word) for word in value]
        return shlex.split(self.args)

    def exec_form(self, keyword: str = "CMD") -> list[str]:
        """The JSON array after ``keyword`` (HEALTHCHECK ... CMD [...])."""
        head, _, tail = self.args.partition(keyword)
        assert tail.strip().startswith("["), f"line {self.line}: not in exec form"
        value = json.loads(tail)
        assert isinstance(value, list)
        return [str(word) for word in value]


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Logical instructions: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        joined = " ".join(p for p in parts if p)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, "the Dockerfile ends inside a continued instruction"
    return out


def stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, the stages in order)."""
    args: dict[str, str] = {}
    out: list[Stage] = []
    for instruction in instructions(path.read_text()):
        if instruction.keyword == "FROM":
            words = instruction.words()
            image = words[0]
            for arg, value in args.items():
                image = image.replace(f"${{{arg}}}", value).replace(f"${arg}", value)
            stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            out.append(Stage(image, stage))
        elif not out:
            assert instruction.keyword == "ARG", f"line {instruction.line}: before FROM"
            name, _, value = instruction.args.partition("=")
            args[name] = value
        else:
            out[-1].instructions.append(instruction)
    return args, out
