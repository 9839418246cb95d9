"""Profile smtpgate with py-spy while smtp-source drives one of the rate workloads.

py-spy samples the running ``smtpgate serve`` (and its worker processes, if any) from the
outside; its collapsed stacks (``--format raw``) are summed here into the functions with the
most samples on top of the stack (self) and anywhere on it (total). Idle samples (waiting in
the event loop's select) are left out by py-spy, so the percentages are of busy time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.harness import (
    DNS_ADDRESS,
    POSTSCREEN_MAIN_CF,
    ZOMBIE_POOL,
    BenchError,
    DnsServer,
    Gate,
    Sink,
    cpu_seconds,
    new_tmp,
    raise_fd_limit,
    run_loadgen,
)


def py_spy() -> str:
    path = Path(sys.executable).parent / "py-spy"
    if path.exists():
        return str(path)
    found = shutil.which("py-spy")
    if found:
        return found
    raise BenchError("py-spy not found: .venv/bin/pip install py-spy")


def summarise(collapsed: str, top: int = 25) -> str:
    """Top functions by self and by total samples from py-spy's raw (collapsed) output."""
    self_count: Counter[str] = Counter()
    total_count: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        count = int(n)
        samples += count
        self_count[frames[-1]] += count
        for frame in set(frames):
            total_count[frame] += count
    if not samples:
        return "(no samples)"
    out = [f"{samples} busy samples", "", "  self%  total%  function (file)"]
    for frame, count in self_count.most_common(top):
        out.append(
            f"  {100 * count / samples:5.1f}  {100 * total_count[frame] / samples:6.1f}  {frame}"
        )
    out += ["", "  total%  function (file)  [inclusive: smtpgate, aiosmtpd and aiosmtplib frames]"]
    shown = 0
    for frame, count in total_count.most_common():
        if not ("smtpgate/" in frame or "aiosmtp" in frame) or frame.endswith(
            ("(smtpgate/cli.py)", "(smtpgate/__main__.py)")
        ):
            continue  # the event loop's and the entry point's frames are on every stack
        out.append(f"  {100 * count / samples:6.1f}  {frame}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out)


def profile(args: argparse.Namespace) -> int:
    """Run one rate workload (``--profile-workload``) under py-spy, over and over."""
    from bench.bench import workloads

    rows = {w.key: w for w in workloads(quick=False) if w.kind in ("sessions", "msgs", "bytes")}
    if args.profile_workload not in rows:
        raise BenchError(f"--profile-workload: one of {', '.join(rows)}")
    work = rows[args.profile_workload]
    raise_fd_limit()
    spy = py_spy()
    tmp = new_tmp()
    sink = Sink(tmp)
    gate: Gate | None = None
    out = Path(args.profile_out) if args.profile_out else tmp / "profile.txt"

    dns: DnsServer | None = None

    def drive(count: int) -> None:
        assert gate is not None
        if work.loadgen:  # loadgen rows (the half-load ones at full load: no rate to halve)
            extra = ["--size", str(work.size), "--rcpts", str(work.rcpts)]
            pool = ZOMBIE_POOL if work.zombie else 0
            problems = run_loadgen(
                gate.port, work.loadgen, sessions=work.sessions, count=count, pool=pool,
                extra=extra, procs=args.loadgen_procs,
            ).problems  # fmt: skip
        else:
            problems = work.drive(gate.port, count).problems
        if problems:
            raise BenchError(f"{work.key} failed under the profiler: {problems[:3]}")

    try:
        if work.zombie:
            dns = DnsServer(tmp)
            options = [*args.option, f"dns_servers={DNS_ADDRESS}"]
            gate = Gate(tmp, sink.port, options, main_cf_extra=POSTSCREEN_MAIN_CF)
        else:
            gate = Gate(tmp, sink.port, args.option)
        batch = max(10, work.count // 4)
        drive(batch)  # warm up
        argv = [spy, "record", "--pid", str(gate.root_pid), "--subprocesses"]
        argv += ["--rate", "100", "--format", "raw", "--nolineno", "-o", str(out)]
        spy_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # let py-spy attach
        end = time.monotonic() + args.profile_seconds
        done, start, cpu0 = 0, time.perf_counter(), cpu_seconds(gate.root_pid)
        while time.monotonic() < end:
            drive(batch)
            done += batch
        elapsed = time.perf_counter() - start
        cpu = (cpu_seconds(gate.root_pid) - cpu0) / elapsed
        spy_proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        _, err = spy_proc.communicate(timeout=60)
        if not out.exists():
            raise BenchError(f"py-spy wrote no profile: {err.decode(errors='replace')}")
        unit = "sessions" if work.kind == "sessions" else "msgs"
        print(
            f"py-spy profile of smtpgate serve: {work.label}, {elapsed:.0f} s, "
            f"{done / elapsed:.0f} {unit}/s, smtpgate CPU {cpu:.2f} cores"
        )
        print(summarise(out.read_text()))
    finally:
        if gate is not None:
            gate.stop()
        if dns is not None:
            dns.stop()
        sink.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0
