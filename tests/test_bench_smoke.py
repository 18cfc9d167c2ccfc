"""The benchmark scripts run end to end (tiny workloads) and report every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHAPES = ("sql1", "seq10", "join10")
WORKER_PROCESSES = (1, 4)
FLOOR_SCRIPTS = ("insert", "seq_step", "sql1", "sql1_minimal", "sql1_minimal_x5")


def _bench(script: str, *args: str, timeout: int = 120) -> str:
    """Run bench/<script> with ``args``; its output (the test fails if it does)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(240)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    _bench("run.py", "--quick", "--smoke", "--out", str(out), timeout=220)
    report = json.loads(out.read_text())

    figures = report["figures"]
    expected = {"pgbench_c1_tps", "pgbench_c4_tps"}
    for shape in SHAPES:
        for n in WORKER_PROCESSES:
            for metric in ("workflows_per_s", "steps_per_s", "p50_ms", "p99_ms"):
                expected.add(f"{shape}_w{n}_{metric}")
    assert expected <= set(figures), sorted(expected - set(figures))
    assert all(value > 0 for value in figures.values()), figures

    for run in report["workflows"]:
        assert run["throughput"]["workflows"] > 0
        assert run["latency"]["samples"] > 0
        assert run["latency"]["p99_ms"] >= run["latency"]["p50_ms"] > 0
    settings = report["meta"]["postgres"]["settings"]
    assert settings["fsync"] == "on" and settings["synchronous_commit"] == "on"


@pytest.mark.timeout(150)
def test_bench_trigger1_smoke(tmp_path: Path) -> None:
    """Rows inserted at a set rate start workflows that complete (a warm-up that hung once
    went unnoticed: --smoke leaves trigger1 out)."""
    out = tmp_path / "trigger1.json"
    _bench(
        "run.py", "--smoke", "--shapes", "trigger1", "--trigger-rates", "100",
        "--workers", "1", "--out", str(out),
    )  # fmt: skip
    [run] = json.loads(out.read_text())["triggers"]
    [step] = run["steps"]
    assert step["rows"] > 0 and step["completed"] > 0, step
    assert step["insert_p99_ms"] >= step["insert_p50_ms"] > 0, step


@pytest.mark.timeout(150)
def test_bench_floor_smoke() -> None:
    """bench/floor.py writes every script's rows, and reports a rate for each."""
    output = _bench("floor.py", "--seconds", "1", "--rounds", "1")
    rates = {
        line.split()[0]: float(line.split()[1].replace(",", ""))
        for line in output.splitlines()
        if line.split() and line.split()[0] in FLOOR_SCRIPTS
    }
    assert set(rates) == set(FLOOR_SCRIPTS), output
    assert all(rate > 0 for rate in rates.values()), output


@pytest.mark.timeout(150)
def test_bench_profile_cpu_smoke() -> None:
    """bench/profile.py --cpu accounts for the worker's and the server's CPU."""
    output = _bench("profile.py", "--shape", "sql1", "--seconds", "2", "--cpu")
    used = {
        line.split("ms", 2)[-1].strip(): float(line.split()[0])
        for line in output.splitlines()
        if line.count(" ms") >= 2
    }
    assert used["the worker (Python)"] > 0, output
    assert used["backends of the step connections"] > 0, output
    assert used["in all"] > 0, output
