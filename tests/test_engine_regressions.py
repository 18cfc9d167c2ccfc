"""Regression tests for engine bugs: each failed before its fix."""

from __future__ import annotations

import time

import psycopg
import pytest
from conftest import App, Role, RoleFactory, ThreadWorker
from test_cli_monitor import _write_graph
from test_interpreter import G

from pgdurable.core import interpreter as interp

# -- a RACE decided while it forks ---------------------------------------------------------------


def test_a_race_decided_while_forking_queues_no_work_for_the_loser() -> None:
    g = G()
    insert = g.sql("INSERT INTO t VALUES (1)")
    race = g.race(insert, g.brk())
    root = g.then(g.loop(race), g.sql("SELECT 2"))
    t = interp.start(g.graph(root), {}, 1000)
    dropped = set(t.dropped)
    live = {int(k) for k in t.state["acts"]}
    emitted = [(task.activation, task.node_id) for task in t.tasks]
    # every emitted task should belong to a live activation
    assert all(a in live for a, _ in emitted), f"task for a dead activation: {emitted} {dropped}"


def test_the_loser_of_a_race_decided_while_forking_never_runs(
    app: App, worker: ThreadWorker
) -> None:
    app.conn.execute("CREATE TABLE app.t (x int)")
    _instance, status = app.run(
        "df.loop(df.race('INSERT INTO app.t VALUES (1)', df.break('\"b\"'))) ~> 'SELECT 2 AS two'"
    )
    assert status == "completed"
    time.sleep(1.0)  # give the leftover task time to run
    n = app.conn.execute("SELECT count(*) FROM app.t").fetchone()
    assert n == (0,), "the loser of a decided RACE ran its statement"


# -- roles whose default isolation is REPEATABLE READ ----------------------------------------------


def test_join_works_for_a_role_defaulting_to_repeatable_read(
    app: App, conn: psycopg.Connection, worker: ThreadWorker
) -> None:
    conn.execute(f"ALTER ROLE {app.role} SET default_transaction_isolation = 'repeatable read'")
    instance, status = app.run("df.join('SELECT pg_sleep(0.5) AS a', 'SELECT pg_sleep(0.5) AS b')")
    out = conn.execute("SELECT output FROM df._runs WHERE instance_id = %s", (instance,)).fetchone()
    assert status == "completed", out


def test_long_step_works_for_a_role_defaulting_to_repeatable_read(
    app: App, conn: psycopg.Connection, dsn: str
) -> None:
    conn.execute(f"ALTER ROLE {app.role} SET default_transaction_isolation = 'repeatable read'")
    w = ThreadWorker(dsn, concurrency=2, lease_seconds=1.5)  # heartbeat every 0.5 s
    try:
        instance, status = app.run("'SELECT pg_sleep(2) AS a'")
        out = conn.execute(
            "SELECT output FROM df._runs WHERE instance_id = %s", (instance,)
        ).fetchone()
        assert status == "completed", out
    finally:
        w.stop()


def test_a_dead_wait_never_takes_a_signal(
    app: App, conn: psycopg.Connection, worker: ThreadWorker
) -> None:
    instance = app.start(
        "df.loop(df.race(df.wait_for_signal('x'), df.break())) ~> df.wait_for_signal('x', 4)"
    )
    deadline = time.monotonic() + 10
    while conn.execute(
        "SELECT count(*) FROM df.nodes WHERE instance_id = %s AND node_type = 'SIGNAL'"
        " AND status = 'running'",
        (instance,),
    ).fetchone() != (2,):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    app.conn.execute("SELECT df.signal(%s, 'x', '42')", (instance,))
    assert app.wait(instance) == "completed"
    result = app.result(instance)
    assert result == {"signal_name": "x", "timed_out": False, "data": 42}


# -- a step that ends its own session -------------------------------------------------------------


def test_a_step_that_kills_its_own_session_fails(
    app: App, conn: psycopg.Connection, worker: ThreadWorker, caplog: pytest.LogCaptureFixture
) -> None:
    instance = app.start("'SELECT pg_terminate_backend(pg_backend_pid())'")
    try:
        status = app.wait(instance, 6)
    except psycopg.errors.RaiseException:
        status = "running"
    retries = [r for r in caplog.records if "interrupted" in r.getMessage()]
    assert status == "failed", "the step was retried instead of failed"
    assert 1 <= len(retries) <= 3


# -- a malformed graph inserted by hand ------------------------------------------------------------


def test_a_malformed_wait_config_fails_the_instance(
    app: App, conn: psycopg.Connection, dsn: str
) -> None:
    with app.conn.transaction():
        app.conn.execute(
            "INSERT INTO df.instances (id, root_node, submitted_by) VALUES"
            " ('0badbad0', '0000000a', %s)",
            (app.role,),
        )
        app.conn.execute(
            "INSERT INTO df.nodes (id, instance_id, node_type, query, submitted_by) VALUES"
            " ('0000000a', '0badbad0', 'SIGNAL',"
            ' \'{"signal_name":"x","timeout_seconds":"abc"}\', %s)',
            (app.role,),
        )
    w = ThreadWorker(dsn, concurrency=2, lease_seconds=0.6)
    try:
        time.sleep(8)
    finally:
        w.stop()
    row = conn.execute(
        "SELECT i.status, t.attempts FROM df.instances i"
        " LEFT JOIN df._tasks t ON t.instance_id = i.id"
        " WHERE i.id = '0badbad0'"
    ).fetchone()
    assert row is not None and row[0] == "failed", row


def test_worker_fails_an_instance_whose_join_config_is_malformed(
    app: App, worker: ThreadWorker
) -> None:
    """graph_from_rows_of -> node_from_row raised TypeError (not GraphError) for a JOIN whose
    "extra_nodes" is a number; steps._start caught only GraphError/LookupError, so the start
    task was never turned into a failed instance."""
    _write_graph(
        app.conn,
        "0000000d",
        [
            ("000000d1", "JOIN", '{"extra_nodes": 5}', "000000d2", "000000d3"),
            ("000000d2", "SQL", "SELECT 1", None, None),
            ("000000d3", "SQL", "SELECT 2", None, None),
        ],
    )
    deadline = time.monotonic() + 15
    status = None
    while time.monotonic() < deadline:
        status = app.conn.execute("SELECT df.status('0000000d')").fetchone()[0]
        if status in ("failed", "completed"):
            break
        time.sleep(0.2)
    assert status == "failed", status


# -- cancels that arrive before the statement starts ----------------------------------------------


def cancel_leftover_sleeps(conn: psycopg.Connection) -> int:
    """Cancel step statements still sleeping (pg_sleep(20)); 1 if there were any, else 0."""
    row = conn.execute(
        "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity"
        " WHERE query LIKE 'SELECT pg_sleep(20)%%' AND state = 'active'"
    ).fetchone()
    return 1 if row and row[0] else 0


def test_race_loser_logging_in_is_not_left_running(
    app: App, conn: psycopg.Connection, dsn: str
) -> None:
    missed = 0
    for _ in range(6):
        w = ThreadWorker(dsn, concurrency=4)  # cold step pool: both branches must log in
        try:
            _instance, status = app.run("'SELECT pg_sleep(20) AS slow' | 'SELECT 1 AS fast'")
            assert status == "completed"
            time.sleep(0.5)
            missed += cancel_leftover_sleeps(conn)
        finally:
            w.stop()
    assert missed == 0


def test_cancel_while_the_step_logs_in_is_not_lost(
    app: App, conn: psycopg.Connection, dsn: str
) -> None:
    missed = 0
    for _ in range(5):
        w = ThreadWorker(dsn, concurrency=4)  # cold step pool: the step must log in first
        try:
            time.sleep(0.3)
            instance = app.start("'SELECT pg_sleep(20) AS slow'")
            deadline = time.monotonic() + 10
            while conn.execute(
                "SELECT status FROM df.nodes WHERE instance_id = %s", (instance,)
            ).fetchone() != ("running",):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            app.conn.execute("SELECT df.cancel(%s)", (instance,))
            time.sleep(0.5)
            missed += cancel_leftover_sleeps(conn)
        finally:
            w.stop()
    assert missed == 0


# -- a claim whose cost grew with the backlog ----------------------------------------------------


def _claim_buffers(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """Shared buffers a claim of 4 tasks reads (rolled back: the tasks stay due)."""
    conn.execute("BEGIN")
    try:
        plan = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM df._claim("
            "gen_random_uuid(), 4, 30, 4, '{}'::oid[], '{}'::int[], '{}'::text[])"
        ).fetchone()
    finally:
        conn.execute("ROLLBACK")
    assert plan is not None
    top = plan[0][0]["Plan"]  # type: ignore[index]
    assert top["Actual Rows"] == 4
    return int(top["Shared Hit Blocks"]) + int(top.get("Shared Read Blocks", 0))


def test_a_claim_reads_as_much_with_a_backlog_of_12000_as_of_3000(
    app: App, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    """df._waiting_roles read every due task (a hash semi-join), and the planner's guess
    of the tasks picked could turn the lease into hash joins over all tasks and instances.
    (From a backlog of 3,000, not of a few: a claim's index probes each read a page more
    once the indexes are a level deeper.)"""
    app.conn.execute("SELECT df.start('SELECT 1') FROM generate_series(1, 3000)")
    conn.execute("VACUUM ANALYZE df._tasks, df.instances")
    before = min(_claim_buffers(conn) for _ in range(3))
    app.conn.execute("SELECT df.start('SELECT 1') FROM generate_series(1, 9000)")
    conn.execute("VACUUM ANALYZE df._tasks, df.instances")
    after = min(_claim_buffers(conn) for _ in range(3))
    assert after - before <= 10, (before, after)


def test_a_start_wakes_the_workers_unless_its_roles_work_waits_already(
    conn: psycopg.Connection, dsn: str, make_role: RoleFactory
) -> None:
    """A NOTIFY serializes the commits that send one: a start leaves the workers be while a
    task of its role has been due for a while (they are all busy then)."""
    first, other = make_role(), make_role()

    def start(role: Role, graph: str) -> str:
        row = role.conn.execute(f"SELECT df.start({graph})").fetchone()
        assert row is not None
        return str(row[0])

    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgdurable_tasks")

        def woken() -> int:
            return len(list(listener.notifies(timeout=0.5, stop_after=1)))

        waiting = start(first, "'SELECT 1'")
        assert woken() == 1  # nothing else due: the workers may all be asleep
        start(first, "'SELECT 2'")
        assert woken() == 1  # the first start's task is due, but only just
        conn.execute(
            "UPDATE df._tasks SET visible_at = now() - interval '1 second' WHERE instance_id = %s",
            (waiting,),
        )
        start(first, "'SELECT 3'")
        assert woken() == 0  # its role's work waits: no worker is idle
        start(other, "'SELECT 4'")
        assert woken() == 1  # another role's is not held up by it
