"""df.map end to end: a body run for each row of a named result, bounded, in row order.
(Its kill -9 and restart tests are in test_durability.py: full_workflow has a map.)"""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
import python_steps_for_tests  # noqa: F401 (registers the steps the maps call)
from conftest import App, ThreadWorker

from pgdurable.python_steps import registered

Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture
def py_worker(dsn: str) -> Iterator[ThreadWorker]:
    w = ThreadWorker(dsn, concurrency=8, steps=registered())
    yield w
    w.stop()


def test_items_run_at_most_max_parallel_at_once_and_results_keep_row_order(
    app: App, py_worker: ThreadWorker
) -> None:
    app.conn.execute("CREATE TABLE app.spans (n int, began timestamptz, ended timestamptz)")
    body = (
        "'INSERT INTO app.spans SELECT $item.n, clock_timestamp(),"
        " (SELECT clock_timestamp() FROM pg_sleep(0.15 * (7 - $item.n) / 6))"
        " RETURNING n * 10 AS tens'"
    )
    instance, status = app.run(
        f"('SELECT g AS n FROM generate_series(1, 6) g' |=> 'rows') ~> df.map('rows', {body}, 2)"
    )
    assert status == "completed", app.failure(instance)
    result = app.result(instance)
    assert [r["rows"][0]["tens"] for r in result] == [10, 20, 30, 40, 50, 60]  # type: ignore[index]
    # At no moment did more than two items run.
    overlap = app.conn.execute(
        "SELECT max((SELECT count(*) FROM app.spans b WHERE b.began <= a.began"
        " AND b.ended > a.began)) FROM app.spans a"
    ).fetchone()
    assert overlap is not None and overlap[0] <= 2
    explain = app.conn.execute("SELECT df.explain(%s)", (instance,)).fetchone()
    assert explain is not None and "MAP 'rows' (max 2 at once) ✓" in str(explain[0])


def test_a_map_of_python_steps_collecting_errors(
    app: App, conn: Conn, py_worker: ThreadWorker
) -> None:
    conn.execute("SELECT df.grant_call(%s, 'util.*')", (app.role,))
    instance, status = app.run(
        "('SELECT * FROM (VALUES (1, 2), (3, NULL), (5, 6)) v(a, b)' |=> 'pairs')"
        ' ~> df.map(\'pairs\', df.call(\'util.add\', \'{"a": "$p.a", "b": "$p.b?"}\'),'
        "           max_parallel => 3, item_name => 'p', collect_errors => true)"
    )
    assert status == "completed", app.failure(instance)
    first, second, third = app.result(instance)  # type: ignore[misc]
    assert first == {"ok": True, "result": 3} and third == {"ok": True, "result": 11}
    assert second["ok"] is False and "TypeError" in second["error"]


def test_a_failing_item_fails_the_map(app: App, py_worker: ThreadWorker) -> None:
    instance, status = app.run(
        "('SELECT unnest(ARRAY[1, 0, 2]) AS d' |=> 'ds') ~> df.map('ds', 'SELECT 1 / $item.d', 1)"
    )
    assert status == "failed"
    assert str(app.failure(instance)).startswith(
        "df.map item 2 failed: SQL execution failed: error returned from database: division by zero"
    )


def test_df_map_builds_a_map_node_and_checks_its_arguments(su: Conn) -> None:
    row = su.execute("SELECT df.map('rows', 'SELECT $item.id', 4)").fetchone()
    assert row == (
        '{"node_type":"MAP","left_node":{"node_type":"SQL","query":"SELECT $item.id"},'
        '"query":"{\\"source\\":\\"rows\\",\\"item\\":\\"item\\",\\"max_parallel\\":4,'
        '\\"collect_errors\\":false}"}',
    )
    for call, message in (
        ("df.map('no such', 'SELECT 1')", "df.map: source must be the name of an earlier result"),
        ("df.map('r', 'SELECT 1', 0)", "df.map: max_parallel must be an integer from 1 to 1000"),
        ("df.map('r', 'SELECT 1', 2, '1x')", "df.map: item_name must be a valid result name"),
    ):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
            su.execute(f"SELECT {call}")
    hand_written = json.dumps(
        {
            "node_type": "MAP",
            "left_node": {"node_type": "SQL", "query": "SELECT 1"},
            "query": json.dumps({"source": "r", "max_parallel": 5000}),
        }
    )
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="max_parallel must be"):
        su.execute("SELECT df.start(%s)", (hand_written,))
