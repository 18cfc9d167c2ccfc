"""The installer: versioned, idempotent migrations."""

from __future__ import annotations

import psycopg
import pytest

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


def test_a_held_install_lock_is_reported_not_waited_for_forever(
    conn: psycopg.Connection[tuple[object, ...]], dsn: str
) -> None:
    """Any role can take an advisory lock; an install must name the holder and give up."""
    with psycopg.connect(dsn, autocommit=True) as holder:
        pid = holder.info.backend_pid
        holder.execute("SELECT pg_advisory_lock(%s)", (sql._INSTALL_LOCK,))
        with pytest.raises(psycopg.OperationalError, match=rf"backend pid {pid}\); gave up after"):
            sql._lock_installs(conn, timeout=0.3)
    sql._lock_installs(conn, timeout=0.3)
    conn.execute("SELECT pg_advisory_unlock(%s)", (sql._INSTALL_LOCK,))
