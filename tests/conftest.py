"""Test fixtures: a real embedded PostgreSQL 18 cluster, one fresh database per test.

The cluster starts once per session. The schema is installed once into a template database;
each test gets its own copy (CREATE DATABASE ... TEMPLATE), so tests never see each other's
rows and cost ~50 ms of set-up each.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgdurable import sql
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
            sql.install(conn)
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
