"""Worker behaviour: wake-ups, single-role mode, schema version checks."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from conftest import App, ThreadWorker

from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres
from pgdurable.worker.loop import Worker, WorkerConfig, WorkerError, parse_interval


def test_notify_wakes_an_idle_worker(app: App, dsn: str) -> None:
    # With a 60 s poll, only NOTIFY can get this done within the 15 s await.
    w = ThreadWorker(dsn, concurrency=2, poll_interval=60.0)
    try:
        time.sleep(1)  # the worker is idle, waiting
        for _ in range(3):
            _, status = app.run("'SELECT 1' ~> 'SELECT 2'", timeout=15)
            assert status == "completed"
    finally:
        w.stop()


def test_poll_interval_setting_is_read_from_the_server(
    cluster: EmbeddedPostgres, dbname: str, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.poll_interval = '250ms'")
    w = ThreadWorker(cluster.dsn(dbname), concurrency=1)
    try:
        deadline = time.monotonic() + 10
        while w.worker.poll_interval != 0.25:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        w.stop()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(None, 0.1), ("100ms", 0.1), ("2s", 2.0), ("250", 0.25), ("1min", 60.0), ("junk", 0.1)],
)
def test_parse_interval(text: str | None, seconds: float) -> None:
    assert parse_interval(text, 0.1) == seconds


def test_worker_refuses_a_schema_older_than_itself(
    dsn: str, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    conn.execute("UPDATE df._schema SET release = '0.0.9', code_digest = 'older'")
    with pytest.raises(WorkerError, match=r"older than this pgdurable .*pgdurable install"):
        asyncio.run(Worker(WorkerConfig(dsn=dsn)).run())


def test_worker_refuses_functions_other_than_its_own_of_the_same_release(
    dsn: str, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    conn.execute("UPDATE df._schema SET code_digest = 'edited'")
    with pytest.raises(WorkerError, match=r"functions .* differ from those of this pgdurable"):
        asyncio.run(Worker(WorkerConfig(dsn=dsn)).run())


def test_single_role_mode_runs_only_its_own_roles_instances(
    cluster: EmbeddedPostgres, app: App
) -> None:
    """Managed PostgreSQL: a non-superuser owns the schema and is the only login the worker
    has; it runs its own workflows and refuses others'."""
    admin = psycopg.connect(cluster.dsn(), autocommit=True)
    admin.execute("CREATE ROLE owner_role LOGIN")
    admin.execute("CREATE DATABASE managed OWNER owner_role")
    try:
        owner_dsn = cluster.dsn("managed", user="owner_role")
        with psycopg.connect(owner_dsn) as c:
            schema.install(c)  # no superuser: the operators land in schema df
        other = f"other_{app.role}"
        admin.execute(f"CREATE ROLE {other} LOGIN")
        with psycopg.connect(owner_dsn, autocommit=True) as owner:
            owner.execute(f"SELECT df.grant_usage('{other}')")
            owner.execute("SET search_path = df, public")
            mine = owner.execute("SELECT df.start('SELECT current_user::text AS u')").fetchone()
            with psycopg.connect(cluster.dsn("managed", user=other), autocommit=True) as o:
                o.execute("SET search_path = df, public")
                theirs = o.execute("SELECT df.start('SELECT 1')").fetchone()
            assert mine and theirs
            w = ThreadWorker(owner_dsn, concurrency=2, single_role=True)
            try:
                assert owner.execute("SELECT df.await_instance(%s, 20)", mine).fetchone() == (
                    "completed",
                )
                row = owner.execute(
                    "SELECT status, output FROM df.instances JOIN df._runs ON instance_id = id"
                    " WHERE id = %s",
                    theirs,
                ).fetchone()
                deadline = time.monotonic() + 20
                while row is not None and row[0] not in ("completed", "failed"):
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                    row = owner.execute(
                        "SELECT status, output FROM df.instances JOIN df._runs"
                        " ON instance_id = id WHERE id = %s",
                        theirs,
                    ).fetchone()
            finally:
                w.stop()
            assert row is not None and row[0] == "failed"
            assert 'single-role mode as "owner_role"' in str(row[1])
            result = owner.execute("SELECT df.result(%s)", mine).fetchone()
            assert result == ('{"rows": [{"u": "owner_role"}], "row_count": 1}',)
    finally:
        admin.execute("DROP DATABASE IF EXISTS managed WITH (FORCE)")
        admin.execute(f"DROP ROLE IF EXISTS other_{app.role}")
        admin.execute("DROP ROLE IF EXISTS owner_role")
        admin.close()


def test_rows_of_long_dead_workers_are_swept(
    dsn: str, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    conn.execute(
        "INSERT INTO df._worker_epoch (epoch_id, last_seen_at)"
        " VALUES (gen_random_uuid(), now() - interval '1 hour'),"
        " (gen_random_uuid(), now() - interval '1 minute')"
    )
    w = ThreadWorker(dsn, concurrency=1)
    try:
        deadline = time.monotonic() + 10
        query = "SELECT count(*) FROM df._worker_epoch WHERE epoch_id = %s"
        while conn.execute(query, (w.worker.id,)).fetchone() != (1,):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rows = conn.execute(
            "SELECT count(*) FILTER (WHERE last_seen_at < now() - interval '5 minutes'),"
            " count(*) FROM df._worker_epoch"
        ).fetchone()
        assert rows == (0, 2)  # the recent one stays (it may be alive), plus ours
    finally:
        w.stop()
    assert conn.execute("SELECT count(*) FROM df._worker_epoch").fetchone() == (1,)


def test_completed_at_includes_the_last_steps_own_time(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("'SELECT pg_sleep(1)::text AS slept'")
    assert status == "completed"
    row = app.conn.execute(
        "SELECT completed_at - created_at >= interval '1 second' FROM df.instances WHERE id = %s",
        (instance,),
    ).fetchone()
    assert row == (True,)


def test_a_worker_never_runs_more_steps_than_its_concurrency(app: App, dsn: str) -> None:
    app.conn.execute("CREATE TABLE spans (a timestamptz, b timestamptz)")
    app.conn.execute(
        "CREATE FUNCTION span() RETURNS int LANGUAGE plpgsql AS $$"
        " DECLARE a timestamptz := clock_timestamp();"
        " BEGIN PERFORM pg_sleep(0.2); INSERT INTO spans VALUES (a, clock_timestamp());"
        " RETURN 1; END $$"
    )
    w = ThreadWorker(dsn, concurrency=3)
    try:
        branches = " & ".join(["'SELECT span()'"] * 8)
        ids = [app.start(f"({branches}) ~> 'SELECT span()'") for _ in range(4)]
        for instance in ids:
            assert app.wait(instance, 60) == "completed"
    finally:
        w.stop()
    row = app.conn.execute(
        "SELECT max((SELECT count(*) FROM spans o WHERE o.a <= s.a AND s.a < o.b)), count(*)"
        " FROM spans s"
    ).fetchone()
    assert row is not None
    overlap, total = row
    assert total == 36
    assert overlap == 3  # busy, but never more than --concurrency
