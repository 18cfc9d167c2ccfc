"""The ``database`` argument of df.start, end to end: SQL steps run in that database of the
cluster (where the df schema is not), logged in as the submitter; a database that is missing
at start, dropped mid-run or closed to the role fails cleanly; and the worker keeps no idle
session there that would make a plain DROP DATABASE fail."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import TEMPLATE, App, ThreadWorker
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgdurable.embedded import EmbeddedPostgres

Conn = psycopg.Connection[tuple[Any, ...]]
_names = itertools.count()


def wait_until(predicate: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


class Other:
    """A second database of the cluster, without the df schema."""

    def __init__(self, cluster: EmbeddedPostgres, name: str):
        self.name = name
        self.dsn = make_conninfo(cluster.dsn(), dbname=name)
        self.ident = sql.Identifier(name)

    def connect(self) -> Conn:
        """A superuser connection to it (close it before dropping the database)."""
        return psycopg.connect(self.dsn, autocommit=True)


def create_database(conn: Conn, cluster: EmbeddedPostgres, name: str) -> Other:
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return Other(cluster, name)


def drop_database(conn: Conn, name: str) -> None:
    """A plain DROP DATABASE: it waits up to 5 s for other sessions to leave, then fails."""
    conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))


@pytest.fixture
def other(cluster: EmbeddedPostgres, dbname: str, conn: Conn, app: App) -> Iterator[Other]:
    """Database ``<dbname>_o<n>`` with a table ``public.items`` the ``app`` role may use.

    Depends on ``app`` so that it is dropped first: the grants in it would stop DROP ROLE.
    """
    db = create_database(conn, cluster, f"{dbname}_o{next(_names)}")
    with db.connect() as c:
        c.execute("CREATE TABLE public.items (id int PRIMARY KEY, note text)")
        c.execute(
            "CREATE TABLE public.once (id int,"
            " CONSTRAINT once_id UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)"
        )
        c.execute("INSERT INTO public.once VALUES (1)")
        c.execute("CREATE TABLE public.secret (s text)")
        c.execute(f"GRANT SELECT, INSERT ON public.items, public.once TO {app.role}")
    yield db
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db.ident))


def start_in(app: App, database: str, graph_sql: str, params: tuple[object, ...] = ()) -> str:
    """df.start(<graph_sql>, NULL, database) as the app role."""
    row = app.conn.execute(
        f"SELECT df.start({graph_sql}, NULL, %s)", (*params, database)
    ).fetchone()
    assert row is not None
    return str(row[0])


def run_in(app: App, database: str, graph_sql: str) -> tuple[str, str]:
    instance = start_in(app, database, graph_sql)
    return instance, app.wait(instance)


def rows(app: App, instance: str) -> list[dict[str, object]]:
    result = app.result(instance)
    assert isinstance(result, dict), app.nodes(instance)
    found = result["rows"]
    assert isinstance(found, list)
    return found


def results_by_query(app: App, instance: str) -> dict[object, object]:
    return {n["query"]: n["result"] for n in app.nodes(instance) if n["node_type"] == "SQL"}


def sessions(conn: Conn, database: str) -> list[tuple[int, str]]:
    """(pid, state) of the worker's step sessions in ``database``."""
    return conn.execute(
        "SELECT pid, state FROM pg_stat_activity WHERE datname = %s"
        " AND application_name = 'pg_durable:worker:workflow-sql'",
        (database,),
    ).fetchall()


def pooled_databases(worker: ThreadWorker) -> set[str | None]:
    """The databases the worker keeps step pools for (read on the worker's own loop)."""

    async def keys() -> set[str | None]:
        return {key[-1] for key in worker.worker.conns._steps}

    return asyncio.run_coroutine_threadsafe(keys(), worker.loop).result(timeout=5)


def connect_error(database: str, role: str, detail: str) -> str:
    return f"Failed to connect to database '{database}' as '{role}'. Error: {detail}"


# -- steps run in the other database -------------------------------------------------------------


def test_steps_run_in_the_other_database(
    app: App, worker: ThreadWorker, other: Other, conn: Conn
) -> None:
    app.conn.execute("SELECT df.setvar('who', 'tester')")
    who = (
        "SELECT current_database()::text AS db, current_user::text AS cu,"
        " session_user::text AS su, current_setting(''df.in_workflow'') AS in_wf,"
        " to_regnamespace(''df'') IS NULL AS no_df"
    )
    instance, status = run_in(
        app,
        other.name,
        f"'{who}' |=> 'w'"
        " ~> 'INSERT INTO public.items VALUES (1, $w.db || '':{who}:{sys_instance_id}'')"
        " RETURNING id, note' |=> 'ins'"
        " ~> ('SELECT count(*) AS n FROM public.items' & 'SELECT $ins.note AS note')"
        " ~> 'SELECT $ins.id + 1 AS next, (SELECT note FROM public.items) AS stored'",
    )
    assert status == "completed", app.nodes(instance)
    assert rows(app, instance) == [{"next": 2, "stored": f"{other.name}:tester:{instance}"}]
    by_query = results_by_query(app, instance)
    who_rows = by_query[who.replace("''", "'")]
    assert who_rows == {
        "rows": [
            {"db": other.name, "cu": app.role, "su": app.role, "in_wf": "true", "no_df": True}
        ],
        "row_count": 1,
    }
    join = [n for n in app.nodes(instance) if n["node_type"] == "JOIN"]
    assert join[0]["status"] == "completed"
    # The effect is in the other database, exactly once; nothing went to the main one.
    with other.connect() as c:
        assert c.execute("SELECT id, note FROM public.items").fetchall() == [
            (1, f"{other.name}:tester:{instance}")
        ]
    assert conn.execute("SELECT to_regclass('public.items')").fetchone() == (None,)
    assert conn.execute(
        "SELECT count(*) FROM df._tasks WHERE instance_id = %s", (instance,)
    ).fetchone() == (0,)


def test_naming_the_worker_database_is_the_same_as_none(
    app: App, worker: ThreadWorker, dbname: str
) -> None:
    instance, status = run_in(
        app,
        dbname,
        "'SELECT current_database()::text AS db, to_regnamespace(''df'') IS NOT NULL AS df'",
    )
    assert status == "completed", app.nodes(instance)
    assert rows(app, instance) == [{"db": dbname, "df": True}]
    assert pooled_databases(worker) == {None}


def test_failures_in_the_other_database(app: App, worker: ThreadWorker, other: Other) -> None:
    instance, status = run_in(app, other.name, "'SELECT * FROM no_such_table'")
    assert status == "failed"
    assert app.failure(instance) == (
        "SQL execution failed: error returned from database:"
        ' relation "no_such_table" does not exist'
    )
    instance, status = run_in(app, other.name, "'SELECT s FROM public.secret'")
    assert status == "failed"
    assert "permission denied for table secret" in str(app.failure(instance))
    # An error at COMMIT (a deferred constraint) fails the step and leaves nothing behind.
    instance, status = run_in(
        app,
        other.name,
        "'INSERT INTO public.items VALUES (7)' ~> 'INSERT INTO public.once VALUES (1)'",
    )
    assert status == "failed"
    assert "once_id" in str(app.failure(instance))
    with other.connect() as c:
        assert c.execute("SELECT id FROM public.items").fetchall() == [(7,)]
        assert c.execute("SELECT count(*) FROM public.once").fetchone() == (1,)


def test_statement_outside_a_transaction_in_the_other_database(
    app: App, worker: ThreadWorker, other: Other
) -> None:
    with other.connect() as c:
        c.execute(f"ALTER TABLE public.items OWNER TO {app.role}")
        c.execute(f"GRANT CREATE ON SCHEMA public TO {app.role}")
    instance, status = run_in(
        app,
        other.name,
        "'CREATE INDEX CONCURRENTLY items_note ON public.items (note)'"
        " ~> 'SELECT count(*) AS n FROM pg_indexes WHERE indexname = ''items_note'''",
    )
    assert status == "completed", app.nodes(instance)
    assert rows(app, instance) == [{"n": 1}]


# -- which databases are accepted ----------------------------------------------------------------


def test_unknown_database_is_rejected_at_start(app: App, worker: ThreadWorker) -> None:
    for name in ("no_such_db", 'My "missing" DB'):
        with pytest.raises(psycopg.Error) as raised:
            start_in(app, name, "'SELECT 1'")
        assert raised.value.diag.message_primary == f'database "{name}" does not exist'
    assert app.conn.execute("SELECT count(*) FROM df.instances").fetchone() == (0,)


def test_database_names_that_need_quoting(
    app: App, worker: ThreadWorker, conn: Conn, cluster: EmbeddedPostgres, dbname: str
) -> None:
    for name in (f'My "DB" {dbname}', f"odd 'db' ñ 😀 {dbname}", f"sp ace={dbname}"):
        db = create_database(conn, cluster, name)
        try:
            instance, status = run_in(
                app, name, "'SELECT current_database()::text AS db, current_user::text AS cu'"
            )
            assert status == "completed", app.nodes(instance)
            assert rows(app, instance) == [{"db": name, "cu": app.role}]
            drop_database(conn, name)  # right away: nothing of the worker's is left in it
        finally:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db.ident))


# -- connections to the other database -----------------------------------------------------------


def test_plain_drop_database_succeeds_right_after_an_instance(
    app: App, worker: ThreadWorker, other: Other, conn: Conn
) -> None:
    # Back-to-back steps share one connection; it is closed soon after the last one.
    instance, status = run_in(
        app,
        other.name,
        "'SELECT pg_backend_pid() AS pid' |=> 'first'"
        " ~> 'SELECT pg_backend_pid() = $first AS same, $first AS pid'",
    )
    assert status == "completed", app.nodes(instance)
    assert rows(app, instance)[0]["same"] is True
    drop_database(conn, other.name)
    assert conn.execute(
        "SELECT count(*) FROM pg_database WHERE datname = %s", (other.name,)
    ).fetchone() == (0,)
    wait_until(lambda: other.name not in pooled_databases(worker))


def test_own_database_connections_stay_pooled(
    app: App, worker: ThreadWorker, other: Other, conn: Conn, dbname: str
) -> None:
    own, status = app.run("'SELECT pg_backend_pid() AS pid'")
    assert status == "completed"
    _, status = run_in(app, other.name, "'SELECT pg_backend_pid() AS pid'")
    assert status == "completed"
    own_pid = rows(app, own)[0]["pid"]
    assert sessions(conn, dbname) == [(own_pid, "idle")]
    # Once the other database's connection is gone, the own one is still there, and reused.
    wait_until(lambda: not sessions(conn, other.name))
    assert sessions(conn, dbname) == [(own_pid, "idle")]
    again, status = app.run("'SELECT pg_backend_pid() AS pid'")
    assert status == "completed"
    assert rows(app, again)[0]["pid"] == own_pid


def test_statement_in_flight_delays_the_drop_until_it_ends(
    app: App, worker: ThreadWorker, other: Other, conn: Conn
) -> None:
    instance = start_in(app, other.name, "'SELECT ''done'' AS slept FROM pg_sleep(1)'")
    wait_until(lambda: "active" in {state for _, state in sessions(conn, other.name)})
    # PostgreSQL's own rule: DROP waits for the statement, then for the session to close.
    drop_database(conn, other.name)
    assert app.wait(instance) == "completed"
    assert rows(app, instance) == [{"slept": "done"}]


def test_cancel_interrupts_and_rolls_back_a_statement_there(
    app: App, worker: ThreadWorker, other: Other, conn: Conn
) -> None:
    instance = start_in(
        app,
        other.name,
        "'WITH i AS (INSERT INTO public.items VALUES (9) RETURNING id)"
        " SELECT pg_sleep(60)::text AS s FROM i'",
    )
    wait_until(lambda: "active" in {state for _, state in sessions(conn, other.name)})
    app.conn.execute("SELECT df.cancel(%s)", (instance,))
    wait_until(lambda: "active" not in {state for _, state in sessions(conn, other.name)}, 5)
    assert app.wait(instance) == "cancelled"
    with other.connect() as c:
        assert c.execute("SELECT count(*) FROM public.items").fetchone() == (0,)
    drop_database(conn, other.name)  # its connection is gone soon after


# -- a database dropped while an instance runs ---------------------------------------------------


def assert_failed_cleanly(app: App, conn: Conn, instance: str, database: str) -> None:
    assert app.wait(instance) == "failed"
    assert app.failure(instance) == connect_error(
        database, app.role, f'database "{database}" does not exist'
    )
    assert conn.execute(
        "SELECT count(*) FROM df._tasks WHERE instance_id = %s", (instance,)
    ).fetchone() == (0,)
    running = [n for n in app.nodes(instance) if n["status"] == "running"]
    assert running == []


def test_database_dropped_while_waiting_for_a_signal(
    app: App, worker: ThreadWorker, other: Other, conn: Conn
) -> None:
    instance = start_in(
        app,
        other.name,
        "df.wait_for_signal('go') ~> 'SELECT 2 AS two'",
    )
    wait_until(
        lambda: any(
            n["node_type"] == "SIGNAL" and n["status"] == "running" for n in app.nodes(instance)
        )
    )
    drop_database(conn, other.name)
    app.conn.execute("SELECT df.signal(%s, 'go')", (instance,))
    assert_failed_cleanly(app, conn, instance, other.name)
    wait_until(lambda: other.name not in pooled_databases(worker))
    _, status = app.run("'SELECT 1 AS one'")  # the worker goes on
    assert status == "completed"


def test_database_dropped_during_a_sleep(
    app: App, worker: ThreadWorker, other: Other, conn: Conn, cluster: EmbeddedPostgres
) -> None:
    # The first step's connection must be gone before the DROP gives up waiting for it.
    instance = start_in(app, other.name, "'SELECT 1' ~> df.sleep(2) ~> 'SELECT 2'")
    wait_until(
        lambda: any(
            n["node_type"] == "SLEEP" and n["status"] == "running" for n in app.nodes(instance)
        )
    )
    drop_database(conn, other.name)
    assert_failed_cleanly(app, conn, instance, other.name)
    wait_until(lambda: other.name not in pooled_databases(worker))
    # The worker goes on: in its own database, and in a new database of the same name.
    _, status = app.run("'SELECT 1 AS one'")
    assert status == "completed"
    create_database(conn, cluster, other.name)
    again, status = run_in(app, other.name, "'SELECT current_database()::text AS db'")
    assert status == "completed", app.nodes(again)
    assert rows(app, again) == [{"db": other.name}]


# -- roles and databases -------------------------------------------------------------------------


def test_a_role_needs_connect_on_the_other_database(
    app: App, worker: ThreadWorker, other: Other, conn: Conn
) -> None:
    conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(other.ident))
    instance, status = run_in(app, other.name, "'SELECT 1 AS one'")
    assert status == "failed"
    error = str(app.failure(instance))
    assert error.startswith(
        connect_error(other.name, app.role, f'permission denied for database "{other.name}"')
    ), error
    _, status = app.run("'SELECT 1 AS one'")  # the worker goes on
    assert status == "completed"


def test_a_role_granted_connect_runs_there_as_itself(
    app: App, worker: ThreadWorker, other: Other, conn: Conn
) -> None:
    conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(other.ident))
    conn.execute(
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(other.ident, sql.Identifier(app.role))
    )
    instance, status = run_in(
        app,
        other.name,
        "'INSERT INTO public.items VALUES (1, current_user) RETURNING note'"
        " ~> 'SELECT note, session_user::text AS su FROM public.items'",
    )
    assert status == "completed", app.nodes(instance)
    assert rows(app, instance) == [{"note": app.role, "su": app.role}]


# -- the worker's own database -------------------------------------------------------------------


def test_worker_dsn_without_a_database(
    cluster: EmbeddedPostgres, conn: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq then logs the worker in to the database named after its user; steps of
    instances without a database must go there too, not to one named after their role."""
    monkeypatch.delenv("PGDATABASE", raising=False)
    name = f"wk_{next(_names)}_{os.getpid()}"
    role = f"{name}_app"
    conn.execute(f"CREATE ROLE {name} SUPERUSER LOGIN")
    conn.execute(f"CREATE ROLE {role} LOGIN")
    conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    try:
        with psycopg.connect(cluster.dsn(name), autocommit=True) as db:
            db.execute("SELECT df.grant_usage(%s)", (role,))
        worker = ThreadWorker(f"postgresql://{name}@127.0.0.1:{cluster.port}", concurrency=2)
        try:
            with psycopg.connect(cluster.dsn(name, user=role), autocommit=True) as c:
                row = c.execute(
                    "SELECT df.start('SELECT current_database()::text AS db')"
                ).fetchone()
                assert row is not None
                assert c.execute("SELECT df.await_instance(%s, 30)", row).fetchone() == (
                    "completed",
                )
                assert c.execute("SELECT df.result(%s)::jsonb", row).fetchone() == (
                    {"rows": [{"db": name}], "row_count": 1},
                )
        finally:
            worker.stop()
    finally:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"DROP ROLE IF EXISTS {name}")
