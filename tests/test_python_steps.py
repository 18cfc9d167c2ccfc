"""Python steps end to end: df.call, a worker that has the steps, the transaction they write
in, their errors, retries, cancels and timeouts, and who may call what (docs/python.md)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import python_steps_for_tests as steps
from conftest import App, ThreadWorker
from durability_harness import Workers

from pgdurable.monitor import queries as monitor_queries
from pgdurable.python_steps import registered

Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture
def py_app(app: App, conn: Conn) -> App:
    """The app role, with the test steps' table and leave to call every test step."""
    conn.execute(steps.PY_EFFECTS_DDL)
    conn.execute(f"GRANT SELECT, INSERT ON public.py_effects TO {app.role}")
    for pattern in ("billing.*", "util.*", "outside.*"):
        conn.execute("SELECT df.grant_call(%s, %s)", (app.role, pattern))
    return app


@pytest.fixture
def py_worker(dsn: str) -> Iterator[ThreadWorker]:
    """A worker that has the test steps."""
    w = ThreadWorker(dsn, concurrency=4, steps=registered())
    yield w
    w.stop()


@pytest.fixture
def call_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file where steps outside a transaction log their calls."""
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PGDURABLE_TEST_CALL_LOG", str(path))
    return path


def effects(conn: Conn, instance: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT note, attempt FROM public.py_effects WHERE instance = %s ORDER BY at",
        (instance,),
    ).fetchall()


def calls_logged(path: Path, instance: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["instance"] == instance]


def wait_until(probe: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


# -- calls and their results ------------------------------------------------------------------


def test_a_call_reads_named_results_and_later_steps_read_its_result(
    py_app: App, conn: Conn, py_worker: ThreadWorker
) -> None:
    instance, status = py_app.run(
        "'SELECT 7 AS id, ''12.50'' AS amount' |=> 'o'"
        ' ~> (df.call(\'billing.charge\', \'{"order_id": "$o.id", "amount": "$o.amount"}\')'
        "     |=> 'c')"
        " ~> 'SELECT $c.order_id + 1 AS next, $c.charged AS charged'"
    )
    assert status == "completed"
    assert py_app.result(instance) == {"rows": [{"next": 8, "charged": True}], "row_count": 1}
    assert effects(conn, instance) == [("charge 7 12.50", 1)]
    call = next(n for n in py_app.nodes(instance) if n["node_type"] == "CALL")
    assert call["result"] == {"charged": True, "order_id": 7, "amount": "12.50"}


def test_arguments_keep_their_json_types_and_strings_are_substituted_inside(
    py_app: App, py_worker: ThreadWorker
) -> None:
    py_app.conn.execute("SELECT df.setvar('region', 'eu')")
    instance, status = py_app.run(
        "'SELECT 1 AS n, ''x'' AS s UNION ALL SELECT 2, ''y''' |=> 'r'"
        " ~> df.call('util.echo', jsonb_build_object("
        "      'whole', '$r', 'field', '$r.s', 'rows', '$r.*', 'text', 'n=$r.n in {region}',"
        "      'nested', jsonb_build_array('$r.n', 3, null), 'plain', 'a $dollar'))"
    )
    assert status == "completed", py_app.failure(instance)
    assert py_app.result(instance) == {
        "whole": 1,
        "field": "x",
        "rows": [{"n": 1, "s": "x"}, {"n": 2, "s": "y"}],
        "text": "n=1 in eu",
        "nested": [1, 3, None],
        "plain": "a $dollar",
    }


def test_a_sync_step_writes_through_its_blocking_connection_as_the_submitter(
    py_app: App, conn: Conn, py_worker: ThreadWorker
) -> None:
    instance, status = py_app.run("df.call('billing.sync_charge', '{\"order_id\": 3}')")
    assert status == "completed", py_app.failure(instance)
    assert py_app.result(instance) == {"order_id": 3, "user": py_app.role}
    assert effects(conn, instance) == [("sync 3", 1)]


def test_calls_compose_with_join_and_their_results_are_an_array(
    py_app: App, py_worker: ThreadWorker
) -> None:
    instance, status = py_app.run(
        "df.call('util.add', '{\"a\": 1, \"b\": 2}') & df.call('util.add', '{\"a\": 3, \"b\": 4}')"
    )
    assert status == "completed"
    assert py_app.result(instance) == [3, 7]


# -- failures ---------------------------------------------------------------------------------


def test_an_exception_fails_the_step_with_its_type_message_and_traceback_and_undoes_its_writes(
    py_app: App, conn: Conn, py_worker: ThreadWorker
) -> None:
    instance, status = py_app.run("df.call('util.fail', '{\"message\": \"card declined\"}')")
    assert status == "failed"
    error = str(py_app.failure(instance))
    assert error.startswith("Python step 'util.fail' failed: ValueError: card declined")
    assert "python_steps_for_tests.py" in error and "raise ValueError(message)" in error
    assert effects(conn, instance) == []


def test_df_retry_runs_a_failing_step_again_and_only_the_last_attempt_writes(
    py_app: App, conn: Conn, py_worker: ThreadWorker
) -> None:
    instance, status = py_app.run(
        "df.retry(df.call('util.flaky', '{\"succeed_at\": 3}'), 5, 0.01, 0.01, ARRAY['python'])"
    )
    assert status == "completed", py_app.failure(instance)
    assert py_app.result(instance) == {"attempt": 3}
    assert effects(conn, instance) == [("flaky", 3)]


@pytest.mark.parametrize(
    ("graph", "error"),
    [
        (
            "df.call('util.add', '{\"a\": 1}')",
            "Python step 'util.add': the arguments do not fit its parameters: missing a"
            " required argument: 'b'",
        ),
        (
            'df.call(\'util.add\', \'{"a": 1, "b": 2, "c": 3}\')',
            "Python step 'util.add': the arguments do not fit its parameters: got an"
            " unexpected keyword argument 'c'",
        ),
        (
            "df.call('util.not_json')",
            "Python step 'util.not_json' returned a value that is not JSON: Object of type set"
            " is not JSON serializable",
        ),
        (
            "df.call('util.commits')",
            "Python step 'util.commits' ended its transaction (commit or rollback); a"
            " transactional step must leave it open: the worker commits it with the step's"
            " result",
        ),
    ],
)
def test_a_call_that_cannot_work_fails_at_once_even_under_df_retry(
    py_app: App, py_worker: ThreadWorker, graph: str, error: str
) -> None:
    instance, status = py_app.run(f"df.retry({graph}, 5, 0.01)")
    assert status == "failed"
    assert py_app.failure(instance) == error
    retry = next(n for n in py_app.nodes(instance) if n["node_type"] == "RETRY")
    history = py_app.conn.execute(
        "SELECT error FROM df.nodes WHERE instance_id = %s AND id = %s", (instance, retry["id"])
    ).fetchone()
    assert history is not None and str(history[0]).count("attempt ") == 1


# -- interruptions ----------------------------------------------------------------------------


def _running_call(conn: Conn, instance: str) -> None:
    """Wait until a worker holds the instance's call task."""
    wait_until(
        lambda: conn.execute(
            "SELECT 1 FROM df._tasks WHERE instance_id = %s AND kind = 'call'"
            " AND lease_owner IS NOT NULL",
            (instance,),
        ).fetchone()
    )


def test_df_cancel_interrupts_a_running_async_step_and_rolls_back_its_writes(
    py_app: App, conn: Conn, py_worker: ThreadWorker
) -> None:
    instance = py_app.start("df.call('util.sleep_forever')")
    _running_call(conn, instance)
    wait_until(
        lambda: conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE state = 'idle in transaction' AND usename = %s",
            (py_app.role,),
        ).fetchone()
    )
    py_app.conn.execute("SELECT df.cancel(%s)", (instance,))
    wait_until(
        lambda: (
            not conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE usename = %s AND state LIKE 'idle in%%'",
                (py_app.role,),
            ).fetchone()
        )
    )
    assert py_app.wait(instance) == "cancelled"
    assert effects(conn, instance) == []


def test_df_timeout_interrupts_a_running_step(
    py_app: App, conn: Conn, py_worker: ThreadWorker
) -> None:
    started = time.monotonic()
    instance, status = py_app.run("df.timeout(df.call('util.sleep_forever'), 1)")
    assert status == "failed"
    assert time.monotonic() - started < 10
    assert py_app.failure(instance) == "Timed out after 1s (df.timeout)"
    assert effects(conn, instance) == []


def test_a_cancelled_sync_step_sees_ctx_cancelled(
    py_app: App, conn: Conn, py_worker: ThreadWorker, call_log: Path
) -> None:
    instance = py_app.start("df.call('util.sync_until_cancelled')")
    # The function runs (a task leased to the worker may not have started it yet, and a
    # cancel then means it never runs at all).
    wait_until(lambda: calls_logged(call_log, instance))
    py_app.conn.execute("SELECT df.cancel(%s)", (instance,))

    def both_logged() -> list[dict[str, Any]]:
        found = calls_logged(call_log, instance)
        return found if len(found) == 2 else []

    logged = wait_until(both_logged)
    assert [c["note"] for c in logged] == ["started", "noticed cancel"]
    assert py_app.wait(instance) == "cancelled"


def test_a_cancelled_sync_step_that_ignores_it_is_abandoned_and_its_writes_never_count(
    py_app: App, conn: Conn, dsn: str
) -> None:
    steps.RELEASE_STUBBORN.clear()
    lone = ThreadWorker(dsn, concurrency=1, steps=registered())
    try:
        instance = py_app.start("df.call('util.sync_stubborn')")
        # The function runs: its INSERT is done, its transaction left open.
        wait_until(
            lambda: conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE usename = %s"
                " AND state = 'idle in transaction' AND query LIKE '%%py_effects%%'",
                (py_app.role,),
            ).fetchone()
        )
        py_app.conn.execute("SELECT df.cancel(%s)", (instance,))
        assert py_app.wait(instance) == "cancelled"
        # The worker's one slot is free again while the function still runs.
        assert py_app.run("'SELECT 1'")[1] == "completed"
        assert conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
            " AND state = 'idle in transaction'",
            (py_app.role,),
        ).fetchone() == (1,)
        # Once the function returns, its connection is closed with its transaction.
        steps.RELEASE_STUBBORN.set()
        wait_until(
            lambda: (
                not conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE usename = %s AND state LIKE 'idle in%%'",
                    (py_app.role,),
                ).fetchone()
            )
        )
        assert effects(conn, instance) == []
    finally:
        steps.RELEASE_STUBBORN.set()
        lone.stop()


# -- outside a transaction --------------------------------------------------------------------


def test_a_step_outside_a_transaction_keeps_its_idempotency_key_across_retries(
    py_app: App, py_worker: ThreadWorker, call_log: Path
) -> None:
    instance, status = py_app.run(
        "df.retry(df.call('outside.flaky', '{\"succeed_at\": 3}'), 5, 0.01, 0.01)"
    )
    assert status == "completed", py_app.failure(instance)
    logged = calls_logged(call_log, instance)
    assert [c["attempt"] for c in logged] == [1, 2, 3]
    assert {c["key"] for c in logged} == {py_app.result(instance)}


# -- who may call what, and which worker runs it ----------------------------------------------


def test_df_start_refuses_a_call_its_submitter_may_not_make(py_app: App) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
        py_app.start("'SELECT 1' ~> df.call('secret.thing')")
    message = str(refused.value)
    assert f"Blocked: role {py_app.role} may not call Python step 'secret.thing'" in message
    assert f"df.grant_call('{py_app.role}', 'secret.thing')" in message


def test_a_grant_revoked_after_the_start_fails_the_step_when_it_runs(
    py_app: App, conn: Conn, dsn: str
) -> None:
    instance = py_app.start("df.call('util.add', '{\"a\": 1, \"b\": 1}')")
    assert conn.execute("SELECT df.revoke_call(%s)", (py_app.role,)).fetchone() == (3,)
    w = ThreadWorker(dsn, concurrency=2, steps=registered())
    try:
        assert py_app.wait(instance) == "failed"
    finally:
        w.stop()
    assert str(py_app.failure(instance)).startswith(
        f"Blocked: role {py_app.role} may not call Python step 'util.add'"
    )


def test_grants_by_pattern_and_to_public(make_role: Any, conn: Conn) -> None:
    role = make_role()
    may = "SELECT df._may_call(%s::regrole, %s)"
    conn.execute("SELECT df.grant_call(%s, 'billing.*')", (role.name,))
    assert conn.execute(may, (role.name, "billing.charge")).fetchone() == (True,)
    assert conn.execute(may, (role.name, "billing.refund.partial")).fetchone() == (True,)
    assert conn.execute(may, (role.name, "billingx.charge")).fetchone() == (False,)
    assert conn.execute(may, (role.name, "other")).fetchone() == (False,)
    conn.execute("SELECT df.grant_call('public', 'other')")
    assert conn.execute(may, (role.name, "other")).fetchone() == (True,)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT df.grant_call(%s, 'billing*')", (role.name,))
    # Only administrators grant.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        role.conn.execute("SELECT df.grant_call(%s, '*')", (role.name,))


def test_a_call_waits_for_a_worker_that_has_its_name(
    py_app: App, conn: Conn, dsn: str, worker: ThreadWorker
) -> None:
    """The fixture's worker has no Python steps: it runs the SQL step, leaves the call."""
    instance = py_app.start("'SELECT 1' ~> df.call('util.add', '{\"a\": 2, \"b\": 2}')")
    wait_until(
        lambda: conn.execute(
            "SELECT 1 FROM df._tasks WHERE instance_id = %s AND kind = 'call'", (instance,)
        ).fetchone()
    )
    time.sleep(0.5)
    row = conn.execute(
        "SELECT t.lease_owner, t.call_name, i.status FROM df._tasks t"
        " JOIN df.instances i ON i.id = t.instance_id WHERE t.instance_id = %s",
        (instance,),
    ).fetchone()
    assert row == (None, "util.add", "running")
    # df.explain, `pgdurable show` (its query) and df.workers say why it waits.
    explain = py_app.conn.execute("SELECT df.explain(%s)", (instance,)).fetchone()
    assert explain is not None
    assert "CALL util.add ⏳ (waiting for a worker that has this step)" in str(explain[0])
    shown = {r["node_type"]: r["has_worker"] for r in monitor_queries.nodes(py_app.conn, instance)}
    assert shown["CALL"] is False and shown["SQL"] is None
    assert conn.execute("SELECT step_names FROM df.workers()").fetchall() == [([],)]
    waiting = py_app.conn.execute(
        "SELECT instance_id, step_name, waiting_since IS NOT NULL FROM df.waiting_calls()"
    ).fetchall()
    assert waiting == [(instance, "util.add", True)]
    other = ThreadWorker(dsn, concurrency=2, steps=registered())
    try:
        assert py_app.wait(instance) == "completed"
        names = conn.execute(
            "SELECT step_names FROM df._worker_epoch WHERE 'util.add' = ANY (step_names)"
        ).fetchall()
        assert len(names) == 1 and "billing.charge" in names[0][0]  # type: ignore[operator]
        assert py_app.conn.execute("SELECT * FROM df.waiting_calls()").fetchall() == []
    finally:
        other.stop()
    assert py_app.result(instance) == 4


def test_a_worker_that_has_the_next_step_takes_it_over_without_a_claim(
    py_app: App, conn: Conn, py_worker: ThreadWorker
) -> None:
    """A checkpoint leases the Python step that follows to its worker if that worker has it,
    in the row of the task it retires (as for a SQL step), not through the queue."""
    instance = py_app.start("'SELECT 1' ~> df.call('util.sleep_forever')")
    first = conn.execute("SELECT id FROM df._tasks WHERE instance_id = %s", (instance,)).fetchone()
    _running_call(conn, instance)
    row = conn.execute(
        "SELECT id, call_name, lease_owner IS NOT NULL FROM df._tasks WHERE instance_id = %s",
        (instance,),
    ).fetchone()
    assert first is not None and row == (first[0], "util.sleep_forever", True)
    py_app.conn.execute("SELECT df.cancel(%s)", (instance,))


def test_df_call_checks_its_arguments(py_app: App) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid step name"):
        py_app.conn.execute("SELECT df.call('no spaces')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="args must be a JSON object"):
        py_app.conn.execute("SELECT df.call('util.add', '[1, 2]')")
    with pytest.raises(psycopg.errors.NullValueNotAllowed):
        py_app.conn.execute("SELECT df.call(NULL)")
    row = py_app.conn.execute("SELECT df.call('util.add', '{\"b\": 2, \"a\": 1}')").fetchone()
    assert row == ('{"node_type":"CALL","query":"{\\"name\\":\\"util.add\\",\\"args\\":'
                   '{\\"a\\":1,\\"b\\":2}}"}',)  # fmt: skip


def test_explain_shows_calls(py_app: App) -> None:
    row = py_app.conn.execute(
        "SELECT df.explain(df.call('util.add', '{\"a\": 1, \"b\": 2}') ~> 'SELECT 1')"
    ).fetchone()
    assert row is not None and "CALL util.add" in str(row[0])


# -- kill -9 in the middle of Python steps ----------------------------------------------------


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workers]:
    """Worker subprocesses that can import the test steps."""
    tests_dir = str(Path(__file__).parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    )
    w = Workers(tmp_path)
    yield w
    w.close()


IMPORT = ["--import", "python_steps_for_tests"]


def test_kill9_in_a_transactional_step_its_writes_count_once(
    py_app: App, conn: Conn, dsn: str, workers: Workers
) -> None:
    conn.execute("SELECT df.grant_call(%s, 'crash.*')", (py_app.role,))
    ids = [py_app.start("df.call('crash.slow_write', '{\"pause_first\": 60}')") for _ in range(3)]
    first = workers.start(dsn, extra=IMPORT)
    first.wait_ready()
    # Each step wrote its row and pauses, its transaction open.
    wait_until(
        lambda: conn.execute(
            "SELECT count(*) = 3 FROM pg_stat_activity"
            " WHERE usename = %s AND state = 'idle in transaction'",
            (py_app.role,),
        ).fetchone()[0]  # type: ignore[index]
    )
    first.kill()
    second = workers.start(dsn, extra=IMPORT)
    for instance in ids:
        assert py_app.wait(instance) == "completed", second.log()
        assert py_app.result(instance) == {"run": 2}
        assert effects(conn, instance) == [("slow", 2)]


def test_kill9_in_a_step_outside_a_transaction_runs_it_again_with_the_same_key(
    py_app: App, dsn: str, workers: Workers, call_log: Path
) -> None:
    ids = [
        py_app.start('df.call(\'outside.record\', \'{"note": "n", "pause_first": 60}\')')
        for _ in range(3)
    ]
    first = workers.start(dsn, extra=IMPORT)
    first.wait_ready()
    wait_until(lambda: all(calls_logged(call_log, i) for i in ids))
    first.kill()
    workers.start(dsn, extra=IMPORT)
    for instance in ids:
        assert py_app.wait(instance) == "completed"
        logged = calls_logged(call_log, instance)
        assert [c["run"] for c in logged] == [1, 2]
        assert len({c["key"] for c in logged}) == 1
        assert len({c["pid"] for c in logged}) == 2
        assert py_app.result(instance) == {"key": logged[0]["key"], "run": 2}


def test_a_worker_whose_step_module_fails_to_import_stops_at_start(
    dsn: str, workers: Workers
) -> None:
    broken = workers.start(dsn, extra=["--import", "no_such_module_anywhere"])
    assert broken.wait_exit(30) != 0
    assert "cannot import Python steps from 'no_such_module_anywhere'" in broken.log()


def test_the_modules_may_come_from_pgdurable_imports(
    conn: Conn, dsn: str, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGDURABLE_IMPORTS", "json, python_steps_for_tests")
    worker = workers.start(dsn)
    worker_id = worker.wait_ready()
    row = conn.execute(
        "SELECT step_names FROM df.workers() WHERE worker_id = %s", (worker_id,)
    ).fetchone()
    assert row is not None and {"util.add", "billing.charge"} <= set(row[0])  # type: ignore[arg-type]


def test_grants_of_a_dropped_role_go_and_a_nul_in_a_call_is_refused_cleanly(
    conn: Conn, py_app: App
) -> None:
    conn.execute("CREATE ROLE pgd_gone_role")
    conn.execute("SELECT df.grant_call('pgd_gone_role', 'util.*')")
    conn.execute("DROP ROLE pgd_gone_role")
    assert conn.execute("SELECT df.revoke_call('pgd_gone_role')").fetchone() == (1,)
    grantees = conn.execute("SELECT grantee FROM df.call_grants()").fetchall()
    assert grantees == [(py_app.role,)] * 3
    bad = json.dumps(
        {"node_type": "CALL", "query": '{"name": "util.add", "args": {"a": "\\u0000"}}'}
    )
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="CALL config is not valid JSON"):
        py_app.start("%s", (bad,))
