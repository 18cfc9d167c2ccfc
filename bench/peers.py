"""pgdurable against DBOS Transact: workflows per second on the same PostgreSQL, in one run.

Run ``.venv/bin/python bench/peers.py [--quick] [--out bench/results/peers.json]``. It needs the
optional extra ``peers`` (``.venv/bin/pip install -e '.[peers]'``: DBOS Transact 3.4.0); ``--help``
works without it, since dbos is imported only where DBOS runs.

One embedded PostgreSQL 18 with bench/run.py's durable settings (fsync on) serves both. For each
shape, one SQL step (``sql1``) and ten in sequence (``seq10``), each step an INSERT:

- DBOS runs in processes of its own: a ``@DBOS.workflow()`` calling a datasource transaction
  (``SQLAlchemyDatasource.transaction``, what DBOS 3 has for ``@DBOS.transaction``) per step. The
  batch is started three ways (``--dbos``): ``DBOS.start_workflow`` in one process (``start``),
  ``DBOS.enqueue_workflow`` on a queue run by one process (``queue``) or shared by two
  (``queue2``), 16 workflows at once per process.
- pgdurable runs the same shape the way bench/run.py measures it (its ``Runner``): one worker
  process with ``--concurrency 16``, a batch submitted with ``df.start``.

Each is timed from the server's clocks, first start to last completion, and runs alone, from
emptied tables and a CHECKPOINT. The ratio pgdurable / DBOS uses DBOS's fastest way. See
bench/README.md for the method and the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from rich.table import Table

import pgdurable
from pgdurable import __version__

# bench/ is not a package: run.py is found next to this file however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

DBOS_VERSION = "3.4.0"  # the version the extra pins, and the one the figures are for
DBOS_SYS_DB = "dbos_sys"
DBOS_APP_DB = "dbos_app"
CONCURRENCY = 16  # pgdurable's worker --concurrency, and DBOS's workflows at once per process
SUBMIT_THREADS = 4  # as bench/run.py's SUBMIT_CLIENTS: starting is spread over 4 threads
# A DBOS queue polls for work; its default (1 s) would cap a 16-wide queue at 16 workflows/s,
# which no one after throughput would keep.
QUEUE_POLL_SECONDS = 0.01
WAIT_POLL_SECONDS = 0.1  # how often completion is checked, as in bench/run.py
STALL_SECONDS = 90.0  # no progress for this long: give up
CHILD_TIMEOUT_SECONDS = 900.0
DBOS_VARIANTS = ("start", "queue", "queue2")  # the default; see parse_variant
PEER_SHAPES = ("sql1", "seq10")
PGBENCH_CLIENTS = 4

console = run.console


@dataclass
class Result:
    """One engine's throughput batch for one shape, and what it cost per workflow."""

    engine: str  # "dbos" or "pgdurable"
    driver: str  # how the batch was started and run
    processes: int  # DBOS processes / pgdurable worker processes
    shape: str
    steps: int
    concurrency: int
    workflows: int
    seconds: float  # first start to last completion, server clock
    submit_seconds: float  # client time to start the whole batch
    workflows_per_s: float
    steps_per_s: float
    write_xacts: float  # transactions that wrote (got an xid), cluster-wide, per workflow
    wal_bytes: float  # per workflow
    # Python CPU per workflow: for DBOS its processes (which also start the workflows), for
    # pgdurable the worker process plus the bench client that submits with df.start.
    cpu_ms_python: float
    cpu_ms_postgres: float  # all PostgreSQL processes, per workflow
    machine_busy_pct: float  # all cores, whole machine, during the batch
    other_busy_pct: float  # the share not used by the bench's processes


# -- DBOS, in its own process ----------------------------------------------------------------


def dbos_child(spec: dict[str, Any]) -> int:
    """Launch DBOS; as the leader, warm up, run one timed batch and write its figures to
    spec["out"]; as a helper, only run what the queue hands this process until stopped.

    DBOS runs in processes of its own: it is a process-wide singleton with background threads
    and pools, and fresh processes per scenario are the clean state pgdurable's fresh worker
    gets too.
    """
    import sqlalchemy as sa
    from dbos import DBOS, DBOSConfig, SQLAlchemyDatasource

    _exit_with_parent()
    conc: int = spec["concurrency"]
    driver: str = spec["driver"]
    config: DBOSConfig = {
        "name": "peers",
        "system_database_url": spec["sys_url"],
        # DBOS recovers the pending workflows of its executor ID at launch: with the default
        # ("local") for all, a process started later would take over the others' work.
        "executor_id": spec["executor_id"],
        # Room for every running workflow plus the submitting threads and DBOS's own threads,
        # so no workflow waits for a connection (the default pool is 20).
        "sys_db_pool_size": conc + SUBMIT_THREADS + 8,
        "log_level": "WARNING",  # per-workflow INFO lines would cost DBOS CPU
    }
    if not spec["pre_ping"]:
        # DBOS's system pool pings every connection it hands out (a round trip per use).
        config["db_engine_kwargs"] = {"pool_pre_ping": False}
    if driver == "start":
        # start_workflow hands each workflow to this pool at once: its size is the concurrency
        # (unbounded by default, which would make a thread per workflow of the batch).
        config["max_executor_threads"] = conc
    DBOS(config=config)
    ds = SQLAlchemyDatasource.create(
        spec["app_url"], engine_kwargs={"pool_size": conc + 4, "max_overflow": 0}
    )
    insert_sql = sa.text("INSERT INTO bench_effects(v) VALUES (:v)")

    # READ COMMITTED, as pgdurable runs its steps (DBOS's default is SERIALIZABLE).
    @ds.transaction(isolation_level="READ COMMITTED")
    def insert(v: int) -> None:
        ds.sql_session().execute(insert_sql, {"v": v})

    @DBOS.workflow()
    def steps_workflow(n: int) -> None:
        for v in range(1, n + 1):
            insert(v)

    DBOS.launch()
    if driver == "queue":
        DBOS.register_queue(
            "peers", worker_concurrency=conc, polling_interval_sec=spec["queue_poll"]
        )
    try:
        return _dbos_role(spec, steps_workflow)
    except BaseException:
        # Leave at once: a normal exit would first wait for every workflow still in DBOS's
        # executor, and the bench would only see the error after that.
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)


def _dbos_role(spec: dict[str, Any], steps_workflow: Callable[[int], None]) -> int:
    """The helper's wait, or the leader's warm-up and timed batch (DBOS is launched)."""
    from dbos import DBOS, SetWorkflowID

    steps: int = spec["steps"]
    conc: int = spec["concurrency"]
    driver: str = spec["driver"]
    if spec["role"] == "helper":
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
        Path(spec["ready"]).touch()
        stopped.wait()
        DBOS.destroy()
        return 0

    def start_one(label: str, k: int) -> None:
        # Explicit IDs let the batch be found in dbos.workflow_status; DBOS's own are uuid4s.
        with SetWorkflowID(f"{label}-{k:07d}"):
            if driver == "queue":
                DBOS.enqueue_workflow("peers", steps_workflow, steps)
            else:
                DBOS.start_workflow(steps_workflow, steps)

    sys_conn = psycopg.connect(spec["sys_url"], autocommit=True)
    seq = iter(range(1_000_000))

    def batch(count: int, phase: str) -> tuple[str, float]:
        label = f"{phase}{next(seq)}"
        began = time.monotonic()
        _in_threads(lambda k: start_one(label, k), count, SUBMIT_THREADS)
        submitted = time.monotonic() - began
        _dbos_wait(sys_conn, label, count)
        return label, submitted

    # Connections, and the queue's thread, which starts up to a second after the queue is
    # registered; pgdurable's worker is up and listening before its warm-up too.
    batch(8, "prime")
    # Warm-up as run.Runner.warmup: a small batch, then a bigger one when it was too short.
    count = max(2 * conc // steps, 8)
    began = time.monotonic()
    batch(count, "warmup")
    rate = count / (time.monotonic() - began)
    if spec["warmup_seconds"] > 0 and time.monotonic() - began < spec["warmup_seconds"] / 2:
        count = int(min(max(rate * spec["warmup_seconds"], count), spec["batch_max"]))
        began = time.monotonic()
        batch(count, "warmup")
        rate = count / (time.monotonic() - began)
    count = int(rate * spec["throughput_seconds"])
    count = min(max(count, spec["batch_min"]), spec["batch_max"])

    wal0, xid0 = _wal_and_xid(sys_conn)
    # "client" is this process, "workers" the helpers: together, all of DBOS.
    meter = run.CpuMeter(spec["postmaster_pid"], spec["helper_pids"])
    label, submit_seconds = batch(count, "throughput")
    cpu = meter.stop()
    wal1, xid1 = _wal_and_xid(sys_conn)
    row = sys_conn.execute(
        "SELECT count(*), (max(coalesce(completed_at, updated_at)) - min(created_at)) / 1000.0"
        "  FROM dbos.workflow_status WHERE workflow_uuid LIKE %s",
        (label + "-%",),
    ).fetchone()
    assert row is not None
    n, seconds = int(row[0]), float(row[1])
    processes = 1 + len(spec["helper_pids"])
    result = Result(
        engine="dbos",
        driver=spec["variant"],
        processes=processes,
        shape=spec["shape"],
        steps=steps,
        concurrency=conc * processes,
        workflows=n,
        seconds=seconds,
        submit_seconds=submit_seconds,
        workflows_per_s=n / seconds,
        steps_per_s=n * steps / seconds,
        write_xacts=(xid1 - xid0) / n,
        wal_bytes=(wal1 - wal0) / n,
        cpu_ms_python=1000 * (cpu["client"] + cpu["workers"]) / n,
        cpu_ms_postgres=1000 * cpu["postgres"] / n,
        machine_busy_pct=cpu["busy_pct"],
        other_busy_pct=cpu["other_pct"],
    )
    Path(spec["out"]).write_text(json.dumps(asdict(result)))
    sys_conn.close()
    DBOS.destroy()
    return 0


def _exit_with_parent() -> None:
    """End this process when the bench that started it is gone (killed, not cleaned up)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _in_threads(work: Callable[[int], None], count: int, threads: int) -> None:
    """Call work(0..count-1) from ``threads`` threads, as fast as they go."""
    items = iter(range(count))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while True:
                with lock:
                    k = next(items, None)
                if k is None:
                    return
                work(k)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise run.BenchError(f"starting workflows failed: {errors[0]!r}")


def _dbos_wait(conn: psycopg.Connection[Any], label: str, count: int) -> None:
    """Poll dbos.workflow_status until all ``count`` workflows of ``label`` succeeded."""
    last_done, last_change = -1, time.monotonic()
    while True:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'SUCCESS'),"
            "       count(*) FILTER (WHERE status IN"
            "         ('ERROR', 'CANCELLED', 'MAX_RECOVERY_ATTEMPTS_EXCEEDED'))"
            "  FROM dbos.workflow_status WHERE workflow_uuid LIKE %s",
            (label + "-%",),
        ).fetchone()
        assert row is not None
        done, failed = int(row[0]), int(row[1])
        if failed:
            raise run.BenchError(f"{failed} DBOS workflow(s) of {label} failed")
        if done >= count:
            return
        now = time.monotonic()
        if done != last_done:
            last_done, last_change = done, now
        elif now - last_change > STALL_SECONDS:
            raise run.BenchError(f"{label}: stuck at {done}/{count} for {STALL_SECONDS:.0f} s")
        time.sleep(WAIT_POLL_SECONDS)


def _wal_and_xid(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    row = conn.execute(
        "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn,"
        "       pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# -- the scenarios, from the bench process ---------------------------------------------------


_children: list[subprocess.Popen[bytes]] = []


def _reset_dbos(server: run.Server, create: bool) -> None:
    """Drop DBOS's databases (and make them anew, with the effects table): a clean state."""
    with psycopg.connect(server.pg.dsn(), autocommit=True) as conn:
        for db in (DBOS_SYS_DB, DBOS_APP_DB):
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            if create:
                conn.execute(f"CREATE DATABASE {db}")
        if create:
            with psycopg.connect(server.pg.dsn(DBOS_APP_DB), autocommit=True) as app:
                # The same table as bench/run.py's, so an INSERT costs the same in both.
                app.execute(
                    "CREATE TABLE bench_effects ("
                    " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                    " v integer NOT NULL,"
                    " at timestamptz NOT NULL DEFAULT clock_timestamp())"
                )
        conn.execute("CHECKPOINT")


def describe_variant(variant: str, concurrency: int) -> str:
    driver, processes = parse_variant(variant)
    if driver == "start":
        return (
            f"DBOS.start_workflow from {SUBMIT_THREADS} threads, max_executor_threads={concurrency}"
        )
    where = "1 process" if processes == 1 else f"{processes} processes"
    return (
        f"DBOS.enqueue_workflow from {SUBMIT_THREADS} threads; queue worker_concurrency="
        f"{concurrency}, {where}"
    )


def parse_variant(variant: str) -> tuple[str, int]:
    """``start`` / ``queue`` / ``queue2``: the driver, and how many DBOS processes (a number
    after ``queue``: more processes share the queue, which is how DBOS spreads work)."""
    m = re.fullmatch(r"(start|queue)(\d*)", variant)
    if not m or (m.group(1) == "start" and m.group(2)) or m.group(2) in ("0",):
        raise ValueError(variant)
    return m.group(1), int(m.group(2) or 1)


def run_dbos(
    server: run.Server,
    base: Path,
    shape: run.Shape,
    mode: run.Mode,
    variant: str,
    concurrency: int,
    poll: float,
    pre_ping: bool,
) -> Result:
    """One DBOS scenario: fresh databases, the helper processes (if any), then the leader."""
    driver, processes = parse_variant(variant)
    _reset_dbos(server, create=True)
    name = f"dbos-{shape.name}-{variant}"
    out = base / f"{name}.json"
    spec: dict[str, Any] = {
        "shape": shape.name,
        "steps": shape.steps,
        "driver": driver,
        "variant": variant,
        # Per process, as a pgdurable worker's --concurrency. Halved for two processes, the
        # queue left slots idle between its polls: 2 x 8 ran well below 2 x 16.
        "concurrency": concurrency,
        "queue_poll": poll,
        "pre_ping": pre_ping,
        "sys_url": server.pg.dsn(DBOS_SYS_DB),
        "app_url": server.pg.dsn(DBOS_APP_DB),
        "postmaster_pid": server.postmaster_pid,
        "warmup_seconds": mode.warmup_seconds,
        "throughput_seconds": mode.throughput_seconds,
        "batch_min": mode.batch_min,
        "batch_max": mode.batch_max,
        "out": str(out),
    }
    try:
        helpers = []
        for i in range(1, processes):
            ready = base / f"{name}-{i}.ready"
            helpers.append(
                (
                    _spawn_child(
                        {
                            **spec,
                            "role": "helper",
                            "executor_id": f"peers-{i}",
                            "ready": str(ready),
                        },
                        base / f"{name}-{i}.log",
                    ),
                    ready,
                    base / f"{name}-{i}.log",
                )
            )
        deadline = time.monotonic() + 60
        for proc, ready, log in helpers:
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise run.BenchError(f"DBOS helper {proc.pid} did not start\n" + _tail(log))
                time.sleep(0.05)
        log = base / f"{name}-0.log"
        leader = _spawn_child(
            {
                **spec,
                "role": "leader",
                "executor_id": "peers-0",
                "helper_pids": [proc.pid for proc, _, _ in helpers],
            },
            log,
        )
        try:
            rc = leader.wait(timeout=CHILD_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            raise run.BenchError(
                f"DBOS {shape.name} ({variant}) took over {CHILD_TIMEOUT_SECONDS:.0f} s\n"
                + _tail(log)
            ) from None
        if rc != 0 or not out.exists():
            raise run.BenchError(f"DBOS {shape.name} ({variant}) exited with {rc}\n" + _tail(log))
    finally:
        _stop_children()
    _reset_dbos(server, create=False)
    return Result(**json.loads(out.read_text()))


def _spawn_child(spec: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--dbos-child", json.dumps(spec)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=log.parent,  # DBOS looks for a dbos-config.yaml in its working directory
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # Ctrl-C reaches us; we stop it
        )
    _children.append(proc)
    return proc


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path}: no log)"


def _stop_children() -> None:
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def _workers(server: run.Server, base: Path) -> Iterator[run.Workers]:
    workers = run.Workers(server, base, 1, CONCURRENCY)
    try:
        workers.start()
        yield workers
    finally:
        workers.stop()


def run_pgdurable(
    server: run.Server, base: Path, shape: run.Shape, mode: run.Mode, stop: threading.Event
) -> Result:
    """bench/run.py's warm-up and throughput batch, on one worker process."""
    server.reset()
    with _workers(server, base) as workers:
        runner = run.Runner(server, workers, stop, False)
        graph = run.build_graph(server, shape)
        rate = runner.warmup(shape, graph, mode)
        count = min(max(int(rate * mode.throughput_seconds), mode.batch_min), mode.batch_max)
        tp = runner.throughput(shape, graph, count)
    c = tp.cost
    return Result(
        engine="pgdurable",
        driver="df.start",
        processes=1,
        shape=shape.name,
        steps=shape.steps,
        concurrency=CONCURRENCY,
        workflows=tp.workflows,
        seconds=tp.seconds,
        submit_seconds=tp.submit_seconds,
        workflows_per_s=tp.workflows_per_s,
        steps_per_s=tp.steps_per_s,
        write_xacts=c.write_xacts,
        wal_bytes=c.wal_bytes,
        cpu_ms_python=c.cpu_ms_workers + c.cpu_ms_client,
        cpu_ms_postgres=c.cpu_ms_postgres,
        machine_busy_pct=c.machine_busy_pct,
        other_busy_pct=c.other_busy_pct,
    )


# -- output ----------------------------------------------------------------------------------


def best_dbos(results: list[Result], shape: str) -> Result | None:
    dbos = [r for r in results if r.engine == "dbos" and r.shape == shape]
    return max(dbos, key=lambda r: r.workflows_per_s, default=None)


def comparisons(results: list[Result]) -> list[dict[str, Any]]:
    out = []
    for shape in PEER_SHAPES:
        ours = [r for r in results if r.engine == "pgdurable" and r.shape == shape]
        theirs = best_dbos(results, shape)
        if not ours or theirs is None:
            continue
        ratio = ours[0].workflows_per_s / theirs.workflows_per_s
        out.append(
            {
                "shape": shape,
                "pgdurable_workflows_per_s": round(ours[0].workflows_per_s, 1),
                "dbos_workflows_per_s": round(theirs.workflows_per_s, 1),
                "dbos_driver": theirs.driver,
                "ratio": round(ratio, 2),
                "target": 10.0,
                "met": ratio >= 10.0,
            }
        )
    return out


def figures(results: list[Result], pgbench: list[run.PgbenchResult]) -> dict[str, float]:
    """Headline figures under stable keys."""
    out: dict[str, float] = {}
    for p in pgbench:
        out[f"pgbench_c{p.clients}_tps"] = round(p.tps, 1)
    for r in results:
        key = f"{r.engine}_{r.shape}" + (f"_{r.driver}" if r.engine == "dbos" else "")
        out[f"{key}_workflows_per_s"] = round(r.workflows_per_s, 1)
        out[f"{key}_steps_per_s"] = round(r.steps_per_s, 1)
    for c in comparisons(results):
        out[f"dbos_{c['shape']}_best_workflows_per_s"] = c["dbos_workflows_per_s"]
        out[f"ratio_{c['shape']}"] = c["ratio"]
    return out


def print_report(meta: dict[str, Any], results: list[Result], pgbench: list[Any]) -> None:
    m = meta["machine"]
    console.print()
    console.print(
        f"[bold]pgdurable vs DBOS Transact {meta['dbos']['version']}[/] ({meta['mode']}) "
        f"{meta['date']}  pgdurable {meta['pgdurable']['version']} @ {meta['pgdurable']['git']}",
        highlight=False,
    )
    console.print(
        f"machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_gb']} GB; load average at "
        f"start {m['load_avg_at_start']}, busy before start {m['busy_before_start_pct']}%",
        highlight=False,
    )
    console.print(f"pgdurable from {meta['pgdurable']['source']}", highlight=False)
    console.print(f"server: {meta['postgres']['version']}", highlight=False)
    settings = ", ".join(f"{k}={v}" for k, v in meta["postgres"]["settings"].items())
    console.print(f"settings: {settings}", highlight=False)
    for p in pgbench:
        console.print(
            f"pgbench (one INSERT per transaction, {p.clients} clients, {p.seconds} s): "
            f"{p.tps:,.0f} commits/s",
            highlight=False,
        )

    table = Table(title="Throughput batch: first start to last completion (server clock)")
    for col, justify in (
        ("engine", "left"),
        ("workflow", "left"),
        ("driver", "left"),
        ("procs × conc.", "right"),
        ("batch", "right"),
        ("seconds", "right"),
        ("workflows/s", "right"),
        ("SQL steps/s", "right"),
        ("write xacts / wf", "right"),
        ("WAL kB / wf", "right"),
        ("CPU ms Python / wf", "right"),
        ("CPU ms postgres / wf", "right"),
        ("machine busy (other)", "right"),
    ):
        # Headers fold rather than cut ("workflows/s" came out as "workflows…").
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in results:
        table.add_row(
            r.engine,
            r.shape,
            r.driver,
            f"{r.processes} × {r.concurrency // r.processes}",
            str(r.workflows),
            f"{r.seconds:.1f}",
            f"{r.workflows_per_s:,.1f}",
            f"{r.steps_per_s:,.0f}",
            f"{r.write_xacts:.1f}",
            f"{r.wal_bytes / 1024:.1f}",
            f"{r.cpu_ms_python:.2f}",
            f"{r.cpu_ms_postgres:.2f}",
            f"{r.machine_busy_pct:.0f}% ({r.other_busy_pct:.0f}%)",
        )
    console.print(table)

    ratios = Table(title="pgdurable / DBOS (DBOS's best driver), workflows per second")
    for col in ("workflow", "pgdurable", "DBOS", "DBOS driver", "ratio", "target"):
        ratios.add_column(
            col, justify="left" if col.startswith(("workflow", "DBOS d")) else "right"
        )
    for c in comparisons(results):
        ratios.add_row(
            c["shape"],
            f"{c['pgdurable_workflows_per_s']:,.1f}",
            f"{c['dbos_workflows_per_s']:,.1f}",
            c["dbos_driver"],
            f"{c['ratio']:.2f}×",
            f">= 10× ({'met' if c['met'] else 'not met'})",
        )
    console.print(ratios)
    for variant, what in meta["dbos"]["variants"].items():
        console.print(f"DBOS {variant}: {what}", highlight=False)


# -- main ------------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short run (about 1-2 minutes)")
    parser.add_argument(
        "--out",
        type=Path,
        default=run.REPO / "bench" / "results" / "peers.json",
        help="where to write the JSON results (default: bench/results/peers.json)",
    )
    parser.add_argument(
        "--shapes",
        default=",".join(PEER_SHAPES),
        help=f"workflow shapes, comma-separated (default: {','.join(PEER_SHAPES)})",
    )
    parser.add_argument(
        "--dbos",
        default=",".join(DBOS_VARIANTS),
        help="how DBOS runs the batch, comma-separated: start (DBOS.start_workflow), queue (a "
        "DBOS queue), queueN (the queue shared by N DBOS processes); the ratio uses the "
        f"fastest (default: {','.join(DBOS_VARIANTS)})",
    )
    parser.add_argument(
        "--dbos-concurrency",
        type=int,
        default=CONCURRENCY,
        help=f"DBOS workflows running at once in each of its processes (default: {CONCURRENCY}, "
        "as pgdurable's worker)",
    )
    parser.add_argument(
        "--queue-poll",
        type=float,
        default=QUEUE_POLL_SECONDS,
        help=f"the DBOS queue's polling_interval_sec (default: {QUEUE_POLL_SECONDS})",
    )
    parser.add_argument(
        "--dbos-pre-ping",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="DBOS's system pool checks each connection before use: DBOS's default, off here "
        "(a round trip per use saved; the effect was within the noise)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    parser.add_argument("--dbos-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dbos_child:
        return dbos_child(json.loads(args.dbos_child))

    shapes = [s for name in args.shapes.split(",") for s in run.SHAPES if s.name == name.strip()]
    variants = [v.strip() for v in args.dbos.split(",") if v.strip()]
    try:
        for v in variants:
            parse_variant(v)
    except ValueError as exc:
        parser.error(f"unknown --dbos variant: {exc}")
    if not shapes or not variants:
        parser.error("nothing to run")
    try:
        dbos_version = importlib.metadata.version("dbos")
    except importlib.metadata.PackageNotFoundError:
        dbos_version = None
    if dbos_version is None or importlib.util.find_spec("dbos") is None:
        console.print(
            "[bold red]DBOS is not installed:[/] .venv/bin/pip install -e '.\\[peers]'",
            highlight=False,
        )
        return 2
    if dbos_version != DBOS_VERSION:
        console.print(
            f"[yellow]warning:[/] dbos {dbos_version} is installed; the extra pins {DBOS_VERSION}",
            highlight=False,
        )
    mode = run.MODES["quick" if args.quick else "full"]

    # Ctrl-C and SIGTERM both end the run cleanly, as in bench/run.py.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stop = threading.Event()
    base = Path(tempfile.mkdtemp(prefix="pgdurable-peers-"))
    server = run.Server(base)
    failed = True
    began = time.monotonic()
    try:
        idle_busy = run.busy_elsewhere(1.0)
        if idle_busy > 10:
            console.print(
                f"[yellow]warning:[/] the machine is already {idle_busy:.0f}% busy; "
                "figures will be lower and noisier than on an idle machine",
                highlight=False,
            )
        console.print(f"starting PostgreSQL in {base} ...", highlight=False)
        server.start()
        meta: dict[str, Any] = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mode": mode.name,
            "machine": {**run.machine_info(), "busy_before_start_pct": round(idle_busy, 1)},
            "postgres": server.describe(),
            "pgdurable": {
                "version": __version__,
                "git": run.git_describe(),
                # Where the engine ran from: the work tree, or a snapshot put first on PYTHONPATH.
                "source": str(Path(pgdurable.__file__).resolve().parent),
            },
            "dbos": {
                "version": dbos_version,
                "variants": {v: describe_variant(v, args.dbos_concurrency) for v in variants},
            },
            "method": {
                "pgdurable_concurrency": CONCURRENCY,
                "dbos_concurrency": args.dbos_concurrency,
                "submit_threads": SUBMIT_THREADS,
                "dbos_queue_polling_interval_sec": args.queue_poll,
                "dbos_sys_pool_pre_ping": args.dbos_pre_ping,
                "dbos_step": "SQLAlchemyDatasource.transaction(isolation_level='READ COMMITTED')"
                ": INSERT INTO bench_effects(v) VALUES (:v)",
                "pgdurable_step": run.STEP_SQL.format(n="<step number>"),
                "timing": "first start to last completion, from the server's clocks "
                "(pgdurable: df.instances created_at / completed_at; DBOS: "
                "dbos.workflow_status created_at / completed_at)",
                "warmup_seconds": mode.warmup_seconds,
                "throughput_seconds": mode.throughput_seconds,
            },
        }
        pgbench: list[run.PgbenchResult] = []
        console.print(f"pgbench: {PGBENCH_CLIENTS} clients, {mode.pgbench_seconds} s ...")
        pgbench.append(run.run_pgbench(server, base, PGBENCH_CLIENTS, mode.pgbench_seconds))
        results: list[Result] = []
        # Shape by shape, DBOS then pgdurable, so each pair is measured close together in time.
        for shape in shapes:
            for v in variants:
                what = describe_variant(v, args.dbos_concurrency)
                console.print(f"DBOS {shape.name}: {what} ...", highlight=False)
                results.append(
                    run_dbos(
                        server,
                        base,
                        shape,
                        mode,
                        v,
                        args.dbos_concurrency,
                        args.queue_poll,
                        args.dbos_pre_ping,
                    )
                )
            console.print(
                f"pgdurable {shape.name}: 1 worker process, concurrency {CONCURRENCY} ...",
                highlight=False,
            )
            results.append(run_pgdurable(server, base, shape, mode, stop))
        meta["elapsed_seconds"] = round(time.monotonic() - began, 1)
        print_report(meta, results, pgbench)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "meta": meta,
                    "figures": figures(results, pgbench),
                    "comparisons": comparisons(results),
                    "pgbench": [asdict(p) for p in pgbench],
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )
        console.print(f"wrote {args.out} ({meta['elapsed_seconds']} s)", highlight=False)
        failed = False
        return 0
    except KeyboardInterrupt:
        console.print("interrupted; stopping")
        failed = False  # nothing to look into: clean up
        return 130
    except run.BenchError as exc:
        console.print(f"[bold red]benchmark failed:[/] {exc}", highlight=False)
        return 1
    finally:
        stop.set()
        _stop_children()
        server.stop()
        if args.keep or failed:
            console.print(f"data directory and logs kept in {base}", highlight=False)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
