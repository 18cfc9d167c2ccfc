"""The SQL that pgdurable installs into PostgreSQL, and the installer that applies it.

The schema is written as its current design, in files named for their area:

- ``tables.sql``: every table, column, constraint and index. A fresh install runs it once.
- ``migrations/NNNN_what.sql``: the changes to tables since release 0.1.0, for databases an
  earlier release installed. A change to a table goes into tables.sql *and* a new migration;
  ``tests/test_upgrade.py`` checks that both paths reach the same catalog.
- ``obsolete.sql``: what a release removed, or changed in a way CREATE OR REPLACE cannot (a
  function's return type or parameter names, a dropped overload): dropped before the rest.
- The area files (:data:`AREAS`, in order): functions, triggers, operators, policies and
  grants, each defined once. Every install applies them again when they differ from what the
  database has (their digest is recorded), so changing a function needs no migration.

``df._schema`` records the release, the last migration applied and the digest. An install or
upgrade is one transaction, under an advisory lock so two installers never race.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from pgdurable import __version__

# pg_advisory_lock key for installs: ASCII "PGDI".
_INSTALL_LOCK = 0x50474449
_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

# In dependency order: a LANGUAGE sql function is checked against what exists when created.
AREAS = (
    "settings",
    "dsl",
    "http",
    "calls",
    "schedule",
    "signals",
    "start",
    "engine",
    "client",
    "monitoring",
    "explain",
    "retention",
    "security",
)


class SchemaError(Exception):
    """The database's schema cannot be installed or used by this version of pgdurable."""


@dataclass(frozen=True)
class Migration:
    """A numbered change to the tables, from ``migrations/``."""

    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class Installed:
    """What ``df._schema`` says of a database's pgdurable schema."""

    release: str
    migration: int
    code_digest: str


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text("utf-8")


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """The table migrations shipped with this version of pgdurable, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    return tuple(sorted(found, key=lambda m: m.version))


def latest_migration() -> int:
    """The number of the last table migration this package has (0: none since 0.1.0)."""
    found = migrations()
    return found[-1].version if found else 0


# Read once per process: the worker checks the digest at start, an install uses it thrice.
@functools.cache
def code() -> str:
    """The SQL every install applies: obsolete.sql, then the area files."""
    return "\n".join(_read(f"{name}.sql") for name in ("obsolete", *AREAS))


@functools.cache
def code_digest() -> str:
    """The digest of :func:`code`, recorded in df._schema by the install that applied it."""
    return hashlib.sha256(code().encode()).hexdigest()


def fresh_install_script() -> str:
    """Everything a fresh install of this release runs, as one script (tests freeze it)."""
    return "\n".join([_read("tables.sql"), _record(latest_migration()), code()])


def _record(migration: int) -> str:
    return (
        "INSERT INTO df._schema (release, migration, code_digest)"
        f" VALUES ('{__version__}', {migration}, '{code_digest()}');"
    )


# Whether schema df is pgdurable's (0.1.0 or later), a pre-release's, or somebody else's.
_PRESENCE = """
    SELECT to_regclass('df._schema') IS NOT NULL, to_regclass('df._migrations') IS NOT NULL,
           EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid)
           OR EXISTS (SELECT 1 FROM pg_proc p WHERE p.pronamespace = n.oid),
           current_database()
      FROM (SELECT (SELECT oid FROM pg_namespace WHERE nspname = 'df') AS oid) AS n
"""
_VERSION = "SELECT release, migration, code_digest FROM df._schema"


def installed(conn: psycopg.Connection[Any]) -> Installed | None:
    """The pgdurable schema of the connected database, or None if there is none.

    Raises SchemaError for a schema df that pgdurable 0.1.0 or later did not install.
    """
    presence = conn.execute(_PRESENCE).fetchone()
    version = conn.execute(_VERSION).fetchone() if presence and presence[0] else None
    return _judge(presence, version)


async def installed_async(conn: psycopg.AsyncConnection[Any]) -> Installed | None:
    """:func:`installed`, on an async connection."""
    presence = await (await conn.execute(_PRESENCE)).fetchone()
    version = None
    if presence and presence[0]:
        version = await (await conn.execute(_VERSION)).fetchone()
    return _judge(presence, version)


def _judge(presence: tuple[Any, ...] | None, version: tuple[Any, ...] | None) -> Installed | None:
    assert presence is not None
    current, prerelease, occupied, database = presence
    if prerelease:
        raise SchemaError(
            f'database "{database}" was installed by a pre-release version of pgdurable, which'
            f" {__version__} cannot upgrade. Recreate the database, or drop its pgdurable"
            " schemas (DROP SCHEMA df, _duroxide CASCADE) and install again."
        )
    if not current:
        if occupied:
            raise SchemaError(
                f'database "{database}" has a schema "df" that pgdurable did not install'
                " (pg_durable, the extension, uses the same name); install into another database"
            )
        return None
    if version is None:
        raise SchemaError(f'database "{database}": df._schema is empty; reinstall pgdurable')
    return Installed(*version)


def check(have: Installed | None, database: str) -> None:
    """Refuse a schema that is missing, older or newer than this package's."""
    if have is None:
        raise SchemaError(
            f'the pgdurable schema is not installed in database "{database}";'
            " run: pgdurable install --dsn <DSN>"
        )
    if have.migration == latest_migration() and have.code_digest == code_digest():
        return
    if _newer(have):
        raise SchemaError(
            f'the pgdurable schema in database "{database}" is from release {have.release},'
            f" newer than this pgdurable ({__version__}); upgrade pgdurable"
        )
    if (have.release, have.migration) == (__version__, latest_migration()):
        # The same release with other functions: a development build, or a tampered schema.
        raise SchemaError(
            f'the pgdurable functions in database "{database}" differ from those of this'
            f" pgdurable ({__version__}); run: pgdurable install --dsn <DSN>"
        )
    raise SchemaError(
        f'the pgdurable schema in database "{database}" is from release {have.release}, older'
        f" than this pgdurable ({__version__}); run: pgdurable install --dsn <DSN>"
    )


def _newer(have: Installed) -> bool:
    """Whether ``have`` comes from a later release than this package."""
    ours = (latest_migration(), _release_key(__version__))
    return (have.migration, _release_key(have.release)) > ours


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", release))


def _lock_installs(conn: psycopg.Connection[Any], timeout: float = 60) -> None:
    """Take the install lock, or say who holds it. Any role can take an advisory lock, so a
    session that never lets go must not make an install hang forever."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_INSTALL_LOCK,)).fetchone()
        if row and row[0]:
            return
        if time.monotonic() >= deadline:
            holders = conn.execute(
                "SELECT string_agg(l.pid::text, ', ') FROM pg_locks l, pg_database d"
                " WHERE l.locktype = 'advisory' AND l.classid = 0 AND l.objid = %s"
                "   AND l.objsubid = 1 AND l.database = d.oid AND d.datname = current_database()",
                (_INSTALL_LOCK,),
            ).fetchone()
            raise psycopg.OperationalError(
                f"another session holds pgdurable's install lock (advisory lock {_INSTALL_LOCK},"
                f" backend pid {holders[0] if holders else '?'}); gave up after {timeout:g} s"
            )
        time.sleep(0.2)


def install(conn: psycopg.Connection[Any]) -> list[str]:
    """Install or upgrade pgdurable's schema; returns what was applied (empty if up to date).

    A fresh install runs tables.sql, an upgrade the missing migrations; both then apply the
    area files if they changed, and an upgrade renews the privileges of the roles granted
    usage (df.refresh_grants). A schema of a newer release is refused, never downgraded.
    Commits any transaction open on ``conn`` and leaves it in autocommit mode.
    """
    if not conn.autocommit:
        conn.commit()
        conn.autocommit = True
    _lock_installs(conn)
    try:
        have = installed(conn)
        if have is not None and _newer(have):
            check(have, conn.info.dbname)  # says the schema is newer than this package
        applied: list[str] = []
        with conn.transaction():
            if have is None:
                conn.execute(_read("tables.sql").encode())
                conn.execute(_record(latest_migration()).encode())
                applied.append("tables.sql")
            else:
                for migration in migrations():
                    if migration.version > have.migration:
                        conn.execute(migration.sql.encode())
                        applied.append(migration.name)
            if have is None or applied or have.code_digest != code_digest():
                conn.execute(code().encode())
                conn.execute(
                    "UPDATE df._schema SET release = %s, migration = %s, code_digest = %s,"
                    " upgraded_at = now()",
                    (__version__, latest_migration(), code_digest()),
                )
                applied.append(f"functions of {__version__}")
                if have is not None:
                    conn.execute("SELECT df.refresh_grants()")
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_INSTALL_LOCK,))
