"""pgdurable storage benchmark: bytes per instance and per step, and tables under steady load.

Run ``.venv/bin/python bench/storage.py [--quick] [--out bench/results/storage.json]``.

It starts its own embedded PostgreSQL 18 and measures two things (docs/engine.md, "Storage
and retention", has the figures):

1. **Bytes per instance.** For each workflow shape (one SQL step; ten in sequence; a JOIN of
   ten; a LOOP of 100 iterations), N instances run to completion in a database of their own.
   The growth of each engine table (heap, indexes, TOAST) is divided by N: after a VACUUM FULL
   (what each finished instance costs while retention keeps it: its rows and index entries,
   packed), and after a plain VACUUM (also the free space the run's updates left behind, which
   later instances reuse). The stored size of the rows themselves (``pg_column_size``) is
   shown next to it. Then the instances are purged (``df._purge_finished``), timed.
2. **Steady load.** Rounds of M ten-step instances run back to back while the worker purges
   every second and keeps the newest 3 M finished ones (``pg_durable.retention_max_instances``):
   the table sizes after each round should stay flat. Three times: with migration 0014's
   autovacuum parameters; with PostgreSQL's defaults; and with 0014's plus a fillfactor on
   df.nodes (80) and df._runs (50), which 0014 does not set. Each with its share of HOT
   updates.

The server runs with ``fsync = off`` (sizes do not depend on it; the run is faster) and
``autovacuum_naptime = 5s`` (PostgreSQL's default is 1 min: the steady-load rounds would have to
be minutes long to see autovacuum at all). Everything else is at PostgreSQL's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql
from rich.console import Console
from rich.table import Table

from pgdurable import __version__, schema
from pgdurable.embedded import EmbeddedPostgres, free_port
from pgdurable.worker.loop import Worker, WorkerConfig

ROLE = "bench"
TEMPLATE = "storage_template"
# The engine tables, and any other table of schema df that names an instance (e.g. the
# execution history of migration 12): filled in when the schema is installed.
TABLES = ["df.instances", "df.nodes", "df._runs", "df._tasks", "df._signals"]
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "autovacuum_naptime": "5s",
}
STEP = "INSERT INTO bench_effects (v) VALUES ({n})"
# One loop iteration: count this instance's iterations; the while condition stops it at 100.
LOOP_BODY = (
    "INSERT INTO loop_counter AS c (id, n) VALUES ('{sys_instance_id}', 1)"
    " ON CONFLICT (id) DO UPDATE SET n = c.n + 1 RETURNING n"
)
LOOP_WHILE = "SELECT n < {iterations} FROM loop_counter WHERE id = '{sys_instance_id}'"

console = Console(width=None if sys.stdout.isatty() else 140)


@dataclass(frozen=True)
class Shape:
    name: str
    steps: int  # SQL steps one instance runs
    description: str


SHAPES = [
    Shape("sql1", 1, "one SQL step"),
    Shape("seq10", 10, "10 SQL steps in sequence"),
    Shape("join10", 10, "JOIN of 10 SQL steps"),
    Shape("loop100", 200, "LOOP of 100 iterations (body + while condition)"),
]


@dataclass(frozen=True)
class Mode:
    instances: int  # per shape, for the bytes per instance
    loop_instances: int  # loops take >= 100 s each (1 s minimum per iteration): run few
    loop_iterations: int
    rounds: int  # steady load
    round_instances: int  # per round; the newest 3 rounds' worth are kept


MODES = {
    "full": Mode(500, 20, 100, 10, 300),
    "quick": Mode(100, 5, 100, 4, 100),
}


# -- plumbing --------------------------------------------------------------------------------


class ThreadWorker:
    """A pgdurable worker in a thread of this process."""

    def __init__(self, dsn: str, **options: Any) -> None:
        self.worker = Worker(WorkerConfig(dsn=dsn, **options))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.worker.run(),), daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.worker.request_stop)
        self.thread.join(timeout=60)


def connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(dsn, autocommit=True)


def build_graph(dsn: str, shape: Shape, mode: Mode) -> str:
    """The workflow's text, built with the DSL (as the submitting role)."""
    if shape.name == "loop100":
        expr: pgsql.Composable = pgsql.SQL("df.loop({}, {})").format(
            pgsql.Literal(LOOP_BODY),
            pgsql.Literal(LOOP_WHILE.replace("{iterations}", str(mode.loop_iterations))),
        )
    else:
        steps = [pgsql.Literal(STEP.format(n=i + 1)) for i in range(shape.steps)]
        operator = " & " if shape.name.startswith("join") else " ~> "
        expr = pgsql.SQL(operator).join(steps)
    with connect(dsn) as conn:
        row = conn.execute(pgsql.SQL("SELECT ({})::text").format(expr)).fetchone()
    assert row is not None
    return str(row[0])


def submit(dsn: str, graph: str, count: int) -> None:
    with connect(dsn) as conn:
        for start in range(0, count, 25):
            n = min(25, count - start)
            conn.execute("SELECT df.start(%s) FROM generate_series(1, %s)", (graph, n))


def wait_for(conn: psycopg.Connection[tuple[Any, ...]], query: str, timeout: float) -> None:
    """Until ``query`` returns true."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(query).fetchone()
        if row and row[0]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for: {query}")
        time.sleep(0.2)


ALL_DONE = "SELECT NOT EXISTS (SELECT 1 FROM df.instances WHERE status IN ('pending', 'running'))"
ALL_PURGED = "SELECT NOT EXISTS (SELECT 1 FROM df.instances)"


def sizes(conn: psycopg.Connection[tuple[Any, ...]]) -> dict[str, dict[str, int]]:
    """Heap, indexes and TOAST (with its index) of each engine table, in bytes."""
    out = {}
    for table in TABLES:
        row = conn.execute(
            "SELECT pg_relation_size(c.oid), pg_indexes_size(c.oid),"
            " coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0)"
            " FROM pg_class c WHERE c.oid = %s::regclass",
            (table,),
        ).fetchone()
        assert row is not None
        out[table] = {"heap": int(row[0]), "indexes": int(row[1]), "toast": int(row[2])}
    return out


def row_bytes(conn: psycopg.Connection[tuple[Any, ...]]) -> dict[str, int]:
    """The stored size of every live row of each engine table (pg_column_size), in bytes."""
    out = {}
    for table in TABLES:
        row = conn.execute(
            pgsql.SQL("SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM {} t").format(
                pgsql.SQL(table)
            )
        ).fetchone()
        assert row is not None
        out[table] = int(row[0])
    return out


def update_stats(conn: psycopg.Connection[tuple[Any, ...]]) -> dict[str, dict[str, int]]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    out = {}
    for table in TABLES:
        row = conn.execute(
            "SELECT n_tup_upd, n_tup_hot_upd, n_dead_tup, autovacuum_count"
            " FROM pg_stat_user_tables WHERE relid = %s::regclass",
            (table,),
        ).fetchone()
        assert row is not None
        out[table] = dict(
            zip(("updates", "hot_updates", "dead", "autovacuums"), map(int, row), strict=True)
        )
    return out


class Cluster:
    """The embedded server, with a template database holding the schema and the role."""

    def __init__(self, base: Path):
        self.pg = EmbeddedPostgres(base / "data", free_port(), settings=SERVER_SETTINGS)

    def start(self) -> None:
        self.pg.start()
        with connect(self.pg.dsn()) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
            conn.execute(f"CREATE ROLE {ROLE} LOGIN")
        with connect(self.pg.dsn(TEMPLATE)) as conn:
            schema.install(conn)
            conn.execute("SELECT df.grant_usage(%s)", (ROLE,))
            conn.execute(
                "CREATE TABLE bench_effects (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " v integer NOT NULL)"
            )
            conn.execute("CREATE TABLE loop_counter (id text PRIMARY KEY, n integer NOT NULL)")
            conn.execute(f"GRANT SELECT, INSERT, UPDATE ON bench_effects, loop_counter TO {ROLE}")
            others = conn.execute(
                "SELECT 'df.' || quote_ident(c.relname) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'instance_id'"
                " WHERE n.nspname = 'df' AND c.relkind = 'r' ORDER BY c.relname"
            ).fetchall()
            TABLES.extend(str(t) for (t,) in others if t not in TABLES)

    def database(self, name: str) -> str:
        with connect(self.pg.dsn()) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return name

    def stop(self) -> None:
        self.pg.stop("fast")


# -- 1. bytes per instance -------------------------------------------------------------------


def measure_shape(cluster: Cluster, shape: Shape, mode: Mode) -> dict[str, Any]:
    name = cluster.database(f"shape_{shape.name}")
    admin, user = cluster.pg.dsn(name), cluster.pg.dsn(name, ROLE)
    count = mode.loop_instances if shape.name == "loop100" else mode.instances
    steps = 2 * mode.loop_iterations if shape.name == "loop100" else shape.steps
    graph = build_graph(user, shape, mode)
    with connect(admin) as conn:
        conn.execute(f"VACUUM FULL {', '.join(TABLES)}")
        empty = sizes(conn)
        worker = ThreadWorker(admin, concurrency=10, reconcile_interval=0)
        try:
            began = time.monotonic()
            submit(user, graph, count)
            wait_for(conn, ALL_DONE, timeout=600 + 2 * mode.loop_iterations)
            seconds = time.monotonic() - began
        finally:
            worker.stop()
        failed = conn.execute("SELECT count(*) FROM df.instances WHERE status <> 'completed'")
        assert failed.fetchone() == (0,), "some instances did not complete"
        conn.execute(f"VACUUM {', '.join(TABLES)}")
        vacuumed = sizes(conn)
        conn.execute(f"VACUUM FULL {', '.join(TABLES)}")
        full = sizes(conn)
        rows = row_bytes(conn)
        began = time.monotonic()
        purged = 0
        while (n := conn.execute("SELECT df._purge_finished(0, 0, 500)").fetchone()[0]) > 0:  # type: ignore[index]
            purged += n
        purge_seconds = time.monotonic() - began
        assert purged == count
    per_table = {}
    for table in TABLES:
        grown = {
            k: (full[table][k] - empty[table][k]) / count for k in ("heap", "indexes", "toast")
        }
        grown["rows"] = rows[table] / count
        grown["after_vacuum"] = (sum(vacuumed[table].values()) - sum(empty[table].values())) / count
        per_table[table] = grown
    total = sum(v["heap"] + v["indexes"] + v["toast"] for v in per_table.values())
    after_vacuum = sum(v["after_vacuum"] for v in per_table.values())
    return {
        "shape": shape.name,
        "description": shape.description,
        "instances": count,
        "steps_per_instance": steps,
        "run_seconds": round(seconds, 1),
        "bytes_per_instance": round(total),
        "bytes_per_step": round(total / steps),
        "bytes_per_instance_after_vacuum": round(after_vacuum),
        "row_bytes_per_instance": round(sum(v["rows"] for v in per_table.values())),
        "tables": {t: {k: round(v) for k, v in d.items()} for t, d in per_table.items()},
        "purged_per_second": round(count / purge_seconds) if purge_seconds else None,
    }


# -- 2. steady load --------------------------------------------------------------------------


STEADY = {
    "0014": "migration 0014's parameters",
    "defaults": "PostgreSQL's defaults",
    "fillfactor": "0014's + fillfactor 80 (df.nodes), 50 (df._runs)",
}


def steady_load(cluster: Cluster, mode: Mode, config: str) -> dict[str, Any]:
    name = cluster.database(f"steady_{config}")
    admin, user = cluster.pg.dsn(name), cluster.pg.dsn(name, ROLE)
    keep = 3 * mode.round_instances
    with connect(admin) as conn:
        if config == "defaults":
            for table in TABLES:
                options = conn.execute(
                    "SELECT coalesce(array_agg(split_part(o, '=', 1)), '{}')"
                    " FROM pg_class c, unnest(c.reloptions) o WHERE c.oid = %s::regclass",
                    (table,),
                ).fetchone()
                assert options is not None
                if options[0]:
                    conn.execute(
                        pgsql.SQL("ALTER TABLE {} RESET ({})").format(
                            pgsql.SQL(table), pgsql.SQL(", ").join(map(pgsql.SQL, options[0]))
                        )
                    )
        elif config == "fillfactor":
            conn.execute("ALTER TABLE df.nodes SET (fillfactor = 80)")
            conn.execute("ALTER TABLE df._runs SET (fillfactor = 50)")
        conn.execute(f"ALTER DATABASE {name} SET pg_durable.retention_days = 36500")
        conn.execute(f"ALTER DATABASE {name} SET pg_durable.retention_max_instances = {keep}")
    graph = build_graph(user, SHAPES[1], mode)
    rounds = []
    worker = ThreadWorker(admin, concurrency=10, reconcile_interval=1.0)
    try:
        with connect(admin) as conn:
            for number in range(1, mode.rounds + 1):
                submit(user, graph, mode.round_instances)
                wait_for(conn, ALL_DONE, timeout=600)
                rounds.append({"round": number, "sizes": sizes(conn)})
            wait_for(conn, f"SELECT count(*) <= {keep} FROM df.instances", timeout=120)
            time.sleep(12)  # two autovacuum naptimes
            settled = sizes(conn)
            stats = update_stats(conn)
    finally:
        worker.stop()
    return {"config": config, "keep": keep, "rounds": rounds, "settled": settled, "stats": stats}


# -- report ----------------------------------------------------------------------------------


def kib(n: float) -> str:
    return f"{n / 1024:,.1f}"


def print_report(report: dict[str, Any]) -> None:
    table = Table(title="Bytes per finished instance")
    for column in ["shape", "steps", "total B", "B/step", "row B", "VACUUM B", "purged/s"]:
        table.add_column(column, justify="right")
    for s in report["shapes"]:
        table.add_row(
            s["shape"],
            str(s["steps_per_instance"]),
            f"{s['bytes_per_instance']:,}",
            f"{s['bytes_per_step']:,}",
            f"{s['row_bytes_per_instance']:,}",
            f"{s['bytes_per_instance_after_vacuum']:,}",
            f"{s['purged_per_second']:,}",
        )
    console.print(table)
    console.print(
        "total B: heap + indexes + TOAST after VACUUM FULL; row B: pg_column_size of the live "
        "rows (no page, index or free-space overhead); VACUUM B: the total after a plain VACUUM "
        "instead (with the free space the run left); purged/s: instances df._purge_finished "
        "removes per second, in batches of 500"
    )
    parts = ("heap", "indexes", "toast")
    tables = [t for t in TABLES if any(s["tables"][t][k] for s in report["shapes"] for k in parts)]
    detail = Table(title="Per table: heap / indexes / TOAST bytes per finished instance")
    detail.add_column("shape", justify="right")
    for name in tables:
        detail.add_column(name, justify="right")
    for s in report["shapes"]:
        detail.add_row(
            s["shape"],
            *("{} / {} / {}".format(*(s["tables"][t][k] for k in parts)) for t in tables),
        )
    console.print(detail)
    for run in report["steady"]:
        t = Table(
            title=f"Steady load, {STEADY[run['config']]}, keeping {run['keep']} finished: "
            "KiB after each round (heap+indexes+TOAST)"
        )
        t.add_column("round", justify="right")
        for table_name in TABLES:
            t.add_column(table_name, justify="right")
        for r in [*run["rounds"], {"round": "settled", "sizes": run["settled"]}]:
            t.add_row(
                str(r["round"]),
                *(kib(sum(r["sizes"][n].values())) for n in TABLES),
            )
        hot = [
            f"{n}: {st['hot_updates']}/{st['updates']} updates HOT, {st['autovacuums']} autovacuums"
            for n, st in run["stats"].items()
            if st["updates"]
        ]
        console.print(t)
        console.print("; ".join(hot))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances and rounds")
    parser.add_argument("--out", default="bench/results/storage.json")
    parser.add_argument("--shapes", default=",".join(s.name for s in SHAPES))
    parser.add_argument("--no-steady", action="store_true", help="skip the steady-load part")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    shapes = [s for s in SHAPES if s.name in args.shapes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="pgdurable-storage-"))
    cluster = Cluster(base)
    report: dict[str, Any] = {
        "version": __version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "server_settings": SERVER_SETTINGS,
    }
    try:
        cluster.start()
        with connect(cluster.pg.dsn()) as conn:
            row = conn.execute("SELECT version()").fetchone()
            report["server"] = row[0] if row else "?"
        # The loops run for minutes (1 s per iteration at least): alongside the others.
        results: dict[str, dict[str, Any]] = {}
        loop = next((s for s in shapes if s.name == "loop100"), None)
        loop_thread = None
        if loop is not None:

            def run_loop() -> None:
                results[loop.name] = measure_shape(cluster, loop, mode)

            loop_thread = threading.Thread(target=run_loop)
            loop_thread.start()
        for shape in shapes:
            if shape is not loop:
                console.print(f"[dim]{shape.name}...[/dim]")
                results[shape.name] = measure_shape(cluster, shape, mode)
        if loop_thread is not None:
            console.print("[dim]waiting for the loops...[/dim]")
            loop_thread.join()
            if loop is not None and loop.name not in results:
                raise RuntimeError("the loop measurement failed")
        report["shapes"] = [results[s.name] for s in shapes]
        report["steady"] = []
        if not args.no_steady:
            for config in STEADY:
                console.print(f"[dim]steady load, {STEADY[config]}...[/dim]")
                report["steady"].append(steady_load(cluster, mode, config))
    finally:
        cluster.stop()
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    console.print(f"saved {out}")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
