"""What a worker knows without asking again: the state its own checkpoint wrote travels with
the task it leased itself (Task.known), and the step's checkpoint checks it rather than locking
and reading the instance (df._checkpoint's version); what a start needs comes with the claim
(Task.start, df._start_facts)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
from conftest import App, ThreadWorker
from psycopg.types.json import Jsonb

from pgdurable.core.state import Activation, InstanceState, LoopActivation

Conn = psycopg.Connection[tuple[object, ...]]


def function_calls(conn: Conn, name: str) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions"
        " WHERE schemaname = 'df' AND funcname = %s",
        (name,),
    ).fetchone()
    assert row is not None
    return int(str(row[0]))


def test_a_sequence_locks_and_reads_its_instance_only_at_the_start(
    app: App, conn: Conn, dbname: str, dsn: str
) -> None:
    conn.execute(f"ALTER DATABASE {dbname} SET track_functions = 'pl'")
    w = ThreadWorker(dsn, concurrency=2)
    try:
        _, status = app.run("'SELECT 1' ~> 'SELECT 2' ~> 'SELECT 3' ~> 'SELECT 4' ~> 'SELECT 5'")
        assert status == "completed"
    finally:
        w.stop()  # its sessions end, which reports their statistics
    # One checkpoint for the start and its first step, one for each step after it.
    deadline = time.monotonic() + 20
    while function_calls(conn, "_checkpoint") < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert function_calls(conn, "_checkpoint") == 5
    assert function_calls(conn, "_checkpoint_begin") == 1  # the start's


@pytest.mark.parametrize("steps", [1, 120])
def test_a_start_reads_its_instance_at_the_claim_unless_the_graph_is_large(
    app: App, conn: Conn, dbname: str, dsn: str, steps: int
) -> None:
    conn.execute(f"ALTER DATABASE {dbname} SET track_functions = 'all'")  # SQL ones too
    app.conn.execute("CREATE TABLE effects (n int)")
    graph = " ~> ".join(f"'INSERT INTO effects VALUES ({n})'" for n in range(steps))
    w = ThreadWorker(dsn, concurrency=2)
    try:
        instance, status = app.run(graph)
        assert status == "completed"
    finally:
        w.stop()
    assert app.conn.execute("SELECT count(*) FROM effects").fetchone() == (steps,)
    assert app.nodes(instance)[0]["status"] == "completed"
    deadline = time.monotonic() + 20
    while function_calls(conn, "_claim") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    # 1 step: one node; 120: 239 nodes, more than df._start_facts hands out.
    assert function_calls(conn, "_start_facts") == 1
    assert function_calls(conn, "_task_facts") == (0 if steps == 1 else 1)


def test_a_step_whose_known_state_is_old_runs_again_and_takes_effect_once(
    app: App, conn: Conn, worker: ThreadWorker, caplog: pytest.LogCaptureFixture
) -> None:
    app.conn.execute("CREATE TABLE effects (at timestamptz DEFAULT clock_timestamp())")
    instance = app.start(
        "'SELECT 1' ~> 'INSERT INTO effects SELECT FROM pg_sleep(1)' ~> 'SELECT count(*) AS n"
        " FROM effects'"
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT count(*) FROM df.nodes WHERE instance_id = %s AND node_type = 'SQL'"
            " AND status = 'running' AND query LIKE 'INSERT%%'",
            (instance,),
        ).fetchone()
        if row == (1,):
            break
        time.sleep(0.02)
    # As if another checkpoint of the instance had come first: the worker's state is old.
    conn.execute(
        "UPDATE df._runs SET checkpoints = checkpoints + 1 WHERE instance_id = %s", (instance,)
    )
    assert app.wait(instance) == "completed"
    assert app.result(instance) == {"rows": [{"n": 1}], "row_count": 1}
    assert app.conn.execute("SELECT count(*) FROM effects").fetchone() == (1,)
    assert f"the state of {instance} known for task" in caplog.text


def checkpoint(
    conn: Conn, instance: str, version: int | None, claim: int = 1
) -> list[tuple[Any, ...]]:
    """df._checkpoint of a task made for the test, computed from state ``version``; the task
    it queues (activation 100) is leased and returned, up to ``claim``."""
    conn.execute("DELETE FROM df._tasks WHERE instance_id = %s", (instance,))
    task = conn.execute(
        "INSERT INTO df._tasks (instance_id, role_oid, activation, kind, token)"
        " SELECT i.id, i.submitted_by, 99, 'timer', gen_random_uuid()"
        "   FROM df.instances i WHERE i.id = %s RETURNING id, token",
        (instance,),
    ).fetchone()
    assert task is not None
    change = {
        "state": {"version": version},
        "generation": 1,
        "writes": [],
        "tasks": [{"activation": 100, "kind": "sql", "node_id": None, "payload": {},
                   "run_at": None}],
        "dropped": [],
        "outcome": None,
        "ended_execution": None,
        "version": version,
    }  # fmt: skip
    return conn.execute(
        "SELECT activation, checkpoints, task_id = %s FROM df._checkpoint(%s, %s, %s, %s, %s, 30)",
        (task[0], task[0], task[1], Jsonb(change), uuid.uuid4(), claim),
    ).fetchall()


def test_a_checkpoint_refuses_a_state_of_another_version(su: Conn) -> None:
    row = su.execute("SELECT df.start('SELECT 1')").fetchone()
    assert row is not None
    instance = str(row[0])
    assert checkpoint(su, instance, None) == [(100, 1, True)]  # the version is not checked
    with pytest.raises(psycopg.Error) as caught:
        checkpoint(su, instance, 0)
    assert caught.value.sqlstate == "PD002"
    runs = su.execute("SELECT state, checkpoints FROM df._runs WHERE instance_id = %s", (instance,))
    assert runs.fetchone() == ({"version": None}, 1)  # nothing of it was written
    assert checkpoint(su, instance, 1) == [(100, 2, True)]


def test_the_next_step_leased_to_the_worker_takes_over_its_tasks_row(su: Conn) -> None:
    """In place (the same id), and otherwise a new row: one that is not leased to the caller."""
    row = su.execute("SELECT df.start('SELECT 1')").fetchone()
    assert row is not None
    instance = str(row[0])
    assert checkpoint(su, instance, None) == [(100, 1, True)]
    assert checkpoint(su, instance, None, claim=0) == []
    queued = su.execute(
        "SELECT activation, lease_owner IS NULL FROM df._tasks WHERE instance_id = %s", (instance,)
    )
    assert queued.fetchall() == [(100, True)]


def test_only_a_single_path_of_activations_has_one_task() -> None:
    plain = InstanceState.initial("i")
    leaf = Activation("n1", None, None, 0, 0)
    assert plain.single_path()
    assert InstanceState(2, {1: leaf}, plain.execs, plain.envs).single_path()
    loop = LoopActivation("n0", None, None, 0, 0, loop_exec=0, iteration=1, phase="body",
                          started=0.0)  # fmt: skip
    assert not InstanceState(3, {1: leaf, 2: loop}, plain.execs, plain.envs).single_path()


def test_a_long_first_step_shows_its_instance_running_meanwhile(
    app: App, worker: ThreadWorker
) -> None:
    """The start and the first step commit together; until then the worker shows the instance
    and the step as running from its own connection (df._show_started), once the step has
    run for a moment."""
    instance = app.start("'SELECT pg_sleep(1.5)'")
    deadline = time.monotonic() + 1.2
    seen = None
    while time.monotonic() < deadline:
        seen = app.conn.execute(
            "SELECT i.status, n.status, n.started_at IS NOT NULL FROM df.instances i"
            " JOIN df.nodes n ON n.instance_id = i.id AND n.id = i.root_node WHERE i.id = %s",
            (instance,),
        ).fetchone()
        if seen == ("running", "running", True):
            break
        time.sleep(0.02)
    assert seen == ("running", "running", True)
    assert app.wait(instance) == "completed"
