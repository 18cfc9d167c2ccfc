"""The chaos run (bench/chaos.py) end to end on a small workload, and its checker on its own.

The small run starts its own embedded PostgreSQL, runs 250 mixed workflows on two workers
while one is SIGKILLed three times and PostgreSQL crashes once, and must report every workflow
completed and every step's effect exactly once. Its workload is fixed by a seed
(``PGDURABLE_TEST_SEED=<n>`` picks another); what the kills and the crash hit depends on timing,
so no assertion here is about time.

The checker tests feed ``find_violations`` fabricated results without a database: a duplicate,
a missing step, an unfinished instance... must each count as a violation, or a clean chaos run
would prove nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "chaos.py"
SEED = 20261206


def _load_chaos() -> ModuleType:
    """bench/chaos.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_chaos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


# -- the checker, without a database ---------------------------------------------------------

EXPECTED = {"chaos-0": frozenset({1, 2, 1001}), "chaos-1": frozenset({1, 2, 3})}
INSTANCES = [("chaos-0", "aaaaaaaa", "completed"), ("chaos-1", "bbbbbbbb", "completed")]
CLEAN = {
    ("aaaaaaaa", 1): 1,
    ("aaaaaaaa", 2): 1,
    ("aaaaaaaa", 1001): 1,
    ("bbbbbbbb", 1): 1,
    ("bbbbbbbb", 2): 1,
    ("bbbbbbbb", 3): 1,
}


def test_checker_accepts_a_clean_run() -> None:
    v = chaos.find_violations(EXPECTED, INSTANCES, CLEAN)
    assert v.count == 0, v.to_json()
    assert v.labels() == []


def test_checker_reports_a_duplicate() -> None:
    v = chaos.find_violations(EXPECTED, INSTANCES, {**CLEAN, ("bbbbbbbb", 2): 2})
    assert v.count == 1
    assert v.duplicates == {"chaos-1": {2: 2}}
    assert v.labels() == ["chaos-1"]
    assert v.to_json()["duplicates"] == {"chaos-1": {"2": 2}}


def test_checker_reports_a_missing_step() -> None:
    effects = {k: n for k, n in CLEAN.items() if k != ("aaaaaaaa", 1001)}
    v = chaos.find_violations(EXPECTED, INSTANCES, effects)
    assert v.count == 1
    assert v.missing == {"chaos-0": [1001]}


def test_checker_reports_unexpected_effects() -> None:
    v = chaos.find_violations(
        EXPECTED, INSTANCES, {**CLEAN, ("aaaaaaaa", 7): 1, ("cccccccc", 1): 1}
    )
    assert v.count == 2
    assert v.unexpected == {"chaos-0": [7], "cccccccc": [1]}


def test_checker_reports_unfinished_missing_and_extra_instances() -> None:
    instances = [
        ("chaos-0", "aaaaaaaa", "running"),
        ("chaos-0", "dddddddd", "completed"),  # the same workflow started twice
        ("stray", "eeeeeeee", "completed"),
    ]
    v = chaos.find_violations(EXPECTED, instances, {})
    assert v.not_completed == {"chaos-0": "running"}
    assert v.missing_instances == ["chaos-1"]
    assert v.extra_instances == {"chaos-0": 2, "stray": 1}
    assert v.missing == {}  # an instance started twice is reported once, as extra
    assert v.count == 4


def test_checker_counts_worker_crashes() -> None:
    v = chaos.find_violations(EXPECTED, INSTANCES, CLEAN, ["w3 (pid 1) exited with 1"])
    assert v.count == 1


def test_workflows_are_reproducible_and_keyed_by_label() -> None:
    import random

    a = chaos.build_workflows(random.Random(SEED), 300)
    b = chaos.build_workflows(random.Random(SEED), 300)
    assert [(w.label, w.expr, w.steps) for w in a] == [(w.label, w.expr, w.steps) for w in b]
    assert len({w.label for w in a}) == 300
    held = [w for w in a if w.held]
    assert len(held) == 3 and all(w.signals > 0 for w in held)
    kinds = {k for w in a for k in w.blocks}
    assert kinds == set(chaos.BLOCK_WEIGHTS), kinds
    # The expected steps are the ones the text inserts: each effect names its step, a loop
    # body its first step (base + 1, plus the iterations counted so far).
    inserted = re.compile(r"''\{sys_instance_id\}'', (\d+)[ )]")
    for w in a:
        found = {int(n) for n in inserted.findall(w.expr)}
        plain = {s for s in w.steps if s < chaos.LOOP_SPAN}
        loops = {s for s in w.steps if s > chaos.LOOP_SPAN and s % chaos.LOOP_SPAN == 1}
        assert found == plain | loops, (w.label, w.expr)


# -- the run ---------------------------------------------------------------------------------


def _run(args: list[str], timeout: float) -> tuple[int, str]:
    """Run the script; on timeout SIGTERM it (it then stops its workers and PostgreSQL)."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"bench/chaos.py still running after {timeout:.0f} s:\n{out[-4000:]}")
    return proc.returncode, out


@pytest.mark.timeout(200)
def test_chaos_small_run(tmp_path: Path) -> None:
    seed = int(os.environ.get("PGDURABLE_TEST_SEED") or SEED)
    out = tmp_path / "chaos.json"
    args = ["--workflows", "250", "--kills", "3", "--restarts", "1", "--kill-interval", "2"]
    args += ["--seed", str(seed), "--stall-seconds", "60", "--out", str(out)]
    code, output = _run(args, timeout=170)
    print(output)
    assert out.exists(), output[-4000:]
    report: dict[str, Any] = json.loads(out.read_text())
    summary, violations = report["summary"], report["violations"]
    assert violations["count"] == 0, json.dumps(
        {k: report[k] for k in ("violations", "failure_reasons", "diagnostics")}, indent=1
    )[:6000]
    assert code == 0, output[-4000:]
    assert summary["all_completed"] and summary["completed"] == 250, summary
    assert summary["effect_rows"] == summary["expected_effects"], summary
    # The chaos happened, and while there was work left (held signals keep some workflows
    # waiting until the last planned event).
    assert summary["kills"] == 3 and summary["restarts"] == 1, summary
    assert all(k["unfinished_workflows"] > 0 for k in report["kills"]), report["kills"]
    assert all(r["unfinished_workflows"] > 0 for r in report["restarts"]), report["restarts"]
    assert summary["signals_sent"] > 0 and summary["blocks"].get("retry", 0) > 0, summary
