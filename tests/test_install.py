"""The installer: a fresh install, re-installs that change nothing, and databases it refuses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from catalog import differences, snapshot

from pgdurable import __version__, schema
from pgdurable.core.model import NODE_TYPES
from pgdurable.embedded import EmbeddedPostgres
from pgdurable.worker.loop import Worker, WorkerConfig, WorkerError


@pytest.fixture
def empty_db(cluster: EmbeddedPostgres) -> Iterator[str]:
    """A database without pgdurable; dropped afterwards."""
    name = f"install_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield name
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_install_is_idempotent(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    before = snapshot(conn)
    assert schema.install(conn) == []
    assert differences(snapshot(conn), before) == []
    assert schema.installed(conn) == schema.Installed(
        __version__, schema.latest_migration(), schema.code_digest()
    )


def test_a_fresh_install_creates_the_tables_and_the_functions(
    cluster: EmbeddedPostgres, empty_db: str
) -> None:
    with psycopg.connect(cluster.dsn(empty_db)) as c:
        assert schema.installed(c) is None
        assert schema.install(c) == ["tables.sql", f"functions of {__version__}"]
        assert schema.installed(c) == schema.Installed(
            __version__, schema.latest_migration(), schema.code_digest()
        )
        version = c.execute("SELECT df.version()").fetchone()
        assert version is not None and str(version[0]).startswith(f"{__version__} (built ")


def test_applying_the_functions_again_changes_nothing(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    """Every area file can run over itself: CREATE OR REPLACE, guarded operators, policies
    dropped and created, grants and revokes that are the same twice."""
    before = snapshot(conn)
    conn.execute("UPDATE df._schema SET code_digest = 'changed'")
    assert schema.install(conn) == [f"functions of {__version__}"]
    assert differences(snapshot(conn), before) == []


def test_a_pre_release_schema_is_refused_by_install_and_by_the_worker(
    cluster: EmbeddedPostgres, empty_db: str
) -> None:
    dsn = cluster.dsn(empty_db)
    with psycopg.connect(dsn, autocommit=True) as c:
        # What versions before 0.1.0 left: their own version table.
        c.execute("CREATE SCHEMA df")
        c.execute("CREATE TABLE df._migrations (version integer PRIMARY KEY, name text)")
        c.execute("INSERT INTO df._migrations VALUES (17, '0017_tenant_isolation.sql')")
        with pytest.raises(schema.SchemaError, match=r"pre-release version of pgdurable"):
            schema.install(c)
        # Nothing was changed: no half-upgrade.
        tables = c.execute(
            "SELECT array_agg(relname::text ORDER BY relname) FROM pg_class"
            " WHERE relnamespace = 'df'::regnamespace"
        ).fetchone()
        assert tables == (["_migrations", "_migrations_pkey"],)
    with pytest.raises(WorkerError, match=r"pre-release version of pgdurable.*Recreate"):
        asyncio.run(Worker(WorkerConfig(dsn=dsn)).run())


def test_a_schema_df_of_someone_else_is_refused(cluster: EmbeddedPostgres, empty_db: str) -> None:
    with psycopg.connect(cluster.dsn(empty_db), autocommit=True) as c:
        c.execute("CREATE SCHEMA df")
        c.execute("CREATE TABLE df.instances (id text)")
        with pytest.raises(schema.SchemaError, match=r'has a schema "df" that pgdurable did'):
            schema.install(c)


def test_an_empty_schema_df_is_installed_into(cluster: EmbeddedPostgres, empty_db: str) -> None:
    """An administrator may create schema df beforehand, to choose its owner."""
    with psycopg.connect(cluster.dsn(empty_db), autocommit=True) as c:
        c.execute("CREATE SCHEMA df")
        assert schema.install(c)[0] == "tables.sql"


def test_a_schema_newer_than_the_package_is_refused(
    conn: psycopg.Connection[tuple[object, ...]], dsn: str
) -> None:
    conn.execute("UPDATE df._schema SET release = '99.0.0', code_digest = 'newer'")
    with pytest.raises(WorkerError, match=r"release 99\.0\.0, newer than this pgdurable"):
        asyncio.run(Worker(WorkerConfig(dsn=dsn)).run())
    # install never downgrades the functions of a later release...
    with pytest.raises(schema.SchemaError, match=r"newer than this pgdurable.*upgrade pgdurable"):
        schema.install(conn)
    # ...nor runs over its tables.
    conn.execute("UPDATE df._schema SET release = %s, migration = 9999", (__version__,))
    with pytest.raises(schema.SchemaError, match=r"newer than this pgdurable.*upgrade pgdurable"):
        schema.install(conn)


def test_a_held_install_lock_is_reported_not_waited_for_forever(
    conn: psycopg.Connection[tuple[object, ...]], dsn: str
) -> None:
    """Any role can take an advisory lock; an install must name the holder and give up."""
    with psycopg.connect(dsn, autocommit=True) as holder:
        pid = holder.info.backend_pid
        holder.execute("SELECT pg_advisory_lock(%s)", (schema._INSTALL_LOCK,))
        with pytest.raises(psycopg.OperationalError, match=rf"backend pid {pid}\); gave up after"):
            schema._lock_installs(conn, timeout=0.3)
    schema._lock_installs(conn, timeout=0.3)
    conn.execute("SELECT pg_advisory_unlock(%s)", (schema._INSTALL_LOCK,))


def test_the_graph_foreign_keys_carry_pg_durables_names(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    """Catalog checks written for pg_durable look these up by name."""
    found = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conname LIKE '%same_instance_fkey' ORDER BY conname"
    ).fetchall()
    deferred = "DEFERRABLE INITIALLY DEFERRED"
    assert found == [
        (
            "instances_root_node_same_instance_fkey",
            f"FOREIGN KEY (id, root_node) REFERENCES df.nodes(instance_id, id) {deferred}",
        ),
        (
            "nodes_left_node_same_instance_fkey",
            f"FOREIGN KEY (instance_id, left_node) REFERENCES df.nodes(instance_id, id) {deferred}",
        ),
        (
            "nodes_right_node_same_instance_fkey",
            f"FOREIGN KEY (instance_id, right_node) REFERENCES df.nodes(instance_id, id)"
            f" {deferred}",
        ),
    ]


def test_the_node_types_are_one_list(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """SQL has one list (df._node_types(), which the check of new df.nodes rows uses), Python
    one."""
    assert conn.execute("SELECT df._node_types()").fetchone() == (list(NODE_TYPES),)
    for node_type in [*NODE_TYPES, "FOO"]:
        violation = conn.execute(
            "SELECT df._node_shape_violation('0123abcd', %s, 'q', NULL, NULL, NULL)", (node_type,)
        ).fetchone()
        assert (violation == ("nodes_type_chk",)) == (node_type not in NODE_TYPES), node_type


def test_an_upgrade_that_fails_changes_nothing(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    """CREATE OR REPLACE cannot change a function's return type: an older release whose
    function differs that way needs its drop in obsolete.sql. Without it the upgrade fails, as
    a whole: never half applied."""
    conn.execute("DROP FUNCTION df.version()")
    conn.execute("CREATE FUNCTION df.version() RETURNS integer LANGUAGE sql AS 'SELECT 1'")
    conn.execute("UPDATE df._schema SET release = '0.0.9', code_digest = 'older'")
    before = snapshot(conn)
    with pytest.raises(psycopg.errors.InvalidFunctionDefinition, match="return type"):
        schema.install(conn)
    assert differences(snapshot(conn), before) == []


def test_triggers_remain_only_where_users_write(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    """A checkpoint does its own bookkeeping: no trigger fires on the engine's own tables, and
    those on the users' tables guard identities, statuses and the shape of inserted nodes, or
    do the engine's part of df.start, df.cancel, df.restart and df.signal, which run as the
    user."""
    found = conn.execute(
        "SELECT tgrelid::regclass::text, array_agg(tgname::text ORDER BY tgname)"
        " FROM pg_trigger WHERE NOT tgisinternal"
        "  AND tgrelid::regclass::text LIKE 'df.%' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert found == [
        ("df._signals", ["signals_identity", "signals_owner", "signals_sent"]),
        (
            "df.instances",
            [
                "instances_cancelled",
                "instances_created",
                "instances_identity",
                "instances_owner",
                "instances_restarted",
                "instances_status",
            ],
        ),
        ("df.nodes", ["nodes_identity", "nodes_shape", "nodes_shape_changed"]),
        ("df.vars", ["vars_identity_delete", "vars_identity_insert", "vars_identity_update"]),
    ]
