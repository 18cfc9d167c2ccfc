"""df.restart end to end: a failed or cancelled instance runs on from where it ended.

Effects are counted in tables without unique constraints, so "the steps that completed do
not run again" is checked, not assumed. The pure rules are in test_interpreter_restart.py.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import psycopg
import pytest
import test_durability as durability
from click.testing import CliRunner
from conftest import App, RoleFactory, ThreadWorker
from durability_harness import (
    Workers,
    assert_exactly_once,
    effect,
    join,
    lit,
    orphaned_tasks,
    seq,
    start,
    statuses,
    wait_completed,
    wait_for,
)
from psycopg.rows import dict_row

from pgdurable.cli import main
from pgdurable.client import AsyncClient, Client

Conn = psycopg.Connection[tuple[object, ...]]

DIVISION = "SQL execution failed: error returned from database: division by zero"
# Fails (division by zero) until a row is in app.fix.
CHECK = "1 / (SELECT count(*) FROM app.fix)::int"


def setup(app: App) -> None:
    app.conn.execute("CREATE TABLE app.log (step text)")
    app.conn.execute("CREATE TABLE app.fix (v int)")
    app.conn.execute("CREATE SEQUENCE app.tries")


def log(app: App) -> list[str]:
    return [str(r[0]) for r in app.conn.execute("SELECT step FROM app.log ORDER BY step")]


def fix(app: App) -> None:
    app.conn.execute("INSERT INTO app.fix VALUES (1)")


def restart(app: App, instance: str) -> str:
    row = app.conn.execute("SELECT df.restart(%s)", (instance,)).fetchone()
    assert row is not None
    return str(row[0])


def executions(app: App, instance: str) -> list[dict[str, Any]]:
    cur = app.conn.cursor(row_factory=dict_row)
    cur.execute("SELECT * FROM df.instance_executions(%s, 10)", (instance,))
    return cur.fetchall()


def inferred(app: App, instance: str) -> dict[str, str]:
    """Each node's inferred status, by its query (SQL steps) or its type."""
    rows = app.conn.execute(
        "SELECT CASE WHEN node_type = 'SQL' THEN query ELSE node_type END, inferred_status"
        " FROM df.instance_nodes(%s)",
        (instance,),
    ).fetchall()
    return {str(key): str(status) for key, status in rows}


def explain(app: App, instance: str) -> str:
    row = app.conn.execute("SELECT df.explain(%s)", (instance,)).fetchone()
    assert row is not None
    return "\n".join(line.rstrip() for line in str(row[0]).splitlines())


def wait_until(predicate: Any, timeout: float = 15.0) -> None:
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, "condition not reached"
        time.sleep(0.05)


def signal(app: App, instance: str, name: str) -> None:
    app.conn.execute("SELECT df.signal(%s, %s)", (instance, name))


def test_a_sequence_restarts_at_its_failed_step_and_shows_both_runs(
    app: App, worker: ThreadWorker, conn: Conn
) -> None:
    setup(app)
    first = "INSERT INTO app.log VALUES (''first'') RETURNING 41 AS n"
    second = f"SELECT $a + {CHECK} AS total"
    instance, status = app.run(
        f"('{first}' |=> 'a') ~> ('{second}' |=> 'b')"
        " ~> df.wait_for_signal('go') ~> 'SELECT $b AS again'"
    )
    assert status == "failed"
    assert app.failure(instance) == DIVISION
    assert log(app) == ["first"]
    failed_at = conn.execute(
        "SELECT finished_at FROM df._runs WHERE instance_id = %s", (instance,)
    ).fetchone()
    assert failed_at is not None and failed_at[0] is not None

    fix(app)
    assert restart(app, instance) == f"Instance {instance} restarted"
    # Running again: no longer finished, so retention leaves it alone.
    assert conn.execute(
        "SELECT i.status, r.finished_at, r.output, r.generation, r.restarts"
        " FROM df.instances i JOIN df._runs r ON r.instance_id = i.id WHERE i.id = %s",
        (instance,),
    ).fetchone() == ("running", None, None, 2, 1)
    conn.execute("SELECT df._purge_finished(0, 0, 500)")  # removes every finished instance
    assert app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone() == ("running",)
    wait_until(lambda: inferred(app, instance).get("SIGNAL") == "running")

    nodes = inferred(app, instance)
    assert nodes[first.replace("''", "'")] == "completed"
    assert nodes[second] == "completed"
    assert nodes["SELECT $b AS again"] == "pending"
    root = app.conn.execute(
        "SELECT n.inferred_status FROM df.instance_nodes(%s) n JOIN df.instances i"
        " ON i.root_node = n.node_id WHERE i.id = %s",
        (instance, instance),
    ).fetchone()
    assert root == ("running",)
    shown = explain(app, instance)
    assert "Status:   ⏳ Running\nRestarts: 1\n" in shown
    assert "Output:" not in shown
    assert "SIGNAL 'go' ⏳" in shown
    history = executions(app, instance)
    assert [(e["execution_id"], e["status"], e["output"]) for e in history] == [
        (2, "Running", None),
        (1, "Failed", DIVISION),
    ]
    assert history[1]["event_count"] >= 2 and history[1]["duration_ms"] >= 0

    signal(app, instance, "go")
    assert app.wait(instance) == "completed"
    assert app.result(instance) == {"rows": [{"again": 42}], "row_count": 1}
    assert log(app) == ["first"]  # the first step took effect once
    history = executions(app, instance)
    assert [(e["execution_id"], e["status"]) for e in history] == [
        (2, "Completed"),
        (1, "Failed"),
    ]
    assert history[0]["output"] == '{"rows":[{"again":42}],"row_count":1}'
    listed = app.conn.execute(
        "SELECT execution_count FROM df.list_instances() WHERE instance_id = %s", (instance,)
    ).fetchone()
    assert listed == (2,)
    assert "Restarts: 1" in explain(app, instance)


def test_a_join_runs_again_only_its_failed_branch_and_what_the_timeout_interrupted(
    app: App, worker: ThreadWorker
) -> None:
    setup(app)
    failing = (
        "('INSERT INTO app.log VALUES (''branch 1'') RETURNING 1 AS one' |=> 'x')"
        f" ~> 'SELECT $x + {CHECK} AS r'"
    )
    waiting = "(df.wait_for_signal('go') ~> 'INSERT INTO app.log VALUES (''branch 2'')')"
    done = "'INSERT INTO app.log VALUES (''branch 3'') RETURNING 3 AS three'"
    instance, status = app.run(
        f"df.timeout(df.join3({failing}, {waiting}, {done}), 3) ~> 'SELECT 1 AS after'"
    )
    assert status == "failed"
    assert app.failure(instance) == "Timed out after 3s (df.timeout)"
    assert log(app) == ["branch 1", "branch 3"]

    fix(app)
    began = time.monotonic()
    restart(app, instance)
    signal(app, instance, "go")
    assert app.wait(instance) == "completed"
    assert time.monotonic() - began < 3  # the timeout had its whole duration again
    assert log(app) == ["branch 1", "branch 2", "branch 3"]
    nodes = inferred(app, instance)
    assert set(nodes.values()) == {"completed"}, nodes


def test_a_join_whose_branch_failed_while_another_slept(app: App, worker: ThreadWorker) -> None:
    setup(app)
    instance, status = app.run(
        f"('SELECT {CHECK} AS r' |=> 'r')"
        " & (df.sleep(1) ~> 'INSERT INTO app.log VALUES (''slept'') RETURNING 2 AS two')"
    )
    assert status == "failed"
    assert app.failure(instance) == f"JOIN branch 1 failed: {DIVISION}"
    fix(app)
    restart(app, instance)
    assert app.wait(instance) == "completed"
    assert app.result(instance) == [
        {"rows": [{"r": 1}], "row_count": 1},
        {"rows": [{"two": 2}], "row_count": 1},
    ]
    assert log(app) == ["slept"]


def test_an_instance_cancelled_in_its_sleep_sleeps_again_and_completes(
    app: App, worker: ThreadWorker
) -> None:
    setup(app)
    instance = app.start(
        "'INSERT INTO app.log VALUES (''before'')' ~> df.sleep(2)"
        " ~> 'INSERT INTO app.log VALUES (''after'')'"
    )
    wait_until(lambda: inferred(app, instance).get("SLEEP") == "running")
    app.conn.execute("SELECT df.cancel(%s)", (instance,))
    assert app.wait(instance) == "cancelled"
    began = time.monotonic()
    restart(app, instance)
    assert app.wait(instance) == "completed"
    assert time.monotonic() - began >= 1.9  # the sleep began again
    assert log(app) == ["after", "before"]
    history = executions(app, instance)
    assert [(e["execution_id"], e["status"], e["output"]) for e in history] == [
        (2, "Completed", '{"rows":[],"row_count":0}'),
        (1, "Cancelled", None),
    ]


def test_an_instance_cancelled_in_a_signal_wait_waits_again(app: App, worker: ThreadWorker) -> None:
    instance = app.start("df.wait_for_signal('go') |=> 's' ~> 'SELECT $s.data AS got'")
    wait_until(lambda: inferred(app, instance).get("SIGNAL") == "running")
    app.conn.execute("SELECT df.cancel(%s)", (instance,))
    restart(app, instance)
    app.conn.execute("SELECT df.signal(%s, 'go', '7')", (instance,))
    assert app.wait(instance) == "completed"
    assert app.result(instance) == {"rows": [{"got": 7}], "row_count": 1}


FLAKY = (
    "'WITH t AS (SELECT nextval(''app.tries'') AS n),"
    " i AS (INSERT INTO app.log SELECT ''try '' || n FROM t RETURNING 1)"
    " SELECT n, 1 / (CASE WHEN n < {fail_until} THEN 0 ELSE 1 END) AS ok FROM t'"
)


def test_an_exhausted_retry_gets_fresh_attempts(app: App, worker: ThreadWorker) -> None:
    setup(app)
    instance, status = app.run(f"df.retry({FLAKY.format(fail_until=4)}, 2, 0.1, 0.1)")
    assert status == "failed"
    restart(app, instance)  # attempts 3 (fails) and 4 (succeeds): two fresh ones
    assert app.wait(instance) == "completed"
    assert app.result(instance) == {"rows": [{"n": 4, "ok": 1}], "row_count": 1}
    assert log(app) == ["try 4"]  # the failed attempts were rolled back
    error = app.conn.execute(
        "SELECT error FROM df.nodes WHERE instance_id = %s AND node_type = 'RETRY'", (instance,)
    ).fetchone()
    assert error is not None
    assert str(error[0]).splitlines() == [
        f"attempt 1: {DIVISION}",
        f"attempt 2: {DIVISION}",
        "restarted: attempts counted afresh",
        f"attempt 1: {DIVISION}",
    ]


def test_a_loop_is_restarted_in_its_iteration(app: App, worker: ThreadWorker) -> None:
    setup(app)
    app.conn.execute("CREATE TABLE app.counter (n int)")
    app.conn.execute("INSERT INTO app.counter VALUES (0)")
    body = (
        "'UPDATE app.counter SET n = n + 1 RETURNING n' |=> 'c'"
        " ~> 'INSERT INTO app.log SELECT ''iteration '' || $c'"
        f" ~> 'SELECT CASE WHEN $c = 2 THEN {CHECK} END AS checked'"
    )
    instance, status = app.run(f"df.loop({body}, 'SELECT n < 3 FROM app.counter')")
    assert status == "failed"
    assert log(app) == ["iteration 1", "iteration 2"]
    fix(app)
    restart(app, instance)
    assert app.wait(instance) == "completed"
    assert log(app) == ["iteration 1", "iteration 2", "iteration 3"]
    history = executions(app, instance)
    assert [(e["execution_id"], e["status"]) for e in history] == [
        (4, "Completed"),  # iteration 3
        (3, "ContinuedAsNew"),  # iteration 2, restarted
        (2, "Failed"),  # iteration 2, until it failed
        (1, "ContinuedAsNew"),  # iteration 1
    ]


def test_a_map_keeps_its_completed_items(app: App, worker: ThreadWorker) -> None:
    setup(app)
    body = (
        "'INSERT INTO app.log SELECT ''item '' || $item.n"
        f" RETURNING CASE WHEN $item.n = 3 THEN {CHECK} ELSE $item.n END AS v'"
    )
    instance, status = app.run(
        f"('SELECT g AS n FROM generate_series(1, 4) g' |=> 'rows') ~> df.map('rows', {body}, 1)"
    )
    assert status == "failed"
    assert log(app) == ["item 1", "item 2"]
    fix(app)
    restart(app, instance)
    assert app.wait(instance) == "completed"
    assert log(app) == ["item 1", "item 2", "item 3", "item 4"]
    assert [r["rows"][0]["v"] for r in app.result(instance)] == [1, 2, 1, 4]  # type: ignore[attr-defined,index]


def test_only_a_failed_or_cancelled_instance_is_restarted(
    app: App, worker: ThreadWorker, make_role: RoleFactory
) -> None:
    running = app.start("df.wait_for_signal('never')")
    done, status = app.run("'SELECT 1'")
    assert status == "completed"
    for instance, state in ((running, "running"), (done, "completed")):
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as refused:
            restart(app, instance)
        assert refused.value.diag.message_primary == (
            f"Instance {instance} is {state}: only a failed or cancelled instance can be restarted"
        )
    # Another role's instance looks exactly like an unknown one.
    other = make_role()
    for instance in (running, "0badc0de"):
        with pytest.raises(psycopg.errors.NoDataFound) as missing:
            other.conn.execute("SELECT df.restart(%s)", (instance,))
        message = missing.value.diag.message_primary
        assert message == f"Instance not found or access denied: {instance}"
    # Nor can a user set the status by hand to anything but a restart.
    app.conn.execute("SELECT df.cancel(%s)", (running,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.conn.execute("UPDATE df.instances SET status = 'completed' WHERE id = %s", (running,))


def test_two_concurrent_restarts_one_wins(app: App) -> None:
    instance = app.start("df.wait_for_signal('never')")
    app.conn.execute("SELECT df.cancel(%s)", (instance,))
    with psycopg.connect(app.dsn) as first, psycopg.connect(app.dsn, autocommit=True) as second:
        first.execute("SELECT df.restart(%s)", (instance,))  # holds the row until it commits
        outcome: list[BaseException | str] = []

        def other() -> None:
            try:
                row = second.execute("SELECT df.restart(%s)", (instance,)).fetchone()
                outcome.append(str(row[0]) if row else "")
            except psycopg.Error as exc:
                outcome.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.5)
        assert not outcome  # waiting for the first one's lock
        first.commit()
        thread.join(10)
    [refusal] = outcome
    assert isinstance(refusal, psycopg.errors.ObjectNotInPrerequisiteState)
    assert app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone() == ("running",)
    restarts = app.conn.execute(
        "SELECT execution_count FROM df.list_instances() WHERE instance_id = %s", (instance,)
    ).fetchone()
    assert restarts == (2,)


def test_restart_twice(app: App, worker: ThreadWorker) -> None:
    setup(app)
    instance, status = app.run(
        "'INSERT INTO app.log VALUES (''once'')'"
        " ~> 'SELECT 1 / (SELECT count(*) FROM app.fix WHERE v = 2)::int AS r'"
    )
    assert status == "failed"
    fix(app)  # not the row it needs: division by zero again
    restart(app, instance)
    assert app.wait(instance) == "failed"
    app.conn.execute("INSERT INTO app.fix VALUES (2)")
    restart(app, instance)
    assert app.wait(instance) == "completed"
    assert log(app) == ["once"]
    assert [(e["execution_id"], e["status"]) for e in executions(app, instance)] == [
        (3, "Completed"),
        (2, "Failed"),
        (1, "Failed"),
    ]
    assert "Restarts: 2" in explain(app, instance)


def test_an_instance_without_a_state_restarts_from_the_beginning(app: App, dsn: str) -> None:
    setup(app)
    instance = app.start("'INSERT INTO app.log VALUES (''ran'')'")
    app.conn.execute("SELECT df.cancel(%s)", (instance,))  # while pending: it never ran
    restart(app, instance)
    w = ThreadWorker(dsn, concurrency=2)
    try:
        assert app.wait(instance) == "completed"
    finally:
        w.stop()
    assert log(app) == ["ran"]


def test_the_command_line_and_the_python_clients(app: App, worker: ThreadWorker) -> None:
    setup(app)
    runner = CliRunner(env={"PGDURABLE_DSN": app.dsn, "COLUMNS": "200"})
    instance, status = app.run(f"'SELECT {CHECK} AS r'")
    assert status == "failed"
    fix(app)
    result = runner.invoke(main, ["restart", instance], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"Instance {instance} restarted" in result.stderr
    assert app.wait(instance) == "completed"
    refused = runner.invoke(main, ["restart", instance], catch_exceptions=False)
    assert refused.exit_code == 1
    assert f"Instance {instance} is completed" in refused.stderr
    unknown = runner.invoke(main, ["restart", "0badc0de"], catch_exceptions=False)
    assert unknown.exit_code == 1
    assert "Instance not found or access denied: 0badc0de" in unknown.stderr

    with Client.connect(app.dsn) as client:
        failing = client.start("SELECT 1 / 0 AS r")
        wait_until(lambda: client.status(failing) == "failed")
        assert client.restart(failing) == f"Instance {failing} restarted"
        wait_until(lambda: client.status(failing) == "failed")  # and failed again

    async def async_restart() -> str:
        async with await AsyncClient.connect(app.dsn) as client:
            return await client.restart(failing)

    assert asyncio.run(async_restart()) == f"Instance {failing} restarted"
    assert [e["status"] for e in executions(app, failing)][1:] == ["Failed", "Failed"]


# -- durability: the restarted run survives kill -9 like any other ---------------------------

env = durability.env  # the fixtures
workers = durability.workers


def test_a_worker_killed_during_restarted_runs_leaves_every_effect_once(
    env: durability.Env, workers: Workers
) -> None:
    """Instances that failed in a JOIN branch (after the steps before it, and the JOIN's
    other branch, took effect) are restarted, and their workers killed with SIGKILL at random
    points of the restarted runs: every step takes effect exactly once in all."""
    rng = random.Random()
    env.admin.execute("CREATE TABLE public.gate (ok int)")
    env.admin.execute(f'GRANT SELECT ON public.gate TO "{env.role}"')
    gate = lit("SELECT 1 / (SELECT count(*) FROM public.gate)::int AS ok")
    expected: dict[str, set[int]] = {}
    for n in range(6):
        graph = seq(
            effect(1),
            effect(2, 0.1),
            join(effect(3, 0.2), seq(gate, effect(4, 0.2))),
            effect(5, 0.3),
            effect(6, 0.3),
        )
        expected[start(env.app, graph, f"restart-{n}")] = set(range(1, 7))
    ids = list(expected)
    first = workers.start(env.dsn, concurrency=4, lease_seconds=2)
    wait_for(
        "every instance to fail",
        lambda: all(s == "failed" for s in statuses(env.admin, ids).values()),
        60,
    )
    first.kill()
    env.admin.execute("INSERT INTO public.gate VALUES (1)")
    for instance in ids:
        env.app.execute("SELECT df.restart(%s)", (instance,))

    orphaned = 0
    for _ in range(8):
        worker = workers.start(env.dsn, concurrency=4, lease_seconds=2)
        worker.wait_ready()
        time.sleep(rng.uniform(0.1, 0.6))
        worker.kill()
        orphaned += orphaned_tasks(env.admin, worker.worker_id)
        if all(s == "completed" for s in statuses(env.admin, ids).values()):
            break
    workers.start(env.dsn, concurrency=4, lease_seconds=2)
    wait_completed(env.admin, ids, timeout=90, app=env.app)
    assert_exactly_once(env.admin, expected)
    assert orphaned > 0, "no kill happened while the worker held a task"
