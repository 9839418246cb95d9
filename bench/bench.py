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
    DNS_ADDRESS,
    GOOD_SENDER,
    HARNESSES,
    POSTSCREEN_MAIN_CF,
    RECIPIENT,
    ZOMBIE_POOL,
    BenchError,
    DnsServer,
    Gate,
    HarnessConfig,
    LoadRun,
    PostfixRef,
    PostscreenRef,
    Sink,
    SourceRun,
    cpu_seconds,
    hold_sessions,
    new_tmp,
    pss_kib,
    raise_fd_limit,
    run_loadgen,
    run_source,
    zombie_expected,
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
    #: driven by bench/loadgen.py in this mode (reject, relay, pipeline, zombie) instead of
    #: smtp-source; these rows also time every message (final dot to 250)
    loadgen: str = ""
    rcpts: int = 1  # recipients per message (loadgen rows)
    #: offered load: half the rate both sides reached in this row (of this round), the
    #: lower of the two, so that both get the same rate (open loop)
    half_of: str = ""
    zombie: bool = False  # the postscreen pair of servers and the DNS lists

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

    def drive(self, port: int, count: int | None = None, source: str = "") -> SourceRun:
        """Run this rate workload once with smtp-source (``count`` instead of its own)."""
        return run_source(
            port,
            sessions=self.sessions,
            count=self.count if count is None else count,
            size=self.size,
            many_per_session=self.many,
            reject=self.kind == "sessions",
            source=source,
        )

    @property
    def per(self) -> str:
        """What CPU per unit is counted per: a session or a message."""
        return "session" if self.kind == "sessions" else "message"


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
        Workload("relay-1k-10-lg", "relay 1 KB, 10 sess, EHLO, full load (loadgen)", "msgs", 10,
                 one, 1024, loadgen="relay"),
        Workload("relay-1k-10-half", "relay 1 KB, 10 sess, EHLO, half load (loadgen)", "msgs",
                 10, one // 2, 1024, loadgen="relay", half_of="relay-1k-10-lg"),
        Workload("pipeline-1k-10", "pipelined 1 KB, 3 RCPT, 10 sess, full load", "msgs", 10,
                 one, 1024, loadgen="pipeline", rcpts=3),
        Workload("pipeline-1k-10-half", "pipelined 1 KB, 3 RCPT, 10 sess, half load", "msgs",
                 10, one // 2, 1024, loadgen="pipeline", rcpts=3, half_of="pipeline-1k-10"),
        Workload("zombie-90", "zombies: 90 % on DNS lists, 50 sess", "sessions", 50,
                 n(3000, 100), 1024, loadgen="zombie", zombie=True),
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
    #: what could not be measured for a known reason (not a failure: exit status 0)
    notes: list[str] = field(default_factory=list)
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: CPU milliseconds per session (reject rows) or per message (the others)
    cpu_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: per run of a loadgen row: p50 and p99 of final dot -> 250 in ms, the counts of the
    #: session outcomes, the generator's own CPU (1.00 = one core)
    latency: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    counts: dict[str, dict[str, list[dict[str, int]]]] = field(default_factory=dict)
    generator_cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(
        self,
        key: str,
        side: str,
        value: float,
        cpu: float | None = None,
        cpu_ms: float | None = None,
    ) -> None:
        self.samples.setdefault(key, {}).setdefault(side, []).append(value)
        if cpu is not None:
            self.cpu.setdefault(key, {}).setdefault(side, []).append(cpu)
        if cpu_ms is not None:
            self.cpu_ms.setdefault(key, {}).setdefault(side, []).append(cpu_ms)

    def add_load(self, key: str, side: str, run: LoadRun) -> None:
        if run.latencies:
            lat = {"p50": run.percentile(0.5), "p99": run.percentile(0.99)}
            self.latency.setdefault(key, {}).setdefault(side, []).append(lat)
        self.counts.setdefault(key, {}).setdefault(side, []).append(run.counts)
        cores = run.generator_cpu / run.seconds
        self.generator_cpu.setdefault(key, {}).setdefault(side, []).append(cores)


@dataclass(frozen=True)
class Context:
    """What every measurement needs besides the row and the side."""

    config: HarnessConfig
    loadgen_procs: int = 2


def measure(w: Workload, side: Side, results: Results, ctx: Context) -> None:
    """Run one workload once against one side and record the figure."""
    if w.loadgen:
        measure_load(w, side, results, ctx)
        return
    if w.kind in ("memory", "idle"):
        if w.kind == "memory":
            commands = [
                f"EHLO {CLIENT_HELO}",
                f"MAIL FROM:<{GOOD_SENDER}>",
                f"RCPT TO:<{RECIPIENT}>",
            ]
        else:
            commands = [f"EHLO {CLIENT_HELO}"]
        kib = asyncio.run(_pss_while_held(side, w.sessions, commands, ctx.config.source))
        results.add(w.key, side.name, kib / 1024)
        return
    cpu_before = cpu_seconds(side.root_pid)
    run = w.drive(side.port, source=ctx.config.source)
    used = cpu_seconds(side.root_pid) - cpu_before
    if run.problems:
        shown = "; ".join(run.problems[:3])
        results.problems.append(f"{w.key} {side.name}: {len(run.problems)} problem(s): {shown}")
    value = w.count / run.seconds
    if w.kind == "bytes":
        value = w.count * w.size / run.seconds / 1e6
    results.add(w.key, side.name, value, used / run.seconds, 1000 * used / w.count)


def measure_load(w: Workload, side: Side, results: Results, ctx: Context) -> None:
    """A loadgen row once against one side: rate, CPU, latencies, outcome counts."""
    rate = 0.0
    if w.half_of:
        full = results.samples.get(w.half_of, {})
        if not all(full.get(s) for s in (GATE, POSTFIX)):
            raise BenchError(f"{w.key}: run {w.half_of} before it (it sets the offered rate)")
        rate = 0.5 * min(full[GATE][-1], full[POSTFIX][-1])  # one message per session
    sources = [ctx.config.source] if ctx.config.source and not w.zombie else []
    extra = ["--size", str(w.size), "--rcpts", str(w.rcpts)]
    if w.loadgen == "reject":
        extra += ["--sender", "someone@qq.com"]
    cpu_before = cpu_seconds(side.root_pid)
    run = run_loadgen(
        side.port, w.loadgen, sessions=w.sessions, count=w.count, procs=ctx.loadgen_procs,
        rate=rate, sources=sources, pool=ZOMBIE_POOL if w.zombie else 0, extra=extra,
    )  # fmt: skip
    used = cpu_seconds(side.root_pid) - cpu_before
    problems = list(run.problems)
    if w.zombie:
        blocked = zombie_expected(w.count, ctx.loadgen_procs)
        rejected = sum(v for k, v in run.counts.items() if k.startswith("rejected"))
        if rejected != blocked or run.counts.get("accepted", 0) != w.count - blocked:
            problems.append(f"expected {blocked} rejected, {w.count - blocked} accepted")
        units = w.count
    else:
        if run.messages != w.count:
            problems.append(f"{run.messages} of {w.count} messages accepted")
        units = max(1, run.messages)
    if problems:
        shown = "; ".join(problems[:3])
        results.problems.append(f"{w.key} {side.name}: {shown}")
    gen = run.generator_cpu / run.seconds
    if gen > 0.9 * ctx.loadgen_procs:
        results.problems.append(
            f"{w.key} {side.name}: the load generator was busy ({gen:.2f} cores for "
            f"{ctx.loadgen_procs} processes): raise --loadgen-procs"
        )
    value = (w.count if w.kind == "sessions" else run.messages) / run.seconds
    results.add(w.key, side.name, value, used / run.seconds, 1000 * used / units)
    results.add_load(w.key, side.name, run)


async def _pss_while_held(
    side: Side, sessions: int, commands: Sequence[str], source: str = ""
) -> int:
    async with hold_sessions(side.port, sessions, commands, source=source):
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
    #: the zombie row's pair: both with postscreen's model on the bench's DNS lists; the
    #: smtpgate one is None while smtpgate has no postscreen_* parameters
    zombie_gate: Gate | None = None
    zombie_postfix: PostscreenRef | None = None

    def sides(self, w: Workload) -> list[Side]:
        if w.milter:
            assert self.milter_gate is not None and self.milter_postfix is not None
            return [self.milter_gate, self.milter_postfix]
        if w.zombie:
            assert self.zombie_postfix is not None
            if self.zombie_gate is None:
                return [self.zombie_postfix]
            return [self.zombie_gate, self.zombie_postfix]
        return [self.gate, self.postfix]


def run_rounds(
    rows: Sequence[Workload], servers: Servers, rounds: int, results: Results, ctx: Context
) -> None:
    """All workloads, ``rounds`` times; per round the side that goes first alternates."""
    interleaved = [w for w in rows if w.kind != "idle"]
    for r in range(rounds):
        for w in interleaved:
            sides = servers.sides(w)
            for side in sides if r % 2 == 0 else reversed(sides):
                measure(w, side, results, ctx)
        _progress(f"round {r + 1}/{rounds} done")
    # Idle sessions last: holding 10,000 sessions raises smtpgate's high-water mark, which
    # would otherwise inflate the 500-session figure of the following rounds.
    for w in rows:
        if w.kind == "idle":
            for _ in range(rounds):
                measure(w, servers.gate, results, ctx)


def warm_up(servers: Servers, quick: bool, ctx: Context) -> None:
    """A short unrecorded run per side: Postfix spawns its smtpd processes, caches fill."""
    count = 20 if quick else 300
    src = ctx.config.source
    for side in (servers.gate, servers.postfix):
        run_source(side.port, sessions=10, count=count, size=1024, source=src)
        run_source(side.port, sessions=10, count=count, reject=True, source=src)
    for zside in (servers.zombie_gate, servers.zombie_postfix):
        if zside is not None:
            run_loadgen(zside.port, "zombie", sessions=10, count=count, pool=ZOMBIE_POOL)
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
    """The results table (plain text, fixed columns).

    After the ratio: the CPU time each side spent per session (reject and zombie rows) or
    per relayed message (the other rate rows), in ms, and the ratio of the two.
    """
    head = ("workload", "unit", GATE, "min-max", POSTFIX, "min-max", "ratio")
    head += ("CPU ms/unit", "smtpgate", "Postfix", "ratio", "target")
    lines: list[tuple[str, ...]] = [head]
    for w in rows:
        per = results.samples.get(w.key, {})
        g, gr = _cell(per.get(GATE))
        p, pr = _cell(per.get(POSTFIX))
        ratio = "-"
        if per.get(GATE) and per.get(POSTFIX):
            ratio = f"{statistics.median(per[GATE]) / statistics.median(per[POSTFIX]):.2f}"
        cpu = results.cpu_ms.get(w.key, {})
        gc, pc = cpu.get(GATE), cpu.get(POSTFIX)
        cells = (
            f"per {w.per}" if gc or pc else "",
            f"{statistics.median(gc):.3f}" if gc else "-",
            f"{statistics.median(pc):.3f}" if pc else "-",
            f"{statistics.median(gc) / statistics.median(pc):.2f}"
            if gc and pc and statistics.median(pc) > 0
            else "-",
        )
        if not (gc or pc):
            cells = ("", "", "", "")
        lines.append((w.label, w.unit, g, gr, p, pr, ratio, *cells, w.target))
    return _columns(lines, right={2, 3, 4, 5, 6, 8, 9, 10})


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


def latency_note(rows: Sequence[Workload], results: Results) -> str:
    """p50/p99 of final dot -> 250 per loadgen row, and the outcomes of the zombie row."""
    lines: list[tuple[str, ...]] = [
        ("workload", f"{GATE} p50", "p99", f"{POSTFIX} p50", "p99", "p99 ratio")
    ]
    for w in rows:
        per = results.latency.get(w.key)
        if not per:
            continue
        cells: list[str] = []
        p99: dict[str, float] = {}
        for side in (GATE, POSTFIX):
            runs = per.get(side)
            if not runs:
                cells += ["-", "-"]
                continue
            p99[side] = statistics.median(r["p99"] for r in runs)
            cells += [f"{statistics.median(r['p50'] for r in runs):.2f}", f"{p99[side]:.2f}"]
        ratio = f"{p99[GATE] / p99[POSTFIX]:.2f}" if len(p99) == 2 and p99[POSTFIX] else "-"
        lines.append((w.label, *cells, ratio))
    out = []
    if len(lines) > 1:
        out += ["Latency, the client's final dot to the 250 (ms, median over the rounds of "
                "each run's p50 and p99; ratio below 1: smtpgate answers sooner):", ""]  # fmt: skip
        out.append(_columns(lines, right={1, 2, 3, 4, 5}))
    for w in rows:
        for side, runs in results.counts.get(w.key, {}).items():
            if w.zombie and runs:
                gen = statistics.median(results.generator_cpu[w.key][side])
                shown = ", ".join(f"{k} {v}" for k, v in sorted(runs[-1].items()))
                out.append(f"{w.label}, {side} (last run): {shown}; generator CPU {gen:.2f}")
    gens = [
        (w.label, side, statistics.median(v))
        for w in rows
        for side, v in results.generator_cpu.get(w.key, {}).items()
    ]
    if gens:
        top = max(gens, key=lambda g: g[2])
        out.append(f"load generator CPU at most {top[2]:.2f} cores ({top[0]}, {top[1]})")
    return "\n".join(out)


def _columns(lines: Sequence[tuple[str, ...]], right: set[int]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for i, line in enumerate(lines):
        cells = [
            c.rjust(widths[j]) if j in right else c.ljust(widths[j]) for j, c in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * wd for wd in widths))
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
        f"rounds {rounds}{' (quick)' if args.quick else ''}  smtpgate options {opts}  "
        f"harness {args.config.name}\n"
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
        unknown = set(args.only) - {w.key for w in rows}
        if unknown:
            raise BenchError(f"--only: no such row: {' '.join(sorted(unknown))}")
        rows = [w for w in rows if w.key in args.only]
        for w in list(rows):  # a half-load row needs its full-load row
            if w.half_of and w.half_of not in {r.key for r in rows}:
                rows.insert(
                    rows.index(w), next(r for r in workloads(args.quick) if r.key == w.half_of)
                )
    config = args.config
    ctx = Context(config, args.loadgen_procs)
    rounds = 1 if args.quick else args.rounds
    biggest = max((w.sessions for w in rows if w.postfix_side), default=100)
    tmp = new_tmp()
    results = Results()
    sink = Sink(tmp)
    started: list[Any] = [sink]
    try:
        gate = Gate(tmp, sink.port, args.option, config=config)
        started.append(gate)
        postfix = PostfixRef(sink.port, process_limit=biggest + 100, config=config)
        started.append(postfix)
        servers = Servers(gate, postfix)
        if any(w.zombie for w in rows):
            _start_zombie_pair(tmp, sink, servers, biggest + 100, args, started, results)
        _progress(f"smtpgate :{gate.port}, Postfix :{postfix.port}, smtp-sink :{sink.port}")
        if any(w.milter for w in rows):
            # a DNS server that answers at once (NXDOMAIN): rspamd's lookups would
            # otherwise wait for their timeout, and both sides would measure that
            dns = FakeDns().start()
            started.append(dns)
            rspamd = start_rspamd(tmp / "rspamd", dns=dns.address, cache_dir=RSPAMD_CACHE)
            started.append(rspamd)
            milter = f"smtpd_milters={rspamd.endpoint}"
            servers.milter_gate = Gate(
                tmp, sink.port, [*args.option, milter], "smtpgate-milter", config=config
            )
            started.append(servers.milter_gate)
            servers.milter_postfix = PostfixRef(
                sink.port, biggest + 100, rspamd.endpoint, config=config
            )
            started.append(servers.milter_postfix)
            _progress(
                f"rspamd {rspamd.endpoint}: smtpgate :{servers.milter_gate.port}, "
                f"Postfix :{servers.milter_postfix.port}"
            )
        warm_up(servers, args.quick, ctx)
        run_rounds(rows, servers, rounds, results, ctx)
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
    latency = latency_note(rows, results)
    if latency:
        print()
        print(latency)
    for note in results.notes:
        print(f"NOTE: {note}")
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
                    "cpu_ms": results.cpu_ms,
                    "latency": results.latency,
                    "counts": results.counts,
                    "generator_cpu": results.generator_cpu,
                    "harness": config.name,
                    "problems": results.problems,
                    "notes": results.notes,
                },
                indent=1,
            )
        )
    return 1 if results.problems else 0


def _start_zombie_pair(
    tmp: Path,
    sink: Sink,
    servers: Servers,
    process_limit: int,
    args: argparse.Namespace,
    started: list[Any],
    results: Results,
) -> None:
    """The DNS lists, Postfix with postscreen, and smtpgate with postscreen's model (if
    this smtpgate knows postscreen_dnsbl_sites; otherwise the row is Postfix's alone)."""
    dns = DnsServer(tmp)
    started.append(dns)
    servers.zombie_postfix = PostscreenRef(sink.port, process_limit, dns.resolv_conf, args.config)
    started.append(servers.zombie_postfix)
    try:
        servers.zombie_gate = Gate(
            tmp, sink.port, [*args.option, f"dns_servers={DNS_ADDRESS}"], "smtpgate-postscreen",
            config=args.config, main_cf_extra=POSTSCREEN_MAIN_CF,
        )  # fmt: skip
        started.append(servers.zombie_gate)
    except BenchError as exc:
        lines = str(exc).strip().splitlines() or [str(exc)]
        first = next((ln for ln in lines if "postscreen_" in ln), lines[-1])
        if "not supported yet: postscreen_" in first:  # a tree without postscreen (issue 15)
            results.notes.append(
                f"zombie-90: Postfix only, this smtpgate has no postscreen: {first}"
            )
        else:
            results.problems.append(f"zombie-90 smtpgate: not run, smtpgate did not start: {first}")
    _progress(
        f"DNS lists on {DNS_ADDRESS}:53; postscreen: Postfix :{servers.zombie_postfix.port}"
        + (f", smtpgate :{servers.zombie_gate.port}" if servers.zombie_gate else "")
    )


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
    ap.add_argument(
        "--harness", choices=sorted(HARNESSES), default="today",
        help="today's configuration or issue 16's independent harness (bench/README.md)",
    )  # fmt: skip
    ap.add_argument(
        "--vary", action="append", default=[], metavar="SETTING=VALUE",
        help="change one setting of the harness configuration (repeatable), e.g. "
        "event_exceptions=127.0.0.0/8",
    )  # fmt: skip
    ap.add_argument(
        "--loadgen-procs", type=int, default=2, metavar="N",
        help="processes of the load generator (bench/loadgen.py rows; default 2)",
    )  # fmt: skip
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
    args = ap.parse_args(argv)
    args.config = HARNESSES[args.harness]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: run as root (Postfix needs it; smtp-sink and smtpgate drop to nobody)")
    try:
        args.config = args.config.vary(args.vary)
        if args.profile:
            from bench.profile import profile

            sys.exit(profile(args))
        sys.exit(bench(args))
    except BenchError as exc:
        sys.exit(f"bench: {exc}")
