"""Where a step's time goes: py-spy on a worker, pg_stat_statements on the server.

Runs one workflow shape on one worker process for a while, with workflows submitted steadily
so the worker is never idle, and prints the worker's hottest functions (py-spy, own time and
time including callees) and the server's statements by total time (pg_stat_statements, nested
statements included), per workflow.

    .venv/bin/python bench/profile.py --shape seq10 --seconds 15

Profiling slows both sides down: use bench/run.py for figures, this for where they come from.

    .venv/bin/python bench/profile.py --shape seq10 --cpu

runs the same load without profilers and prints instead the CPU each kind of process used per
workflow and per step: the worker, its step connections' backends, its own connections'
backends (claims, heartbeats, notifications), the submitting client's backend (df.start), and
backends that ended meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SHAPES, Server, Workers, _processes, build_graph

from pgdurable.worker.connections import STEP_APPLICATION_NAME, WORKER_APPLICATION_NAME


def _submit(server: Server, graph: str, stop: threading.Event, backlog: int) -> None:
    """Keep about ``backlog`` workflows waiting, so the worker always has work."""
    with psycopg.connect(server.user_dsn, autocommit=True) as conn:
        while not stop.is_set():
            row = conn.execute(
                "SELECT count(*) FROM df.instances WHERE status IN ('pending', 'running')"
            ).fetchone()
            missing = backlog - int(row[0] if row else 0)
            if missing > 0:
                conn.execute(
                    "SELECT df.start(%s, 'profile') FROM generate_series(1, %s)",
                    (graph, missing),
                )
            time.sleep(0.05)


def _py_spy(pid: int, seconds: int, out: Path, native: bool) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    subprocess.run(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--format",
            "raw",
            # Native frames (libpq, psycopg's C code) need the process paused at each sample.
            *(["--native"] if native else ["--nonblocking"]),
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
    )


def _top_functions(raw: Path, limit: int) -> tuple[list[tuple[str, float, float]], int]:
    """(function, own share, inclusive share) of the busiest functions, and the sample count."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        if frames and frames[-1].startswith(("select ", "_run_once", "epoll")):
            continue  # idle in the event loop
        total += n
        names = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].split("/")[-1] + ")"
            for f in frames
        ]
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    top = (
        [(name, own[name] / total, inclusive[name] / total) for name, _ in own.most_common(limit)]
        if total
        else []
    )
    return top, total


def _cpu_groups(conn: psycopg.Connection[Any], worker: int) -> dict[int, str]:
    """The processes to account for, by what they do."""
    names = {
        STEP_APPLICATION_NAME: "backends of the step connections",
        WORKER_APPLICATION_NAME: "backends of the worker's own connections",
    }
    groups = {worker: "the worker (Python)"}
    for pid, app, user in conn.execute(
        "SELECT pid, application_name, usename FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    ):
        groups[pid] = names.get(app) or (
            "backend of the submitting client (df.start)" if user == "bench" else "other backends"
        )
    return groups


def _cpu_by_group(
    server: Server, workers: Workers, seconds: int, steps: int
) -> tuple[int, list[tuple[str, float, float]]]:
    """The workflows completed in ``seconds`` of steady load, and (group, ms per workflow,
    ms per step) for each group of processes."""
    postmaster = server.postmaster_pid
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        groups = _cpu_groups(conn, workers.pids[0])
        before, done0 = _processes(), _completed(conn)
        time.sleep(seconds)
        after, done = _processes(), _completed(conn) - done0
        groups.update(_cpu_groups(conn, workers.pids[0]))
    used: collections.Counter[str] = collections.Counter()
    for pid, name in groups.items():
        if pid in before and pid in after:
            used[name] += after[pid].cpu - before[pid].cpu
    used["background processes and ended backends"] = (
        after[postmaster].reaped
        - before[postmaster].reaped
        + sum(
            p.cpu - before[pid].cpu
            for pid, p in after.items()
            if p.ppid == postmaster and pid in before and pid not in groups
        )
    )
    per = max(done, 1)
    return done, [
        (name, 1000 * s / per, 1000 * s / (per * steps)) for name, s in used.most_common()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="seq10", choices=[s.name for s in SHAPES])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--native", action="store_true", help="sample C frames too (pauses the worker)"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="no profilers: the CPU of each kind of process"
    )
    args = parser.parse_args()
    shape = next(s for s in SHAPES if s.name == args.shape)

    base = Path(tempfile.mkdtemp(prefix="pgdurable-profile-"))
    server = Server(base)
    if not args.cpu:
        server.pg.settings.update(
            {
                "shared_preload_libraries": "'pg_stat_statements'",
                "pg_stat_statements.track": "all",
                "pg_stat_statements.track_utility": "on",
            }
        )
    stop = threading.Event()
    try:
        server.start()
        if not args.cpu:
            with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
        graph = build_graph(server, shape)
        workers = Workers(server, base, 1, args.concurrency)
        workers.start()
        submitter = threading.Thread(
            target=_submit, args=(server, graph, stop, 4 * args.concurrency)
        )
        submitter.start()
        time.sleep(3)  # warm up
        if args.cpu:
            done, groups = _cpu_by_group(server, workers, args.seconds, shape.steps)
            stop.set()
            submitter.join()
            workers.stop()
            print(
                f"{shape.name}: {done / args.seconds:.0f} workflows/s on one worker;"
                " CPU per workflow and per step"
            )
            for name, per_workflow, per_step in groups:
                print(f"{per_workflow:8.3f} ms {per_step:8.3f} ms  {name}")
            total = sum(g[1] for g in groups)
            print(f"{total:8.3f} ms {total / shape.steps:8.3f} ms  in all")
            return 0
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
            done0 = _completed(conn)
            _py_spy(workers.pids[0], args.seconds, base / "spy.txt", args.native)
            done = _completed(conn) - done0
            rows = conn.execute(
                "SELECT s.calls, s.total_exec_time, s.toplevel, r.rolname,"
                "       regexp_replace(s.query, '\\s+', ' ', 'g')"
                "  FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid"
                " WHERE s.query !~ 'pg_stat_statements|count\\(\\*\\) FROM df.instances'"
                " ORDER BY s.total_exec_time DESC LIMIT %s",
                (args.top,),
            ).fetchall()
            tables = conn.execute(
                "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del"
                "  FROM pg_stat_user_tables WHERE schemaname = 'df'"
                "   AND n_tup_ins + n_tup_upd + n_tup_del > 0 ORDER BY relname"
            ).fetchall()
        stop.set()
        submitter.join()
        workers.stop()
        _report(shape.name, done, args.seconds, rows, *_top_functions(base / "spy.txt", args.top))
        print("\ntables since the server started: inserted, updated (HOT), deleted rows")
        for name, ins, upd, hot, dele in tables:
            print(f"  {name:12} {ins:8} {upd:8} ({hot / max(upd, 1):4.0%} HOT) {dele:8}")
        return 0
    finally:
        stop.set()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _completed(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM df.instances WHERE status = 'completed'").fetchone()
    return int(row[0]) if row else 0


def _report(
    shape: str,
    done: int,
    seconds: int,
    rows: list[Any],
    functions: list[tuple[str, float, float]],
    samples: int,
) -> None:
    per = max(done, 1)
    print(f"{shape}: {done} workflows in {seconds} s under profiling ({done / seconds:.0f}/s)")
    print("\nserver: statements by total time, ms per workflow (nested ones indented)")
    for calls, total, toplevel, role, query in rows:
        indent = "" if toplevel else "    "
        print(f"{total / per:8.3f} ms {calls / per:6.2f}x {role:8} {indent}{query[:110]}")
    print(f"\nworker: busiest functions ({samples} samples off the event loop's wait)")
    print("   own  incl  function")
    for name, own, inclusive in functions:
        print(f"{own:6.1%} {inclusive:5.0%}  {name[:120]}")


if __name__ == "__main__":
    raise SystemExit(main())
