"""Waiting on the outside world, end to end: signals (docs/signals.md) and schedules
(docs/schedules.md)."""

from __future__ import annotations

import datetime as dt
import time

import psycopg
from conftest import App, ThreadWorker


def wait_until(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def waiting(app: App, instance: str, count: int = 1) -> bool:
    row = app.conn.execute(
        "SELECT count(*) FROM df.nodes WHERE instance_id = %s AND node_type = 'SIGNAL'"
        " AND status = 'running'",
        (instance,),
    ).fetchone()
    return row == (count,)


def signal(app: App, instance: str, name: str, data: str | None = None) -> object:
    args = (instance, name) if data is None else (instance, name, data)
    params = ", ".join(["%s"] * len(args))
    row = app.conn.execute(f"SELECT df.signal({params})", args).fetchone()
    assert row is not None
    return row[0]


def test_signal_is_received_with_its_data(app: App, worker: ThreadWorker) -> None:
    instance = app.start("df.wait_for_signal('go') |=> 's' ~> 'SELECT $s.data::jsonb AS d'")
    wait_until(lambda: waiting(app, instance))
    assert signal(app, instance, "go", '{"who": "alice"}') == "OK"
    assert app.wait(instance) == "completed"
    assert app.result(instance) == {"rows": [{"d": {"who": "alice"}}], "row_count": 1}
    node = next(n for n in app.nodes(instance) if n["node_type"] == "SIGNAL")
    assert node["result"] == {"signal_name": "go", "timed_out": False, "data": {"who": "alice"}}


def test_non_json_data_arrives_as_a_json_string(app: App, worker: ThreadWorker) -> None:
    instance = app.start("df.wait_for_signal('go')")
    signal(app, instance, "go", "approve")
    assert app.wait(instance) == "completed"
    assert app.result(instance) == {"signal_name": "go", "timed_out": False, "data": "approve"}


def test_signal_sent_before_the_wait_starts_is_kept(app: App, worker: ThreadWorker) -> None:
    instance = app.start("df.sleep(1) ~> df.wait_for_signal('early')")
    assert signal(app, instance, "early", "1") == "OK"  # the wait has not started yet
    assert app.wait(instance) == "completed"
    assert app.result(instance) == {"signal_name": "early", "timed_out": False, "data": 1}


def test_wait_times_out(app: App, worker: ThreadWorker) -> None:
    began = time.monotonic()
    instance, status = app.run("df.wait_for_signal('never', 1)")
    assert status == "completed"
    assert time.monotonic() - began >= 1
    assert app.result(instance) == {"signal_name": "never", "timed_out": True, "data": None}


def test_each_signal_is_consumed_once_by_waits_in_join_branches(
    app: App, worker: ThreadWorker
) -> None:
    instance = app.start(
        "df.join3(df.wait_for_signal('x', 3), df.wait_for_signal('x', 3),"
        " df.wait_for_signal('x', 3))"
    )
    wait_until(lambda: waiting(app, instance, 3))
    signal(app, instance, "x", "1")
    signal(app, instance, "x", "2")
    assert app.wait(instance) == "completed"
    results = app.result(instance)
    assert isinstance(results, list)
    received = sorted(r["data"] for r in results if not r["timed_out"])
    assert received == [1, 2]
    assert sum(r["timed_out"] for r in results) == 1


def test_signal_reaches_a_wait_inside_a_loop(app: App, worker: ThreadWorker) -> None:
    instance = app.start(
        "@> (df.wait_for_signal('next') |=> 's'"
        " ~> ('SELECT ($s.data)::text = ''stop''' ?> df.break('stopped') !> 'SELECT 1'))"
    )
    for data in ("1", "2", "stop"):
        wait_until(lambda: waiting(app, instance))
        signal(app, instance, "next", data)
    assert app.wait(instance) == "completed"
    assert app.result(instance) == "stopped"


def test_a_flood_of_signals_to_one_instance(
    app: App, worker: ThreadWorker, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    instance = app.start("df.sleep(3) ~> df.wait_for_signal('f') ~> df.wait_for_signal('f')")
    for i in range(500):  # all buffered: the waits start after the sleep
        assert signal(app, instance, "f", str(i)) == "OK"
    assert app.wait(instance) == "completed"
    assert app.result(instance) == {"signal_name": "f", "timed_out": False, "data": 1}
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE consumed_at IS NOT NULL), count(*) FROM df._signals"
        " WHERE instance_id = %s",
        (instance,),
    ).fetchone()
    assert row == (2, 500)  # each consumed once, in the order sent; the rest never delivered


def test_signals_survive_a_worker_restart(app: App, dsn: str) -> None:
    w = ThreadWorker(dsn, concurrency=2)
    instance = app.start("df.wait_for_signal('go', 60)")
    wait_until(lambda: waiting(app, instance))
    w.stop()
    signal(app, instance, "go", '"while down"')
    w = ThreadWorker(dsn, concurrency=2)
    try:
        assert app.wait(instance) == "completed"
    finally:
        w.stop()
    assert app.result(instance) == {"signal_name": "go", "timed_out": False, "data": "while down"}


def test_signalling_finished_and_unknown_instances(app: App, worker: ThreadWorker) -> None:
    done, status = app.run("'SELECT 1'")
    assert status == "completed"
    try:
        signal(app, done, "go")
        raise AssertionError("signal to a finished instance was accepted")
    except psycopg.Error as exc:
        assert f"Instance {done} is completed" in str(exc)
    try:
        signal(app, "0badc0de", "go")
        raise AssertionError("signal to an unknown instance was accepted")
    except psycopg.Error as exc:
        assert "Instance not found or access denied: 0badc0de" in str(exc)


def test_approval_with_timeout_example(app: App, worker: ThreadWorker) -> None:
    """The human-in-the-loop example of docs/signals.md."""
    app.conn.execute("CREATE TABLE requests (id serial PRIMARY KEY, state text)")
    graph = (
        "'INSERT INTO requests (state) VALUES (''waiting'') RETURNING id' |=> 'req'"
        " ~> df.wait_for_signal('approval', {timeout}) |=> 'answer'"
        " ~> ('SELECT $answer.timed_out'"
        "     ?> 'UPDATE requests SET state = ''expired'' WHERE id = $req.id'"
        "     !> 'UPDATE requests SET state = ''approved'' WHERE id = $req.id')"
    )
    approved = app.start(graph.format(timeout=3600))
    wait_until(lambda: waiting(app, approved))
    signal(app, approved, "approval", '{"by": "alice"}')
    expired = app.start(graph.format(timeout=1))
    assert app.wait(approved) == "completed"
    assert app.wait(expired) == "completed"
    rows = app.conn.execute("SELECT state FROM requests ORDER BY id").fetchall()
    assert rows == [("approved",), ("expired",)]


def test_schedule_fires_at_the_next_tick_across_a_worker_restart(app: App, dsn: str) -> None:
    app.conn.execute("CREATE TABLE ticks (at timestamptz)")
    w = ThreadWorker(dsn, concurrency=2)
    instance = app.start(
        "df.wait_for_schedule('* * * * *') ~> 'INSERT INTO ticks VALUES (clock_timestamp())'"
    )
    wait_until(
        lambda: (
            app.conn.execute(
                "SELECT count(*) FROM df.nodes WHERE instance_id = %s"
                " AND node_type = 'WAIT_SCHEDULE' AND status = 'running'",
                (instance,),
            ).fetchone()
            == (1,)
        )
    )
    started = app.conn.execute(
        "SELECT updated_at FROM df.nodes WHERE instance_id = %s AND node_type = 'WAIT_SCHEDULE'",
        (instance,),
    ).fetchone()
    assert started is not None
    w.stop()  # nobody runs while the wait is pending
    time.sleep(1)
    w = ThreadWorker(dsn, concurrency=2)
    try:
        assert app.wait(instance, 75) == "completed"
    finally:
        w.stop()
    row = app.conn.execute("SELECT at FROM ticks").fetchone()
    assert row is not None
    fired: dt.datetime = row[0]  # type: ignore[assignment]
    began: dt.datetime = started[0]  # type: ignore[assignment]
    # On the next minute boundary after the wait began: not early, and not a poll late.
    assert began < fired <= began + dt.timedelta(seconds=63)
    assert fired.second < 3


def test_a_signal_wait_survives_an_immediate_postgres_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pgdurable import schema
    from pgdurable.embedded import EmbeddedPostgres, free_port

    pg = EmbeddedPostgres(tmp_path / "data", free_port(), settings={"fsync": "off"})
    pg.start()
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            schema.install(admin)
            admin.execute("CREATE ROLE waiter LOGIN")
            admin.execute("SELECT df.grant_usage('waiter')")
            admin.execute("GRANT CREATE ON SCHEMA public TO waiter")
        w = ThreadWorker(pg.dsn(), concurrency=2)
        try:
            with psycopg.connect(pg.dsn(user="waiter"), autocommit=True) as c:
                c.execute("CREATE TABLE got (data jsonb)")
                row = c.execute(
                    "SELECT df.start(df.wait_for_signal('go', 120) |=> 's'"
                    " ~> 'INSERT INTO got VALUES ($s.data::jsonb)')"
                ).fetchone()
                assert row is not None
                instance = str(row[0])
                wait_until(
                    lambda: (
                        c.execute(
                            "SELECT count(*) FROM df.nodes WHERE instance_id = %s"
                            " AND node_type = 'SIGNAL' AND status = 'running'",
                            (instance,),
                        ).fetchone()
                        == (1,)
                    )
                )
            pg.stop("immediate")
            pg.start()
            with psycopg.connect(pg.dsn(user="waiter"), autocommit=True) as c:
                c.execute("SELECT df.signal(%s, 'go', '{\"after\": \"restart\"}')", (instance,))
                done = c.execute("SELECT df.await_instance(%s, 60)", (instance,)).fetchone()
                assert done == ("completed",)
                assert c.execute("SELECT data FROM got").fetchall() == [({"after": "restart"},)]
        finally:
            w.stop()
    finally:
        pg.stop("immediate")
