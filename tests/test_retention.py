"""Retention of finished instances (migration 0014; docs/engine.md#storage-and-retention) and
the graph cache after a purge."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from click.testing import CliRunner
from conftest import App, ThreadWorker
from psycopg import sql as pgsql

from pgdurable.cli import main as cli_main
from pgdurable.core.model import Graph
from pgdurable.embedded import EmbeddedPostgres
from pgdurable.worker.loop import (
    RECONCILE_INTERVAL,
    Retention,
    read_reconcile_interval,
    read_retention,
)
from pgdurable.worker.queries import Task, graph_queries
from pgdurable.worker.statement import run_queries

Conn = psycopg.Connection[tuple[object, ...]]
TERMINAL = ("completed", "failed", "cancelled")


def purge(
    conn: Conn, days: int = 30, keep: int = 10_000, batch: int = 500, max_nodes: int = 50_000
) -> int | None:
    row = conn.execute(
        "SELECT df._purge_finished(%s, %s, %s, %s)", (days, keep, batch, max_nodes)
    ).fetchone()
    assert row is not None
    return None if row[0] is None else int(str(row[0]))


def age(conn: Conn, instance: str, days: float) -> None:
    """Pretend ``instance`` finished ``days`` ago."""
    conn.execute(
        "UPDATE df._runs SET finished_at = now() - make_interval(secs => %s)"
        " WHERE instance_id = %s AND finished_at IS NOT NULL",
        (days * 86400, instance),
    )


def exists(conn: Conn, instance: str) -> bool:
    row = conn.execute("SELECT count(*) FROM df.instances WHERE id = %s", (instance,)).fetchone()
    return row == (1,)


def rows_left(conn: Conn, instance: str) -> dict[str, int]:
    """Rows of ``instance`` in every table of schema df that names an instance: found from the
    catalog, so a table added later (e.g. an execution history) is checked as well."""
    tables = conn.execute(
        "SELECT c.relname, a.attname FROM pg_class c"
        "  JOIN pg_namespace n ON n.oid = c.relnamespace"
        "  JOIN pg_attribute a ON a.attrelid = c.oid"
        " WHERE n.nspname = 'df' AND c.relkind IN ('r', 'p')"
        "   AND (a.attname = 'instance_id' OR (c.relname = 'instances' AND a.attname = 'id'))"
        "   AND NOT a.attisdropped"
    ).fetchall()
    assert {"instances", "nodes", "_runs", "_tasks", "_signals"} <= {str(t) for t, _ in tables}
    counts = {}
    for table, column in tables:
        row = conn.execute(
            pgsql.SQL("SELECT count(*) FROM df.{} WHERE {} = %s").format(
                pgsql.Identifier(str(table)), pgsql.Identifier(str(column))
            ),
            (instance,),
        ).fetchone()
        assert row is not None
        counts[str(table)] = int(str(row[0]))
    return counts


def cancelled_instances(app: App, conn: Conn, n: int) -> list[str]:
    """``n`` instances cancelled one after the other (terminal without a worker)."""
    ids = []
    for i in range(n):
        instance = app.start("%s", (f"SELECT {i}",))
        app.conn.execute("SELECT df.cancel(%s)", (instance,))
        ids.append(instance)
    return ids


def wait_until(predicate: object, timeout: float = 15.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- what a purge removes ---------------------------------------------------------------------


def test_a_finished_instance_past_retention_goes_with_all_its_rows(
    app: App, worker: ThreadWorker, conn: Conn
) -> None:
    graph = "df.wait_for_signal('go') ~> ('SELECT 1 AS a' & 'SELECT 2 AS b') ~> 'SELECT 3'"
    old, recent = app.start(graph), app.start(graph)
    for instance in (old, recent):
        # 'later' is never waited for: it stays buffered in df._signals.
        app.conn.execute("SELECT df.signal(%s, 'later', '1')", (instance,))
        app.conn.execute("SELECT df.signal(%s, 'go', '{}')", (instance,))
        assert app.wait(instance) == "completed"
    before = rows_left(conn, old)
    assert before["nodes"] > 5 and before["_runs"] == 1 and before["_signals"] == 2
    age(conn, old, 31)
    age(conn, recent, 29)

    assert purge(conn, days=30) == 1
    assert set(rows_left(conn, old).values()) == {0}
    assert rows_left(conn, recent) == before  # the same shape, all still there
    assert app.result(recent) == {"rows": [{"?column?": 3}], "row_count": 1}
    row = conn.execute("SELECT purged, last_purge_at IS NOT NULL FROM df._retention").fetchone()
    assert row == (1, True)


def test_cancelled_and_failed_instances_are_finished_too(
    app: App, worker: ThreadWorker, conn: Conn
) -> None:
    done = app.run("'SELECT 1'")
    failed = app.run("'SELECT 1/0'")
    assert (done[1], failed[1]) == ("completed", "failed")
    [cancelled] = cancelled_instances(app, conn, 1)
    ids = [done[0], failed[0], cancelled]
    row = conn.execute(
        "SELECT count(finished_at) FROM df._runs WHERE instance_id = ANY(%s)", (ids,)
    ).fetchone()
    assert row == (3,)
    assert purge(conn, days=0) == 3
    assert not any(exists(conn, i) for i in ids)


def test_running_and_pending_instances_are_never_removed(app: App, dsn: str, conn: Conn) -> None:
    # A pending one: its start task is not due (as if every worker were busy).
    pending = app.start("'SELECT 1'")
    conn.execute("UPDATE df._tasks SET visible_at = 'infinity' WHERE instance_id = %s", (pending,))
    worker = ThreadWorker(dsn, concurrency=2)
    try:
        running = app.start("df.sleep(60) ~> 'SELECT 1'")
        wait_until(
            lambda: app.conn.execute("SELECT df.status(%s)", (running,)).fetchone() == ("running",)
        )
        _never_removed(app, conn, running, pending)
    finally:
        worker.stop()


def _never_removed(app: App, conn: Conn, running: str, pending: str) -> None:
    # Ancient by every clock, even with a (forged) finish time: still not finished.
    conn.execute(
        "UPDATE df.instances SET created_at = now() - interval '10 years',"
        " updated_at = now() - interval '10 years' WHERE id = ANY(%s)",
        ([running, pending],),
    )
    conn.execute(
        "UPDATE df._runs SET finished_at = now() - interval '10 years' WHERE instance_id = ANY(%s)",
        ([running, pending],),
    )
    assert purge(conn, days=0, keep=1) == 0
    for instance in (running, pending):
        assert rows_left(conn, instance)["nodes"] >= 1
    assert app.conn.execute("SELECT df.status(%s)", (pending,)).fetchone() == ("pending",)


def test_age_counts_from_the_finish_never_from_the_user_writable_updated_at(
    app: App, worker: ThreadWorker, conn: Conn
) -> None:
    a, b = app.run("'SELECT 1'")[0], app.run("'SELECT 1/0'")[0]
    # The owner may write updated_at (df.cancel needs the grant): into the past, or the future.
    app.conn.execute("UPDATE df.instances SET updated_at = '1970-01-01' WHERE id = %s", (a,))
    app.conn.execute("UPDATE df.instances SET updated_at = 'infinity' WHERE id = %s", (b,))
    # A failed instance that started long ago but failed just now is young.
    conn.execute(
        "UPDATE df.instances SET created_at = now() - interval '60 days' WHERE id = %s", (b,)
    )
    assert purge(conn, days=30) == 0
    age(conn, b, 31)
    assert purge(conn, days=30) == 1
    assert exists(conn, a) and not exists(conn, b)


def test_only_the_newest_finished_instances_are_kept(app: App, conn: Conn) -> None:
    ids = cancelled_instances(app, conn, 5)
    assert purge(conn, days=36500, keep=3) == 2  # the two that finished first
    assert [exists(conn, i) for i in ids] == [False, False, True, True, True]
    assert purge(conn, days=36500, keep=3) == 0
    # Ties in finish time are ranked by id, the largest newest.
    conn.execute(
        "UPDATE df._runs SET finished_at = '2020-01-01' WHERE instance_id = ANY(%s)", (ids,)
    )
    assert purge(conn, days=36500, keep=2) == 1
    survivors = sorted(i for i in ids[2:] if exists(conn, i))
    assert survivors == sorted(ids[2:])[1:]
    # keep 0: no count limit, only age.
    assert purge(conn, days=36500, keep=0) == 0


def test_batches_are_bounded_and_oldest_first(app: App, conn: Conn) -> None:
    ids = cancelled_instances(app, conn, 7)
    assert purge(conn, days=0, batch=3) == 3
    assert [exists(conn, i) for i in ids] == [False] * 3 + [True] * 4
    assert purge(conn, days=0, batch=3) == 3
    assert purge(conn, days=0, batch=3) == 1
    assert purge(conn, days=0, batch=3) == 0
    with pytest.raises(psycopg.errors.RaiseException, match="batch size"):
        purge(conn, batch=0)


def test_batches_are_bounded_by_nodes_too(app: App, conn: Conn) -> None:
    """A batch takes instances while their nodes fit, and always at least one."""
    ids = []
    for _ in range(4):  # 5 nodes each: THEN(THEN(a, b), c)
        instance = app.start("'SELECT 1' ~> 'SELECT 2' ~> 'SELECT 3'")
        app.conn.execute("SELECT df.cancel(%s)", (instance,))
        ids.append(instance)
    assert purge(conn, days=0, max_nodes=12) == 2
    assert purge(conn, days=0, max_nodes=3) == 1  # more than the budget: alone
    assert purge(conn, days=0, max_nodes=3) == 1
    assert not any(exists(conn, i) for i in ids)


def test_removing_a_large_graph_uses_the_child_indexes(app: App, conn: Conn) -> None:
    """Each deleted node is checked against the deferred child foreign keys at commit; without
    an index on them that read every node of the instance per node (seconds for 10,000; the
    timing is bench/storage.py's business)."""

    def balanced(n: int) -> str:
        return "'SELECT 1'" if n == 1 else f"({balanced(n // 2)} ~> {balanced(n - n // 2)})"

    instance = app.start(balanced(5000))
    app.conn.execute("SELECT df.cancel(%s)", (instance,))
    assert rows_left(conn, instance)["nodes"] == 9999
    conn.execute("ANALYZE df.nodes")  # as autovacuum would have by then
    plan = conn.execute(
        "EXPLAIN SELECT 1 FROM df.nodes WHERE instance_id = %s AND left_node = 'abcdef01'",
        (instance,),
    ).fetchall()
    assert "nodes_left_idx" in " ".join(str(row[0]) for row in plan), plan
    assert purge(conn, days=0) == 1
    assert rows_left(conn, instance)["nodes"] == 0


# -- purges never get in the way --------------------------------------------------------------


def test_a_held_instance_is_skipped_not_waited_for(app: App, conn: Conn, dsn: str) -> None:
    first, second = cancelled_instances(app, conn, 2)
    with psycopg.connect(dsn) as holder:
        # What a late checkpoint (or df.signal) would hold.
        holder.execute("SELECT 1 FROM df.instances WHERE id = %s FOR NO KEY UPDATE", (first,))
        started = time.monotonic()
        assert purge(conn, days=0) == 1
        assert time.monotonic() - started < 2
        assert exists(conn, first) and not exists(conn, second)
    assert purge(conn, days=0) == 1
    assert not exists(conn, first)


def test_a_tenant_holding_its_oldest_finished_rows_stops_retention_for_everyone(
    app: App, conn: Conn, dsn: str
) -> None:
    """A non-superuser may lock its own instance rows (it holds UPDATE (status, updated_at)),
    e.g. SELECT ... FOR KEY SHARE in a transaction left open. When the whole head of the
    oldest-first batch is held, df._purge_finished removes 0 and the worker's pass stops
    (`if not count: break`), although later instances are past retention too."""
    held = cancelled_instances(app, conn, 2)
    others = cancelled_instances(app, conn, 3)
    with psycopg.connect(app.dsn) as tenant:  # not autocommit: the transaction stays open
        locked = tenant.execute(
            "SELECT id FROM df.instances WHERE id = ANY(%s) FOR KEY SHARE", (held,)
        ).fetchall()
        assert len(locked) == 2
        # batch 2 stands for the worker's 500 (or for 5 instances of 10,000 nodes, the node cap)
        removed = purge(conn, days=0, keep=0, batch=2)
        # Observed: 0 -> the worker ends its pass, every pass, for as long as the tenant wants.
        assert removed == 2, f"purge removed {removed}; the 3 unheld finished instances stay"
        assert not any(exists(conn, i) for i in others[:2])


def test_only_one_session_purges_at_a_time(app: App, conn: Conn, dsn: str) -> None:
    ids = cancelled_instances(app, conn, 4)
    with psycopg.connect(dsn) as first:
        assert purge(first, days=0, batch=2) == 2  # its transaction is still open
        started = time.monotonic()
        assert purge(conn, days=0) is None  # busy: returns at once, removes nothing
        assert time.monotonic() - started < 2
        first.commit()
    assert purge(conn, days=0) == 2
    assert not any(exists(conn, i) for i in ids)


def test_a_purge_does_not_block_or_break_a_running_instance(
    app: App, worker: ThreadWorker, conn: Conn
) -> None:
    old = cancelled_instances(app, conn, 60)
    for instance in old:
        age(conn, instance, 2)
    steps = " ~> ".join(["'SELECT pg_sleep(0.2)'"] * 8) + " ~> ('SELECT 1 AS x' |=> 'x')"
    running = app.start(steps + " ~> 'SELECT $x.x AS y'")
    longest, removed = 0.0, 0
    while app.conn.execute("SELECT df.status(%s)", (running,)).fetchone() != ("completed",):
        started = time.monotonic()
        # Retention 1 day: the old ones go, the running one (finished, if at all, just now) not.
        removed += purge(conn, days=1, batch=5) or 0
        longest = max(longest, time.monotonic() - started)
        time.sleep(0.02)
    assert removed == len(old)
    assert longest < 1.0
    assert app.result(running) == {"rows": [{"y": 1}], "row_count": 1}
    nodes = app.nodes(running)
    assert {n["status"] for n in nodes} == {"completed"}


# -- the worker's schedule and settings -------------------------------------------------------


def _read(dsn: str) -> tuple[Retention, float]:
    async def read() -> tuple[Retention, float]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            return await read_retention(c), await read_reconcile_interval(c)

    return asyncio.run(read())


def test_settings_default_to_30_days_10000_instances_and_5_minutes(dsn: str) -> None:
    assert _read(dsn) == (Retention(days=30, max_instances=10_000), 300.0)
    assert RECONCILE_INTERVAL == 300.0


def test_settings_are_read_from_the_server(
    cluster: EmbeddedPostgres, dbname: str, conn: Conn
) -> None:
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.retention_days = 7")
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.retention_max_instances = 0")
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.reconcile_interval = '10min'")
    assert _read(cluster.dsn(dbname)) == (Retention(days=7, max_instances=0), 600.0)
    # Out of range or not a number: the default, with a warning.
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.retention_days = -1")
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.retention_max_instances = 'many'")
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.reconcile_interval = '2 days'")
    assert _read(cluster.dsn(dbname)) == (Retention(), 300.0)


@pytest.fixture
def keep_nothing(dbname: str, conn: Conn) -> Iterator[None]:
    """pg_durable.retention_days = 0 for the worker's new sessions."""
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.retention_days = 0")
    yield


def test_retention_days_0_removes_at_the_next_pass(
    app: App, dsn: str, conn: Conn, keep_nothing: None
) -> None:
    w = ThreadWorker(dsn, concurrency=2, reconcile_interval=0.3)
    try:
        instance, status = app.run("'SELECT 1'")
        assert status == "completed"
        wait_until(lambda: not exists(conn, instance), timeout=10)
    finally:
        w.stop()
    assert set(rows_left(conn, instance).values()) == {0}


def test_the_interval_setting_schedules_passes_and_0_disables_them(
    cluster: EmbeddedPostgres, dbname: str, app: App, conn: Conn, keep_nothing: None
) -> None:
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.reconcile_interval = 0")
    w = ThreadWorker(cluster.dsn(dbname), concurrency=2)
    try:
        kept, _ = app.run("'SELECT 1'")
        time.sleep(1.5)
        assert exists(conn, kept)
    finally:
        w.stop()
    w = ThreadWorker(cluster.dsn(dbname), concurrency=2, reconcile_interval=0)
    try:
        time.sleep(1.0)
        assert exists(conn, kept)
    finally:
        w.stop()
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.reconcile_interval = 1")
    w = ThreadWorker(cluster.dsn(dbname), concurrency=2)
    try:
        wait_until(lambda: not exists(conn, kept), timeout=10)
    finally:
        w.stop()


def test_two_workers_purge_in_turn_without_errors(
    app: App, dsn: str, conn: Conn, keep_nothing: None, caplog: pytest.LogCaptureFixture
) -> None:
    ids = cancelled_instances(app, conn, 30)
    workers = [ThreadWorker(dsn, concurrency=1, reconcile_interval=0.05, purge_batch_size=2)]
    workers.append(ThreadWorker(dsn, concurrency=1, reconcile_interval=0.05, purge_batch_size=2))
    try:
        wait_until(lambda: not any(exists(conn, i) for i in ids), timeout=20)
    finally:
        for w in workers:
            w.stop()
    assert "purging finished instances failed" not in caplog.text
    row = conn.execute("SELECT purged FROM df._retention").fetchone()
    assert row == (30,)


def test_worker_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pgdurable import cli

    seen: list[object] = []
    monkeypatch.setattr(cli, "_run_worker", lambda config: seen.append(config))
    runner = CliRunner()
    result = runner.invoke(
        cli_main,
        ["worker", "--dsn", "postgresql://x@127.0.0.1/x", "--reconcile-interval", "0"],
        env={"PGDURABLE_PURGE_BATCH_SIZE": "50"},
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli_main, ["worker", "--dsn", "postgresql://x@127.0.0.1/x"])
    assert result.exit_code == 0, result.output
    first, second = seen
    assert (first.reconcile_interval, first.purge_batch_size) == (0.0, 50)  # type: ignore[attr-defined]
    assert (second.reconcile_interval, second.purge_batch_size) == (None, 500)  # type: ignore[attr-defined]


# -- the graph cache --------------------------------------------------------------------------


@pytest.fixture
def fixed_id(conn: Conn) -> Iterator[str]:
    """Every df.start in this database picks the same instance id (once it is free again)."""
    conn.execute("ALTER FUNCTION df._random_id() RENAME TO _random_id_real")
    conn.execute(
        "CREATE FUNCTION df._random_id() RETURNS text LANGUAGE sql AS $$ SELECT 'deadbeef' $$"
    )
    yield "deadbeef"


def test_a_purged_instance_is_never_served_from_the_graph_cache(
    app: App, dsn: str, conn: Conn, fixed_id: str
) -> None:
    worker = ThreadWorker(dsn, concurrency=2)
    try:
        first, status = app.run("'SELECT 1 AS first'")
    finally:
        worker.stop()
    assert (first, status) == (fixed_id, "completed")
    runner = worker.worker._runner
    assert runner is not None
    assert any(key[0] == first for key in runner._graphs)  # the worker cached its graph
    assert purge(conn, days=0) == 1

    # The same id again, with another graph. No worker runs: what the cache answers for a task
    # of the new instance is all that counts.
    second = app.start("'SELECT 2 AS second' ~> 'SELECT 3 AS third'")
    assert second == first
    created = conn.execute(
        "SELECT created_at FROM df.instances WHERE id = %s", (second,)
    ).fetchone()
    assert created is not None
    task = Task(
        id=0, token=uuid.uuid4(), kind="sql", activation=1, node_id=None, payload=None,
        attempts=1, instance_id=second, role=app.role, role_oid=0, database=None, label=None,
        created_at=created[0],  # type: ignore[arg-type]
    )  # fmt: skip

    assert runner._cached_graph(task) is None  # not the purged instance's

    async def lookup() -> Graph:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as own:
            facts, nodes = await run_queries(own, graph_queries(second))
        return runner._loaded_graph(task, facts, nodes)

    graph = asyncio.run(lookup())
    queries = sorted(str(n.query) for n in graph.nodes.values() if n.query)
    assert queries == ["SELECT 2 AS second", "SELECT 3 AS third"]

    # And run end to end, it is the new graph that runs.
    worker = ThreadWorker(dsn, concurrency=2)
    try:
        assert app.wait(second) == "completed"
    finally:
        worker.stop()
    assert app.result(second) == {"rows": [{"third": 3}], "row_count": 1}


# -- storage settings -----------------------------------------------------------------------------


def test_hot_tables_carry_their_autovacuum_parameters(conn: Conn) -> None:
    options = {
        str(name): list(opts)  # type: ignore[call-overload]
        for name, opts in conn.execute(
            "SELECT c.oid::regclass::text, c.reloptions FROM pg_class c"
            " WHERE c.oid IN ('df._tasks'::regclass, 'df._runs'::regclass, 'df.nodes'::regclass)"
        ).fetchall()
    }
    assert "autovacuum_vacuum_scale_factor=0" in options["df._tasks"]
    assert "autovacuum_vacuum_scale_factor=0.05" in options["df._runs"]
    assert "autovacuum_vacuum_scale_factor=0.05" in options["df.nodes"]


def test_finish_time_is_not_readable_or_writable_by_users(app: App, conn: Conn) -> None:
    [instance] = cancelled_instances(app, conn, 1)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.conn.execute(
            "UPDATE df._runs SET finished_at = NULL WHERE instance_id = %s", (instance,)
        )
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.conn.execute("SELECT df._purge_finished(0, 0, 10, 100)")
    assert exists(conn, instance)
