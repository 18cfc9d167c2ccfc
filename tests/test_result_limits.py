"""pg_durable.max_result_bytes: the most a worker loads of one step's result, of a statement
after substitution, and of a signal's payload. Real PostgreSQL, real workers.

The limit is set small with ALTER DATABASE (a worker reads it on its own session when it
starts), so that these tests stay fast.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from conftest import App, ThreadWorker

from pgdurable.worker.results import parse_size

Conn = psycopg.Connection[tuple[object, ...]]

LIMIT = 64 * 1024
TOO_LARGE = f"SQL step result too large: more than {LIMIT} bytes (pg_durable.max_result_bytes)"


@pytest.fixture
def small_limit_worker(conn: Conn, dsn: str, dbname: str) -> Iterator[ThreadWorker]:
    """A worker started after pg_durable.max_result_bytes was set to 64 kB for the database."""
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.max_result_bytes = '64kB'")
    w = ThreadWorker(dsn, concurrency=4)
    yield w
    w.stop()


def test_a_result_past_the_limit_fails_the_step_and_the_worker_goes_on(
    app: App, small_limit_worker: ThreadWorker
) -> None:
    app.conn.execute("CREATE SEQUENCE app.produced")
    # 100,000 rows of 1 kB: 100 MB. Each row the server produces draws a number, so the
    # sequence shows how far it got: the worker must stop reading (and the server producing)
    # soon after 64 kB, not load everything and then refuse it.
    big, status = app.run(
        "'SELECT repeat(''x'', 1000) AS v, nextval(''app.produced'') AS n"
        " FROM generate_series(1, 100000)'",
        timeout=60,
    )
    assert status == "failed"
    assert app.failure(big) == TOO_LARGE
    (produced,) = app.conn.execute("SELECT last_value FROM app.produced").fetchone()  # type: ignore[misc]
    assert produced < 50_000, f"the server produced {produced} rows: they were read"
    # The worker is free and its step connections work: the next instances complete.
    for _ in range(3):
        small, status = app.run("'SELECT 1 AS one'")
        assert status == "completed"
        assert app.result(small) == {"rows": [{"one": 1}], "row_count": 1}


def test_a_result_just_under_the_limit_is_recorded(
    app: App, small_limit_worker: ThreadWorker
) -> None:
    # {"rows":[{"v":"x..."}],"row_count":1} is 33 bytes besides the value.
    fits, status = app.run(f"'SELECT repeat(''x'', {LIMIT - 33}) AS v'")
    assert status == "completed"
    assert len(app.result(fits)["rows"][0]["v"]) == LIMIT - 33  # type: ignore[index]
    over, status = app.run(f"'SELECT repeat(''x'', {LIMIT - 32}) AS v'")
    assert status == "failed"
    assert app.failure(over) == TOO_LARGE


def test_the_limit_holds_outside_a_transaction_block_too(
    app: App, small_limit_worker: ThreadWorker
) -> None:
    # A procedure that COMMITs runs outside the step's transaction (SQLSTATE 2D000 first).
    app.conn.execute(
        "CREATE PROCEDURE app.big(INOUT v text DEFAULT NULL) LANGUAGE plpgsql AS"
        " $$ BEGIN COMMIT; v := repeat('x', 100000); END $$"
    )
    instance, status = app.run("'CALL app.big()'")
    assert status == "failed"
    assert app.failure(instance) == TOO_LARGE


def test_cancel_of_an_instance_with_a_big_result_does_not_block(
    app: App, small_limit_worker: ThreadWorker, conn: Conn
) -> None:
    # 500 MB of result. Without a limit the statement ends, df._checkpoint_begin locks the
    # instance, and the worker holds that lock while it loads everything: a df.cancel then
    # waits for it. Cancel at that moment (or once the step is over, as it should be soon).
    instance = app.start("'SELECT repeat(''x'', 1000) AS v FROM generate_series(1, 500000)'")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        (holding,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
            " AND application_name = 'pg_durable:worker:workflow-sql'"
            " AND query LIKE '%%_checkpoint_begin%%'"
        ).fetchone()  # type: ignore[misc]
        (status,) = app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone()  # type: ignore[misc]
        if holding or status not in ("pending", "running"):
            break
        time.sleep(0.005)
    app.conn.execute("SET statement_timeout = '3s'")
    started = time.monotonic()
    (answer,) = app.conn.execute("SELECT df.cancel(%s)", (instance,)).fetchone()  # type: ignore[misc]
    assert time.monotonic() - started < 3
    assert not str(answer).startswith("Failed to cancel"), answer
    assert app.wait(instance) in ("cancelled", "failed")
    _, status = app.run("'SELECT 2 AS two'")
    assert status == "completed"


def test_a_statement_past_the_limit_after_substitution_fails_before_it_runs(
    app: App, small_limit_worker: ThreadWorker
) -> None:
    app.conn.execute("CREATE TABLE app.effects (n int)")
    # A 40 kB result is fine; substituted three times, the statement is not.
    instance, status = app.run(
        "'SELECT repeat(''y'', 40000) AS v' |=> 'big'"
        " ~> 'INSERT INTO app.effects SELECT 1 WHERE length($big.v || $big.v || $big.v) > 0'"
    )
    assert status == "failed"
    assert app.failure(instance) == (
        f"SQL step statement too large after substitution: more than {LIMIT} bytes"
        " (pg_durable.max_result_bytes)"
    )
    assert app.conn.execute("SELECT count(*) FROM app.effects").fetchone() == (0,)
    _, status = app.run("'SELECT repeat(''y'', 1000) AS v' |=> 'small' ~> 'SELECT $small.v AS v'")
    assert status == "completed"


def test_a_signal_payload_past_the_limit_fails_the_wait(
    app: App, small_limit_worker: ThreadWorker
) -> None:
    waiting = app.start("df.wait_for_signal('go', 30)")
    big = '{"blob": "' + "z" * (LIMIT + 1) + '"}'
    # The sender's session may raise the setting: only the worker's value counts.
    app.conn.execute("SET pg_durable.max_result_bytes = '1GB'")
    app.conn.execute("SELECT df.signal(%s, 'go', %s)", (waiting, big))
    assert app.wait(waiting) == "failed"
    failure = str(app.failure(waiting))
    assert failure.startswith("Signal 'go' data too large: ")
    assert failure.endswith(f"bytes, more than {LIMIT} bytes (pg_durable.max_result_bytes)")
    # A payload under the limit is delivered as before.
    fine = app.start("df.wait_for_signal('go', 30)")
    app.conn.execute("SELECT df.signal(%s, 'go', %s)", (fine, '{"small": 1}'))
    assert app.wait(fine) == "completed"
    assert app.result(fine) == {"signal_name": "go", "timed_out": False, "data": {"small": 1}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, 10 * 1024 * 1024),
        ("65536", 65536),
        ("64kB", 65536),
        ("10MB", 10 * 1024 * 1024),
        ("1GB", 1024**3),
        ("0", 10 * 1024 * 1024),
        ("lots", 10 * 1024 * 1024),
        ("-5", 10 * 1024 * 1024),
    ],
)
def test_parse_size(text: str | None, expected: int) -> None:
    assert parse_size(text) == expected


# -- pg_durable.max_state_bytes: what a worker holds for one instance ---------------------------

STATE_LIMIT = 1024 * 1024
STATE_TOO_LARGE = (
    f"the instance's state would be larger than {STATE_LIMIT} bytes (pg_durable.max_state_bytes):"
    " it holds too many or too large results"
)


@pytest.fixture
def small_state_worker(conn: Conn, dsn: str, dbname: str) -> Iterator[ThreadWorker]:
    """A worker started after pg_durable.max_state_bytes was set to 1 MB for the database."""
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.max_state_bytes = '1MB'")
    w = ThreadWorker(dsn, concurrency=4)
    yield w
    w.stop()


def balanced_join(items: list[str]) -> str:
    """A JOIN of all ``items`` (a chain of them would be deeper than df.start allows)."""
    if len(items) == 1:
        return items[0]
    half = len(items) // 2
    return f"({balanced_join(items[:half])} & {balanced_join(items[half:])})"


def output_of(conn: Conn, instance: str) -> str:
    row = conn.execute("SELECT output FROM df._runs WHERE instance_id = %s", (instance,)).fetchone()
    assert row is not None
    return str(row[0])


def test_join_results_piling_up_past_the_state_limit_fail_the_instance(
    app: App, conn: Conn, small_state_worker: ThreadWorker
) -> None:
    # Each branch's result is well under the result limit; the JOINs hold them all.
    branch = "'SELECT repeat(''x'', 100000) AS v'"
    instance = app.start(balanced_join([branch] * 40))
    assert app.wait(instance, 60) == "failed"
    assert output_of(conn, instance) == f"Instance {instance}: {STATE_TOO_LARGE}"
    (biggest,) = conn.execute(  # type: ignore[misc]
        "SELECT greatest(max(octet_length(n.result::text)), max(octet_length(r.state::text)))"
        "  FROM df.nodes n JOIN df._runs r ON r.instance_id = n.instance_id"
        " WHERE n.instance_id = %s",
        (instance,),
    ).fetchone()
    assert biggest <= STATE_LIMIT
    # The worker goes on with other work.
    _, status = app.run("'SELECT 1 AS one'")
    assert status == "completed"


def test_variables_past_the_state_limit_fail_the_instance_at_start(
    app: App, conn: Conn, small_state_worker: ThreadWorker
) -> None:
    app.conn.execute("SELECT df.setvar('blob', repeat('v', 2 * 1024 * 1024))")
    instance, status = app.run("'SELECT 1 AS one'")
    assert status == "failed"
    assert output_of(conn, instance) == (
        f"Instance {instance}: its variables (df.vars) are larger than {STATE_LIMIT} bytes"
        " (pg_durable.max_state_bytes)"
    )


def test_a_graph_past_the_state_limit_fails_at_start(
    app: App, conn: Conn, small_state_worker: ThreadWorker
) -> None:
    huge = "SELECT 1 AS one -- " + "c" * (2 * 1024 * 1024)
    instance = app.start("%s::text ~> 'SELECT 2 AS two'", (huge,))
    assert app.wait(instance) == "failed"
    assert output_of(conn, instance) == (
        f"Instance {instance}: its graph's texts are larger than {STATE_LIMIT} bytes"
        " (pg_durable.max_state_bytes)"
    )
