"""Differential tests: smtpgate ``explain`` must answer exactly as a real Postfix 3.7 does.

For every case of ``cases.py`` (the scenario set behind ``postfix_reference.md``) this runs the
session against a throwaway Postfix instance (``tests/postfix_instance.py``) and asks
``smtpgate explain --json`` the same question with the same main.cf text and table files, then
compares, per command sent (HELO, MAIL, each RCPT):

- the reply lines, exactly;
- whether the server disconnected after the reply;
- the action log lines of the session (``NOQUEUE: reject: ...``, ``warn``, ``hold``...), in
  order. Postfix names the queue id once a recipient was accepted; it is normalised to
  ``NOQUEUE``, since smtpgate has no queue.

Postfix's greeting (reply lines and whether it disconnected) is compared when smtpgate's JSON
has a ``greeting`` object (the connection's own exchange). QUIT is not compared. Configs on
which Postfix's smtpd refuses to start (``Config.fatal``) must make ``smtpgate explain`` fail.

Speed: the work for each config (start Postfix, all its sessions, stop, then every explain)
runs in a background thread pool as soon as the first test asks for a result, in test order,
so tests mostly find their results ready. Every wait is bounded.

Run: ``.venv/bin/pytest -m postfix tests/differential`` as root with Debian's ``postfix`` and
``postfix-pcre`` installed. Skipped only when /usr/sbin/postfix is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.differential.cases import CASES, Case, Config, by_config
from tests.postfix_instance import (
    DIR_PLACEHOLDER,
    POSTFIX,
    Dialogue,
    PostfixError,
    PostfixInstance,
)

pytestmark = [
    pytest.mark.postfix,
    # the first test of a configuration waits for its whole group (a Postfix instance,
    # every case of it): on a loaded machine that is more than the usual 60 s
    pytest.mark.timeout(150),
    pytest.mark.skipif(
        not os.path.exists(POSTFIX),
        reason=f"{POSTFIX} is missing: install Debian's postfix and postfix-pcre (.ci/run does)",
    ),
]

COMPARED = [c for c in CASES if c.explainable]
GROUPS = by_config(COMPARED)
EXPLAIN_TIMEOUT = 30.0
RESULT_TIMEOUT = 140.0  # below the 150 s per test of this module
WORKERS = min(4, os.cpu_count() or 2)


def smtpgate_argv() -> list[str]:
    """The smtpgate command: the venv's console script, else ``python -m smtpgate``."""
    script = Path(sys.executable).with_name("smtpgate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "smtpgate"]


@dataclass
class Outcome:
    """Both sides of one case."""

    postfix: Dialogue | None
    postfix_error: str
    smtpgate: dict[str, Any] | None
    smtpgate_error: str
    smtpgate_rc: int


def explain(case: Case, main_cf: Path) -> tuple[dict[str, Any] | None, str, int]:
    """Run ``smtpgate explain`` for ``case``; (parsed JSON or None, error text, exit code)."""
    argv = [
        *smtpgate_argv(),
        "explain",
        "-c",
        str(main_cf),
        f"--client={case.client}",
        "--client-name=unknown",
    ]
    if case.helo is not None:
        argv.append(f"--helo={case.helo}")
    if case.ehlo:
        argv.append("--ehlo")
    if case.mail_from is not None:
        argv.append(f"--from={case.mail_from}")
    argv += [f"--to={r}" for r in case.rcpts]
    argv.append("--json")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=EXPLAIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {EXPLAIN_TIMEOUT}s: {argv}", -1
    where = (
        f"$ {' '.join(argv)}\nexit {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    if proc.returncode != 0:
        return None, where, proc.returncode
    try:
        return json.loads(proc.stdout), "", 0
    except json.JSONDecodeError as exc:
        return None, f"stdout is not JSON ({exc})\n{where}", proc.returncode


def _postfix_side(config: Config, cases: list[Case]) -> dict[str, tuple[Dialogue | None, str]]:
    """Postfix's dialogue (or the error) for every case of one config."""
    postfix: dict[str, tuple[Dialogue | None, str]] = {}
    try:
        with PostfixInstance(
            config.main_cf_text, config.table_map, compatibility_level=config.compat
        ) as pf:
            for case in cases:
                try:
                    d = pf.dialogue(
                        case.client, case.helo, case.mail_from, case.rcpts, ehlo=case.ehlo
                    )
                    postfix[case.name] = (d, "")
                except (PostfixError, OSError) as exc:
                    postfix[case.name] = (None, f"{type(exc).__name__}: {exc}")
    except PostfixError as exc:
        for case in cases:
            postfix[case.name] = (None, f"Postfix could not run this config: {exc}")
    return postfix


def run_config(config: Config, cases: list[Case]) -> dict[str, Outcome]:
    """Both sides for every case of one config (runs in a worker thread)."""
    postfix = _postfix_side(config, cases)
    if not config.fatal and all(d is None for d, _ in postfix.values()):
        postfix = _postfix_side(config, cases)  # one retry: a loaded machine, not a verdict
    out: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="smtpgate-diff-") as tmp:
        # smtpgate gets the same semantic text; @DIR@ -> its own copy of the tables.
        etc = Path(tmp)
        (etc / "main.cf").write_text(config.main_cf_text.replace(DIR_PLACEHOLDER, str(etc)))
        for name, text in config.tables:
            (etc / name).write_text(text.replace(DIR_PLACEHOLDER, str(etc)))
        for case in cases:
            data, err, rc = explain(case, etc / "main.cf")
            d, perr = postfix[case.name]
            out[case.name] = Outcome(d, perr, data, err, rc)
    return out


class Results:
    """Lazily computed outcomes, per config, in a thread pool (submitted in test order)."""

    def __init__(self, wanted: list[Config]) -> None:
        self.wanted = wanted
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="differential")
        self.futures: dict[str, Future[dict[str, Outcome]]] = {}
        self.lock = threading.Lock()
        self.started = False

    def get(self, case: Case) -> Outcome:
        """The outcome of ``case``, waiting (bounded) for its config's work."""
        with self.lock:
            if not self.started:
                self.started = True
                for config in self.wanted:
                    self.futures[config.name] = self.pool.submit(run_config, config, GROUPS[config])
        return self.futures[case.config.name].result(timeout=RESULT_TIMEOUT)[case.name]

    def close(self) -> None:
        """Stop: cancel what has not started, wait for what has."""
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest) -> Iterator[Results]:
    """One lazily filled result store for the configs of the selected tests, in test order."""
    wanted: dict[Config, None] = {}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec else None
        if isinstance(case, Case):
            wanted.setdefault(case.config, None)
    r = Results(list(wanted))
    try:
        yield r
    finally:
        r.close()


def postfix_view(d: Dialogue) -> dict[str, Any]:
    """Postfix's session in the explain JSON shape (QUIT left out)."""
    return {
        "exchanges": [
            {"command": e.command, "reply": e.reply, "disconnect": e.closed}
            for e in d.exchanges
            if e.command != "QUIT"
        ],
        "log": d.noqueue,
    }


def smtpgate_view(data: dict[str, Any]) -> dict[str, Any]:
    """smtpgate's JSON reduced to what is compared (see :func:`_logs` for the log lines).

    A ``greeting`` (an exchange-shaped object for the connection itself) is compared when
    present: its reply lines and disconnect flag, and its log line first among the logs.
    """
    view: dict[str, Any] = {}
    logs: list[str] = []
    greeting = data.get("greeting")
    if isinstance(greeting, dict):
        view["greeting"] = {"reply": list(greeting["reply"]), "disconnect": greeting["disconnect"]}
        logs += _logs(greeting)
    view["exchanges"] = []
    for e in data["exchanges"]:
        view["exchanges"].append(
            {"command": e["command"], "reply": list(e["reply"]), "disconnect": e["disconnect"]}
        )
        logs += _logs(e)
    view["log"] = logs
    return view


def _logs(exchange: dict[str, Any]) -> list[str]:
    """An exchange's log lines: ``logs`` (every line) if present, else ``log``; the queue
    id normalised to NOQUEUE, as on Postfix's side."""
    if isinstance(exchange.get("logs"), list):
        lines = list(exchange["logs"])
    else:
        log = exchange.get("log")
        lines = [] if log is None else [log] if isinstance(log, str) else list(log)
    return [re.sub(r"^[0-9A-F]{6,}:", "NOQUEUE:", line) for line in lines]


def describe(case: Case) -> str:
    """The case, as an admin would reproduce it."""
    tables = "".join(f"\n--- {n} ---\n{t}" for n, t in case.config.tables)
    return (
        f"\n=== {case.id}: {case.config.title} {case.note}\n"
        f"--- main.cf ---\n{case.config.main_cf_text}{tables}\n"
        f"client={case.client} helo={case.helo} from={case.mail_from} to={list(case.rcpts)}\n"
    )


#: Case id -> why smtpgate deliberately differs. Each becomes a strict xfail, so a fix shows up.
KNOWN_DIFFERENCES: dict[str, str] = {
    "unknown-restriction/any": (
        "smtpgate refuses to load a config with an unknown restriction name; Postfix starts "
        "and answers 451 4.3.5 at every RCPT (tests/policy/test_golden_postfix.py asserts it)"
    ),
}


def _param(case: Case) -> Any:
    reason = KNOWN_DIFFERENCES.get(case.id)
    marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in COMPARED])
def test_same_as_postfix(case: Case, results: Results) -> None:
    """smtpgate's replies, disconnects and NOQUEUE lines equal Postfix's for this session."""
    o = results.get(case)
    if case.config.fatal:
        assert o.postfix is None, f"Postfix accepted a config marked fatal{describe(case)}"
        assert o.smtpgate_rc != 0, (
            f"Postfix's smtpd refuses this config at startup, smtpgate explain accepted it:\n"
            f"{o.postfix_error}{describe(case)}"
        )
        return
    if o.postfix is None:
        pytest.fail(f"Postfix side failed: {o.postfix_error}{describe(case)}", pytrace=False)
    if o.smtpgate is None:
        pytest.fail(f"smtpgate explain failed:\n{o.smtpgate_error}{describe(case)}", pytrace=False)
    want = postfix_view(o.postfix)
    got = smtpgate_view(o.smtpgate)
    if "greeting" in got:
        want["greeting"] = {"reply": o.postfix.greeting, "disconnect": o.postfix.greeting_closed}
    if got != want:
        pytest.fail(difference(want, got) + describe(case), pytrace=False)


def difference(want: dict[str, Any], got: dict[str, Any]) -> str:
    """A short account of where smtpgate departs from Postfix, first difference first."""
    out = ["smtpgate differs from Postfix 3.7:"]
    if want.get("greeting") != got.get("greeting"):
        out += [
            f"  greeting  postfix : {want.get('greeting')}",
            f"            smtpgate: {got.get('greeting')}",
        ]
    w_ex, g_ex = want["exchanges"], got["exchanges"]
    for i in range(max(len(w_ex), len(g_ex))):
        w = w_ex[i] if i < len(w_ex) else None
        g = g_ex[i] if i < len(g_ex) else None
        if w != g:
            out.append(f"  exchange {i + 1}: {(w or g or {}).get('command')}")
            out.append(f"    postfix : {_exchange(w)}")
            out.append(f"    smtpgate: {_exchange(g)}")
    if want["log"] != got["log"]:
        out.append("  NOQUEUE log lines")
        out += [f"    postfix : {line}" for line in want["log"]] or ["    postfix : (none)"]
        out += [f"    smtpgate: {line}" for line in got["log"]] or ["    smtpgate: (none)"]
    return "\n".join(out) + "\n"


def _exchange(e: dict[str, Any] | None) -> str:
    if e is None:
        return "(no such exchange)"
    cmd = "" if e["command"] else " (command differs)"
    return " | ".join(e["reply"]) + (" [disconnect]" if e["disconnect"] else "") + cmd
