"""How fast work resumes after a crash: a worker killed with SIGKILL, and PostgreSQL stopped
immediately and started again.

Run ``.venv/bin/python bench/recovery.py [--runs N] [--out FILE]``. It starts its own embedded
PostgreSQL 18, a role granted df usage, and two worker processes (concurrency 10 each).

- ``worker-kill``: twenty workflows of one 1-second step (``SELECT pg_sleep(1)``) are started;
  once both workers run some, one of them is killed (SIGKILL). For each step the killed worker
  held, the time from its death until another worker claims the step again, and until its
  workflow completes (the rerun takes a second itself).
- ``server-restart``: workflows of sixty 50 ms steps run on both workers; PostgreSQL is
  stopped in immediate mode (as in a crash) and started again. The time from the server
  accepting connections until the first checkpoint after it.

Prints the median and worst of each figure over the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres, free_port

SERVER_SETTINGS = {"fsync": "on", "synchronous_commit": "on"}
CONCURRENCY = 10
STEPS = 20


def _setup(pg: EmbeddedPostgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE recovery")
    with psycopg.connect(pg.dsn("recovery"), autocommit=True) as conn:
        schema.install(conn)
        conn.execute("CREATE ROLE app LOGIN")
        conn.execute("SELECT df.grant_usage('app')")


@contextlib.contextmanager
def _workers(dsn: str, log: Path, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    command = [sys.executable, "-m", "pgdurable", "worker", "--dsn", dsn]
    command += ["--concurrency", str(CONCURRENCY)]
    with log.open("ab") as out:
        procs = [
            subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT) for _ in range(count)
        ]
    try:
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait(check: Callable[[], bool], what: str, timeout: float = 120) -> float:
    """Poll ``check`` every 5 ms; the time it first held (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.005)
    raise TimeoutError(f"gave up waiting for {what}")


def _value(conn: psycopg.Connection[tuple[object, ...]], sql: str, *params: object) -> object:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def worker_kill(pg: EmbeddedPostgres, base: Path) -> dict[str, list[float]]:
    """One run of ``worker-kill``: seconds from the death to each held step's re-claim and to
    its workflow's completion."""
    dsn = pg.dsn("recovery")
    with (
        psycopg.connect(dsn, autocommit=True) as admin,
        psycopg.connect(pg.dsn("recovery", user="app"), autocommit=True) as app,
        _workers(dsn, base / "workers.log", 2) as (victim, survivor),
    ):
        registered = "SELECT count(*) FROM df._worker_epoch WHERE pid = ANY(%s)"
        _wait(lambda: _value(admin, registered, [victim.pid, survivor.pid]) == 2, "both workers")
        ids = [str(_value(app, "SELECT df.start('SELECT pg_sleep(1)')")) for _ in range(STEPS)]
        victim_id = _value(admin, "SELECT epoch_id FROM df._worker_epoch WHERE pid = %s",
                           victim.pid)  # fmt: skip
        # A first step runs in its instance's start transaction: its task is the 'start'.
        held = (
            "SELECT array_agg(instance_id) FROM df._tasks"
            " WHERE lease_owner = %s AND kind IN ('start', 'sql')"
        )
        _wait(lambda: bool(_value(admin, held, victim_id)), "steps on the victim")
        time.sleep(0.3)  # its statements are running
        taken = list(_value(admin, held, victim_id) or [])  # type: ignore[call-overload]
        os.kill(victim.pid, signal.SIGKILL)
        died = time.monotonic()
        victim.wait()
        claimed: dict[str, float] = {}
        done: dict[str, float] = {}
        while len(done) < len(taken) and time.monotonic() - died < 120:
            rows = admin.execute(
                "SELECT i.id, i.status, t.lease_owner FROM df.instances i"
                " LEFT JOIN df._tasks t ON t.instance_id = i.id WHERE i.id = ANY(%s)",
                (taken,),
            ).fetchall()
            now = time.monotonic()
            for instance, status, owner in rows:
                if (owner is not None and owner != victim_id) or status == "completed":
                    claimed.setdefault(str(instance), now)
                if status == "completed":
                    done.setdefault(str(instance), now)
            time.sleep(0.005)
        _wait(
            lambda: _value(admin, "SELECT count(*) FROM df.instances WHERE id = ANY(%s)"
                           " AND status = 'completed'", ids) == len(ids),
            "every workflow",
        )  # fmt: skip
        admin.execute("DELETE FROM df.instances")
    return {
        "reclaimed_s": [claimed[i] - died for i in taken],
        "completed_s": [done[i] - died for i in taken],
    }


def server_restart(pg: EmbeddedPostgres, base: Path) -> dict[str, list[float]]:
    """One run of ``server-restart``: seconds from the server accepting connections again to
    the first checkpoint committed after it."""
    dsn = pg.dsn("recovery")
    graph = " ~> ".join(["'SELECT pg_sleep(0.05)'"] * 60)
    progress = "SELECT coalesce(sum(checkpoints), 0) FROM df._runs"
    with _workers(dsn, base / "workers.log", 2):
        with psycopg.connect(pg.dsn("recovery", user="app"), autocommit=True) as app:
            for _ in range(10):
                app.execute(f"SELECT df.start({graph})")
        with psycopg.connect(dsn, autocommit=True) as admin:
            start = int(_value(admin, progress))  # type: ignore[call-overload]
            _wait(lambda: int(_value(admin, progress)) > start + 20, "work")  # type: ignore[call-overload]
        pg.stop("immediate")
        pg.start()  # returns once the server accepts connections
        accepting = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as admin:
            before = int(_value(admin, progress))  # type: ignore[call-overload]
            resumed = _wait(
                lambda: int(_value(admin, progress)) > before,
                "a checkpoint",  # type: ignore[call-overload]
            )
            admin.execute("SELECT df.cancel(id) FROM df.instances")
            admin.execute("DELETE FROM df.instances")
    return {"resumed_s": [resumed - accepting]}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="pgdurable-recovery-"))
    pg = EmbeddedPostgres(base / "data", free_port(), settings=SERVER_SETTINGS)
    pg.start()
    figures: dict[str, list[float]] = {}
    try:
        _setup(pg)
        for run in range(args.runs):
            for scenario in (worker_kill, server_restart):
                for name, values in scenario(pg, base).items():
                    figures.setdefault(f"{scenario.__name__}.{name}", []).extend(values)
            print(f"run {run + 1} of {args.runs} done", flush=True)
    finally:
        pg.stop("fast")
    summary = {name: _summary(values) for name, values in figures.items()}
    for name, values in summary.items():
        print(f"{name:32} median {values['median']:7.3f} s   max {values['max']:7.3f} s")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "samples": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
