"""Workflows that grow at run time: a step returns the rest of the workflow (df.continue_with
from SQL, a pgdurable.dsl graph from Python), which runs in its place. (Its kill -9 and
restart tests are in test_durability.py: full_workflow has such a step.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import python_steps_for_tests  # noqa: F401 (registers the steps these workflows call)
from conftest import App, ThreadWorker
from durability_harness import EFFECTS_DDL, Workers, effect, join, lit, seq

from pgdurable.python_steps import registered

Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture
def py_worker(app: App, conn: Conn, dsn: str) -> Iterator[ThreadWorker]:
    conn.execute("SELECT df.grant_call(%s, 'util.*')", (app.role,))
    w = ThreadWorker(dsn, concurrency=4, steps=registered())
    yield w
    w.stop()


def explain(app: App, instance: str) -> str:
    row = app.conn.execute("SELECT df.explain(%s)", (instance,)).fetchone()
    assert row is not None
    return str(row[0])


def test_a_sql_step_continues_with_a_graph_whose_result_is_the_steps(
    app: App, py_worker: ThreadWorker
) -> None:
    instance, status = app.run(
        "'SELECT 1'"
        " ~> ($$SELECT df.continue_with('SELECT 40 + 2 AS answer' ~> 'SELECT 7 AS seven')$$"
        "     |=> 'c')"
        " ~> 'SELECT $c.seven AS s'"
    )
    assert status == "completed", app.failure(instance)
    assert app.result(instance) == {"rows": [{"s": 7}], "row_count": 1}
    drawn = explain(app, instance)
    assert "⤷ continued with:" in drawn
    assert "SQL: SELECT 40 + 2 AS answer ✓" in drawn and "SQL: SELECT 7 AS seven ✓" in drawn
    # Its nodes are recorded like the others, and monitoring infers their statuses.
    rows = app.conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE inferred_status = 'completed')"
        " FROM df.instance_nodes(%s)",
        (instance,),
    ).fetchone()
    assert rows == (8, 8)  # five nodes started, three generated


def test_a_python_step_returns_a_graph(app: App, py_worker: ThreadWorker) -> None:
    instance, status = app.run("df.call('util.plan', '{\"count\": 3}')")
    assert status == "completed", app.failure(instance)
    parts = app.result(instance)["parts"]  # type: ignore[index]
    assert parts[1] == {"rows": [{"n": 3}], "row_count": 1}
    assert "CALL util.echo ✓" in explain(app, instance)
    # And a plain value is a plain result.
    instance, status = app.run("df.call('util.plan', '{\"count\": 0}')")
    assert app.result(instance) == {"nothing": "to do"}


def test_a_graph_past_the_limits_fails_the_step_and_is_not_retried(
    app: App, py_worker: ThreadWorker
) -> None:
    instance, status = app.run("df.retry(df.call('util.too_deep', '{\"depth\": 300}'), 3, 0)")
    assert status == "failed"
    error = str(app.failure(instance))
    assert error.startswith("the graph step ") and "maximum nesting depth of 256" in error
    history = app.conn.execute(
        "SELECT error FROM df.nodes WHERE instance_id = %s AND node_type = 'RETRY'", (instance,)
    ).fetchone()
    assert history is not None and str(history[0]).count("attempt ") == 1


def test_a_malformed_graph_fails_the_step(app: App, py_worker: ThreadWorker) -> None:
    half_a_then = {"node_type": "THEN", "left_node": {"node_type": "SQL", "query": "SELECT 1"}}
    instance, status = app.run(f"$$SELECT df.continue_with('{json.dumps(half_a_then)}')$$")
    assert status == "failed"
    assert "root: THEN node" in str(app.failure(instance))
    assert "needs left and right children" in str(app.failure(instance))


def test_data_that_only_looks_like_a_graph_is_a_plain_result(
    app: App, conn: Conn, py_worker: ThreadWorker
) -> None:
    """Only what df.continue_with signed for the submitter runs. A row of a table (a webhook's
    payload, say) shaped like its result, unsigned or signed for another role, and a Python
    step's data of that shape, are results like any other."""
    payload = {"node_type": "SQL", "query": "CREATE TABLE app.pwned (x int)"}
    row = conn.execute("SELECT df.continue_with(%s)", (json.dumps(payload),)).fetchone()
    assert row is not None  # signed, but for the superuser
    app.conn.execute("CREATE TABLE app.inbox (n int, payload jsonb)")
    for n, stored in enumerate(({"df.continue_with": payload}, row[0])):
        app.conn.execute("INSERT INTO app.inbox VALUES (%s, %s)", (n, json.dumps(stored)))
    for n in range(2):
        assert app.run(f"'SELECT payload FROM app.inbox WHERE n = {n}'")[1] == "completed"
    args = json.dumps({"df.continue_with": payload}).replace("'", "''")
    instance, status = app.run(f"df.call('util.echo', '{args}')")
    assert status == "completed" and app.result(instance) == {"df.continue_with": payload}
    assert app.conn.execute("SELECT to_regclass('app.pwned')").fetchone() == (None,)


# -- several workers: the graph grows under one worker, its steps run on the other ------------


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    yield w
    w.close()


def test_workers_that_read_the_graph_before_it_grew_read_it_again(
    app: App, conn: Conn, dsn: str, workers: Workers
) -> None:
    conn.execute(EFFECTS_DDL)
    conn.execute(f"GRANT SELECT, INSERT ON public.effects TO {app.role}")
    # Both workers run the first JOIN's steps (and so cache the graph); the continued graph's
    # eight parallel steps go to both again.
    before = join(*(effect(n, 0.3) for n in range(1, 7)))
    rest = join(*(effect(n, 0.3) for n in range(10, 18)))
    graph = seq(before, lit(f"SELECT df.continue_with({rest})"))
    ids = [app.start(graph) for _ in range(2)]
    for _ in range(2):
        workers.start(dsn, concurrency=2, lease_seconds=5)
    for instance in ids:
        assert app.wait(instance, 60) == "completed", app.failure(instance)
    by_worker = conn.execute(
        "SELECT count(DISTINCT worker) FILTER (WHERE step >= 10),"
        " count(*), count(DISTINCT (instance, step)) FROM public.effects"
    ).fetchone()
    assert by_worker == (2, 28, 28)
    for w in workers:
        assert "Traceback" not in w.log(), w.log()
