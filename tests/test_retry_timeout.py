"""df.retry and df.timeout end to end: attempts, backoff, histories, deadlines, cancellation.

Side effects are counted in tables without unique constraints, and attempts with a sequence
(nextval is never rolled back), so "exactly once" is checked, not assumed.
"""

from __future__ import annotations

import time

from conftest import App, ThreadWorker

FLAKY = (
    "'WITH t AS (SELECT nextval(''app.tries'') AS n),"
    " i AS (INSERT INTO app.effects SELECT n FROM t RETURNING n)"
    " SELECT n, 1 / (CASE WHEN n < {fail_until} THEN 0 ELSE 1 END) AS ok FROM i'"
)


def setup(app: App) -> None:
    app.conn.execute("CREATE SEQUENCE app.tries")
    app.conn.execute("CREATE TABLE app.effects (n bigint)")


def flaky(fail_until: int) -> str:
    """A step whose attempts fail (division by zero) until attempt number ``fail_until``."""
    return FLAKY.format(fail_until=fail_until)


def effects(app: App) -> list[int]:
    return [r[0] for r in app.conn.execute("SELECT n FROM app.effects ORDER BY n").fetchall()]


def tries(app: App) -> int:
    row = app.conn.execute(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM app.tries"
    ).fetchone()
    assert row is not None
    return int(row[0])


def node(app: App, instance: str, node_type: str) -> dict[str, object]:
    cur = app.conn.execute(
        "SELECT status, result, error FROM df.nodes WHERE instance_id = %s AND node_type = %s",
        (instance, node_type),
    )
    row = cur.fetchone()
    assert row is not None
    return {"status": row[0], "result": row[1], "error": row[2]}


DIVISION = "SQL execution failed: error returned from database: division by zero"


def test_a_retried_step_succeeds_and_commits_exactly_once(app: App, worker: ThreadWorker) -> None:
    setup(app)
    instance, status = app.run(f"df.retry({flaky(3)}, 5, 0.1, 0.2)")
    assert status == "completed"
    assert app.result(instance) == {"rows": [{"n": 3, "ok": 1}], "row_count": 1}
    assert tries(app) == 3
    assert effects(app) == [3]  # the two failed attempts were rolled back
    retry = node(app, instance, "RETRY")
    assert retry["status"] == "completed"
    assert retry["error"] == f"attempt 1: {DIVISION}\nattempt 2: {DIVISION}"


def test_retries_give_up_after_max_attempts_with_the_last_error(
    app: App, worker: ThreadWorker
) -> None:
    setup(app)
    instance, status = app.run(f"df.retry({flaky(99)}, 3, 0.1)")
    assert status == "failed"
    assert app.failure(instance) == DIVISION
    assert tries(app) == 3 and effects(app) == []
    assert node(app, instance, "RETRY")["error"] == "\n".join(
        f"attempt {i}: {DIVISION}" for i in (1, 2, 3)
    )


def test_retry_on_retries_only_the_listed_errors(app: App, worker: ThreadWorker) -> None:
    setup(app)
    # 22012 is division_by_zero: not a serialization failure, so not retried.
    instance, status = app.run(f"df.retry({flaky(3)}, 5, 0.1, 1, ARRAY['40001', '40P01'])")
    assert status == "failed" and tries(app) == 1
    assert node(app, instance, "RETRY")["error"] == f"attempt 1: {DIVISION}"
    instance, status = app.run(f"df.retry({flaky(3)}, 5, 0.1, 1, ARRAY['22'])")
    assert status == "completed" and tries(app) == 3


def test_backoff_waits_between_attempts(app: App, worker: ThreadWorker) -> None:
    setup(app)
    began = time.monotonic()
    _, status = app.run(f"df.retry({flaky(3)}, 3, 1, 1)")
    assert status == "completed"
    # Two waits of between 0.5 s and 1 s each ("equal jitter").
    assert time.monotonic() - began >= 1.0


def test_retry_composes_with_sequences_and_names(app: App, worker: ThreadWorker) -> None:
    setup(app)
    instance, status = app.run(
        f"'SELECT 5 AS five' |=> 'f' ~> (df.retry({flaky(2)} ~> 'SELECT $f + 1 AS six', 3, 0.1)"
        " |=> 'r') ~> 'SELECT $r.six AS again'"
    )
    assert status == "completed"
    assert app.result(instance) == {"rows": [{"again": 6}], "row_count": 1}
    assert effects(app) == [2]


def test_timeout_cancels_a_long_statement_and_rolls_it_back(app: App, worker: ThreadWorker) -> None:
    setup(app)
    began = time.monotonic()
    instance, status = app.run(
        "df.timeout('WITH i AS (INSERT INTO app.effects VALUES (1) RETURNING n)"
        " SELECT pg_sleep(60) FROM i', 1)"
    )
    elapsed = time.monotonic() - began
    assert status == "failed"
    assert app.failure(instance) == "Timed out after 1s (df.timeout)"
    assert 1.0 <= elapsed < 10
    assert effects(app) == []
    sql = node(app, instance, "SQL")
    assert sql["status"] == "failed"
    assert sql["result"] == "Cancelled: the enclosing df.timeout expired after 1s"
    # The statement was interrupted, not left running in its session.
    time.sleep(0.5)
    row = app.conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%'"
        " AND state = 'active' AND pid <> pg_backend_pid()"
    ).fetchone()
    assert row == (0,)


def test_timeout_of_a_wait_and_of_a_sleep(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("df.timeout(df.wait_for_signal('never'), 1)")
    assert status == "failed"
    assert app.failure(instance) == "Timed out after 1s (df.timeout)"
    instance, status = app.run("df.timeout(df.sleep(3600), 0.5) ~> 'SELECT 1'")
    assert (status, app.failure(instance)) == ("failed", "Timed out after 0.5s (df.timeout)")


def test_a_step_finishing_in_time_leaves_no_timer_behind(
    app: App, worker: ThreadWorker, conn: object
) -> None:
    instance, status = app.run("df.timeout('SELECT 1 AS one', 60) |=> 'x' ~> 'SELECT $x AS y'")
    assert status == "completed"
    assert app.result(instance) == {"rows": [{"y": 1}], "row_count": 1}
    left = conn.execute(  # type: ignore[attr-defined]
        "SELECT count(*) FROM df._tasks WHERE instance_id = %s", (instance,)
    ).fetchone()
    assert left == (0,)


def test_retrying_timed_out_attempts(app: App, worker: ThreadWorker) -> None:
    setup(app)
    # Attempts 1 and 2 hang and time out; attempt 3 is quick.
    step = "'SELECT pg_sleep(CASE WHEN nextval(''app.tries'') < 3 THEN 60 ELSE 0 END)'"
    instance, status = app.run(f"df.retry(df.timeout({step}, 0.5), 4, 0.1, 0.1, ARRAY['timeout'])")
    assert status == "completed"
    assert tries(app) == 3
    history = str(node(app, instance, "RETRY")["error"]).splitlines()
    assert history == [
        "attempt 1: Timed out after 0.5s (df.timeout)",
        "attempt 2: Timed out after 0.5s (df.timeout)",
    ]


def test_a_workflow_deadline_is_a_timeout_around_the_whole_graph(
    app: App, worker: ThreadWorker
) -> None:
    instance, status = app.run("df.timeout(@> ('SELECT 1' ~> df.sleep(1)), 2)")
    assert status == "failed"
    assert app.failure(instance) == "Timed out after 2s (df.timeout)"
    assert node(app, instance, "LOOP")["status"] == "failed"


def test_cancel_during_a_backoff_stops_the_retries(app: App, worker: ThreadWorker) -> None:
    setup(app)
    instance = app.start(f"df.retry({flaky(99)}, 5, 30, 30)")
    deadline = time.monotonic() + 15
    while tries(app) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    app.conn.execute("SELECT df.cancel(%s)", (instance,))
    assert app.wait(instance) == "cancelled"
    time.sleep(0.5)
    assert tries(app) == 1


def test_a_long_timeout_neither_breaks_nor_loosens_statement_limits(
    app: App, worker: ThreadWorker, conn: object
) -> None:
    # (Set first: pooled connections keep the settings they logged in with.)
    conn.execute(f"ALTER ROLE {app.role} SET statement_timeout = '500ms'")  # type: ignore[attr-defined]
    # 30 days is beyond statement_timeout's range in milliseconds: the backstop is capped.
    instance, status = app.run("df.timeout('SELECT 1 AS one', 2592000)")
    assert (status, app.result(instance)) == ("completed", {"rows": [{"one": 1}], "row_count": 1})
    # A centuries-long timeout is a timer a century away, not an error.
    _, status = app.run("df.timeout(df.sleep(0), 1e13)")
    assert status == "completed"
    # The role's own statement_timeout still applies inside a df.timeout.
    instance, status = app.run("df.timeout('SELECT pg_sleep(2)', 60)")
    assert status == "failed"
    assert "canceling statement due to statement timeout" in str(app.failure(instance))
