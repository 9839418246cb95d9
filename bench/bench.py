"""Run the workloads against smtpgate and Postfix, interleaved, and print the table.

Usage (from the repository root, as root, with Debian's postfix installed)::

    python -m bench                  # the full benchmark (a few minutes); make bench
    python -m bench --quick          # tiny counts, one round (the smoke test runs this)
    python -m bench -o name=value    # extra smtpgate options, e.g. a worker count
    python -m bench --json out.json  # also write the raw samples
    python -m bench --profile        # py-spy profile of smtpgate under the relay workload

Each round runs every workload once against each side, alternating which side goes first
(smtpgate, Postfix, Postfix, smtpgate, ...); the table gives per side the median and the
min-max over the rounds, and the ratio smtpgate/Postfix of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from bench.harness import (
    CLIENT_HELO,
    GOOD_SENDER,
    RECIPIENT,
    BenchError,
    Gate,
    PostfixRef,
    Sink,
    SourceRun,
    cpu_seconds,
    hold_sessions,
    new_tmp,
    pss_kib,
    raise_fd_limit,
    run_source,
)
from tests.dns.dnsserver import FakeDns
from tests.milter.daemons import start_rspamd

Kind = Literal["sessions", "msgs", "bytes", "memory", "idle"]
GATE, POSTFIX = "smtpgate", "Postfix"


#: rspamd compiles its regular expressions on first start (20-30 s); kept between runs.
RSPAMD_CACHE = Path("/var/tmp/smtpgate-bench-rspamd-cache")


@dataclass(frozen=True)
class Workload:
    """One row of the table.

    ``kind``: ``sessions`` (rejected sessions/s), ``msgs`` (relayed msgs/s), ``bytes``
    (relayed MB/s), ``memory`` (summed PSS MiB at ``sessions`` concurrent sessions in the
    middle of a transaction), ``idle`` (smtpgate's PSS MiB with ``sessions`` idle sessions).
    """

    key: str
    label: str
    kind: Kind
    sessions: int
    count: int = 0  # messages (or rejected sessions) per run
    size: int = 0  # message payload bytes (smtp-source -l)
    many: bool = False  # many messages per session (smtp-source -d)
    milter: bool = False  # both sides with rspamd as a milter (their own servers)
    target: str = ""  # the goal for the ratio (or the absolute figure)

    @property
    def unit(self) -> str:
        return {
            "sessions": "sess/s",
            "msgs": "msgs/s",
            "bytes": "MB/s",
            "memory": "MiB PSS",
            "idle": "MiB PSS",
        }[self.kind]

    @property
    def postfix_side(self) -> bool:
        return self.kind != "idle"

    def drive(self, port: int, count: int | None = None) -> SourceRun:
        """Run this rate workload once with smtp-source (``count`` instead of its own)."""
        return run_source(
            port,
            sessions=self.sessions,
            count=self.count if count is None else count,
            size=self.size,
            many_per_session=self.many,
            reject=self.kind == "sessions",
        )


def workloads(quick: bool) -> list[Workload]:
    """The table's rows; ``quick`` shrinks every count so that a round takes seconds."""

    def n(full: int, small: int) -> int:
        return small if quick else full

    rej, one, many = n(3000, 60), n(2000, 60), n(3000, 60)
    return [
        Workload("reject-10", "reject at RCPT, 10 sessions", "sessions", 10, rej),
        Workload("reject-20", "reject at RCPT, 20 sessions", "sessions", 20, rej, target=">= 1.0"),
        Workload("reject-100", "reject at RCPT, 100 sessions", "sessions", 100, rej),
        Workload("relay-1k-10-one", "relay 1 KB, 10 sess, 1 msg/sess", "msgs", 10, one, 1024,
                 target=">= 1.0"),
        Workload("relay-1k-100-one", "relay 1 KB, 100 sess, 1 msg/sess", "msgs", 100, one, 1024,
                 target=">= 1.0"),
        Workload("relay-1k-10-many", "relay 1 KB, 10 sess, many msgs/sess", "msgs", 10, many,
                 1024, many=True, target=">= 1.0"),
        Workload("relay-1k-100-many", "relay 1 KB, 100 sess, many msgs/sess", "msgs", 100, many,
                 1024, many=True, target=">= 1.0"),
        Workload("relay-100k-10", "relay 100 KB, 10 sess, many msgs/sess", "bytes", 10,
                 n(600, 10), 100 * 1024, many=True, target=">= 1.0"),
        Workload("milter-1k-10", "relay 1 KB via rspamd milter, 10 sess", "msgs", 10,
                 n(1000, 20), 1024, milter=True),
        Workload("memory-500", f"memory, {n(500, 20)} sessions in MAIL/RCPT", "memory",
                 n(500, 20), target="<= 0.1"),
        Workload("idle-10000", f"memory, {n(10000, 100)} idle sessions (smtpgate)", "idle",
                 n(10000, 100), target="< 1024 MiB"),
    ]  # fmt: skip


class Side(Protocol):
    name: str
    port: int

    @property
    def root_pid(self) -> int: ...


@dataclass
class Results:
    """Samples per (workload key, side), and what went wrong on the way."""

    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, key: str, side: str, value: float, cpu: float | None = None) -> None:
        self.samples.setdefault(key, {}).setdefault(side, []).append(value)
        if cpu is not None:
            self.cpu.setdefault(key, {}).setdefault(side, []).append(cpu)


def measure(w: Workload, side: Side, results: Results) -> None:
    """Run one workload once against one side and record the figure."""
    if w.kind in ("memory", "idle"):
        if w.kind == "memory":
            commands = [
                f"EHLO {CLIENT_HELO}",
                f"MAIL FROM:<{GOOD_SENDER}>",
                f"RCPT TO:<{RECIPIENT}>",
            ]
        else:
            commands = [f"EHLO {CLIENT_HELO}"]
        kib = asyncio.run(_pss_while_held(side, w.sessions, commands))
        results.add(w.key, side.name, kib / 1024)
        return
    cpu_before = cpu_seconds(side.root_pid)
    run = w.drive(side.port)
    cpu = (cpu_seconds(side.root_pid) - cpu_before) / run.seconds
    if run.problems:
        shown = "; ".join(run.problems[:3])
        results.problems.append(f"{w.key} {side.name}: {len(run.problems)} problem(s): {shown}")
    value = w.count / run.seconds
    if w.kind == "bytes":
        value = w.count * w.size / run.seconds / 1e6
    results.add(w.key, side.name, value, cpu)


async def _pss_while_held(side: Side, sessions: int, commands: Sequence[str]) -> int:
    async with hold_sessions(side.port, sessions, commands):
        await asyncio.sleep(0.5)  # let the servers settle (Postfix's master, anvil, ...)
        kib, _ = pss_kib(side.root_pid)
    return kib


@dataclass
class Servers:
    """The two sides, and the two with rspamd as a milter (for the milter rows)."""

    gate: Gate
    postfix: PostfixRef
    milter_gate: Gate | None = None
    milter_postfix: PostfixRef | None = None

    def sides(self, w: Workload) -> list[Side]:
        if w.milter:
            assert self.milter_gate is not None and self.milter_postfix is not None
            return [self.milter_gate, self.milter_postfix]
        return [self.gate, self.postfix]


def run_rounds(rows: Sequence[Workload], servers: Servers, rounds: int, results: Results) -> None:
    """All workloads, ``rounds`` times; per round the side that goes first alternates."""
    interleaved = [w for w in rows if w.kind != "idle"]
    for r in range(rounds):
        for w in interleaved:
            sides = servers.sides(w)
            for side in sides if r % 2 == 0 else reversed(sides):
                measure(w, side, results)
        _progress(f"round {r + 1}/{rounds} done")
    # Idle sessions last: holding 10,000 sessions raises smtpgate's high-water mark, which
    # would otherwise inflate the 500-session figure of the following rounds.
    for w in rows:
        if w.kind == "idle":
            for _ in range(rounds):
                measure(w, servers.gate, results)


def warm_up(servers: Servers, quick: bool) -> None:
    """A short unrecorded run per side: Postfix spawns its smtpd processes, caches fill."""
    count = 20 if quick else 300
    for side in (servers.gate, servers.postfix):
        run_source(side.port, sessions=10, count=count, size=1024)
        run_source(side.port, sessions=10, count=count, reject=True)
    for milter_side in (servers.milter_gate, servers.milter_postfix):
        if milter_side is not None:
            run_source(milter_side.port, sessions=10, count=count // 3, size=1024)


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(values: Sequence[float] | None) -> tuple[str, str]:
    if not values:
        return "-", ""
    return _fmt(statistics.median(values)), f"{_fmt(min(values))}-{_fmt(max(values))}"


def table(rows: Sequence[Workload], results: Results) -> str:
    """The results table (plain text, fixed columns)."""
    head = ("workload", "unit", GATE, "min-max", POSTFIX, "min-max", "ratio", "target")
    lines: list[tuple[str, ...]] = [head]
    for w in rows:
        per = results.samples.get(w.key, {})
        g, gr = _cell(per.get(GATE))
        p, pr = _cell(per.get(POSTFIX))
        ratio = "-"
        if per.get(GATE) and per.get(POSTFIX):
            ratio = f"{statistics.median(per[GATE]) / statistics.median(per[POSTFIX]):.2f}"
        lines.append((w.label, w.unit, g, gr, p, pr, ratio, w.target))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    right = {2, 3, 4, 5, 6}
    out = []
    for i, line in enumerate(lines):
        cells = [
            c.rjust(widths[j]) if j in right else c.ljust(widths[j]) for j, c in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * wd for wd in widths))
    return "\n".join(out)


def cpu_note(rows: Sequence[Workload], results: Results) -> str:
    """Median CPU use (1.00 = one core busy) of each side during the rate workloads."""
    out = [
        "CPU during the rate workloads (median, 1.00 = one core busy; exited and reaped "
        "processes such as Postfix's smtpds count):"
    ]
    for w in rows:
        per = results.cpu.get(w.key)
        if per:
            cells = [f"{side} {statistics.median(v):.2f}" for side, v in per.items()]
            out.append(f"  {w.label}: " + ", ".join(cells))
    return "\n".join(out)


def _progress(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _header(args: argparse.Namespace, postfix_version: str, rounds: int) -> str:
    uvloop = "yes" if _has_module("uvloop") else "no"
    opts = " ".join(f"-o {o}" for o in args.option) or "(none)"
    return (
        f"smtpgate bench {time.strftime('%Y-%m-%d %H:%M')}  host {platform.node()}  "
        f"{os.cpu_count()} CPUs  Python {platform.python_version()}  uvloop {uvloop}  "
        f"Postfix {postfix_version}\n"
        f"rounds {rounds}{' (quick)' if args.quick else ''}  smtpgate options {opts}\n"
        "ratio = smtpgate median / Postfix median: above 1 is better for rates, below 1 for "
        "memory"
    )


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def bench(args: argparse.Namespace) -> int:
    raise_fd_limit()
    rows = workloads(args.quick)
    if args.only:
        rows = [w for w in rows if w.key in args.only]
    rounds = 1 if args.quick else args.rounds
    biggest = max((w.sessions for w in rows if w.postfix_side), default=100)
    tmp = new_tmp()
    results = Results()
    sink = Sink(tmp)
    started: list[Any] = [sink]
    try:
        gate = Gate(tmp, sink.port, args.option)
        started.append(gate)
        postfix = PostfixRef(sink.port, process_limit=biggest + 100)
        started.append(postfix)
        servers = Servers(gate, postfix)
        _progress(f"smtpgate :{gate.port}, Postfix :{postfix.port}, smtp-sink :{sink.port}")
        if any(w.milter for w in rows):
            # a DNS server that answers at once (NXDOMAIN): rspamd's lookups would
            # otherwise wait for their timeout, and both sides would measure that
            dns = FakeDns().start()
            started.append(dns)
            rspamd = start_rspamd(tmp / "rspamd", dns=dns.address, cache_dir=RSPAMD_CACHE)
            started.append(rspamd)
            milter = f"smtpd_milters={rspamd.endpoint}"
            servers.milter_gate = Gate(tmp, sink.port, [*args.option, milter], "smtpgate-milter")
            started.append(servers.milter_gate)
            servers.milter_postfix = PostfixRef(sink.port, biggest + 100, rspamd.endpoint)
            started.append(servers.milter_postfix)
            _progress(
                f"rspamd {rspamd.endpoint}: smtpgate :{servers.milter_gate.port}, "
                f"Postfix :{servers.milter_postfix.port}"
            )
        warm_up(servers, args.quick)
        run_rounds(rows, servers, rounds, results)
        header = _header(args, postfix.version, rounds)
    finally:
        for proc in reversed(started):
            proc.stop()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    print(header)
    print()
    print(table(rows, results))
    print()
    print(cpu_note(rows, results))
    for problem in results.problems:
        print(f"PROBLEM: {problem}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "header": header,
                    "rows": [{"key": w.key, "label": w.label, "unit": w.unit} for w in rows],
                    "samples": results.samples,
                    "cpu": results.cpu,
                    "problems": results.problems,
                },
                indent=1,
            )
        )
    return 1 if results.problems else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts, one round (smoke test)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every workload (default 5)")
    ap.add_argument("--only", nargs="+", metavar="KEY", help="run only these workloads")
    ap.add_argument(
        "-o", "--option", action="append", default=[], metavar="NAME=VALUE",
        help="extra smtpgate serve -o option (repeatable)",
    )  # fmt: skip
    ap.add_argument("--json", metavar="FILE", help="also write the samples as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--profile", action="store_true",
        help="instead of the table: profile smtpgate with py-spy under one workload",
    )  # fmt: skip
    ap.add_argument(
        "--profile-workload", default="relay-1k-10-one", metavar="KEY",
        help="the rate workload to profile (a row key; default relay-1k-10-one)",
    )  # fmt: skip
    ap.add_argument("--profile-seconds", type=float, default=30.0)
    ap.add_argument("--profile-out", metavar="FILE", help="keep py-spy's collapsed stacks here")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: run as root (Postfix needs it; smtp-sink and smtpgate drop to nobody)")
    try:
        if args.profile:
            from bench.profile import profile

            sys.exit(profile(args))
        sys.exit(bench(args))
    except BenchError as exc:
        sys.exit(f"bench: {exc}")
