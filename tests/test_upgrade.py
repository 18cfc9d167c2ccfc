"""Upgrades reach exactly what a fresh install creates.

tests/schema/pgdurable-<release>.sql is, for each release, the script a fresh install of it ran,
frozen when the release was made (scripts/freeze_schema.py). Each is installed into a database
of its own, with a tenant granted usage, and upgraded by the current code: the whole catalog
of pgdurable's schemas (tests/catalog.py: every object, its definition, owner, privileges,
policies and comments) must then equal a fresh install's. Every later schema change runs this.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from catalog import Snapshot, differences, snapshot

from pgdurable import __version__, schema
from pgdurable.embedded import EmbeddedPostgres

RELEASES = sorted(Path(__file__).parent.joinpath("schema").glob("pgdurable-*.sql"))
TENANT = "upgrade_tenant"

MakeDb = Callable[[], str]


@pytest.fixture
def make_db(cluster: EmbeddedPostgres) -> Iterator[MakeDb]:
    """Empty databases, dropped afterwards; and the tenant role they all grant usage to."""
    made: list[str] = []
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (TENANT,)).fetchone():
            admin.execute(f"CREATE ROLE {TENANT} LOGIN")

        def make() -> str:
            name = f"upgrade_{uuid.uuid4().hex[:10]}"
            admin.execute(f"CREATE DATABASE {name}")
            made.append(name)
            return name

        yield make
        for name in made:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def fresh_install(cluster: EmbeddedPostgres, make_db: MakeDb) -> Snapshot:
    with psycopg.connect(cluster.dsn(make_db()), autocommit=True) as c:
        schema.install(c)
        c.execute("SELECT df.grant_usage(%s, include_http => true)", (TENANT,))
        return snapshot(c)


def test_releases_are_frozen() -> None:
    assert RELEASES, "no frozen release schema in tests/schema"
    # The release being worked on is frozen once it is made; until then it is what a fresh
    # install runs.
    current = Path(__file__).parent / "schema" / f"pgdurable-{__version__}.sql"
    if current.exists():
        frozen = current.read_text("utf-8")
        assert frozen.split("\n", 1)[1] == schema.fresh_install_script()


@pytest.mark.parametrize("dump", RELEASES, ids=lambda p: p.stem)
def test_an_upgraded_release_equals_a_fresh_install(
    cluster: EmbeddedPostgres, make_db: MakeDb, dump: Path
) -> None:
    with psycopg.connect(cluster.dsn(make_db()), autocommit=True) as c:
        c.execute(dump.read_text("utf-8").encode())
        c.execute("SELECT df.grant_usage(%s, include_http => true)", (TENANT,))
        schema.install(c)
        upgraded = snapshot(c)
    assert differences(upgraded, fresh_install(cluster, make_db)) == []


def test_the_functions_are_applied_again_whatever_became_of_them(
    cluster: EmbeddedPostgres, make_db: MakeDb
) -> None:
    """What the area files define is theirs: an upgrade restores it all, from any state."""
    with psycopg.connect(cluster.dsn(make_db()), autocommit=True) as c:
        schema.install(c)
        c.execute("SELECT df.grant_usage(%s, include_http => true)", (TENANT,))
        c.execute("DROP FUNCTION df.explain(text)")
        c.execute(
            "CREATE OR REPLACE FUNCTION df.status(instance_id text) RETURNS text"
            " LANGUAGE sql AS $$ SELECT 'tampered' $$"
        )
        c.execute("DROP TRIGGER instances_cancelled ON df.instances")
        c.execute("DROP POLICY runs_user_isolation ON df._runs")
        c.execute(
            "GRANT EXECUTE ON FUNCTION df._claim(uuid, integer, double precision,"
            " integer, oid[], integer[], text[]) TO PUBLIC"
        )
        c.execute("ALTER FUNCTION df._checkpoint_begin(bigint, uuid) RESET lock_timeout")
        c.execute("UPDATE df._schema SET code_digest = 'an older release'")
        assert schema.install(c) == [f"functions of {__version__}"]
        restored = snapshot(c)
    assert differences(restored, fresh_install(cluster, make_db)) == []
