"""Test fixtures: a real embedded PostgreSQL 18 cluster, one fresh database per test.

The cluster starts once per session. The schema is installed once into a template database;
each test gets its own copy (CREATE DATABASE ... TEMPLATE), so tests never see each other's
rows and cost ~50 ms of set-up each.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres, free_port

TEMPLATE = "pgdurable_template"
_counter = itertools.count()

# Speed only: fsync does not matter for a crash of PostgreSQL processes (the OS keeps the
# pages), and tests never pull the power.
TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@pytest.fixture(scope="session")
def cluster() -> Iterator[EmbeddedPostgres]:
    """The session's embedded PostgreSQL cluster."""
    base = Path(tempfile.mkdtemp(prefix="pgdurable-test-"))
    pg = EmbeddedPostgres(base / "data", free_port(), settings=TEST_SETTINGS)
    pg.start()
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        with psycopg.connect(pg.dsn(TEMPLATE)) as conn:
            schema.install(conn)
        yield pg
    finally:
        pg.stop("immediate" if os.environ.get("PGDURABLE_FAST_STOP") else "fast")


@pytest.fixture
def dbname(cluster: EmbeddedPostgres) -> Iterator[str]:
    """A fresh database with the pgdurable schema installed; dropped after the test."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield name
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def dsn(cluster: EmbeddedPostgres, dbname: str) -> str:
    """Superuser DSN of the test's fresh database."""
    return cluster.dsn(dbname)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit superuser connection to the test's database."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


class ThreadWorker:
    """A pgdurable worker running in a background thread of the test process."""

    def __init__(self, dsn: str, **options: object) -> None:
        import asyncio
        import threading

        from pgdurable.worker.loop import Worker, WorkerConfig

        self.worker = Worker(WorkerConfig(dsn=dsn, **options))  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.loop.run_until_complete(self.worker.run())
            except BaseException as exc:  # surfaced by stop()
                self.error = exc

        self.thread = threading.Thread(target=run, name="pgdurable-test-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.worker.request_stop)
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error:
            raise self.error


@pytest.fixture
def worker(dsn: str) -> Iterator[ThreadWorker]:
    """A worker (concurrency 4) on the test's database, stopped after the test."""
    w = ThreadWorker(dsn, concurrency=4)
    yield w
    w.stop()


class App:
    """A non-superuser LOGIN role with df usage, and a connection as it."""

    def __init__(self, cluster: EmbeddedPostgres, dbname: str, role: str):
        self.role = role
        self.dsn = cluster.dsn(dbname, user=role)
        self.conn = psycopg.connect(self.dsn, autocommit=True)

    def start(
        self, graph_sql: str, params: tuple[object, ...] = (), label: str | None = None
    ) -> str:
        """SELECT df.start(<graph_sql>, label) and return the id (params fill graph_sql's %s)."""
        row = self.conn.execute(f"SELECT df.start({graph_sql}, %s)", (*params, label)).fetchone()
        assert row is not None
        return str(row[0])

    def run(self, graph_sql: str, timeout: int = 30) -> tuple[str, str]:
        """Start a workflow and wait for it; returns (id, status)."""
        instance = self.start(graph_sql)
        return instance, self.wait(instance, timeout)

    def wait(self, instance: str, timeout: int = 30) -> str:
        row = self.conn.execute("SELECT df.await_instance(%s, %s)", (instance, timeout)).fetchone()
        assert row is not None
        return str(row[0])

    def result(self, instance: str) -> object:
        row = self.conn.execute("SELECT df.result(%s)::jsonb", (instance,)).fetchone()
        assert row is not None
        return row[0]

    def failure(self, instance: str) -> object:
        """The error a failed instance failed with (its root node's result)."""
        row = self.conn.execute(
            "SELECT n.result FROM df.instances i JOIN df.nodes n ON n.instance_id = i.id"
            " AND n.id = i.root_node WHERE i.id = %s AND n.status = 'failed'",
            (instance,),
        ).fetchone()
        assert row is not None, f"instance {instance} has not failed"
        return row[0]

    def nodes(self, instance: str) -> list[dict[str, object]]:
        from psycopg.rows import dict_row

        cur = self.conn.cursor(row_factory=dict_row)
        cur.execute(
            "SELECT id, node_type, status, result, status_details, query, result_name"
            " FROM df.nodes WHERE instance_id = %s",
            (instance,),
        )
        return cur.fetchall()


@pytest.fixture
def app(cluster: EmbeddedPostgres, dbname: str, conn: psycopg.Connection[tuple[object, ...]]):  # type: ignore[no-untyped-def]
    """A role ``app_<n>`` that may use pgdurable and owns schema ``app`` in the test database."""
    role = f"app_{os.getpid()}_{next(_counter)}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    conn.execute("SELECT df.grant_usage(%s)", (role,))
    conn.execute(f"CREATE SCHEMA app AUTHORIZATION {role}")
    conn.execute(f"ALTER ROLE {role} SET search_path = app, public")
    a = App(cluster, dbname, role)
    yield a
    a.conn.close()
    conn.execute(f"DROP OWNED BY {role} CASCADE")
    conn.execute(f"DROP ROLE {role}")


# -- roles for the SQL-level tests --------------------------------------------------------------


@pytest.fixture
def su(conn: psycopg.Connection[tuple[object, ...]]) -> psycopg.Connection[tuple[object, ...]]:
    """The superuser connection, allowed to start instances (in its own session only: a
    worker would still refuse them; these tests run none, or check that)."""
    conn.execute("SET pg_durable.enable_superuser_instances = on")
    return conn


@dataclass
class Role:
    """A LOGIN role and a connection logged in as it."""

    name: str
    conn: psycopg.Connection[tuple[object, ...]]


RoleFactory = Callable[..., Role]


def quote(identifier: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + identifier.replace('"', '""') + '"'


@pytest.fixture
def make_role(
    cluster: EmbeddedPostgres, dbname: str, conn: psycopg.Connection[tuple[object, ...]]
) -> Iterator[RoleFactory]:
    """Create LOGIN roles with unique names (granted df usage unless grant=False) and a
    connection as each; drop them and their privileges afterwards."""
    made: list[Role] = []

    def create(grant: bool = True, name: str | None = None) -> Role:
        name = name or f"pgd_role_{uuid.uuid4().hex[:10]}"
        conn.execute(f"CREATE ROLE {quote(name)} LOGIN")
        if grant:
            conn.execute("SELECT df.grant_usage(%s)", (name,))
        role = Role(name, psycopg.connect(cluster.dsn(dbname), user=name, autocommit=True))
        made.append(role)
        return role

    yield create
    for role in made:
        role.conn.close()
        conn.execute(f"DROP OWNED BY {quote(role.name)}")
        conn.execute(f"DROP ROLE {quote(role.name)}")
