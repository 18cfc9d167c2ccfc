"""Cancellation of work in flight: df.cancel and RACE losers interrupt running statements."""

from __future__ import annotations

import time

import psycopg
import pytest
import test_attacks as attacks
from conftest import App, ThreadWorker
from test_attacks import Conn, TenantFactory, poll

tenants = attacks.tenants  # the fixture


def running_sleeps(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """Step statements of the workflow SQL connections that are executing pg_sleep now."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'pg_durable:worker:workflow-sql'"
        " AND state = 'active' AND query LIKE '%pg_sleep(60)%'"
    ).fetchone()
    assert row is not None
    return int(str(row[0]))


def wait_for(predicate, timeout: float = 10.0) -> float:  # type: ignore[no-untyped-def]
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, "condition not reached"
        time.sleep(0.05)
    return time.monotonic() - began


def test_cancel_interrupts_the_running_statement_and_rolls_it_back(
    app: App, dsn: str, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    app.conn.execute("CREATE TABLE touched (x int)")
    w = ThreadWorker(dsn, concurrency=1)
    try:
        instance = app.start(
            "'WITH i AS (INSERT INTO touched VALUES (1) RETURNING x)"
            " SELECT pg_sleep(60)::text AS s FROM i'"
        )
        wait_for(lambda: running_sleeps(conn) == 1)
        app.conn.execute("SELECT df.cancel(%s)", (instance,))
        assert app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone() == ("cancelled",)
        wait_for(lambda: running_sleeps(conn) == 0, timeout=5)
        # The worker's only slot is free again: the next workflow runs at once.
        _, status = app.run("'SELECT 1'", timeout=10)
        assert status == "completed"
    finally:
        w.stop()
    assert app.conn.execute("SELECT count(*) FROM touched").fetchone() == (0,)
    assert app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone() == ("cancelled",)


LOSER = "'WITH i AS (INSERT INTO loser VALUES (1) RETURNING x) SELECT pg_sleep(60)::text FROM i'"


@pytest.mark.parametrize(
    ("graph", "result"),
    [
        (f"{LOSER} | df.sleep(1)", {"slept": True, "seconds": 1}),  # deciding finishes it
        (f"({LOSER} | df.sleep(1)) ~> 'SELECT 2 AS n'", {"rows": [{"n": 2}], "row_count": 1}),
    ],
)
def test_race_loser_statement_is_interrupted(
    app: App,
    dsn: str,
    conn: psycopg.Connection[tuple[object, ...]],
    graph: str,
    result: dict[str, object],
) -> None:
    app.conn.execute("CREATE TABLE loser (x int)")
    w = ThreadWorker(dsn, concurrency=2)
    try:
        instance, status = app.run(graph, timeout=20)
        assert status == "completed"
        assert app.result(instance) == result
        wait_for(lambda: running_sleeps(conn) == 0, timeout=5)
    finally:
        w.stop()
    assert app.conn.execute("SELECT count(*) FROM loser").fetchone() == (0,)


def test_cancel_of_an_unknown_or_finished_instance_touches_nothing_running(
    app: App, worker: ThreadWorker, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    survivor = app.start("'SELECT pg_sleep(60)::text AS s'")
    wait_for(lambda: running_sleeps(conn) == 1)
    finished, status = app.run("'SELECT 1'")
    assert status == "completed"
    app.conn.execute("SELECT df.cancel(%s)", (finished,))
    time.sleep(1)
    assert running_sleeps(conn) == 1  # other instances' statements are left alone
    assert app.conn.execute("SELECT df.status(%s)", (finished,)).fetchone() == ("completed",)
    app.conn.execute("SELECT df.cancel(%s)", (survivor,))
    wait_for(lambda: running_sleeps(conn) == 0, timeout=5)


def _sleeping(conn: Conn) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
        " 'pg_durable:worker:workflow-sql' AND state = 'active' AND query LIKE '%pg_sleep(8)%'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_forged_cancel_notify_does_not_disable_cancellation(
    conn: Conn, tenants: TenantFactory, dsn: str
) -> None:
    victim = tenants()
    stranger = tenants(grant=False)  # CONNECT is enough to NOTIFY
    w = ThreadWorker(dsn, concurrency=2)
    stop_error: BaseException | None = None
    try:
        time.sleep(1.0)  # listener up
        stranger.conn.execute("SELECT pg_notify('pgdurable_cancel', 'deadbeef:\u00b2')")
        time.sleep(0.5)
        instance = victim.start("%s", ("SELECT pg_sleep(8)::text AS s",))
        poll(lambda: _sleeping(conn) == 1, "the step")
        victim.value("SELECT df.cancel(%s)", (instance,))
        interrupted = True
        try:
            poll(lambda: _sleeping(conn) == 0, "the cancel to interrupt the step", timeout=4)
        except AssertionError:
            interrupted = False
    finally:
        try:
            w.stop()
        except BaseException as exc:
            stop_error = exc
    assert (interrupted, repr(stop_error)) == (True, "None")
