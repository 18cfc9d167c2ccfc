"""The installer: versioned, idempotent migrations."""

from __future__ import annotations

import psycopg

from pgdurable import sql


def test_install_is_idempotent(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    assert sql.installed_version(conn) == sql.latest_version()
    assert sql.install(conn) == []
    assert sql.installed_version(conn) == sql.latest_version()


def test_fresh_install_applies_every_migration(cluster, dbname) -> None:  # type: ignore[no-untyped-def]
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute("CREATE DATABASE fresh_install")
    try:
        with psycopg.connect(cluster.dsn("fresh_install")) as c:
            assert sql.installed_version(c) is None
            applied = sql.install(c)
            assert applied == [m.name for m in sql.migrations()]
            count = c.execute("SELECT count(*) FROM df._migrations").fetchone()
            assert count == (len(applied),)
    finally:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute("DROP DATABASE fresh_install WITH (FORCE)")
