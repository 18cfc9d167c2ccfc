"""The benchmark script runs end to end (a tiny workload) and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHAPES = ("sql1", "seq10", "join10")
WORKER_PROCESSES = (1, 4)


@pytest.mark.timeout(240)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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
