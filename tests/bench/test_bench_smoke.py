"""Smoke run of the benchmark (``python -m bench --quick``) so that the harness cannot rot.

It checks that every workload of the table ran against both sides and produced a positive
figure -- never a ratio: figures from a shared, noisy machine are not pass/fail material.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench import workloads
from tests.postfix_instance import postfix_available

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(not postfix_available(), reason="needs Debian's postfix and root"),
]


def _median(cell: str) -> float:
    assert re.fullmatch(r"\d+(\.\d+)?", cell), cell
    return float(cell)


@pytest.mark.timeout(150)
def test_quick_bench_prints_a_row_per_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    rows = workloads(quick=True)
    for w in rows:
        # the first line with the label is the main table's (the latency table follows)
        line = next(ln for ln in lines if ln.startswith(w.label + "  "))
        cells = re.split(r"\s{2,}", line[len(w.label) :].strip())
        assert cells[0] == w.unit, line
        assert _median(cells[1]) > 0, line
        if w.postfix_side:
            assert _median(cells[3]) > 0, line
            assert re.fullmatch(r"\d+\.\d\d", cells[5]), line  # a ratio was computed
        else:
            assert cells[3] == "-", line
    samples = json.loads(out.read_text())["samples"]
    for w in rows:
        sides = ["smtpgate", "Postfix"] if w.postfix_side else ["smtpgate"]
        assert sorted(samples[w.key]) == sorted(sides), w.key
        assert all(v > 0 for side in sides for v in samples[w.key][side]), w.key
    data = json.loads(out.read_text())
    for w in rows:
        if w.kind in ("sessions", "msgs", "bytes"):  # CPU per session or message, both sides
            assert sorted(data["cpu_ms"][w.key]) == ["Postfix", "smtpgate"], w.key
        if w.loadgen:  # the load generator timed the messages on both sides
            for side in ("smtpgate", "Postfix"):
                [run] = data["latency"][w.key][side]
                assert 0 < run["p50"] <= run["p99"], (w.key, side, run)
    # the zombie row: both sides rejected exactly the 90 listed clients of the 100
    for side in ("Postfix", "smtpgate"):
        [counts] = data["counts"]["zombie-90"][side]
        assert counts == {"rejected at connect": 90, "accepted": 10}, (side, counts)
    assert "CPU ms/unit" in proc.stdout
    assert "Latency, the client's final dot to the 250" in proc.stdout
