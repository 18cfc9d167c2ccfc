"""End-to-end execution semantics (docs/reference.md#how-a-workflow-runs): real PostgreSQL,
a real worker, a non-superuser submitter. Each test states the workflow in SQL as a user
would write it.
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from conftest import App, ThreadWorker


def results_by_type(app: App, instance: str) -> dict[str, list[object]]:
    out: dict[str, list[object]] = {}
    for n in app.nodes(instance):
        out.setdefault(str(n["node_type"]), []).append(n["result"])
    return out


# -- SQL steps and typed results -----------------------------------------------------------------


def test_single_sql_step_result(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("'SELECT 42 AS answer, ''x'' AS s, 1.50::numeric AS n'")
    assert status == "completed"
    assert app.result(instance) == {
        "rows": [{"answer": 42, "s": "x", "n": "1.50"}],
        "row_count": 1,
    }
    assert app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone() == ("completed",)
    row = app.conn.execute(
        "SELECT completed_at IS NOT NULL, completed_at >= created_at FROM df.instances"
        " WHERE id = %s",
        (instance,),
    ).fetchone()
    assert row == (True, True)


def test_sequence_names_and_substitution_forms(app: App, worker: ThreadWorker) -> None:
    app.conn.execute("CREATE TABLE items (id int, name text)")
    app.conn.execute("SELECT df.setvar('greeting', 'hello')")
    instance, status = app.run(
        """'INSERT INTO items VALUES (1, ''o''''brien''), (2, NULL) RETURNING id, name' |=> 'ins'
        ~> 'SELECT $ins AS first_id, $ins.name AS name,
                   ''{greeting}'' AS greet, ''{sys_instance_id}'' AS me,
                   (SELECT count(*) FROM $ins.*) AS n' |=> 'out'
        ~> 'SELECT $out.name || ''!'' AS shout, $out.n AS n'"""
    )
    assert status == "completed", app.nodes(instance)
    assert app.result(instance) == {"rows": [{"shout": "o'brien!", "n": 2}], "row_count": 1}
    row = app.conn.execute(
        "SELECT result FROM df.nodes WHERE instance_id = %s AND result_name = 'out'",
        (instance,),
    ).fetchone()
    assert row is not None
    assert row[0]["rows"][0] == {
        "first_id": 1,
        "name": "o'brien",
        "greet": "hello",
        "me": instance,
        "n": 2,
    }


def test_variables_are_snapshotted_at_start(app: App, cluster, dbname) -> None:  # type: ignore[no-untyped-def]
    app.conn.execute("SELECT df.setvar('v', 'before')")
    instance = app.start("'SELECT ''{v}'' AS v'")
    app.conn.execute("SELECT df.setvar('v', 'after')")
    w = ThreadWorker(cluster.dsn(dbname), concurrency=2)
    try:
        assert app.wait(instance) == "completed"
    finally:
        w.stop()
    assert app.result(instance) == {"rows": [{"v": "before"}], "row_count": 1}


def test_failing_step_fails_instance_with_error_text(app: App, worker: ThreadWorker) -> None:
    app.conn.execute("CREATE TABLE touched (x int)")
    instance, status = app.run(
        "'INSERT INTO touched VALUES (1)' ~> 'SELECT * FROM no_such_table'"
        " ~> 'INSERT INTO touched VALUES (2)'"
    )
    assert status == "failed"
    assert app.result(instance) is None
    failed = [n for n in app.nodes(instance) if n["status"] == "failed"]
    assert {n["node_type"] for n in failed} == {"SQL", "THEN"}
    for n in failed:
        assert n["result"] == (
            'SQL execution failed: error returned from database: relation "no_such_table"'
            " does not exist"
        )
    assert app.conn.execute("SELECT array_agg(x) FROM touched").fetchone() == ([1],)
    out = app.conn.execute(
        "SELECT output FROM df.list_instances() WHERE instance_id = %s", (instance,)
    ).fetchone()
    assert out is not None and "no_such_table" in str(out[0])


def test_multiple_statements_in_one_step_are_rejected(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("'SELECT 1; SELECT 2'")
    assert status == "failed"
    (node,) = app.nodes(instance)
    assert "cannot insert multiple commands into a prepared statement" in str(node["result"])


def test_unsupported_column_type_fails_the_step(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("'SELECT interval ''1 day'' AS d'")
    assert status == "failed"
    (node,) = app.nodes(instance)
    assert str(node["result"]).startswith("Unsupported column type 'INTERVAL' for column 'd'.")


def test_statement_that_cannot_run_in_a_transaction(app: App, worker: ThreadWorker) -> None:
    app.conn.execute("CREATE TABLE big (x int)")
    instance = app.start(
        "'CREATE INDEX CONCURRENTLY big_x ON big (x)' ~> 'SELECT count(*) AS n FROM big'"
    )
    # Not df.await_instance: CREATE INDEX CONCURRENTLY waits for every open transaction,
    # and await_instance is one long statement.
    deadline = time.monotonic() + 30
    while (status := app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone()) not in (
        ("completed",),
        ("failed",),
    ):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status == ("completed",), app.nodes(instance)
    assert app.conn.execute("SELECT to_regclass('app.big_x') IS NOT NULL").fetchone() == (True,)


def test_unicode_and_quotes_everywhere(app: App, worker: ThreadWorker) -> None:
    text = "é 中文 🐘 'quote' \"dq\" back\\slash\nnewline"
    label = 'label ✓ "d" 中'  # {sys_label} is inserted raw: no single quote here
    instance = app.start(
        "df.as('SELECT ' || quote_literal(%s) || ' AS \"wéird \"\"col\"\"\"', 'u_name')"
        " ~> 'SELECT $u_name' ~> ('SELECT ''{sys_label}'' AS l, ' || quote_literal(%s) || ' AS v')",
        (text, text),
        label=label,
    )
    status = app.wait(instance)
    assert status == "completed", app.nodes(instance)
    result = app.result(instance)
    assert result == {"rows": [{"l": label, "v": text}], "row_count": 1}


def test_huge_result(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run(
        "'SELECT g AS n, repeat(''x'', 100) AS pad FROM generate_series(1, 50000) g'"
        " |=> 'big' ~> 'SELECT count(*) AS n FROM $big.*'",
        timeout=120,
    )
    assert status == "failed"  # more than 10,000 rows cannot be expanded
    assert any("exceeding the maximum of 10000" in str(n["result"]) for n in app.nodes(instance))
    instance, status = app.run(
        "'SELECT g AS n, repeat(''x'', 100) AS pad FROM generate_series(1, 50000) g'",
        timeout=120,
    )
    assert status == "completed"
    result = app.result(instance)
    assert isinstance(result, dict) and result["row_count"] == 50000


# -- IF ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "branch"),
    [
        ("SELECT true", "then"),
        ("SELECT false", "else"),
        ("SELECT 1 WHERE false", "else"),
        ("SELECT 0.00::numeric", "else"),
        ("SELECT ''yes''", "then"),
        ("SELECT NULL::int", "else"),
    ],
)
def test_if_truthiness(app: App, worker: ThreadWorker, condition: str, branch: str) -> None:
    instance, status = app.run(f"'{condition}' ?> 'SELECT ''then'' AS b' !> 'SELECT ''else'' AS b'")
    assert status == "completed"
    assert app.result(instance) == {"rows": [{"b": branch}], "row_count": 1}


def test_if_rows(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run(
        "'SELECT 1 WHERE false' |=> 'r' ~> df.if_rows('r', 'SELECT ''some'' AS x',"
        " 'SELECT ''none'' AS x')"
    )
    assert status == "completed"
    assert app.result(instance) == {"rows": [{"x": "none"}], "row_count": 1}


# -- JOIN and RACE -------------------------------------------------------------------------------


def test_join_results_in_branch_order_and_names_merge(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run(
        "(('SELECT pg_sleep(0.3), 1 AS a' |=> 'a') & ('SELECT 2 AS b' |=> 'b') & df.sleep(0))"
        " ~> 'SELECT $a.a + $b.b AS sum'"
    )
    assert status == "completed"
    assert app.result(instance) == {"rows": [{"sum": 3}], "row_count": 1}
    joins = results_by_type(app, instance)["JOIN"]
    outer = next(j for j in joins if isinstance(j, list) and isinstance(j[0], list))
    assert outer == [
        [
            {"rows": [{"pg_sleep": None, "a": 1}], "row_count": 1},
            {"rows": [{"b": 2}], "row_count": 1},
        ],
        {"slept": True, "seconds": 0},
    ]


def test_join3_failure_names_the_branch(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("df.join3('SELECT 1', 'SELECT 2', 'SELECT 1/0')")
    assert status == "failed"
    root = next(n for n in app.nodes(instance) if n["node_type"] == "JOIN")
    assert root["result"] == (
        "JOIN branch 3 failed: SQL execution failed: error returned from database: division by zero"
    )


def test_race_winner_result_and_loser_never_continues(app: App, worker: ThreadWorker) -> None:
    app.conn.execute("CREATE TABLE loser_ran (x int)")
    instance, status = app.run(
        "(df.sleep(2) ~> 'INSERT INTO loser_ran VALUES (1)') | 'SELECT ''fast'' AS w'"
    )
    assert status == "completed"
    assert app.result(instance) == {"rows": [{"w": "fast"}], "row_count": 1}
    time.sleep(2.5)
    assert app.conn.execute("SELECT count(*) FROM loser_ran").fetchone() == (0,)


def test_race_timeout_idiom(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("'SELECT pg_sleep(5)' | df.sleep(1)")
    assert status == "completed"
    assert app.result(instance) == {"slept": True, "seconds": 1}


# -- LOOP, BREAK, SLEEP --------------------------------------------------------------------------


def test_loop_with_break_value(app: App, worker: ThreadWorker) -> None:
    app.conn.execute("CREATE TABLE counter (n int)")
    app.conn.execute("INSERT INTO counter VALUES (0)")
    instance, status = app.run(
        "@> ('UPDATE counter SET n = n + 1 RETURNING n' |=> 'c'"
        " ~> ('SELECT $c.n >= 3' ?> df.break('{\"done\": true}') !> 'SELECT 1'))"
    )
    assert status == "completed"
    assert app.result(instance) == {"done": True}
    assert app.conn.execute("SELECT n FROM counter").fetchone() == (3,)
    row = app.conn.execute(
        "SELECT execution_count FROM df.list_instances() WHERE instance_id = %s", (instance,)
    ).fetchone()
    assert row == (3,)


def test_while_loop_and_nested_loop_in_join(app: App, worker: ThreadWorker) -> None:
    app.conn.execute("CREATE TABLE w (n int)")
    app.conn.execute("INSERT INTO w VALUES (0)")
    instance, status = app.run(
        "df.loop('UPDATE w SET n = n + 1 RETURNING n', 'SELECT n < 2 FROM w')"
        " & @> ('SELECT 1' ~> df.break('inner'))"
    )
    assert status == "completed"
    assert app.result(instance) == [{"rows": [{"n": 2}], "row_count": 1}, "inner"]


def test_break_outside_loop_fails(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("'SELECT 1' ~> df.break()")
    assert status == "failed"
    assert any(
        "df.break() was called outside of a loop" in str(n["result"]) for n in app.nodes(instance)
    )


def test_sleep_result_and_duration(app: App, worker: ThreadWorker) -> None:
    began = time.monotonic()
    instance, status = app.run("df.sleep(2)")
    assert status == "completed"
    assert time.monotonic() - began >= 2
    row = app.conn.execute("SELECT df.result(%s)", (instance,)).fetchone()
    assert row == ('{"slept": true, "seconds": 2}',)


# -- lifecycle ------------------------------------------------------------------------------------


def test_rollback_of_start_leaves_nothing_and_nothing_runs(app: App, worker: ThreadWorker) -> None:
    app.conn.execute("CREATE TABLE ran (x int)")
    with psycopg.connect(app.dsn) as c:
        row = c.execute("SELECT df.start('INSERT INTO ran VALUES (1)')").fetchone()
        assert row is not None
        c.rollback()
    time.sleep(1)
    assert app.conn.execute("SELECT count(*) FROM df.instances").fetchone() == (0,)
    assert app.conn.execute("SELECT count(*) FROM ran").fetchone() == (0,)


def test_cancel_stops_a_running_instance(app: App, worker: ThreadWorker) -> None:
    app.conn.execute("CREATE TABLE after_cancel (x int)")
    instance = app.start("df.sleep(2) ~> 'INSERT INTO after_cancel VALUES (1)'")
    deadline = time.monotonic() + 10
    while app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone() != ("running",):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    row = app.conn.execute("SELECT df.cancel(%s)", (instance,)).fetchone()
    assert row == (f"Instance {instance} cancelled: Cancelled by user",)
    time.sleep(3)
    assert app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone() == ("cancelled",)
    assert app.conn.execute("SELECT count(*) FROM after_cancel").fetchone() == (0,)
    assert app.conn.execute("SELECT df.result(%s)", (instance,)).fetchone() == (None,)


def test_many_instances_complete(app: App, worker: ThreadWorker) -> None:
    app.conn.execute("CREATE TABLE many (i int)")
    ids = [app.start(f"'INSERT INTO many VALUES ({i})' ~> 'SELECT {i} AS i'") for i in range(50)]
    for instance in ids:
        assert app.wait(instance) == "completed"
    assert app.conn.execute("SELECT count(DISTINCT i) FROM many").fetchone() == (50,)


def test_status_details_stamps(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("'SELECT 1' & 'SELECT 2'")
    assert status == "completed"
    stamps = {n["node_type"] + str(n["id"]): n["status_details"] for n in app.nodes(instance)}
    join = next(v for k, v in stamps.items() if k.startswith("JOIN"))
    assert join == {"execution_id": f"{instance}::1"}
    for key, details in stamps.items():
        if key.startswith("SQL"):
            assert details == {"execution_id": f"{instance}::1::{key[3:]}::1"}
    assert json.dumps(stamps)  # all plain JSON


def test_deferred_constraint_violation_at_commit_fails_the_step(
    app: App, worker: ThreadWorker
) -> None:
    app.conn.execute("CREATE TABLE parent (id int PRIMARY KEY)")
    app.conn.execute("CREATE TABLE child (pid int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)")
    instance, status = app.run("'INSERT INTO child VALUES (1)'")
    assert status == "failed"
    (node,) = app.nodes(instance)
    assert "violates foreign key constraint" in str(node["result"])
    assert app.conn.execute("SELECT count(*) FROM child").fetchone() == (0,)


def test_a_start_and_its_first_step_commit_together(app: App, worker: ThreadWorker) -> None:
    # One checkpoint records both; the node still shows when it started and ended.
    instance, status = app.run("'SELECT 1 AS x' ~> 'SELECT 2 AS y'")
    assert status == "completed"
    row = app.conn.execute(
        "SELECT checkpoints FROM df._runs WHERE instance_id = %s", (instance,)
    ).fetchone()
    assert row == (2,), row  # the start with 'SELECT 1', then 'SELECT 2'
    stamps = app.conn.execute(
        "SELECT count(*) FROM df.nodes WHERE instance_id = %s AND node_type = 'SQL'"
        " AND started_at IS NOT NULL AND started_at <= updated_at",
        (instance,),
    ).fetchone()
    assert stamps == (2,)
