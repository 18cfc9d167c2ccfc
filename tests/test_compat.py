"""Other PostgreSQL versions: the schema installs and workflows run on every server found.

The embedded wheel is PostgreSQL 18; Debian's packages add others
(/usr/lib/postgresql/<version>/bin; CI installs postgresql-15). Each one found gets a
throw-away cluster, the schema installed by a non-superuser owner (as on managed
PostgreSQL) and by a superuser, and a workflow of every basic kind run by a worker.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import psycopg
import pytest
from conftest import ThreadWorker

from pgdurable import sql
from pgdurable.embedded import EmbeddedPostgres, free_port

SERVERS = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


@pytest.mark.skipif(
    not SERVERS, reason="no other PostgreSQL installed (apt-get install postgresql-15)"
)
@pytest.mark.parametrize("pg_ctl", SERVERS, ids=lambda p: f"pg{p.parent.parent.name}")
def test_install_and_run_workflows(pg_ctl: Path) -> None:
    data = Path(tempfile.mkdtemp(prefix="pgdurable-compat-")) / "data"
    pg = EmbeddedPostgres(data, free_port(), settings={"fsync": "off"}, bin_dir=pg_ctl.parent)
    pg.start()
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            version = admin.execute("SHOW server_version_num").fetchone()
            assert version is not None and int(version[0]) // 10000 == int(
                pg_ctl.parent.parent.name
            )
            admin.execute("CREATE ROLE owner_role LOGIN")
            admin.execute("CREATE DATABASE owned OWNER owner_role")
            admin.execute("CREATE ROLE app LOGIN")
        # As on managed PostgreSQL: installed by a non-superuser, twice (idempotent).
        with psycopg.connect(pg.dsn("owned", user="owner_role")) as c:
            assert sql.install(c)
            assert sql.install(c) == []
        # And by a superuser, where the operators go to pg_catalog.
        with psycopg.connect(pg.dsn()) as c:
            sql.install(c)
            c.execute("SELECT df.grant_usage('app')")
            c.execute("GRANT CREATE ON SCHEMA public TO app")
        worker = ThreadWorker(pg.dsn(), concurrency=4)
        try:
            with psycopg.connect(pg.dsn(user="app"), autocommit=True) as app:
                app.execute("CREATE TABLE t (x int)")
                row = app.execute(
                    "SELECT df.start("
                    "  'INSERT INTO t VALUES (1) RETURNING x' |=> 'a'"
                    "  ~> ('INSERT INTO t VALUES ($a.x + 1)' & df.sleep(1))"
                    "  ~> ('SELECT count(*) > 1 AS ok FROM t' ?> 'SELECT 1 AS r' !> 'SELECT 2')"
                    "  ~> @> (df.break('done')))"
                ).fetchone()
                assert row is not None
                done = app.execute("SELECT df.await_instance(%s, 30)", row).fetchone()
                assert done == ("completed",)
                assert app.execute("SELECT df.result(%s)", row).fetchone() == ('"done"',)
                assert app.execute("SELECT array_agg(x ORDER BY x) FROM t").fetchone() == ([1, 2],)
        finally:
            worker.stop()
    finally:
        pg.stop("immediate")
