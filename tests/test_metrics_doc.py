"""docs/metrics.md: its table lists exactly the metrics smtpgate defines, and its example
alert rules parse and name only metrics that exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from smtpgate.metrics import ServerMetrics, SupervisorMetrics

DOC = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
NAME = re.compile(r"\b(?:postfix|smtpgate)_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def _defined(tmp_path: Path) -> dict[str, str]:
    """Every metric smtpgate defines: its name as exposed (a counter's with _total) -> type."""
    objects = [
        *vars(ServerMetrics(str(tmp_path))).values(),
        *vars(SupervisorMetrics(str(tmp_path), 1)).values(),
    ]
    out = {}
    for obj in objects:
        metric = getattr(obj, "metric", obj)
        if not hasattr(metric, "_type"):
            continue
        base = metric._name + ("_total" if metric._type == "counter" else "")
        out[base] = metric._type
    return out


def test_the_table_lists_every_metric(tmp_path: Path) -> None:
    defined = _defined(tmp_path)
    table = re.findall(r"^\| `([a-z0-9_]+)` \| (\w+) \|", DOC, re.M)
    assert dict(table) == defined


def _rules() -> list[dict[str, Any]]:
    blocks = re.findall(r"^```yaml\n(.*?)^```$", DOC, re.M | re.S)
    groups = [g for block in blocks for g in yaml.safe_load(block)["groups"]]
    return [rule for group in groups for rule in group["rules"]]


def test_the_alert_rules_name_metrics_that_exist(tmp_path: Path) -> None:
    defined = _defined(tmp_path)
    exposed = {
        name[: -len("_total")] + suffix if kind == "counter" else name + suffix
        for name, kind in defined.items()
        for suffix in SUFFIXES[kind]
    }
    rules = _rules()
    assert len(rules) >= 8
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[A-Z][A-Za-z]+", rule["alert"]), rule
        expr = rule["expr"]
        assert isinstance(expr, str) and expr.count("(") == expr.count(")"), rule
        unknown = set(NAME.findall(expr)) - exposed
        assert not unknown, f"{rule['alert']}: no such metric {sorted(unknown)}"
